"""Virtual adversarial training (VAT) with a mean teacher (French et al., BMVC 2020, Sec. D.1.3).

    L = CE(f_θ(x_l), y_l) + γ · c · mean_pixels Σ_classes KL( g_φ(x) ‖ f_θ(x + r_adv) )

    r_adv = ε · g / ‖g‖,  g = ∇_d Σ_pixels KL( g_φ(x) ‖ g_φ(x + d) )
    at a random d of norm ξ = 1e-6·H·W/1000 (one power iteration, Miyato et al.), norms per image;
    ε = vat_radius · ½ · sqrt(Σ (x[v+1] − x[v−1])² + Σ (x[u+1] − x[u−1])²),
    the adaptive radius: half the L2 norm of the image's central-difference gradient field, on normalised
    pixels (scale 1 in the paper), or vat_radius · sqrt(C·H·W) with --vat-fixed-radius. f_θ = student,
    g_φ = teacher (EMA of the student, α = 0.99), which also gives the direction, in eval mode, as the
    original's train_seg_semisup_vat_mt.py did; c = share of teacher pixels in the batch whose confidence
    reaches τ = 0.97 (Sec. D.4.4); the KL divergence is summed over classes and averaged over all pixels,
    over valid pixels only.

Run:   python train_vat.py --dataset pascal_aug --n-labeled 106
Diff:  train_baseline.py's loop plus the blocks marked `# --- VAT ---`; the student's supervised
       pass joins its pass over the perturbed images (step 4), and one backward pass takes the sum (step 6)
"""
import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import arg


@dataclass
class Args(common.TrainArgs):
    cons_weight: float = arg(0.1, "γ, weight of the consistency loss (ISIC: 0.001, the original's script)")
    conf_thresh: float = arg(0.97, "τ, teacher confidence counted as confident (Sec. D.4.4)")
    vat_radius: float = arg(1.0, "scale of the adversarial radius ε "
                                 "(Sec. D.1.3: 1 with the adaptive radius)")
    vat_fixed_radius: bool = arg(False, "ε = vat_radius · sqrt(C·H·W) for every image "
                                        "instead of the adaptive, image-gradient radius")

    # --- no options ---
    nesterov: bool = common.resolved(True)  # the original's VAT program: SGD (ISIC) with Nesterov momentum
    # the original's BMVC scripts: γ 0.1 on Pascal, 0.001 on ISIC (the script's value; the paper's text
    # says 0.1). It never ran VAT on Cityscapes; the demo and folder datasets take Pascal's, the
    # natural-image setting it was tuned on.
    PER_DATASET: ClassVar[dict] = {"isic2017": dict(cons_weight=0.001)}


