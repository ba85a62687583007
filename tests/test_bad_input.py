"""Bad input stops before training: non-zero exit, one clear last line naming the culprit, no
traceback, and no run folder left behind."""

import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import conftest
from conftest import FAST, last_error, make_folder_dataset, run_main, run_script
from cutmixseg import files, guard, prepare


def refused(tmp_path, *args, script="train_cutmix.py"):
    """The line a user reads for a run these options stop (conftest.refused: in this process)."""
    return conftest.refused(script, *FAST, *args, out=tmp_path / "run")


# ---- the promise, kept by the program itself: one line on stderr, no traceback, exit status 1 ---------
@pytest.mark.parametrize("case", ["missing data root", "option out of range", "unet_small batch of one",
                                  "out in /proc"])
def test_bad_input_ends_the_program_with_one_line_and_exit_status_1(case, tmp_path):
    """A few refusals from each place a run checks its input (options, the data, the network, --out), run as
    the program a user starts: every other refusal in this file is checked in process, as the UserError
    whose message common's excepthook prints."""
    args, words = {"missing data root": (["--dataset", "folder", "--data-root", tmp_path / "nowhere"], "no such folder"),
                   "option out of range": (["--iters", "0"], "--iters must be at least 1"),
                   "unet_small batch of one": (["--batch-size", "1", "--crop-size", "8"], "--batch-size 1"),
                   "out in /proc": ([], "cannot make folders in")}[case]
    if case == "out in /proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    out = Path("/proc/x/run") if case == "out in /proc" else tmp_path / "run"
    proc = run_script("train_cutmix.py", *FAST, *args, "--out", out, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not out.exists()
    assert last_error(proc).startswith("error: ") and words in last_error(proc)


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


SPLIT_NAMES = ["img_000", "img_001", "img_002", "img_003"]


@pytest.mark.parametrize("suffix, content, expected", [
    (".txt", b"\xef\xbb\xbfimg_002\nimg_000\n", [2, 0]),  # a UTF-8 byte-order mark
    (".txt", b"img_003\r\nimg_001\r\n\r\n", [3, 1]),  # Windows line ends, a blank line
    (".txt", pickle.dumps(np.array([3, 1, 0, 2])), [3, 1, 0, 2]),  # a pickle, told by its content
    (".pkl", pickle.dumps(np.array([1, 0, 3, 2]), protocol=2), [1, 0, 3, 2])])
def test_split_files_are_read_by_their_content(suffix, content, expected, tmp_path):
    path = tmp_path / f"split{suffix}"
    path.write_bytes(content)
    assert common.choose_labeled(SPLIT_NAMES, -1, split_file=str(path)).tolist() == expected


@pytest.mark.parametrize("content, words", [
    (b"img_001\nimg_002\nimg_001\n", "line 3: 'img_001' is named again (line 1); each labeled image once"),
    (b"\n  \n", "names no image; expected one training image name per line"),
    (bytes(range(1, 256)), "neither a text list of image names (UTF-8, one per line) nor a pickled index array"),
    (b"img_001\x00\x00\x00", "neither a text list of image names")])
def test_bad_split_files_are_refused_by_name(content, words, tmp_path):
    path = tmp_path / "split.txt"
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=re.escape(f"--split-file {path}")) as refusal:
        common.choose_labeled(SPLIT_NAMES, -1, split_file=str(path))
    assert words in str(refusal.value)


def test_a_split_file_naming_an_image_twice_stops_the_script(tmp_path):
    root = folder(tmp_path)
    split = tmp_path / "labeled.txt"
    split.write_text("img_001\nimg_002.png\nimg_001.jpg\n")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root, "--split-file", split, "--n-labeled", 2)
    assert last == f"error: --split-file {split}, line 3: 'img_001.jpg' is named again (line 1); each labeled image once"


