"""--benchmark N of every train_*.py, and the README's cost table (`python common.py costs`).

The benchmark is the script's own loop, unchanged: common.make_run hands the script a Benchmark instead
of a Run, with the same methods. It runs the loop on two cached batches per stream, so that it times the
training step: one iteration under torch's FLOP counter, a few warm-up iterations, N timed ones. Then
the evaluation speed and, on real data, the loader's throughput; one summary, no files.
"""
import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

# Dense peak TFLOP/s of one GPU from the vendors' data sheets: (name contains, bf16/fp16, TF32), the first
# match wins. fp32 runs count against TF32 (enabled on CUDA here). Add your card to get its utilisation.
PEAK_TFLOPS = [("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 495), ("H200", 989, 495),
               ("A100", 312, 156), ("L40S", 362, 183), ("L4", 121, 60), ("A10", 125, 62.5)]
# Without --data-root: random images of each dataset's size (Cityscapes at the half size the protocol
# trains on, Pascal at its largest), as many as the real sets hold: (H, W), train, val, classes.
SYNTHETIC = {"cityscapes": ((512, 1024), 2975, 500, 19), "pascal_aug": ((375, 500), 10582, 1449, 21),
             "isic2017": ((248, 248), 2000, 150, 2), "folder": ((512, 512), 1000, 100, 21)}


def device_name(device):
    """The GPU's name, or the CPU's architecture and thread count. Not platform.processor(): it forks
    `uname -p`, and under torchrun a fork beside gloo's threads made processes abort at exit."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device, amp):
    """The device's dense peak for the run's precision, or None when unknown (every CPU)."""
    name = device_name(device)
    for key, half, tf32 in PEAK_TFLOPS if device.type == "cuda" else []:
        if key in name:
            return half if amp in ("bf16", "fp16") else tf32
    return None


def synthetic_data(args):
    """Random images and labels of the dataset's shapes, generated per sample (seeded by its index)."""
    size, n_train, n_val, num_classes = SYNTHETIC[args.dataset]
    num_classes = args.num_classes or num_classes

    def load(i):
        rng = np.random.default_rng(i)
        return rng.integers(0, 256, (*size, 3), dtype=np.uint8), rng.integers(0, num_classes, size, dtype=np.uint8)

    split = lambda n: common.Split([f"synthetic_{i}" for i in range(n)], load, [size] * n)  # noqa: E731
    train = split(n_train)
    return common.Data(train, split(n_val), num_classes, [f"class_{c}" for c in range(num_classes)],
                       common.choose_labeled(train.names, args.n_labeled, args.split_seed), train)


class Benchmark(common.Run):
    """A Run that times the loop instead of training: same methods, no folder, no files."""

    def __init__(self, args, method, unlabeled=True):
        self.args, self.method, self.unlabeled = args, method, unlabeled
        self.rank, self.world = common.process_group()
        self.main, self.images, self.log_file, self.metrics_file = self.rank == 0, 0, None, None
        self.real_data = args.dataset == "demo" or args.data_root is not None

    def load_data(self):
        if self.real_data:
            return super().load_data()
        self.args.crop_size = self.args.crop_size or common.default_crop([SYNTHETIC[self.args.dataset][0]])
        return synthetic_data(self.args)

    def start(self, data, device, **tracked):
        self.data, self.device, self.tracked, self.start_iter = data, device, tracked, 0
        self.print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(self.args).items())))
        return 0

    def stream(self, split, indices, stream_id, with_label=True, dataset=None, per_iteration=1):
        """Two batches of the real stream, cycled: the benchmark times the training step, not the loader."""
        return self.cycle(list(itertools.islice(super().stream(split, indices, stream_id, with_label, dataset), 2)))

    def cycle(self, batches):
        for i in itertools.count():
            self.images += len(batches[i % 2][0])
            yield batches[i % 2]

    def iterations(self):
        from torch.utils.flop_counter import FlopCounterMode
        args = self.args
        self.loading = self.loader_throughput() if self.real_data else None
        counter = FlopCounterMode(display=False)
        with counter:  # FLOPs of one iteration (forward and backward passes), counted once
            yield 0
        self.flops = counter.get_total_flops() * self.world  # all processes
        if args.compile:
            self.compile()
        warmup, started = (3 if self.device.type == "cuda" else 1) + (3 if args.compile else 0), time.perf_counter()
        yield from range(1, 1 + warmup)  # allocation, cudnn autotuning, compilation: not timed
        self.sync()
        self.warmup_seconds = time.perf_counter() - started
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started, images = time.perf_counter(), self.images
        yield from range(1 + warmup, 1 + warmup + args.benchmark)
        self.sync()
        self.seconds_per_iter = (time.perf_counter() - started) / args.benchmark
        self.images_per_iter = (self.images - images) // args.benchmark * self.world  # all processes

    def end_iteration(self, it, **scalars):
        pass

    def loader_throughput(self):
        """Images/s that the real training loader delivers (reading, augmentation, collation) with
        --num-workers workers, summed over the processes."""
        a = self.args
        batches = common.train_loader(common.TrainSet(self.data.train, a.crop_size, a.aug),
                                      np.arange(len(self.data.train)), a.batch_size, a.seed, 99, 0, a.num_workers)
        next(batches)  # worker start-up is not counted
        n, started = max(10, 4 * a.num_workers), time.perf_counter()
        for _ in range(n):
            next(batches)
        del batches
        return n * a.batch_size / (time.perf_counter() - started)

    def eval_seconds(self):
        """Seconds to evaluate the whole validation set once (timed on a few batches)."""
        a, val = self.args, self.data.val
        n = min(len(val), a.batch_size * (4 if self.device.type == "cuda" else 1) * self.world)
        subset = common.val_loader(common.Split(val.names[:n], val.load, val.sizes[:n]), a.batch_size,
                                   a.num_workers)
        score = lambda: common.evaluate(self.tracked["teacher"], subset, self.device,  # noqa: E731
                                        self.data.num_classes, a.amp, a.lesion_scoring)
        if self.device.type == "cuda":
            score()  # cudnn autotuning for the new shapes
        self.sync()
        started = time.perf_counter()
        score()
        self.sync()
        return (time.perf_counter() - started) / n * len(val)

    def finish(self):
        """Prints the numbers and one `BENCHMARK {json}` line; returns the record."""
        args, device, s = self.args, self.device, self.seconds_per_iter
        images = self.images_per_iter
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None
        if device.type == "cuda":  # reserved: the allocator's peak, CUDA graphs' private pools included
            memory, memory_kind = torch.cuda.max_memory_allocated(device) / 2 ** 30, "peak GPU memory"
        else:
            import resource
            memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "peak RSS"
        peak = peak_tflops(device, args.amp)
        achieved = self.flops / s / 1e12
        eval_s = self.eval_seconds()
        evals = math.ceil(args.iters / args.eval_every) + 1  # the teacher's, and the student's at the end
        record = dict(script=Path(sys.argv[0]).name, method=self.method, dataset=args.dataset,
                      arch=args.arch, device=device_name(device), amp=args.amp,
                      compile=args.compile_mode if args.compile else None,
                      world_size=self.world, batch_size=args.batch_size, crop_size=list(args.crop_size),
                      data="real" if self.real_data else "synthetic", ms_per_iter=1000 * s, iters_per_s=1 / s,
                      images_per_s=images / s, peak_memory_gib=memory, memory_kind=memory_kind,
                      peak_reserved_gib=reserved, warmup_seconds=self.warmup_seconds,
                      tflop_per_iter=self.flops / 1e12, tflops=achieved, peak_tflops=peak,
                      mfu=achieved / peak if peak else None, eval_seconds=eval_s, iters=args.iters,
                      train_minutes=args.iters * s / 60, run_minutes=(args.iters * s + evals * eval_s) / 60,
                      loader_images_per_s=self.loading)
        if self.main:
            precision = args.amp if args.amp != "off" else "TF32"
            utilisation = (f"{100 * record['mfu']:.1f}% of the {peak:g} TFLOP/s {precision} peak" if peak
                           else "peak unknown for this device")
            lines = [f"benchmark: {record['script']} | {args.dataset}, {args.arch}, batch {args.batch_size} at "
                     f"{args.crop_size[0]}x{args.crop_size[1]} ({record['data']} data) | {record['device']}, "
                     f"amp {args.amp}{f', compiled ({args.compile_mode})' if args.compile else ''}"
                     f"{f', {self.world} processes' if self.world > 1 else ''}",
                     f"  train step: {1000 * s:.1f} ms/it, {1 / s:.2f} it/s, {images / s:.1f} images/s "
                     f"({images} per iteration), {memory_kind} {memory:.2f} GiB"
                     + (f" (reserved {reserved:.2f} GiB)" if reserved is not None else "")
                     + (f"; warm-up with compilation {self.warmup_seconds:.0f} s" if args.compile else ""),
                     f"  FLOPs: {record['tflop_per_iter']:.3f} TFLOP/it -> {achieved:.2f} TFLOP/s, {utilisation}",
                     f"  evaluation: {eval_s:.1f} s per pass over the {len(self.data.val)} validation images",
                     f"  {args.iters} iterations: {record['train_minutes']:.1f} min of training, "
                     f"{record['run_minutes']:.1f} min with {evals} evaluations"]
            if self.loading is not None:
                bound = "loading" if self.loading < images / s else "compute"
                lines.append(f"  loader: {self.loading:.1f} images/s with {args.num_workers} workers per process, "
                             f"the step needs {images / s:.1f}: {bound} bounds the run")
            for line in lines:
                print(line)
            print("BENCHMARK " + json.dumps(record), flush=True)
        common.leave_process_group()
        return record


