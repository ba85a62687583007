"""toy2d.py: the signed distance, the gap's erosion and the contour look-up against direct computations;
the consistency loss on known values; one tiny end-to-end run; bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import toy2d
from conftest import last_error, refused, run_main, run_script

KEYS = {"a_supervised", "a_gap_isotropic", "b_no_gap_isotropic", "d_no_gap_constrained"}


def blobs(seed, shape=(17, 23)):
    """A random two-class mask with several separate regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    field = sum(np.sin(rng.uniform(0.2, 0.8) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(0.2, 0.8) * yy)
                for _ in range(3))
    return (field > 0).astype(np.int64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_distance_matches_brute_force(seed):
    mask = blobs(seed)
    got = toy2d.signed_distance(mask)
    pixels = np.stack(np.nonzero(np.ones_like(mask)), 1)
    for (r, c), cls in zip(pixels, mask.ravel()):
        other = pixels[mask.ravel() != cls]  # every pixel of the other class
        d = np.sqrt(((other - (r, c)) ** 2).sum(1)).min()
        assert got[r, c] == pytest.approx(d if cls == 1 else -d, abs=1e-9)


@pytest.mark.parametrize("radius", [1, 3])
def test_erode_keeps_pixels_whose_city_block_ball_is_inside(radius):
    region = blobs(3).astype(bool)
    got = toy2d.erode(region, radius)
    H, W = region.shape
    for r in range(H):
        for c in range(W):
            ball = [(r + dr, c + dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)
                    if abs(dr) + abs(dc) <= radius]
            inside = all(0 <= y < H and 0 <= x < W and region[y, x] for y, x in ball)  # outside = eroded
            assert got[r, c] == inside


def test_gap_and_labeled_points():
    toy = toy2d.make_toy(12345)
    assert 0.4 < toy.mask.mean() < 0.6 and (toy.mask[:, 0] == 1).all() and (toy.mask[:, -1] == 0).all()
    x_u = toy2d.unlabeled_points(toy, toy2d.CLUSTER["gap"], 0.2, np.random.RandomState(0))
    px = np.clip(((x_u + 1) / 2 * toy2d.SIZE).astype(int), 0, toy2d.SIZE - 1)
    # 35 px city-block erosion: at least 35/√2 ≈ 25 px (Euclidean) from the boundary, less the 2 px jitter
    assert np.abs(toy.dist[px[:, 1], px[:, 0]]).min() > 35 / np.sqrt(2) - 12
    assert sorted(toy.y_l.tolist()) == [0] * 5 + [1] * 5
    assert (toy2d.true_class(toy.x_l) == toy.y_l).all()


def test_contour_lookup_reads_pixel_centres_exactly():
    toy = toy2d.make_toy(12345)
    dist_map = torch.from_numpy(toy.dist).float()[None, None]
    centres = torch.from_numpy(toy2d.pixel_centres(toy2d.SIZE))
    np.testing.assert_allclose(toy2d.sample_map(dist_map, centres).numpy(), toy.dist.ravel(), atol=1e-3)


def test_consistency_loss_known_values():
    exp = dict(toy2d.CONTINUOUS)  # logits_var
    logits_t = torch.tensor([[5.0, -5.0], [0.1, 0.0], [-4.0, 4.0]])  # confident, not confident, confident
    logits_s = logits_t + torch.tensor([[1.0, 1.0], [3.0, 3.0], [2.0, 0.0]])
    w = torch.tensor([1.0, 1.0, 0.0])  # the third perturbation left its contour
    loss, conf = toy2d.consistency_loss(logits_s, logits_t, w, exp)
    assert loss.item() == pytest.approx(1.0 / 2)  # only sample 1: mean(1², 1²) = 1, divided by Σw = 2
    assert conf.item() == pytest.approx(2 / 3)
    exp["loss"] = "var"
    loss, _ = toy2d.consistency_loss(logits_t, logits_t, torch.ones(3), exp)
    assert loss.item() == 0


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """As a user runs it (its runs in a pool of processes, one per core)."""
    out = tmp_path / "toy"
    proc = run_script("toy2d.py", "--steps", 3, "--seeds", 2, "--unlabeled-share", 0.01, "--grid", 32,
                      "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == KEYS and all(0 <= v <= 100 for v in results.values())
    for name in KEYS:
        assert sum(line.startswith(name + " ") and "error" in line for line in proc.stdout.splitlines()) == 1 + 2
    for name in ("a_gap_isotropic", "b_no_gap_isotropic", "c_distance_contours", "d_no_gap_constrained",
                 "figure3"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size[0] >= toy2d.SIZE
    assert not list(out.glob("*.tmp"))
    # the same --out again: refused by name, the earlier figures and results untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert refused("toy2d.py", "--steps", 3, "--seeds", 1, "--grid", 32, "--out", out) == (
        f"error: --out {out} already holds an earlier run's files; choose another --out or delete it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("args, words", [(["--steps", "0"], "--steps"),
                                         (["--unlabeled-share", "0"], "--unlabeled-share"),
                                         (["--grid", "-2"], "--grid"),
                                         (["--unlabeled-share", "nan"], "--unlabeled-share"),
                                         (["--seed", "-3"], r"--seed must lie in \[0, 2\*\*32\)"),
                                         (["--split-seed", str(2**32)], "--split-seed"),
                                         (["--seed", str(2**32 - 2), "--seeds", "3"], "below 2\\*\\*32")])
def test_bad_values_name_the_option(args, words):
    with pytest.raises(toy2d.UserError, match=words):
        toy2d.parse_args(args)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    proc = run_script("toy2d.py", "--device", "nonsense", "--out", tmp_path / "bad", check=False)
    assert "--device" in last_error(proc) and proc.returncode == 1
    assert not (tmp_path / "bad").exists()
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "toy"):  # --out a file, or under one
        assert refused("toy2d.py", "--out", out) == f"error: --out {out}: {tmp_path / 'file'} is a file, not a folder"
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="no /proc on this system")
def test_an_out_in_proc_is_refused_in_one_line():
    """/proc says it is writable and refuses every new folder: one line, exit status 1, nothing trained."""
    proc = run_script("toy2d.py", "--steps", 1, "--seeds", 1, "--grid", 8, "--out", "/proc/x/run", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert last_error(proc).startswith("error: --out /proc/x/run: cannot make folders in /proc (")


def test_a_tiny_unlabeled_share_still_runs(tmp_path, monkeypatch):
    """--unlabeled-share 1e-9 keeps a few unlabeled points (at least 2), enough for a batch: it trains and draws.
    In this process, its runs one after another (one core given)."""
    monkeypatch.setattr(toy2d.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    out = tmp_path / "toy"
    proc = run_main("toy2d.py", "--steps", 2, "--seeds", 1, "--unlabeled-share", 1e-9, "--grid", 8, "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == KEYS and all(0 <= v <= 100 for v in results.values()) and proc.result == results
    counts = [int(line.split(" unlabeled")[0].rsplit(" ", 1)[1]) for line in proc.stdout.splitlines()
              if " steps, " in line]
    assert counts == [2] * 4  # round(1e-9 · points) = 0, kept at 2
    assert (out / "figure3.png").is_file()
