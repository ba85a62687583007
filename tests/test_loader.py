"""Today's protocol's loader: the crop from the rows it reaches against the whole image resized (bit for
bit), the decoded full-size Cityscapes kept in the cache (prepared once, reused, refused when stale, skipped
when the disk is full or with --no-cache), and `python -m tools loader` on tiny official-layout trees."""
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import common
import official_layouts
from conftest import ENV, ROOT
from cutmixseg import crops, prepare
from tools import loader

LAST_LINE = re.compile(r"loader: \d+\.\d crops/s with (\d+) workers \(\d+\.\d ms per crop per worker\)")


def reference(image, label, draws, crop, fill=255):
    """scale_crop_flip on PIL images, back as arrays."""
    mask = None if label is None else Image.fromarray(label)
    out = common.scale_crop_flip(Image.fromarray(image), mask, *draws, crop=crop, fill=fill)
    return tuple(None if v is None else np.asarray(v) for v in out)


def random_pair(rng, w, h):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 19, (h, w), dtype=np.uint8)


# ---- the crop --------------------------------------------------------------------------------------------
def test_the_window_crop_equals_the_reference_bit_for_bit_over_sampled_draws():
    rng = np.random.default_rng(0)
    for _ in range(120):  # landscape, portrait, square, tiny; images over twice as tall as wide among them
        w, h = (int(v) for v in rng.integers(2, 70, 2))
        image, label = random_pair(rng, w, h)
        for _ in range(5):
            crop = int(rng.integers(1, 90))  # crops beyond the resized image too: padding
            fill = int(rng.choice([254, 255]))
            draws = common.weak_view_draws((w, h), crop, rng)
            img, lab = crops.scale_crop_flip_window(image, label, *draws, crop, fill)
            want_img, want_lab = reference(image, label, draws, crop, fill)
            assert img.dtype == lab.dtype == np.uint8
            assert img.shape == (crop, crop, 3) and lab.shape == (crop, crop)
            assert np.array_equal(img, want_img), (w, h, crop, draws)
            assert np.array_equal(lab, want_lab), (w, h, crop, draws)


def test_the_window_crop_at_the_edges_of_its_ranges_flipped_and_padded():
    rng = np.random.default_rng(1)
    image, label = random_pair(rng, 60, 30)
    for long_side in (30, 31, 60, 61, 119, 120):  # 0.5x and 2x the long side, the image's own size, odd sizes
        ow, oh = crops.long_side_size((60, 30), long_side)
        for crop in (16, 40, 130):  # inside, wider than high, larger than the resized image on both sides
            for x in sorted({0, max(ow - crop, 0)}):
                for y in sorted({0, max(oh - crop, 0)}):
                    for flip in (False, True):
                        draws = (long_side, x, y, flip)
                        got = crops.scale_crop_flip_window(image, label, *draws, crop)
                        want = reference(image, label, draws, crop)
                        assert all(np.array_equal(a, b) for a, b in zip(got, want)), draws
    img, lab = crops.scale_crop_flip_window(image, None, 119, 0, 0, True, 130)
    assert lab is None and (img[:, :130 - 119] == 0).all()  # flipped: the padding on the left


def test_full_size_crops_equal_the_reference_and_read_only_the_rows_they_reach():
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)  # smooth, photo-like content at 2048x1024
    image = np.asarray(Image.fromarray(small).resize((2048, 1024), Image.Resampling.BICUBIC))
    label = np.kron(rng.integers(0, 19, (64, 128)), np.ones((16, 16), np.uint8)).astype(np.uint8)
    for draws in [common.weak_view_draws((2048, 1024), 801, rng) for _ in range(3)] + [(1024, 223, 0, True)]:
        got = crops.scale_crop_flip_window(image, label, *draws, 801)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference(image, label, draws, 801)))
        long_side, x, y, flip = draws
        ow, oh = crops.long_side_size((2048, 1024), long_side)
        top, bottom = crops.rows_reached(y, min(y + 801, oh) - y, 1024, oh)
        elsewhere = image.copy()
        elsewhere[:top] = elsewhere[bottom:] = 0  # rows beyond the filter's reach do not matter
        assert np.array_equal(crops.scale_crop_flip_window(elsewhere, label, *draws, 801)[0], got[0])


