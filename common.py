"""Everything the paper takes for granted, shared by every train_*.py script.

The training scripts hold the method (the mean-teacher loop and its perturbation); this module holds
the plumbing around it, in this order:

    1. Errors and command line   UserError, TrainArgs, parse_args (protocol: dataset -> arch -> method -> CLI)
    2. Reproducibility, devices  seed_everything, deterministic mode, device and autocast; torchrun processes:
                                 local_rows, all_reduce_grads, GlobalBatchNorm / SyncBatchNorm
    3. Data                      demo, folder, Cityscapes, Pascal aug, ISIC, synthetic (--benchmark) datasets,
                                 splits, augmentation, infinite sample streams
    4. Networks                  deeplabv2 (ResNet-101, as Hung et al. / the original), deeplabv3plus,
                                 denseunet161, pspnet101 (paper Table 4), unet_small; forward_each
    5. Mean teacher              make_teacher, ema_update, optimizer with the original's parameter groups
    6. Metrics                   confusion matrix, per-class IoU, mIoU, evaluation loop
    7. Run plumbing              output folder, log, metrics.jsonl, checkpoints (atomic), results, preview;
                                 Benchmark (--benchmark: speed, FLOPs, utilisation, memory, loading)
    8. Paper tables              PAPER_RESULTS; `python common.py seeds | summary | costs | sbd-to-aug`

Images travel from the loaders as uint8 and are normalised on the device (`to_device`), so padding and
out-of-image pixels become exactly 0 (the mean colour), as in the original's alpha-channel trick.
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:
    import fcntl  # Unix: serialises concurrent preparations of one dataset cache
except ImportError:  # Windows: one run at a time prepares
    fcntl = None

IGNORE = 255  # label value of void / padding pixels, never scored, never trained on
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------
# 1. Errors and command line
# ---------------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input (a path, a file, an option): reported as one clear line, never as a traceback."""


def _excepthook(kind, value, tb):
    if issubclass(kind, UserError):
        sys.stderr.write(f"error: {value}\n")
    elif issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
    else:
        sys.__excepthook__(kind, value, tb)


def arg(default=None, help="", **kw):
    """A dataclass field that becomes a command-line option (kebab-case) with this help text."""
    return field(default=default, metadata=dict(help=help, **kw))


# Dataset protocols: the paper's per-dataset settings (REFERENCE §10.1). `None` means "not applicable".
# aug: hflip, vflip, transpose (hvflip), hung_scale (0.5..1.5 in steps of 0.1), rot (degrees), max_scale.
DATASETS = {
    "demo": dict(arch="unet_small", n_labeled=60, crop_size=None, batch_size=8, iters=1500, eval_every=500,
                 aug=dict(hflip=True), optimizer="adam", lr_schedule="none",
                 num_workers=0),
    "folder": dict(arch="deeplabv2", n_labeled=-1, crop_size=None, batch_size=10, iters=40000,
                   eval_every=1000, aug=dict(hflip=True), optimizer="adam", lr_schedule="none"),
    # 1024x512 images, 256x512 crops, h-flip, Adam (REFERENCE §6.3); split seeds 12345, 23456, ..., 56789
    "cityscapes": dict(arch="deeplabv2", n_labeled=372, crop_size=(256, 512), batch_size=4, iters=40000,
                       eval_every=1000, aug=dict(hflip=True), optimizer="adam", lr_schedule="none"),
    # 321x321 crops of images rescaled by 0.5..1.5, h-flip, Adam (§6.2); 106 = 1/100 of train_aug
    "pascal_aug": dict(arch="deeplabv2", n_labeled=106, crop_size=(321, 321), batch_size=10, iters=40000,
                       eval_every=1000, aug=dict(hflip=True, hung_scale=True), optimizer="adam",
                       lr_schedule="none"),
    # 224x224 rotated (±45°) and scaled (1/1.1..1.1) crops of 248x248 images, all flips; SGD + poly, the
    # predicted lesion hole-filled before scoring (§6.4, §10.1). The original script's lr 0.1 (the paper
    # says 0.05) belongs to the DenseUNet, hence per-arch learning rates: they win over ARCHS' Adam ones.
    # Nesterov stays off, as in the original's mask program (CutMix, Cutout); methods that the original
    # ran with its other programs (baseline, std-aug, ICT, VAT) turn it on in their method_protocol (G8).
    "isic2017": dict(arch="denseunet161", n_labeled=50, crop_size=(224, 224), batch_size=10, iters=40000,
                     eval_every=400, aug=dict(hflip=True, vflip=True, transpose=True, rot=45.0, max_scale=1.1),
                     optimizer="sgd", lr_schedule="poly", momentum=0.9, weight_decay=5e-4, fill_holes=True,
                     arch_overrides=dict(denseunet161=dict(lr=0.1, freeze_bn=False),  # the paper's
                                         deeplabv2=dict(lr=2.5e-4),      # DeepLab v2's usual SGD rate
                                         unet_small=dict(lr=0.1))),
}
# Architecture protocols (REFERENCE §5): head learning rate, the backbone's share of it, BatchNorm.
ARCHS = {
    # Adam 3e-5 on the ASPP head, 3e-6 on the ImageNet backbone; every BN frozen (--freeze_bn).
    "deeplabv2": dict(lr=3e-5, backbone_lr_mult=0.1, freeze_bn=True),
    # From scratch: one parameter group, all BatchNorm trains (as the original's ISIC DenseUNet).
    "unet_small": dict(lr=1e-3, backbone_lr_mult=1.0, freeze_bn=False),
    # Paper Table 5 (Pascal, Adam). freeze_bn freezes only the pretrained backbone's BN (the net's
    # frozen_bn_modules); the heads' BN trains. The original's Pascal scripts all pass --freeze_bn.
    # DeepLab v3+: the original's wrapper had no pretraining tag, so every parameter runs at 1e-5 (G8).
    "deeplabv3plus": dict(lr=1e-5, backbone_lr_mult=1.0, freeze_bn=True),
    "denseunet161": dict(lr=3e-4, backbone_lr_mult=0.1, freeze_bn=True),  # ISIC: SGD 0.1, no BN frozen
    "pspnet101": dict(lr=1e-4, backbone_lr_mult=0.1, freeze_bn=True),
}
# Optimizer settings shared by every protocol unless a dataset says otherwise (REFERENCE §1.3).
OPTIMIZER_DEFAULTS = dict(momentum=0.9, weight_decay=0.0, nesterov=False, poly_power=0.9)


@dataclass
class TrainArgs:
    """Options shared by every train_*.py, in the same order everywhere. None = from the protocol."""
    dataset: str = arg("demo", "dataset: demo (built in), folder (ROOT/{train,val}/{images,masks}), cityscapes, "
                               "pascal_aug, isic2017 (their official downloads, README 'Datasets')",
                       choices=list(DATASETS))
    data_root: str = arg(None, "folder holding the dataset (required for every dataset but demo)")
    n_labeled: int = arg(None, "labeled training images; -1 = all (default: the dataset's)")
    split_seed: int = arg(12345, "seed of the labeled subset, independent of --seed")
    split_file: str = arg(None, "labeled images: a text file naming one per line (or labeled.txt's 'image mask' "
                                "lines), or the original's .pkl index permutation (first --n-labeled used)")
    arch: str = arg(None, "network (default: the dataset's)", choices=list(ARCHS))
    no_pretrained: bool = arg(False, "random initialisation instead of ImageNet weights")
    iters: int = arg(None, "training iterations (default: the dataset's)")
    batch_size: int = arg(None, "images per labeled batch and per unlabeled batch (default: the dataset's)")
    lr: float = arg(None, "learning rate of the head; a pretrained backbone gets 1/10, except DeepLab v3+'s "
                           "(default: the arch's)")
    crop_size: str = arg(None, "training crop, H,W or one number (default: the dataset's)")
    eval_every: int = arg(None, "evaluate and checkpoint every this many iterations (default: the dataset's)")
    seed: int = arg(1, "seed of initialisation, sample order, augmentation and masks")
    device: str = arg("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    out: str = arg(None, "run folder (default: runs/<script>_<dataset>_<n_labeled>_s<seed>)")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint")
    amp: str = arg(None, "autocast precision (default: bf16 on CUDA, off on CPU)", choices=["off", "bf16", "fp16"])
    deterministic: bool = arg(False, "deterministic kernels, no cudnn.benchmark (with --num-workers 0: "
                                     "bit-exact resume)")
    num_workers: int = arg(None, "DataLoader worker processes (default: the dataset's, else min(8, CPUs))")
    num_classes: int = arg(None, "class count for --dataset folder (default: from the masks)")
    teacher_alpha: float = arg(0.99, "EMA decay of the teacher, which is the evaluated network")
    dedupe_params: bool = arg(False, "deeplabv2: step each backbone weight once per iteration (the original "
                                     "stepped most of them 3-4 times, REFERENCE G3)")
    aspp_all_branches: bool = arg(False, "deeplabv2: sum all four ASPP branches (the original sums only the "
                                         "rate-6 and rate-12 ones, REFERENCE G4)")
    cache_dir: str = arg(None, "folder for prepared data (half-size Cityscapes, 248x248 ISIC, checks) (default: "
                               "beside the data when writable, else ~/.cache/cutmix-seg)")
    compile: bool = arg(False, "torch.compile student and teacher for training (pays off on long CUDA runs; "
                               "compiles for minutes; evaluation stays eager)")
    compile_mode: str = arg("reduce-overhead", "torch.compile mode with --compile: reduce-overhead replays each "
                                               "pass as a CUDA graph (none on the CPU); default if graphs misbehave",
                            choices=["reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs"])
    benchmark: int = arg(0, "measure instead of training: this many timed iterations on cached batches of the "
                            "protocol's shapes (real data when given, else synthetic); prints speed, memory, FLOP "
                            "utilisation and loading throughput, writes nothing")


def parse_dataclass(args_class, argv=None):
    """Command line -> args_class: one --kebab-case option per field (its default, help and choices);
    bad input ends as one line on stderr, never a traceback."""
    sys.excepthook = _excepthook
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help", ""))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata.get("help", ""))
    return args_class(**vars(parser.parse_args(argv)))


def parse_args(args_class, argv=None):
    """Command line -> resolved Args: dataset protocol, then arch, then method, then the command line."""
    return resolve_protocol(parse_dataclass(args_class, argv))


