"""UniMatch's protocol parts in common.py: OHEM cross-entropy, sliding-window evaluation, the weak view."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import common


# ---- ohem_loss ---------------------------------------------------------------------------------------
def two_class(p_true, labels):
    """Logits (1, 2, 1, N) with logits (0, z) per pixel such that the labeled class has probability p_true."""
    p = torch.tensor(p_true, dtype=torch.float64)
    y = torch.tensor(labels)
    p1 = torch.where(y == 1, p, 1 - p)  # probability of class 1
    z = torch.log(p1 / (1 - p1))
    logits = torch.stack([torch.zeros_like(z), z]).float()[None, :, None, :]
    return logits, y[None, None, :]


def test_all_labeled_pixels_count_when_min_kept_exceeds_them():
    logits, labels = two_class([0.5, 0.25, 0.9, 0.1, 0.1], [0, 1, 0, 255, 255])
    # 3 labeled pixels < min_kept 4 (the 2 ignored ones are not counted): all 3 kept, even the easy 0.9
    expected = (math.log(2) + math.log(4) + math.log(10 / 9)) / 3
    for min_kept in (4, 5, 100):  # 100: more than all pixels, ignored ones included
        assert common.ohem_loss(logits, labels, min_kept=min_kept).item() == pytest.approx(expected, rel=1e-5)
    logits, labels = two_class([0.5, 0.25, 0.9], [0, 1, 0])  # no ignored pixel
    assert common.ohem_loss(logits, labels, min_kept=4).item() == pytest.approx(expected, rel=1e-5)


def test_threshold_stays_at_thresh_when_the_min_kept_th_probability_is_below_it():
    logits, labels = two_class([0.5, 0.25, 0.9], [0, 1, 1])
    # sorted 0.25, 0.5, 0.9: the 2nd is 0.5 <= 0.7, so the threshold is 0.7 and 0.9 is dropped
    loss = common.ohem_loss(logits, labels, min_kept=2)
    assert loss.item() == pytest.approx((math.log(4) + math.log(2)) / 2, rel=1e-5)
    # min_kept 1 gives the same: the threshold never drops below thresh
    assert common.ohem_loss(logits, labels, min_kept=1).item() == pytest.approx(1.5 * math.log(2), rel=1e-5)


def test_threshold_rises_to_the_min_kept_th_smallest_probability():
    logits, labels = two_class([0.8, 0.9, 0.75, 0.95, 0.01], [0, 1, 0, 1, 255])
    # all labeled pixels above 0.7; the 2nd smallest is 0.8: keep 0.75 and 0.8 (<=, so 0.8 itself);
    # the ignored pixel's low probability neither counts nor moves the threshold
    loss = common.ohem_loss(logits, labels, min_kept=2)
    assert loss.item() == pytest.approx((math.log(1 / 0.8) + math.log(1 / 0.75)) / 2, rel=1e-5)


def test_pixels_tied_with_the_min_kept_th_probability_are_all_kept():
    logits, labels = two_class([0.8, 0.8, 0.9], [0, 0, 0])
    loss = common.ohem_loss(logits, labels, min_kept=1)  # threshold 0.8: both 0.8 pixels, not one
    assert loss.item() == pytest.approx(math.log(1 / 0.8), rel=1e-5)


def test_ohem_computes_in_fp32_from_half_logits():
    logits, labels = two_class([0.5, 0.25], [0, 1])
    loss = common.ohem_loss(logits.half(), labels, min_kept=1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-3)


@pytest.mark.parametrize("min_kept", [0, 1, 200_000])
def test_a_batch_without_labeled_pixels_gives_zero_and_no_gradient(min_kept):
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    labels = torch.full((2, 4, 5), 255)
    loss = common.ohem_loss(logits, labels, min_kept=min_kept)
    loss.backward()
    assert loss.item() == 0 and not torch.isnan(loss)
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_per_images_averages_the_losses_of_image_chunks():
    a, _ = two_class([0.25], [0])
    b, _ = two_class([0.5], [0])
    c, _ = two_class([0.9], [0])
    logits, labels = torch.cat([a, b, c]), torch.zeros(3, 1, 1, dtype=torch.long)
    # chunk (a, b): 1st smallest 0.25 <= 0.7, keep both; chunk (c): threshold rises to 0.9, keep it
    expected = ((math.log(4) + math.log(2)) / 2 + math.log(10 / 9)) / 2
    assert common.ohem_loss(logits, labels, min_kept=1, per_images=2).item() == pytest.approx(expected, rel=1e-5)
    # the whole batch as one chunk: 0.9 is dropped
    assert common.ohem_loss(logits, labels, min_kept=1).item() == pytest.approx(1.5 * math.log(2), rel=1e-5)
    assert common.ohem_loss(logits, labels, min_kept=1, per_images=3).item() == pytest.approx(1.5 * math.log(2),
                                                                                              rel=1e-5)


def test_per_images_counts_a_chunk_without_labeled_pixels_as_zero():
    a, _ = two_class([0.25], [0])
    logits = torch.cat([a, a]).requires_grad_()
    labels = torch.tensor([0, 255]).view(2, 1, 1)
    loss = common.ohem_loss(logits, labels, min_kept=1, per_images=1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4) / 2, rel=1e-5)
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


# ---- sliding_window ----------------------------------------------------------------------------------
class WindowRecorder(torch.nn.Module):
    """Records each window's (row, col, h, w), read from the images' channels 0 and 1 (row and column
    indices); returns the constant logits (0, 1, 2) at the window's size."""
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.calls, self.dtype = [], dtype
        self.logits = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))

    def forward(self, x):
        b, _, h, w = x.shape
        self.calls.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0]), h, w))
        return self.logits.view(1, 3, 1, 1).expand(b, 3, h, w).to(self.dtype)