@contextlib.contextmanager
def exact_fp32(device):
    """Full fp32 inside (no autocast, no TF32), as the original's PyTorch 1.4 computed everything.

    The probe d has a norm of ξ ≈ 1e-4 spread over all C·H·W inputs (~1e-7 each): bf16 or TF32 inputs
    (~1e-3 relative precision) would round x + d back to x, and the direction would be noise.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def unit_per_image(t):
    """t scaled to unit L2 norm over (C, H, W), image by image."""
    return t / (t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def adaptive_radius(x):
    """(B, 1, 1, 1): half the L2 norm of the central differences (step 2) of the normalised image.

    Semantic segmentation classifies the patch around each pixel, and the nearest patch to it is the
    one centred on a neighbouring pixel; the image gradient measures that distance, so the radius
    follows the image's own content (the original's --adaptive_vat_radius).
    """
    dy = x[:, :, 2:, :] - x[:, :, :-2, :]
    dx = x[:, :, :, 2:] - x[:, :, :, :-2]
    return 0.5 * (dy.pow(2).flatten(1).sum(1) + dx.pow(2).flatten(1).sum(1)).sqrt().view(-1, 1, 1, 1)


def vat_perturbation(net, x, p, vat_radius, adaptive, noise):
    """r_adv (B, C, H, W), detached: the direction that most changes `net`'s prediction p (B, K, H, W)
    on x, found by one power iteration from the random probe `noise` (B, C, H, W) scaled to norm ξ,
    then scaled per image to ε."""
    xi = 1e-6 * x.shape[2] * x.shape[3] / 1000  # the original's probe size, not ξ/sqrt(dim)
    d = unit_per_image(noise) * xi
    d.requires_grad_(True)
    log_q = F.log_softmax(net(x + d), 1)
    divergence = F.kl_div(log_q, p, reduction="sum")  # summed over pixels, classes and images
    g, = torch.autograd.grad(divergence, d)
    if adaptive:
        radius = vat_radius * adaptive_radius(x)  # (B, 1, 1, 1)
    else:
        radius = vat_radius * math.sqrt(x[0].numel())
    return (radius * unit_per_image(g)).detach()


def consistency_loss(logits_student, p_teacher, loss_mask, conf_thresh):
    """Confidence-modulated KL divergence KL(p_teacher ‖ p_student) (Sec. D.4.4); returns (loss, share).

    Summed over classes and averaged over all N·H·W pixels (masked ones count in the denominator),
    scaled by the share of confident teacher pixels in the whole batch: that share grows during
    training and stands in for a sigmoid ramp-up.
    """
    confident = (p_teacher.amax(1, keepdim=True) >= conf_thresh).float()  # (B, 1, H, W)
    conf_weight = common.global_mean(confident)  # the whole batch's, under torchrun too
    log_p_student = F.log_softmax(logits_student, 1)
    kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(1, keepdim=True)  # (B, 1, H, W)
    return (kl * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.make_run(args, method="vat")
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    noise_rng = torch.Generator(device).manual_seed(args.seed)  # --- VAT ---: probes drawn on the device
    run.start(data, device, student, teacher, optimizer, scaler, generator=noise_rng)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- VAT ---: one unlabeled batch per iteration, from a shuffle of the unlabeled images (the whole
    # training set, labeled images included, as the original, and any without masks)
    unlabeled = run.stream(data.unlabeled, np.arange(len(data.unlabeled)), stream_id=1, with_label=False)

    common.set_train_mode(student, args.freeze_bn)
    teacher.eval()  # --- VAT ---: as the original's direction net, switched to eval for good (Sec. D.1.3)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- VAT ---
        # 2. the teacher predicts the clean images, in full fp32
        x_u, v_u = common.to_device(next(unlabeled), device)  # (B, 3, H, W), (B, 1, H, W)
        with torch.no_grad(), exact_fp32(device):
            p_teacher = teacher(x_u).softmax(1)  # (B, K, H, W)
        # 3. the adversarial perturbation, from the teacher (one power iteration, full fp32), starting
        #    from a random probe (drawn for the global batch under torchrun)
        noise = common.local_rows(torch.randn((args.batch_size, *x_u.shape[1:]), generator=noise_rng,
                                              device=device))  # (B, 3, H, W)
        with exact_fp32(device):
            r_adv = vat_perturbation(teacher, x_u, p_teacher, args.vat_radius, not args.vat_fixed_radius,
                                     noise)  # (B, 3, H, W)
        # 4. the student predicts the labeled batch and the perturbed images
        with common.autocast(args.amp, device):
            logits_l, logits_adv = common.forward_each(student, x_l, x_u + r_adv)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. confidence-modulated KL consistency loss, added to the supervised one
        loss_cons, conf_weight = consistency_loss(logits_adv.float(), p_teacher, v_u, args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end VAT ---

        # 6. step: one backward pass, gradients averaged over torchrun processes, the teacher follows by EMA
        scaler.scale(loss).backward()
        common.all_reduce_grads(student)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        common.ema_update(ema, args.teacher_alpha)
        # 7. log; every --eval-every iterations evaluate (the teacher; the student too at the end), checkpoint
        run.end_iteration(it, sup=loss_sup, cons=loss_cons, conf=conf_weight)
    return run.finish()


if __name__ == "__main__":
    main(common.parse_args(Args))
