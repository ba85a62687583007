"""Bad input stops before training: non-zero exit, one clear last line naming the culprit, no
traceback, and no run folder left behind."""

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, make_folder_dataset, run_script


def refused(tmp_path, *args, script="train_cutmix.py"):
    out = tmp_path / "run"
    proc = run_script(script, *FAST, *args, "--out", out, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "a refused run must leave no output folder"
    return proc.stderr.strip().splitlines()[-1]


def folder(tmp_path, **kw):
    return make_folder_dataset(tmp_path / "data", **kw)


def test_missing_data_root(tmp_path):
    last = refused(tmp_path, "--dataset", "folder", "--data-root", tmp_path / "nowhere")
    assert "--data-root" in last and "nowhere" in last and "no such folder" in last


def test_data_root_not_given(tmp_path):
    last = refused(tmp_path, "--dataset", "folder")
    assert "needs --data-root" in last


def test_wrong_layout(tmp_path):
    root = folder(tmp_path)
    (root / "val" / "masks").rename(root / "val" / "labels")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root)
    assert "val/masks" in last and "ROOT/train/images" in last


def test_missing_mask(tmp_path):
    root = folder(tmp_path)
    (root / "train" / "masks" / "img_004.png").unlink()
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root)
    assert "missing mask" in last and "img_004.png" in last


def test_unreadable_image(tmp_path):
    root = folder(tmp_path)
    (root / "train" / "images" / "img_002.png").write_bytes(b"not a png at all")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root)
    assert "cannot read image" in last and "img_002.png" in last


def test_mask_size_differs_from_image(tmp_path):
    root = folder(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(root / "val" / "masks" / "img_001.png")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root)
    assert "img_001.png" in last and "must match" in last


def test_mask_value_beyond_the_class_count(tmp_path):
    root = folder(tmp_path)
    mask = np.zeros((24, 32), np.uint8)
    mask[3, 3] = 7
    Image.fromarray(mask, mode="L").save(root / "train" / "masks" / "img_005.png")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root, "--num-classes", 3)
    assert "img_005.png" in last and "class 7" in last and "--num-classes" in last


def test_n_labeled_larger_than_the_training_set(tmp_path):
    last = refused(tmp_path, "--dataset", "folder", "--data-root", folder(tmp_path), "--n-labeled", 50)
    assert "--n-labeled 50" in last and "12 images" in last


def test_n_labeled_larger_than_the_demo(tmp_path):
    last = refused(tmp_path, "--n-labeled", 100000, script="train_baseline.py")
    assert "--n-labeled 100000" in last


@pytest.mark.parametrize("option,value,needle", [("--crop-size", "12x", "--crop-size"),
                                                 ("--iters", "0", "--iters"),
                                                 ("--n-labeled", "0", "--n-labeled"),
                                                 ("--split-file", "/no/such/list.txt", "--split-file")])
def test_bad_options(tmp_path, option, value, needle):
    last = refused(tmp_path, option, value)
    assert needle in last


def test_split_file_naming_an_unknown_image(tmp_path):
    root = folder(tmp_path)
    split = tmp_path / "labeled.txt"
    split.write_text("img_001\nimg_999\n")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root, "--split-file", split, "--n-labeled", 2)
    assert "img_999" in last and "line 2" in last


def test_validation_verdict_is_cached(tmp_path, monkeypatch):
    import common
    from tools import prepare
    root = folder(tmp_path)
    cache = common.cache_folder(root)
    pairs = {s: [(p, root / s / "masks" / (p.stem + ".png")) for p in sorted((root / s / "images").iterdir())]
             for s in ("train", "val")}
    splits = common.checked_splits(pairs, cache, None)
    cached = list((root / ".cutmix_seg_cache").glob("verdict_*.json"))
    assert len(cached) == 1 and splits["max_label"] == 2 and len(splits["train"]) == len(pairs["train"])
    # a cached verdict is not checked again...
    check_pairs = prepare.check_pairs
    monkeypatch.setattr(prepare, "check_pairs", lambda *a: pytest.fail("checked the same files again"))
    assert common.checked_splits(pairs, cache, None)["train"].sizes == splits["train"].sizes
    # ...while a changed file (new size / time stamp) is
    monkeypatch.setattr(prepare, "check_pairs", check_pairs)
    (root / "train" / "images" / "img_001.png").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="img_001.png"):
        common.checked_splits(pairs, cache, None)
