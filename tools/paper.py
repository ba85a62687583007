"""The paper's tables beside ours: the published numbers (PAPER_RESULTS; today's protocol:
UNIMATCH_PUBLISHED), one labeled count run with several seeds (`python -m tools seeds`), and a summary of
finished runs (`python -m tools summary [RUNS]`)."""
import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

import common

# Labeled counts of each table's columns; "All" is the training set's size, as results.json records it.
PAPER_COUNTS = {"pascal_aug": (106, 212, 529, 1323, 10582), "cityscapes": (100, 372, 744, 2975),
                "isic2017": (50, 2000)}
# (dataset, arch, method) -> one value per PAPER_COUNTS column,
# a mean or (mean, std over 5 runs), None = not run.
# Pascal: Tables 2 and 4 (one run each, split 0); Cityscapes: Table 1, Sec. D.3; ISIC: Table 3, lesion IoU.
PAPER_RESULTS = {
    ("pascal_aug", "deeplabv2", "baseline"): (33.09, 43.15, 52.05, 60.56, 72.59),
    ("pascal_aug", "deeplabv2", "stdaug"): (32.40, 42.81, 53.37, 60.66, 72.24),
    ("pascal_aug", "deeplabv2", "vat"): (38.81, 48.55, 58.50, 62.93, 72.18),
    ("pascal_aug", "deeplabv2", "ict"): (35.82, 46.28, 53.17, 59.63, 71.50),
    ("pascal_aug", "deeplabv2", "cutout"): (48.73, 58.26, 64.37, 66.79, 72.03),
    ("pascal_aug", "deeplabv2", "cutmix"): (53.79, 64.81, 66.48, 67.60, 72.54),
    ("pascal_aug", "deeplabv3plus", "baseline"): (37.95, 48.35, 59.19, 66.58, 76.70),
    ("pascal_aug", "deeplabv3plus", "cutmix"): (59.52, 67.05, 69.57, 72.45, 76.73),
    ("pascal_aug", "denseunet161", "baseline"): (29.22, 39.92, 50.31, 60.65, 72.30),
    ("pascal_aug", "denseunet161", "cutmix"): (54.19, 63.81, 66.57, 66.78, 72.02),
    ("pascal_aug", "pspnet101", "baseline"): (36.69, 46.96, 59.02, 66.67, 77.59),
    ("pascal_aug", "pspnet101", "cutmix"): (67.20, 68.80, 73.33, 74.11, 77.42),
    ("cityscapes", "deeplabv2", "baseline"): ((44.41, 1.11), (55.25, 0.66), (60.57, 1.13), (67.53, 0.35)),
    ("cityscapes", "deeplabv2", "cutout"): ((47.21, 1.74), (57.72, 0.83), (61.96, 0.99), (67.47, 0.68)),
    ("cityscapes", "deeplabv2", "cutmix"): ((51.20, 2.29), (60.34, 1.24), (63.87, 0.71), (67.68, 0.37)),
    ("cityscapes", "deeplabv2", "cutmix, crop 512x1024"): (None, (58.75, 0.75), None, None),
    ("cityscapes", "deeplabv2", "cutmix, crop 512x1024, 3 boxes"): (None, (60.41, 1.12), None, None),
    ("isic2017", "denseunet161", "baseline"): ((67.64, 1.83), (78.61, 0.36)),  # 2000 = "fully supervised"
    ("isic2017", "denseunet161", "stdaug"): ((71.40, 2.34), None),
    ("isic2017", "denseunet161", "vat"): ((69.09, 1.38), None),
    ("isic2017", "denseunet161", "ict"): ((65.45, 3.50), None),
    ("isic2017", "denseunet161", "cutout"): ((68.76, 4.30), None),
    ("isic2017", "denseunet161", "cutmix"): ((74.57, 1.03), None),
}
# Today's protocol (--protocol unimatch): UniMatch's table, supervised R101 rows (its best epoch), the
# only published numbers under exactly this protocol; CutMix-Seg's modern rows used U2PL's
# (README "Under today's protocol").
# The network each published number scores:
# UniMatch's supervised baseline trains one model, the kit's student.
UNIMATCH_PUBLISHED = {
    ("pascal_aug", "baseline, student"): {92: 45.1, 183: 55.3, 366: 64.8, 732: 69.7, 1464: 73.5},
    ("cityscapes", "baseline, student"): {186: 66.3, 372: 72.8, 744: 75.0, 1488: 78.0},
    # UniMatch's own rows (its README's tables: Pascal 321 crops, Cityscapes R101);
    # one model, the kit's student
    ("pascal_aug", "unimatch, student"): {92: 75.2, 183: 77.2, 366: 78.8, 732: 79.9, 1464: 81.2},
    ("cityscapes", "unimatch, student"): {186: 76.6, 372: 77.9, 744: 79.2, 1488: 79.5},
}
TODAY = "today's protocol"  # the tables' arch column for such runs: "<arch>, today's protocol"
METHOD_ORDER = ["baseline", "stdaug", "vat", "ict", "cutout", "cutmix", "fixmatch", "unimatch"]


