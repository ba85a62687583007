"""Shared helpers: run a script as a user would (a subprocess) or through its main() in this process, runs
finished once and shared by every test (and every xdist worker) that only reads them, and tiny datasets."""
import contextlib
import fcntl
import gc
import hashlib
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

# a few iterations, tiny crops: every script end to end in seconds
FAST = ["--iters", "6", "--eval-every", "3", "--batch-size", "2", "--num-workers", "0"]

# one thread per run: faster for tiny workloads, and the same float arithmetic in every run (in this process too)
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
torch.set_num_threads(1)


def run_script(script, *args, cwd=None, check=True, timeout=600, env=None, preexec_fn=None):
    """`python SCRIPT ARGS` as a user runs it: the command line, the exit status, stderr's last line."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def kit_state(collect=True):
    """Whatever a run changes in its process, put back afterwards: the excepthook, common.CHECKPOINTED, the
    global RNGs, deterministic kernels and cudnn's flags, CUBLAS_WORKSPACE_CONFIG, the thread count; objects a
    run leaves (its folder's lock file, open logs) are collected."""
    saved = dict(hook=sys.excepthook, checkpointed=dict(common.CHECKPOINTED),
                 rng=(random.getstate(), np.random.get_state(), torch.get_rng_state()),
                 deterministic=(torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled()),
                 cudnn=(torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
                 cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), threads=torch.get_num_threads())
    try:
        yield
    finally:
        sys.excepthook = saved["hook"]
        common.CHECKPOINTED.clear()
        common.CHECKPOINTED.update(saved["checkpointed"])
        random.setstate(saved["rng"][0]), np.random.set_state(saved["rng"][1]), torch.set_rng_state(saved["rng"][2])
        torch.use_deterministic_algorithms(saved["deterministic"][0], warn_only=saved["deterministic"][1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved["cudnn"]
        if saved["cublas"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas"]
        torch.set_num_threads(saved["threads"])
        if collect:
            gc.collect()  # a Run's lock file and logs closed now, not whenever


@pytest.fixture(autouse=True)
def _restore_kit_state():
    """Tests that call common.parse_args or a script's main() leave nothing behind for the next test."""
    with kit_state(collect=False):
        yield


def parse(script, argv):
    """A script's Args from `argv`, as its `if __name__ == "__main__"` line makes them."""
    module = importlib.import_module(Path(script).stem)
    argv = [str(a) for a in argv]
    return module, (module.parse_args(argv) if hasattr(module, "parse_args") else common.parse_args(module.Args, argv))


def run_main(script, *argv, cwd=None):
    """main(parse_args(argv)) of a script in this process, with sys.argv as the command line would set it: the
    code path of `python SCRIPT ARGV` without an interpreter start-up (~2 s of importing torch), for runs whose
    command line is not what a test checks. Returns stdout and stderr as run_script does, and main's value.
    A UserError propagates: refused() turns it into the line a user would read."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in argv]
    with (kit_state(), contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp):
        mp.setattr(sys, "argv", [str(ROOT / script), *argv])
        module, args = parse(script, argv)
        result = module.main(args)
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue(), result=result, returncode=0)


def refused(script, *argv, out=None, cwd=None):
    """The error line a user reads (`error: ...`, as common's excepthook writes it) for a run that these options
    must stop before anything is written: a UserError of one line, and no --out folder left behind. The
    promise that such an error ends the program with that one line, no traceback and exit status 1 is checked
    by a few cases run as subprocesses (test_bad_input.py)."""
    with pytest.raises(common.UserError) as error:
        run_main(script, *argv, *(["--out", out] if out else []), cwd=cwd)
    message = str(error.value)
    error.value.__traceback__ = None  # frees the refused Run and its lock at once
    del error
    gc.collect()
    assert "\n" not in message, message
    assert out is None or not Path(out).exists(), "a refused run must leave no output folder"
    return f"error: {message}"


def last_error(proc):
    """stderr's last line of a failed program, which must end without a traceback."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def read_results(out):
    return json.loads((Path(out) / "results.json").read_text())


# ---- runs finished once, shared -------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_root(tmp_path_factory, worker_id):
    """A folder that all xdist workers of this session share (each has its own temporary folder below it)."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "shared"
    root.mkdir(exist_ok=True)
    return root


def once(root, name, build):
    """build(folder) the first time any worker asks for `name` in this session; the others wait for it and
    get the same folder, which no test may change (copy it first)."""
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def shared_run(shared_root):
    """shared_run(script, *argv, subprocess=False) -> (run folder, its stdout): the run of `script` with `argv`
    (and an --out of its own), finished once per session for every test that asks for the same one; as a
    subprocess where the test reads what a user's command prints, else through main() in a worker."""
    def get(script, *argv, subprocess=False):
        argv = [str(a) for a in argv]
        key = hashlib.sha1(json.dumps([script, argv, subprocess]).encode()).hexdigest()[:12]

        def build(folder):
            proc = (run_script if subprocess else run_main)(script, *argv, "--out", folder / "run")
            (folder / "stdout.txt").write_text(proc.stdout)
        folder = once(shared_root, f"{Path(script).stem}_{key}", build)
        return folder / "run", (folder / "stdout.txt").read_text()
    return get


def copy_run(run, tmp_path, name="run"):
    """A copy of a shared run that a test may change (resume, damage)."""
    return Path(shutil.copytree(run, tmp_path / name))


# ---- tiny datasets ----------------------------------------------------------------------------------
def shapes_sample(rng, h, w, num_classes):
    """An image whose label map is a few rectangles of classes 1..num_classes-1 on class 0."""
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    for _ in range(3):
        c = rng.integers(1, num_classes)
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(3, h // 2), x0 + rng.integers(3, w // 2)
        label[y0:y1, x0:x1] = c
        image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] // 2 + 40 * c).astype(np.uint8)
    return image, label


def make_folder_dataset(root, n_train=12, n_val=4, size=(24, 32), num_classes=3, seed=0, jpg_every=3):
    """ROOT/{train,val}/{images,masks}: PNG and JPEG images, L-mode class-index masks, a 255 border."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = shapes_sample(rng, *size, num_classes)
            label[0, :] = 255
            suffix = ".jpg" if i % jpg_every == 0 else ".png"
            Image.fromarray(image).save(root / split / "images" / f"img_{i:03d}{suffix}")
            Image.fromarray(label, mode="L").save(root / split / "masks" / f"img_{i:03d}.png")
    return root


def make_unlabeled(folder, sizes=None):
    """Images without masks: nested, of mixed formats (suffixes in any case) and sizes, some smaller than
    the crop; beside them a macOS resource fork, a .DS_Store and a text file, which are no images."""
    rng = np.random.default_rng(5)
    sizes = sizes or {"a.PNG": (24, 32), "b.jpg": (30, 40), "sub/c.bmp": (10, 12), "sub/d.tif": (24, 32),
                      "sub/deeper/e.webp": (50, 20), "sub/f.TIFF": (24, 32)}
    for name, (h, w) in sizes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    return sorted(sizes)


@pytest.fixture
def folder_data(tmp_path):
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_folder_data(shared_root):
    """The folder dataset of `folder_data`, made once for runs that only read it (its cache is written once)."""
    return once(shared_root, "folder_data", make_folder_dataset)


@pytest.fixture(scope="session")
def official(shared_root):
    """One tiny copy of each official download (tests/official_layouts.py), made once per session for the tests
    that only read it (its prepared cache included): {dataset: root, "pascal_names": (train_aug, val)}."""
    import official_layouts

    def build(folder):
        _, train_aug, val = official_layouts.make_pascal(folder / "pascal")
        official_layouts.make_cityscapes(folder / "cityscapes")
        official_layouts.make_isic(folder / "isic", n_val=2)
        (folder / "pascal_names.json").write_text(json.dumps([train_aug, val]))
    folder = once(shared_root, "official", build)
    return dict(cityscapes=folder / "cityscapes", pascal_aug=folder / "pascal", isic2017=folder / "isic",
                pascal_names=tuple(json.loads((folder / "pascal_names.json").read_text())))
