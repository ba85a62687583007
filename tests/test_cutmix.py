"""CutMix's parts on known values: box masks (half the area, the aspect range, XOR of several boxes), mixing,
the confidence-weighted consistency loss; and its per-dataset defaults."""
import math

import torch

import common
import train_cutmix


def masks(n, size, n_boxes=1, area=(0.5, 0.5), seed=0):
    return train_cutmix.box_mask(n, size, n_boxes, area, torch.Generator().manual_seed(seed))


def box_extent(mask):
    """(rows, cols) of the bounding box of the ones in a (H, W) mask."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_cutmix_box_covers_half_the_area_up_to_rounding():
    m = masks(500, (64, 96))
    assert m.shape == (500, 1, 64, 96)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    area = m.mean((1, 2, 3))
    # a box of h x w pixels with h, w rounded: within one row and one column of exactly half
    assert (area - 0.5).abs().max() <= 1 / 64 + 1 / 96 + 1e-6
    assert abs(area.mean().item() - 0.5) < 0.005


def test_cutmix_box_aspect_range_and_bounds():
    m = masks(400, (64, 64))[:, 0]
    heights = []
    for mask in m:
        h, w = box_extent(mask.bool())
        heights.append(h.item() / 64)
        assert mask.sum() == h * w  # one solid rectangle, fully inside the image
    heights = torch.tensor(heights)
    # h = p^u with p = 0.5, u ~ U(0, 1): height share in [0.5, 1], log-uniform
    assert heights.min() >= 0.5 - 1 / 64 and heights.max() <= 1.0
    assert heights.min() < 0.55 and heights.max() > 0.95
    assert abs(torch.log2(heights).mean().item() + 0.5) < 0.05  # E[log2 h] = -0.5


def test_three_boxes_are_xor_combined_with_a_sixth_of_the_area_each():
    m = masks(2000, (60, 120), n_boxes=3, seed=3)
    area = m.mean((1, 2, 3))
    # three boxes of 1/6 each: exactly 1/2 when they do not overlap (up to rounding) ...
    tol = 3 * (1 / 60 + 1 / 120)
    assert area.max() <= 0.5 + tol
    assert ((area - 0.5).abs() <= tol).float().mean() > 0.03
    # ... and less where they do: XOR flips overlapping pixels back to 0
    assert (area < 0.5 - tol).float().mean() > 0.5


def test_equal_boxes_cancel_under_xor():
    # on a 1x1 image every box of area share 1 covers the pixel: XOR of two is 0, of three is 1
    assert masks(20, (1, 1), n_boxes=2, area=(1.0, 1.0)).sum() == 0
    assert masks(20, (1, 1), n_boxes=3, area=(1.0, 1.0)).sum() == 20


def test_cutout_area_range_zero_area_gives_empty_box():
    m = masks(10, (16, 16), area=(0.0, 0.0))
    assert m.sum() == 0


def test_mix_identical_images_is_identity_and_mask_selects_b():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = masks(2, (8, 8))
    assert torch.equal(train_cutmix.mix(a, a, mask), a)
    mixed = train_cutmix.mix(a, b, mask)
    assert torch.equal(mixed * mask, b * mask) and torch.allclose(mixed * (1 - mask), a * (1 - mask))


def test_consistency_loss_known_value():
    # 1 image, 2 classes, 1x2 pixels; teacher: pixel 0 confident (0.98), pixel 1 not (0.6)
    p_t = torch.tensor([[[[0.98, 0.6]], [[0.02, 0.4]]]])
    p_s = torch.tensor([[[[0.5, 0.5]], [[0.5, 0.5]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])  # pixel 1 is padding
    loss, conf = train_cutmix.consistency_loss(p_s, p_t, mask, 0.97)
    assert conf.item() == 0.5  # share of confident teacher pixels, over all pixels (invalid ones too)
    sq0 = (0.5 - 0.98) ** 2 + (0.5 - 0.02) ** 2  # summed over classes
    assert math.isclose(loss.item(), sq0 * 1.0 * 0.5 / 2, rel_tol=1e-6)  # mean over N*H*W = 2 pixels


def test_consistency_loss_is_zero_when_no_teacher_pixel_is_confident():
    p = torch.full((2, 3, 4, 4), 1 / 3)
    loss, conf = train_cutmix.consistency_loss(torch.rand(2, 3, 4, 4), p, torch.ones(2, 1, 4, 4), 0.97)
    assert loss.item() == 0 and conf.item() == 0


def test_defaults_are_the_papers_on_every_dataset():
    """γ = 1 (the original's on every dataset), τ = 0.97 (Sec. D.4.4), one box; the command line wins."""
    for dataset in common.DATASETS:
        args = common.parse_args(train_cutmix.Args, ["--dataset", dataset])
        assert (args.cons_weight, args.conf_thresh, args.n_boxes, args.nesterov) == (1.0, 0.97, 1, False), dataset
    args = common.parse_args(train_cutmix.Args, ["--dataset", "cityscapes", "--n-boxes", "3", "--cons-weight", "2"])
    assert (args.n_boxes, args.cons_weight) == (3, 2.0)
