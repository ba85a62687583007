"""The run folder's guard, run by common.py before a run trains: --out checked and claimed, --resume's
settings taken from the run's args.json, its checkpoint restored. Every refusal is one line naming the
option or file, given before anything is written; nothing of an earlier run is lost."""
import dataclasses
import errno
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .files import UserError, atomic_write, brief, not_utf8, probe, shown

try:
    import fcntl  # Unix: a run folder is locked while a run writes it
except ImportError:  # Windows: no lock
    fcntl = None

RUN_FILES = {"args.json", "labeled.txt", "log.txt", "metrics.jsonl", "preview.png", "curves.png"}
# Options a resumed run may change: how it executes, where it writes, how long it runs and how often it
# evaluates. Every other option defines the run (its data, network, method and their settings).
MAY_CHANGE = {"epochs", "device", "num_workers", "amp", "compile", "compile_mode", "deterministic",
              "cache_dir", "no_cache", "out", "resume", "benchmark", "iters", "eval_every"}
PATHS = {"data_root", "split_file", "unlabeled_dir"}


def read_json(path, what):
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__}: {e})")
    if not isinstance(record, dict):
        raise UserError(f"{path}: unreadable {what} (a JSON object expected)")
    return record


def resume_settings(args_class, given, out):
    """--resume: the options `given` on the command line, completed by the settings in the run's args.json
    in `out` (the --out given, or the folder these options write by default; None: not known).
    An option that defines the run and differs from the recorded one is refused by name; MAY_CHANGE options
    may differ (those not given take this machine's defaults, --iters and --eval-every the recorded ones)."""
    if not out or not (Path(out) / "checkpoint.pt").is_file():
        return given  # nothing to resume: common.Run says so and starts afresh
    saved = read_json(Path(out) / "args.json", "record of the run's settings")
    fields = {f.name for f in dataclasses.fields(args_class)}
    same_path = lambda a, b: Path(a).expanduser().resolve() == Path(b).expanduser().resolve()  # noqa: E731
    for name, value in given.items():
        if name in MAY_CHANGE or name not in saved:
            continue
        # a value that differs is refused; a path may be spelled otherwise
        if json.loads(json.dumps(value, default=str)) != saved[name] and not (
                name in PATHS and saved[name] and same_path(value, saved[name])):
            raise UserError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                            f"{saved[name]} ({Path(out) / 'args.json'}); a resumed run keeps its settings: "
                            f"leave the option out, or start a new run with another --out")
    machine_defaults = MAY_CHANGE - {"iters", "eval_every"}  # not given: this machine's defaults, not kept
    kept = {name: saved[name] for name in fields if name in saved and name not in machine_defaults}
    if "epochs" in given and "iters" not in given and saved.get("iters_per_epoch"):  # today's protocol
        kept["iters"] = given["epochs"] * saved["iters_per_epoch"]
    if isinstance(kept.get("crop_size"), list):
        kept["crop_size"] = tuple(kept["crop_size"])
    return {**kept, **given, "out": str(out)}


def check_writable(out):
    """--out, or the folder it would be made in, must be a folder this process can write and make folders in
    (tried with a folder made and removed at once: /proc, for one, says it is writable and refuses), and whose
    file system holds the bytes of --out's name that are not UTF-8 (the probe's name holds them too)."""
    out = Path(out)
    blocker = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not blocker.is_dir():
        raise UserError(f"--out {out}: {blocker} is a file, not a folder")
    try:
        probe(blocker, out)
    except OSError as e:
        if e.errno == errno.EILSEQ and not_utf8(out):
            raise UserError(f"--out {shown(out)}: the file system of {shown(blocker)} holds only names in "
                            f"UTF-8, which this one is not; choose an --out named in UTF-8")
        raise UserError(f"--out {out}: cannot make folders in {blocker} ({e.strerror}); "
                        f"choose a writable --out")