def resolve_protocol(args):
    """Fill every None field from the dataset, arch and method protocols (command line wins)."""
    chosen = {k: v for k, v in vars(args).items() if v is not None}
    proto = dict(OPTIMIZER_DEFAULTS)
    proto.update(DATASETS[args.dataset])
    arch = chosen.get("arch", proto["arch"])
    proto.update(ARCHS[arch])
    proto.update(proto.pop("arch_overrides", {}).get(arch, {}))  # a dataset's word on one arch (ISIC's SGD lr)
    proto.update(getattr(args, "method_protocol", lambda d: {})(args.dataset))
    proto.update(chosen)
    proto.setdefault("num_workers", min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    for key, value in proto.items():
        setattr(args, key, value)
    if args.no_pretrained:
        # nothing pretrained: one learning rate for all, and BatchNorm statistics learn from the data
        args.backbone_lr_mult, args.freeze_bn = 1.0, False
    if args.benchmark < 0:
        raise UserError(f"--benchmark expects a number of iterations, got {args.benchmark}")
    for name in ("iters", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_labeled == 0 or args.n_labeled < -1:
        raise UserError(f"--n-labeled must be a positive count or -1 (all), got {args.n_labeled}")
    if args.crop_size is not None:
        args.crop_size = parse_size(args.crop_size, "--crop-size")
    if args.amp is None:
        args.amp = "off"  # decided again in setup_device() once the device is known
        args.amp_auto = True
    if not 0.0 <= args.teacher_alpha <= 1.0:
        raise UserError(f"--teacher-alpha must lie in [0, 1], got {args.teacher_alpha}")
    return args


def parse_size(text, option):
    """'256,512' or '321' or (256, 512) -> (H, W)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    try:
        parts = [int(v) for v in str(text).replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"{option} expects H,W or one number (e.g. 256,512), got {text!r}")
    return tuple(parts)


# ---------------------------------------------------------------------------------------------------
# 2. Reproducibility
# ---------------------------------------------------------------------------------------------------
def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True


def rng_state():
    """Every global RNG's state, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                  cached), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name):
    """--device: auto (CUDA when present), cpu, cuda, cuda:N -> torch.device, or one clear error."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device expects auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def process_group():
    """(rank, world size): torchrun's RANK and WORLD_SIZE, or (0, 1) for a plain `python train_*.py`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_device(args):
    """Pick the device, the autocast dtype and the kernels' settings; returns torch.device.

    Under `torchrun --nproc_per_node N` every process takes the GPU of its LOCAL_RANK (gloo on the CPU)
    and --batch-size stays the global batch: each process trains on its 1/N share (`local_rows`)."""
    device = resolve_device(args.device)
    rank, world = process_group()
    args.world_size = world
    if world > 1:
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} is the global batch of all {world} processes: "
                            f"it must be divisible by {world}")
        if device.type == "cuda":
            if args.device not in ("auto", "cuda"):
                raise UserError(f"--device {args.device}: under torchrun each process takes the GPU of its "
                                f"LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.device = str(device)
    if getattr(args, "amp_auto", False):
        args.amp = "bf16" if device.type == "cuda" else "off"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed, args.deterministic)
    return device


def local_rows(t):
    """This process's rows of a tensor made for the global batch (all of them in a single process).

    Random draws (masks, probes, mixing weights) are made for the global batch on every process from one
    shared generator, so a run draws the same numbers however many processes share it."""
    rank, world = process_group()
    n = len(t) // world
    return t if world == 1 else t[rank * n:(rank + 1) * n]


def all_reduce_grads(net):
    """Average the gradients over the torchrun processes (nothing to do in a single process): one
    all-reduce of one flat buffer, after all of an iteration's backward passes."""
    world = process_group()[1]
    if world == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def all_reduce_sum(t):
    """Sum a tensor over the processes (in place) and return it."""
    if process_group()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


class AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of each process's input is the sum of all processes' gradients."""

    @staticmethod
    def forward(ctx, t):
        return all_reduce_sum(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.clone())


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across torchrun processes, on
    any device (torch's SyncBatchNorm, used on CUDA, needs a GPU). The all-reduce is differentiable, so the
    gradient also flows through the other processes' share of the statistics."""

    def forward(self, x):
        if not (self.training and process_group()[1] > 1):
            return super().forward(x)
        xf, C = x.float(), x.shape[1]
        stats = torch.cat([xf.sum((0, 2, 3)), xf.pow(2).sum((0, 2, 3)), xf.new_full((1,), xf.numel() / C)])
        stats = AllReduceSum.apply(stats)
        count = stats[-1]
        mean = stats[:C] / count
        var = (stats[C:2 * C] / count - mean.pow(2)).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(net, device):
    """Under torchrun, BatchNorm layers normalise with the global batch's statistics where they train
    (frozen ones stay in eval mode and never communicate)."""
    if str(device).startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in list(net.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.BatchNorm2d:
                sync = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
                sync.load_state_dict(child.state_dict())
                sync.train(child.training)
                for p, q in zip(sync.parameters(), child.parameters()):
                    p.requires_grad_(q.requires_grad)
                setattr(m, child_name, sync)
    return net


def autocast(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------
# 3. Data
# ---------------------------------------------------------------------------------------------------
# A split is a list of samples; `load(i)` returns (image uint8 HxWx3, label uint8 HxW or None).
class Split:
    def __init__(self, names, load, sizes):
        self.names, self.load, self.sizes = list(names), load, list(sizes)  # sizes: (H, W) per sample

    def __len__(self):
        return len(self.names)


@dataclass
class Data:
    train: Split
    val: Split
    num_classes: int
    class_names: list
    labeled: np.ndarray             # indices into train
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def load_dataset(args):
    """Build the dataset named by --dataset, choose the labeled subset, and fill the crop default."""
    builder = {"demo": demo_dataset, "folder": folder_dataset, "cityscapes": cityscapes_dataset,
               "pascal_aug": pascal_aug_dataset, "isic2017": isic2017_dataset}[args.dataset]
    if args.benchmark and args.data_root is None and args.dataset != "demo":
        builder = synthetic_dataset
    train, val, num_classes, class_names = builder(args)
    if args.crop_size is None:
        args.crop_size = default_crop(train.sizes)
    labeled = choose_labeled(train.names, args)
    return Data(train, val, num_classes, class_names, labeled)


# --benchmark without --data-root: random images of each dataset's size (Cityscapes at the half size the
# protocol trains on, Pascal at its largest), as many as the real sets hold: (H, W), train, val, classes.
SYNTHETIC = {"cityscapes": ((512, 1024), 2975, 500, 19), "pascal_aug": ((375, 500), 10582, 1449, 21),
             "isic2017": ((248, 248), 2000, 150, 2), "folder": ((512, 512), 1000, 100, 21)}


def synthetic_dataset(args):
    size, n_train, n_val, num_classes = SYNTHETIC[args.dataset]
    num_classes = args.num_classes or num_classes

    def load(i):
        rng = np.random.default_rng(i)
        return (rng.integers(0, 256, (*size, 3), dtype=np.uint8),
                rng.integers(0, num_classes, size, dtype=np.uint8))

    split = lambda n: Split([f"synthetic_{i}" for i in range(n)], load, [size] * n)  # noqa: E731
    return split(n_train), split(n_val), num_classes, [f"class_{c}" for c in range(num_classes)]


def default_crop(sizes):
    """The training images' own size when they all share one up to 512x512, else 321x321 (Pascal)."""
    shapes = set(map(tuple, sizes))
    if len(shapes) == 1:
        (h, w), = shapes
        if h <= 512 and w <= 512:
            return (h, w)
    return (321, 321)


def choose_labeled(names, args):
    """First --n-labeled of RandomState(split_seed).permutation over the sorted names, or of --split-file:
    names (one per line, or labeled.txt's "JPEGImages/x.jpg SegmentationClassAug/x.png" lines), or a .pkl
    index permutation of the training order (the original's data/splits/pascal_aug/split_0.pkl)."""
    n = len(names)
    if args.n_labeled > n:
        raise UserError(f"--n-labeled {args.n_labeled} is larger than the training set ({n} images)")
    if args.split_file:
        path = Path(args.split_file)
        if not path.is_file():
            raise UserError(f"--split-file {args.split_file}: no such file")
        if path.suffix == ".pkl":  # the original's order: the first n of a permutation of the training list
            return read_permutation(path, n)[:n if args.n_labeled == -1 else args.n_labeled]
        index = {name: i for i, name in enumerate(names)}
        index.update({Path(name).stem: i for i, name in enumerate(names)})
        chosen = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            name = line.strip().split()[0] if line.strip() else ""
            if not name:
                continue
            key = name if name in index else Path(name).stem
            if key not in index:
                raise UserError(f"--split-file {args.split_file}, line {line_no}: {name!r} is not a "
                                f"training image of this dataset")
            chosen.append(index[key])
        if args.n_labeled > len(chosen):
            raise UserError(f"--n-labeled {args.n_labeled} is larger than the {len(chosen)} names in "
                            f"--split-file {args.split_file}")
        return np.array(chosen[:args.n_labeled] if args.n_labeled != -1 else chosen, dtype=np.int64)
    order = np.arange(n) if args.n_labeled == -1 else np.random.RandomState(args.split_seed).permutation(n)
    return order[:n if args.n_labeled == -1 else args.n_labeled].astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles a numpy array and nothing else: a pickle naming any other global (os.system, ...) is
    refused before it can run, so a downloaded split file cannot execute code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}  # encode: protocol 2's bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a split file has no need of")
        return super().find_class(module, name)


def read_permutation(path, n):
    """The int array pickled in `path` (no arbitrary code runs); it must be a permutation of 0..n-1."""
    try:
        with open(path, "rb") as f:
            perm = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2 too
    except Exception as e:
        raise UserError(f"--split-file {path}: not a pickled numpy index array ({e})")
    if not (isinstance(perm, np.ndarray) and perm.ndim == 1 and perm.dtype.kind in "iu"
            and np.array_equal(np.sort(perm), np.arange(n))):
        raise UserError(f"--split-file {path}: expected a permutation of the {n} training images' indices "
                        f"(numpy int array of shape ({n},)), got {getattr(perm, 'shape', type(perm).__name__)}")
    return perm.astype(np.int64)


# ---- demo: built-in, deterministic, classes told apart by shape alone ------------------------------
DEMO_CLASSES = ["background", "disc", "square", "triangle", "cross"]


def demo_image(rng, size=48):
    """One demo image and its label map.

    Objects and background draw their colours from one distribution, so only shape tells the classes
    apart; smooth background texture, clutter strokes and noise make sure no low-density gap separates
    object pixels from background pixels (paper Sec. 3.1).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def texture(contrast):
        c1 = rng.uniform(0, 255, 3)
        c2 = np.clip(c1 + rng.normal(0, contrast, 3), 0, 255)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        wave = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        return c1 + (c2 - c1) * wave[..., None]

    image = texture(contrast=80)
    for _ in range(rng.integers(2, 5)):  # clutter: strokes in object-like colours
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6), 0, 1)
        dist = np.hypot(xx - x0 - t * (x1 - x0), yy - y0 - t * (y1 - y0))
        image = np.where((dist < rng.uniform(0.7, 1.6))[..., None], texture(contrast=30), image)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = rng.integers(1, len(DEMO_CLASSES))
        cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.13, 0.23) * size
        theta = rng.uniform(0, 2 * np.pi)
        u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
        v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
        if cls == 1:
            inside = u ** 2 + v ** 2 < r ** 2
        elif cls == 2:
            inside = np.maximum(np.abs(u), np.abs(v)) < r * 0.8
        elif cls == 3:  # equilateral triangle: three half-planes
            inside = np.ones_like(u, bool)
            for k in range(3):
                a = theta + k * 2 * np.pi / 3
                inside &= np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy) < r * 0.55
        else:
            inside = (np.minimum(np.abs(u), np.abs(v)) < r * 0.3) & (np.maximum(np.abs(u), np.abs(v)) < r)
        image = np.where(inside[..., None], texture(contrast=30), image)
        label[inside] = cls
    image = image + rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def demo_dataset(args, n_train=600, n_val=100, size=48):
    rng = np.random.default_rng(20200907)  # fixed: the demo is the same data on every machine
    samples = [demo_image(rng, size) for _ in range(n_train + n_val)]
    images = np.stack([s[0] for s in samples])
    labels = np.stack([s[1] for s in samples])

    def loader(offset):
        return lambda i: (images[offset + i], labels[offset + i])

    train = Split([f"demo_{i:04d}" for i in range(n_train)], loader(0), [(size, size)] * n_train)
    val = Split([f"demo_{i:04d}" for i in range(n_train, n_train + n_val)], loader(n_train), [(size, size)] * n_val)
    return train, val, len(DEMO_CLASSES), DEMO_CLASSES


# ---- folder: ROOT/{train,val}/{images,masks} --------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path):
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises many kinds; the user needs the file name and the reason
        raise UserError(f"cannot read image {path}: {e}")


def read_mask(path):
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"mask {path} must be a single-channel PNG of class indices "
                                f"(mode L or P), got mode {im.mode}")
            return np.asarray(im).astype(np.uint8) if im.mode in ("L", "P") else _int_mask(np.asarray(im), path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read mask {path}: {e}")


def _int_mask(a, path):
    if a.max() > 255:
        raise UserError(f"mask {path} holds values above 255; expected class indices with 255 = ignore")
    return a.astype(np.uint8)


def folder_dataset(args):
    root = require_root(args, "folder", "ROOT/train/images/NAME.png|jpg, ROOT/train/masks/NAME.png, "
                                        "ROOT/val/images/..., ROOT/val/masks/...")
    splits = {}
    for split in ("train", "val"):
        image_dir, mask_dir = root / split / "images", root / split / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise UserError(f"--data-root {args.data_root}: missing folder {d}; expected ROOT/train/images, "
                                f"ROOT/train/masks, ROOT/val/images, ROOT/val/masks")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"--data-root {args.data_root}: no .png/.jpg images in {image_dir}")
        pairs = []
        for p in images:
            mask = mask_dir / (p.stem + ".png")
            if not mask.is_file():
                raise UserError(f"missing mask {mask} for image {p}")
            pairs.append((p, mask))
        splits[split] = pairs
    verdict = validate_pairs(splits, args, args.num_classes)
    num_classes = args.num_classes or verdict["max_label"] + 1
    if num_classes < 2:
        raise UserError(f"--data-root {args.data_root}: the masks hold a single class; expected at least 2")
    return (file_split(splits["train"], verdict["train"]), file_split(splits["val"], verdict["val"]), num_classes,
            [str(c) for c in range(num_classes)])


def require_root(args, dataset, layout):
    if not args.data_root:
        raise UserError(f"--dataset {dataset} needs --data-root (expected layout: {layout})")
    root = Path(args.data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"--data-root {args.data_root}: no such folder (expected layout: {layout})")
    return root


def validate_pairs(splits, args, num_classes):
    """Decode every (image, mask) pair once: sizes agree, masks hold valid classes. Verdict cached."""
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for pairs in splits.values() for pair in pairs
             for p in pair]
    key = hashlib.sha1(json.dumps([files, num_classes]).encode()).hexdigest()[:16]
    cache = cache_dir(args, Path(args.data_root)) / f"verdict_{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    verdict, max_label = {}, 0
    for split, pairs in splits.items():
        sizes = []
        for image_path, mask_path in tqdm(pairs, desc=f"checking {split} data (once)", leave=False,
                                          disable=len(pairs) < 200):
            image, mask = read_image(image_path), read_mask(mask_path)
            if image.shape[:2] != mask.shape:
                raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
            values = np.unique(mask)
            values = values[values != IGNORE]
            if num_classes and len(values) and values.max() >= num_classes:
                raise UserError(f"mask {mask_path} holds class {values.max()}, but --num-classes is "
                                f"{num_classes} (expected 0..{num_classes - 1} or 255 = ignore)")
            max_label = max(max_label, int(values.max()) if len(values) else 0)
            sizes.append(list(image.shape[:2]))
        verdict[split] = sizes
    verdict["max_label"] = max_label
    atomic_write_text(cache, json.dumps(verdict))
    return verdict


def cache_dir(args, data_root):
    """Beside the data when writable, else ~/.cache/cutmix-seg/<hash>; --cache-dir overrides."""
    explicit = getattr(args, "cache_dir", None)
    if explicit:
        path = Path(explicit)
    elif os.access(data_root, os.W_OK):
        path = data_root / ".cutmix_seg_cache"
    else:
        tag = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:12]
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cutmix-seg" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_split(pairs, sizes):
    """A Split that decodes its (image path, mask path) pairs on the fly, named by the images' stems."""
    load = lambda i, with_label=True: (read_image(pairs[i][0]), read_mask(pairs[i][1]) if with_label else None)
    return Split([p.stem for p, _ in pairs], load, sizes)


def layout_error(args, problem, layout):
    return UserError(f"--data-root {args.data_root}: {problem}; expected layout: {layout}")


def existing_pairs(args, images, labels, layout):
    """[(image, label), ...], or one clear error naming the first missing file."""
    for image, label in zip(images, labels):
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise layout_error(args, f"missing {kind} {path}", layout)
    return list(zip(images, labels))


def prepared_split(args, root, tag, names, pairs, convert):
    """A Split over uint8 arrays that convert(image path, label path) -> (image, label) fills once.

    The arrays, images (N, H, W, 3) and labels (N, H, W), are .npy files in the cache, read by memory
    mapping: a training sample costs no decoding. The folder's name hashes the source files' names, sizes
    and times, so changed data is prepared anew."""
    files = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for pair in pairs for p in pair]
    folder = cache_dir(args, root) / f"{tag}_{hashlib.sha1(json.dumps(files).encode()).hexdigest()[:16]}"
    if not folder.is_dir():
        with open(folder.with_name(folder.name + ".lock"), "a") as lock:
            if fcntl:  # runs started together (the seeds of a table): one prepares, the others wait for it
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                fill_arrays(folder, pairs, convert, tag)
    images, labels = (np.load(folder / f"{kind}.npy", mmap_mode="r") for kind in ("images", "labels"))
    return Split(names, lambda i: (np.array(images[i]), np.array(labels[i])), [images.shape[1:3]] * len(names))


