"""File names that are not UTF-8 (b"img_\\xff\\xfe.png", as old ZIP archives and Windows copies leave them on
Linux): Python reads them with surrogate escapes, and the kit writes them back with the same bytes (labeled.txt,
log.txt, stdout, predict's outputs, run folders) or as \\udcXX in JSON (args.json), which json.loads reads back;
where a place cannot hold a name, the run stops before anything is written, in one line naming it."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common import UserError
from conftest import ENV, ROOT, kit_state, make_folder_dataset, refused, run_main
from tools import paper, predict

pytestmark = pytest.mark.xdist_group("file_names")  # one worker trains the module's run once

ODD = os.fsdecode(b"\xff\xfe")  # two bytes that are not UTF-8, as Python reads them from the file system
SMALL = ["--dataset", "folder", "--arch", "unet_small", "--iters", 2, "--eval-every", 2, "--batch-size", 2,
         "--num-workers", 0]


def odd_dataset(root, renames):
    """A folder dataset of 6 training images whose img_NNN files (image and mask) are renamed as `renames` says."""
    make_folder_dataset(root, n_train=6, n_val=2)
    for sub in ("images", "masks"):
        for p in (root / "train" / sub).iterdir():
            if p.stem in renames:
                p.rename(p.with_name(renames[p.stem] + p.suffix))
    return root


# stdout as under a UTF-8 locale such as en_US.UTF-8, which refuses surrogate escapes (under C.UTF-8 or POSIX
# Python writes them as bytes already)
STRICT = dict(ENV, PYTHONIOENCODING="utf-8:strict")


def python(*argv, cwd):
    """`python ARGV` with stdout and stderr as bytes (text mode would refuse a name that is not UTF-8)."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=STRICT, capture_output=True, timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr[-3000:].decode(errors="replace")
    return proc


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """A finished run, as a subprocess (stdout a UTF-8 pipe), on data whose folder, one labeled image (and its mask)
    and another with blanks in its name are named so, written to an --out named so."""
    tmp = tmp_path_factory.mktemp("names")
    root = odd_dataset(tmp / f"data_{ODD}", {"img_001": f"img_{ODD}", "img_002": "img 2 b"})
    out = tmp / f"run_{ODD}"
    proc = python(ROOT / "train_baseline.py", *SMALL, "--data-root", root, "--n-labeled", 3, "--split-seed", 6,
                  "--out", out, cwd=tmp)
    return root, out, proc


def test_an_image_named_in_bytes_that_are_not_utf8_trains_and_is_written_with_its_own_bytes(odd_run):
    root, out, proc = odd_run
    listed = (out / "labeled.txt").read_bytes().splitlines()
    assert b"img_\xff\xfe" in listed and b"img 2 b" in listed and len(listed) == 3
    assert b"data_root=" + os.fsencode(root) + b" " in proc.stdout  # the settings: line, on a UTF-8 stdout
    assert b"results in " + os.fsencode(out) + b":" in proc.stdout
    assert b"data_root=" + os.fsencode(root) + b" " in (out / "log.txt").read_bytes()
    assert "\\udcff\\udcfe" in (out / "args.json").read_text()  # JSON: the escapes, which json.loads reads back
    recorded = json.loads((out / "args.json").read_text())
    assert os.fsencode(recorded["data_root"]) == os.fsencode(root) and recorded["out"] == str(out)
    assert json.loads((out / "results.json").read_text())["n_labeled"] == 3


def test_its_labeled_txt_read_back_as_split_file_picks_the_same_images(odd_run, tmp_path):
    root, out, _ = odd_run
    again = run_main("train_baseline.py", *SMALL, "--data-root", root, "--split-file", out / "labeled.txt", "--iters",
                     1, "--out", tmp_path / "again")
    assert (tmp_path / "again" / "labeled.txt").read_bytes() == (out / "labeled.txt").read_bytes()
    picked = [line for line in again.stdout.splitlines() if line.startswith("data: ")]
    assert picked == [line for line in (out / "log.txt").read_text(errors="surrogateescape").splitlines()
                      if line.startswith("data: ")]


def test_predict_keeps_the_name_in_its_masks_overlays_and_its_out_folder(odd_run, tmp_path):
    root, run, _ = odd_run
    single, out = tmp_path / f"one_{ODD}.png", tmp_path / f"pred_{ODD}"
    shutil.copy(root / "train" / "images" / f"img_{ODD}.png", single)
    proc = python("-m", "tools", "predict", run, root / "train" / "images", single, "--out", out, "--overlay",
                  cwd=ROOT)
    assert b"7 predicted masks in " + os.fsencode(out) + b" (teacher of " + os.fsencode(run) in proc.stdout
    written = set(os.listdir(os.fsencode(out)))
    assert {b"img_\xff\xfe.png", b"img_\xff\xfe_overlay.jpg", b"img 2 b.png", b"img 2 b_overlay.jpg",
            b"one_\xff\xfe.png", b"one_\xff\xfe_overlay.jpg"} <= written
    assert Image.open(out / f"img_{ODD}.png").size == Image.open(root / "train" / "images" / f"img_{ODD}.png").size


def test_summary_counts_a_run_whose_folder_is_named_so(odd_run, capsys):
    _, run, _ = odd_run
    paper.main("summary", [str(run.parent)])
    table, miou = capsys.readouterr(), json.loads((run / "results.json").read_text())["miou"]
    assert f"| baseline | {miou:.2f} [1] / — |" in table.out and not table.err


@pytest.fixture
def utf8_only_file_system(monkeypatch):
    """os.mkdir as on a file system that holds names in UTF-8 only (macOS, ZFS with utf8only): EILSEQ."""
    make = os.mkdir

    def mkdir(path, *args, **kw):
        try:
            os.fsencode(path).decode()
        except UnicodeDecodeError:
            raise OSError(errno.EILSEQ, os.strerror(errno.EILSEQ), path)
        return make(path, *args, **kw)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_an_out_folder_the_file_system_cannot_name_is_refused_before_anything_is_written(tmp_path,
                                                                                          utf8_only_file_system):
    line = refused("train_baseline.py", "--iters", 1, out=tmp_path / f"run_{ODD}")
    assert line.endswith("holds only names in UTF-8, which this one is not; choose an --out named in UTF-8")
    assert f"run_\\xff\\xfe" in line


def test_predict_refuses_by_name_an_image_the_out_file_system_cannot_name(odd_run, tmp_path, utf8_only_file_system):
    root, run, _ = odd_run
    with kit_state(), pytest.raises(UserError) as error:
        predict.main("predict", [str(run), str(root / "train" / "images"), "--out", str(tmp_path / "pred")])
    assert str(error.value).startswith(f"{os.fsencode(root).decode(errors='backslashreplace')}/train/images/"
                                       f"img_\\xff\\xfe.png: the file system of --out ")
    assert str(error.value).endswith("is not; rename it")
    assert not (tmp_path / "pred").exists()


def test_an_image_name_labeled_txt_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    root = odd_dataset(tmp_path / "data", {"img_001": "img\n1"})
    line = refused("train_baseline.py", *SMALL, "--data-root", root, "--n-labeled", -1, out=tmp_path / "run")
    assert line == (f"error: --data-root {root}: labeled.txt (one name a line) cannot hold the training image "
                    f"'img\\n1'; rename it without line breaks, control characters or blanks at its ends")
