"""`python -m tools compare RUN... [--out PICTURE.png]`: several finished tiny runs in one picture, their mIoU
curves and final numbers named by folder; bad input ends in one line."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common
from conftest import ENV, FAST, ROOT, copy_run, last_error, read_results
from tools import compare


@pytest.fixture
def runs(shared_run, tmp_path):
    """Two tiny demo runs, baseline and CutMix (shared, copied under folder names of their own), and a second
    CutMix "seed" (a copy) to stand for several seeds of one method."""
    baseline = copy_run(shared_run("train_baseline.py", *FAST, subprocess=True)[0], tmp_path, "baseline_s1")
    cutmix = copy_run(shared_run("train_cutmix.py", *FAST, subprocess=True)[0], tmp_path, "cutmix_s1")
    return baseline, cutmix, copy_run(cutmix, tmp_path, "cutmix_s2")


def run_compare(*argv, capsys):
    capsys.readouterr()
    compare.main("compare", [str(a) for a in argv])
    return capsys.readouterr().out


def test_two_finished_runs_in_one_picture_with_a_legend_naming_each(runs, tmp_path, capsys):
    baseline, cutmix, _ = runs
    out = tmp_path / "pictures" / "both.png"
    printed = run_compare(baseline, cutmix, "--out", out, capsys=capsys)
    read = [compare.read_run(baseline), compare.read_run(cutmix)]
    for run, folder in zip(read, (baseline, cutmix)):  # the curve: every evaluation of metrics.jsonl
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert run["points"] == [(r["iter"], r["miou"]) for r in records if "miou" in r]
        assert len(run["points"]) == 2
        results = read_results(folder)
        assert run["method"] == results["method"]
        assert f"| {folder.name} | {results['method']} | mIoU {results['miou']:.2f}" in printed
    assert printed.rstrip().splitlines()[-1] == f"picture: {out}"
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] == compare.WIDTH and picture.shape[0] > compare.PLOT_HEIGHT + 2 * compare.ROW
    colours = compare.colours(read)
    assert len(set(colours.values())) == 2
    plot = picture[compare.TOP:compare.TOP + compare.PLOT_HEIGHT]
    legend = picture[compare.TOP + compare.PLOT_HEIGHT + compare.BOTTOM:]
    for colour in colours.values():  # each run's curve in the plot, its swatch in the legend
        assert (plot == colour).all(-1).sum() > 20 and (legend == colour).all(-1).sum() > 100


def test_several_seeds_of_one_method_each_get_a_curve_an_unfinished_run_its_last_evaluation(runs, tmp_path,
                                                                                            capsys):
    baseline, cutmix, again = runs
    (again / "results.json").unlink()  # stopped after its last evaluation, before results.json
    printed = run_compare(baseline, cutmix, again, "--out", tmp_path / "seeds.png", capsys=capsys)
    read = [compare.read_run(folder) for folder in (baseline, cutmix, again)]
    colours = compare.colours(read)
    assert len(set(colours.values())) == 3  # two shades of CutMix's hue beside the baseline's
    it, miou = read[2]["points"][-1]
    assert f"| cutmix_s2 | cutmix | unfinished: mIoU {miou:.2f} at it {it} |" in printed
    picture = np.asarray(Image.open(tmp_path / "seeds.png").convert("RGB"))
    assert all((picture == colour).all(-1).any() for colour in colours.values())


@pytest.mark.parametrize("case", ["no folder", "no metrics", "no evaluation", "bad line", "bad value",
                                  "bad results", "not png"])
def test_bad_input_is_one_line(case, runs, tmp_path, capsys):
    run = runs[0]
    out = tmp_path / "c.png"
    if case == "no metrics":
        (run / "metrics.jsonl").unlink()
    elif case == "no evaluation":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join(line for line in lines if '"miou"' not in line))
    elif case == "bad line":
        (run / "metrics.jsonl").write_text('{"iter": 3, "miou": 1.0}\n{"iter": 6, "mi')
    elif case == "bad value":
        (run / "metrics.jsonl").write_text('{"iter": 3, "miou": 1.0}\n{"iter": null, "miou": 2.0}\n')
    elif case == "bad results":
        (run / "results.json").write_text("[]")
    elif case == "not png":
        out = tmp_path / "c.jpg"
    folder = tmp_path / "nowhere" if case == "no folder" else run
    expected = {"no folder": f"compare: {folder}: no such run folder",
                "no metrics": f"compare: {run}: no metrics.jsonl (a run folder has one from its first log)",
                "no evaluation": f"compare: {run / 'metrics.jsonl'}: no evaluation yet (no record with "
                                 f"\"miou\" and \"iter\")",
                "bad line": f"compare: {run / 'metrics.jsonl'}: line 2 is no JSON record of numbers",
                "bad value": f"compare: {run / 'metrics.jsonl'}: line 2 is no JSON record of numbers",
                "bad results": f"compare: {run / 'results.json'}: unreadable (expected a JSON object with "
                               f"\"miou\")",
                "not png": f"compare: --out {out}: expected a .png file to write"}[case]
    with pytest.raises(common.UserError) as error:
        run_compare(folder, "--out", out, capsys=capsys)
    assert str(error.value) == expected and not out.exists()


def test_the_command_refuses_a_missing_run_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools", "compare", "nowhere"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert last_error(proc) == "error: compare: nowhere: no such run folder" and proc.stderr.count("\n") == 1


def test_final_numbers_name_the_best_evaluation_when_it_beats_the_last_and_isics_lesion_iou():
    results = dict(miou=25.0, best_miou=25.0, best_miou_iter=3, iters=6)
    finished = dict(points=[(3, 20.0), (6, 25.0)], results=results)
    assert compare.final_numbers(finished) == "mIoU 25.00, 6 it"  # the same value earlier: nothing to add
    finished["results"].update(miou=24.0, best_miou=26.5, best_miou_iter=3, lesion_iou=70.25)
    assert compare.final_numbers(finished) == "mIoU 24.00, lesion IoU 70.25 (best 26.50 at it 3), 6 it"
    assert compare.final_numbers(dict(points=[(3, 20.0)], results=None)) == "unfinished: mIoU 20.00 at it 3"
