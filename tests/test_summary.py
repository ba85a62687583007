"""`python common.py seeds` (one run per seed, skip finished, resume unfinished) and `python common.py
summary` (mean ± std per cell beside the paper's number), on fake results.json files and one tiny demo run."""
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import common
from conftest import ENV, FAST, ROOT, kit_state
from tools import paper


def fake_run(folder, dataset, arch, method, n, score, **args):
    folder.mkdir(parents=True)
    key = "lesion_iou" if dataset == "isic2017" else "miou"
    results = dict(miou=score if key == "miou" else 50.0, dataset=dataset, arch=arch, method=method, n_labeled=n)
    results[key] = score
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "args.json").write_text(json.dumps(dict(args, dataset=dataset)))


def common_py(*argv, cwd):
    """`python common.py COMMAND ...`: the shortcut, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "common.py"), *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def tool(command, *argv, cwd, capture):
    """`python -m tools COMMAND ARGV` in this process (capture: capsys, or capfd for the output of the training
    runs it starts too): its stdout, stderr and exit status; a UserError propagates."""
    capture.readouterr()
    with kit_state(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("OMP_NUM_THREADS", "1")  # the runs it starts: one thread, as run_script's
        status = paper.main(command, [str(a) for a in argv])
    out, err = capture.readouterr()
    return SimpleNamespace(stdout=out, stderr=err, returncode=status or 0)


def test_summary_groups_runs_into_cells_beside_the_papers_values(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, score in enumerate([60.0, 61.0, 62.0]):
        fake_run(runs / f"cm_{i}", "cityscapes", "deeplabv2", "cutmix", 372, score, crop_size=[256, 512])
    fake_run(runs / "full", "cityscapes", "deeplabv2", "cutmix", 372, 58.0, crop_size=[512, 1024], n_boxes=3)
    fake_run(runs / "psp", "pascal_aug", "pspnet101", "cutmix", 106, 66.0)
    fake_run(runs / "odd", "pascal_aug", "pspnet101", "vat", 50, 40.0)  # a cell the paper has not
    fake_run(runs / "isic" / "a", "isic2017", "denseunet161", "cutmix", 50, 74.0)
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "checkpoint.pt").write_bytes(b"")
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{")  # a run killed while writing: skipped
    proc = tool("summary", runs, cwd=tmp_path, capture=capsys)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "broken" in proc.stderr and "unfinished" not in proc.stderr
    std = np.std([60.0, 61.0, 62.0], ddof=1)
    assert f"| cutmix | 61.00 ± {std:.2f} [3] / 60.34 ± 1.24 |" in out
    assert "| cutmix, crop 512x1024, 3 boxes | 58.00 [1] / 60.41 ± 1.12 |" in out
    assert "pascal_aug, pspnet101: mIoU" in out
    assert "| cutmix | — [0] / — | 66.00 [1] / 67.20 |" in out  # columns 50 and 106
    assert "| vat | 40.00 [1] / — | — [0] / 38.81 |" not in out  # VAT has no PSPNet value in the paper
    assert "| vat | 40.00 [1] / — | — [0] / — |" in out
    assert "isic2017, denseunet161: lesion IoU" in out and "| cutmix | 74.00 [1] / 74.57 ± 1.03 |" in out


def test_summary_puts_todays_protocol_apart_scored_by_the_best_evaluation(tmp_path, capsys):
    runs, arch = tmp_path / "runs", "deeplabv3plus_deepstem"
    u2pl = str(common.UNIMATCH_SPLITS / "pascal" / "u2pl_1_16" / "labeled.txt")
    blended = str(common.UNIMATCH_SPLITS / "pascal" / "1_16" / "labeled.txt")
    for name, method, n, split_file, crop in (("sup", "baseline", 92, None, [321, 321]),
                                              ("blended", "cutmix", 662, blended, [321, 321]),
                                              ("u2pl", "cutmix", 662, u2pl, [513, 513])):
        fake_run(runs / name, "pascal_aug", arch, method, n, 40.0, protocol="unimatch", split_file=split_file,
                 crop_size=crop)
        results = json.loads((runs / name / "results.json").read_text())
        student = dict(best_student_miou=4.0) if method == "baseline" else {}
        (runs / name / "results.json").write_text(json.dumps(dict(results, best_miou=n / 10, **student)))
    fake_run(runs / "paper", "pascal_aug", "deeplabv2", "baseline", 92, 30.0)
    out = tool("summary", runs, cwd=tmp_path, capture=capsys).stdout
    assert (f"pascal_aug, {arch}, today's protocol: best mIoU of the network named (%), ours mean ± std [runs] / "
            f"UniMatch's table") in out
    # each network's best on a row of its own; UniMatch's published number beside the network it scores
    assert "| baseline, student | 4.00 [1] / 45.1 | — [0] / — |" in out  # columns 92 and 662
    assert "| baseline, teacher | 9.20 [1] / — | — [0] / — |" in out
    assert "| cutmix, teacher | — [0] / — | 66.20 [1] / — |" in out  # UniMatch's blended list
    assert "| cutmix, crop 513x513, list u2pl_1_16, teacher | — [0] / — | 66.20 [1] / — |" in out  # U2PL's, apart
    assert "pascal_aug, deeplabv2: mIoU (%), ours mean ± std [runs] / paper" in out and "| baseline | 30.00 [1]" in out


def test_every_table_4_cell_has_a_paper_value():
    for arch in ("deeplabv3plus", "denseunet161", "pspnet101"):
        for method in ("baseline", "cutmix"):
            for n in paper.PAPER_COUNTS["pascal_aug"]:
                assert paper.paper_value("pascal_aug", arch, method, n) != "—"
    assert paper.paper_value("pascal_aug", "pspnet101", "cutmix", 10582) == "77.42"
    assert paper.paper_value("isic2017", "denseunet161", "baseline", 2000) == "78.61 ± 0.36"
    assert paper.paper_value("cityscapes", "deeplabv2", "cutmix", 100) == "51.20 ± 2.29"


def test_seeds_command_lines(tmp_path, capsys):
    runs = tmp_path / "runs"
    # each seed's folder is the one the script itself names (the split seed varies: _ss<seed>)
    fake_run(runs / "train_cutmix_cityscapes_372_s1_ss1", "cityscapes", "deeplabv2", "cutmix", 372, 60.0)
    (runs / "train_cutmix_cityscapes_372_s1_ss2").mkdir()
    (runs / "train_cutmix_cityscapes_372_s1_ss2" / "checkpoint.pt").write_bytes(b"")
    proc = tool("seeds", "train_cutmix.py", "--seeds", 1, 2, 3, "--runs", runs, "--dry-run", "--",
                "--dataset", "cityscapes", "--data-root", "CS", cwd=tmp_path, capture=capsys)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert f"finished: {runs}/train_cutmix_cityscapes_372_s1_ss1" in proc.stdout
    assert len(lines) == 2
    assert lines[0].endswith(f"--dataset cityscapes --data-root CS --split-seed 2 --out "
                             f"{runs}/train_cutmix_cityscapes_372_s1_ss2 --resume")
    assert lines[1].endswith(f"--split-seed 3 --out {runs}/train_cutmix_cityscapes_372_s1_ss3")
    assert "| cutmix | 60.00 [1] / 60.34 ± 1.24 |" in proc.stdout  # the finished seed's summary
    # Pascal: the split file fixes the labeled subset, so the seed varies initialisation and sampling; an
    # arch other than the dataset's is named in the folder
    proc = tool("seeds", "train_baseline.py", "--seeds", 7, "--dry-run", "--", "--dataset", "pascal_aug",
                "--arch", "pspnet101", "--split-file", "split_0.pkl", "--n-labeled", -1, cwd=tmp_path, capture=capsys)
    assert proc.stdout.splitlines()[0].endswith("--seed 7 --out runs/train_baseline_pascal_aug_pspnet101_-1_s7")
    # today's protocol: its lists fix the subset (the seed varies); U2PL's list of 662 apart from UniMatch's
    u2pl = common.UNIMATCH_SPLITS / "pascal" / "u2pl_1_16" / "labeled.txt"
    for options, folder in ((["--n-labeled", 662], "train_cutmix_pascal_aug_unimatch_662_s7"),
                            (["--split-file", u2pl], "train_cutmix_pascal_aug_unimatch_662_u2pl_1_16_s7")):
        proc = tool("seeds", "train_cutmix.py", "--seeds", 7, "--dry-run", "--", "--protocol", "unimatch",
                    "--dataset", "pascal_aug", *options, cwd=tmp_path, capture=capsys)
        assert proc.stdout.splitlines()[0].endswith(f"--seed 7 --out runs/{folder}")
    with pytest.raises(common.UserError, match="--seed is set per seed"):
        tool("seeds", "train_cutmix.py", "--", "--seed", 3, cwd=tmp_path, capture=capsys)


@pytest.mark.slow
def test_seeds_runs_the_demo_twice_then_skips_both(tmp_path, capfd):
    """The tool in this process; the runs it starts are programs of their own."""
    argv = ["train_cutmix.py", "--seeds", 1, 2, "--", *FAST, "--n-labeled", 8]
    proc = tool("seeds", *argv, cwd=tmp_path, capture=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (1, 2):
        results = json.loads((tmp_path / f"runs/train_cutmix_demo_8_s1_ss{seed}/results.json").read_text())
        assert results["n_labeled"] == 8 and results["iters"] == 6
    assert "demo, unet_small: mIoU" in proc.stdout and "[2] / —" in proc.stdout
    again = tool("seeds", *argv, cwd=tmp_path, capture=capfd)
    assert again.returncode == 0 and again.stdout.count("finished: ") == 2 and "$ " not in again.stdout


def last_line(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_summary_of_a_missing_folder_or_a_file_is_refused(tmp_path, capsys):
    proc = common_py("summary", tmp_path / "nowhere", cwd=tmp_path)
    assert proc.returncode != 0 and last_line(proc) == (f"error: summary: {tmp_path / 'nowhere'} is no such folder "
                                                        f"(give the folder holding the run folders)")
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match=re.escape(f"summary: {tmp_path / 'file'} is a file, not a folder of runs")):
        paper.main("summary", [str(tmp_path / "file")])
    paper.main("summary", [str(tmp_path)])
    assert capsys.readouterr().out.strip() == "no finished runs (results.json) found"


def test_summary_names_the_file_it_cannot_read(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "good", "cityscapes", "deeplabv2", "cutmix", 372, 60.0)
    fake_run(runs / "bad_args", "cityscapes", "deeplabv2", "cutmix", 372, 70.0)
    (runs / "bad_args" / "args.json").write_text('{"crop_size": [256,')
    fake_run(runs / "deep", "cityscapes", "deeplabv2", "cutmix", 372, 80.0)
    (runs / "deep" / "results.json").write_text("[" * 100000 + "]" * 100000)
    proc = tool("summary", runs, cwd=tmp_path, capture=capsys)
    assert proc.returncode == 0
    assert f"skipped {runs / 'bad_args'}: args.json cannot be read (JSONDecodeError: " in proc.stderr
    assert f"skipped {runs / 'deep'}: results.json cannot be read (RecursionError: nested too deeply)" in proc.stderr
    assert "| cutmix | 60.00 [1] / 60.34 ± 1.24 |" in proc.stdout  # the readable run alone


@pytest.mark.parametrize("argv, words", [
    (["--seeds", 1, 2, 1], "error: seeds: --seeds names 1 more than once; each seed is one run"),
    (["--seeds", -3], "argument --seeds: a seed is an integer in [0, 2**32), got '-3'"),
    (["--seeds", 2**32], "argument --seeds: a seed is an integer in [0, 2**32), got '4294967296'"),
    (["--runs", "file"], "error: seeds: --runs file is a file, not a folder"),
    (["--", "--n-labeled", "abc"], "argument --n-labeled: invalid int value: 'abc'"),
    (["--", "--dataset", "nope"], "argument --dataset: invalid choice: 'nope'")])
def test_seeds_refuses_bad_options_before_any_run(argv, words, tmp_path, monkeypatch, capsys):
    """In this process (the same code as `python common.py seeds`, whose UserError ends as `error: ...`)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises((common.UserError, SystemExit)) as refusal:
        paper.main("seeds", ["train_cutmix.py", *map(str, argv)])
    said = capsys.readouterr()
    if refusal.type is SystemExit:  # argparse: usage, then the error as the last line, exit status 2
        assert refusal.value.code == 2 and words in said.err.strip().splitlines()[-1]
    else:
        assert words == f"error: {refusal.value}"
    assert not (tmp_path / "runs").exists() and "$ " not in said.out


def test_seeds_names_a_failed_run(tmp_path, capfd):
    proc = tool("seeds", "train_cutmix.py", "--seeds", 5, "--", "--dataset", "folder", cwd=tmp_path, capture=capfd)
    assert proc.returncode == 1 and "error: --dataset folder needs --data-root" in proc.stderr
    assert last_line(proc) == ("failed seeds: 5 (exit status 1, runs/train_cutmix_folder_-1_s1_ss5); their errors "
                               "are above")