def fill_arrays(folder, pairs, convert, tag):
    """Fill <folder>.partial sample by sample, the count of finished samples in a progress file, and rename
    it when complete: an interrupted preparation resumes where it stopped and never leaves a half-written
    cache behind."""
    partial, arrays = folder.with_name(folder.name + ".partial"), None
    partial.mkdir(exist_ok=True)
    progress = partial / "done.txt"
    done = int(progress.read_text()) if progress.is_file() else 0
    if done:
        arrays = [np.load(partial / f"{kind}.npy", mmap_mode="r+") for kind in ("images", "labels")]
    for i in tqdm(range(done, len(pairs)), initial=done, total=len(pairs), desc=f"preparing {tag} (once)",
                  dynamic_ncols=True):
        sample = convert(*pairs[i])
        if arrays is None:  # the first sample sets the arrays' shapes
            arrays = [np.lib.format.open_memmap(partial / f"{kind}.npy", "w+", np.uint8, (len(pairs), *a.shape))
                      for kind, a in zip(("images", "labels"), sample)]
        if sample[0].shape != arrays[0].shape[1:]:
            raise UserError(f"{pairs[i][0]} is {sample[0].shape[1]}x{sample[0].shape[0]} once prepared, the "
                            f"images before it {arrays[0].shape[2]}x{arrays[0].shape[1]}: they must share one size")
        for array, a in zip(arrays, sample):
            array[i] = a
            array.flush()
        atomic_write_text(progress, str(i + 1))
    del arrays  # unmapped before the rename
    os.replace(partial, folder)