def test_weak_view_gives_the_same_tensors_from_either_path():
    rng = np.random.default_rng(3)
    image, label = random_pair(rng, 40, 27)
    for seed in range(20):
        fast = common.weak_view(image, label, np.random.default_rng(seed), 33)
        slow = common.weak_view(image, label, np.random.default_rng(seed), 33, reference=True)
        assert all(a.equal(b) for a, b in zip(fast, slow))
    img, lab, _ = common.augment(image, None, np.random.default_rng(0), (33, 33), dict(weak_view="reference"))
    assert lab is None and img[:3].equal(common.weak_view(image, None, np.random.default_rng(0), 33)[0])


# ---- the cache of decoded Cityscapes --------------------------------------------------------------------
def load(root, cache, **kw):
    return common.load_dataset("cityscapes", root, 2, cache_dir=cache, protocol="unimatch", **kw)


def cached_folders(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("cityscapes_full_train")
                  and not p.name.endswith(".lock"))


def same_samples(train, root):
    decoded = common.cityscapes_full_dataset(root)[0]  # on the fly
    pairs = [(train.load(i), decoded.load(i)) for i in range(len(train))]
    return all(np.array_equal(a, b) for kept, fresh in pairs for a, b in zip(kept, fresh))


@pytest.fixture
def city(tmp_path):
    return official_layouts.make_cityscapes(tmp_path / "cs", n_train=5, n_val=2)


def test_decoded_images_are_prepared_once_then_memory_mapped(city, tmp_path, monkeypatch):
    data = load(city, tmp_path / "cache")
    folders = cached_folders(tmp_path / "cache")
    assert len(folders) == 1 and not folders[0].endswith(".partial")
    image, label = data.train.load(3)
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)  # views: a crop reads its rows only
    assert same_samples(data.train, city) and data.train.sizes == [(32, 64)] * 5
    assert not isinstance(data.val.load(0)[0], np.memmap)  # validation images: decoded on the fly
    monkeypatch.setattr(common, "cityscapes_full_pair", lambda *p: pytest.fail(f"decoded {p} again"))
    again = load(city, tmp_path / "cache")
    assert np.array_equal(again.unlabeled.load(0)[0], data.unlabeled.load(0)[0])


def test_an_interrupted_preparation_leaves_nothing_trusted_and_resumes(city, tmp_path, monkeypatch):
    real, calls = common.cityscapes_full_pair, []

    def failing(*paths):  # the machine "dies" while preparing the 3rd training image
        calls.append(paths)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(*paths)
    monkeypatch.setattr(common, "cityscapes_full_pair", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        load(city, tmp_path / "cache")
    assert [f.endswith(".partial") for f in cached_folders(tmp_path / "cache")] == [True]
    monkeypatch.setattr(common, "cityscapes_full_pair", real)
    assert same_samples(load(city, tmp_path / "cache").train, city)
    assert [f.endswith(".partial") for f in cached_folders(tmp_path / "cache")] == [False]


def test_a_cache_of_other_files_or_another_root_is_never_used(city, tmp_path):
    load(city, tmp_path / "cache")
    changed = sorted((city / "leftImg8bit" / "train").rglob("*.png"))[1]
    Image.fromarray(np.full((32, 64, 3), 7, np.uint8)).save(changed)
    data = load(city, tmp_path / "cache")
    assert len(cached_folders(tmp_path / "cache")) == 2 and (data.train.load(1)[0] == 7).all()
    copy = shutil.copytree(city, tmp_path / "copy")  # the same names, sizes and times, elsewhere
    assert same_samples(load(copy, tmp_path / "cache").train, copy)
    assert len(cached_folders(tmp_path / "cache")) == 3


def test_a_full_disk_or_no_cache_decodes_on_the_fly(city, tmp_path, monkeypatch, capsys):
    full = SimpleNamespace(total=10**9, used=0, free=10**9)  # 1 GB free: the spare, no room for arrays
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: full)
    data = load(city, tmp_path / "cache")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'cache'}: keeping the decoded images there")
    assert "1.0 GB are free: decoding them on the fly instead" in lines[0]
    assert not cached_folders(tmp_path / "cache") and not isinstance(data.train.load(0)[0], np.memmap)
    assert same_samples(data.train, city)
    monkeypatch.undo()
    data = load(city, tmp_path / "cache", no_cache=True)
    assert not cached_folders(tmp_path / "cache") and same_samples(data.train, city)
    assert common.parse_args(common.TrainArgs, ["--no-cache"]).no_cache


