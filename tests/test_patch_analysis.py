"""patch_analysis.py: the box-filter distance map and the FFT nearest-patch search against direct,
patch-by-patch computations; anchors at class boundaries; one tiny end-to-end run; bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import patch_analysis as pa
from conftest import last_error, make_folder_dataset, refused, run_main, run_script

CPU = torch.device("cpu")


def padded(image, pad):
    """The original's symmetric padding, straight from numpy."""
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")


@pytest.mark.parametrize("size", [3, 5, 15])  # 15 > the 9x7 image: mirrored more than once
def test_distance_map_matches_patch_by_patch(size):
    image = np.random.default_rng(0).random((9, 7, 3))
    got = pa.neighbour_distance_map(torch.from_numpy(image), size).numpy()
    pad = size // 2
    x = padded(image, pad + 1)
    expected = np.zeros((9, 7))
    for r in range(9):
        for c in range(7):
            centre = x[r + 1:r + 1 + size, c + 1:c + 1 + size]
            expected[r, c] = np.mean([np.linalg.norm(x[r + 1 + dr:r + 1 + dr + size, c + 1 + dc:c + 1 + dc + size] - centre)
                                      for dr, dc in pa.NEIGHBOURS])
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_symmetric_pad_matches_numpy_for_wide_pads():
    image = torch.arange(2 * 3 * 1).view(2, 3, 1)
    np.testing.assert_array_equal(pa.symmetric_pad(image, 7).numpy(), padded(image.numpy(), 7))


def test_boundary_pairs_known_values():
    label = np.zeros((5, 6), np.uint8)
    label[:, 3:] = 1
    label[0, :] = 255  # void: never an anchor, never a negative
    # pad 0: centres one pixel from every edge (rows 1..3, cols 1..4); row 1's north neighbours are void
    pairs = pa.boundary_pairs(label, pad=0)
    expected = {(1, r, 2, 0) for r in (1, 2, 3)} | {(0, r, 3, 1) for r in (1, 2, 3)}  # [dir, row, col, class]
    assert {tuple(p) for p in pairs} == expected
    # pad 1: rows 2..2 and cols 2..3, so both 3x3 patches lie inside the image with a pixel to spare
    assert {tuple(p) for p in pa.boundary_pairs(label, pad=1)} == {(1, 2, 2, 0), (0, 2, 3, 1)}
    # pad 3: the image is too small for any fitting patch, so every position counts
    assert len(pa.boundary_pairs(label, pad=3)) == 8  # rows 1..4, east and west (row 0 is void)


def tiny_split(seed=1):
    """Five small random images of three sizes, labels: two halves and a void top row."""
    rng = np.random.default_rng(seed)
    shapes = [(10, 12), (9, 12), (10, 11), (8, 8), (10, 12)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    labels = []
    for h, w in shapes:
        label = np.zeros((h, w), np.uint8)
        label[:, w // 2:] = 1
        label[h // 2:, :w // 3] = 2
        label[0] = 255
        labels.append(label)
    return common.Split([f"img{i}" for i in range(5)], lambda i: (images[i], labels[i]), shapes), images, labels


@pytest.mark.parametrize("size", [3, 25])  # 25 > every image: all positions, mirrored patches
def test_nearest_patch_search_matches_brute_force(size):
    split, images, labels = tiny_split()
    pad, ids = size // 2, np.arange(len(images))
    anchors = pa.choose_anchors(split, ids, pad, 8, seed=0)
    patches = torch.stack([pa.extract_patch(pa.symmetric_pad(pa.to_float(images[i], CPU), pad), pad, r, c)
                           for i, _, r, c, _ in anchors])
    fft_size = tuple(int(v) for v in np.array(split.sizes).max(0) + size - 1)
    dist, where = pa.nearest_patches(split, ids, anchors, patches, fft_size, CPU, chunk=3)
    for k, (i, _, r, c, cls) in enumerate(anchors):
        a = padded(images[i] / 255, pad)[r:r + size, c:c + size]
        best = (np.inf, None)
        for j in ids[ids != i]:  # every pixel of the anchor's class in every other image
            x = padded(images[j] / 255, pad)
            for rr, cc in zip(*np.nonzero(labels[j] == cls)):
                d = np.linalg.norm(x[rr:rr + size, cc:cc + size] - a)
                if d < best[0]:
                    best = (d, (j, rr, cc))
        assert dist[k] == pytest.approx(best[0], rel=1e-4)
        assert tuple(where[k]) == best[1]


@pytest.mark.slow
def test_end_to_end_demo(tmp_path):
    """As a user runs it."""
    out = tmp_path / "run"
    proc = run_script("patch_analysis.py", "--patch-sizes", "3,61", "--patch-size", "15", "--n-anchors", 6,
                      "--max-images", 5, "--out", out)
    for name in ("figure1.png", "figure1_image.png", "figure1_patch_dist_3.png", "figure1_patch_dist_61.png",
                 "figure2_ratio_histogram.png"):
        with Image.open(out / name) as im:
            assert im.width > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["n_anchors"] + results["n_anchors_without_positive"] == 6 and results["n_images"] == 5
    assert 0 < results["median_ratio"] < 10
    assert f"median_ratio={results['median_ratio']:.4f}" in proc.stdout
    assert not list(out.glob("*.tmp"))


def test_folder_dataset(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_train=4, n_val=1)
    out = tmp_path / "run"
    run_main("patch_analysis.py", "--dataset", "folder", "--data-root", root, "--patch-sizes", "5",
             "--patch-size", "5", "--n-anchors", 3, "--out", out)
    assert "median_ratio" in json.loads((out / "results.json").read_text())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for target in (out, out / "results.json"):  # an earlier run's folder; a file
        last = refused("patch_analysis.py", "--dataset", "folder", "--data-root", root, "--out", target)
        assert str(target) in last
        assert "already holds an earlier run's files" in last if target == out else "is a file, not a folder" in last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("args, words", [(["--patch-size", "4"], "odd size"),
                                         (["--patch-sizes", "15,x"], "--patch-sizes"),
                                         (["--max-images", "1"], "--max-images"),
                                         (["--n-anchors", "0"], "--n-anchors"),
                                         (["--seed", "-1"], r"--seed must lie in \[0, 2\*\*32\)")])
def test_bad_values_name_the_option(args, words):
    with pytest.raises(pa.UserError, match=words):
        pa.parse_args(args)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    assert "needs --data-root" in refused("patch_analysis.py", "--dataset", "folder", out=tmp_path / "bad")