def run_label(results, args):
    """The method, tagged with what sets a run apart from the protocol (a crop, several CutMix boxes, under
    today's protocol a list --n-labeled does not pick)."""
    tags = [results["method"]]
    today = args.get("protocol") == "unimatch"
    defaults = common.UNIMATCH if today else common.DATASETS
    default_crop_size = defaults.get(results["dataset"], {}).get("crop_size")
    if args.get("crop_size") and default_crop_size and tuple(args["crop_size"]) != tuple(default_crop_size):
        tags.append("crop {}x{}".format(*args["crop_size"]))
    if args.get("n_boxes", 1) != 1:
        tags.append(f"{args['n_boxes']} boxes")
    if today and common.unimatch_list_name(argparse.Namespace(split_file=args.get("split_file"))):
        tags.append(f"list {common.unimatch_list_name(argparse.Namespace(split_file=args['split_file']))}")
    return ", ".join(tags)


def collect_results(paths):
    """{(dataset, arch, label, n_labeled): [score, ...]} from results.json files (ISIC: the lesion IoU;
    today's protocol: the best evaluation, as UniMatch reports, its arch tagged TODAY); unreadable or
    incomplete ones are reported on stderr and skipped."""
    cells = {}
    for path in map(Path, paths):
        file = path  # the file being read, named when it cannot be
        try:
            results = json.loads(path.read_text())
            file = path.parent / "args.json"
            args = json.loads(file.read_text()) if file.is_file() else {}
            file = path
            today = args.get("protocol") == "unimatch"
            label = run_label(results, args)
            if today:
                # each network's best evaluation, on a row of its own: "cutmix, teacher", "cutmix, student"
                nets = (("teacher", "best_miou"), ("student", "best_student_miou"))
                one = results.get("network") == "student"  # a run without a teacher (FixMatch, UniMatch)
                scores = {f"{label}, {net}": results.get(key) for net, key in nets[one:]}
            else:
                scores = {label: results["lesion_iou" if results["dataset"] == "isic2017" else "miou"]}
            arch = f"{results['arch']}, {TODAY}" if today else results["arch"]
            for row, score in scores.items():
                if score is not None:
                    key = (results["dataset"], arch, row, int(results["n_labeled"]))
                    cells.setdefault(key, []).append(float(score))
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            problem = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
            print(f"skipped {path.parent}: {file.name} cannot be read ({type(e).__name__}: {problem})",
                  file=sys.stderr)
    return cells


def paper_value(dataset, arch, label, n):
    if arch.endswith(TODAY):
        value = UNIMATCH_PUBLISHED.get((dataset, label), {}).get(n)
        return "—" if value is None else f"{value:.1f}"
    counts = PAPER_COUNTS.get(dataset, ())
    values = PAPER_RESULTS.get((dataset, arch, label))
    value = values[counts.index(n)] if values and n in counts else None
    if value is None:
        return "—"
    return f"{value[0]:.2f} ± {value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"


def summary(cells):
    """Markdown tables, one per (dataset, arch): method x labeled count, ours (mean ± std [runs]) / paper."""
    lines = []
    for dataset, arch in sorted({key[:2] for key in cells}):
        keys = [key for key in cells if key[:2] == (dataset, arch)]
        order = lambda m: (METHOD_ORDER.index(m.split(",")[0]) if m.split(",")[0] in METHOD_ORDER else 99, m)
        labels = sorted({k[2] for k in keys}, key=order)  # the rows
        counts = sorted({k[3] for k in keys})  # the columns
        if arch.endswith(TODAY):
            metric = "best mIoU of the network named"
        elif dataset == "isic2017":
            metric = "lesion IoU"
        else:
            metric = "mIoU"
        published = "UniMatch's table" if arch.endswith(TODAY) else "paper"
        lines += [f"{dataset}, {arch}: {metric} (%), ours mean ± std [runs] / {published}", "",
                  "| method | " + " | ".join(map(str, counts)) + " |", "|---" * (len(counts) + 1) + "|"]
        for label in labels:
            row = []
            for n in counts:
                v = cells.get((dataset, arch, label, n), [])
                spread = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
                ours = "—" if not v else f"{np.mean(v):.2f}" + spread
                row.append(f"{ours} [{len(v)}] / {paper_value(dataset, arch, label, n)}")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "no finished runs (results.json) found"