def coordinate_images(b, h, w):
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w)])[None].expand(b, 3, h, w)


def covering_windows(starts, window, size):
    """(size,) how many of the intervals [s, s + window) cover each index."""
    count = torch.zeros(size)
    for s in starts:
        count[s:s + window] += 1
    return count


def test_sliding_window_on_cityscapes_uses_8_windows_cut_at_the_border():
    net = WindowRecorder()
    total = common.sliding_window(net, coordinate_images(1, 1024, 2048), 801)
    assert net.calls == [(0, 0, 801, 801), (0, 534, 801, 801), (0, 1068, 801, 801), (0, 1602, 801, 446),
                         (534, 0, 490, 801), (534, 534, 490, 801), (534, 1068, 490, 801), (534, 1602, 490, 446)]
    count = covering_windows([0, 534], 801, 1024)[:, None] * covering_windows([0, 534, 1068, 1602], 801, 2048)
    assert count.min() == 1 and count.max() == 4
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(0).view(1, 3, 1, 1) * count
    assert total.shape == (1, 3, 1024, 2048) and total.dtype == torch.float32
    assert torch.allclose(total, expected)
    assert not total.requires_grad  # no graph kept, although the net has a parameter


def test_sliding_window_starts_a_window_wherever_the_stride_is_still_inside():
    net = WindowRecorder(torch.float16)  # half logits, as under autocast: summed in fp32
    total = common.sliding_window(net, coordinate_images(2, 3, 3), 3)  # stride int(2) = 2
    assert total.dtype == torch.float32
    # the first window covers the image, yet starts at 2 < 3 add a 3x1, a 1x3 and a 1x1 window
    assert net.calls == [(0, 0, 3, 3), (0, 2, 3, 1), (2, 0, 1, 3), (2, 2, 1, 1)]
    count = torch.tensor([[1.0, 1, 2], [1, 1, 2], [2, 2, 4]])
    assert torch.allclose(total.sum(1), count.expand(2, 3, 3))


# ---- scale_crop_flip and weak_view_draws -------------------------------------------------------------
def unimatch_view(img, mask, long_side, x, y, flip, size, ignore_value):
    """UniMatch's resize -> crop -> hflip written out with PIL, its random draws given instead of drawn."""
    w, h = img.size
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    img, mask = img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)
    padw, padh = max(size - ow, 0), max(size - oh, 0)
    img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
    mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=ignore_value)
    img, mask = img.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))
    if flip:
        img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def random_pair(rng, w, h, classes=5):
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img, Image.fromarray(rng.integers(0, classes, (h, w), dtype=np.uint8), "L")


@pytest.mark.parametrize("w,h", [(40, 30), (30, 40), (25, 25), (9, 7), (64, 20)])
def test_scale_crop_flip_equals_unimatch_for_the_same_draws(w, h):
    rng = np.random.default_rng(w * 100 + h)
    img, mask = random_pair(rng, w, h)
    for crop in (16, 48):
        for fill in (255, 254):
            for _ in range(6):
                draws = common.weak_view_draws(img.size, crop, rng)
                ours = common.scale_crop_flip(img, mask, *draws, crop=crop, fill=fill)
                theirs = unimatch_view(img, mask, *draws, size=crop, ignore_value=fill)
                assert ours[0].size == ours[1].size == (crop, crop)
                assert ours[0].mode == "RGB" and ours[1].mode == "L"
                assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
                assert np.array_equal(np.asarray(ours[1]), np.asarray(theirs[1]))