# ---- cityscapes: the official leftImg8bit/ and gtFine/ trees, prepared once at half size ---------------
CITYSCAPES_LAYOUT = ("ROOT/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png and ROOT/gtFine/{train,val}/CITY/"
                     "NAME_gtFine_labelIds.png, i.e. leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                     "https://www.cityscapes-dataset.com/downloads/ unzipped into ROOT")
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
# labelId -> trainId for the 19 evaluated classes; every other id (void 0-6, 9, 10, ..., license plate 34) -> 255
CITYSCAPES_TRAIN_ID = np.full(256, IGNORE, np.uint8)
CITYSCAPES_TRAIN_ID[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = np.arange(19)


def cityscapes_dataset(args):
    """Cityscapes: 2975 train / 500 val street scenes of 2048x1024, 19 classes, used at half size (1024x512).

    Reads ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and ROOT/gtFine/<split>/<city>/
    <name>_gtFine_labelIds.png; the rest of the download (test split, _color, _instanceIds, _polygons.json)
    is ignored. Halved once into the cache (about 7 GB; any even image size works)."""
    root = require_root(args, "cityscapes", CITYSCAPES_LAYOUT)
    splits = []
    for split in ("train", "val"):
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise layout_error(args, f"missing folder {d}", CITYSCAPES_LAYOUT)
        # sorted by <city>/<name>: the original's order, which the seeded labeled subsets index
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"), key=lambda p: p.relative_to(image_dir).as_posix())
        if not images:
            raise layout_error(args, f"no CITY/*_leftImg8bit.png images in {image_dir}", CITYSCAPES_LAYOUT)
        names = [p.name[:-len("_leftImg8bit.png")] for p in images]
        labels = [label_dir / p.parent.name / f"{name}_gtFine_labelIds.png" for p, name in zip(images, names)]
        pairs = existing_pairs(args, images, labels, CITYSCAPES_LAYOUT)
        splits.append(prepared_split(args, root, f"cityscapes_{split}", names, pairs, halve_cityscapes))
    return splits[0], splits[1], len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES


def halve_cityscapes(image_path, label_path):
    """Half size as the original's conversion (REFERENCE §6.3, G20): the image by 2x2 mean truncated to
    uint8; the labelIds by 2x2 majority vote, ties to the lower id, then mapped to trainIds."""
    image, label = read_image(image_path), read_mask(label_path)
    h, w = label.shape
    if image.shape[:2] != (h, w) or h % 2 or w % 2:
        raise UserError(f"{label_path} ({w}x{h}) and {image_path} ({image.shape[1]}x{image.shape[0]}) must share "
                        f"one even size (2048x1024 in the official download)")
    image = image.reshape(h // 2, 2, w // 2, 2, 3).sum((1, 3), dtype=np.uint16) // 4
    blocks = label.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(h // 2, w // 2, 4)
    votes = (blocks[..., :, None] == blocks[..., None, :]).sum(-1)  # (h/2, w/2, 4): votes for each entry's id
    winner = np.take_along_axis(blocks, (votes * 256 - blocks).argmax(-1)[..., None], -1)[..., 0]
    return image.astype(np.uint8), CITYSCAPES_TRAIN_ID[winner]


# ---- pascal_aug: VOC 2012 with the SBD-augmented labels (SegmentationClassAug) ------------------------
PASCAL_LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages/NAME.jpg, SegmentationClassAug/NAME.png, ImageSets/Segmentation/"
                 "val.txt, optionally ImageSets/SegmentationAug/train_aug.txt}, i.e. VOCtrainval_11-May-2012.tar "
                 "from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ plus SegmentationClassAug.zip (as distributed "
                 "by Hung et al.'s AdvSemiSeg) unzipped inside VOC2012, or the labels built from SBD with "
                 "`python common.py sbd-to-aug SBD_ROOT VOC2012` (README 'Datasets')")
PASCAL_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor"]


def voc2012_folder(path):
    """VOC2012 itself, found from it, from VOCdevkit or from the folder holding VOCdevkit; else None."""
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def read_names(path):
    """Image names, one per line; "/JPEGImages/x.jpg /SegmentationClassAug/x.png" lines give x."""
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def pascal_aug_dataset(args):
    """Pascal VOC 2012 augmented: 10,582 train / 1,449 val images up to 500x500, 21 classes.

    Training names: ImageSets/SegmentationAug/train_aug.txt when present (the order the original's
    split_0.pkl indexes), else every SegmentationClassAug label not in the official val.txt, sorted.
    Validation: ImageSets/Segmentation/val.txt, whole images. JPEGs without a label (the test images)
    are never used. Decoded on the fly (small files); the one-time check of every pair is cached."""
    voc = voc2012_folder(require_root(args, "pascal_aug", PASCAL_LAYOUT))
    if voc is None:
        raise layout_error(args, "no JPEGImages/ in it, in VOC2012/ or in VOCdevkit/VOC2012/", PASCAL_LAYOUT)
    labels, val_list = voc / "SegmentationClassAug", voc / "ImageSets" / "Segmentation" / "val.txt"
    for path in (labels, val_list):
        if not path.exists():
            raise layout_error(args, f"missing {path}", PASCAL_LAYOUT)
    train_list, val = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt", read_names(val_list)
    if train_list.is_file():
        train = read_names(train_list)
    elif args.split_file and args.split_file.endswith(".pkl"):
        raise layout_error(args, f"--split-file {args.split_file} indexes the order of {train_list}, which is "
                                 f"missing (get it from AdvSemiSeg's dataset/voc_list/train_aug.txt)", PASCAL_LAYOUT)
    else:
        excluded = set(val)
        train = sorted(p.stem for p in labels.glob("*.png") if p.stem not in excluded)
    if not train or not val:
        raise layout_error(args, f"no training labels in {labels}" if not train else f"{val_list} is empty",
                           PASCAL_LAYOUT)
    splits = {split: existing_pairs(args, [voc / "JPEGImages" / f"{n}.jpg" for n in names],
                                    [labels / f"{n}.png" for n in names], PASCAL_LAYOUT)
              for split, names in (("train", train), ("val", val))}
    verdict = validate_pairs(splits, args, len(PASCAL_CLASSES))
    return (file_split(splits["train"], verdict["train"]), file_split(splits["val"], verdict["val"]),
            len(PASCAL_CLASSES), PASCAL_CLASSES)


def sbd_to_aug(sbd, voc):
    """Build VOC2012/SegmentationClassAug/NAME.png (class indices, 255 = void) from SBD's dataset/cls/NAME.mat,
    VOC's own SegmentationClass labels winning where both exist, as in the usual SegmentationClassAug.

    Needs scipy, for this step only. Each PNG is written atomically and existing ones are kept: re-run it
    after an interruption."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("sbd-to-aug reads SBD's .mat files with scipy, needed for this step only: pip install scipy")
    cls = next((d for d in (sbd / "dataset" / "cls", sbd / "benchmark_RELEASE" / "dataset" / "cls", sbd / "cls")
                if d.is_dir()), None)
    voc = voc2012_folder(voc)
    if cls is None:
        raise UserError(f"{sbd}: no dataset/cls/ folder of .mat labels; expected SBD's benchmark.tgz unpacked "
                        f"(http://home.bharathh.info/pubs/codes/SBD/download.html)")
    if voc is None or not (voc / "SegmentationClass").is_dir():
        raise UserError(f"no VOC2012 folder with JPEGImages/ and SegmentationClass/ there; expected {PASCAL_LAYOUT}")
    sources = {p.stem: p for p in cls.glob("*.mat")}
    sources.update({p.stem: p for p in (voc / "SegmentationClass").glob("*.png")})  # VOC's own labels win
    for name, source in tqdm(sorted(sources.items()), desc="writing SegmentationClassAug"):
        target = voc / "SegmentationClassAug" / f"{name}.png"
        if target.is_file():
            continue
        if source.suffix == ".png":
            label = read_mask(source)  # palette indices, 255 = boundary
        else:
            label = loadmat(source, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation.astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(label).save(buffer, format="PNG")
        atomic_write_bytes(target, buffer.getvalue())
    print(f"{len(sources)} labels in {voc / 'SegmentationClassAug'}")


# ---- isic2017: the official ISIC 2017 Part 1 folders, prepared once at 248x248 -------------------------
ISIC_LAYOUT = ("ROOT/ISIC-2017_Training_Data/ISIC_NNNNNNN.jpg, ROOT/ISIC-2017_Training_Part1_GroundTruth/"
               "ISIC_NNNNNNN_segmentation.png and the same for ISIC-2017_Validation_*, i.e. the ISIC 2017 Part 1 "
               "zips from https://challenge.isic-archive.com/data/#2017 unzipped into ROOT")
ISIC_SIZE = (248, 248)


def isic2017_dataset(args):
    """ISIC 2017 lesion segmentation: 2000 train / 150 val dermoscopy images, classes background and lesion.

    Reads ROOT/ISIC-2017_{Training,Validation}_Data/<name>.jpg (superpixel PNGs and metadata CSVs are
    skipped) and ROOT/ISIC-2017_{Training,Validation}_Part1_GroundTruth/<name>_segmentation.png; the
    Test_v2 folders are ignored. Resized once into the cache to 248x248 (aspect ratio not kept)."""
    root = require_root(args, "isic2017", ISIC_LAYOUT)
    splits = []
    for split, part in (("train", "Training"), ("val", "Validation")):
        image_dir, truth_dir = root / f"ISIC-2017_{part}_Data", root / f"ISIC-2017_{part}_Part1_GroundTruth"
        for d in (image_dir, truth_dir):
            if not d.is_dir():
                raise layout_error(args, f"missing folder {d}", ISIC_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg" and "_superpixels" not in p.stem)
        if not images:
            raise layout_error(args, f"no ISIC_*.jpg images in {image_dir}", ISIC_LAYOUT)
        truths = [truth_dir / f"{p.stem}_segmentation.png" for p in images]
        pairs = existing_pairs(args, images, truths, ISIC_LAYOUT)
        splits.append(prepared_split(args, root, f"isic2017_{split}", [p.stem for p in images], pairs, shrink_isic))
    return splits[0], splits[1], 2, ["background", "lesion"]


def shrink_isic(image_path, truth_path):
    """248x248 by area interpolation, image and ground truth alike (the original's cv2.INTER_AREA), then
    lesion where the resized ground truth is >= 127 (REFERENCE §6.4)."""
    image, truth = read_image(image_path), read_mask(truth_path)
    if image.shape[:2] != truth.shape:
        raise UserError(f"ground truth {truth_path} is {truth.shape[1]}x{truth.shape[0]} but its image "
                        f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
    return area_resize(image, ISIC_SIZE), (area_resize(truth, ISIC_SIZE) >= 127).astype(np.uint8)


def area_resize(a, size):
    """Resize a uint8 (H, W) or (H, W, C) array by area averaging, as OpenCV's INTER_AREA when shrinking:
    each output pixel is the mean of the input area it covers, pixels partly inside weighted by that part."""
    out = a
    for axis, m in enumerate(size):
        x = np.moveaxis(out, axis, 0)  # resize along the first axis
        n, rows = len(x), []
        edges = np.arange(m + 1) * (n / m)
        for lo, hi in zip(edges[:-1], edges[1:]):  # one output pixel: the input interval [lo, hi)
            pixels = np.arange(int(lo), min(math.ceil(hi), n))
            inside = np.minimum(pixels + 1, hi) - np.maximum(pixels, lo)  # the part of each pixel inside
            rows.append(np.tensordot(inside / (hi - lo), x[pixels[0]:pixels[-1] + 1], 1))
        out = np.moveaxis(np.stack(rows), 0, axis)
    return np.rint(out).clip(0, 255).astype(np.uint8)


# ---- augmentation: runs in the loader on uint8 tensors -------------------------------------------
def augment(image, label, rng, crop, aug):
    """Random crop (with the dataset's scale/flip augmentation) of one sample, REFERENCE §6.1.

    image (H, W, 3) uint8, label (H, W) uint8 or None; returns image (3, h, w) uint8, label (h, w)
    uint8 (255 where padded), valid (h, w) uint8 (255 = real image content, 0 = padding).
    """
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    lab = torch.from_numpy(np.ascontiguousarray(label)) if label is not None else None
    valid = torch.full(img.shape[1:], 255, dtype=torch.uint8)
    ch, cw = crop
    if aug.get("hung_scale"):  # f in {0.5, ..., 1.5}: a window of crop/f is resized to the crop
        f = 0.5 + rng.integers(0, 11) / 10
        wh, ww = round(ch / f), round(cw / f)
    else:
        wh, ww = ch, cw
    if aug.get("rot") or aug.get("max_scale"):  # ISIC: rotated and scaled crop, no padding
        img, lab, valid = rotate_scale_crop(img, lab, valid, rng, crop, aug.get("rot") or 0, aug.get("max_scale") or 1)
    else:
        img, lab, valid = pad_to(img, lab, valid, wh, ww)
        y0 = round((img.shape[1] - wh) * rng.uniform())
        x0 = round((img.shape[2] - ww) * rng.uniform())
        img, valid = img[:, y0:y0 + wh, x0:x0 + ww], valid[y0:y0 + wh, x0:x0 + ww]
        lab = lab[y0:y0 + wh, x0:x0 + ww] if lab is not None else None
    if img.shape[1:] != (ch, cw):
        img = resize(img, crop, "bilinear")
        valid = resize(valid[None], crop, "bilinear")[0]
        lab = resize(lab[None], crop, "nearest")[0] if lab is not None else None
    flips = [aug.get("hflip") and rng.uniform() < 0.5, aug.get("vflip") and rng.uniform() < 0.5,
             aug.get("transpose") and rng.uniform() < 0.5]
    for k, dims in enumerate(((-1,), (-2,), None)):
        if flips[k]:
            op = (lambda t: t.flip(dims)) if dims else (lambda t: t.transpose(-1, -2))
            img, valid = op(img), op(valid)
            lab = op(lab) if lab is not None else None
    return img.contiguous(), lab.contiguous() if lab is not None else None, valid.contiguous()


def rotate_scale_crop(img, lab, valid, rng, crop, rot, max_scale):
    """A crop turned by θ ~ U(-rot, rot) degrees and scaled by s = exp(U(-ln m, ln m)), REFERENCE §6.1: the
    original's cv2.warpAffine with T(crop/2)·R(θ)·S(s)·T(-centre), here as its inverse map for grid_sample.
    Beyond the border the image is mirrored (reflect-101), labels are 255 and valid 0. The image is sampled
    nearest when labeled (to stay aligned with its labels), else nearest or bilinear at random."""
    scale = math.exp(rng.uniform(-math.log(max_scale), math.log(max_scale)))
    theta = math.radians(rng.uniform(-rot, rot))
    size, window = np.array(img.shape[1:], float), np.array(crop) / scale  # (H, W), the crop's extent in the image
    cy, cx = np.maximum(size - window, 0) * rng.uniform(size=2) + np.minimum(window, size) / 2
    dy, dx = torch.meshgrid(torch.arange(crop[0]) - crop[0] / 2, torch.arange(crop[1]) - crop[1] / 2, indexing="ij")
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    x, y = cx + cos * dx + sin * dy, cy - sin * dx + cos * dy  # (h, w) source pixel of each output pixel
    # align_corners=True: -1 and 1 are the centres of the first and last pixels, as OpenCV's pixel grid
    grid = torch.stack([x / max(size[1] - 1, 1) * 2 - 1, y / max(size[0] - 1, 1) * 2 - 1], -1)[None].float()

    def warp(t, mode, border):  # (C, H, W) -> (C, h, w) float
        return F.grid_sample(t[None].float(), grid, mode=mode, padding_mode=border, align_corners=True)[0]
    mode = "nearest" if lab is not None or rng.uniform() < 0.5 else "bilinear"
    img = warp(img, mode, "reflection").round().clamp(0, 255).to(torch.uint8)
    valid = warp(valid[None], mode, "zeros")[0].round().to(torch.uint8)
    if lab is not None:  # shifted by one so that 0 marks "outside the image"
        lab = warp(lab[None].long() + 1, "nearest", "zeros")[0].long()
        lab = torch.where(lab == 0, IGNORE, lab - 1).to(torch.uint8)
    return img, lab, valid


def pad_to(img, lab, valid, h, w):
    """Centred padding up to (h, w): image 0, label 255, valid 0 (REFERENCE §6.1)."""
    ph, pw = max(h - img.shape[1], 0), max(w - img.shape[2], 0)
    if ph == 0 and pw == 0:
        return img, lab, valid
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    img = F.pad(img, pads, value=0)
    valid = F.pad(valid, pads, value=0)
    lab = F.pad(lab, pads, value=IGNORE) if lab is not None else None
    return img, lab, valid


def resize(t, size, mode):
    """Resize a (C, H, W) uint8 tensor; bilinear rounds back to uint8."""
    out = F.interpolate(t[None].float(), size=size, mode=mode, **({} if mode == "nearest" else
                                                                   dict(align_corners=False)))[0]
    return out.round().clamp(0, 255).to(torch.uint8)


class TrainSet(torch.utils.data.Dataset):
    """Augmented crops. Indexed by (sample index, augmentation seed), so that every crop is fixed by the
    stream position alone: the same in any worker, after a resume, whatever the worker count."""

    def __init__(self, split, crop, aug, with_label=True):
        self.split, self.crop, self.aug, self.with_label = split, crop, aug, with_label

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key
        image, label = self.split.load(index) if self.with_label else (self.split.load(index)[0], None)
        img, lab, valid = augment(image, label, np.random.default_rng(seed), self.crop, self.aug)
        return (img, lab, valid) if lab is not None else (img, valid)


class StreamSampler(torch.utils.data.Sampler):
    """Infinite stream of batches: passes over `indices`, each freshly shuffled, batches cut from the
    continuous stream (a batch may straddle two passes, as the original's RepeatSampler).

    Pass k's order and every sample's augmentation seed derive from (seed, stream, k), so the stream's
    only state is its position: starting at iteration `start` resumes it exactly.
    """

    def __init__(self, indices, batch_size, seed, stream, start=0):
        self.indices, self.batch_size = np.asarray(indices), batch_size
        self.seed, self.stream, self.start = seed, stream, start

    def __iter__(self):
        n, pos, current_pass = len(self.indices), self.start * self.batch_size, None
        rank, world = process_group()
        share = self.batch_size // world
        while True:
            batch = []
            for _ in range(self.batch_size):
                k, j = divmod(pos, n)
                if k != current_pass:
                    order, current_pass = np.random.default_rng([self.seed, self.stream, k]).permutation(n), k
                batch.append((int(self.indices[order[j]]), (self.seed, self.stream, pos)))
                pos += 1
            yield batch[rank * share:(rank + 1) * share]  # under torchrun: this process's share


def stream(split, indices, args, stream_id, start, with_label=True, dataset=None):
    """Iterator over augmented training batches of `indices`, from iteration `start` on.

    `dataset` replaces the default TrainSet (a method with its own views, e.g. std-aug's pairs); it is
    indexed by (sample index, augmentation seed) like TrainSet."""
    batches = train_loader(dataset or TrainSet(split, args.crop_size, args.aug, with_label), indices, args,
                           stream_id, start)
    if args.benchmark:  # two batches, cycled: the benchmark times the training step, not the loader
        return cycle_counted(list(itertools.islice(batches, 2)))
    return batches


BENCHMARK_IMAGES = [0]  # --benchmark: images handed out by all streams


def cycle_counted(batches):
    for i in itertools.count():
        BENCHMARK_IMAGES[0] += len(batches[i % 2][0])
        yield batches[i % 2]


def train_loader(dataset, indices, args, stream_id, start):
    """The DataLoader iterator behind `stream`: batches from StreamSampler, assembled by workers."""
    sampler = StreamSampler(indices, args.batch_size, args.seed, stream_id, start)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=args.num_workers > 0, prefetch_factor=4 if args.num_workers > 0 else None))


class ValSet(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        image, label = self.split.load(i)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(label)


def val_loader(split, args, max_batch=None):
    """Whole images at their own size; images of equal size share a batch (no padding, REFERENCE G12).
    Under torchrun each process takes every N-th batch (evaluate() sums the confusion matrices)."""
    max_batch = max_batch or args.batch_size
    batches, current = [], []
    for i in range(len(split)):
        if current and (split.sizes[i] != split.sizes[current[0]] or len(current) == max_batch):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    rank, world = process_group()
    return torch.utils.data.DataLoader(ValSet(split), batch_sampler=batches[rank::world],
                                       num_workers=min(args.num_workers, 4),
                                       pin_memory=torch.cuda.is_available())


def host_to_device(t, device):
    """A small host tensor to the device without waiting for the GPU's queue (pinned, asynchronous)."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def normalisation(device, mean, std):
    """mean and std as (1, 3, 1, 1) tensors on the device, made once: a copy from pageable host memory
    would wait for the GPU's queue to drain at every batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def to_device(images, valid, device, mean, std, channels_last=False):
    """uint8 (B, 3, H, W) -> normalised float on the device; pixels outside the image become 0."""
    mean, std = normalisation(device, tuple(mean), tuple(std))
    x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    if valid is not None:
        valid = valid.to(device, non_blocking=True).float().div_(255).unsqueeze(1)  # (B, 1, H, W)
        x = x * valid
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, valid


# ---------------------------------------------------------------------------------------------------
# 4. Networks: every one takes any input size and returns logits of that size
# ---------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """Caffe-style ResNet bottleneck (stride on the first 1x1 conv), as DeepLab v2 / AdvSemiSeg."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class DeepLabV2(nn.Module):
    """DeepLab v2 on ResNet-101 (REFERENCE §5.1): output stride 8, ASPP rates 6/12/18/24."""

    def __init__(self, num_classes, aspp_all_branches=False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 23, dilation=2)
        self.layer4 = self._layer(512, 3, dilation=4)
        self.aspp = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, padding=r, dilation=r) for r in (6, 12, 18, 24))
        # The original (from AdvSemiSeg) returns inside its loop over the branches, so only the rate-6
        # and rate-12 branches are summed; 18 and 24 exist, sit in the optimizer, and are never used (G4).
        self.n_branches = 4 if aspp_all_branches else 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        for m in self.modules():  # BN affine parameters are never trained in the original
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def _layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def backbone_modules(self):
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def head_logits(self, x):
        """Stride-8 logits (321x321 in -> 41x41 out)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return sum(branch(x) for branch in self.aspp[:self.n_branches])

    def forward(self, x):
        # align_corners=True: kept from Hung et al., whose weights and numbers the paper compares to (G13)
        return F.interpolate(self.head_logits(x), size=x.shape[2:], mode="bilinear", align_corners=True)

    def load_imagenet(self):
        """Copy torchvision's ImageNet ResNet-101 (IMAGENET1K_V1) wherever name and shape match."""
        from torchvision.models import ResNet101_Weights
        state = load_torchvision_weights(ResNet101_Weights.IMAGENET1K_V1)
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(matched, strict=False)
        return matched


def load_torchvision_weights(weights):
    """torchvision weights from its cache (downloading if online), else one clear message."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as e:
        raise UserError(f"cannot load the ImageNet weights {weights} ({type(e).__name__}): download "
                        f"{weights.url} to {file}, or run with --no-pretrained")


class UNetSmall(nn.Module):
    """A small U-Net trained from scratch (demo, tests, small images): 4 levels, 16..128 channels."""

    def __init__(self, num_classes, width=16, depth=3):
        super().__init__()
        chans = [width * 2 ** i for i in range(depth + 1)]

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.down = nn.ModuleList(block(ci, co) for ci, co in zip([3] + chans[:-1], chans))
        self.up = nn.ModuleList(block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)
        self.multiple = 2 ** depth

    def forward(self, x):
        h, w = x.shape[2:]
        m = self.multiple
        x = F.pad(x, (0, -w % m, 0, -h % m))  # zero = the mean colour; cropped off again below
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], 1))
        return self.classifier(x)[:, :, :h, :w]

    def backbone_modules(self):
        return []


def resnet101_dilated():
    """torchvision's ResNet-101 with layer3/layer4 dilated 2/4 (output stride 8, torchvision's scheme: each
    dilated layer's first block keeps the previous dilation), without its average pooling and fc."""
    from torchvision.models import resnet101
    net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    del net.avgpool, net.fc
    return net


def resnet_features(r, x):
    """(layer1 output: 256 channels at /4, layer4 output: 2048 channels at /8) of a dilated ResNet."""
    low = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))
    return low, r.layer4(r.layer3(r.layer2(low)))


def load_resnet101(resnet):
    """torchvision's ImageNet ResNet-101 (IMAGENET1K_V1, as the original) into `resnet`: every key but fc's."""
    from torchvision.models import ResNet101_Weights
    state = {k: v for k, v in load_torchvision_weights(ResNet101_Weights.IMAGENET1K_V1).items()
             if not k.startswith("fc.")}
    resnet.load_state_dict(state)  # strict: a key that does not fit is an error, not a silent skip
    return state


def init_head(modules, bn_bias=0.0):
    """Kaiming-normal conv weights, BN weight 1 and bias `bn_bias`: the original's init of new layers."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, bn_bias)


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ on a dilated ResNet-101 (REFERENCE §5.2): ASPP rates 12/24/36 (its projection ends in
    Dropout 0.5), a 48-channel layer1 skip, two 3x3 conv-BN-ReLU blocks, bilinear upsampling (G13)."""

    def __init__(self, num_classes):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP
        self.backbone = resnet101_dilated()
        self.project = nn.Sequential(nn.Conv2d(256, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp = ASPP(2048, [12, 24, 36])
        self.classifier = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1))
        init_head([*self.project.modules(), *self.aspp.modules(), *self.classifier.modules()])

    def forward(self, x):
        low, high = resnet_features(self.backbone, x)
        low = self.project(low)  # (B, 48, H/4, W/4)
        high = F.interpolate(self.aspp(high), size=low.shape[2:], mode="bilinear", align_corners=False)
        logits = self.classifier(torch.cat([low, high], 1))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    def backbone_modules(self):
        return []  # the original's wrapper quirk: no pretrained group, all parameters at the head's rate (G8)

    def frozen_bn_modules(self):
        return [self.backbone]  # --freeze_bn: backbone BN statistics only; its affine parameters still train

    def load_imagenet(self):
        return load_resnet101(self.backbone)


class DenseUNet161(nn.Module):
    """U-Net on torchvision's DenseNet-161 features (REFERENCE §5.3), as the original (after Li et al.):
    each decoder block upsamples x2 (nearest), *adds* the skip, then conv 3x3 + BN + ReLU."""

    TAPS = ("pool0", "transition1", "transition2", "transition3")  # skips = the inputs of these layers

    def __init__(self, num_classes):
        super().__init__()
        from torchvision.models import densenet161
        # The encoder only: the original also kept DenseNet's ImageNet classifier (in the head group), but no
        # gradient ever reaches it, so it is dropped here.
        self.features = densenet161(weights=None).features
        self.line0 = nn.Conv2d(2112, 2208, 1)  # the /16 skip widened to the bottom's 2208 channels
        chans = [2208, 768, 384, 96, 96]  # decoder: /32 -> /16 -> /8 -> /4 -> /2; skips of 2208, 768, 384, 96
        self.decoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for cin, cout in zip(chans, chans[1:]))
        self.final = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(96, 64, 3, padding=1, bias=False),
                                   nn.Dropout(0.3), nn.BatchNorm2d(64), nn.ReLU(inplace=True),  # conv, dropout, BN
                                   nn.Conv2d(64, num_classes, 1))

    def forward(self, x):
        h, w = x.shape[2:]
        # The original pads each batch to a multiple of 32 (BLOCK_SIZE) with the mean colour; zeros here are
        # that colour after normalisation, and the padding is cropped off the logits again.
        x = F.pad(x, (0, -w % 32, 0, -h % 32))
        skips = []
        for name, layer in self.features.named_children():
            if name in self.TAPS:
                skips.append(x)
            x = layer(x)
        x = F.relu(x)  # (B, 2208, H/32, W/32): norm5, then ReLU
        skips[-1] = self.line0(skips[-1])
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(F.interpolate(x, scale_factor=2, mode="nearest") + skip)
        return self.final(x)[:, :, :h, :w]

    def backbone_modules(self):
        return [self.features]

    def frozen_bn_modules(self):
        return [self.features]

    def load_imagenet(self):
        """torchvision's ImageNet DenseNet-161 (IMAGENET1K_V1); its file keeps the old layer names
        (denselayer1.norm.1), renamed here as torchvision does (norm1)."""
        import re
        from torchvision.models import DenseNet161_Weights
        state = load_torchvision_weights(DenseNet161_Weights.IMAGENET1K_V1)
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k[len("features."):]): v
                 for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(state)
        return state


