"""Std-aug's geometry: affine conventions, the original's pair schemes, and teacher-to-student alignment."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import train_stdaug as S

PASCAL = dict(hflip=True, hung_scale=True)
ISIC = dict(hflip=True, vflip=True, transpose=True, rot=45.0, max_scale=1.1)


def smooth_image(h, w, seed=0):
    """(h, w, 3) uint8: a few sinusoids of 0.1-0.3 rad/pixel. Smooth enough that interpolating twice
    costs little, varied enough that a one-pixel misalignment costs a lot."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    image = np.full((h, w, 3), 128.0)
    for c in range(3):
        for _ in range(3):
            angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3), rng.uniform(0, 6.3)
            image[..., c] += 35 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def misalignment(image, crop, aug, seed, shift_x=0.0):
    """Warp the teacher's *input* into the student's frame with the pair's theta (the check the original's
    stale tests/test_data_pipeline.py intended) and return (largest |difference| to the student's input on
    pixels valid in both, share of such pixels)."""
    image_t, valid_t, image_s, valid_s, theta = S.make_pair(image, crop, aug, 16, np.random.default_rng(seed))
    theta = theta.clone()
    theta[0, 2] += shift_x * 2 / (crop[1] - 1)  # a deliberate error, in teacher pixels
    warped = S.warp(image_t[None].float(), theta[None], crop)[0]
    valid_warped = S.warp(valid_t[None, None].float() / 255, theta[None], crop)[0, 0]
    both = (valid_warped > 0.999) & (valid_s == 255)
    if not both.any():
        return 0.0, 0.0
    return (warped - image_s.float()).abs().amax(0)[both].max().item(), both.float().mean().item()


@pytest.mark.parametrize("crop, aug", [((31, 45), dict(PASCAL, vflip=True)),  # non-square, both flips
                                       ((40, 40), dict(PASCAL, transpose=True))])
def test_pascal_pairs_align_exactly_up_to_rounding(crop, aug):
    # the teacher crop is unscaled: warping it bilinearly reproduces the student's bilinear resample of
    # the source, up to the student's rounding to uint8, for every Hung scale and flip combination
    image = smooth_image(57, 83)
    shares = []
    for seed in range(40):
        err, share = misalignment(image, crop, aug, seed)
        assert err <= 0.5 + 1e-3, (seed, err)
        shares.append(share)
    assert np.mean(shares) > 0.3  # the check compared many pixels


@pytest.mark.parametrize("crop, aug", [((40, 40), ISIC), ((36, 52), dict(ISIC, transpose=False))])
def test_rotated_pairs_align_up_to_interpolation(crop, aug):
    # both views are rotated resamples, so the warp interpolates a second time: small error on a smooth image
    image = smooth_image(90, 110, seed=1)
    errors = []
    for seed in range(30):
        err, share = misalignment(image, crop, aug, seed)
        assert share > 0.3, seed
        errors.append(err)
    assert max(errors) < 3.0
    # ... while one pixel of misalignment is far beyond it
    assert min(misalignment(image, crop, aug, seed, shift_x=1.0)[0] for seed in range(10)) > 6.0


def test_a_one_pixel_error_is_caught_on_pascal_pairs_too():
    image = smooth_image(57, 83)
    assert min(misalignment(image, (31, 45), PASCAL, seed, shift_x=1.0)[0] for seed in range(10)) > 6.0


