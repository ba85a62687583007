"""--resume takes the run's settings from its args.json (paths recorded absolute: it resumes from any folder);
faults during a run (a full disk, a dead data loading worker, a garbage checkpoint) end in one line saying how
to go on, and the run goes on from its last checkpoint."""
import json
import resource
import signal
import subprocess
import sys

import pytest
import torch

import common
from conftest import (ENV, FAST, ROOT, copy_run, last_error, make_folder_dataset, make_unlabeled, read_results,
                      refused, run_main, run_script)


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture(scope="session")
def stopped(shared_run):
    """A cutmix run of 3 iterations (its checkpoint at 3: copy_of makes it a run stopped there), and the
    uninterrupted 6-iteration run's FINAL line."""
    whole = shared_run("train_cutmix.py", *FAST, subprocess=True)[1].rstrip().splitlines()[-1]
    return shared_run("train_cutmix.py", *FAST, "--iters", 3)[0], whole


def copy_of(stopped, tmp_path):
    """The stopped run, as a run killed after its checkpoint at iteration 3 leaves it (no results.json)."""
    out = copy_run(stopped[0], tmp_path)
    (out / "results.json").unlink()
    return out


def test_resume_takes_the_settings_from_args_json(stopped, tmp_path):
    """`--out RUN --resume` alone: the batch size, crop and the rest come from args.json; a longer --iters
    is said and recorded; execution options may differ. The run ends as the uninterrupted one."""
    out = copy_of(stopped, tmp_path)
    proc = run_main("train_cutmix.py", "--out", out, "--resume", "--iters", 6, "--device", "cpu",
                    "--num-workers", 0, "--deterministic")
    assert "--iters 6: the run goes on to iteration 6, not 3 (recorded in args.json)" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == stopped[1]
    record = json.loads((out / "args.json").read_text())
    assert record["iters"] == 6 and record["batch_size"] == 2 and record["eval_every"] == 3
    assert read_results(out)["resumed_from"] == 3
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}  # atomic files follow the umask as the log
    assert len(set(modes.values())) == 1 and {"args.json", "checkpoint.pt", "results.json", "preview.png"} <= set(modes)
    # a finished run goes further with a larger --iters (here with a worker process and another evaluation
    # interval: how a run executes may change), says FINAL again with its own, refuses a smaller one (the
    # worker process and the exit on a finished run: programs of their own)
    longer = run_script("train_cutmix.py", "--out", out, "--resume", "--iters", 9, "--num-workers", 1,
                        "--eval-every", 9)
    assert read_results(out)["iters"] == 9 and read_results(out)["resumed_from"] == 6
    again = run_script("train_cutmix.py", "--out", out, "--resume")
    assert again.stdout.rstrip().splitlines()[-1] == longer.stdout.rstrip().splitlines()[-1]
    before = snapshot(out)
    last = refused("train_cutmix.py", "--out", out, "--resume", "--iters", 4)
    assert last == f"error: --iters 4 is below the 9 iterations {out} has run"
    assert snapshot(out) == before


def test_amp_may_change_on_resume(folder_data, tmp_path):
    """fp16 (a GradScaler with a state) after an fp32 start, and back: the loss scale starts afresh."""
    args = [*FAST, "--dataset", "folder", "--data-root", folder_data, "--arch", "unet_small", "--out", tmp_path / "run"]
    run_main("train_cutmix.py", *args, "--iters", 2, "--eval-every", 2)
    (tmp_path / "run" / "results.json").unlink()
    assert "resumed from iteration 2" in run_main("train_cutmix.py", *args, "--iters", 3, "--resume", "--amp", "fp16").stdout
    (tmp_path / "run" / "results.json").unlink()
    assert "resumed from iteration 3" in run_main("train_cutmix.py", *args, "--iters", 4, "--resume").stdout
    assert read_results(tmp_path / "run")["iters"] == 4


