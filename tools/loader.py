"""How fast a method's training loader runs: `python -m tools loader --dataset D --data-root R [--protocol
unimatch] [--method M] [--workers N] [--batches K] [--reference] [TRAINING OPTIONS]`.

The method's own script, train_M.py, runs its main() up to its loop with a LoaderTimer in the place of its
Run: it loads the data as a run does (one-time preparation, such as the cache of today's full-size Cityscapes,
happens there and is not timed) and asks for its streams. Instead of training, each stream is timed alone,
then all of them drawn in turn as the loop draws them, each with its real DataLoader workers, after every
worker's first batch. Nothing is written. The last line:

    loader: X crops/s with N workers (Y ms per crop per worker)

X: crops (samples) per second of all streams together; N: workers per stream (--workers, the training
scripts' --num-workers); Y: a worker's time per crop, counting as many workers as run at once, at most one
per CPU core. TRAINING OPTIONS: any option of train_M.py, such as --n-labeled, --split-file, --crop-size,
--batch-size, --cache-dir, --no-cache. --reference: today's weak view from the whole image resized
(common.scale_crop_flip) and decoded on the fly, as UniMatch's loader makes it, for comparison.
"""
import argparse
import importlib
import os
import time
from pathlib import Path
from unittest import mock

import torch

import common

KIT = Path(__file__).resolve().parent.parent


class LoaderTimer(common.Run):
    """A training script's Run for `python -m tools loader`: the data loaded as a run loads it, the streams
    that the script asks for recorded, and timed when the script enters its loop, which runs no iteration."""

    def __init__(self, args, method, unlabeled=True, batches=10):
        self.args = args
        self.method = method
        self.unlabeled = unlabeled
        # one process: rank 0 of 1, the main one
        self.rank = 0
        self.world = 1
        self.main = True
        self.log_file = self.metrics_file = None
        self.batches = batches
        self.requests = []  # the streams' arguments, in the order the script asks for them
        self.record = None
        args.pretrained = False  # the networks are built but never run: no weights to read

    def start(self, data, device, student, teacher, optimizer, scaler, generator=None):
        self.data = data
        self.device = device
        self.start_iter = 0
        return 0

    def stream(self, split, indices, stream_id, with_label=True, dataset=None, per_iteration=1):
        self.requests.append(dict(split=split, indices=indices, stream_id=stream_id, with_label=with_label,
                                  dataset=dataset, per_iteration=per_iteration))
        return iter(())

    def iterations(self):
        self.record = self.time_streams()
        return iter(())

    def end_iteration(self, it, **scalars):
        pass

    def finish(self):
        return self.record

    def crops_per_second(self, requests):
        """Crops per second that the streams of `requests` deliver, drawn in turn (per_iteration batches
        each) as the loop draws them, with the run's DataLoader workers; each worker's first batch (its
        start-up) not timed."""
        loaders = [common.Run.stream(self, **request) for request in requests]
        first = max(self.args.num_workers, 1)
        for loader, request in zip(loaders, requests):
            for _ in range(first * request["per_iteration"]):
                next(loader)
        crops = 0
        started = time.perf_counter()
        for _ in range(self.batches):
            for loader, request in zip(loaders, requests):
                for _ in range(request["per_iteration"]):
                    crops += len(next(loader)[0])  # the first tensor: (B, C, H, W)
        return crops / (time.perf_counter() - started)  # the workers stop when the loaders are dropped

    def cpu_ms_per_crop(self, request):
        """CPU milliseconds per crop of one stream's dataset in this process, on one thread as a worker: its
        first batch. Unlike the rates, untouched by other programs that share the cores."""
        a = self.args
        dataset = request["dataset"] or common.TrainSet(request["split"], a.crop_size, a.aug,
                                                        request["with_label"])
        sampler = common.StreamSampler(request["indices"], a.batch_size, a.seed, request["stream_id"])
        keys = next(iter(sampler))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        dataset[keys[0]]  # first-time costs (lazy imports, caches) not counted
        started = time.process_time()
        for key in keys:
            dataset[key]
        torch.set_num_threads(threads)
        return 1000 * (time.process_time() - started) / len(keys)

    def time_streams(self):
        """Prints each stream's crops/s alone, then all streams' together and the last line; returns them."""
        a = self.args
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        view = a.aug.get("weak_view")
        path = "the whole image resized (reference)" if view == "reference" else "the crop's rows"
        print(f"{self.method}, {a.dataset}, {a.protocol} protocol, crop {a.crop_size[0]}x{a.crop_size[1]}, "
              f"batch {a.batch_size}, workers per stream: {a.num_workers}, CPU cores: {cores}"
              + (f"; weak view from {path}" if view else ""), flush=True)

        def ms_per_crop(rate, processes):  # workers in the main process (0): one
            return 1000 * (min(processes, cores) if a.num_workers else 1) / rate
        alone = {}
        for request in self.requests:
            kind = type(request["dataset"]).__name__ if request["dataset"] is not None else (
                "labeled" if request["with_label"] else "unlabeled")
            rate = alone[request["stream_id"]] = self.crops_per_second([request])
            print(f"stream {request['stream_id']} ({kind}, {len(request['indices'])} images): {rate:.1f} "
                  f"crops/s alone ({ms_per_crop(rate, a.num_workers):.1f} ms per crop per worker; "
                  f"{self.cpu_ms_per_crop(request):.1f} ms of CPU per crop)", flush=True)
        rate = self.crops_per_second(self.requests)
        per_iteration = sum(a.batch_size * request["per_iteration"] for request in self.requests)
        processes = a.num_workers * len(self.requests)
        print(f"all {len(self.requests)} streams in turn ({processes} worker processes): {per_iteration} "
              f"crops an iteration, enough for {rate / per_iteration:.2f} iterations/s", flush=True)
        print(f"loader: {rate:.1f} crops/s with {a.num_workers} workers ({ms_per_crop(rate, processes):.1f} "
              f"ms per crop per worker)", flush=True)
        return dict(streams=alone, crops_per_s=rate, ms_per_crop_per_worker=ms_per_crop(rate, processes),
                    workers=a.num_workers, cores=cores, crops_per_iteration=per_iteration)