def test_validation_verdict_is_cached(tmp_path, monkeypatch):
    root = folder(tmp_path)
    cache = common.cache_folder(root)
    pairs = {s: [(p, root / s / "masks" / (p.stem + ".png")) for p in sorted((root / s / "images").iterdir())]
             for s in ("train", "val")}
    splits = common.checked_splits(pairs, cache, None)
    cached = list((root / ".cutmix_seg_cache").glob("verdict_*.json"))
    assert len(cached) == 1 and splits["classes"] == [0, 1, 2] and len(splits["train"]) == len(pairs["train"])
    # a cached verdict is not checked again...
    check_pairs = prepare.check_pairs
    monkeypatch.setattr(prepare, "check_pairs", lambda *a: pytest.fail("checked the same files again"))
    assert common.checked_splits(pairs, cache, None)["train"].sizes == splits["train"].sizes
    # ...while a changed file (new size / time stamp) is
    monkeypatch.setattr(prepare, "check_pairs", check_pairs)
    (root / "train" / "images" / "img_001.png").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="img_001.png"):
        common.checked_splits(pairs, cache, None)


def test_an_unwritable_cache_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch, capsys):
    root = folder(tmp_path, n_train=4, n_val=2)
    (tmp_path / "file").write_text("x")
    bad, xdg = tmp_path / "file" / "cache", tmp_path / "xdg"  # a --cache-dir that cannot be created
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    data = common.load_dataset("folder", str(root), cache_dir=str(bad))
    line = next(line for line in capsys.readouterr().out.splitlines() if "cannot be written" in line)
    assert line.startswith(f"--cache-dir {bad} cannot be written: caching in {xdg / 'cutmix-seg'}/")
    assert list(xdg.glob("cutmix-seg/*/verdict_*.json")) and len(data.train) == 4


