"""CutMix consistency with a mean teacher (French et al., BMVC 2020, Sec. 3.3, Eq. 1, Fig. 5).

    L = CE(f_θ(x_l), y_l)
        + γ · c · mean_pixels Σ_classes ( f_θ(mix(x_a, x_b, M)) − mix(g_φ(x_a), g_φ(x_b), M) )²

    mix(a, b, M) = (1 − M) ⊙ a + M ⊙ b, M = a box of half the image area (random aspect and position);
    f_θ = student, g_φ = teacher (EMA of the student, α = 0.99); c = share of teacher pixels in the batch
    whose confidence reaches τ = 0.97 (paper Sec. D.4.4); the squared error is summed over classes and
    averaged over pixels (Sec. D.4.5), over valid pixels only.

Run:   python train_cutmix.py --dataset cityscapes --n-labeled 372
Diff:  train_baseline.py's loop plus the blocks marked `# --- CutMix ---`; the student's supervised
       pass joins its pass over the mixed images (step 4), and one backward pass takes the sum (step 6)
"""
from dataclasses import dataclass

import numpy as np
import torch

import common
from common import arg


@dataclass
class Args(common.TrainArgs):
    cons_weight: float = arg(1.0, "γ, weight of the consistency loss (the original's on every dataset)")
    conf_thresh: float = arg(0.97, "τ, teacher confidence counted as confident (Sec. D.4.4)")
    n_boxes: int = arg(1, "boxes per mask, each of area 1/(2·n), XOR-combined (Sec. D.3: 3 for full crops)")


def box_mask(n, size, n_boxes, area, generator):
    """(n, 1, H, W) float mask, 1 inside the box(es), as the original's mask_gen.py (BoxMaskGenerator).

    Per box: area share p ~ U(area), height share h = p^u with u ~ U(0, 1) (a log-uniform aspect
    ratio), width share p / h, both scaled by sqrt(1 / n_boxes); the box lies fully inside the image.
    Several boxes are XOR-combined: where two overlap the pixels flip back.
    """
    device = generator.device
    H, W = size
    lo, hi = area
    p = lo + (hi - lo) * torch.rand(n, n_boxes, generator=generator, device=device)
    u = torch.rand(n, n_boxes, generator=generator, device=device)
    h = torch.where(p > 0, p ** u, torch.zeros_like(p))
    w = torch.where(p > 0, p / h.clamp(min=1e-12), torch.zeros_like(p))
    box_h = torch.round(h * (1 / n_boxes) ** 0.5 * H)  # (n, n_boxes) pixels
    box_w = torch.round(w * (1 / n_boxes) ** 0.5 * W)
    y0 = torch.round((H - box_h) * torch.rand(n, n_boxes, generator=generator, device=device))
    x0 = torch.round((W - box_w) * torch.rand(n, n_boxes, generator=generator, device=device))
    ys = torch.arange(H, device=device).view(1, 1, H)
    xs = torch.arange(W, device=device).view(1, 1, W)
    in_y = (ys >= y0[..., None]) & (ys < (y0 + box_h)[..., None])  # (n, n_boxes, H)
    in_x = (xs >= x0[..., None]) & (xs < (x0 + box_w)[..., None])  # (n, n_boxes, W)
    inside = in_y[..., :, None] & in_x[..., None, :]  # (n, n_boxes, H, W)
    return (inside.sum(1, keepdim=True) % 2).float()  # XOR over boxes


def mix(a, b, mask):
    """mix(a, b, M) = (1 − M) ⊙ a + M ⊙ b: pixels inside the box come from b."""
    return (1 - mask) * a + mask * b


def consistency_loss(p_student, p_teacher, loss_mask, conf_thresh):
    """Confidence-modulated squared error (Sec. D.4.4, D.4.5); returns (loss, confident share).

    Squared error summed over classes keeps the gradient's size nearly independent of the number of
    classes, so one weight serves 2 classes and 21. The mean runs over all N·H·W pixels (masked ones
    count in the denominator), scaled by the share of confident teacher pixels in the whole batch:
    that share grows during training and stands in for the usual sigmoid ramp-up.
    """
    confident = (p_teacher.amax(1, keepdim=True) >= conf_thresh).float()  # (B, 1, H, W)
    conf_weight = common.global_mean(confident)  # the whole batch's, under torchrun too
    sq_err = (p_student - p_teacher).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    return (sq_err * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.make_run(args, method="cutmix")
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    mask_rng = torch.Generator(device).manual_seed(args.seed)  # --- CutMix ---: masks drawn on the device
    run.start(data, device, student, teacher, optimizer, scaler, generator=mask_rng)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- CutMix ---: x_a and x_b come from two independent shuffles of the unlabeled images (the whole
    # training set, labeled images included, as the original's two unlabeled loaders, and any without masks)
    everything = np.arange(len(data.unlabeled))
    unlabeled_a = run.stream(data.unlabeled, everything, stream_id=1, with_label=False)
    unlabeled_b = run.stream(data.unlabeled, everything, stream_id=2, with_label=False)

    common.set_train_mode(student, args.freeze_bn)
    common.set_train_mode(teacher, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- CutMix ---
        # 2. the teacher predicts the two unmixed batches
        x_a, v_a = common.to_device(next(unlabeled_a), device)  # (B, 3, H, W), (B, 1, H, W)
        x_b, v_b = common.to_device(next(unlabeled_b), device)
        with torch.no_grad(), common.autocast(args.amp, device):
            logits_a, logits_b = common.forward_each(teacher, x_a, x_b)
        # 3. draw the masks (for the global batch under torchrun), mix the teacher's predictions with them
        #    (mixing logits or probabilities is the same here: M is exactly 0 or 1 per pixel)
        mix_mask = common.local_rows(box_mask(args.batch_size, x_a.shape[2:], args.n_boxes, (0.5, 0.5),
                                              mask_rng))  # (B, 1, H, W), 1 = from x_b
        p_teacher = mix(logits_a.float(), logits_b.float(), mix_mask).softmax(1)
        # 4. the student predicts the labeled batch and the mixed images; padding carries no loss
        x_mix = mix(x_a, x_b, mix_mask)
        loss_mask = mix(v_a, v_b, mix_mask)
        with common.autocast(args.amp, device):
            logits_l, logits_mix = common.forward_each(student, x_l, x_mix)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. confidence-modulated consistency loss, added to the supervised one
        loss_cons, conf_weight = consistency_loss(logits_mix.float().softmax(1), p_teacher, loss_mask,
                                                  args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end CutMix ---

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
