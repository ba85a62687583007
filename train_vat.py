"""Virtual adversarial training (VAT) with a mean teacher (French et al., BMVC 2020, Sec. D.1.3).

    L = CE(f_θ(x_l), y_l) + γ · c · mean_pixels Σ_classes KL( g_φ(x) ‖ f_θ(x + r_adv) )

    r_adv = ε · g / ‖g‖,  g = ∇_d Σ_pixels KL( g_φ(x) ‖ g_φ(x + d) ) at a random d of norm ξ = 1e-6·H·W/1000
    (one power iteration, Miyato et al.), norms per image; ε = vat_radius · ½ · sqrt(Σ (x[v+1] − x[v−1])²
    + Σ (x[u+1] − x[u−1])²), the adaptive radius: half the L2 norm of the image's central-difference
    gradient field, on normalised pixels (scale 1 in the paper), or vat_radius · sqrt(C·H·W) with
    --vat-fixed-radius. f_θ = student, g_φ = teacher (EMA of the student, α = 0.99), which also gives
    the direction, in eval mode, as the original did (REFERENCE §2.6, G6, G21); c = share of teacher
    pixels in the batch whose confidence reaches τ = 0.97 (Sec. D.4.4); the KL divergence is summed over
    classes and averaged over all pixels, over valid pixels only.

Run:   python train_vat.py --dataset pascal_aug --n-labeled 106
Diff:  train_baseline.py's loop plus the blocks marked `# --- VAT ---`; the student's supervised
       pass joins its pass over the perturbed images (step 4), and one backward pass takes the sum (step 6)
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import arg


@dataclass
class Args(common.TrainArgs):
    cons_weight: float = arg(None, "γ, weight of the consistency loss (default: the paper's per dataset: "
                                   "0.1, ISIC 0.001)")
    conf_thresh: float = arg(0.97, "τ, teacher confidence counted as confident (Sec. D.4.4)")
    vat_radius: float = arg(1.0, "scale of the adversarial radius ε (Sec. D.1.3: 1 with the adaptive radius)")
    vat_fixed_radius: bool = arg(False, "ε = vat_radius · sqrt(C·H·W) for every image instead of the adaptive, "
                                        "image-gradient radius")

    @staticmethod
    def method_protocol(dataset):
        # REFERENCE §10.1, BMVC scripts: Pascal 0.1, ISIC 0.001 (the script's value; the paper's text says
        # 0.1, G23). The original never ran VAT on Cityscapes; the demo and folder datasets take Pascal's,
        # the natural-image setting it was tuned on. Nesterov: on in the original's VAT program (G8; used
        # where the dataset selects SGD, i.e. ISIC).
        return dict(cons_weight={"isic2017": 0.001}.get(dataset, 0.1), nesterov=True)


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
    follows the image's own content (REFERENCE §2.6 step 6).
    """
    dy = x[:, :, 2:, :] - x[:, :, :-2, :]
    dx = x[:, :, :, 2:] - x[:, :, :, :-2]
    return 0.5 * (dy.pow(2).flatten(1).sum(1) + dx.pow(2).flatten(1).sum(1)).sqrt().view(-1, 1, 1, 1)


def vat_perturbation(net, x, p, vat_radius, adaptive, noise):
    """r_adv (B, C, H, W), detached: the direction that most changes `net`'s prediction p (B, K, H, W)
    on x, found by one power iteration from the random probe `noise` (B, C, H, W) scaled to norm ξ,
    then scaled per image to ε."""
    xi = 1e-6 * x.shape[2] * x.shape[3] / 1000  # the original's probe size (not ξ/sqrt(dim), G21)
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
    conf_weight = (p_teacher.amax(1, keepdim=True) >= conf_thresh).float().mean()
    kl = F.kl_div(F.log_softmax(logits_student, 1), p_teacher, reduction="none").sum(1, keepdim=True)  # (B, 1, H, W)
    return (kl * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.Run(args, method="vat")
    device = common.setup_device(args)
    data = common.load_dataset(args)
    student = common.build_net(args, data.num_classes).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    noise_rng = torch.Generator(device).manual_seed(args.seed)  # --- VAT ---: probes drawn on the device
    start = run.start(data, device, student=student, teacher=teacher, optimizer=optimizer, scaler=scaler,
                      noise_rng=noise_rng)
    ema = common.ema_pairs(teacher, student)
    labeled = common.stream(data.train, data.labeled, args, stream_id=0, start=start)
    # --- VAT ---: one unlabeled batch per iteration, from a shuffle of the whole training set (G17)
    unlabeled = common.stream(data.train, np.arange(len(data.train)), args, stream_id=1, start=start,
                              with_label=False)

    def batch(images, valid):
        return common.to_device(images, valid, device, data.mean, data.std, channels_last)

    for it in run.iterations():
        # 1. the labeled batch
        images, y_l, valid = next(labeled)
        x_l, _ = batch(images, valid)
        y_l = y_l.to(device, non_blocking=True).long()

        # --- VAT ---
        # 2. the teacher predicts the clean images in eval mode: the original switched its direction
        #    net to eval and left it there until the next evaluation, so every teacher pass ran in eval
        #    (G6); the evaluation puts it back in train mode, and this line switches it again
        x_u, v_u = batch(*next(unlabeled))  # (B, 3, H, W), (B, 1, H, W)
        teacher.eval()
        with torch.no_grad(), exact_fp32(device):
            p_teacher = teacher(x_u).softmax(1)  # (B, K, H, W)
        # 3. the adversarial perturbation, from the teacher (one power iteration, full fp32), starting
        #    from a random probe (drawn for the global batch: the same however many torchrun processes)
        noise = common.local_rows(torch.randn((args.batch_size, *x_u.shape[1:]), generator=noise_rng, device=device))
        with exact_fp32(device):
            r_adv = vat_perturbation(teacher, x_u, p_teacher, args.vat_radius, not args.vat_fixed_radius,
                                     noise)  # (B, 3, H, W)
        # 4. the student predicts the labeled batch and the perturbed images (one pass over both where no
        #    BatchNorm uses batch statistics, as DeepLab v2's frozen ones; else one each)
        with common.autocast(args, device):
            logits_l, logits_adv = common.forward_each(student, x_l, x_u + r_adv)
        loss_sup = F.cross_entropy(logits_l.float(), y_l, ignore_index=common.IGNORE)
        # 5. confidence-modulated KL consistency loss, added to the supervised one
        loss_cons, conf_weight = consistency_loss(logits_adv.float(), p_teacher, v_u, args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end VAT ---

        # 6. one backward pass and one optimizer step (under torchrun on the gradients averaged over
        #    processes), then the teacher follows the student by EMA
        scaler.scale(loss).backward()
        common.all_reduce_grads(student)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        common.ema_update(ema, args.teacher_alpha)
        # 7. log; every --eval-every iterations: evaluate the teacher (the student too at the end), checkpoint
        run.end_iteration(it, sup=loss_sup, cons=loss_cons, conf=conf_weight)
    return run.finish()


if __name__ == "__main__":
    main(common.parse_args(Args))