class PSPNet101(nn.Module):
    """PSPNet on a dilated ResNet-101 (REFERENCE §5.5, MIT CSAIL's `resnet101dilated` + `ppm`): pyramid
    pooling 1/2/3/6, no auxiliary (deep-supervision) loss. The original's encoder was MIT's deep-stem
    ResNet-101 with MIT's ImageNet weights; torchvision has only the standard stem (README, deviations)."""

    def __init__(self, num_classes, scales=(1, 2, 3, 6)):
        super().__init__()
        self.backbone = resnet101_dilated()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512),
                          nn.ReLU(inplace=True)) for s in scales)
        self.classifier = nn.Sequential(
            nn.Conv2d(2048 + 512 * len(scales), 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
            nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1))
        init_head([*self.ppm.modules(), *self.classifier.modules()], bn_bias=1e-4)  # MIT's weights_init

    def forward(self, x):
        _, f = resnet_features(self.backbone, x)  # (B, 2048, H/8, W/8)
        pyramid = [f] + [F.interpolate(branch(f), size=f.shape[2:], mode="bilinear", align_corners=False)
                         for branch in self.ppm]
        logits = self.classifier(torch.cat(pyramid, 1))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    def backbone_modules(self):
        return [self.backbone]

    def frozen_bn_modules(self):
        return [self.backbone]

    def load_imagenet(self):
        return load_resnet101(self.backbone)


