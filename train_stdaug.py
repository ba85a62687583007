"""Standard-augmentation consistency with a mean teacher (French et al., BMVC 2020, Sec. D.1.1).

    L = CE(f_θ(x_l), y_l)
        + γ · c · mean_pixels Σ_classes ( f_θ(a_s(x)) − warp_{t→s}(g_φ(a_t(x))) )²

    a_t, a_s = two affine views of one unlabeled image x (crop, scale, flips; on ISIC also rotation),
    drawn as the original drew its pairs (seg_transforms_cv.py, transform_pair); warp_{t→s} = the affine map
    between them, which brings the teacher's probabilities (softmax first, then warp) and its valid-pixel mask
    into the student's frame; f_θ = student, g_φ = teacher (EMA of the student, α = 0.99); c = share of
    warped teacher pixels in the batch whose confidence reaches τ = 0.97 (Sec. D.4.4); the squared
    error is summed over classes and averaged over all pixels (Sec. D.4.5), counting only pixels valid
    in both views.

    Pairs (datapipe transform_pair in the original):
    - Pascal, and every dataset the original never ran this on (Cityscapes, demo, folder): the teacher
      crop is taken at scale 1; the student's window is a Hung scale away (crop / f, f in 0.5..1.5) and
      shifted by round(offset · U(−1, 1)) pixels per axis, clipped into the image; flips independent.
    - ISIC (a rotate/scale protocol): one scale and one rotation for both, the student shifted by
      round(offset · U(−1, 1)) output pixels per axis; h, v and transpose flips independent.

    One convention for every geometric step: each view is sampled from the source image through a 3×3
    matrix A (source pixel (x, y) → view pixel, pixel centres at integers, like OpenCV's warpAffine),
    and everything else derives from the two matrices with align_corners=True, as the original's
    affine.cv_to_torch: mixed conventions would misalign teacher and student.

Run:   python train_stdaug.py --dataset pascal_aug --n-labeled 106
Diff:  train_baseline.py's loop plus the blocks marked `# --- Std-aug ---`; the student's supervised
       pass joins its pass over the student views (step 4), and one backward pass takes the sum (step 6)
"""
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
    cons_weight: float = arg(0.003, "γ, weight of the consistency loss (ISIC: 0.1, the original's scripts)")
    conf_thresh: float = arg(0.97, "τ, teacher confidence counted as confident (Sec. D.4.4)")
    offset_range: int = arg(16, "largest shift, in pixels per axis, "
                                "between the teacher's and student's crops")

    # --- no options ---
    nesterov: bool = common.resolved(True)  # the original's aug program: SGD (ISIC) with Nesterov momentum
    # the original's BMVC scripts: γ 0.003 on Pascal, 0.1 on ISIC (its later scripts' 1.0 goes with the
    # colour augmentation of a later paper). It never ran std-aug on Cityscapes; the demo and folder
    # datasets take Pascal's, whose pair scheme they share.
    PER_DATASET: ClassVar[dict] = {"isic2017": dict(cons_weight=0.1)}


# ---- affine matrices: 3×3, acting on pixel coordinates (x, y, 1), pixel centres at integers ---------
def translate(tx, ty):
    return np.array([[1.0, 0, tx], [0, 1, ty], [0, 0, 1]])


def scale(sx, sy):
    return np.diag([sx, sy, 1.0])