# ---- python -m tools loader -----------------------------------------------------------------------------
def labeled_list(path, names):
    path.write_text("".join(f"leftImg8bit/train/{n.split('_')[0]}/{n}_leftImg8bit.png\n" for n in names))
    return path


def test_tools_loader_times_every_stream_of_a_method_with_its_workers(official, tmp_path):
    root = official["cityscapes"]
    chosen = labeled_list(tmp_path / "labeled.txt", common.cityscapes_full_dataset(root)[0].names[:2])
    argv = ["--dataset", "cityscapes", "--data-root", root, "--protocol", "unimatch", "--split-file", chosen,
            "--arch", "unet_small", "--crop-size", 40, "--batch-size", 2, "--workers", 1, "--batches", 2,
            "--cache-dir", tmp_path / "cache"]
    proc = subprocess.run([sys.executable, "-m", "tools", "loader", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert LAST_LINE.fullmatch(lines[-1]) and LAST_LINE.fullmatch(lines[-1]).group(1) == "1"
    streams = [line.split(" (")[0] for line in lines if line.startswith("stream")]
    assert streams == ["stream 0", "stream 1", "stream 2"]
    assert "stream 0 (labeled, 2 images)" in proc.stdout and "stream 1 (unlabeled, 4 images)" in proc.stdout
    per_stream = r"crops/s alone \(\d+\.\d ms per crop per worker; \d+\.\d ms of CPU per crop\)"
    assert re.search(per_stream, lines[1])
    assert "all 3 streams in turn (3 worker processes): 6 crops an iteration" in proc.stdout
    assert cached_folders(tmp_path / "cache")  # prepared first, as a run prepares it


def test_tools_loader_on_pascal_with_the_reference_path_and_bad_options(tmp_path, monkeypatch, capsys):
    root, _, _ = official_layouts.make_pascal(tmp_path / "pascal")
    voc = root / "VOCdevkit" / "VOC2012"
    names = sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png"))
    lists = tmp_path / "lists"
    (lists / "pascal" / "3").mkdir(parents=True)
    for name, chosen in (("train_aug.txt", names[:7]), ("val.txt", names[7:]), ("3/labeled.txt", names[:3])):
        (lists / "pascal" / name).write_text("".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n"
                                                     for n in chosen))
    monkeypatch.setattr(common, "UNIMATCH_SPLITS", lists)
    options = ["--dataset", "pascal_aug", "--data-root", str(root), "--protocol", "unimatch",
               "--n-labeled", "3", "--arch", "unet_small", "--crop-size", "24", "--batch-size", "2",
               "--cache-dir", str(tmp_path)]
    for extra in ([], ["--reference"]):
        argv = [*options, "--method", "baseline", "--workers", "0", "--batches", "2", *extra]
        assert loader.main("loader", argv) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert LAST_LINE.fullmatch(out[-1]).group(1) == "0"
        assert out[1].startswith("stream 0 (labeled, 3 images)") and len(out) == 4  # one stream
        assert ("the whole image resized (reference)" in out[0]) == bool(extra)
    with pytest.raises(common.UserError, match="--batches must be at least 1"):
        loader.main("loader", [*options, "--batches", "0"])
    with pytest.raises(common.UserError, match="give --protocol unimatch"):
        loader.main("loader", ["--dataset", "pascal_aug", "--data-root", str(root), "--reference"])