@pytest.mark.parametrize("option, value, saved", [("--lr", "0.01", "0.001"), ("--arch", "deeplabv2", "unet_small"),
                                                  ("--n-labeled", "30", "60"), ("--cons-weight", "2", "1.0"),
                                                  ("--crop-size", "32", "[48, 48]"), ("--seed", "2", "1")])
def test_a_changed_run_defining_option_is_refused_by_name(option, value, saved, stopped, tmp_path):
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    last = refused("train_cutmix.py", *FAST, option, value, "--out", out, "--resume")
    assert last.startswith(f"error: --resume: {option} ") and f"differs from the run's {saved} ({out / 'args.json'})" in last
    assert snapshot(out) == before


def test_another_dataset_or_method_is_refused(stopped, tmp_path, folder_data):
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    last = refused("train_cutmix.py", *FAST, "--dataset", "folder", "--data-root", folder_data, "--out", out,
                   "--resume")
    assert "--dataset folder differs from the run's demo" in last
    last = refused("train_cutmix.py", *FAST, "--data-root", folder_data, "--out", out, "--resume")
    assert f"--data-root {folder_data} differs from the run's None" in last
    last = refused("train_cutout.py", *FAST, "--out", out, "--resume")
    assert last == f"error: --resume: {out} holds a run of cutmix, not of cutout; resume it with its own script, " \
                   f"or choose another --out"
    assert snapshot(out) == before


@pytest.mark.parametrize("damage, words", [("truncated", "is no readable checkpoint ("),
                                           ("missing entry", "does not fit this run (KeyError: 'generator')"),
                                           ("other network", "does not fit this run (RuntimeError: ")])
def test_a_garbage_checkpoint_is_named(damage, words, stopped, tmp_path):
    out = copy_of(stopped, tmp_path)
    path = out / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        state = torch.load(path, weights_only=True)
        if damage == "missing entry":
            del state["generator"]
        else:
            state["student"] = {k: v.reshape(-1)[:1] for k, v in state["student"].items()}
        torch.save(state, path)
    before = snapshot(out)
    last = refused("train_cutmix.py", "--out", out, "--resume")
    assert last.startswith(f"error: --resume: {path} ") and words in last
    assert snapshot(out) == before