def claim(run):
    """--out, checked before anything is loaded or written: a file, or a folder that cannot be written, is
    refused; so is another run writing there now (a lock), files that are no run's, a run of another method,
    and a finished run (with --resume: its FINAL line again, unless --iters goes further). A folder without a
    checkpoint holds nothing to lose: the run starts afresh there; *.tmp files of a killed write go."""
    out, args = run.out, run.args
    check_writable(out)
    if fcntl:  # released when the process ends, however it ends
        tag = hashlib.sha1(os.fsencode(out.resolve())).hexdigest()[:16]
        run.lock = open(Path(tempfile.gettempdir()) / f"cutmix-seg-{tag}.lock", "a")
        try:
            fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {out}: another run is writing there now; choose another --out")
    checkpoint = run.checkpoint_path.is_file()
    if checkpoint and args.resume:
        method = read_json(out / "args.json", "record of the run's settings").get("method")
        if method != run.method:
            raise UserError(f"--resume: {out} holds a run of {method}, not of {run.method}; "
                            f"resume it with its own script, or choose another --out")
    if (out / "results.json").is_file():
        finished = read_json(out / "results.json", "results")
        if not args.resume:
            raise UserError(f"--out {out} already holds a finished run; choose another --out or delete it")
        if checkpoint and args.iters < finished.get("iters", 0):
            raise UserError(f"--iters {args.iters} is below the {finished['iters']} iterations {out} has run")
        if args.iters == finished.get("iters") or not checkpoint:
            print(f"{out} is already finished\nFINAL mIoU={finished.get('miou', float('nan')):.2f}")
            sys.exit(0)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    found = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if checkpoint and not args.resume:
        raise UserError(f"--out {out} already holds an unfinished run (add --resume to continue it); "
                        f"choose another --out or delete it")
    if not checkpoint and found - RUN_FILES:
        raise UserError(f"--out {out} holds {', '.join(sorted(found - RUN_FILES)[:3])}, no run's files")
    if not checkpoint and (found or args.resume):
        why = "a run stopped there before its first checkpoint" if found else "no run to resume"
        print(f"{out}: {why}; starting afresh")
        for name in found:
            (out / name).unlink()


def restore(run, tracked):
    """Load the run's checkpoint into the `tracked` objects ({name: object with load_state_dict, or a
    torch.Generator}) and the global RNGs; returns (its iteration, its timer's state). A
    changed --iters is said and recorded."""
    path, args = run.checkpoint_path, run.args
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise UserError(f"--resume: {path} is no readable checkpoint ({brief(e)}); "
                        f"delete the folder to start again")
    try:
        done, timer = state["iter"], state["timer"]
        if args.iters < done:
            raise UserError(f"--iters {args.iters} is below the checkpoint's iteration {done} in {path}")
        set_rng_state(state["rng"])
        for name, obj in tracked.items():
            if isinstance(obj, torch.amp.GradScaler) and not (obj.is_enabled() and state[name]):
                continue  # --amp changed to or from fp16: the loss scale starts afresh (or is not used)
            if isinstance(obj, torch.Generator):
                obj.set_state(state[name])
            else:
                obj.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"--resume: {path} does not fit this run ({brief(e)}); "
                        f"it was written by another method, network or version")
    record = read_json(run.out / "args.json", "record of the run's settings")
    if run.main and record.get("iters") != args.iters:
        poly = "; the poly schedule follows it" if args.lr_schedule.startswith("poly") else ""
        run.print(f"--iters {args.iters}: the run goes on to iteration {args.iters}, "
                  f"not {record.get('iters')} (recorded in args.json{poly})")
        updated = dict(record, iters=args.iters, epochs=args.epochs)
        atomic_write(run.out / "args.json", json.dumps(updated, indent=2))
    processes = f" with {run.world} processes" if run.world > 1 else ""
    run.print(f"resumed from iteration {done} of {run.out}{processes}")
    return done, timer


def fresh_folder(out, create=True):
    """The output folder of toy2d.py and patch_analysis.py, created (unless not `create`), or one clear line
    when it is a file, lies under a file, cannot be written, or already holds files (an earlier run's
    figures are never overwritten)."""
    out = Path(out)
    check_writable(out)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds an earlier run's files; "
                        f"choose another --out or delete it")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def rng_state():
    """Every global RNG's state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, *rest = np.random.get_state()
    return dict(python=random.getstate(),
                numpy=(kind, torch.from_numpy(keys.astype(np.int64)), *rest),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    kind, keys, *rest = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_evaluations(metrics_path):
    """The best teacher and student mIoU of a run's evaluations (metrics.jsonl) and their iterations."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    best = {}
    for key in ("miou", "student_miou"):
        scored = [r for r in records if key in r]
        if scored:
            top = max(scored, key=lambda r: r[key])
            best.update({f"best_{key}": top[key], f"best_{key}_iter": top["iter"]})
    return best