def test_padding_goes_right_and_bottom_with_image_0_and_mask_fill():
    rng = np.random.default_rng(0)
    img, _ = random_pair(rng, 10, 6)
    mask = Image.fromarray(np.full((6, 10), 3, np.uint8), "L")
    out, lab = (np.asarray(t) for t in common.scale_crop_flip(img, mask, 10, 0, 0, False, crop=16, fill=254))
    assert np.array_equal(out[:6, :10], np.asarray(img))  # long side 10 already: the image unchanged, top left
    assert (out[6:] == 0).all() and (out[:, 10:] == 0).all()
    assert (lab[:6, :10] == 3).all() and (lab[6:] == 254).all() and (lab[:, 10:] == 254).all()
    _, lab = common.scale_crop_flip(img, mask, 10, 0, 0, False, crop=16)
    assert (np.asarray(lab)[6:] == 255).all()  # the default fill: ignore


def test_the_short_side_rounds_half_up():
    rng = np.random.default_rng(1)
    for w, h in ((8, 5), (5, 8)):
        img, _ = random_pair(rng, w, h)
        mask = Image.fromarray(np.ones((h, w), np.uint8), "L")
        _, lab = common.scale_crop_flip(img, mask, 4, 0, 0, False, crop=8)
        lab = np.asarray(lab)
        # 5 * 4 / 8 = 2.5 -> 3 (Python's round would give 2)
        assert (lab == 1).sum() == 4 * 3
        assert (lab[:4, :3] == 1).all() if h > w else (lab[:3, :4] == 1).all()


def test_flip_mirrors_the_unflipped_view():
    rng = np.random.default_rng(2)
    img, mask = random_pair(rng, 30, 20)
    plain = common.scale_crop_flip(img, mask, 37, 3, 2, False, crop=16)
    flipped = common.scale_crop_flip(img, mask, 37, 3, 2, True, crop=16)
    for a, b in zip(plain, flipped):
        assert np.array_equal(np.asarray(a)[:, ::-1], np.asarray(b))


def test_mask_none_gives_the_image_alone():
    rng = np.random.default_rng(3)
    img, mask = random_pair(rng, 30, 20)
    out, none = common.scale_crop_flip(img, None, 25, 1, 0, True, crop=16)
    assert none is None
    assert np.array_equal(np.asarray(out), np.asarray(common.scale_crop_flip(img, mask, 25, 1, 0, True, crop=16)[0]))


def test_a_palette_mask_keeps_its_mode_and_colours():
    rng = np.random.default_rng(4)
    img, mask = random_pair(rng, 12, 9)
    mask = mask.convert("P")
    mask.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    _, lab = common.scale_crop_flip(img, mask, 10, 0, 0, False, crop=16)
    assert lab.mode == "P" and lab.getpalette() == mask.getpalette()
    assert (np.asarray(lab)[:, 10:] == 255).all()


def test_weak_view_draws_reach_both_ends_of_every_range():
    rng = np.random.default_rng(5)
    draws = [common.weak_view_draws((4, 3), 3, rng) for _ in range(3000)]
    # long side 0.5..2.0 x 4 = 2..8; at 8 the view is 8x6, so x in 0..5, y in 0..3
    assert {d[0] for d in draws} == set(range(2, 9))
    assert {d[1] for d in draws if d[0] == 8} == set(range(6))
    assert {d[2] for d in draws if d[0] == 8} == set(range(4))
    # at 2 the view is 2x2, padded up to 3x3: the crop can only start at 0
    assert {(d[1], d[2]) for d in draws if d[0] == 2} == {(0, 0)}
    assert {d[3] for d in draws} == {False, True}
    assert 0.45 < np.mean([d[3] for d in draws]) < 0.55
    for long_side, x, y, flip in draws:  # every draw inside its own padded view
        w, h = (max(s, 3) for s in ((long_side, int(3 * long_side / 4 + 0.5))))
        assert 0 <= x <= w - 3 and 0 <= y <= h - 3
        assert all(type(v) is int for v in (long_side, x, y)) and type(flip) is bool


def test_weak_view_draws_repeat_with_the_seed():
    a = [common.weak_view_draws((2048, 1024), 801, np.random.default_rng(9)) for _ in range(2)]
    assert a[0] == a[1]