def build_net(args, num_classes):
    """The student network for args.arch, with ImageNet weights unless --no-pretrained."""
    if args.arch == "deeplabv2":
        net = DeepLabV2(num_classes, aspp_all_branches=args.aspp_all_branches)
    elif args.arch in ("unet_small", "deeplabv3plus", "denseunet161", "pspnet101"):
        net = dict(unet_small=UNetSmall, deeplabv3plus=DeepLabV3Plus, denseunet161=DenseUNet161,
                   pspnet101=PSPNet101)[args.arch](num_classes)
    else:
        raise UserError(f"--arch {args.arch}: unknown architecture; choose one of {', '.join(ARCHS)}")
    if hasattr(net, "load_imagenet") and not (args.no_pretrained or args.benchmark):  # benchmark: random weights
        net.load_imagenet()
    return sync_batchnorm(net, args.device) if process_group()[1] > 1 else net


def forward_each(net, *batches):
    """[net(b) for b in batches], in one pass over their concatenation where no BatchNorm of `net` uses
    batch statistics (frozen or eval): the same outputs from fewer, larger kernels."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules()):
        return [net(b) for b in batches]
    return net(torch.cat(batches)).split([len(b) for b in batches])


def set_train_mode(net, args):
    """Train mode, with BatchNorm back in eval mode where the protocol freezes it (--freeze_bn): the
    net's frozen_bn_modules() (its pretrained backbone), else all of it (DeepLab v2)."""
    net.train()
    if args.freeze_bn:
        for top in net.frozen_bn_modules() if hasattr(net, "frozen_bn_modules") else [net]:
            for m in top.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


# ---------------------------------------------------------------------------------------------------
# 5. Mean teacher and optimizer
# ---------------------------------------------------------------------------------------------------
def make_teacher(student):
    """An identical copy whose weights only ever move by EMA (no gradients)."""
    import copy
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_pairs(teacher, student):
    """(teacher tensors, student tensors): every float state entry, BN running statistics included."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if t_state.keys() != s_state.keys():
        raise ValueError("teacher and student state dicts differ")
    keys = [k for k, v in s_state.items() if v.is_floating_point()]
    return [t_state[k] for k in keys], [s_state[k] for k in keys]


@torch.no_grad()
def ema_update(pairs, alpha):
    """teacher <- alpha * teacher + (1 - alpha) * student, in place, for all float state (REFERENCE §1.1)."""
    teacher, student = pairs
    torch._foreach_lerp_(teacher, student, 1.0 - alpha)


class RepeatAdam(torch.optim.Adam):
    """Adam that steps each parameter group `repeat` times per call.

    This is how the original stepped DeepLab v2's backbone: its parameter generator yielded every
    backbone conv weight 3 times (4 for downsample convs), and PyTorch 1.4's Adam updated such a
    weight's moments and value once per occurrence (G3). Grouping by multiplicity gives the same
    arithmetic with vectorised (foreach) kernels instead of a slow per-tensor loop.
    """

    def step(self, closure=None):
        groups = self.param_groups
        params = [g["params"] for g in groups]
        for r in range(max(g.get("repeat", 1) for g in groups)):
            for g, p in zip(groups, params):
                g["params"] = p if g.get("repeat", 1) > r else []
            super().step()
        for g, p in zip(groups, params):
            g["params"] = p


def param_groups(net, args):
    """Backbone at lr * backbone_lr_mult, the rest (the head) at lr; DeepLab v2's multiplicities kept."""
    backbone = net.backbone_modules() if args.backbone_lr_mult != 1.0 or args.arch == "deeplabv2" else []
    counts = {}
    for top in backbone:  # the original's walk: every module's recursive .parameters(), duplicates kept
        for m in top.modules():
            for p in m.parameters():
                if p.requires_grad:
                    counts[p] = counts.get(p, 0) + 1
    if args.dedupe_params or args.arch != "deeplabv2":
        counts = dict.fromkeys(counts, 1)
    groups = []
    for repeat in sorted(set(counts.values())):
        groups.append(dict(params=[p for p, c in counts.items() if c == repeat],
                           lr=args.lr * args.backbone_lr_mult, repeat=repeat, name=f"backbone x{repeat}"))
    head = [p for p in net.parameters() if p.requires_grad and p not in counts]
    groups.append(dict(params=head, lr=args.lr, repeat=1, name="head"))
    return groups


def make_optimizer(net, args):
    groups = param_groups(net, args)
    if args.optimizer == "adam":
        return RepeatAdam(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)


def set_lr(optimizer, args, it):
    """Constant, or poly (1 - t/T)^0.9 stepped before each iteration (REFERENCE §1.4)."""
    if args.lr_schedule == "poly":
        factor = max(0.0, 1 - it / args.iters) ** args.poly_power
        for g in optimizer.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor


# ---------------------------------------------------------------------------------------------------
# 6. Metrics
# ---------------------------------------------------------------------------------------------------
def confusion_matrix(pred, target, num_classes):
    """(num_classes, num_classes) counts, rows = truth, columns = prediction; 255 ignored."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(conf):
    """Per-class IoU pooled over the set; a class absent from prediction and truth counts 0 (as original)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return inter / union.clamp(min=1)


def fill_holes(mask):
    """(B, H, W) bool -> the same with every hole filled, as scipy's binary_fill_holes: background regions
    that no 4-connected path links to the image border become foreground."""
    background = ~mask
    outside = torch.zeros_like(mask)
    outside[:, [0, -1], :] = background[:, [0, -1], :]
    outside[:, :, [0, -1]] = background[:, :, [0, -1]]
    while True:  # grow the border's background one pixel per step, through background only
        grown = outside.clone()
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown[:, :, 1:] |= outside[:, :, :-1]
        grown[:, :, :-1] |= outside[:, :, 1:]
        grown &= background
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def eager(args):
    """Under --compile the nets run uncompiled inside this context: evaluation's image sizes would each
    cost a compilation (minutes), for passes whose large kernels keep the GPU busy anyway."""
    return torch.compiler.set_stance("force_eager") if getattr(args, "compile", False) else contextlib.nullcontext()


@torch.no_grad()
def evaluate(net, loader, data, device, args):
    """Per-class IoU (percent) of `net` on whole validation images; returns (mIoU, list, confusion)."""
    net.eval()
    conf = torch.zeros(data.num_classes, data.num_classes, dtype=torch.long, device=device)
    channels_last = device.type == "cuda"
    for images, labels in loader:
        x, _ = to_device(images, None, device, data.mean, data.std, channels_last)
        with autocast(args, device), eager(args):
            pred = net(x).argmax(1)
        if getattr(args, "fill_holes", False):  # ISIC: the predicted lesion is hole-filled before scoring (G19)
            pred = fill_holes(pred == 1).long()
        conf += confusion_matrix(pred, labels.to(device, non_blocking=True), data.num_classes)
    conf = all_reduce_sum(conf)
    iou = iou_from_confusion(conf.cpu()) * 100
    return iou.mean().item(), iou.tolist(), conf.cpu()