def test_a_read_only_or_foreign_cache_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch, capsys):
    import os
    root = folder(tmp_path, n_train=2, n_val=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (root / ".cutmix_seg_cache").mkdir()  # another user's: this one cannot write it (as root, os.access is told so)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p).name != ".cutmix_seg_cache")
    cache = common.cache_folder(root)
    assert cache.parent == tmp_path / "xdg" / "cutmix-seg" and cache.is_dir()
    assert f"{root / '.cutmix_seg_cache'} cannot be written: caching in {cache} instead" in capsys.readouterr().out


def test_a_corrupt_cached_verdict_is_checked_again(tmp_path, capsys):
    root = folder(tmp_path, n_train=3, n_val=2)
    pairs = {s: [(p, root / s / "masks" / (p.stem + ".png")) for p in sorted((root / s / "images").iterdir())]
             for s in ("train", "val")}
    cache = common.cache_folder(root)
    first = common.checked_splits(pairs, cache)
    verdict, = cache.glob("verdict_*.json")
    for garbage in ("{", "[" * 100000, json.dumps({"train": 1})):
        verdict.write_text(garbage)
        again = common.checked_splits(pairs, cache)
        assert f"{verdict}: a cached check that cannot be read; checking the data again" in capsys.readouterr().out
        assert again["train"].sizes == first["train"].sizes and again["classes"] == first["classes"]
        assert json.loads(verdict.read_text())["classes"] == [0, 1, 2]


def test_corrupt_prepared_arrays_are_prepared_again(tmp_path, capsys):
    images = [tmp_path / f"lesion_{i}.png" for i in range(3)]
    for i, path in enumerate(images):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(path)
    (tmp_path / "cache").mkdir()
    first, _ = prepare.arrays(tmp_path, tmp_path / "cache", "isic2017_unlabeled", [(p,) for p in images],
                              prepare.shrink_isic)
    first = np.array(first)
    stored, = (tmp_path / "cache").glob("isic2017_unlabeled_*/images.npy")
    stored.write_bytes(stored.read_bytes()[:1000])  # a disk that lost the file's end
    again, labels = prepare.arrays(tmp_path, tmp_path / "cache", "isic2017_unlabeled", [(p,) for p in images],
                                   prepare.shrink_isic)
    assert f"{stored.parent}: prepared data that cannot be read" in capsys.readouterr().out
    assert labels is None and np.array_equal(np.array(again), first) and first.shape == (3, 248, 248, 3)


@pytest.mark.parametrize("case", ["corrupt", "no GTcls"])
def test_sbd_to_aug_names_a_bad_mat_file(case, tmp_path, monkeypatch):
    """SBD's .mat labels: one that scipy cannot read, or one without GTcls, is named (scipy stands in when
    it is not installed: it is this step's optional dependency)."""
    import types
    from tools import sbd
    try:
        from scipy.io import savemat
    except ImportError:
        def loadmat(path, **kw):
            if Path(path).read_bytes() == b"garbage":
                raise ValueError("Unknown mat file type")
            return {"__header__": b"", "GTinst": None}
        scipy = types.ModuleType("scipy")
        scipy.io = types.SimpleNamespace(loadmat=loadmat)
        monkeypatch.setitem(sys.modules, "scipy", scipy)
        monkeypatch.setitem(sys.modules, "scipy.io", scipy.io)
        savemat = None
    mat = tmp_path / "sbd" / "dataset" / "cls" / "2008_000002.mat"
    mat.parent.mkdir(parents=True)
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    if case == "corrupt":
        mat.write_bytes(b"garbage")
    elif savemat:
        savemat(mat, {"GTinst": np.zeros((2, 2))})
    else:
        mat.write_bytes(b"a mat file of another kind")
    with pytest.raises(common.UserError) as refusal:
        sbd.sbd_to_aug(tmp_path / "sbd", voc)
    assert str(refusal.value).startswith(f"{mat}: ")
    assert ("not a readable .mat file" if case == "corrupt" else "holds no GTcls.Segmentation") in str(refusal.value)
    assert not (voc / "SegmentationClassAug").exists() or not list((voc / "SegmentationClassAug").iterdir())


@pytest.mark.parametrize("script, option, value", [
    ("train_cutmix.py", "--lr", "nan"), ("train_cutmix.py", "--lr", "inf"), ("train_cutmix.py", "--lr", "-1"),
    ("train_cutmix.py", "--cons-weight", "-1"), ("train_cutmix.py", "--cons-weight", "nan"),
    ("train_cutmix.py", "--conf-thresh", "1.5"), ("train_cutmix.py", "--n-boxes", "0"),
    ("train_cutmix.py", "--n-boxes", "-2"), ("train_ict.py", "--ict-alpha", "0"), ("train_vat.py", "--vat-radius", "-1"),
    ("train_baseline.py", "--num-classes", "0"), ("train_baseline.py", "--num-classes", "300"),
    ("train_baseline.py", "--num-workers", "-1"), ("train_baseline.py", "--seed", "-3"),
    ("train_baseline.py", "--seed", str(2 ** 32)), ("train_baseline.py", "--split-seed", "-1"),
    ("train_stdaug.py", "--offset-range", "-4"), ("train_baseline.py", "--teacher-alpha", "nan")])
def test_options_out_of_range_are_refused_by_name(script, option, value, tmp_path):
    last = refused(tmp_path, option, value, script=script)
    assert last.startswith(f"error: {option} ") and value in last


@pytest.mark.parametrize("arch", ["pspnet101", "deeplabv3plus"])
def test_batch_of_one_is_refused_where_batchnorm_trains_on_1x1_maps(arch, tmp_path):
    last = refused(tmp_path, "--arch", arch, "--no-pretrained", "--batch-size", 1, script="train_baseline.py")
    assert "--batch-size 1" in last and "1x1" in last


# ---- valid but unusual folder data: read correctly, never skipped or misread ------------------------------
def load_folder(root, **kw):
    return common.load_dataset("folder", root, n_labeled=-1, **kw)


def test_nested_images_every_format_uppercase_masks_and_hidden_files(tmp_path):
    root = folder(tmp_path, n_train=4, n_val=2)
    images, masks = root / "train" / "images", root / "train" / "masks"
    rng = np.random.default_rng(1)
    for name, fmt in (("sub/deep/n1.bmp", "BMP"), ("sub/n2.tif", "TIFF"), ("n3.webp", "WEBP"), ("n4.PNG", "PNG")):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / name, format=fmt)
        mask = (masks / name).with_suffix(".PNG" if name == "n4.PNG" else ".png")
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32), 2, np.uint8), mode="L").save(mask, format="PNG")
    (images / "._img_000.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS copies leave these
    (images / ".DS_Store").write_bytes(b"junk")
    (images / "Thumbs.db").write_bytes(b"junk")
    data = load_folder(root)
    assert len(data.train) == 8 and {"n1", "n2", "n3", "n4"} <= set(data.train.names)
    i = data.train.names.index("n1")
    image, label = data.train.load(i)
    assert image.shape == (24, 32, 3) and (label == 2).all()


def test_sixteen_bit_images_are_scaled_and_one_bit_masks_read_as_classes(tmp_path):
    root = folder(tmp_path, n_train=3, n_val=2)
    grey = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)  # up to 61,360
    Image.fromarray(grey).save(root / "train" / "images" / "img_001.png")
    Image.fromarray(np.eye(24, 32, dtype=bool)).save(root / "train" / "masks" / "img_002.png")
    data = load_folder(root, num_classes=3)
    image, _ = data.train.load(data.train.names.index("img_001"))
    assert np.array_equal(image[..., 0], np.round(grey / 257).astype(np.uint8)) and image.max() > 200
    _, mask = data.train.load(data.train.names.index("img_002"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


@pytest.mark.parametrize("case, words", [
    ("one stem twice", "share one name"), ("0/255 masks", "0/255 need 255 -> 1"),
    ("stray class", "--num-classes 201"), ("unscored validation", "label no pixel"),
    ("broken symlink", "img_001")])
def test_unusual_folder_data_is_refused_by_name(case, words, tmp_path):
    root = folder(tmp_path, n_train=4, n_val=2)
    images, masks = root / "train" / "images", root / "train" / "masks"
    if case == "one stem twice":
        Image.open(images / "img_000.jpg").save(images / "img_000.png")
    elif case == "0/255 masks":
        for split in ("train", "val"):
            for mask in (root / split / "masks").iterdir():
                label = np.array(Image.open(mask))
                Image.fromarray(np.where(label > 0, 255, 0).astype(np.uint8), mode="L").save(mask)
    elif case == "stray class":
        label = np.array(Image.open(masks / "img_001.png"))
        label[5, 5] = 200
        Image.fromarray(label, mode="L").save(masks / "img_001.png")
    elif case == "unscored validation":
        for mask in (root / "val" / "masks").iterdir():
            Image.fromarray(np.full((24, 32), 255, np.uint8), mode="L").save(mask)
    else:
        target = next(p for p in images.iterdir() if p.stem == "img_001")
        target.unlink()
        target.symlink_to(tmp_path / "gone.png")
    last = refused(tmp_path, "--dataset", "folder", "--data-root", root, "--arch", "unet_small")
    assert words in last


def test_a_stray_class_is_accepted_when_num_classes_says_so(tmp_path):
    root = folder(tmp_path, n_train=3, n_val=2)
    label = np.array(Image.open(root / "train" / "masks" / "img_001.png"))
    label[5, 5] = 7
    Image.fromarray(label, mode="L").save(root / "train" / "masks" / "img_001.png")
    assert load_folder(root, num_classes=8).num_classes == 8


# ---- run folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_training(case, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if case == "a file" else tmp_path / "file" / "run"
    assert "is a file, not a folder" in conftest.refused("train_cutmix.py", *FAST, "--out", out)
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_out_is_refused_before_training(tmp_path, monkeypatch):
    """A read-only parent folder (or file system): the real thing for a user; as root, who writes anywhere,
    making a folder there is told to fail as it would."""
    import errno
    import os
    import tempfile
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:
        mkdtemp = tempfile.mkdtemp

        def refusing(*args, dir=None, **kw):
            if Path(dir) == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return mkdtemp(*args, dir=dir, **kw)
        monkeypatch.setattr(guard.tempfile, "mkdtemp", refusing)
    try:
        with pytest.raises(common.UserError) as refusal:
            guard.check_writable(parent / "run")
    finally:
        parent.chmod(0o755)
    assert str(refusal.value) == (f"--out {parent / 'run'}: cannot make folders in {parent} (Permission denied); "
                                  f"choose a writable --out")
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="no /proc on this system")
def test_an_out_in_proc_is_refused_in_one_line():
    """/proc says it is writable and refuses every new folder: refused before anything is loaded."""
    last = conftest.refused("train_cutmix.py", *FAST, out=Path("/proc/x/run"))
    assert last.startswith("error: --out /proc/x/run: cannot make folders in /proc (")


def test_unet_small_with_one_value_per_channel_in_its_deepest_batchnorm_is_refused(tmp_path):
    """A batch of 1 with a crop of 8: unet_small's deepest level (1/8) holds one pixel per channel, which
    BatchNorm cannot normalise; a crop of 9 (2x2 there) or a batch of 2 trains."""
    last = refused(tmp_path, "--batch-size", "1", "--crop-size", "8")
    assert last.startswith("error: --crop-size 8,8 with --batch-size 1: unet_small's deepest BatchNorm would see "
                           "one value per channel")
    for args in (["--batch-size", "1", "--crop-size", "9"], ["--batch-size", "2", "--crop-size", "8"]):
        proc = run_main("train_baseline.py", "--iters", "1", "--eval-every", "1", "--num-workers", "0", *args,
                        "--out", tmp_path / f"b{args[1]}_c{args[3]}")
        assert proc.stdout.rstrip().splitlines()[-1].startswith("FINAL mIoU=")


def test_files_written_atomically_follow_the_umask_like_the_log(tmp_path):
    import os
    common.atomic_write(tmp_path / "results.json", "{}")
    common.atomic_write(tmp_path / "preview.png", np.zeros((4, 4), np.uint8))
    common.atomic_write(tmp_path / "checkpoint.pt", {"iter": 1})
    (tmp_path / "log.txt").write_text("")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~files.UMASK}, modes
    assert files.UMASK == os.umask(files.UMASK)


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_with_the_same_command(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "log.txt").write_text("settings: ...\n")
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a write killed half-way
    proc = run_main("train_cutmix.py", *FAST, "--out", out)
    assert "before its first checkpoint; starting afresh" in proc.stdout
    assert not list(out.glob("*.tmp")) and (out / "results.json").is_file()
    assert json.loads((out / "args.json").read_text())["iters"] == 6
    # finished: the same command with --resume says FINAL again and exits 0 (a program of its own: it ends by sys.exit)
    again = run_script("train_cutmix.py", *FAST, "--out", out, "--resume")
    assert again.stdout.rstrip().splitlines()[-1] == proc.stdout.rstrip().splitlines()[-1]


def test_a_folder_of_other_files_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    assert "my_notes.txt" in conftest.refused("train_cutmix.py", *FAST, "--out", out)
    assert (out / "my_notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_second_run_on_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """The first run is another process holding the folder's lock; the second is refused in this one."""
    import subprocess
    import sys
    import time
    from conftest import ENV, ROOT
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_cutmix.py"), "--iters", "400", "--eval-every", "200",
                              "--num-workers", "0", "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "log.txt").is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert "another run is writing there now" in conftest.refused("train_cutmix.py", *FAST, "--out", out,
                                                                      "--resume")
    finally:
        first.kill()
        first.wait()
