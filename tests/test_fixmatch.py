"""FixMatch (train_fixmatch.py) and the parts it shares with UniMatch (common.py section 12): strong views and their
draws, CutMix boxes, the pseudo-label loss, each against hand computations; one step on tiny data under both
protocols; the loss masks at the box and at padding; an exact resume; a threshold outside [0, 1]."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms

import common
import train_fixmatch
from conftest import make_folder_dataset, make_unlabeled, read_results, refused, run_main
from test_unimatch_protocol import UNIMATCH, split_file

TINY = ["--arch", "unet_small", "--batch-size", 2, "--num-workers", 0, "--no-pretrained"]


class Scripted:
    """A stand-in for a numpy Generator that returns given values: random() and the unit draws behind uniform(lo,
    hi) from `units`, integers() from `ints`, in the order asked."""

    def __init__(self, units=(), ints=()):
        self.units, self.ints = list(units), list(ints)

    def random(self):
        return self.units.pop(0)

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.units.pop(0)

    def integers(self, lo, hi):
        value = self.ints.pop(0)
        assert lo <= value < hi
        return value


def image(seed=0, size=(20, 24)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


# ---- strong views ---------------------------------------------------------------------------------------
def test_strong_view_draws_have_unimatchs_probabilities_and_ranges():
    rng = np.random.default_rng(0)
    draws = [common.strong_view_draws(rng) for _ in range(4000)]
    jitters = [d["jitter"] for d in draws if d["jitter"] is not None]
    assert len(jitters) / 4000 == pytest.approx(0.8, abs=0.02)
    assert np.mean([d["grayscale"] for d in draws]) == pytest.approx(0.2, abs=0.02)
    sigmas = [d["blur"] for d in draws if d["blur"] is not None]
    assert len(sigmas) / 4000 == pytest.approx(0.5, abs=0.025) and 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    for order, *factors in jitters:
        assert sorted(order) == [0, 1, 2, 3] and all(0.5 <= f <= 1.5 for f in factors[:3])
        assert -0.25 <= factors[3] <= 0.25
    assert len({j[0] for j in jitters}) == 24  # every order of the four adjustments occurs


def test_strong_view_draws_touch_no_global_rng():
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    common.strong_view_draws(np.random.default_rng(1))
    common.cutmix_box_draws(48, np.random.default_rng(1), p=1.0)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_strong_view_applies_the_jitter_as_torchvisions_color_jitter(monkeypatch):
    """For given draws the jitter is ColorJitter(0.5, 0.5, 0.5, 0.25)'s own forward, in the drawn order."""
    draws = dict(jitter=((3, 1, 0, 2), 1.3, 0.6, 1.4, -0.2), grayscale=False, blur=None)
    jitter = transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(
        lambda *_: (torch.tensor(draws["jitter"][0]), *draws["jitter"][1:])))
    assert np.array_equal(np.array(common.strong_view(image(), draws)), np.array(jitter(image())))
    other = dict(draws, jitter=((0, 1, 2, 3), *draws["jitter"][1:]))  # the order matters
    assert not np.array_equal(np.array(common.strong_view(image(), other)), np.array(jitter(image())))


def test_strong_view_by_hand_brightness_grayscale_blur():
    im = image(1)
    x = np.array(im).astype(float)
    bright = np.array(common.strong_view(im, dict(jitter=((0, 1, 2, 3), 1.25, None, None, None), grayscale=False,
                                                  blur=None)))
    assert np.abs(bright - np.clip(x * 1.25, 0, 255)).max() <= 1  # brightness: a blend with black, rounded
    gray = np.array(common.strong_view(im, dict(jitter=None, grayscale=True, blur=None)))
    r, g, b = (np.array(im).astype(np.int64)[..., c] for c in range(3))
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # PIL's L = 0.299 R + 0.587 G + 0.114 B, rounded
    assert gray.shape == (20, 24, 3) and all(np.array_equal(gray[..., c], luma) for c in range(3))
    blurred = common.strong_view(im, dict(jitter=None, grayscale=False, blur=1.5))
    assert np.array_equal(np.array(blurred), np.array(im.filter(ImageFilter.GaussianBlur(radius=1.5))))
    same = common.strong_view(im, dict(jitter=None, grayscale=False, blur=None))
    assert np.array_equal(np.array(same), np.array(im))