# ---------------------------------------------------------------------------------------------------
# 7. Run plumbing: output folder, log, checkpoints, results
# ---------------------------------------------------------------------------------------------------
def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def atomic_write_png(path, image):
    """A PIL image or an (H, W[, 3]) uint8 array as a PNG, atomically."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class Run:
    """One training run and its folder: args.json, log.txt, metrics.jsonl, checkpoint.pt, results.json,
    preview.png. The scripts call, in order: Run(args, method) (checks --out, --resume), start(...) once
    the data and networks are good, iterations(), end_iteration() after each step, finish().

    Under torchrun every process runs the loop on its share of the batch; process 0 alone prints and
    writes. With --benchmark the same calls time the loop instead (`Benchmark`) and nothing is written."""

    def __init__(self, args, method):
        self.args, self.method = args, method
        self.rank, self.world = process_group()
        self.main = self.rank == 0
        self.log_every = max(1, min(100, args.eval_every // 5))
        self.out = self.log_file = self.metrics_file = None
        if args.benchmark:
            return
        script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0].endswith(".py") else f"train_{method}"
        split = "" if args.split_seed == 12345 else f"_ss{args.split_seed}"  # the paper varies split seeds
        args.out = args.out or f"runs/{script}_{args.dataset}_{args.n_labeled}_s{args.seed}{split}"
        self.out = Path(args.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        finished = (self.out / "results.json").is_file()
        if args.resume and not self.checkpoint_path.is_file() and not finished:
            raise UserError(f"--resume: {self.out} holds no checkpoint.pt to continue from")
        if self.main and not args.resume and self.out.exists() and any(self.out.iterdir()):
            what = "a finished run" if finished else "an unfinished run (add --resume to continue it)"
            raise UserError(f"--out {self.out} already holds {what}; choose another --out or delete it")
        if args.resume and finished:
            results = json.loads((self.out / "results.json").read_text())
            if self.main:
                print(f"{self.out} is already finished")
                print(f"FINAL mIoU={results['miou']:.2f}")
            sys.exit(0)

    def start(self, data, device, **tracked):
        """Create the folder and log; restore `tracked` objects (nets, optimizer, ...) when resuming.

        Returns the iteration to start from."""
        self.data, self.device, self.tracked = data, device, tracked
        self.val_loader = val_loader(data.val, self.args)
        self.start_iter, self.timed_iters, self.timed_seconds, self.wall_seconds = 0, 0, 0.0, 0.0
        if self.main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.out / "log.txt", "a")
            self.metrics_file = open(self.out / "metrics.jsonl", "a")
        if self.args.resume and not self.args.benchmark:
            state = self.load_checkpoint()
            for name, obj in tracked.items():
                if isinstance(obj, torch.Generator):
                    obj.set_state(state[name])
                else:
                    obj.load_state_dict(state[name])
            self.start_iter = state["iter"]
            self.timed_iters, self.timed_seconds = state["timed_iters"], state["timed_seconds"]
            self.wall_seconds = state["wall_seconds"]
            self.print(f"resumed from iteration {self.start_iter} of {self.out}"
                       + (f" with {self.world} processes" if self.world > 1 else ""))
        else:
            record = dict(vars(self.args), method=self.method)
            if self.main and self.out is not None:
                atomic_write_text(self.out / "args.json", json.dumps(record, indent=2, default=str))
            self.print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(record.items())))
            self.print(f"data: {len(data.train)} train ({len(data.labeled)} labeled), {len(data.val)} val, "
                       f"{data.num_classes} classes; labeled: {data.labeled.tolist()[:20]}"
                       f"{' ...' if len(data.labeled) > 20 else ''}")
        if self.world > 1:
            for name in ("student", "teacher"):  # one set of weights on every process, from process 0
                for t in tracked[name].state_dict().values():
                    torch.distributed.broadcast(t, 0)
            # the global RNGs (dropout) differ between processes; shared draws use their own generators
            s = int(np.random.default_rng([self.args.seed, self.rank, self.start_iter]).integers(2 ** 31))
            random.seed(s), np.random.seed(s), torch.manual_seed(s)
        self.sums, self.count = None, 0
        return self.start_iter

    def iterations(self):
        """Iteration numbers from the start (or the checkpoint) to --iters, with a progress bar."""
        for nets in ("student", "teacher"):
            set_train_mode(self.tracked[nets], self.args)
        if self.args.benchmark:
            self.benchmark = Benchmark(self)
            yield from self.benchmark.iterations()
            return
        if self.args.compile:
            self.compile()
        self.bar = tqdm(range(self.start_iter, self.args.iters), initial=self.start_iter, total=self.args.iters,
                        desc=self.method, dynamic_ncols=True, leave=False, disable=not self.main)
        self.segment_start = self.clock_start = time.perf_counter()
        self.segment_iters, self.warmup_left = 0, 5
        for it in self.bar:
            set_lr(self.tracked["optimizer"], self.args, it)
            yield it

    def compile(self):
        """--compile: torch.compile each net's forward in place (state dicts keep their names), for the
        training shapes only (static: no dynamic-shape graphs); evaluation runs eager (`eager`)."""
        for nets in ("student", "teacher"):
            self.tracked[nets].compile(mode=self.args.compile_mode, dynamic=False)

    def end_iteration(self, it, **scalars):
        """Accumulate the losses (no host-device sync); print every log interval; evaluate and
        checkpoint every --eval-every iterations and at the end."""
        if self.args.benchmark:
            return
        values = torch.stack([v.detach().float() for v in scalars.values()])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1
        if self.warmup_left > 0:  # the first iterations (allocation, cudnn autotuning) are not timed
            self.warmup_left -= 1
            if self.warmup_left == 0:
                self.sync()
                self.segment_start = time.perf_counter()
        else:
            self.segment_iters += 1
        done = it + 1
        if done % self.log_every == 0 or done == self.args.iters:
            means = (all_reduce_sum(self.sums) / (self.count * self.world)).tolist()  # mean over processes
            for name, value in zip(scalars, means):
                if not math.isfinite(value):  # as the original: a NaN loss ends the run
                    raise RuntimeError(f"the {name} loss became {value} by iteration {done}; stopping")
            lr = self.tracked["optimizer"].param_groups[-1]["lr"]
            elapsed = time.perf_counter() - self.segment_start
            rate = elapsed / max(self.segment_iters, 1)
            self.print(f"it {done}/{self.args.iters} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in zip(scalars, means)) + f" | lr {lr:.1e} | {rate:.3f} s/it")
            self.metrics(iter=done, lr=lr, seconds_per_iter=rate, **dict(zip(scalars, means)))
            self.sums, self.count = None, 0
        if done % self.args.eval_every == 0 or done == self.args.iters:
            self.sync()
            if self.warmup_left == 0:
                self.timed_seconds += time.perf_counter() - self.segment_start
                self.timed_iters += self.segment_iters
            self.evaluate(done)
            self.segment_start, self.segment_iters = time.perf_counter(), 0
            for nets in ("student", "teacher"):
                set_train_mode(self.tracked[nets], self.args)

    def evaluate(self, done):
        """The teacher (the evaluated network) at every evaluation, the student at the last one only:
        a pass over Cityscapes' validation set costs as much as ~200 training iterations."""
        data, device, args = self.data, self.device, self.args
        miou, per_class, _ = evaluate(self.tracked["teacher"], self.val_loader, data, device, args)
        self.last_eval = dict(miou=miou, per_class_iou=per_class)
        line = f"eval it {done} | teacher mIoU {miou:.2f}"
        if done == args.iters:
            student_miou, _, _ = evaluate(self.tracked["student"], self.val_loader, data, device, args)
            self.last_eval["student_miou"] = student_miou
            line += f" | student mIoU {student_miou:.2f}"
        if "lesion" in data.class_names:  # ISIC: the paper reports the lesion IoU, pooled over the set (§7)
            self.last_eval["lesion_iou"] = per_class[data.class_names.index("lesion")]
            line += f" | teacher lesion IoU {self.last_eval['lesion_iou']:.2f}"
        self.print(line)
        self.print("-- per class: " + " ".join(f"{n}={v:.1f}" for n, v in zip(data.class_names, per_class)))
        self.metrics(iter=done, **self.last_eval)
        if self.main:
            now = time.perf_counter()
            state = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                     for name, obj in self.tracked.items()}
            state.update(iter=done, timed_iters=self.timed_iters, timed_seconds=self.timed_seconds,
                         wall_seconds=self.wall_seconds + now - self.clock_start, rng=rng_state())
            atomic_torch_save(state, self.checkpoint_path)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def print(self, line):
        if self.main:
            tqdm.write(line)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, **record):
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def load_checkpoint(self):
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--resume: cannot read {self.checkpoint_path}: {e}")
        set_rng_state(state["rng"])
        return state

    def finish(self):
        """results.json and preview.png; the last line on stdout is `FINAL mIoU=<teacher mIoU>`."""
        if self.args.benchmark:
            record = self.benchmark.report()
            self.leave_process_group()
            return record
        self.bar.close()
        args = self.args
        if not hasattr(self, "last_eval"):  # resumed from a checkpoint written at the very end
            self.evaluate(args.iters)
        results = dict(self.last_eval, iters=args.iters, method=self.method, dataset=args.dataset,
                       n_labeled=len(self.data.labeled), arch=args.arch,
                       train_seconds=self.wall_seconds + time.perf_counter() - self.clock_start,
                       seconds_per_iter=self.timed_seconds / max(self.timed_iters, 1),
                       resumed_from=self.start_iter)
        if self.world > 1:
            results["world_size"] = self.world
        if self.main:
            atomic_write_png(self.out / "preview.png",
                             preview(self.tracked["teacher"], self.data.val, self.data, self.device, args))
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
            self.print(f"results in {self.out}: teacher mIoU {results['miou']:.2f}, student "
                       f"{results['student_miou']:.2f}, {results['seconds_per_iter']:.3f} s/it")
            self.log_file.close()
            self.metrics_file.close()
            print(f"FINAL mIoU={results['miou']:.2f}", flush=True)
        self.leave_process_group()
        return results

    def leave_process_group(self):
        """Under torchrun: no process leaves before the others are done, and each leaves cleanly."""
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# Dense peak TFLOP/s of one GPU from the vendors' data sheets: (name contains, bf16/fp16, TF32), the first
# match wins. fp32 runs count against TF32 (enabled on CUDA here). Add your card to get its utilisation.
PEAK_TFLOPS = [("H100 PCIe", 756, 378), ("H100 NVL", 835, 418), ("H100", 989, 495), ("H200", 989, 495),
               ("A100", 312, 156), ("L40S", 362, 183), ("L4", 121, 60), ("A10", 125, 62.5)]


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