def run_with(tmp_path, patch, *args, preexec_fn=None):
    """train_cutmix.py with `patch` (Python) run first in its process: a fault injected where it happens."""
    script = ROOT / "train_cutmix.py"
    code = (f"import sys, os, errno, signal, runpy\nsys.path.insert(0, {str(ROOT)!r})\nimport common\n{patch}\n"
            f"sys.argv = [{str(script)!r}, *{[str(a) for a in args]!r}]\nrunpy.run_path({str(script)!r}, "
            f"run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec_fn)


FULL_DISK = """
real_fsync = os.fsync
def fsync(fd):  # the second checkpoint finds the disk full
    if "/checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}") and common.CHECKPOINTED.get("iter"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_how_to_go_on(tmp_path):
    out = tmp_path / "run"
    last = last_error(run_with(tmp_path, FULL_DISK, *FAST, "--out", out))
    assert last == (f"error: cannot write {out / 'checkpoint.pt'}: No space left on device (disk full?); "
                    f"--resume continues from iteration 3")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iter"] == 3 and not list(out.glob("*.tmp"))
    resumed = run_main("train_cutmix.py", *FAST, "--out", out, "--resume")
    assert "resumed from iteration 3" in resumed.stdout and read_results(out)["iters"] == 6


@pytest.mark.slow
def test_a_file_size_limit_before_the_first_checkpoint_leaves_a_run_the_same_command_restarts(tmp_path):
    out = tmp_path / "run"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the checkpoint: ~8 MB
    last = last_error(run_script("train_cutmix.py", *FAST, "--out", out, check=False, preexec_fn=limit))
    assert last == (f"error: cannot write {out / 'checkpoint.pt'}: File too large (disk full?); no checkpoint yet: "
                    f"the same command starts the run afresh")
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("*.tmp"))
    proc = run_main("train_cutmix.py", *FAST, "--out", out)
    assert "before its first checkpoint; starting afresh" in proc.stdout and read_results(out)["resumed_from"] == 0


WORKER_DIES = """
real_getitem = common.TrainSet.__getitem__
def getitem(self, key):  # a worker is killed (as by the OOM killer) once the first checkpoint is written
    import torch.utils.data
    if torch.utils.data.get_worker_info() is not None and os.path.exists("run/checkpoint.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_getitem(self, key)
common.TrainSet.__getitem__ = getitem
"""


@pytest.mark.slow
def test_a_killed_data_loading_worker_is_one_line_and_the_run_resumes(tmp_path):
    args = ["--iters", 12, "--eval-every", 3, "--batch-size", 2, "--num-workers", 1, "--out", "run"]
    last = last_error(run_with(tmp_path, WORKER_DIES, *args))
    assert last.startswith("error: a data loading worker died (out of memory? try fewer --num-workers); "
                           "--resume continues from iteration ")
    done = int(last.rsplit(" ", 1)[1])
    assert done >= 3 and torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iter"] == done
    run_script("train_cutmix.py", *args, "--resume", cwd=tmp_path)
    assert read_results(tmp_path / "run")["resumed_from"] == done


def test_a_dead_worker_is_reported_once_then_sigchld_is_back_to_its_default():
    """torch's SIGCHLD handler raises for each worker that dies (the labeled and the unlabeled stream's die
    together); wrapped as a loader starts, its first report puts the default handler back, so that no second
    report breaks into the cleanup before the one line (a handler that finds nothing dead stays)."""
    dead = []
    def torch_handler(signum, frame):
        if dead:
            raise RuntimeError("DataLoader worker (pid 8122) is killed by signal: Killed. ")
    saved = signal.getsignal(signal.SIGCHLD)
    try:
        signal.signal(signal.SIGCHLD, torch_handler)
        stream = iter([1, 2])
        assert common.one_report_of_dead_workers(stream) is stream
        wrapped = signal.getsignal(signal.SIGCHLD)
        common.one_report_of_dead_workers(iter([]))  # a second stream: wrapped once
        assert wrapped is not torch_handler and signal.getsignal(signal.SIGCHLD) is wrapped
        wrapped(signal.SIGCHLD, None)  # a worker ended without failing: the handler stays
        assert signal.getsignal(signal.SIGCHLD) is wrapped
        dead.append(8122)
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            wrapped(signal.SIGCHLD, None)
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGCHLD, saved)


def test_paths_are_recorded_absolute_and_a_run_resumes_from_another_folder(tmp_path, monkeypatch):
    """--data-root, --cache-dir, --unlabeled-dir and --split-file given relative to one working folder are
    recorded absolute in args.json; `--out ABS --resume` from another working folder finds them."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    make_folder_dataset(work / "data", n_train=6, n_val=2)
    make_unlabeled(work / "extra")
    (work / "labeled.txt").write_text("img_001\nimg_004\n")
    elsewhere.mkdir()
    out = tmp_path / "runs" / "rel"
    relative = dict(data_root="data", cache_dir="cache", unlabeled_dir="extra", split_file="labeled.txt")
    options = [a for name, value in relative.items() for a in (f"--{name.replace('_', '-')}", value)]
    run_main("train_cutmix.py", "--dataset", "folder", *options, "--n-labeled", 2, "--arch", "unet_small",
             *FAST, "--iters", 3, "--out", out, cwd=work)
    record = json.loads((out / "args.json").read_text())
    for name, value in relative.items():
        assert record[name] == str((work / value).resolve()), name
    assert (work / "cache").is_dir() and (out / "labeled.txt").read_text() == "img_001\nimg_004\n"
    proc = run_main("train_cutmix.py", "--out", out, "--resume", "--iters", 6, cwd=elsewhere)
    results = read_results(out)
    assert results["iters"] == 6 and results["resumed_from"] == 3 and results["n_labeled"] == 2
    assert proc.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    assert list(elsewhere.iterdir()) == []