# ---- CutMix boxes ------------------------------------------------------------------------------------
def test_cutmix_box_draws_by_hand():
    assert common.cutmix_box_draws(48, Scripted(units=[0.6])) is None  # random() > p: no box
    # area 0.02 + 0.38 * 0.5 = 0.21 of 48², aspect 1: w = h = int(sqrt(483.84)) = 21; the first corner (30, 30)
    # leaves the crop (30 + 21 > 48), the second (10, 27) fits
    rng = Scripted(units=[0.5, 0.5, (1 - 0.3) / (1 / 0.3 - 0.3), (1 - 0.3) / (1 / 0.3 - 0.3)], ints=[30, 30, 10, 27])
    assert common.cutmix_box_draws(48, rng) == (10, 27, 21, 21)
    # aspect 2 (h = 2 w) on a non-square crop (H, W) = (40, 60): area 0.4 · 2400 = 960, w = int(sqrt(480)) = 21,
    # h = int(sqrt(1920)) = 43 > 40: redrawn with aspect 0.5, w = 43, h = 21
    units = [0.0, 1.0, (2 - 0.3) / (1 / 0.3 - 0.3), (0.5 - 0.3) / (1 / 0.3 - 0.3)]
    assert common.cutmix_box_draws((40, 60), Scripted(units=units, ints=[0, 0, 17, 19])) == (17, 19, 43, 21)


def test_cutmix_boxes_lie_inside_with_unimatchs_areas_and_aspects():
    rng = np.random.default_rng(3)
    draws = [common.cutmix_box_draws(64, rng) for _ in range(2000)]
    boxes = [d for d in draws if d is not None]
    assert len(boxes) / 2000 == pytest.approx(0.5, abs=0.03)
    for x, y, w, h in boxes:
        assert x + w <= 64 and y + h <= 64 and 0.3 * 64 ** 2 * 0.005 < w * h <= 0.4 * 64 ** 2
    mask = common.cutmix_box(64, boxes[0])
    x, y, w, h = boxes[0]
    assert mask.shape == (64, 64) and mask.sum() == w * h and mask[y:y + h, x:x + w].all()
    assert common.cutmix_box((8, 12), None).shape == (8, 12) and common.cutmix_box(8, None).sum() == 0
    assert common.cutmix_box(64, boxes[0]).dtype == torch.float32


# ---- the pseudo-label loss ---------------------------------------------------------------------------
def test_pseudo_label_loss_by_hand():
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 1.0, 3.0]]]])  # (1, 2, 1, 4)
    pseudo = torch.tensor([[[0, 1, 1, 1]]])
    conf = torch.tensor([[[0.99, 0.5, 0.96, 0.97]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])  # the last pixel is padding
    ce = [np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(-1.0)), np.log(2.0)]
    expected = (ce[0] + ce[2]) / 3  # confident and not padding: pixels 0 and 2; 3 pixels not padding
    assert common.pseudo_label_loss(logits, pseudo, conf, ignore, 0.95).item() == pytest.approx(expected, rel=1e-6)
    assert common.pseudo_label_loss(logits, pseudo, conf, ignore, 0.0).item() == pytest.approx(sum(ce) / 3, rel=1e-6)
    everything_padding = torch.full_like(ignore, 255)
    assert common.pseudo_label_loss(logits, pseudo, conf, everything_padding, 0.0).item() == 0.0
    loss, pixels = common.pseudo_label_share(0.95)(logits, pseudo, conf, ignore)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and pixels.item() == 3
    assert common.confident_share(conf, ignore, 0.95).item() == pytest.approx(2 / 3)
    valid = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]]]])
    assert torch.equal(common.padding_as_ignore(valid), ignore)