class Benchmark:
    """--benchmark N: the script's own loop on two cached batches per stream (`stream`), so it times
    the training step: one iteration under torch's FLOP counter, a few warm-up iterations, N timed ones.
    Then the evaluation speed and, on real data, the loader's throughput; one summary, no files."""

    def __init__(self, run):
        self.run, self.args, self.device = run, run.args, run.device
        self.real_data = self.args.dataset == "demo" or self.args.data_root is not None

    def iterations(self):
        from torch.utils.flop_counter import FlopCounterMode
        args, run, optimizer = self.args, self.run, self.run.tracked["optimizer"]
        self.loading = self.loader_throughput() if self.real_data else None
        counter = FlopCounterMode(display=False)
        with counter:  # FLOPs of one iteration (forward and backward passes), counted once
            set_lr(optimizer, args, 0)
            yield 0
        self.flops = counter.get_total_flops() * self.run.world  # all processes
        if args.compile:
            run.compile()
        warmup = (3 if self.device.type == "cuda" else 1) + (3 if args.compile else 0)
        for it in range(1, 1 + warmup):  # allocation, cudnn autotuning, compilation: not timed
            set_lr(optimizer, args, it)
            yield it
        run.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started, images = time.perf_counter(), BENCHMARK_IMAGES[0]
        for it in range(1 + warmup, 1 + warmup + args.benchmark):
            set_lr(optimizer, args, it)
            yield it
        run.sync()
        self.seconds_per_iter = (time.perf_counter() - started) / args.benchmark
        self.images_per_iter = (BENCHMARK_IMAGES[0] - images) // args.benchmark * run.world  # all processes

    def loader_throughput(self):
        """Images/s that the real training loader delivers (reading, augmentation, collation) with
        --num-workers workers, summed over the processes."""
        args, data = self.args, self.run.data
        batches = train_loader(TrainSet(data.train, args.crop_size, args.aug), np.arange(len(data.train)),
                               args, stream_id=99, start=0)
        next(batches)  # worker start-up is not counted
        n, started = max(10, 4 * args.num_workers), time.perf_counter()
        for _ in range(n):
            next(batches)
        del batches
        return n * args.batch_size / (time.perf_counter() - started)

    def eval_seconds(self):
        """Seconds to evaluate the whole validation set once (timed on a few batches)."""
        args, val, teacher = self.args, self.run.data.val, self.run.tracked["teacher"]
        n = min(len(val), args.batch_size * (4 if self.device.type == "cuda" else 1) * self.run.world)
        subset = val_loader(Split(val.names[:n], val.load, val.sizes[:n]), args)
        if self.device.type == "cuda":
            evaluate(teacher, subset, self.run.data, self.device, args)  # cudnn autotuning for the new shapes
        self.run.sync()
        started = time.perf_counter()
        evaluate(teacher, subset, self.run.data, self.device, args)
        self.run.sync()
        return (time.perf_counter() - started) / n * len(val)

    def report(self):
        args, device, s = self.args, self.device, self.seconds_per_iter
        images = self.images_per_iter
        if device.type == "cuda":
            memory, memory_kind = torch.cuda.max_memory_allocated(device) / 2 ** 30, "peak GPU memory"
        else:
            import resource
            memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "peak RSS"
        peak = peak_tflops(device, args.amp)
        achieved = self.flops / s / 1e12
        eval_s = self.eval_seconds()
        evals = math.ceil(args.iters / args.eval_every) + 1  # the teacher's, and the student's at the end
        record = dict(script=Path(sys.argv[0]).name, method=self.run.method, dataset=args.dataset,
                      arch=args.arch, device=device_name(device), amp=args.amp,
                      compile=args.compile_mode if args.compile else None,
                      world_size=self.run.world, batch_size=args.batch_size, crop_size=list(args.crop_size),
                      data="real" if self.real_data else "synthetic", ms_per_iter=1000 * s, iters_per_s=1 / s,
                      images_per_s=images / s, peak_memory_gib=memory, memory_kind=memory_kind,
                      tflop_per_iter=self.flops / 1e12, tflops=achieved, peak_tflops=peak,
                      mfu=achieved / peak if peak else None, eval_seconds=eval_s, iters=args.iters,
                      train_minutes=args.iters * s / 60, run_minutes=(args.iters * s + evals * eval_s) / 60,
                      loader_images_per_s=self.loading)
        if self.run.main:
            precision = args.amp if args.amp != "off" else "TF32"
            utilisation = (f"{100 * record['mfu']:.1f}% of the {peak:g} TFLOP/s {precision} peak" if peak
                           else "peak unknown for this device")
            lines = [f"benchmark: {record['script']} | {args.dataset}, {args.arch}, batch {args.batch_size} at "
                     f"{args.crop_size[0]}x{args.crop_size[1]} ({record['data']} data) | {record['device']}, "
                     f"amp {args.amp}{f', compiled ({args.compile_mode})' if args.compile else ''}"
                     f"{f', {self.run.world} processes' if self.run.world > 1 else ''}",
                     f"  train step: {1000 * s:.1f} ms/it, {1 / s:.2f} it/s, {images / s:.1f} images/s "
                     f"({images} per iteration), {memory_kind} {memory:.2f} GiB",
                     f"  FLOPs: {record['tflop_per_iter']:.3f} TFLOP/it -> {achieved:.2f} TFLOP/s, {utilisation}",
                     f"  evaluation: {eval_s:.1f} s per pass over the {len(self.run.data.val)} validation images",
                     f"  {args.iters} iterations: {record['train_minutes']:.1f} min of training, "
                     f"{record['run_minutes']:.1f} min with {evals} evaluations"]
            if self.loading is not None:
                bound = "loading" if self.loading < images / s else "compute"
                lines.append(f"  loader: {self.loading:.1f} images/s with {args.num_workers} workers per process, "
                             f"the step needs {images / s:.1f}: {bound} bounds the run")
            for line in lines:
                print(line)
            print("BENCHMARK " + json.dumps(record), flush=True)
        return record


def palette(num_classes):
    """Distinct colours per class (Pascal's bit-interleaved palette); 255 = white."""
    colours = np.zeros((256, 3), np.uint8)
    for c in range(256):
        r = g = b = 0
        cid = c
        for shift in range(7, -1, -1):
            r |= (cid & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        colours[c] = (r, g, b)
    colours[IGNORE] = 255
    return colours


@torch.no_grad()
def preview(net, split, data, device, args, n=4):
    """image | ground truth | prediction, one row per validation image (the first n)."""
    net.eval()
    colours, rows = palette(data.num_classes), []
    for i in range(min(n, len(split))):
        image, label = split.load(i)
        x, _ = to_device(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], None, device,
                         data.mean, data.std)
        with autocast(args, device), eager(args):
            pred = net(x).argmax(1)[0].cpu().numpy()
        rows.append(np.concatenate([image, colours[label], colours[pred]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


# ---------------------------------------------------------------------------------------------------
# 8. Paper tables: the published numbers, several seeds per cell, a summary beside the paper's
# ---------------------------------------------------------------------------------------------------
# Labeled counts of each table's columns; "All" is the training set's size, as results.json records it.
PAPER_COUNTS = {"pascal_aug": (106, 212, 529, 1323, 10582), "cityscapes": (100, 372, 744, 2975), "isic2017": (50, 2000)}
# (dataset, arch, method) -> one value per PAPER_COUNTS column, a mean or (mean, std over 5 runs), None = not run.
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
METHOD_ORDER = ["baseline", "stdaug", "vat", "ict", "cutout", "cutmix"]


def run_label(results, args):
    """The method, tagged with what sets a run apart from the protocol (a crop, several CutMix boxes)."""
    tags = [results["method"]]
    default_crop_size = DATASETS.get(results["dataset"], {}).get("crop_size")
    if args.get("crop_size") and default_crop_size and tuple(args["crop_size"]) != tuple(default_crop_size):
        tags.append("crop {}x{}".format(*args["crop_size"]))
    if args.get("n_boxes", 1) != 1:
        tags.append(f"{args['n_boxes']} boxes")
    return ", ".join(tags)


def collect_results(paths):
    """{(dataset, arch, label, n_labeled): [score, ...]} from results.json files (ISIC: the lesion IoU);
    unreadable or incomplete ones are reported on stderr and skipped."""
    cells = {}
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
            args_path = Path(path).parent / "args.json"
            args = json.loads(args_path.read_text()) if args_path.is_file() else {}
            score = results["lesion_iou" if results["dataset"] == "isic2017" else "miou"]
            key = (results["dataset"], results["arch"], run_label(results, args), int(results["n_labeled"]))
            cells.setdefault(key, []).append(float(score))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            print(f"skipped {path}: {type(e).__name__} {e}", file=sys.stderr)
    return cells


def paper_value(dataset, arch, label, n):
    counts, values = PAPER_COUNTS.get(dataset, ()), PAPER_RESULTS.get((dataset, arch, label))
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
        labels, counts = sorted({k[2] for k in keys}, key=order), sorted({k[3] for k in keys})
        metric = "lesion IoU" if dataset == "isic2017" else "mIoU"
        lines += [f"{dataset}, {arch}: {metric} (%), ours mean ± std [runs] / paper", "",
                  "| method | " + " | ".join(map(str, counts)) + " |", "|---" * (len(counts) + 1) + "|"]
        for label in labels:
            row = []
            for n in counts:
                v = cells.get((dataset, arch, label, n), [])
                ours = "—" if not v else f"{np.mean(v):.2f}" + (f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else "")
                row.append(f"{ours} [{len(v)}] / {paper_value(dataset, arch, label, n)}")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "no finished runs (results.json) found"


def run_seeds(argv):
    """python common.py seeds SCRIPT [--seeds S ...] [--runs RUNS] [--dry-run] -- SCRIPT'S OPTIONS

    Runs SCRIPT once per seed into RUNS/<script>_<dataset>_<arch>_<n>_s<seed>: finished runs are skipped,
    unfinished ones resumed. The seed goes to --split-seed (a new labeled subset, as the paper's Cityscapes
    and ISIC runs) or, when a --split-file fixes the subset (Pascal), to --seed. Then prints the summary."""
    import shlex
    import subprocess
    parser = argparse.ArgumentParser(prog="python common.py seeds", description=" ".join(run_seeds.__doc__.split("\n\n")[1].split()))
    parser.add_argument("script", help="train_*.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[12345, 23456, 34567, 45678, 56789],
                        help="default: the original's Cityscapes split seeds")
    parser.add_argument("--runs", default="runs", help="folder of the run folders")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    for flag in ("--seed", "--split-seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise UserError(f"seeds: {flag} is set per seed by this tool; leave it out of the script's options")
    script = Path(opts.script) if Path(opts.script).is_file() else Path(__file__).resolve().parent / opts.script
    if not script.is_file():
        raise UserError(f"seeds: no script {opts.script}")
    known = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--dataset", "--arch", "--n-labeled", "--split-file"):
        known.add_argument(flag)
    given = known.parse_known_args(rest)[0]
    dataset = given.dataset or TrainArgs.dataset
    protocol = DATASETS.get(dataset, {})
    arch, n = given.arch or protocol.get("arch"), int(given.n_labeled or protocol.get("n_labeled", -1))
    vary = "seed" if given.split_file else "split-seed"
    outs, failed = [], []
    for seed in opts.seeds:
        out = Path(opts.runs) / f"{script.stem}_{dataset}_{arch}_{'all' if n == -1 else n}_s{seed}"
        outs.append(out)
        if (out / "results.json").is_file():
            print(f"finished: {out}")
            continue
        command = [sys.executable, str(script), *rest, f"--{vary}", str(seed), "--out", str(out)]
        if (out / "checkpoint.pt").is_file():
            command.append("--resume")
        elif out.is_dir() and not opts.dry_run:  # stopped before its first checkpoint: start it again
            leftovers = {p.name for p in out.iterdir()}
            if not leftovers <= {"args.json", "log.txt", "metrics.jsonl"}:
                raise UserError(f"seeds: {out} holds {sorted(leftovers)} but no checkpoint.pt; move it away")
            for name in leftovers:
                (out / name).unlink()
        print("$ " + shlex.join(command), flush=True)
        if not opts.dry_run and subprocess.call(command) != 0:
            failed.append(seed)
    print(summary(collect_results(out / "results.json" for out in outs if (out / "results.json").is_file())))
    if failed:
        print(f"failed seeds: {' '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


def cost_table(argv):
    """python common.py costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] [-- OPTIONS]

    Runs `train_<method>.py --dataset D --benchmark N OPTIONS` for every pair (under torchrun when --nproc
    is above 1; synthetic data unless OPTIONS give --data-root) and prints the README's cost table."""
    import subprocess
    parser = argparse.ArgumentParser(prog="python common.py costs", description=" ".join(
        cost_table.__doc__.split("\n\n")[1].split()))
    parser.add_argument("--datasets", nargs="+", default=["cityscapes", "pascal_aug", "isic2017"],
                        choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per cell")
    parser.add_argument("--nproc", type=int, default=1, help="processes per cell (torchrun)")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    here = Path(__file__).resolve().parent
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


if __name__ == "__main__":
    sys.excepthook = _excepthook
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "seeds":  # python common.py seeds train_cutmix.py --seeds 1 2 3 -- --dataset cityscapes ...
        sys.exit(run_seeds(sys.argv[2:]))
    elif command == "costs":  # python common.py costs --datasets cityscapes --methods cutmix --iters 50
        cost_table(sys.argv[2:])
    elif command == "summary":  # python common.py summary [runs/]
        print(summary(collect_results(sorted(Path(sys.argv[2] if len(sys.argv) > 2 else "runs").rglob("results.json")))))
    elif len(sys.argv) != 4 or command != "sbd-to-aug":  # one-time preparation of Pascal's SBD labels
        sys.exit("usage: python common.py sbd-to-aug SBD_ROOT VOC_ROOT  (builds VOC2012/SegmentationClassAug from "
                 "SBD's dataset/cls/*.mat; README 'Datasets')\n"
                 "       python common.py seeds SCRIPT [--seeds S ...] [--dry-run] -- SCRIPT_OPTIONS\n"
                 "       python common.py summary [RUNS_DIR]\n"
                 "       python common.py costs [--datasets D ...] [--methods M ...] [--iters N] [--nproc K] "
                 "[-- OPTIONS]")
    else:
        sbd_to_aug(Path(sys.argv[2]), Path(sys.argv[3]))
