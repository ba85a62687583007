"""The command of every script's `Run:` line works as written, without --data-root: the data is looked for in
data/<dataset> under the current folder (for Cityscapes first in $CITYSCAPES_DATASET, cityscapesScripts'
variable); when neither holds it, one line names both places and the layout expected."""
import json
from pathlib import Path

import pytest

import common
from conftest import ENV, last_error, read_results, refused, run_main, run_script
from official_layouts import make_cityscapes

TINY = ["--n-labeled", 3, "--arch", "unet_small", "--no-pretrained", "--eval-every", 2, "--batch-size", 2,
        "--num-workers", 0, "--crop-size", "16,32"]


@pytest.fixture(autouse=True)
def no_cityscapes_variable(monkeypatch):
    """The tests set $CITYSCAPES_DATASET themselves; the machine's own must not leak in."""
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)


def resolved_root(**given):
    return common.resolve(common.TrainArgs, given).data_root


def test_cityscapes_trains_from_data_cityscapes_and_resumes_from_anywhere(tmp_path):
    """No --data-root and no --out: data/cityscapes of the current folder, recorded absolute in args.json,
    and the default run folder; `--out ABS --resume` from a folder without data/ goes on with it."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    make_cityscapes(work / "data" / "cityscapes", n_train=5, n_val=2)
    elsewhere.mkdir()
    run_main("train_baseline.py", "--dataset", "cityscapes", *TINY, "--iters", 2, cwd=work)
    out = work / "runs" / "train_baseline_cityscapes_unet_small_3_s1"
    recorded = json.loads((out / "args.json").read_text())["data_root"]
    assert recorded == str((work / "data" / "cityscapes").resolve())
    proc = run_main("train_baseline.py", "--out", out, "--resume", "--iters", 4, cwd=elsewhere)
    results = read_results(out)
    assert results["iters"] == 4 and results["resumed_from"] == 2 and results["n_labeled"] == 3
    assert proc.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    assert list(elsewhere.iterdir()) == []


def test_cityscapes_dataset_variable_comes_first_and_data_root_wins_over_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cityscapes").mkdir(parents=True)
    (tmp_path / "official").mkdir()
    assert resolved_root(dataset="cityscapes") == str(tmp_path / "data" / "cityscapes")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "official"))
    assert resolved_root(dataset="cityscapes") == str(tmp_path / "official")
    assert common.require_root(None, "cityscapes") == tmp_path / "official"
    assert resolved_root(dataset="cityscapes", data_root="mine") == str(tmp_path / "mine")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "nowhere"))  # no folder: the next place
    assert resolved_root(dataset="cityscapes") == str(tmp_path / "data" / "cityscapes")
    # the variable is Cityscapes' only; every dataset has its data/<dataset>
    (tmp_path / "data" / "pascal_aug").mkdir()
    assert resolved_root(dataset="pascal_aug") == str(tmp_path / "data" / "pascal_aug")
    assert resolved_root(dataset="isic2017") is None  # said when the data is read (below)


def test_demo_folder_and_benchmark_take_no_default(tmp_path, monkeypatch):
    """demo is generated; folder is the user's own data, named each time; --benchmark without --data-root
    times random images of the dataset's sizes, even where data/<dataset> exists."""
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "folder", "cityscapes"):
        (tmp_path / "data" / name).mkdir(parents=True)
    assert resolved_root(dataset="demo") is None and resolved_root(dataset="folder") is None
    assert resolved_root(dataset="cityscapes", benchmark=2) is None


def expected(dataset, where, first=""):
    return (f"error: --dataset {dataset} found no data: {first}no folder data/{dataset} in {where}; put the "
            f"data there or give --data-root (expected layout: {common.LAYOUTS[dataset]})")


def test_neither_place_holds_the_data_one_line_names_both(tmp_path, monkeypatch):
    def line(dataset):
        return refused("train_cutmix.py", "--dataset", dataset, out=tmp_path / "run", cwd=tmp_path)
    assert line("cityscapes") == expected("cityscapes", tmp_path, "$CITYSCAPES_DATASET is not set, ")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "nowhere"))
    assert line("cityscapes") == expected("cityscapes", tmp_path,
                                          f"$CITYSCAPES_DATASET={tmp_path / 'nowhere'} is no folder, ")
    for dataset in ("pascal_aug", "isic2017"):
        assert line(dataset) == expected(dataset, tmp_path)
    assert refused("patch_analysis.py", "--dataset", "isic2017", out=tmp_path / "run", cwd=tmp_path) == expected(
        "isic2017", tmp_path)  # the analysis looks in the same places
    assert line("folder") == (
        f"error: --dataset folder needs --data-root, the folder of your own data (expected layout: "
        f"{common.LAYOUTS['folder']})")


def test_the_run_line_as_written_ends_in_that_line_and_writes_nothing(tmp_path):
    """`python train_cutmix.py --dataset cityscapes --n-labeled 372` (train_cutmix.py's Run: line), as a user
    starts it in a folder without the data: one line, exit status 1, no run folder."""
    env = {k: v for k, v in ENV.items() if k != "CITYSCAPES_DATASET"}
    proc = run_script("train_cutmix.py", "--dataset", "cityscapes", "--n-labeled", 372, cwd=tmp_path, env=env,
                      check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert last_error(proc) == expected("cityscapes", tmp_path, "$CITYSCAPES_DATASET is not set, ")
    assert list(Path(tmp_path).iterdir()) == []