# ---- the views of one crop -----------------------------------------------------------------------------
def test_strong_views_come_from_the_weak_view_with_draws_in_unimatchs_order():
    """weak view, then per strong view: jitter, grayscale, blur, box; the same key gives the same views; a 4th
    channel (ISIC's mirrored borders) is kept; the partner is the same image under other draws."""
    split = common.Split(["a"], lambda i: (np.array(image(4, (40, 50))), None), [(40, 50)])
    aug = dict(hflip=True, vflip=True, transpose=True, rot=45.0, max_scale=1.1)  # ISIC's: 4 channels
    views = common.StrongViewSet(split, (32, 32), aug, n_strong=2)
    key = (0, (1, 1, 7))
    weak, s1, s2, valid, box1, box2 = views[key]
    rng = np.random.default_rng(key[1])
    expected_weak, _, expected_valid = common.augment(np.array(image(4, (40, 50))), None, rng, (32, 32), aug)
    assert torch.equal(weak, expected_weak) and torch.equal(valid, expected_valid) and weak.shape[0] == 4
    for strong, box in ((s1, box1), (s2, box2)):
        rgb = Image.fromarray(weak[:3].permute(1, 2, 0).numpy())
        expected = np.array(common.strong_view(rgb, common.strong_view_draws(rng)))
        assert np.array_equal(strong[:3].permute(1, 2, 0).numpy(), expected) and torch.equal(strong[3], weak[3])
        assert torch.equal(box, common.cutmix_box((32, 32), common.cutmix_box_draws((32, 32), rng)))
    assert all(torch.equal(a, b) for a, b in zip(views[key], (weak, s1, s2, valid, box1, box2)))
    partner = common.StrongViewSet(split, (32, 32), aug, n_strong=2, partner=True)[key]
    assert not torch.equal(partner[0], weak)


# ---- the script ---------------------------------------------------------------------------------------
def test_defaults_per_dataset_and_protocol():
    assert common.parse_args(train_fixmatch.Args, []).conf_thresh == 0.95
    assert common.parse_args(train_fixmatch.Args, ["--dataset", "cityscapes"]).conf_thresh == 0.0
    assert common.parse_args(train_fixmatch.Args, ["--dataset", "pascal_aug"]).cons_weight == 1.0


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_threshold_outside_0_1_is_refused(value):
    assert refused("train_fixmatch.py", "--conf-thresh", value) == \
        f"error: --conf-thresh must lie in [0, 1], got {float(value)}"