def rotate(theta):
    """Counter-clockwise on screen (y points down), as the original's rotation_matrices."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def flip(flags, size):
    """Horizontal (x → W−1−x), vertical (y → H−1−y), then transpose (x ↔ y),
    in a view of size (H, W)."""
    h, w = size
    hflip, vflip, transpose = flags
    mirror = scale(-1 if hflip else 1, -1 if vflip else 1)
    m = translate(w - 1 if hflip else 0, h - 1 if vflip else 0) @ mirror
    return (np.array([[0, 1.0, 0], [1, 0, 0], [0, 0, 1]]) if transpose else np.eye(3)) @ m


def pixel_theta(m, src_size, dst_size):
    """(2, 3) float32 theta for F.affine_grid(align_corners=True) from a pixel-space matrix m that maps
    output (dst) pixels to input (src) pixels: conjugated by the pixel ↔ [−1, 1] maps, (size − 1) / 2
    per axis (separate x and y, so non-square views do not shear)."""
    def to_unit(size):  # pixel -> [-1, 1]
        h, w = size
        return translate(-1, -1) @ scale(2 / max(w - 1, 1), 2 / max(h - 1, 1))
    theta = to_unit(src_size) @ m @ np.linalg.inv(to_unit(dst_size))
    return torch.from_numpy(theta[:2]).float()


def pascal_pair(image_size, crop, offset_range, rng):
    """(A_teacher, A_student), source pixels → view pixels, as the original's Hung-scale transform_pair."""
    image_size, crop = np.array(image_size, float), np.array(crop, float)  # (H, W)
    f = 0.5 + rng.integers(0, 11) / 10  # the student's Hung scale; the teacher stays at scale 1
    window = np.round(crop / f)  # the student's source window (H, W)
    need = np.maximum(crop, window)
    pad = np.maximum(need - image_size, 0) // 2  # centred padding (top, left) up to `need`
    extra = np.maximum(image_size, need) - need
    pos_t = np.round(extra * rng.uniform(size=2))
    pos_s = np.clip(pos_t + np.round(offset_range * rng.uniform(-1, 1, size=2)), 0, extra)
    # both crops centred on their window position; minus the padding gives source coordinates (y, x)
    top_left_t = np.round(pos_t + need / 2 - crop / 2) - pad
    top_left_s = np.round(pos_s + need / 2 - window / 2) - pad
    s = crop / window  # resize factor of the student window (like cv2.resize: scale, then (s − 1) / 2)
    a_t = translate(-top_left_t[1], -top_left_t[0])
    a_s = translate(*(s[::-1] - 1) / 2) @ scale(*s[::-1]) @ translate(-top_left_s[1], -top_left_s[0])
    return a_t, a_s


def rotate_scale_pair(image_size, crop, aug, offset_range, rng):
    """(A_teacher, A_student) sharing scale and rotation, the student shifted: the original's ISIC pairs."""
    image_size, crop = np.array(image_size, float), np.array(crop, float)
    log_m = math.log(aug.get("max_scale") or 1.0)
    s = math.exp(rng.uniform(-log_m, log_m))
    theta = math.radians(rng.uniform(-1, 1) * (aug.get("rot") or 0.0))
    window = crop / s
    centre = np.maximum(image_size - window, 0) * rng.uniform(size=2) + np.minimum(window, image_size) / 2
    offset = np.round(offset_range * rng.uniform(-1, 1, size=2))  # (y, x), in output pixels

    def view(shift):
        return (translate(crop[1] / 2 + shift[1], crop[0] / 2 + shift[0]) @ rotate(theta) @ scale(s, s)
                @ translate(-centre[1], -centre[0]))
    return view((0, 0)), view(offset)


def sample_view(src, a, size, mode, border="zeros"):
    """src (C, H, W) float → (C, h, w): view pixel p shows source point A⁻¹ p; outside the source 0
    (border "zeros") or the mirrored image ("reflection": reflect-101 with align_corners=True)."""
    theta = pixel_theta(np.linalg.inv(a), src.shape[1:], size)
    grid = F.affine_grid(theta[None], (1, len(src), *size), align_corners=True)
    return F.grid_sample(src[None], grid, mode=mode, padding_mode=border, align_corners=True)[0]


def make_pair(image, crop, aug, offset_range, rng):
    """Teacher and student views of one image (H, W, 3) uint8: (image_t (3 or 4, h, w) uint8, valid_t (h, w)
    uint8 0/255, image_s, valid_s, theta (2, 3) mapping student-frame to teacher-frame coordinates)."""
    # (3, H, W) float, a copy: the image may be read-only
    src = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)
    rotate_scale = bool(aug.get("rot") or aug.get("max_scale"))  # ISIC's protocol, as common.augment
    if rotate_scale:  # beyond the border the image is mirrored: an alpha channel of 255 tells to_device
        a_t, a_s = rotate_scale_pair(image.shape[:2], crop, aug, offset_range, rng)  # that it is no padding
        src = torch.cat([src, torch.full_like(src[:1], 255)])
    else:
        a_t, a_s = pascal_pair(image.shape[:2], crop, offset_range, rng)
    # flips drawn independently per view; a transpose keeps the view's shape only on a square crop
    can_transpose = aug.get("transpose") and crop[0] == crop[1]
    a_t, a_s = (flip([aug.get("hflip") and rng.uniform() < 0.5, aug.get("vflip") and rng.uniform() < 0.5,
                      can_transpose and rng.uniform() < 0.5], crop) @ a for a in (a_t, a_s))
    # as the original: Pascal pads with 0 and resizes the student's valid mask with nearest; ISIC's
    # rotations mirror the image beyond its border and warp the valid mask bilinearly
    valid_mode, border = ("bilinear", "reflection") if rotate_scale else ("nearest", "zeros")
    views = []
    for a, mode in ((a_t, "bilinear"), (a_s, valid_mode)):
        views.append(sample_view(src, a, crop, "bilinear", border).round().clamp(0, 255).to(torch.uint8))
        ones = torch.ones(1, *src.shape[1:])  # every source pixel is valid
        views.append((sample_view(ones, a, crop, mode)[0] * 255).round().to(torch.uint8))
    # student pixel -> teacher pixel is A_t · A_s⁻¹
    return (*views, pixel_theta(a_t @ np.linalg.inv(a_s), crop, crop))