def cost_table(argv):
    """python common.py costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] [-- OPTIONS]

    Runs `train_<method>.py --dataset D --benchmark N OPTIONS` for every pair (under torchrun when --nproc
    is above 1; synthetic data unless OPTIONS give --data-root) and prints the README's cost table."""
    from tools.paper import METHOD_ORDER
    parser = argparse.ArgumentParser(prog="python common.py costs", description=" ".join(
        cost_table.__doc__.split("\n\n")[1].split()))
    parser.add_argument("--datasets", nargs="+", default=["cityscapes", "pascal_aug", "isic2017"],
                        choices=list(common.DATASETS))
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per cell")
    parser.add_argument("--nproc", type=int, default=1, help="processes per cell (torchrun)")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    here = Path(__file__).resolve().parent.parent
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.nproc}"]
                                 if opts.nproc > 1 else [])
    rows = ["| dataset | arch | method | batch, crop | device | ms/it | images/s | peak memory (GiB) | TFLOP/it | "
            "utilisation | eval (s) | min per run (training + evals) |", "|" + "---|" * 12]
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
            cells = [dataset, r["arch"], method, "{}, {}x{}".format(r["batch_size"], *r["crop_size"]), device,
                     f"{r['ms_per_iter']:.0f}", f"{r['images_per_s']:.1f}", f"{r['peak_memory_gib']:.1f}",
                     f"{r['tflop_per_iter']:.3g}", f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
                     f"{r['eval_seconds']:.1f}", f"{r['train_minutes']:.1f} + {r['run_minutes'] - r['train_minutes']:.1f}"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


def main(command, argv):
    return cost_table(argv)