def test_pixel_theta_maps_pixel_centres_on_non_square_views():
    # affine_grid with the theta must land output pixel (x, y) on input pixel m · (x, y, 1)
    rng = np.random.default_rng(0)
    m = S.translate(3.5, -2.0) @ S.rotate(0.4) @ S.scale(1.3, 0.8)
    src, dst = (23, 41), (17, 29)
    grid = F.affine_grid(S.pixel_theta(m, src, dst)[None], (1, 1, *dst), align_corners=True)[0]
    for _ in range(10):
        y, x = rng.integers(0, dst[0]), rng.integers(0, dst[1])
        px, py, _ = m @ [x, y, 1]
        gx, gy = grid[y, x].tolist()
        assert math.isclose((gx + 1) / 2 * (src[1] - 1), px, abs_tol=1e-4)
        assert math.isclose((gy + 1) / 2 * (src[0] - 1), py, abs_tol=1e-4)
    assert torch.allclose(S.pixel_theta(np.eye(3), src, src), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


def test_flips_are_exact_and_undo_themselves():
    src = torch.from_numpy(smooth_image(12, 12)).permute(2, 0, 1).float()
    size = (12, 12)
    assert torch.equal(S.sample_view(src, S.flip((True, False, False), size), size, "bilinear").round(), src.flip(-1))
    assert torch.equal(S.sample_view(src, S.flip((False, True, False), size), size, "bilinear").round(), src.flip(-2))
    assert torch.equal(S.sample_view(src, S.flip((False, False, True), size), size, "bilinear").round(),
                       src.transpose(-1, -2))
    for flags in [(h, v, t) for h in (0, 1) for v in (0, 1) for t in (0, 1)]:
        m = S.flip(flags, size)
        assert np.allclose(np.linalg.inv(m) @ m, np.eye(3))
        if not flags[2]:  # without the transpose each flip is its own inverse
            assert np.allclose(m @ m, np.eye(3))


def test_scaled_window_matches_a_cv2_style_resize():
    # translate((s - 1) / 2) · scale(s) is cv2.resize's (and F.interpolate(align_corners=False)'s) pixel
    # convention; away from the window's border (where resize clamps) the two agree
    src = torch.from_numpy(smooth_image(60, 70)).permute(2, 0, 1).float()
    for window, crop in (((20, 30), (31, 45)), ((40, 50), (25, 33))):
        y0, x0 = 7, 11
        s = np.array(crop) / np.array(window)
        a = S.translate(*(s[::-1] - 1) / 2) @ S.scale(*s[::-1]) @ S.translate(-x0, -y0)
        ours = S.sample_view(src, a, crop, "bilinear")
        resized = F.interpolate(src[None, :, y0:y0 + window[0], x0:x0 + window[1]], size=crop, mode="bilinear",
                                align_corners=False)[0]
        assert torch.allclose(ours[:, 2:-2, 2:-2], resized[:, 2:-2, 2:-2], atol=1e-3)


def test_pascal_pair_teacher_is_unscaled_student_hung_scaled_and_shifted():
    scales = set()
    for seed in range(200):
        a_t, a_s = S.pascal_pair((300, 400), (64, 80), 16, np.random.default_rng(seed))
        assert np.allclose(a_t[:2, :2], np.eye(2))  # the teacher crop is never rescaled, as the original's
        scales.add(round(a_s[0, 0], 6))  # x scale = crop width / round(crop width / f)
        # cv2.resize's convention: the view's centre pixel shows the centre of a whole-pixel window
        window = np.array([80, 64]) / np.diag(a_s)[:2]  # (w, h) in source pixels
        top_left = (np.linalg.inv(a_s) @ [79 / 2, 63 / 2, 1])[:2] - (window - 1) / 2
        assert np.allclose(window, np.round(window)) and np.allclose(top_left, np.round(top_left))
        # the student's window centre, in source pixels, lies within 16 (+1 for rounding) of the teacher's
        centre_t = np.linalg.inv(a_t) @ [79 / 2, 63 / 2, 1]
        centre_s = np.linalg.inv(a_s) @ [79 / 2, 63 / 2, 1]
        assert np.all(np.abs(centre_s - centre_t)[:2] <= 16 + 1)
    expected = {round(80 / round(80 / (0.5 + k / 10)), 6) for k in range(11)}
    assert scales == expected  # all eleven Hung scales appear, and no other


def test_rotate_scale_pair_shares_rotation_and_scale_and_shifts_the_student():
    angles, scales = [], []
    for seed in range(300):
        a_t, a_s = S.rotate_scale_pair((248, 248), (224, 224), ISIC, 16, np.random.default_rng(seed))
        assert np.allclose(a_t[:2, :2], a_s[:2, :2])  # one scale and one rotation (constrain_rot_scale)
        offset = a_s[:2, 2] - a_t[:2, 2]  # in output pixels
        assert np.allclose(offset, np.round(offset)) and np.all(np.abs(offset) <= 16 + 1e-9)
        scales.append(math.sqrt(abs(np.linalg.det(a_t[:2, :2]))))
        angles.append(math.degrees(math.atan2(a_t[0, 1], a_t[0, 0])))
    assert 1 / 1.1 - 1e-9 <= min(scales) and max(scales) <= 1.1 + 1e-9 and max(scales) > 1.08
    assert -45 <= min(angles) < -40 and 40 < max(angles) <= 45


def test_rotate_scale_pair_known_matrix_without_rotation_or_scale():
    # s = 1, θ = 0 and a 248 image for a 224 crop: centre = 124 + 24 · U, mapped to the crop's pixel 112
    aug = dict(rot=0.0, max_scale=1.0)
    a_t, a_s = S.rotate_scale_pair((248, 248), (224, 224), aug, 0, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    rng.uniform(), rng.uniform()  # the scale's and the angle's draws; the centre's come next
    centre = 24 * rng.uniform(size=2) + 112  # (y, x)
    assert np.allclose(a_t, S.translate(112 - centre[1], 112 - centre[0])) and np.allclose(a_s, a_t)


def test_flips_are_drawn_independently_for_teacher_and_student():
    image = smooth_image(40, 40)
    differ = 0
    for seed in range(40):
        image_t, _, image_s, _, theta = S.make_pair(image, (40, 40), dict(ISIC, rot=0, max_scale=1.0, transpose=False),
                                                    0, np.random.default_rng(seed))
        differ += not torch.allclose(theta[:, :2], torch.eye(2))
    assert 20 < differ < 40  # P(same h and v flips) = 1/4


def test_isic_views_show_the_mirrored_image_beyond_the_border_as_the_original():
    image = smooth_image(30, 30) // 2 + 100  # no pixel near the mean colour
    for seed in range(8):
        image_t, valid_t, image_s, valid_s, _ = S.make_pair(image, (40, 40), ISIC, 16, np.random.default_rng(seed))
        assert image_t.shape == image_s.shape == (4, 40, 40) and (image_t[3] == 255).all() and (image_s[3] == 255).all()
        for views in ((image_t, valid_t), (image_s, valid_s)):  # 40 > 30: part of each view lies outside
            x, v = common.to_device(tuple(t[None] for t in views), torch.device("cpu"))
            outside = v[0, 0] == 0  # no loss there, but the mirrored image, not the mean colour
            assert outside.any() and torch.equal(x, common.normalise(views[0][None, :3], torch.device("cpu")))
            assert x[0][:, outside].abs().mean() > 0.3
    _, _, image_s, _, _ = S.make_pair(image, (40, 40), PASCAL, 16, np.random.default_rng(0))
    assert image_s.shape == (3, 40, 40)  # Pascal: zero padding, made the mean colour by the valid mask


def test_pair_dataset_is_fixed_by_its_key_and_batches_through_the_stream():
    data = common.Split(["a", "b"], lambda i: (smooth_image(30, 50, seed=i), None), [(30, 50)] * 2)
    pairs = S.PairSet(data, (24, 32), PASCAL, 16)
    first, again = pairs[(1, (5, 1, 7))], pairs[(1, (5, 1, 7))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [tuple(t.shape) for t in first] == [(3, 24, 32), (24, 32), (3, 24, 32), (24, 32), (2, 3)]
    assert first[0].dtype == torch.uint8 and set(first[1].unique().tolist()) <= set(range(256))
    batches = common.train_loader(pairs, [0, 1], batch_size=3, seed=1, stream_id=1, start=0, num_workers=0)
    images_t, valid_t, images_s, valid_s, theta = next(batches)
    assert images_t.shape == (3, 3, 24, 32) and valid_s.shape == (3, 24, 32) and theta.shape == (3, 2, 3)


def test_warp_identity_and_loss_mask_of_a_half_shift():
    p = torch.rand(2, 4, 9, 13).softmax(1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(2, 2, 3)
    assert torch.allclose(S.warp(p, identity, (9, 13)), p, atol=1e-6)
    # the student frame shifted right by half the teacher's width: its right half has no teacher pixel
    shifted = identity.clone()
    shifted[:, 0, 2] = 1.0
    mask = S.warp(torch.ones(2, 1, 9, 13), shifted, (9, 13))
    assert mask[..., 7:].max() < 1e-4 and torch.allclose(mask[..., :7], torch.ones(1))


def test_method_defaults_follow_the_paper_per_dataset():
    for dataset, weight in (("pascal_aug", 0.003), ("isic2017", 0.1), ("cityscapes", 0.003), ("demo", 0.003),
                            ("folder", 0.003)):
        args = common.parse_args(S.Args, ["--dataset", dataset])
        assert (args.cons_weight, args.nesterov) == (weight, True)
    args = common.parse_args(S.Args, ["--dataset", "isic2017"])
    assert args.cons_weight == 0.1 and args.nesterov and args.optimizer == "sgd" and args.offset_range == 16
