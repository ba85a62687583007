"""The README's cost table: `python -m tools costs [--datasets D ...] [--methods M ...] [--iters N]
[--nproc K] [-- OPTIONS]` runs every train_<method>.py --benchmark (common.Benchmark) and tabulates its
BENCHMARK records."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import common
from tools.paper import METHOD_ORDER


def cost_table(argv):
    """python -m tools costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] [-- OPTIONS]

    Runs `train_<method>.py --dataset D --benchmark N OPTIONS` for every pair (under torchrun when --nproc
    is above 1; synthetic data unless OPTIONS give --data-root) and prints the README's cost table."""
    parser = argparse.ArgumentParser(prog="python -m tools costs", description=" ".join(
        cost_table.__doc__.split("\n\n")[1].split()))
    parser.add_argument("--datasets", nargs="+", default=["cityscapes", "pascal_aug", "isic2017"],
                        choices=list(common.DATASETS))
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per cell")
    parser.add_argument("--nproc", type=int, default=1, help="processes per cell (torchrun)")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    here = Path(__file__).resolve().parent.parent
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.nproc}"]
    launch = [sys.executable] + (torchrun if opts.nproc > 1 else [])
    rows = ["| dataset | arch | method | batch, crop | device | ms/it | images/s | peak memory (GiB) "
            "| TFLOP/it | utilisation | eval (s) | min per run (training + evals) |",
            "|" + "---|" * 12]
    for dataset in opts.datasets:
        for method in opts.methods:
            command = [*launch, str(here / f"train_{method}.py"), "--dataset", dataset, "--benchmark",
                       str(opts.iters), *rest]
            print("$ " + " ".join(command), file=sys.stderr, flush=True)
            proc = subprocess.run(command, capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
            if proc.returncode != 0 or not found:
                why = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print("\n".join(proc.stderr.strip().splitlines()[-20:]), file=sys.stderr, flush=True)
                rows.append(f"| {dataset} | | {method} | failed: {why} |")
                continue
            r = json.loads(found[0][len("BENCHMARK "):])
            device = (r["device"] + (f" x{r['world_size']}" if r["world_size"] > 1 else "") + f", {r['amp']}"
                      + (f", compiled ({r['compile']})" if r["compile"] else ""))
            utilisation = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            cells = [dataset, r["arch"], method, "{}, {}x{}".format(r["batch_size"], *r["crop_size"]), device,
                     f"{r['ms_per_iter']:.0f}", f"{r['images_per_s']:.1f}", f"{r['peak_memory_gib']:.1f}",
                     f"{r['tflop_per_iter']:.3g}", utilisation, f"{r['eval_seconds']:.1f}",
                     f"{r['train_minutes']:.1f} + {r['run_minutes'] - r['train_minutes']:.1f}"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


def main(command, argv):
    return cost_table(argv)
