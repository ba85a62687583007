"""Interpolation consistency training (ICT) with a mean teacher (French et al., BMVC 2020, Sec. D.1.2).

    L = CE(f_θ(x_l), y_l)
        + γ · c · mean_pixels Σ_classes ( f_θ(mix(x_0, x_1, λ)) − mix(g_φ(x_0), g_φ(x_1), λ) )²

    mix(a, b, λ) = (1 − λ) · a + λ · b, one λ ~ Beta(α, α) per image pair (α = 0.1: most λ lie
    near 0 or 1), applied to every pixel (Verma et al.'s MixUp, pixel-wise); f_θ = student,
    g_φ = teacher (EMA of the student, α_EMA = 0.99); c = share of pixels in the batch whose *mixed
    teacher confidence* (1 − λ) · max g_φ(x_0) + λ · max g_φ(x_1) reaches τ = 0.97 (as the original's
    train_seg_semisup_ict.py: it mixes the confidences, it does not take the max of the mixed
    probabilities); the squared error is summed over classes and averaged over all pixels (Sec. D.4.5),
    weighted by the mixed valid-pixel mask.

Run:   python train_ict.py --dataset pascal_aug --n-labeled 106
Diff:  train_baseline.py's loop plus the blocks marked `# --- ICT ---`; the student's supervised
       pass joins its pass over the mixed images (step 4), and one backward pass takes the sum (step 6)
"""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import common
from common import arg

MIX_STREAM = 3  # seeds of the mixing weights: (seed, 3, iteration); streams 0 and 1 are the samplers'


@dataclass
class Args(common.TrainArgs):
    cons_weight: float = arg(0.01, "γ, weight of the consistency loss "
                                   "(ISIC: 0.0003, the original's scripts)")
    conf_thresh: float = arg(0.97, "τ, teacher confidence counted as confident (Sec. D.4.4)")
    ict_alpha: float = arg(0.1, "α of the Beta(α, α) distribution of the per-image mixing weight λ")

    # --- no options ---
    nesterov: bool = common.resolved(True)  # the original's ICT program: SGD (ISIC) with Nesterov momentum
    # the original's BMVC scripts: γ 0.01 on Pascal, 0.0003 on ISIC (its later scripts' 1.0 goes with the
    # colour augmentation of a later paper). It never ran ICT on Cityscapes; the demo and folder datasets
    # take Pascal's, the natural-image setting it was tuned on.
    PER_DATASET: ClassVar[dict] = {"isic2017": dict(cons_weight=0.0003)}


def mixing_weights(n, alpha, rng):
    """(n, 1, 1, 1) λ ~ Beta(α, α), one per image pair, drawn with numpy as the original did."""
    return torch.from_numpy(rng.beta(alpha, alpha, size=(n, 1, 1, 1))).float()


def ict_mix(a, b, lam):
    """mix(a, b, λ) = (1 − λ) · a + λ · b, λ broadcast over channels and pixels."""
    return (1 - lam) * a + lam * b


def consistency_loss(p_student, p_teacher, conf_teacher, loss_mask, conf_thresh):
    """Confidence-modulated squared error (Sec. D.4.4, D.4.5); returns (loss, confident share).

    conf_teacher (B, 1, H, W) is the teacher's confidence per pixel: for ICT, the mix of the two
    images' confidences. Squared error summed over classes keeps the gradient's size nearly independent
    of the number of classes. The mean runs over all N·H·W pixels (masked ones count in the
    denominator), scaled by the share of confident pixels in the whole batch: that share grows during
    training and stands in for a sigmoid ramp-up.
    """
    confident = (conf_teacher >= conf_thresh).float()  # (B, 1, H, W)
    conf_weight = common.global_mean(confident)  # the whole batch's, under torchrun too
    sq_err = (p_student - p_teacher).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    return (sq_err * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.make_run(args, method="ict")
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run.start(data, device, student, teacher, optimizer, scaler)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- ICT ---: x_0 and x_1 are two consecutive batches of one shuffle of the unlabeled images (the whole
    # training set, labeled images included, as the original's ICT program, and any without masks)
    unlabeled = run.stream(data.unlabeled, np.arange(len(data.unlabeled)), stream_id=1, with_label=False,
                           per_iteration=2)

    common.set_train_mode(student, args.freeze_bn)
    common.set_train_mode(teacher, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- ICT ---
        # 2. the teacher predicts the two unmixed batches
        x_0, v_0 = common.to_device(next(unlabeled), device)  # (B, 3, H, W), (B, 1, H, W)
        x_1, v_1 = common.to_device(next(unlabeled), device)
        with torch.no_grad(), common.autocast(args.amp, device):
            p_0, p_1 = (logits.float().softmax(1) for logits in common.forward_each(teacher, x_0, x_1))
        # 3. mix images, teacher probabilities and teacher confidences with the same λ per pair; the
        #    weights depend only on (seed, iteration), so a resumed run draws the same ones
        lam = common.local_rows(mixing_weights(args.batch_size, args.ict_alpha,  # for the global batch
                                               np.random.default_rng([args.seed, MIX_STREAM, it])))
        # (B, 1, 1, 1), the weight of x_1; pinned and asynchronous: no wait for the GPU's queue
        lam = (lam.pin_memory() if device.type == "cuda" else lam).to(device, non_blocking=True)
        p_teacher = ict_mix(p_0, p_1, lam)  # (B, C, H, W)
        conf_teacher = ict_mix(p_0.amax(1, keepdim=True), p_1.amax(1, keepdim=True), lam)  # (B, 1, H, W)
        # 4. the student predicts the labeled batch and the mixed images; the valid mask mixes too
        x_mix = ict_mix(x_0, x_1, lam)
        loss_mask = ict_mix(v_0, v_1, lam)
        with common.autocast(args.amp, device):
            logits_l, logits_mix = common.forward_each(student, x_l, x_mix)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. confidence-modulated consistency loss, added to the supervised one
        loss_cons, conf_weight = consistency_loss(logits_mix.float().softmax(1), p_teacher, conf_teacher,
                                                  loss_mask, args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end ICT ---

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
