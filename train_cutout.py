"""Cutout consistency with a mean teacher (French et al., BMVC 2020, Sec. 3.3, Fig. 6).

    L = CE(f_θ(x_l), y_l) + γ · c · mean_pixels M ⊙ Σ_classes ( f_θ(M ⊙ x) − g_φ(x) )²

    M = the pixels the student sees (1) or not (0), from one box whose area share is U(0, 1), with a
    random aspect ratio, lying fully inside the image; f_θ = student, g_φ = teacher (EMA of the student,
    α = 0.99), which sees the whole image (Cutout is the *strong* augmentation, as in FixMatch);
    c = share of teacher pixels in the batch whose confidence reaches τ = 0.97 (Sec. D.4.4); the squared
    error is summed over classes and averaged over all pixels (Sec. D.4.5), counting only where M = 1
    and the pixel is real image content. Blanked pixels are 0 after normalisation: the mean colour.

    Two readings of M (the paper's text and the original code disagree):
    - default, the original code: its box generator inverts by default, so M = 1 *inside* the box. The
      student keeps a random rectangle, everything around it is blanked, and the loss counts only inside
      the rectangle. This is what produced the paper's numbers.
    - --erase-box, the paper's text (after DeVries & Taylor): M starts at 1 and the box is set to 0, so
      the student sees the image with one rectangle blanked and the loss counts on the rest.
    With the area share drawn from U(0, 1) the seen area has the same distribution both ways; what
    differs is the shape of the seen region: a rectangle, or the complement of one.

Run:   python train_cutout.py --dataset cityscapes --n-labeled 372
Diff:  train_baseline.py's loop plus the blocks marked `# --- Cutout ---`; the student's supervised
       pass joins its pass over the masked images (step 4), and one backward pass takes the sum (step 6)
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
    erase_box: bool = arg(False, "the paper text's Cutout: blank the box, keep the rest "
                                 "(default: the original code's, keep the box and blank the rest)")


def box_mask(n, size, area, generator):
    """(n, 1, H, W) float mask, 1 inside one box, as the original's mask_gen.py (BoxMaskGenerator).

    Area share p ~ U(area), height share h = p^u with u ~ U(0, 1) (a log-uniform aspect ratio), width
    share p / h; both lie in [p, 1], so the box always fits; its position is uniform inside the image.
    """
    device = generator.device
    H, W = size
    lo, hi = area
    p = lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device)
    h = torch.where(p > 0, p ** u, torch.zeros_like(p))
    w = torch.where(p > 0, p / h.clamp(min=1e-12), torch.zeros_like(p))
    box_h, box_w = torch.round(h * H), torch.round(w * W)  # (n,) pixels
    y0 = torch.round((H - box_h) * torch.rand(n, generator=generator, device=device))
    x0 = torch.round((W - box_w) * torch.rand(n, generator=generator, device=device))
    ys = torch.arange(H, device=device).view(1, H)
    xs = torch.arange(W, device=device).view(1, W)
    in_y = (ys >= y0[:, None]) & (ys < (y0 + box_h)[:, None])  # (n, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + box_w)[:, None])  # (n, W)
    return (in_y[:, None, :, None] & in_x[:, None, None, :]).float()


def cutout_mask(n, size, erase_box, generator):
    """(n, 1, H, W) M, 1 = the student sees the pixel: inside the box (the original code) or, with
    erase_box, outside it (the paper's text). The box's area share is U(0, 1) (--mask_prop_range=0:1)."""
    box = box_mask(n, size, (0.0, 1.0), generator)
    return 1 - box if erase_box else box


def consistency_loss(p_student, p_teacher, loss_mask, conf_thresh):
    """Confidence-modulated squared error (Sec. D.4.4, D.4.5); returns (loss, confident share).

    Squared error summed over classes keeps the gradient's size nearly independent of the number of
    classes, so one weight serves 2 classes and 21. The mean runs over all N·H·W pixels (masked ones
    count in the denominator), scaled by the share of confident teacher pixels in the whole batch,
    blanked pixels included: that share grows during training and stands in for a sigmoid ramp-up.
    """
    confident = (p_teacher.amax(1, keepdim=True) >= conf_thresh).float()  # (B, 1, H, W)
    conf_weight = common.global_mean(confident)  # the whole batch's, under torchrun too
    sq_err = (p_student - p_teacher).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    return (sq_err * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.make_run(args, method="cutout")
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    mask_rng = torch.Generator(device).manual_seed(args.seed)  # --- Cutout ---: masks drawn on the device
    run.start(data, device, student, teacher, optimizer, scaler, generator=mask_rng)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- Cutout ---: one unlabeled batch per iteration, from a shuffle of the unlabeled images (the whole
    # training set, labeled images included, as the original, and any without masks)
    unlabeled = run.stream(data.unlabeled, np.arange(len(data.unlabeled)), stream_id=1, with_label=False)

    common.set_train_mode(student, args.freeze_bn)
    common.set_train_mode(teacher, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- Cutout ---
        # 2. the teacher predicts the whole, unmasked images
        x_u, v_u = common.to_device(next(unlabeled), device)  # (B, 3, H, W), (B, 1, H, W)
        with torch.no_grad(), common.autocast(args.amp, device):
            p_teacher = teacher(x_u).float().softmax(1)
        # 3. draw M, the pixels the student gets to see (for the global batch under torchrun)
        cut_mask = common.local_rows(cutout_mask(args.batch_size, x_u.shape[2:], args.erase_box,
                                                 mask_rng))  # (B, 1, H, W), 1 = seen
        # 4. the student predicts the labeled batch and the masked images; blanked pixels become 0, the
        #    mean colour
        with common.autocast(args.amp, device):
            logits_l, logits_cut = common.forward_each(student, x_l, x_u * cut_mask)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. confidence-modulated consistency loss, only where the student sees real image content
        loss_cons, conf_weight = consistency_loss(logits_cut.float().softmax(1), p_teacher, cut_mask * v_u,
                                                  args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end Cutout ---

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