def main(command, argv):
    """python -m tools loader [--method M] [--workers N] [--batches K] [--reference] TRAINING OPTIONS"""
    methods = sorted(p.stem.removeprefix("train_") for p in KIT.glob("train_*.py"))
    parser = argparse.ArgumentParser(
        prog="python -m tools loader", description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Any option of the method's train_M.py is taken too: --dataset, --data-root, --protocol, "
               "--n-labeled, --split-file, --crop-size, --batch-size, --cache-dir, --no-cache, ...")
    parser.add_argument("--method", default="cutmix", choices=methods, help="whose loader: train_M.py's")
    parser.add_argument("--workers", type=int, help="DataLoader workers per stream (default: the training's)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per stream (default: 10)")
    parser.add_argument("--reference", action="store_true",
                        help="the weak view from the whole image resized, decoded on the fly (as UniMatch)")
    opts, rest = parser.parse_known_args(argv)
    if opts.batches < 1 or (opts.workers is not None and opts.workers < 0):
        raise common.UserError(f"--batches must be at least 1 and --workers 0 or more, got {opts.batches} "
                               f"and {opts.workers}")
    script = importlib.import_module(f"train_{opts.method}")
    workers = [] if opts.workers is None else ["--num-workers", str(opts.workers)]
    args = common.parse_args(script.Args, rest + workers)
    args.device = "cpu"  # the networks are built, never run
    if opts.reference:
        if not args.aug.get("weak_view"):
            raise common.UserError("--reference times today's weak view: give --protocol unimatch")
        args.aug = dict(args.aug, weak_view="reference")
        args.no_cache = True  # UniMatch decodes every image on the fly
    timers = []

    def make_timer(run_args, method, unlabeled=True):
        timers.append(LoaderTimer(run_args, method, unlabeled, opts.batches))
        return timers[-1]
    # the script's own main(): its data and its streams, as a run of it asks for them
    with mock.patch.object(common, "make_run", make_timer):
        script.main(args)
    if not timers or timers[0].record is None:
        raise common.UserError(f"train_{opts.method}.py did not reach its training loop")
    return 0
