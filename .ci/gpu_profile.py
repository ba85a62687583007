"""Where a training step's GPU time goes: a script's --benchmark run with torch.profiler on ten steps.

    python .ci/gpu_profile.py train_cutmix.py --dataset cityscapes --benchmark 16

Prints the GPU kernel time per iteration, the kernels launched per iteration and the top kernels and
operators; compare the kernel time with the benchmark's ms/it (its timed steps include the profiler's
own overhead here, so take ms/it from an unprofiled run): a step much slower than its kernels is bound
by the host (Python, launches), where --compile or larger kernels help. Part of .ci/gpu_checks.
"""
import importlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

WAIT, WARMUP, ACTIVE = 6, 2, 10  # the FLOP-counted step and the benchmark's warm-up come first


def main():
    script, sys.argv = sys.argv[1], sys.argv[1:]
    module = importlib.import_module(Path(script).stem)
    args = common.parse_args(module.Args)
    if args.benchmark < WAIT + WARMUP + ACTIVE - 4:
        sys.exit(f"--benchmark {args.benchmark}: give at least {WAIT + WARMUP + ACTIVE - 4} so that "
                 f"{ACTIVE} steps are profiled")
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1))
    end_iteration = common.Run.end_iteration

    def stepping(self, it, **scalars):
        end_iteration(self, it, **scalars)
        prof.step()

    common.Run.end_iteration = stepping
    with prof:
        module.main(args)
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    host_keys = {e.key for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    # GPU rows that share a host row's name are annotations (ProfilerStep#, Optimizer.step#...), not kernels
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in host_keys]
    total_ms = sum(device_us(e) for e in kernels) / 1000 / ACTIVE
    launches = sum(e.count for e in kernels) / ACTIVE
    print(f"\nPROFILE {script}: {total_ms:.2f} ms of GPU kernels per iteration, {launches:.0f} kernels per "
          f"iteration ({ACTIVE} iterations profiled)")
    print("\ntop kernels by GPU time (per iteration):")
    for e in sorted(kernels, key=device_us, reverse=True)[:25]:
        print(f"  {device_us(e) / 1000 / ACTIVE:7.3f} ms  {e.count / ACTIVE:6.1f}x  {e.key[:110]}")
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.key.startswith("ProfilerStep")]
    print(f"host: {sum(e.self_cpu_time_total for e in ops) / 1000 / ACTIVE:.2f} ms of operator time per iteration "
          f"(self time, profiler overhead included)")
    print("\ntop operators by host time (per iteration):")
    for e in sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]:
        print(f"  {e.self_cpu_time_total / 1000 / ACTIVE:7.3f} ms  {e.count / ACTIVE:6.1f}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