class PairSet(torch.utils.data.Dataset):
    """Unlabeled (teacher view, student view) pairs, indexed like common.TrainSet by (sample, seed), so
    each pair is fixed by its stream position alone: the same in any worker and after a resume."""

    def __init__(self, split, crop, aug, offset_range):
        self.split = split
        self.crop = tuple(crop)
        self.aug = aug
        self.offset_range = offset_range

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key
        image = self.split.load(index)[0]
        return make_pair(image, self.crop, self.aug, self.offset_range, np.random.default_rng(seed))


def warp(t, theta, size):
    """(B, C, h, w) teacher-frame tensor → student frame; zero where the teacher view has no pixel."""
    grid = F.affine_grid(theta, (len(t), t.shape[1], *size), align_corners=True)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def consistency_loss(p_student, p_teacher, loss_mask, conf_thresh):
    """Confidence-modulated squared error (Sec. D.4.4, D.4.5); returns (loss, confident share).

    Squared error summed over classes keeps the gradient's size nearly independent of the number of
    classes, so one weight serves 2 classes and 21. The mean runs over all N·H·W pixels (masked ones
    count in the denominator), scaled by the share of confident warped teacher pixels in the whole
    batch: that share grows during training and stands in for a sigmoid ramp-up.
    """
    confident = (p_teacher.amax(1, keepdim=True) >= conf_thresh).float()  # (B, 1, H, W)
    conf_weight = common.global_mean(confident)  # the whole batch's, under torchrun too
    sq_err = (p_student - p_teacher).pow(2).sum(1, keepdim=True)  # (B, 1, H, W)
    return (sq_err * loss_mask * conf_weight).mean(), conf_weight


def main(args):
    run = common.make_run(args, method="stdaug")
    device = common.setup_device(args)
    data = run.load_data()
    student = common.build_net(args, data.num_classes, device)
    teacher = common.make_teacher(student)
    optimizer = common.make_optimizer(student, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run.start(data, device, student, teacher, optimizer, scaler)
    ema = common.ema_pairs(teacher, student)
    labeled = run.stream(data.train, data.labeled, stream_id=0)
    # --- Std-aug ---: one batch of view pairs per iteration, from a shuffle of the unlabeled images
    pairs = PairSet(data.unlabeled, args.crop_size, args.aug, args.offset_range)
    unlabeled = run.stream(data.unlabeled, np.arange(len(data.unlabeled)), stream_id=1, dataset=pairs)

    common.set_train_mode(student, args.freeze_bn)
    common.set_train_mode(teacher, args.freeze_bn)
    for it in run.iterations():
        common.set_lr(optimizer, args, it)
        # 1. the labeled batch
        x_l, y_l, _ = common.to_device(next(labeled), device)

        # --- Std-aug ---
        # 2. the teacher predicts its view of each image
        images_t, valid_t, images_s, valid_s, theta = next(unlabeled)
        x_t, v_t = common.to_device((images_t, valid_t), device)  # teacher views (B, 3, H, W), (B, 1, H, W)
        x_s, v_s = common.to_device((images_s, valid_s), device)  # student views
        theta = theta.to(device, non_blocking=True)  # (B, 2, 3): student-frame -> teacher-frame coordinates
        with torch.no_grad(), common.autocast(args.amp, device):
            logits_t = teacher(x_t)
        # 3. warp the teacher's probabilities and valid mask into the student's frame; pixels with no
        #    counterpart in the teacher's view get 0 and drop out of the loss
        p_teacher = warp(logits_t.float().softmax(1), theta, x_s.shape[2:])  # (B, K, H, W)
        loss_mask = warp(v_t, theta, x_s.shape[2:]) * v_s  # (B, 1, H, W), valid in both views
        # 4. the student predicts the labeled batch and its own views
        with common.autocast(args.amp, device):
            logits_l, logits_s = common.forward_each(student, x_l, x_s)
        loss_sup = common.supervised_loss(logits_l, y_l, args.ohem, args.loss_shares)
        # 5. confidence-modulated consistency loss, added to the supervised one
        loss_cons, conf_weight = consistency_loss(logits_s.float().softmax(1), p_teacher, loss_mask,
                                                  args.conf_thresh)
        loss = loss_sup + args.cons_weight * loss_cons
        # --- end Std-aug ---

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
