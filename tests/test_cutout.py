"""Cutout's mask: the box's area distribution, shape and position, both readings of M, and its loss."""
import math

import pytest
import torch

import common
import train_cutout as C


def masks(n, size, erase_box=False, seed=0):
    return C.cutout_mask(n, size, erase_box, torch.Generator().manual_seed(seed))


def test_kept_area_is_uniform_on_0_1():
    area = masks(4000, (64, 96)).mean((1, 2, 3))
    assert abs(area.mean().item() - 0.5) < 0.015
    assert abs(area.var().item() - 1 / 12) < 0.005  # U(0, 1): variance 1/12
    counts = torch.histc(area, bins=5, min=0, max=1) / len(area)
    assert (counts - 0.2).abs().max() < 0.03


def test_each_mask_is_one_solid_box_inside_the_image_with_a_random_aspect():
    m = masks(500, (40, 60), seed=1)[:, 0].bool()
    aspects = []
    for mask in m:
        if not mask.any():
            continue
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # a single rectangle, nothing outside the image (slicing cannot wrap)
        area = (h * w).item() / (40 * 60)
        # h = p^u and w = p / h: both shares are at least the area share p (up to rounding)
        assert h / 40 >= area - 1 / 40 - 1e-6 and w / 60 >= area - 1 / 60 - 1e-6
        aspects.append(math.log((h / 40) / (w / 60)))
    assert min(aspects) < -1 and max(aspects) > 1  # tall and wide boxes both occur


def test_default_keeps_the_box_and_the_paper_reading_erases_it():
    keep, erase = masks(50, (16, 24), seed=2), masks(50, (16, 24), erase_box=True, seed=2)
    assert torch.equal(keep + erase, torch.ones_like(keep))  # the same box, complementary readings
    # erased and kept shares have the same U(0, 1) distribution
    assert abs(masks(3000, (32, 32), erase_box=True, seed=3).mean().item() - 0.5) < 0.02


def test_loss_counts_only_where_the_student_sees_the_image():
    torch.manual_seed(0)
    p_t = torch.full((2, 3, 8, 8), 0.01)
    p_t[:, 0] = 0.98  # a confident teacher
    p_s = torch.rand(2, 3, 8, 8).softmax(1).requires_grad_(True)
    cut_mask = masks(2, (8, 8), seed=4)
    valid = torch.ones(2, 1, 8, 8)
    valid[..., 0] = 0  # a column of padding
    loss, conf = C.consistency_loss(p_s, p_t, cut_mask * valid, 0.97)
    loss.backward()
    unseen = ((cut_mask * valid) == 0).expand_as(p_s)
    assert conf.item() == 1.0 and p_s.grad[unseen].abs().max() == 0 and p_s.grad[~unseen].abs().max() > 0
    # known value: squared error summed over classes, averaged over all 2·8·8 pixels
    expected = ((p_s - p_t).pow(2).sum(1, keepdim=True) * cut_mask * valid).sum() / 128
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)


def test_confidence_counts_pixels_the_student_does_not_see():
    p_t = torch.full((1, 2, 1, 4), 0.5)
    p_t[..., :1] = torch.tensor([0.99, 0.01]).view(1, 2, 1, 1)  # one confident pixel of four
    _, conf = C.consistency_loss(torch.rand(1, 2, 1, 4), p_t, torch.zeros(1, 1, 1, 4), 0.97)
    assert conf.item() == 0.25


@pytest.mark.parametrize("dataset", ["pascal_aug", "cityscapes", "isic2017", "demo", "folder"])
def test_weight_is_one_everywhere_and_nesterov_stays_off(dataset):
    args = common.parse_args(C.Args, ["--dataset", dataset])
    assert args.cons_weight == 1.0 and not args.nesterov
    if dataset == "isic2017":
        args = common.parse_args(C.Args, ["--dataset", dataset, "--erase-box"])
        assert args.cons_weight == 1.0 and not args.nesterov and args.erase_box and args.conf_thresh == 0.97
