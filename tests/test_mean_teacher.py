"""Known values of the method's parts: box masks, consistency loss, EMA, the original's optimizer."""
import math

import pytest
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


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_ema_alpha_zero_copies_the_student_bn_buffers_too():
    student = Tiny()
    teacher = common.make_teacher(student)
    student.train()(torch.randn(8, 3, 5, 5))  # moves the student's BN running statistics
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    common.ema_update(common.ema_pairs(teacher, student), 0.0)
    for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        if t.is_floating_point():
            assert torch.equal(t, s), k
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_k_steps_closed_form_and_integer_buffers_untouched():
    student = Tiny()
    teacher = common.make_teacher(student)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student.conv.weight.mul_(3.0)
        student.bn.running_var.fill_(4.0)
        student.bn.num_batches_tracked.fill_(7)
    pairs = common.ema_pairs(teacher, student)
    for _ in range(5):
        common.ema_update(pairs, 0.99)
    s = student.state_dict()
    for key in ("conv.weight", "bn.running_var"):
        expected = s[key] + 0.99 ** 5 * (t0[key] - s[key])
        assert torch.allclose(teacher.state_dict()[key], expected, atol=1e-6), key
    assert teacher.state_dict()["bn.num_batches_tracked"].item() == 0


def test_repeat_adam_equals_pytorch_adam_with_duplicated_parameters():
    torch.manual_seed(0)
    w1, w2 = torch.randn(5), torch.randn(3)
    grads = [(torch.randn(5), torch.randn(3)) for _ in range(4)]

    def run(make):
        a, b = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone())
        opt = make(a, b)
        for ga, gb in grads:
            a.grad, b.grad = ga.clone(), gb.clone()
            opt.step()
        return a.detach(), b.detach()

    with pytest.warns(UserWarning, match="duplicate"):
        ref = run(lambda a, b: torch.optim.Adam([{"params": [a, a, a, b], "lr": 0.1}], foreach=False))
    ours = run(lambda a, b: common.RepeatAdam([{"params": [a], "repeat": 3, "lr": 0.1},
                                               {"params": [b], "repeat": 1, "lr": 0.1}]))
    assert torch.allclose(ref[0], ours[0], atol=1e-6) and torch.allclose(ref[1], ours[1], atol=1e-6)


def test_supervised_loss_is_todays_mean_and_zero_on_a_batch_without_labels():
    import torch.nn.functional as F
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :4] = 255
    loss = common.supervised_loss(logits, labels)
    want = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.equal(loss, want)  # bit for bit: runs with labeled pixels do not move
    grad, = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.autograd.grad(want, logits)[0])
    none = torch.full_like(labels, 255)
    loss = common.supervised_loss(logits, none)
    grad, = torch.autograd.grad(loss, logits)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))
