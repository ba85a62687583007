"""The clock of a run (Timer) and what --benchmark reports (common.Benchmark times the loop): the device's
peak FLOP rate, random data of each dataset's shapes, and the record and summary it prints.
`python -m tools costs` turns records into a table."""
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

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


def synthetic_splits(dataset, num_classes=None, full=False):
    """([(names, load, sizes) of the training images, the same of the validation images], class count): random
    images and labels of the dataset's shapes (full: Cityscapes at full size, as today's protocol trains on
    it), generated per sample (seeded by its index)."""
    size, n_train, n_val, classes = SYNTHETIC[dataset]
    size = (1024, 2048) if full and dataset == "cityscapes" else size
    num_classes = num_classes or classes

    def load(i):
        rng = np.random.default_rng(i)
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        label = rng.integers(0, num_classes, size, dtype=np.uint8)
        return image, label

    return [([f"synthetic_{i}" for i in range(n)], load, [size] * n) for n in (n_train, n_val)], num_classes


def record(bench, eval_seconds):
    """The measurements of a finished Benchmark as one JSON-ready dict."""
    args, device = bench.args, bench.device
    s = bench.seconds_per_iter
    images = bench.images_per_iter
    if device.type == "cuda":  # reserved: the allocator's peak, CUDA graphs' private pools included
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
        memory_kind = "peak GPU memory"
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30
    else:
        import resource  # Unix only
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        memory_kind = "peak RSS"
        reserved = None
    peak = peak_tflops(device, args.amp)
    achieved = bench.flops / s / 1e12
    evals = math.ceil(args.iters / args.eval_every)  # the teacher's; the student's at the end, or every time
    evals = 2 * evals if args.student_every_eval else evals + 1
    return dict(script=Path(sys.argv[0]).name, method=bench.method, dataset=args.dataset, arch=args.arch,
                device=device_name(device), amp=args.amp, compile=args.compile_mode if args.compile else None,
                world_size=bench.world, batch_size=args.batch_size, crop_size=list(args.crop_size),
                data="real" if bench.real_data else "synthetic", ms_per_iter=1000 * s, iters_per_s=1 / s,
                images_per_s=images / s, images_per_iter=images,
                peak_memory_gib=memory, memory_kind=memory_kind, peak_reserved_gib=reserved,
                warmup_seconds=bench.warmup_seconds, tflop_per_iter=bench.flops / 1e12,
                tflops=achieved, peak_tflops=peak, mfu=achieved / peak if peak else None,
                eval_seconds=eval_seconds, iters=args.iters, evaluations=evals,
                train_minutes=args.iters * s / 60,
                run_minutes=(args.iters * s + evals * eval_seconds) / 60, loader_images_per_s=bench.loading,
                num_workers=args.num_workers)


def report(r, n_val):
    """The summary lines of a record `r` (n_val: validation images)."""
    precision = r["amp"] if r["amp"] != "off" else "TF32"
    if r["peak_tflops"]:
        utilisation = f"{100 * r['mfu']:.1f}% of the {r['peak_tflops']:g} TFLOP/s {precision} peak"
    else:
        utilisation = "peak unknown for this device"
    h, w = r["crop_size"]
    images = r["images_per_iter"]
    s = r["ms_per_iter"] / 1000  # seconds per iteration
    compiled = f", compiled ({r['compile']})" if r["compile"] else ""
    processes = f", {r['world_size']} processes" if r["world_size"] > 1 else ""
    reserved = f" (reserved {r['peak_reserved_gib']:.2f} GiB)" if r["peak_reserved_gib"] is not None else ""
    warmup = f"; warm-up with compilation {r['warmup_seconds']:.0f} s" if r["compile"] else ""
    lines = [f"benchmark: {r['script']} | {r['dataset']}, {r['arch']}, batch {r['batch_size']} at {h}x{w} "
             f"({r['data']} data) | {r['device']}, amp {r['amp']}{compiled}{processes}",
             f"  train step: {1000 * s:.1f} ms/it, {1 / s:.2f} it/s, {images / s:.1f} images/s ({images} per "
             f"iteration), {r['memory_kind']} {r['peak_memory_gib']:.2f} GiB{reserved}{warmup}",
             f"  FLOPs: {r['tflop_per_iter']:.3f} TFLOP/it -> {r['tflops']:.2f} TFLOP/s, {utilisation}",
             f"  evaluation: {r['eval_seconds']:.1f} s per pass over the {n_val} validation images",
             f"  {r['iters']} iterations: {r['train_minutes']:.1f} min of training, "
             f"{r['run_minutes']:.1f} min with {r['evaluations']} evaluations"]
    if r["loader_images_per_s"] is not None:
        bound = "loading" if r["loader_images_per_s"] < images / s else "compute"
        lines.append(f"  loader: {r['loader_images_per_s']:.1f} images/s with {r['num_workers']} workers "
                     f"per process, the step needs {images / s:.1f}: {bound} bounds the run")
    return lines


class Timer:
    """Seconds per training iteration, each evaluation and each start's first `warmup` iterations left out
    (allocation, autotuning, compilation), and the run's wall seconds; its state goes into the checkpoint."""

    def __init__(self, device, state=None, warmup=5):
        self.device = device
        self.warmup = warmup  # iterations still to leave out
        self.pending = 0  # iterations since the last pause
        fresh = dict(iters=0, seconds=0.0, warm_iters=0, warm_seconds=0.0, wall=0.0)
        self.state = dict(fresh, **(state or {}))
        self.started = self.mark = time.perf_counter()

    def sync(self):
        if self.device.type == "cuda":  # the GPU's queue drained: its work is done when the clock is read
            torch.cuda.synchronize(self.device)

    def tick(self):
        """One iteration done (its kernels may still run)."""
        self.pending += 1
        if self.warmup:
            self.warmup -= 1
            if not self.warmup:  # the warm-up's iterations counted apart
                self.pause(warm=True)
                self.go()

    def rate(self):
        """Seconds per iteration since the last evaluation, for the log line."""
        return (time.perf_counter() - self.mark) / max(self.pending, 1)

    def pause(self, warm=False):
        """Before an evaluation: the iterations since the last one join the total (the warm-up's apart)."""
        self.sync()
        prefix = "warm_" if warm or self.warmup else ""
        self.state[prefix + "seconds"] += time.perf_counter() - self.mark
        self.state[prefix + "iters"] += self.pending
        self.pending = 0

    def per_iteration(self):
        """Mean seconds of an iteration, the warm-up left out; over the warm-up's iterations for a run too
        short to leave any out."""
        s = self.state
        return s["seconds"] / s["iters"] if s["iters"] else s["warm_seconds"] / max(s["warm_iters"], 1)

    def go(self):
        self.mark = time.perf_counter()

    def saved(self):
        """The state to checkpoint: the wall seconds until now included."""
        return dict(self.state, wall=self.state["wall"] + time.perf_counter() - self.started)