def seed_value(text):
    """A --seeds value: an integer in [0, 2**32), as the scripts' --seed and --split-seed."""
    with contextlib.suppress(ValueError):
        if 0 <= int(text) < 2**32:
            return int(text)
    raise argparse.ArgumentTypeError(f"a seed is an integer in [0, 2**32), got {text!r}")


def script_args(script):
    """The Args dataclass of a train_*.py, imported without running it (its main() waits for __main__); None
    for any other script."""
    spec = importlib.util.spec_from_file_location(f"seeds_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args_class = getattr(module, "Args", None)
    return args_class if isinstance(args_class, type) and issubclass(args_class, common.TrainArgs) else None


def run_seeds(argv):
    """python -m tools seeds SCRIPT [--seeds S ...] [--runs RUNS] [--dry-run] -- SCRIPT'S OPTIONS

    Runs SCRIPT once per seed into RUNS/, each in the folder the script itself would name (common.run_folder,
    e.g. train_cutmix_cityscapes_372_s1_ss23456): finished runs are skipped,
    unfinished ones resumed. The seed goes to --split-seed (a new labeled subset, as the paper's Cityscapes
    and ISIC runs) or, when a list fixes the subset (a --split-file; today's protocol), to --seed. Then prints
    the summary."""
    import shlex
    import subprocess
    parser = argparse.ArgumentParser(prog="python -m tools seeds",
                                     description=" ".join(run_seeds.__doc__.split("\n\n")[1].split()))
    parser.add_argument("script", help="train_*.py")
    parser.add_argument("--seeds", type=seed_value, nargs="+", default=[12345, 23456, 34567, 45678, 56789],
                        help="default: the original's Cityscapes split seeds")
    parser.add_argument("--runs", default="runs", help="folder of the run folders")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    repeated = sorted({seed for seed in opts.seeds if opts.seeds.count(seed) > 1})
    if repeated:
        raise common.UserError(f"seeds: --seeds names {' '.join(map(str, repeated))} more than once; "
                               "each seed is one run")
    if Path(opts.runs).exists() and not Path(opts.runs).is_dir():
        raise common.UserError(f"seeds: --runs {opts.runs} is a file, not a folder")
    for flag in ("--seed", "--split-seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise common.UserError(f"seeds: {flag} is set per seed by this tool; "
                                   f"leave it out of the script's options")
    script = Path(opts.script)
    if not script.is_file():  # else one beside the kit's scripts
        script = Path(__file__).resolve().parent.parent / opts.script
    if not script.is_file():
        raise common.UserError(f"seeds: no script {opts.script}")
    # The script's own options, parsed and resolved as the script does it, for every seed before any run
    # starts: a bad option stops the tool here, not once per seed
    args_class = script_args(script)
    if args_class is None:
        raise common.UserError(f"seeds: {opts.script} is no training script (train_*.py)")
    given = common.command_line(args_class, rest, prog=f"python -m tools seeds {opts.script} ... --")
    vary = "seed" if given.get("split_file") or given.get("protocol") == "unimatch" else "split-seed"
    named = [common.parse_args(args_class, [*rest, f"--{vary}", str(seed)]) for seed in opts.seeds]
    outs, failed = [], []
    for seed, args in zip(opts.seeds, named):  # each in the folder the script names
        out = Path(opts.runs) / common.run_folder(script, args).name
        outs.append(out)
        if (out / "results.json").is_file():
            print(f"finished: {out}")
            continue
        command = [sys.executable, str(script), *rest, f"--{vary}", str(seed), "--out", str(out)]
        if (out / "checkpoint.pt").is_file():  # a run stopped before its first checkpoint starts afresh
            command.append("--resume")
        print("$ " + shlex.join(command), flush=True)
        status = 0 if opts.dry_run else subprocess.call(command)
        if status:
            failed.append(f"{seed} (exit status {status}, {out})")
    print(summary(collect_results(out / "results.json" for out in outs if (out / "results.json").is_file())))
    if failed:  # each run's own error is above; this line lists them, and the command again resumes them
        print(f"failed seeds: {'; '.join(failed)}; their errors are above", file=sys.stderr)
    return 1 if failed else 0


def main(command, argv):
    if command == "seeds":  # python -m tools seeds train_cutmix.py --seeds 1 2 3 -- --dataset cityscapes ...
        return run_seeds(argv)
    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        sys.exit("usage: python -m tools summary [RUNS_DIR]  "
                 "(the finished runs below RUNS_DIR, default runs/)")
    runs = Path(argv[0] if argv else "runs")
    if not runs.is_dir():
        if runs.exists():
            why = "a file, not a folder of runs"
        else:
            why = "no such folder (give the folder holding the run folders)"
        raise common.UserError(f"summary: {runs} is {why}")
    print(summary(collect_results(sorted(runs.rglob("results.json")))))