def one_step(script, tmp_path, *argv):
    out = tmp_path / "run"
    run = run_main(script, *TINY, "--iters", 1, "--eval-every", 1, "--out", out, *argv)
    results = read_results(out)
    assert run.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    assert results["network"] == "student" and results["student_miou"] == results["miou"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "teacher" not in state and "student" in state  # one network, trained and reported
    assert "eval it 1 | student mIoU" in run.stdout
    return results


def test_one_step_under_the_papers_protocol(tmp_path):
    results = one_step("train_fixmatch.py", tmp_path, "--crop-size", 32)
    assert results["method"] == "fixmatch" and results["iters"] == 1


def test_one_step_under_todays_protocol(official, tmp_path):
    root = official["cityscapes"]
    chosen = split_file(tmp_path / "labeled.txt", common.cityscapes_full_dataset(root)[0].names[:2])
    results = one_step("train_fixmatch.py", tmp_path, *UNIMATCH, "--dataset", "cityscapes", "--data-root", root,
                       "--split-file", chosen, "--crop-size", 40, "--cache-dir", tmp_path / "cache")
    settings = common.guard.read_json(tmp_path / "run" / "args.json", "")
    assert settings["conf_thresh"] == 0.0 and settings["protocol"] == "unimatch" and results["iters"] == 1


def record_unlabeled_losses(monkeypatch):
    """Every StrongViewSet item in the order drawn, and the tensors of every unlabeled loss (per_share's calls with
    pseudo_label_share's loss: logits, pseudo-labels, confidences and ignore masks)."""
    items, calls = [], []
    get, per_share = common.StrongViewSet.__getitem__, common.per_share
    monkeypatch.setattr(common.StrongViewSet, "__getitem__",
                        lambda self, key: items.append(get(self, key)) or items[-1])

    def recording(loss_fn, shares, *tensors):
        if loss_fn.__qualname__.startswith("pseudo_label_share"):
            calls.append([t.detach().clone() for t in tensors])
        return per_share(loss_fn, shares, *tensors)
    monkeypatch.setattr(common, "per_share", recording)
    return items, calls


@pytest.mark.parametrize("protocol", ["paper", "unimatch"])
def test_inside_the_box_the_partners_padding_and_padding_carries_no_loss(protocol, official, tmp_path,
                                                                         monkeypatch):
    """Crops larger than the images: padded. The loss's ignore mask (255 = no loss) is the main crop's padding
    outside the box and the partner's inside it."""
    items, calls = record_unlabeled_losses(monkeypatch)
    if protocol == "paper":
        data = make_folder_dataset(tmp_path / "data", size=(24, 32))
        make_unlabeled(tmp_path / "more")  # other sizes: other padding (the paper's crops pad centred)
        options = ["--dataset", "folder", "--data-root", data, "--crop-size", 40, "--unlabeled-dir", tmp_path / "more"]
    else:
        root = official["cityscapes"]
        chosen = split_file(tmp_path / "labeled.txt", common.cityscapes_full_dataset(root)[0].names[:2])
        options = [*UNIMATCH, "--dataset", "cityscapes", "--data-root", root, "--split-file", chosen,
                   "--crop-size", 48, "--cache-dir", tmp_path / "cache"]
    run_main("train_fixmatch.py", *TINY, *options, "--iters", 4, "--eval-every", 4, "--conf-thresh", 0,
             "--out", tmp_path / "run")
    seen_box = seen_padding = False
    for step in range(4):  # each iteration draws 2 partners, then 2 main crops
        partners, mains = items[4 * step:4 * step + 2], items[4 * step + 2:4 * step + 4]
        _, _, _, ignore = calls[step]
        for row, (partner, main) in enumerate(zip(partners, mains)):
            box = main[3] > 0
            expected = torch.where(box, partner[2] == 0, main[2] == 0)  # padding: valid 0
            assert torch.equal(ignore[row] == 255, expected)
            seen_box |= bool(box.any() and (partner[2][box] != main[2][box]).any())
            seen_padding |= bool((ignore[row] == 255).any())
    assert seen_padding and seen_box


@pytest.mark.parametrize("script", ["train_fixmatch.py", "train_unimatch.py"])
def test_resume_is_exact(script, tmp_path):
    """Two runs of 2 + 2 iterations and one of 4: the same weights (partner stream, view and box draws, the
    optimizer and the global RNGs restored; UniMatch's feature dropout draws from the global torch RNG, which
    the checkpoint keeps)."""
    options = [*TINY, "--crop-size", 32, "--deterministic", "--eval-every", 2, "--conf-thresh", 0.5]
    run_main(script, *options, "--iters", 4, "--out", tmp_path / "whole")
    run_main(script, *options, "--iters", 2, "--out", tmp_path / "parts")
    (tmp_path / "parts" / "results.json").unlink()
    run_main(script, *options, "--iters", 4, "--out", tmp_path / "parts", "--resume")
    whole, parts = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["student"]
                    for name in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert read_results(tmp_path / "parts")["miou"] == read_results(tmp_path / "whole")["miou"]
