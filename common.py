"""What the paper takes for granted, shared by every train_*.py script.

A script holds its method: its loop (a mean teacher, or self-training) and its perturbation. This module
holds what is around the loop, in the order a script uses it. Read the first part; the rest is a catalogue.

  Read first (what a training step runs)
    1. Arguments and protocols   TrainArgs, parse_args: dataset -> arch -> method -> command line
    2. Reproducibility, device   seed_everything, setup_device, autocast
    3. Data flow                 load_dataset (labeled subset, unlabeled images), augmentation, streams,
                                 to_device
    4. Mean teacher, optimizer   make_teacher, ema_update, RepeatAdam, set_lr, set_train_mode, forward_each,
                                 supervised_loss
    5. Metrics, evaluation       confusion matrix, IoU, evaluate
    6. Run                       run folder, log, metrics.jsonl, checkpoints, results; load_model
    7. torchrun                  several processes: local_rows, per_share, global_mean, all_reduce_grads
  Catalogues (read per dataset or per architecture)
    8. Dataset readers           demo, folder, cityscapes, pascal_aug, isic2017
    9. Networks                  build_net (the networks themselves: cutmixseg/nets.py)
   10. Today's protocol          --protocol unimatch: UniMatch's settings, lists (cutmixseg/splits/),
                                 weak view, OHEM, sliding windows, its Cityscapes and Pascal readers
   11. --benchmark               the loop timed instead of trained
   12. Strong views              FixMatch's and UniMatch's: strong_view, cutmix_box, pseudo_label_loss

Below it, cutmixseg/ holds the rest of what a run executes and imports nothing of this file: files.py (bad
input, atomic files, image reading), guard.py (the run folder, --resume), prepare.py (data checks, caches,
split files), crops.py (today's crop), pictures.py, demo.py, nets.py, timing.py. Above it, tools/ holds
commands that use this file
(`python -m tools predict | evaluate | costs | seeds | summary | compare | loader | sbd-to-aug`).
Copy this file, cutmixseg/ and one train_*.py into a project and that copy trains on its own.
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cutmixseg import crops, demo, files, guard, nets, pictures, prepare, timing
from cutmixseg.files import (  # noqa: F401
    CHECKPOINTED, IGNORE, IMAGE_SUFFIXES, UserError, atomic_write, excepthook, image_files, image_size,
    one_report_of_dead_workers, read_image, read_mask)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---- 1. Arguments and protocols -------------------------------------------------------------------
def arg(default=None, help="", **kw):
    """A dataclass field that is a command-line option (--kebab-case), with its help and choices."""
    return field(default=default, metadata=dict(help=help, cli=True, **kw))

def resolved(default=None):
    """A dataclass field that is no option: the protocols set it (saved in args.json like the rest)."""
    return field(default=default, metadata=dict(cli=False))

# Dataset protocols, the paper's settings. aug: hflip, vflip, transpose, hung_scale (0.5..1.5 in steps
# of 0.1), rot (degrees), max_scale. crop_size None: the training images' own size. Cityscapes' split
# seeds in the paper: 12345, 23456, ..., 56789; Pascal's 106 labels = 1/100 of train_aug.
DATASETS = {
    "demo": dict(arch="unet_small", n_labeled=60, crop_size=None, batch_size=8, iters=1500, eval_every=500,
                 aug=dict(hflip=True), num_workers=0),
    "folder": dict(arch="deeplabv2", n_labeled=-1, crop_size=None, batch_size=10, iters=40000,
                   eval_every=1000, aug=dict(hflip=True)),
    "cityscapes": dict(arch="deeplabv2", n_labeled=372, crop_size=(256, 512), batch_size=4, iters=40000,
                       eval_every=1000, aug=dict(hflip=True)),
    "pascal_aug": dict(arch="deeplabv2", n_labeled=106, crop_size=(321, 321), batch_size=10, iters=40000,
                       eval_every=1000, aug=dict(hflip=True, hung_scale=True)),
    # SGD with a poly schedule; the original script's lr 0.1 (the paper says 0.05) belongs to the Dense
    # U-Net, hence per-arch rates that win over ARCHS' Adam ones
    "isic2017": dict(arch="denseunet161", n_labeled=50, crop_size=(224, 224), batch_size=10, iters=40000,
                     eval_every=400,
                     aug=dict(hflip=True, vflip=True, transpose=True, rot=45.0, max_scale=1.1),
                     optimizer="sgd", lr_schedule="poly", weight_decay=5e-4, lesion_scoring=True,
                     arch_overrides=dict(denseunet161=dict(lr=0.1, freeze_bn=False),
                                         deeplabv2=dict(lr=2.5e-4), unet_small=dict(lr=0.1))),
}
# Architecture protocols: the head's learning rate, the backbone's share of it, BatchNorm frozen or not
# (the pretrained backbone's, frozen_bn_modules(), or all of DeepLab v2's). Paper Table 5 (Pascal, Adam);
# DeepLab v3+: the original's wrapper put no parameter in the pretrained group, so all run at 1e-5.
ARCHS = {
    "deeplabv2": dict(lr=3e-5, backbone_lr_mult=0.1, freeze_bn=True),
    "unet_small": dict(lr=1e-3, backbone_lr_mult=1.0, freeze_bn=False),
    "deeplabv3plus": dict(lr=1e-5, backbone_lr_mult=1.0, freeze_bn=True),
    "denseunet161": dict(lr=3e-4, backbone_lr_mult=0.1, freeze_bn=True),
    "pspnet101": dict(lr=1e-4, backbone_lr_mult=0.1, freeze_bn=True),
    # today's protocol's (UNIMATCH)
    "deeplabv3plus_deepstem": dict(lr=0.01, backbone_lr_mult=0.1, freeze_bn=False),
}
@dataclass
class TrainArgs:
    """Options shared by every train_*.py, in the same order everywhere; None = from the protocol."""
    dataset: str = arg("demo", "demo (built in), folder (your own), or the official downloads",
                       choices=list(DATASETS))
    protocol: str = arg("paper", "paper (DeepLab v2, half-size Cityscapes, 40k iterations) or unimatch "
                                 "(today's: README 'Under today's protocol')", choices=["paper", "unimatch"])
    data_root: str = arg(None, "the dataset's folder (default: data/<dataset>, $CITYSCAPES_DATASET first)")
    n_labeled: int = arg(None, "labeled training images; -1 = all (default: the dataset's)")
    split_seed: int = arg(12345, "seed of the labeled subset, independent of --seed")
    split_file: str = arg(None, "the labeled images: a list of names, "
                                "or the original's .pkl index permutation")
    arch: str = arg(None, "network (default: the dataset's)", choices=list(ARCHS))
    no_pretrained: bool = arg(False, "random initialisation instead of ImageNet weights")
    backbone_weights: str = arg(None, "deeplabv3plus_deepstem's ImageNet weights: "
                                      "UniMatch's pretrained/resnet101.pth")
    iters: int = arg(None, "training iterations (default: the dataset's; today's protocol: from --epochs)")
    epochs: int = arg(None, "today's protocol: passes over the unlabeled images "
                            "(default: UniMatch's 80 Pascal, 240 Cityscapes); --iters wins")
    batch_size: int = arg(None, "images per labeled batch and per unlabeled batch (default: the dataset's)")
    lr: float = arg(None, "learning rate of the head (default: the protocol's); the pretrained backbone's is "
                          "1/10 of it, but all of it for deeplabv3plus, unet_small and today's Cityscapes")
    crop_size: tuple = arg(None, "training crop, H,W or one number (default: the dataset's)", parse="size")
    eval_every: int = arg(None, "evaluate and checkpoint every this many iterations (default: the dataset's)")
    seed: int = arg(1, "seed of initialisation, sample order, augmentation and masks")
    device: str = arg("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    out: str = arg(None, "run folder (default: runs/<script>_<dataset>_<n_labeled>_s<seed>)")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint")
    amp: str = arg(None, "bf16/fp16 autocast; off: plain fp32, TF32 off; tf32: fp32 with TF32 convolutions, "
                         "PyTorch's default (default on CUDA: bf16, today's protocol tf32, as UniMatch)",
                   choices=["off", "tf32", "bf16", "fp16"])
    deterministic: bool = arg(False, "deterministic kernels (with --num-workers 0: bit-exact resume)")
    num_workers: int = arg(None, "DataLoader worker processes (default: the dataset's, else min(8, CPUs))")
    num_classes: int = arg(None, "class count for --dataset folder (default: from the masks)")
    teacher_alpha: float = arg(0.99, "EMA decay of the teacher, which is the evaluated network")
    dedupe_params: bool = arg(False, "deeplabv2: step each backbone weight once per iteration, not 3-4 times")
    aspp_all_branches: bool = arg(False, "deeplabv2: sum all four ASPP branches, "
                                         "not only the original's first two")
    cache_dir: str = arg(None, "prepared data and checks "
                               "(default: beside the data, else ~/.cache/cutmix-seg)")
    no_cache: bool = arg(False, "today's Cityscapes decoded on the fly, not once into the cache (~25 GB)")
    unlabeled_dir: str = arg(None, "a folder of images without masks (nested, any format) "
                                   "for the unlabeled stream")
    compile: bool = arg(False, "torch.compile student and teacher for training (pays off on long CUDA runs)")
    compile_mode: str = arg("reduce-overhead", "torch.compile mode (reduce-overhead: CUDA graphs)", choices=[
        "reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs"])
    benchmark: int = arg(0, "time this many iterations instead of training (docs/speed.md); writes nothing")
    # --- no options: the protocols set these ---
    aug: dict = resolved()                # the training crops' augmentation, see DATASETS
    optimizer: str = resolved("adam")     # adam or sgd
    lr_schedule: str = resolved("none")   # none, or poly: lr · (1 - it/iters)^poly_power
    poly_power: float = resolved(0.9)
    momentum: float = resolved(0.9)       # SGD's
    weight_decay: float = resolved(0.0)
    nesterov: bool = resolved(False)      # SGD's
    backbone_lr_mult: float = resolved()  # the pretrained backbone's share of --lr
    freeze_bn: bool = resolved()          # BatchNorm frozen: statistics fixed, in eval mode
    pretrained: bool = resolved(True)     # ImageNet weights: not with --no-pretrained,
                                          # nor --benchmark (random)
    lesion_scoring: bool = resolved(False)  # ISIC: the predicted lesion hole-filled, its IoU reported
    iters_per_epoch: int = resolved()     # today's protocol: as UniMatch's sampler deals them
                                          # (epochs_to_iters)
    loss_shares: int = resolved(1)        # the batch's shares whose loss means are averaged (per_share):
                                          # today's 4
    ohem: dict = resolved()               # unimatch, Cityscapes: the labeled loss is OHEM
                                          # (ohem_loss's keywords)
    eval_window: int = resolved()         # unimatch, Cityscapes: evaluation by sliding windows,
                                          # the crop's side
    student_every_eval: bool = resolved(False)  # the student evaluated every time, not at the end only
    reported_net: str = resolved("teacher")  # today's protocol: the network whose best evaluation is reported
    PER_DATASET: ClassVar[dict] = {}      # a method's values that differ by dataset:
                                          # {dataset: {field: value}}
    PER_PROTOCOL: ClassVar[dict] = {}     # the same by protocol: {"unimatch": {field: value}}

def parse_size(text, option="--crop-size"):
    """'256,512' or '321' or (256, 512) -> (H, W)."""
    try:
        values = text if isinstance(text, (tuple, list)) else str(text).replace("x", ",").split(",")
        parts = [int(v) for v in values]
    except ValueError:
        parts = []
    parts = parts * 2 if len(parts) == 1 else parts
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"{option} expects H,W or one number (e.g. 256,512), got {text!r}")
    return tuple(parts)

def command_line(args_class, argv=None, prog=None):
    """{field: value} of the options given on the command line, one --kebab-case option per arg() field;
    bad input ends as one line, never a traceback; a file name that is not UTF-8 printed with its own bytes
    (`prog`: the program argparse names, default the script)."""
    files.start_command()
    summary = " ".join((sys.modules["__main__"].__doc__ or "").split("\n\n")[0].split())  # first paragraph
    parser = argparse.ArgumentParser(prog, description=summary, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(args_class):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        if kind in (bool, "bool") and f.metadata.get("cli"):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.metadata.get("cli"):
            shown = "" if f.default is None else f" (default: {f.default})"
            parse = functools.partial(parse_size, option=flag) if f.metadata.get("parse") == "size" else kind
            parser.add_argument(flag, type=parse, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + shown)
    return vars(parser.parse_args(argv))

# Values out of range stop a run before anything is written: (field, test, what the option expects) (the
# methods' own options too, and toy2d.py's and patch_analysis.py's, where declared; NaN fails every test)
LIMITS = [*[(name, lambda v: v >= 1, "must be at least 1")
            for name in ("iters", "epochs", "batch_size", "eval_every", "n_boxes", "steps", "seeds", "grid",
                         "n_anchors")],
          ("n_labeled", lambda v: v == -1 or v > 0, "must be a positive count or -1 (all)"),
          *[(name, lambda v: 0 <= v <= 1, "must lie in [0, 1]") for name in ("teacher_alpha", "conf_thresh")],
          ("benchmark", lambda v: v >= 0, "expects a number of iterations"),
          *[(name, lambda v: 0 <= v < 2**32, "must lie in [0, 2**32)") for name in ("seed", "split_seed")],
          ("lr", lambda v: 0 < v < math.inf, "must be a positive number"),
          *[(name, lambda v: 0 <= v < math.inf, "must be 0 or more")
            for name in ("cons_weight", "vat_radius", "num_workers", "offset_range")],
          ("ict_alpha", lambda v: 0 < v < math.inf, "must be positive (λ ~ Beta(α, α))"),
          ("num_classes", lambda v: v is None or 2 <= v <= 255,
           "must lie in [2, 255]: masks hold 8-bit class indices, 255 = ignore")]

def check_limits(args):
    """One clear line for the first option of `args` (a dataclass) that LIMITS refuses."""
    for name, ok, expected in (limit for limit in LIMITS if hasattr(args, limit[0])):
        if getattr(args, name) is not None and not ok(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')} {expected}, got {getattr(args, name)}")

# recorded absolute: --resume works from anywhere
PATHS = ("data_root", "cache_dir", "unlabeled_dir", "split_file")

def parse_args(args_class, argv=None):
    """Command line -> resolved Args: field defaults, then the dataset's protocol, the arch's, the method's
    per-dataset values, and last the options given on the command line, which always win. With --resume,
    the run's own settings (its args.json) complete those given (cutmixseg/guard.py)."""
    given = command_line(args_class, argv)
    if given.get("resume"):  # the folder to resume: --out, or where these options write by default
        out = given.get("out")
        script = sys.argv[0] if sys.argv[0].endswith(".py") else None
        if not out and script:
            out = run_folder(script, resolve(args_class, given))
        given = guard.resume_settings(args_class, given, out)
    args = resolve(args_class, given)
    world = process_group()[1]
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch of all {world} processes: "
                        f"it must be divisible by {world}")
    if args.batch_size // world < 2 and args.arch in ("pspnet101", "deeplabv3plus", "deeplabv3plus_deepstem"):
        raise UserError(f"--batch-size {args.batch_size}: {args.arch}'s pooling branch trains BatchNorm "
                        f"on 1x1 maps, which needs at least 2 images per batch and process")
    args.device = str(resolve_device(args.device, world))
    args.amp = args.amp or default_amp(args.protocol, args.device)
    args.pretrained = not (args.no_pretrained or args.benchmark)
    return args

def default_amp(protocol, device):
    """The numerics when --amp is not given: off on the CPU; on CUDA bf16 autocast, or under today's protocol
    UniMatch's own, fp32 with PyTorch's default TF32 convolutions."""
    if not device.startswith("cuda"):
        return "off"
    return "tf32" if protocol == "unimatch" else "bf16"

def resolve(args_class, given):
    """The Args of the options `given`: the protocols' values under them, the limits checked, paths
    absolute."""
    dataset = given.get("dataset", args_class.dataset)
    name = given.get("protocol", args_class.protocol)
    protocol = dict(DATASETS[dataset])
    arch_overrides = protocol.pop("arch_overrides", {})
    if name == "unimatch":  # today's protocol wins over the arch's defaults
        if dataset not in UNIMATCH:
            raise UserError(f"--protocol unimatch covers --dataset {' and '.join(UNIMATCH)}, not {dataset}")
        arch = given.get("arch") or UNIMATCH_ALL["arch"]
        protocol.update({**ARCHS[arch], **UNIMATCH_ALL, **UNIMATCH[dataset], "arch": arch})
    else:
        if given.get("epochs"):
            raise UserError("--epochs counts today's protocol's epochs (--protocol unimatch); "
                            "here use --iters")
        arch = given.get("arch") or protocol["arch"]
        protocol.update(ARCHS[arch])
        protocol.update(arch_overrides.get(arch, {}))  # a dataset's word on one arch (ISIC's SGD)
        # nothing pretrained: one learning rate, BatchNorm learns from the data
        if given.get("no_pretrained"):
            protocol.update(backbone_lr_mult=1.0, freeze_bn=False)
    protocol.update(args_class.PER_DATASET.get(dataset, {}), **args_class.PER_PROTOCOL.get(name, {}))
    args = args_class(**{**protocol, **given})
    if args.num_workers is None:
        args.num_workers = min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    check_limits(args)
    args.data_root = args.data_root or (None if args.benchmark else default_root(args.dataset))
    for name in PATHS:
        if getattr(args, name, None):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    if args.protocol == "unimatch":
        resolve_unimatch(args, "n_labeled" in given)
    return args

# ---- 2. Reproducibility and device ----------------------------------------------------------------
def seed_everything(seed, deterministic=False):
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True

def resolve_device(name, world=1):
    """--device auto (CUDA when present), cpu, cuda, cuda:N -> torch.device, or one clear error; under
    torchrun every process takes the GPU of its LOCAL_RANK."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device expects auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and world > 1:
        if name != "cuda":
            raise UserError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                            f"choose the GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device

def setup_device(args):
    """Kernel settings, the process group under torchrun, the seeds; returns the torch.device."""
    device = torch.device(args.device)
    if process_group()[1] > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # off: the paper's plain fp32, TF32 off; tf32: PyTorch's defaults (convolutions)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = args.amp != "off"
        torch.backends.cuda.matmul.allow_tf32 = args.amp in ("bf16", "fp16")
    seed_everything(args.seed, args.deterministic)
    return device

def autocast(amp, device):
    """--amp off | tf32 | bf16 | fp16 as an autocast context for `device` (off and tf32: none)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

# ---- 3. Data flow: dataset -> labeled subset -> augmented crops -> infinite streams -> the device ---
class Split(torch.utils.data.Dataset):
    """Samples: load(i) -> (image uint8 (H, W, 3), label uint8 (H, W)), sizes (H, W); as a Dataset,
    tensors."""

    def __init__(self, names, load, sizes):
        self.names = list(names)
        self.load = load
        self.sizes = list(sizes)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        image, label = self.load(i)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(label)

# what load_dataset returns: Splits, the class count and names, the labeled indices into train
Data = collections.namedtuple("Data", "train val num_classes class_names labeled unlabeled")

def load_dataset(name, root=None, n_labeled=-1, split_seed=12345, split_file=None, num_classes=None,
                 cache_dir=None, unlabeled_dir=None, with_unlabeled=True, protocol="paper", no_cache=False):
    """The dataset `name` (section 8 reads each), its labeled subset and its unlabeled images: the training
    set (the paper's: labeled images too, as the original; today's protocol: the rest of it, as UniMatch's
    unlabeled.txt), then the images without masks of ROOT/unlabeled/ (folder) and unlabeled_dir."""
    if unlabeled_dir and not Path(unlabeled_dir).expanduser().is_dir():
        raise UserError(f"--unlabeled-dir {unlabeled_dir}: no such folder")
    folders = [Path(unlabeled_dir).expanduser()] if unlabeled_dir and with_unlabeled else []
    if name == "demo":  # generated (cutmixseg/demo.py)
        train, val = [Split(*s) for s in demo.demo_splits()]
        class_names = demo.DEMO_CLASSES
        num_classes = len(class_names)
        cache = cache_folder(folders[0], cache_dir) if folders else None
    else:
        root = require_root(root, name)
        cache = cache_folder(root, cache_dir)
        if protocol == "paper":
            read = dict(folder=functools.partial(folder_dataset, num_classes=num_classes),
                        cityscapes=cityscapes_dataset,
                        pascal_aug=functools.partial(pascal_aug_dataset, split_file=split_file),
                        isic2017=isic2017_dataset)
        else:
            read = dict(cityscapes=functools.partial(cityscapes_full_dataset, cached=not no_cache),
                        pascal_aug=pascal_unimatch_dataset)
        train, val, num_classes, class_names = read[name](root, cache)
        own = root / "unlabeled"  # folder's images without masks
        folders = [own] * (name == "folder" and with_unlabeled and own.is_dir()) + folders
    labeled = choose_labeled(train.names, n_labeled, split_seed, split_file)
    rest = np.setdiff1d(np.arange(len(train)), labeled) if protocol == "unimatch" else np.arange(len(train))
    stream = Split([train.names[i] for i in rest], lambda i: train.load(rest[i]),
                   [train.sizes[i] for i in rest])
    extra = unlabeled_split(name, folders, cache, unlabeled_dir, protocol) if folders else None
    # the training images first: the paper's stream, unchanged
    unlabeled = stream if extra is None else Split(
        stream.names + extra.names,
        lambda i: stream.load(i) if i < len(stream) else extra.load(i - len(stream)),
        stream.sizes + extra.sizes)
    return Data(train, val, num_classes, class_names, labeled, unlabeled if with_unlabeled else None)

def default_crop(sizes):
    """The training images' own size when they all share one up to 512x512, else 321x321 (Pascal's)."""
    shapes = set(map(tuple, sizes))
    (h, w) = shapes.pop() if len(shapes) == 1 else (321, 321)
    return (h, w) if h <= 512 and w <= 512 else (321, 321)

def choose_labeled(names, n_labeled, split_seed=12345, split_file=None):
    """Indices of the labeled images: the first n_labeled (-1: all) of RandomState(split_seed).permutation
    over the (sorted) names, or of the list in split_file (cutmixseg/prepare.py: read_split_file)."""
    n = len(names)
    if n_labeled > n:
        raise UserError(f"--n-labeled {n_labeled} is larger than the training set ({n} images)")
    if split_file:
        order = prepare.read_split_file(split_file, names)
        if n_labeled > len(order):
            raise UserError(f"--n-labeled {n_labeled} is larger than the {len(order)} names in --split-file "
                            f"{split_file}")
    else:  # RandomState's legacy stream: the same subsets as the original's on any numpy version
        order = np.arange(n) if n_labeled == -1 else np.random.RandomState(split_seed).permutation(n)
    return np.asarray(order[:len(order) if n_labeled == -1 else n_labeled], dtype=np.int64)

def augment(image, label, rng, crop, aug):
    """A random crop of one sample with the dataset's scaling and flips, as the original's transforms.

    image (H, W, 3) uint8, label (H, W) uint8 or None -> image (3, h, w) uint8, label (h, w) uint8 (255
    where padded), valid (h, w) uint8 (255 = image content, 0 = padding). Crops, rotations and scalings
    pull in pixels from outside the image: `valid` marks them, so that they carry no loss."""
    if aug.get("weak_view"):  # today's protocol: UniMatch's resize -> pad -> crop -> flip (section 10)
        img, lab, valid = weak_view(image, label, rng, crop[0], reference=aug["weak_view"] == "reference")
        # UniMatch pads with black before normalising: an alpha channel of 255 tells to_device that the
        # padding is image content to the network (valid still keeps it out of the losses)
        return torch.cat([img, torch.full_like(img[:1], 255)]), lab, valid
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    lab = torch.from_numpy(np.ascontiguousarray(label)) if label is not None else None
    valid = torch.full(img.shape[1:], 255, dtype=torch.uint8)
    ch, cw = crop
    # a window of crop/f resized to the crop
    f = 0.5 + rng.integers(0, 11) / 10 if aug.get("hung_scale") else 1
    wh, ww = round(ch / f), round(cw / f)
    if aug.get("rot") or aug.get("max_scale"):  # ISIC: rotated and scaled crop, no padding
        img, lab, valid = rotate_scale_crop(img, lab, valid, rng, crop, aug.get("rot") or 0,
                                            aug.get("max_scale") or 1)
    else:
        img, lab, valid = pad_to(img, lab, valid, wh, ww)
        y0 = round((img.shape[1] - wh) * rng.uniform())
        x0 = round((img.shape[2] - ww) * rng.uniform())
        img, valid = img[:, y0:y0 + wh, x0:x0 + ww], valid[y0:y0 + wh, x0:x0 + ww]
        lab = lab[y0:y0 + wh, x0:x0 + ww] if lab is not None else None
    if img.shape[1:] != (ch, cw):
        img, valid = resize(img, crop, "bilinear"), resize(valid[None], crop, "bilinear")[0]
        lab = resize(lab[None], crop, "nearest")[0] if lab is not None else None
    flips = [aug.get("hflip") and rng.uniform() < 0.5, aug.get("vflip") and rng.uniform() < 0.5,
             aug.get("transpose") and rng.uniform() < 0.5]
    for k, dims in enumerate(((-1,), (-2,), None)):
        if flips[k]:
            op = (lambda t: t.flip(dims)) if dims else (lambda t: t.transpose(-1, -2))
            img, valid = op(img), op(valid)
            lab = op(lab) if lab is not None else None
    return img.contiguous(), lab.contiguous() if lab is not None else None, valid.contiguous()

def pad_to(img, lab, valid, h, w):
    """Centred padding up to (h, w), as the original: image 0, label 255, valid 0."""
    ph, pw = max(h - img.shape[1], 0), max(w - img.shape[2], 0)
    if ph == 0 and pw == 0:
        return img, lab, valid
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(img, pads, value=0), F.pad(lab, pads, value=IGNORE) if lab is not None else None,
            F.pad(valid, pads, value=0))

def resize(t, size, mode):
    """Resize a (C, H, W) uint8 tensor; bilinear rounds back to uint8."""
    options = {} if mode == "nearest" else dict(align_corners=False)
    out = F.interpolate(t[None].float(), size=size, mode=mode, **options)[0]
    return out.round().clamp(0, 255).to(torch.uint8)

class TrainSet(torch.utils.data.Dataset):
    """Augmented crops, indexed by (sample index, augmentation seed): every crop is fixed by its stream
    position alone, the same in any worker, after a resume, whatever the worker count."""

    def __init__(self, split, crop, aug, with_label=True):
        self.split = split
        self.crop = crop
        self.aug = aug
        self.with_label = with_label

    def __getitem__(self, key):
        index, seed = key
        image, label = self.split.load(index)
        img, lab, valid = augment(image, label if self.with_label else None, np.random.default_rng(seed),
                                  self.crop, self.aug)
        return (img, lab, valid) if lab is not None else (img, valid)

class StreamSampler(torch.utils.data.Sampler):
    """Infinite stream of batches cut from passes over `indices`, each freshly shuffled (a batch may straddle
    two, as the original's repeating sampler). Pass k's order and every sample's augmentation seed derive
    from (seed, stream, k): starting at iteration `start` resumes the stream exactly. Under torchrun every
    process cuts the same global batch and keeps its own rows."""

    def __init__(self, indices, batch_size, seed, stream, start=0):
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.start = start

    def __iter__(self):
        n = len(self.indices)
        pos = self.start * self.batch_size  # position in the stream, counted in samples
        current_pass = None
        rank, world = process_group()
        share = self.batch_size // world
        while True:
            batch = []
            for _ in range(self.batch_size):
                k, j = divmod(pos, n)
                if k != current_pass:
                    order = np.random.default_rng([self.seed, self.stream, k]).permutation(n)
                    current_pass = k
                batch.append((int(self.indices[order[j]]), (self.seed, self.stream, pos)))
                pos += 1
            yield batch[rank * share:(rank + 1) * share]

def train_loader(dataset, indices, batch_size, seed, stream_id, start, num_workers):
    """Iterator over batches of `dataset` (indexed by (sample, augmentation seed)) from iteration `start`.
    The iterator draws its workers' seed from a generator of its own: from torch's global RNG, that draw
    would shift the dropout that follows between a run and its resume (which makes its streams after
    restoring the RNGs)."""
    sampler = StreamSampler(indices, batch_size, seed, stream_id, start)
    return one_report_of_dead_workers(iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))))

def val_loader(split, batch_size, num_workers=0):
    """Whole images at their own size; images of equal size share a batch, none is padded. Under
    torchrun each process takes every N-th batch (evaluate() sums the confusion matrices)."""
    batches = [[]]
    for i in range(len(split)):
        if batches[-1] and (split.sizes[i] != split.sizes[batches[-1][0]] or len(batches[-1]) == batch_size):
            batches.append([])
        batches[-1].append(i)
    rank, world = process_group()
    return torch.utils.data.DataLoader(split, batch_sampler=batches[rank::world],
                                       num_workers=min(num_workers, 4), pin_memory=torch.cuda.is_available())

@functools.lru_cache(maxsize=None)
def normalisation(device):
    """ImageNet mean and std as (1, 3, 1, 1) tensors on the device, made once: a copy from pageable host
    memory would wait for the GPU's queue to drain at every batch."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))

def normalise(images, device, valid=None):
    """uint8 images (B, 3, H, W) -> normalised float on the device, channels-last on CUDA; where `valid`
    (float (B, 1, H, W), on the device) is 0 the image becomes 0, the mean colour."""
    mean, std = normalisation(device)
    x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    x = x if valid is None else x * valid
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

def to_device(batch, device):
    """A loader batch on the device: (images, valid) -> (x, v), (images, labels, valid) -> (x, y, v). x:
    normalised (B, 3, H, W), 0 where padded: where v is 0, or a 4th (alpha) channel of the images is
    (ISIC's mirrored borders are no padding; today's protocol's black padding enters the network as it is,
    as UniMatch's); y: long, 255 = ignore; v: (B, 1, H, W), the loss mask, 1 = in the image."""
    *images_labels, valid = batch
    v = valid.to(device, non_blocking=True).float().div_(255).unsqueeze(1)
    images = images_labels[0]
    alpha = v if images.shape[1] == 3 else images[:, 3:].to(device, non_blocking=True).float().div_(255)
    x = normalise(images[:, :3], device, alpha)
    if len(images_labels) == 1:
        return x, v
    y = images_labels[1].to(device, non_blocking=True).long()
    return x, y, v

# ---- 4. Mean teacher and optimizer ----------------------------------------------------------------
def make_teacher(student):
    """An identical copy whose weights only ever move by EMA (no gradients)."""
    return copy.deepcopy(student).requires_grad_(False)

def ema_pairs(teacher, student):
    """(teacher tensors, student tensors): every float state entry, BN running statistics included."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    keys = [k for k, v in s_state.items() if v.is_floating_point()]
    return [t_state[k] for k in keys], [s_state[k] for k in keys]

@torch.no_grad()
def ema_update(pairs, alpha):
    """teacher <- alpha · teacher + (1 - alpha) · student, in place, for all float state: as the original,
    BatchNorm's running statistics included, no warm-up."""
    torch._foreach_lerp_(pairs[0], pairs[1], 1.0 - alpha)

class RepeatAdam(torch.optim.Adam):
    """Adam that steps each parameter group `repeat` times per call: how the original stepped DeepLab v2's
    backbone, whose parameter generator yielded every conv weight 3 times (4 for downsample convs), each
    occurrence updating the weight's moments and value in PyTorch 1.4's Adam. Grouped by multiplicity, the
    same arithmetic runs with vectorised (foreach) kernels instead of a slow per-tensor loop."""

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
    """Backbone at lr · backbone_lr_mult, the rest (the head) at lr; DeepLab v2's multiplicities kept."""
    wanted = hasattr(net, "backbone_modules") and (args.backbone_lr_mult != 1.0 or args.arch == "deeplabv2")
    # a net without one (unet_small): all at the head's rate
    backbone = net.backbone_modules() if wanted else []
    counts = {}
    for top in backbone:  # the original's walk: every module's recursive .parameters(), duplicates kept
        for m in top.modules():
            for p in m.parameters():
                if p.requires_grad:
                    counts[p] = counts.get(p, 0) + 1
    if args.dedupe_params or args.arch != "deeplabv2":
        counts = dict.fromkeys(counts, 1)
    groups = [dict(params=[p for p, c in counts.items() if c == repeat], lr=args.lr * args.backbone_lr_mult,
                   repeat=repeat, name=f"backbone x{repeat}") for repeat in sorted(set(counts.values()))]
    head = [p for p in net.parameters() if p.requires_grad and p not in counts]
    return groups + [dict(params=head, lr=args.lr, repeat=1, name="head")]

def make_optimizer(net, args):
    groups = param_groups(net, args)
    if args.optimizer == "adam":
        return RepeatAdam(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)

def set_lr(optimizer, args, it):
    """The learning rate of iteration `it`: constant, or poly lr · (1 - it/iters)^0.9 (ISIC), set before
    each iteration as the original's schedule did; poly_after (today's protocol): UniMatch sets the rate after
    each step, so iteration it runs at it - 1's (iterations 0 and 1 at the base rate)."""
    if args.lr_schedule in ("poly", "poly_after"):
        factor = max(0.0, 1 - max(it - (args.lr_schedule == "poly_after"), 0) / args.iters) ** args.poly_power
        for g in optimizer.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor

def set_train_mode(net, freeze_bn):
    """Train mode (the teacher's too, as the original: its dropout and unfrozen BatchNorm stay active),
    with BatchNorm in eval mode where the protocol freezes it: the net's frozen_bn_modules() (its
    pretrained backbone), else all of it (DeepLab v2). Evaluation leaves these modes as it found them."""
    net.train()
    for top in (net.frozen_bn_modules() if hasattr(net, "frozen_bn_modules") else [net]) if freeze_bn else []:
        for m in top.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return net

def forward_each(net, *batches):
    """[net(b) for b in batches], in one pass over their concatenation where no BatchNorm of `net` uses
    batch statistics (frozen, as all of DeepLab v2's, or in eval mode): the same outputs from fewer,
    larger kernels. Where BatchNorm trains, one pass each: joining them would change its statistics."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules()):
        return [net(b) for b in batches]
    return net(torch.cat(batches)).split([len(b) for b in batches])

def supervised_loss(logits, labels, ohem=None, shares=1):
    """Cross-entropy in fp32, the mean over the labeled pixels (255 = ignore) of the global batch; 0 (no
    gradient) for a batch without. shares (today's protocol: UniMatch's 4 GPUs): the mean of each share of the
    batch, averaged (per_share, section 7). ohem (today's protocol, Cityscapes): ohem_loss's keywords, each
    share's hardest pixels only (section 10). Returns this process's part of the loss under torchrun."""
    if ohem:
        return per_share(ohem_mean, shares, logits, labels, *ohem_limits(logits, labels, shares, **ohem))
    return per_share(cross_entropy_mean, shares, logits, labels)

def cross_entropy_mean(logits, labels):
    """(mean cross-entropy over the labeled pixels, their count); a mean over no pixel is 0, not 0/0 = NaN."""
    labeled = labels != IGNORE
    any_labeled = labeled.any()  # on the device, no sync
    mean = F.cross_entropy(logits.float(), torch.where(any_labeled, labels, 0), ignore_index=IGNORE)
    return mean * any_labeled, labeled.sum()

# ---- 5. Metrics and evaluation --------------------------------------------------------------------
def confusion_matrix(pred, target, num_classes):
    """(num_classes, num_classes) counts, rows = truth, columns = prediction; 255 ignored."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)

def iou_from_confusion(conf):
    """Per-class IoU pooled over the set; a class absent from prediction and truth counts 0, as the
    original."""
    conf = conf.double()
    inter = conf.diag()
    return inter / (conf.sum(0) + conf.sum(1) - inter).clamp(min=1)

@contextlib.contextmanager
def inference(net):
    """Eval mode, no gradients, the net uncompiled (each image size would cost a compilation, for passes that
    keep the GPU busy anyway); afterwards every module's mode is what it was, frozen BatchNorm included."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for m, mode in modes:
            m.training = mode

def evaluate(net, loader, device, num_classes, amp="off", lesion_scoring=False, window=None):
    """Per-class IoU (percent) of `net` on whole validation images: (mIoU, list, confusion matrix).
    lesion_scoring (ISIC): the predicted lesion (class 1) is hole-filled before scoring, as the original;
    window (today's protocol, Cityscapes): predicted by sliding windows of that side (section 10)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    with inference(net):
        for images, labels in loader:
            with autocast(amp, device):
                x = normalise(images, device)
                pred = (sliding_window(net, x, window) if window else net(x)).argmax(1)
            if lesion_scoring:
                pred = fill_holes(pred == 1).long()
            conf += confusion_matrix(pred, labels.to(device, non_blocking=True), num_classes)
    iou = iou_from_confusion(all_reduce_sum(conf).cpu()) * 100
    return iou.mean().item(), iou.tolist(), conf.cpu()

# ---- 6. Run: the run folder, its log, metrics, checkpoints and results ----------------------------
def run_folder(script, args):
    """The default run folder of resolved Args:
    runs/<script>_<dataset>[_unimatch][_<arch>]_<n_labeled>[_<list>]_s<seed>[_ss<split_seed>]: the arch
    when not the protocol's; under today's protocol a --split-file that --n-labeled did not pick (its
    folder's name for a labeled.txt, else its stem); the split seed when not 12345."""
    today = args.protocol == "unimatch"
    parts = [Path(script).stem, args.dataset] + (["unimatch"] if today else [])
    parts += [args.arch] if args.arch != (UNIMATCH_ALL if today else DATASETS[args.dataset])["arch"] else []
    parts += [args.n_labeled] + ([unimatch_list_name(args)] if today and unimatch_list_name(args) else [])
    parts += [f"s{args.seed}"] + ([f"ss{args.split_seed}"] if args.split_seed != 12345 else [])
    return Path("runs") / "_".join(map(str, parts))

def make_run(args, method, unlabeled=True):
    """The Run a script reports to (`unlabeled`: does it stream them); under --benchmark a Benchmark, which
    times the same loop instead of training (section 11)."""
    return (Benchmark if args.benchmark else Run)(args, method, unlabeled)

def run_nets(student, teacher):
    """(a run's nets, the name of the one evaluated every time): the teacher, or, for a self-training method
    (teacher None), the one network it trains, named student (checkpoint.pt, results.json "network")."""
    if teacher is None:
        return dict(student=student), "student"
    return dict(student=student, teacher=teacher), "teacher"

class Run:
    """One training run and its folder: args.json, labeled.txt, log.txt, metrics.jsonl, checkpoint.pt,
    results.json, preview.png, curves.png. A script calls load_data, start, stream, iterations,
    end_iteration (each iteration) and finish, in this order. Under torchrun process 0 writes."""

    def __init__(self, args, method, unlabeled=True):
        self.args = args
        self.method = method
        self.unlabeled = unlabeled  # does the method stream unlabeled images
        self.rank, self.world = process_group()
        self.main = self.rank == 0  # process 0 writes the run folder
        self.log_file = self.metrics_file = None  # opened by start()
        self.last_eval = None
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else f"train_{method}"
        args.out = args.out or str(run_folder(script, args))
        self.out = Path(args.out)
        self.checkpoint_path = Path(args.out) / "checkpoint.pt"
        if self.main:  # --out checked and claimed (cutmixseg/guard.py)
            guard.claim(self)
        self.resume = args.resume and self.checkpoint_path.is_file()

    def load_data(self):
        """The dataset, its labeled subset and (unless the method uses none) its unlabeled images; a crop left
        to the data becomes the images' own size."""
        a = self.args
        if a.unlabeled_dir and not self.unlabeled:
            print(f"--unlabeled-dir {a.unlabeled_dir}: ignored, {self.method} trains on labeled images only")
        data = load_dataset(a.dataset, a.data_root, a.n_labeled, a.split_seed, a.split_file, a.num_classes,
                            a.cache_dir, a.unlabeled_dir, self.unlabeled, a.protocol, a.no_cache)
        a.crop_size = a.crop_size or default_crop(data.train.sizes)
        if a.epochs:  # today's protocol counts epochs
            epochs_to_iters(a, len(data.unlabeled) if self.unlabeled else len(data.labeled), a.loss_shares)
        check_batchnorm_values(a, self.world)
        self.log_every = max(1, min(100, a.eval_every // 5))
        return data

    def start(self, data, device, student, teacher, optimizer, scaler, generator=None):
        """Create the folder and its log, or, resuming, restore from the checkpoint what the run tracks: the
        nets, the optimizer, the loss scaler, the method's generator (masks, probes) and the global RNGs.
        teacher None: a self-training method (FixMatch, UniMatch), whose one network is evaluated and
        reported."""
        self.data = data
        self.device = device
        self.start_iter = 0  # the checkpoint's iteration when resuming
        self.timer_state = None
        self.nets, self.evaluated = run_nets(student, teacher)
        self.tracked = dict(self.nets, optimizer=optimizer, scaler=scaler)
        self.tracked.update({} if generator is None else dict(generator=generator))
        self.val_loader = val_loader(data.val, self.args.batch_size, self.args.num_workers)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.out / "log.txt", "a", errors="surrogateescape")  # names as their bytes
            self.metrics_file = open(self.out / "metrics.jsonl", "a")
        if self.resume:  # cutmixseg/guard.py: one line for a checkpoint that cannot be read or does not fit
            self.start_iter, self.timer_state = guard.restore(self, self.tracked)
        else:
            record = dict(dataclasses.asdict(self.args), method=self.method)
            if self.main:
                atomic_write(self.out / "args.json", json.dumps(record, indent=2, default=str))
                atomic_write(self.out / "labeled.txt",
                             "".join(data.train.names[i] + "\n" for i in data.labeled))
            self.print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(record.items())))
            # the training images in the unlabeled stream: the rest, or all
            in_train = len(data.train) - len(data.labeled) * (self.args.protocol == "unimatch")
            unlabeled = (f"{len(data.unlabeled)} unlabeled ({len(data.unlabeled) - in_train} without masks)"
                         if data.unlabeled else "no unlabeled stream")
            self.print(f"data: {len(data.train)} train ({len(data.labeled)} labeled), {unlabeled}, "
                       f"{len(data.val)} val, {data.num_classes} classes; "
                       f"labeled: {data.labeled.tolist()[:20]}{' ...' if len(data.labeled) > 20 else ''}")
        a = self.args
        if a.epochs:
            self.print(f"epochs: {a.epochs} x {a.iters_per_epoch} iterations, "
                       f"as UniMatch's sampler deals the images to {a.loss_shares} GPUs")
        if a.protocol == "unimatch" and a.loss_shares != UNIMATCH_GPUS:
            images = a.batch_size // a.loss_shares
            self.print(f"loss: --batch-size {a.batch_size} does not split among UniMatch's {UNIMATCH_GPUS} "
                       f"GPUs; each loss is averaged over {a.loss_shares} shares of the batch ({images} "
                       f"image{'s' * (images > 1)} each), as on {a.loss_shares} GPUs")
        CHECKPOINTED.update(iter=self.start_iter or None, batch=self.args.batch_size,
                            crop=self.args.crop_size)
        if self.world > 1:
            for net in self.nets.values():  # one set of weights on every process, from process 0
                for t in net.state_dict().values():
                    torch.distributed.broadcast(t, 0)
            # the global RNGs (dropout) differ between processes; shared draws use their own generators
            s = int(np.random.default_rng([self.args.seed, self.rank, self.start_iter]).integers(2 ** 31))
            random.seed(s), np.random.seed(s), torch.manual_seed(s)
        self.sums, self.count = None, 0
        return self.start_iter

    def stream(self, split, indices, stream_id, with_label=True, dataset=None, per_iteration=1):
        """Infinite iterator over augmented training batches of `indices`, from the run's iteration on
        (`per_iteration` batches drawn per iteration). `dataset` replaces the default TrainSet (a method's
        own views, as std-aug's pairs); it is indexed by (sample index, augmentation seed) like TrainSet."""
        a = self.args
        return train_loader(dataset or TrainSet(split, a.crop_size, a.aug, with_label), indices, a.batch_size,
                            a.seed, stream_id, per_iteration * self.start_iter, a.num_workers)

    def compile(self):
        """--compile: torch.compile each net's forward in place (state dicts keep their names), for the
        training shapes only (static: no dynamic-shape graphs); evaluation runs eager (`inference`)."""
        for net in self.nets.values():
            net.compile(mode=self.args.compile_mode, dynamic=False)

    def iterations(self):
        """Iteration numbers from the start (or the checkpoint) to --iters, with a progress bar."""
        if self.args.compile:
            self.compile()
        self.bar = tqdm(range(self.start_iter, self.args.iters), initial=self.start_iter,
                        total=self.args.iters, desc=self.method, dynamic_ncols=True, leave=False,
                        disable=not self.main)
        self.timer = timing.Timer(self.device, self.timer_state)
        yield from self.bar

    def end_iteration(self, it, **scalars):
        """Accumulate the losses (no host-device sync); print every log interval; every --eval-every
        iterations and at the end evaluate, checkpoint and redraw the pictures."""
        values = torch.stack([v.detach().float() for v in scalars.values()])
        self.sums, self.count = values if self.sums is None else self.sums + values, self.count + 1
        self.timer.tick()
        done = it + 1
        if done % self.log_every == 0 or done == self.args.iters:
            means = (all_reduce_sum(self.sums) / (self.count * self.world)).tolist()  # mean over processes
            for name, value in zip(scalars, means):
                if not math.isfinite(value):  # as the original: a NaN loss ends the run
                    raise RuntimeError(f"the {name} loss became {value} by iteration {done}; stopping")
            lr = self.tracked["optimizer"].param_groups[-1]["lr"]
            rate = self.timer.rate()  # seconds per iteration
            self.print(f"it {done}/{self.args.iters} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in zip(scalars, means)) + f" | lr {lr:.1e} | {rate:.3f} s/it")
            self.metrics(iter=done, lr=lr, seconds_per_iter=rate, **dict(zip(scalars, means)))
            self.sums, self.count = None, 0
        if done % self.args.eval_every == 0 or done == self.args.iters:
            self.timer.pause()
            self.evaluate(done)
            self.save(done)
            self.draw()
            self.timer.go()

    def evaluate(self, done):
        """The teacher (the evaluated network) at every evaluation, the student at the last one only (a
        pass over Cityscapes' validation set costs ~200 training iterations): logged, and kept in last_eval.
        A run without a teacher evaluates its one network, the student, and says so ("network")."""
        data, args = self.data, self.args
        score = functools.partial(evaluate, loader=self.val_loader, device=self.device,
                                  num_classes=data.num_classes, amp=args.amp,
                                  lesion_scoring=args.lesion_scoring, window=args.eval_window)
        miou, per_class, _ = score(self.nets[self.evaluated])
        self.last_eval = dict(miou=miou, per_class_iou=per_class, network=self.evaluated)
        line = f"eval it {done} | {self.evaluated} mIoU {miou:.2f}"
        if "teacher" not in self.nets:  # one network: its mIoU is the student's
            self.last_eval["student_miou"] = miou
        elif done == args.iters or args.student_every_eval:
            self.last_eval["student_miou"] = score(self.nets["student"])[0]
            line += f" | student mIoU {self.last_eval['student_miou']:.2f}"
        if args.lesion_scoring:  # ISIC: the paper reports the lesion IoU, pooled over the set
            self.last_eval["lesion_iou"] = per_class[1]
            line += f" | {self.evaluated} lesion IoU {self.last_eval['lesion_iou']:.2f}"
        self.print(line)
        self.print("-- per class: " + " ".join(f"{n}={v:.1f}" for n, v in zip(data.class_names, per_class)))
        self.metrics(iter=done, **self.last_eval)

    def save(self, done):
        """checkpoint.pt, written atomically: what the run tracks, the global RNGs, the timer, the class
        names."""
        if self.main:
            state = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                     for name, obj in self.tracked.items()}
            state.update(iter=done, class_names=self.data.class_names, rng=guard.rng_state(),
                         timer=self.timer.saved())
            atomic_write(self.checkpoint_path, state)
            CHECKPOINTED["iter"] = done

    def draw(self):
        """preview.png (the teacher's predictions on the first validation images) and curves.png, redrawn."""
        if self.main:
            teacher, device, amp = self.nets[self.evaluated], self.device, self.args.amp
            def predict(images):
                with inference(teacher), autocast(amp, device):
                    return teacher(normalise(images, device)).argmax(1)
            pictures.draw_run(self.out, predict, self.data.val, self.data.class_names)

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

    def finish(self):
        """results.json; the last line on stdout is `FINAL mIoU=<teacher mIoU>`."""
        self.bar.close()
        if self.last_eval is None:  # resumed from a checkpoint written at the very end
            self.evaluate(self.args.iters)
        timer = self.timer.saved()
        best = guard.best_evaluations(self.out / "metrics.jsonl") if self.main else {}
        results = dict(self.last_eval, **best, iters=self.args.iters, method=self.method,
                       dataset=self.args.dataset, n_labeled=len(self.data.labeled), arch=self.args.arch,
                       train_seconds=timer["wall"], seconds_per_iter=self.timer.per_iteration(),
                       resumed_from=self.start_iter,
                       **(dict(world_size=self.world) if self.world > 1 else {}))
        final = results["miou"]  # the paper's: the teacher's last evaluation
        if self.args.protocol == "unimatch" and self.main:  # UniMatch's: the best evaluation of its network
            net = self.args.reported_net
            key = "best_miou" if net == "teacher" else "best_student_miou"
            results.update(reported=net, reported_miou=results[key], reported_iter=results[key + "_iter"])
            final = results["reported_miou"]
        if self.main:
            atomic_write(self.out / "results.json", json.dumps(results, indent=2))
            student = f", student {results['student_miou']:.2f}" if "teacher" in self.nets else ""
            self.print(f"results in {self.out}: {self.evaluated} mIoU {results['miou']:.2f}{student}, "
                       f"{results['seconds_per_iter']:.3f} s/it")
            if "reported" in results:
                both = (f" (best teacher {results['best_miou']:.2f}, "
                        f"best student {results['best_student_miou']:.2f})" if "teacher" in self.nets else "")
                self.print(f"reported, as UniMatch: the {results['reported']}'s best mIoU, {final:.2f} "
                           f"at iteration {results['reported_iter']}{both}")
            self.log_file.close()
            self.metrics_file.close()
            print(f"FINAL mIoU={final:.2f}", flush=True)
        leave_process_group()
        return results

def load_model(run_dir, net="teacher", device="cpu"):
    """(network in eval mode on `device`, info) from a run folder's args.json and checkpoint.pt, as Run.save
    wrote them, or from a checkpoint file (load_weights_file: UniMatch's released ones too). info:
    class_names, num_classes, mean and std (of normalisation), preprocess ("halve" for the paper's half-size
    Cityscapes; "resize 248x248" for ISIC; None), eval_window (sliding windows' side, today's protocol's
    Cityscapes; None: whole images), dataset, arch, iteration, lesion_scoring."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return load_weights_file(run_dir, net, device)
    if not (run_dir / "args.json").is_file():
        raise UserError(f"{run_dir}: no run there (expected a run folder with args.json and checkpoint.pt)")
    if not (run_dir / "checkpoint.pt").is_file():
        raise UserError(f"{run_dir} holds no checkpoint.pt: the run stopped before its first evaluation")
    if net not in ("teacher", "student"):
        raise UserError(f"--net expects teacher or student, got {net!r}")
    saved = guard.read_json(run_dir / "args.json", "record of the run's settings")
    try:
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        net = "student" if "teacher" not in state else net  # a self-training run's one network (section 12)
        names = list(state["class_names"])
        args = argparse.Namespace(arch=saved["arch"], aspp_all_branches=saved.get("aspp_all_branches", False),
                                  pretrained=False)
        model = build_net(args, len(names), torch.device(device))
        model.load_state_dict(state[net])
    except Exception as e:  # a truncated or foreign file, a state that does not fit the arch
        raise UserError(f"{run_dir / 'checkpoint.pt'}: cannot load the {net} from it "
                        f"({type(e).__name__}: {e})")
    # the paper's sizes
    preprocess = {"cityscapes": "halve", "isic2017": "resize 248x248"}.get(saved["dataset"])
    return model.eval(), dict(class_names=names, num_classes=len(names), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              preprocess=None if saved.get("protocol") == "unimatch" else preprocess,
                              eval_window=saved.get("eval_window"), dataset=saved["dataset"],
                              arch=saved["arch"], iteration=state["iter"],
                              lesion_scoring=saved.get("lesion_scoring", False))

def load_weights_file(path, net="teacher", device="cpu"):
    """(network in eval mode, info) of a checkpoint file without its run folder: UniMatch's ({'model':
    state dict with DDP's 'module.' prefixes, 'optimizer', 'epoch', 'previous_best'}), a bare state dict with
    or without the prefixes, or a kit run's checkpoint.pt (its `net`). The architecture and the class count
    are read from the weights' names and shapes; a deep-stem DeepLab v3+ of 19 classes is applied as
    UniMatch evaluates Cityscapes, by sliding windows of 801 (its crop)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise UserError(f"{path}: not a checkpoint that can be read ({type(e).__name__}: {e})")
    if isinstance(state, dict) and isinstance(state.get(net), dict):  # a kit run's checkpoint.pt
        state = state[net]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):  # UniMatch's
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: holds no network weights (expected a state dict, "
                        f"UniMatch's {{'model': ...}} or a run's checkpoint.pt)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    arch, num_classes = recognise_weights(state, path)
    model = build_net(argparse.Namespace(arch=arch, aspp_all_branches=False, pretrained=False), num_classes,
                      torch.device(device))
    model.load_state_dict(state)
    names = {19: CITYSCAPES_CLASSES, 21: PASCAL_CLASSES, 2: ["background", "lesion"]}.get(num_classes)
    window = 801 if arch == "deeplabv3plus_deepstem" and num_classes == 19 else None
    return model.eval(), dict(class_names=names or [f"class_{c}" for c in range(num_classes)],
                              num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, preprocess=None,
                              eval_window=window, dataset=None, arch=arch, iteration=None,
                              lesion_scoring=False)

def recognise_weights(state, path):
    """(arch, class count) of a state dict: the network whose parameter names it holds, built on the meta
    device (no memory, no time); the class count from the shapes that differ from a 2-class build."""
    for arch in ARCHS:
        with torch.device("meta"):
            probe = build_net(argparse.Namespace(arch=arch, aspp_all_branches=False, pretrained=False), 2,
                              torch.device("meta")).state_dict()
        if probe.keys() == state.keys():
            differ = {state[k].shape[0] for k in probe if state[k].shape != probe[k].shape}
            if len(differ) == 1:
                return arch, differ.pop()
            if not differ:
                return arch, 2
            raise UserError(f"{path}: {arch} weights whose shapes fit no class count")
    some = ", ".join(list(state)[:3])
    raise UserError(f"{path}: weights of no network the kit builds ({len(state)} tensors: {some}, ...); "
                    f"the kit builds {', '.join(ARCHS)}")

# ---- 7. torchrun: several processes, one run (BatchNorm across processes: section 9, sync_batchnorm) ---
def process_group():
    """(rank, world size): torchrun's RANK and WORLD_SIZE, or (0, 1) for a plain `python train_*.py`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def local_rows(t):
    """This process's rows of a tensor made for the global batch (all of them in a single process). Random
    draws (masks, probes, mixing weights) are made for the global batch on every process from one shared
    generator, so a run draws the same numbers however many processes share it."""
    rank, world = process_group()
    return t[rank * len(t) // world:(rank + 1) * len(t) // world]

def all_reduce_grads(net):
    """Average the gradients over the torchrun processes (nothing to do in a single process): one
    all-reduce of one flat buffer, after the iteration's backward pass."""
    world = process_group()[1]
    if world == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))

def share_rows(n_local, shares):
    """[(share, rows)]: this process's n_local rows of the global batch, cut where one of its `shares` equal
    shares ends (one process, one share: [(0, all rows)])."""
    rank, world = process_group()
    size = n_local * world // shares  # rows per share
    first, last = rank * n_local, (rank + 1) * n_local
    cuts = []
    for share in range(first // size, -(-last // size)):
        start, stop = max(share * size, first), min((share + 1) * size, last)
        cuts.append((share, slice(start - first, stop - first)))
    return cuts

def per_share(loss, shares, *tensors):
    """This process's part of the average over the global batch's `shares` shares of each share's mean loss.

    loss(*rows) -> (mean, count): the mean over `count` pixels of some rows of `tensors`. UniMatch takes each
    loss's mean on each of its 4 GPUs, over that GPU's images, and DDP averages the gradients; the paper's
    protocol takes one mean over the whole batch (shares=1). Each process weighs its rows' means by their
    share of the share's pixels, counted over all processes (one all-reduce of `shares` numbers), so that
    all_reduce_grads' average over the processes is the same step on 1, 2, 4 or 8 of them. One process
    and one share: the loss's own mean, to the bit."""
    world = process_group()[1]
    rows_by_share = share_rows(len(tensors[0]), shares)
    parts = [(share, *loss(*(t[rows] for t in tensors))) for share, rows in rows_by_share]
    counts = torch.zeros(shares, device=tensors[0].device)
    for share, _, count in parts:
        counts[share] += count
    counts = all_reduce_sum(counts).clamp(min=1)  # a share without a counted pixel: its mean is 0
    return sum(mean * (count / counts[share]) for share, mean, count in parts) * (world / shares)

def global_mean(t):
    """The mean of `t` over the global batch (every process holds as many elements): t.mean() in one process.
    The batch statistics that a method's loss uses, as the paper's confidence share, are the whole batch's."""
    world = process_group()[1]
    if world == 1:
        return t.mean()
    return all_reduce_sum(t.detach().float().sum()[None])[0] / (t.numel() * world)

def all_reduce_sum(t):
    """Sum a tensor over the processes (in place) and return it."""
    if process_group()[1] > 1:
        torch.distributed.all_reduce(t)
    return t

def leave_process_group():
    """Under torchrun: no process leaves before the others are done, and each leaves cleanly."""
    if process_group()[1] > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

# ============================== Catalogues: read the part for your dataset or your network ==========
# ---- 8. Dataset readers: (train Split, val Split, class count, class names) from the files on disk ---
LAYOUTS = {
    "folder": "ROOT/train/images/NAME.png|jpg, ROOT/train/masks/NAME.png, "
              "ROOT/val/images/..., ROOT/val/masks/...",
    "cityscapes": "ROOT/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png and "
                  "ROOT/gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png, "
                  "i.e. leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                  "https://www.cityscapes-dataset.com/downloads/ unzipped into ROOT",
    "pascal_aug": "VOCdevkit/VOC2012/{JPEGImages/NAME.jpg, SegmentationClassAug/NAME.png, "
                  "ImageSets/Segmentation/val.txt, optionally ImageSets/SegmentationAug/train_aug.txt}, "
                  "i.e. VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
                  "plus SegmentationClassAug.zip (as distributed by Hung et al.'s AdvSemiSeg) unzipped "
                  "inside VOC2012, or the labels built from SBD with "
                  "`python -m tools sbd-to-aug SBD_ROOT VOC2012` from the whole kit (README 'Datasets')",
    "isic2017": "ROOT/ISIC-2017_Training_Data/ISIC_NNNNNNN.jpg, "
                "ROOT/ISIC-2017_Training_Part1_GroundTruth/ISIC_NNNNNNN_segmentation.png "
                "and the same for ISIC-2017_Validation_*, i.e. the ISIC 2017 Part 1 zips from "
                "https://challenge.isic-archive.com/data/#2017 unzipped into ROOT",
}

def layout_error(root, dataset, problem):
    return UserError(f"--data-root {root}: {problem}; expected layout: {LAYOUTS[dataset]}")

def default_places(dataset):
    """Where the data of `dataset` is looked for without --data-root, in this order: for Cityscapes
    $CITYSCAPES_DATASET (the official cityscapesScripts' variable), then data/<dataset> under the current
    folder, as mmsegmentation and UniMatch lay it out; none for demo (generated) and folder (your data)."""
    if dataset in ("demo", "folder"):
        return []
    env = os.environ.get("CITYSCAPES_DATASET") if dataset == "cityscapes" else None
    return ([Path(env).expanduser()] if env else []) + [Path("data") / dataset]

def default_root(dataset):
    """The first of default_places(dataset) that is a folder, else None (resolve() records it in args.json;
    not for --benchmark, which without --data-root times random images of the dataset's sizes)."""
    return next((place for place in default_places(dataset) if place.is_dir()), None)

def require_root(root, dataset):
    """--data-root, else the dataset's default place (default_places), as a Path; else one line naming all."""
    root = root or default_root(dataset)
    if not root and dataset == "folder":
        raise UserError(f"--dataset folder needs --data-root, the folder of your own data (expected layout: "
                        f"{LAYOUTS[dataset]})")
    if not root:
        env = os.environ.get("CITYSCAPES_DATASET")
        first = ""  # Cityscapes' place before data/cityscapes
        if dataset == "cityscapes":
            first = f"$CITYSCAPES_DATASET={env} is no folder, " if env else "$CITYSCAPES_DATASET is not set, "
        raise UserError(f"--dataset {dataset} found no data: {first}no folder data/{dataset} in "
                        f"{Path.cwd()}; put the data there or give --data-root "
                        f"(expected layout: {LAYOUTS[dataset]})")
    if not Path(root).expanduser().is_dir():
        raise UserError(f"--data-root {root}: no such folder (expected layout: {LAYOUTS[dataset]})")
    return Path(root).expanduser()

def cache_folder(root, explicit=None):
    """Where prepared data and checks are cached: --cache-dir, else beside the data when writable, else
    ~/.cache/cutmix-seg/<hash of the data's path>, which also stands in for a cache folder that cannot be
    written (read-only, another user's), with a line."""
    tag = hashlib.sha1(os.fsencode(root.resolve())).hexdigest()[:12]
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cutmix-seg" / tag
    path = (Path(explicit).expanduser() if explicit
            else root / ".cutmix_seg_cache" if os.access(root, os.W_OK) else user)
    for candidate in dict.fromkeys([path, user]):
        with contextlib.suppress(OSError):
            candidate.mkdir(parents=True, exist_ok=True)
        if candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK):
            if candidate != path:
                print(f"{'--cache-dir ' * bool(explicit)}{path} cannot be written: caching in {user} instead")
            return candidate
    raise UserError(f"cannot write the cache folder {user}; give a writable --cache-dir")

def split_pairs(root, dataset, image_dir, label_dir, list_images, label_of):
    """[(image, label), ...] of one split, or one clear error naming the missing folder or file."""
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise layout_error(root, dataset, f"missing folder {d}")
    pairs = [(p, label_of(p)) for p in list_images(image_dir)]
    if not pairs:
        raise layout_error(root, dataset, f"no images in {image_dir}")
    for image, label in pairs:
        if not (image.is_file() and label.is_file()):
            if image.is_file():
                raise layout_error(root, dataset, f"missing mask {label} for image {image}")
            raise layout_error(root, dataset, f"missing image {image}")
    return pairs

def checked_splits(pairs_by_split, cache, num_classes=None):
    """{split: Split decoding its (image, mask) pairs, or (image,) alone, on the fly, "max_label": int},
    once cutmixseg/prepare.py checked every pair (sizes agree, classes in range); its verdict is cached,
    keyed by the files' names, sizes and times."""
    verdict = prepare.verdict(pairs_by_split, cache, num_classes)
    def load(pairs):
        return lambda i: (read_image(pairs[i][0]), read_mask(pairs[i][1]) if len(pairs[i]) > 1 else None)
    splits = {split: Split([pair[0].stem for pair in pairs], load(pairs), verdict[split])
              for split, pairs in pairs_by_split.items()}
    return splits | {key: verdict[key] for key in ("classes", "labeled_pixels")}

def prepared_split(root, cache, tag, names, pairs, convert):
    """A Split over uint8 arrays that cutmixseg/prepare.py fills once with `convert`(image[, label] path):
    images (N, H, W, 3) and labels (N, H, W), .npy files in the cache read by memory mapping, so that a
    training sample costs no decoding. The folder's name hashes the source files' names (below `root`),
    sizes and times: changed data is prepared anew."""
    images, labels = prepare.arrays(root, cache, tag, pairs, convert)
    return Split(names, lambda i: (np.array(images[i]), None if labels is None else np.array(labels[i])),
                 [images.shape[1:3]] * len(names))

def unlabeled_split(dataset, folders, cache, unlabeled_dir=None, protocol="paper"):
    """The images in `folders` (image_files) as a Split of (image, None), prepared as the dataset's
    training images: the paper's Cityscapes halved, ISIC at 248x248 (cached), others decoded on the fly
    once checked."""
    paths = [p for d in folders for p in image_files(d)]
    if not paths and unlabeled_dir:
        raise UserError(f"--unlabeled-dir {unlabeled_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    if not paths:
        return None
    names = [p.relative_to(next(d for d in folders if p.is_relative_to(d))).as_posix() for p in paths]
    if dataset in ("cityscapes", "isic2017") and protocol == "paper":
        convert = dict(cityscapes=prepare.halve_cityscapes, isic2017=prepare.shrink_isic)[dataset]
        return prepared_split(folders[0], cache, f"{dataset}_unlabeled", names, [(p,) for p in paths],
                              convert)
    split = checked_splits({"unlabeled": [(p,) for p in paths]}, cache)["unlabeled"]
    return Split(names, split.load, split.sizes)

# ---- folder: ROOT/{train,val}/{images,masks} --------------------------------------------------------

def folder_dataset(root, cache, num_classes=None):
    """Your own data: images (nested, IMAGE_SUFFIXES) and single-channel PNG masks of class indices (255 =
    ignore) at the same path below masks/; the class count from --num-classes or from the masks."""
    def mask_of(image, split):  # the mirrored path, .png in either case
        below = image.relative_to(root / split / "images").with_suffix("")
        masks = [root / split / "masks" / f"{below}{suffix}" for suffix in (".png", ".PNG")]
        return next((m for m in masks if m.is_file()), masks[0])
    pairs = {split: split_pairs(root, "folder", root / split / "images", root / split / "masks",
                                image_files, functools.partial(mask_of, split=split))
             for split in ("train", "val")}
    splits = checked_splits(pairs, cache, num_classes)
    prepare.check_listable(splits["train"].names, root)  # labeled.txt lists them
    found = splits["classes"]  # the class indices in the masks
    given = num_classes  # --num-classes, or None
    num_classes = num_classes or max(found, default=0) + 1
    if num_classes < 2:
        raise UserError(f"--data-root {root}: the masks hold class 0 alone besides 255 = ignore; "
                        f"masks stored as 0/255 need 255 -> 1 (e.g. np.where(mask == 255, 1, mask)), "
                        f"or give --num-classes")
    if not given and found != list(range(num_classes)):
        raise UserError(f"--data-root {root}: the masks hold classes {found}, so {num_classes} classes "
                        f"with gaps; give --num-classes {num_classes} if that is right, "
                        f"else fix the stray values")
    if not splits["labeled_pixels"]["val"]:
        raise UserError(f"--data-root {root}: the validation masks label no pixel (all 255): "
                        f"nothing to score")
    return splits["train"], splits["val"], num_classes, [str(c) for c in range(num_classes)]

# ---- cityscapes: the official leftImg8bit/ and gtFine/ trees, prepared once at half size ---------------
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
                      "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle"]

def cityscapes_images(folder):
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png sorted by <city>/<name>: the original's order, which the
    paper's labeled subsets index."""
    return sorted(folder.glob("*/*_leftImg8bit.png"), key=lambda p: p.relative_to(folder).as_posix())

def cityscapes_dataset(root, cache):
    """Cityscapes: 2975 train / 500 val street scenes of 2048x1024, 19 classes, used at half size
    (1024x512), halved once into the cache (about 7 GB; any even size works); test, _color, _instanceIds
    etc. ignored."""
    splits = []
    for split in ("train", "val"):
        label_dir = root / "gtFine" / split
        def label_of(p, label_dir=label_dir):
            return label_dir / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds")
        pairs = split_pairs(root, "cityscapes", root / "leftImg8bit" / split, label_dir, cityscapes_images,
                            label_of)
        names = [p.name[:-len("_leftImg8bit.png")] for p, _ in pairs]
        splits.append(prepared_split(root, cache, f"cityscapes_{split}", names, pairs,
                                     prepare.halve_cityscapes))
    return splits[0], splits[1], len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES

# ---- pascal_aug: VOC 2012 with the SBD-augmented labels (SegmentationClassAug) ------------------------
PASCAL_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                  "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                  "sheep", "sofa", "train", "tvmonitor"]

def voc2012_folder(path):
    """VOC2012 itself, found from it, from VOCdevkit or from the folder holding VOCdevkit; else None."""
    candidates = (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012")
    return next((c for c in candidates if (c / "JPEGImages").is_dir()), None)

def read_names(path):
    """Image names, one per line; "/JPEGImages/x.jpg /SegmentationClassAug/x.png" lines give x."""
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]

def pascal_aug_dataset(root, cache, split_file=None):
    """Pascal VOC 2012 augmented: 10,582 train / 1,449 val images up to 500x500, 21 classes. Training
    names: ImageSets/SegmentationAug/train_aug.txt when present (the order the original's split_0.pkl
    indexes), else every SegmentationClassAug label not in val.txt, sorted; validation: val.txt, whole
    images."""
    voc = voc2012_folder(root)
    if voc is None:
        raise layout_error(root, "pascal_aug", "no JPEGImages/ in it, in VOC2012/ or in VOCdevkit/VOC2012/")
    labels = voc / "SegmentationClassAug"
    val_list = voc / "ImageSets" / "Segmentation" / "val.txt"
    for path in (labels, val_list):
        if not path.exists():
            raise layout_error(root, "pascal_aug", f"missing {path}")
    train_list = voc / "ImageSets" / "SegmentationAug" / "train_aug.txt"
    val = read_names(val_list)
    if train_list.is_file():
        train = read_names(train_list)
    elif split_file and str(split_file).endswith(".pkl"):
        raise layout_error(root, "pascal_aug",
                           f"--split-file {split_file} indexes the order of {train_list}, which is missing "
                           f"(get it from AdvSemiSeg's dataset/voc_list/train_aug.txt)")
    else:
        excluded = set(val)
        train = sorted(p.stem for p in labels.glob("*.png") if p.stem not in excluded)
    if not train or not val:
        raise layout_error(root, "pascal_aug",
                           f"no training labels in {labels}" if not train else f"{val_list} is empty")
    pairs = {split: split_pairs(root, "pascal_aug", voc / "JPEGImages", labels,
                                lambda d: [d / f"{n}.jpg" for n in names],
                                lambda p: labels / f"{p.stem}.png")
             for split, names in (("train", train), ("val", val))}
    splits = checked_splits(pairs, cache, len(PASCAL_CLASSES))
    return splits["train"], splits["val"], len(PASCAL_CLASSES), PASCAL_CLASSES

# ---- isic2017: the official ISIC 2017 Part 1 folders, prepared once at 248x248 -------------------------
def isic2017_dataset(root, cache):
    """ISIC 2017 lesion segmentation: 2000 train / 150 val dermoscopy images, classes background and
    lesion. Superpixel PNGs, metadata CSVs and the Test_v2 folders are ignored. Resized once into the cache
    to 248x248 (aspect ratio not kept)."""
    splits = []
    for split, part in (("train", "Training"), ("val", "Validation")):
        truth_dir = root / f"ISIC-2017_{part}_Part1_GroundTruth"
        pairs = split_pairs(root, "isic2017", root / f"ISIC-2017_{part}_Data", truth_dir,
                            lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() == ".jpg"
                                             and "_superpixels" not in p.stem),
                            lambda p: truth_dir / f"{p.stem}_segmentation.png")
        splits.append(prepared_split(root, cache, f"isic2017_{split}", [p.stem for p, _ in pairs], pairs,
                                     prepare.shrink_isic))
    return splits[0], splits[1], 2, ["background", "lesion"]

def rotate_scale_crop(img, lab, valid, rng, crop, rot, max_scale):
    """A crop turned by θ ~ U(-rot, rot) degrees and scaled by s = exp(U(-ln m, ln m)): the original's
    cv2.warpAffine with T(crop/2)·R(θ)·S(s)·T(-centre), as its inverse map for grid_sample. Beyond the
    border as the original's: the image mirrored (BORDER_REFLECT_101; alpha 255, no padding), labels 255 and
    valid 0 (a constant border). The image is sampled nearest when labeled, else nearest or bilinear at
    random."""
    scale = math.exp(rng.uniform(-math.log(max_scale), math.log(max_scale)))
    theta = math.radians(rng.uniform(-rot, rot))
    size = np.array(img.shape[1:], float)  # (H, W)
    window = np.array(crop) / scale  # the crop's extent in the image
    cy, cx = np.maximum(size - window, 0) * rng.uniform(size=2) + np.minimum(window, size) / 2
    dy, dx = torch.meshgrid(torch.arange(crop[0]) - crop[0] / 2, torch.arange(crop[1]) - crop[1] / 2,
                            indexing="ij")
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    x, y = cx + cos * dx + sin * dy, cy - sin * dx + cos * dy  # (h, w) source pixel of each output pixel
    # align_corners=True: -1 and 1 are the centres of the first and last pixels, as OpenCV's pixel grid
    grid = torch.stack([x / max(size[1] - 1, 1) * 2 - 1, y / max(size[0] - 1, 1) * 2 - 1], -1)[None].float()

    def warp(t, mode, border):  # (C, H, W) -> (C, h, w) float
        return F.grid_sample(t[None].float(), grid, mode=mode, padding_mode=border, align_corners=True)[0]
    mode = "nearest" if lab is not None or rng.uniform() < 0.5 else "bilinear"
    img = warp(img, mode, "reflection").round().clamp(0, 255).to(torch.uint8)
    img = torch.cat([img, torch.full_like(img[:1], 255)])  # (4, h, w): alpha 255, nothing is padding
    valid = warp(valid[None], mode, "zeros")[0].round().to(torch.uint8)
    if lab is not None:  # shifted by one so that 0 marks "outside the image"
        lab = warp(lab[None].long() + 1, "nearest", "zeros")[0].long()
        lab = torch.where(lab == 0, IGNORE, lab - 1).to(torch.uint8)
    return img, lab, valid

def fill_holes(mask):
    """(B, H, W) bool -> the same with every hole filled, as scipy's binary_fill_holes: background regions
    that no 4-connected path links to the image border become foreground."""
    background = ~mask
    outside = torch.zeros_like(mask)  # the background that the border reaches, grown below
    outside[:, [0, -1], :] = background[:, [0, -1], :]
    outside[:, :, [0, -1]] = background[:, :, [0, -1]]
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32,
                         device=mask.device)[None, None]  # (1, 1, 3, 3): the 4-neighbourhood
    while True:  # grow the border's background to its 4 neighbours per step, through background only
        grown = (F.conv2d(outside[:, None].float(), cross, padding=1)[:, 0] > 0) & background
        if torch.equal(grown, outside):
            return ~outside
        outside = grown

# ---- 9. Networks: build_net (the networks themselves, each taking any input size: cutmixseg/nets.py) ---
def check_batchnorm_values(args, world):
    """One line where a BatchNorm that trains would see one value per channel (it cannot normalise one): a
    batch of 1 with a crop that the network's deepest level shrinks to a single pixel."""
    deepest = dict(unet_small=8, denseunet161=32).get(args.arch)  # the pooling nets: parse_args checks them
    h, w = args.crop_size
    if deepest and not args.freeze_bn and args.batch_size // world * -(-h // deepest) * -(-w // deepest) < 2:
        raise UserError(f"--crop-size {h},{w} with --batch-size {args.batch_size}: {args.arch}'s deepest "
                        f"BatchNorm would see one value per channel (it shrinks the crop {deepest} times); "
                        f"give a crop over {deepest} pixels on one side, or --batch-size {2 * world} or more")

def build_net(args, num_classes, device):
    """The student network for --arch on `device` (channels-last on CUDA, where convolutions run faster
    that way), with ImageNet weights where args.pretrained; under torchrun its BatchNorm layers that
    train use the global batch's statistics."""
    build = dict(deeplabv2=functools.partial(nets.DeepLabV2, aspp_all_branches=args.aspp_all_branches),
                 unet_small=nets.UNetSmall, deeplabv3plus=nets.DeepLabV3Plus, denseunet161=nets.DenseUNet161,
                 pspnet101=nets.PSPNet101, deeplabv3plus_deepstem=nets.DeepLabV3PlusDeepStem)[args.arch]
    net = build(num_classes)
    if args.pretrained and hasattr(net, "load_backbone"):  # today's protocol: UniMatch's own ImageNet weights
        if not args.backbone_weights:
            raise UserError(f"--arch {args.arch} needs --backbone-weights: {nets.UNIMATCH_RESNET101}; "
                            "or --no-pretrained")
        net.load_backbone(args.backbone_weights)
    elif args.pretrained and hasattr(net, "load_imagenet"):
        net.load_imagenet()
    net = (nets.sync_batchnorm(net, device) if process_group()[1] > 1 else net).to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net

# ---- 10. Today's protocol (--protocol unimatch): UniMatch's, for modern tables (README) -----------------
# Today's protocol (--protocol unimatch): UniMatch's (LiheYoung/UniMatch at 0324f3d), whose split lists and
# settings many later papers reuse. DeepLab v3+ on a deep-stem ResNet-101 (output stride 16, BatchNorm
# trained), SGD (momentum 0.9, weight decay 1e-4 on every parameter) with the poly rate set after each step,
# 8 labeled + 8 unlabeled crops per iteration, UniMatch's weak view (long side 0.5-2x, crop, flip), epochs of
# the unlabeled images, an evaluation every epoch. lr: the head's, UniMatch's base rate x its lr_multi (Pascal
# 0.001 x 10, Cityscapes 0.005 x 1); the backbone runs at the base rate. The method itself (EMA teacher,
# masks, weights) stays the paper's.
UNIMATCH = {
    "cityscapes": dict(n_labeled=186, crop_size=(801, 801), epochs=240, lr=0.005, backbone_lr_mult=1.0,
                       ohem=dict(thresh=0.7, min_kept=200_000), eval_window=801),
    "pascal_aug": dict(n_labeled=92, crop_size=(321, 321), epochs=80, lr=0.01, backbone_lr_mult=0.1),
}

UNIMATCH_ALL = dict(arch="deeplabv3plus_deepstem", batch_size=8, iters=None, eval_every=None, optimizer="sgd",
                    momentum=0.9, nesterov=False, weight_decay=1e-4, lr_schedule="poly_after", poly_power=0.9,
                    freeze_bn=False, aug=dict(weak_view=True), student_every_eval=True)
UNIMATCH_GPUS = 4  # UniMatch's runs: its losses are means per GPU, its epochs dealt to 4 GPUs

UNIMATCH_SPLITS = Path(__file__).resolve().parent / "cutmixseg" / "splits" / "unimatch"

def resolve_unimatch(args, count_given):
    """--protocol unimatch: --n-labeled N picks UniMatch's list of N labeled images
    (cutmixseg/splits/unimatch/); a --split-file (any list in UniMatch's format, e.g. U2PL's) is used whole
    unless --n-labeled cuts it."""
    if args.crop_size[0] != args.crop_size[1]:
        raise UserError(f"--crop-size {args.crop_size[0]},{args.crop_size[1]}: "
                        "today's protocol crops squares, as UniMatch")
    if args.eval_window:  # UniMatch's evaluation windows are its training crops
        args.eval_window = args.crop_size[0]
    # the run computes what UniMatch's 4 GPUs compute; a batch that does not split 4 ways: as many GPUs as
    # it splits
    args.loss_shares = max(n for n in range(1, UNIMATCH_GPUS + 1) if args.batch_size % n == 0)
    if args.split_file or args.n_labeled == -1:  # -1: every training image labeled
        if args.split_file and not count_given:
            args.n_labeled = len(prepare.read_lines(args.split_file))
        return
    folder = UNIMATCH_SPLITS / ("pascal" if args.dataset == "pascal_aug" else args.dataset)
    lists = {len(prepare.read_lines(f)): f for f in sorted(folder.glob("*/labeled.txt"))
             if "u2pl" not in f.parent.name}
    if args.n_labeled not in lists:
        raise UserError(f"--n-labeled {args.n_labeled}: UniMatch's {args.dataset} lists hold {sorted(lists)} "
                        f"labeled images; give one of these counts, or the labeled images in --split-file")
    args.split_file = str(lists[args.n_labeled])

def unimatch_list_name(args):
    """The name of a --split-file that --n-labeled does not pick (its folder's for a labeled.txt, else its
    stem: U2PL's lists, a user's), None for UniMatch's lists picked by their count; run folders and tables
    name it."""
    listed = Path(args.split_file or "")
    unimatch_list = listed.parent.parent.parent == UNIMATCH_SPLITS and "u2pl" not in listed.parent.name
    if not args.split_file or unimatch_list:
        return None
    return listed.parent.name if listed.name == "labeled.txt" else listed.stem

def epochs_to_iters(args, n_images, gpus):
    """--iters and --eval-every where a protocol counts epochs (today's): an epoch is one pass over the
    unlabeled images (the labeled ones repeated alongside; the supervised baseline: over the labeled images),
    dealt as UniMatch's DistributedSampler deals them to its `gpus` GPUs (args.loss_shares, whatever the
    kit's process count): ceil(n / gpus) images per GPU, in full batches only. Batch 8, Cityscapes 186: 2789
    unlabeled -> 349 per epoch on 4 GPUs x 2 (348 on one GPU); the baseline on Pascal 366, batch 16: 23 (22
    on one GPU)."""
    args.iters_per_epoch = per_epoch = max(1, -(-n_images // gpus) // (args.batch_size // gpus))
    args.iters = args.iters or args.epochs * per_epoch
    args.eval_every = args.eval_every or per_epoch

scale_crop_flip = crops.scale_crop_flip  # the weak view on PIL images, the reference (cutmixseg/crops.py)

def weak_view(image, label, rng, crop, reference=False):
    """augment() under today's protocol: UniMatch's weak view with draws from rng, as tensors: image (3, crop,
    crop) uint8, label (crop, crop) uint8 (255 where padded) or None, valid (255 = image content, 0 = padding,
    which carries no loss: UniMatch marked unlabeled padding 254 to ignore it). The crop comes from the rows
    it reaches (scale_crop_flip_window); reference: from the whole image resized (scale_crop_flip), the same
    pixels, slower."""
    h, w = image.shape[:2]
    long_side, x, y, flip = weak_view_draws((w, h), crop, rng)
    view = crops.scale_crop_flip_arrays if reference else crops.scale_crop_flip_window
    img, lab = view(image, label, long_side, x, y, flip, crop)
    w, h = crops.long_side_size((w, h), long_side)  # the resized image's size
    valid = np.zeros((crop, crop), np.uint8)
    valid[:max(h - y, 0), :max(w - x, 0)] = 255  # the resized image's part of the crop
    img = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    lab = None if lab is None else torch.from_numpy(lab)
    return img, lab, torch.from_numpy(np.ascontiguousarray(valid[:, ::-1] if flip else valid))

def weak_view_draws(size, crop, rng):
    """(long_side, x, y, flip) for scale_crop_flip, drawn in UniMatch's order and ranges (ends included)
    from a numpy Generator: long side 0.5-2.0 x the original's (size = PIL's (w, h)), a crop anywhere
    in the resized image padded up to `crop`, a flip with probability 0.5."""
    long_side = int(rng.integers(int(max(size) * 0.5), int(max(size) * 2.0), endpoint=True))
    w, h = (max(s, crop) for s in crops.long_side_size(size, long_side))
    x, y = (int(rng.integers(0, s - crop, endpoint=True)) for s in (w, h))
    return long_side, x, y, bool(rng.random() < 0.5)

def ohem_loss(logits, labels, thresh=0.7, min_kept=200_000, per_images=None):
    """UniMatch's OHEM cross-entropy (ProbOhemCrossEntropy2d), fp32: the mean over the hard labeled pixels.

    logits (B, K, H, W), labels (B, H, W) with 255 = ignore. Hard: the true class's probability is <= the
    threshold, `thresh` or, when higher, the min_kept-th smallest of those probabilities, so that at least
    min_kept pixels count; with fewer than min_kept labeled pixels all count. UniMatch applies it on each GPU
    to that GPU's images; per_images=n: the rule per chunk of n images, the chunks' losses averaged, as DDP
    averages the GPUs' gradients (a run: supervised_loss, per UniMatch GPU share on any number of processes).
    per_images=None: the whole batch is one chunk. 0 (no gradient) for a chunk without a labeled pixel."""
    size = per_images or len(logits)
    means = []
    for chunk_logits, chunk_labels in zip(logits.split(size), labels.split(size)):
        p_true = true_class_probability(chunk_logits, chunk_labels)
        limit = ohem_limit(p_true, len(p_true), thresh, min_kept)
        means.append(ohem_mean(chunk_logits, chunk_labels, p_true, limit)[0])
    return torch.stack(means).mean()

def true_class_probability(logits, labels):
    """(B, H, W) softmax probability of each pixel's true class, 1 where ignored (255), without gradient."""
    with torch.no_grad():
        valid = labels != IGNORE
        p_true = logits.float().softmax(1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
        return p_true.masked_fill(~valid, 1)

def ohem_limit(p_true, size, thresh, min_kept):
    """(B,) each row's probability limit: its group of `size` rows counts its pixels whose true class's
    probability is <= max(thresh, the min_kept-th smallest probability of the group). Ignored pixels count as
    probability 1, as the original: with fewer than min_kept labeled pixels the k-th smallest is such a 1 (or
    the largest probability), and every labeled pixel is kept."""
    groups = p_true.reshape(len(p_true) // size, -1)  # (groups, size·H·W)
    k = min(min_kept, groups.shape[1])
    limit = (groups.kthvalue(k, dim=1).values.clamp(min=thresh) if k > 0
             else groups.new_full((len(groups),), thresh))
    return limit.repeat_interleave(size)

def ohem_limits(logits, labels, shares, thresh=0.7, min_kept=200_000):
    """(p_true, limits) of this process's rows, each limit its share's (ohem_limit). A share that spans
    processes (more processes than shares) needs the whole share's probabilities: then every process
    gathers all of them."""
    p_true = true_class_probability(logits, labels)
    rank, world = process_group()
    size = len(p_true) * world // shares  # rows per share
    if len(p_true) % size == 0:  # this process holds whole shares
        return p_true, ohem_limit(p_true, size, thresh, min_kept)
    gathered = [torch.empty_like(p_true) for _ in range(world)]
    torch.distributed.all_gather(gathered, p_true)
    rows = slice(rank * len(p_true), (rank + 1) * len(p_true))
    return p_true, ohem_limit(torch.cat(gathered), size, thresh, min_kept)[rows]

def ohem_mean(logits, labels, p_true, limit):
    """(the mean cross-entropy over the hard labeled pixels of these rows, their count): a row's hard pixels
    are those whose true class's probability is <= its limit (le(), as the original: ties all kept)."""
    kept = (labels != IGNORE) & (p_true <= limit[:, None, None])  # (B, H, W)
    loss = F.cross_entropy(logits.float(), torch.where(labels != IGNORE, labels, 0), reduction="none")
    count = kept.sum()
    return torch.where(kept, loss, 0).sum() / count.clamp(min=1), count  # no kept pixel: 0, not 0/0

def sliding_window(net, images, window):
    """The summed softmax (B, K, H, W) over square windows, UniMatch's Cityscapes evaluation; argmax it.

    Windows start at 0, stride, 2 stride, ... (stride = 2/3 of the side) while inside the image; one at the
    border is cut short there, not shifted back (1024x2048, window 801: rows 0, 534, columns 0, 534, 1068,
    1602, 8 windows, the last ones 490 high and 446 wide). The caller sets eval mode and autocast."""
    h, w = images.shape[-2:]
    stride = int(window * 2 / 3)
    total = None
    with torch.no_grad():
        for row in range(0, h, stride):
            for col in range(0, w, stride):
                box = (slice(None), slice(None), slice(row, row + window), slice(col, col + window))
                prob = net(images[box]).float().softmax(1)  # (B, K, h, w) of this window, fp32
                if total is None:  # K is known from the first window
                    total = prob.new_zeros(*prob.shape[:2], h, w)
                total[box] += prob
    return total

def cityscapes_full_dataset(root, cache=None, cached=True):
    """Cityscapes at full size (today's protocol). The training images and their train ids are decoded once
    into uint8 arrays memory-mapped from the cache (~25 GB, with a progress bar), so that a crop reads only
    its own rows (scale_crop_flip_window); without a cache, with cached False (--no-cache) or where the disk
    lacks the room (one line says so), they are decoded on the fly (~50 ms an image). Validation images: on
    the fly. Train ids from _gtFine_labelTrainIds.png where present (cityscapesScripts'
    createTrainIdLabelImgs.py makes them; UniMatch's lists name them), else from labelIds."""
    splits = []
    for split in ("train", "val"):
        label_dir = root / "gtFine" / split
        def label_of(p, label_dir=label_dir):
            ids = label_dir / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds")
            train_ids = ids.with_name(ids.name.replace("_labelIds", "_labelTrainIds"))
            return train_ids if train_ids.is_file() else ids
        pairs = split_pairs(root, "cityscapes", root / "leftImg8bit" / split, label_dir, cityscapes_images,
                            label_of)
        names = [p.name[:-len("_leftImg8bit.png")] for p, _ in pairs]
        sizes = [image_size(p) for p, _ in pairs]
        kept = None
        if split == "train" and cache is not None and cached and len(set(sizes)) == 1:
            nbytes = len(pairs) * sizes[0][0] * sizes[0][1] * 4  # RGB and the train ids, one byte each
            kept = prepare.arrays(root, cache, "cityscapes_full_train", pairs, cityscapes_full_pair,
                                  nbytes=nbytes, with_root=True)
        if kept is None:
            splits.append(Split(names, lambda i, pairs=pairs: cityscapes_full_pair(*pairs[i]), sizes))
        else:  # memory-mapped views, not copies: a crop reads the rows it needs
            images, labels = kept
            splits.append(Split(names, lambda i: (images[i], labels[i]), sizes))
    return splits[0], splits[1], len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES

def cityscapes_full_pair(image_path, label_path):
    """(image (H, W, 3), train ids (H, W)) of one Cityscapes pair, decoded; train ids mapped from labelIds."""
    image, label = read_image(image_path), read_mask(label_path)
    if label.shape != image.shape[:2]:
        raise UserError(f"mask {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                        f"is {image.shape[1]}x{image.shape[0]}; they must match")
    train_ids = label_path.name.endswith("_labelTrainIds.png")
    return image, label if train_ids else prepare.CITYSCAPES_TRAIN_ID[label]

def pascal_unimatch_dataset(root, cache):
    """Pascal VOC 2012 augmented as today's protocol reads it: UniMatch's train_aug.txt (10,582) and val.txt
    (1,449) lists (cutmixseg/splits/unimatch/pascal/), images in JPEGImages/, masks in SegmentationClassAug/
    (the usual VOC2012 layout) or, failing that, SegmentationClass/ (UniMatch's download, which holds all
    10,582)."""
    voc = voc2012_folder(root)
    if voc is None:
        raise layout_error(root, "pascal_aug", "no JPEGImages/ in it, in VOC2012/ or in VOCdevkit/VOC2012/")
    labels = next((d for d in (voc / "SegmentationClassAug", voc / "SegmentationClass") if d.is_dir()), None)
    if labels is None:
        raise layout_error(root, "pascal_aug",
                           f"neither {voc / 'SegmentationClassAug'} nor {voc / 'SegmentationClass'}")
    lists = UNIMATCH_SPLITS / "pascal"
    pairs = {split: split_pairs(root, "pascal_aug", voc / "JPEGImages", labels,
                                lambda d: [d / Path(line.split()[0]).name  # "image mask" lines
                                           for _, line in prepare.read_lines(path)],
                                lambda p: labels / f"{p.stem}.png")
             for split, path in (("train", lists / "train_aug.txt"), ("val", lists / "val.txt"))}
    splits = checked_splits(pairs, cache, len(PASCAL_CLASSES))
    return splits["train"], splits["val"], len(PASCAL_CLASSES), PASCAL_CLASSES

# ---- 11. --benchmark: the loop timed instead of trained (docs/speed.md) -----------------------------
class Benchmark(Run):
    """--benchmark N: the script's own loop timed instead of trained, with the same methods as Run and no
    folder, no files. The loop runs on two cached batches per stream, so that it times the training step:
    one iteration under torch's FLOP counter, a few warm-up iterations, N timed ones; then the evaluation's
    speed and, on real data, the loader's throughput. One summary and a `BENCHMARK {json}` line
    (cutmixseg/timing.py; `python -m tools costs` runs it for a table)."""

    def __init__(self, args, method, unlabeled=True):
        self.args = args
        self.method = method
        self.unlabeled = unlabeled
        self.rank, self.world = process_group()
        self.main = self.rank == 0
        self.images = 0  # images streamed so far (stream() counts them)
        self.log_file = self.metrics_file = None  # no folder, no files
        self.real_data = args.dataset == "demo" or args.data_root is not None

    def load_data(self):
        """The real data, or without --data-root random images of the dataset's shapes and sizes."""
        if self.real_data:
            return super().load_data()
        a = self.args
        (train, val), num_classes = timing.synthetic_splits(a.dataset, a.num_classes,
                                                            full=a.protocol == "unimatch")
        a.crop_size = a.crop_size or default_crop(train[2][:1])
        train = Split(*train)
        labeled = choose_labeled(train.names, a.n_labeled, a.split_seed)  # a random subset of the list's size
        if a.epochs:
            epochs_to_iters(a, len(train) - len(labeled) if self.unlabeled else len(labeled), a.loss_shares)
        class_names = [f"class_{c}" for c in range(num_classes)]
        return Data(train, Split(*val), num_classes, class_names, labeled, train)

    def start(self, data, device, student, teacher, optimizer, scaler, generator=None):
        self.data = data
        self.device = device
        self.start_iter = 0
        self.nets, self.evaluated = run_nets(student, teacher)
        self.print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(self.args).items())))
        return 0

    def stream(self, split, indices, stream_id, with_label=True, dataset=None, per_iteration=1):
        """Two batches of the real stream, cycled: the benchmark times the training step, not the loader."""
        batches = list(itertools.islice(super().stream(split, indices, stream_id, with_label, dataset), 2))
        for i in itertools.count():
            self.images += len(batches[i % 2][0])
            yield batches[i % 2]

    def iterations(self):
        from torch.utils.flop_counter import FlopCounterMode
        args = self.args
        timer = timing.Timer(self.device)
        self.loading = self.loader_throughput() if self.real_data else None
        counter = FlopCounterMode(display=False)
        with counter:  # FLOPs of one iteration (forward and backward passes), counted once
            yield 0
        self.flops = counter.get_total_flops() * self.world  # all processes
        if args.compile:
            self.compile()
        warmup = (3 if self.device.type == "cuda" else 1) + (3 if args.compile else 0)
        yield from range(1, 1 + warmup)  # allocation, cudnn autotuning, compilation: not timed
        timer.sync()
        self.warmup_seconds = time.perf_counter() - timer.started
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        timer.go()
        images = self.images
        yield from range(1 + warmup, 1 + warmup + args.benchmark)
        timer.sync()
        self.seconds_per_iter = (time.perf_counter() - timer.mark) / args.benchmark
        self.images_per_iter = (self.images - images) // args.benchmark * self.world  # all processes

    def end_iteration(self, it, **scalars):
        pass

    def loader_throughput(self):
        """Images/s that the real training loader delivers (reading, augmentation, collation) with
        --num-workers workers, summed over the processes."""
        a = self.args
        batches = train_loader(TrainSet(self.data.train, a.crop_size, a.aug), np.arange(len(self.data.train)),
                               a.batch_size, a.seed, 99, 0, a.num_workers)
        next(batches)  # worker start-up is not counted
        n = max(10, 4 * a.num_workers)  # batches timed
        started = time.perf_counter()
        for _ in range(n):
            next(batches)
        del batches
        return n * a.batch_size / (time.perf_counter() - started)

    def eval_seconds(self):
        """Seconds to evaluate the whole validation set once (timed on a few batches)."""
        a, val = self.args, self.data.val
        timer = timing.Timer(self.device)
        n = min(len(val), a.batch_size * (4 if self.device.type == "cuda" else 1) * self.world)
        subset = val_loader(Split(val.names[:n], val.load, val.sizes[:n]), a.batch_size, a.num_workers)

        def score():
            return evaluate(self.nets[self.evaluated], subset, self.device, self.data.num_classes, a.amp,
                            a.lesion_scoring, a.eval_window)
        if self.device.type == "cuda":
            score()  # cudnn autotuning for the new shapes
        timer.sync()
        timer.go()
        score()
        timer.sync()
        return (time.perf_counter() - timer.mark) / n * len(val)

    def finish(self):
        """Prints the numbers and one `BENCHMARK {json}` line; returns the record."""
        record = timing.record(self, eval_seconds=self.eval_seconds())
        if self.main:
            print("\n".join(timing.report(record, len(self.data.val))), flush=True)
            print("BENCHMARK " + json.dumps(record), flush=True)
        leave_process_group()
        return record

# ---- 12. Strong views and pseudo-labels (FixMatch, UniMatch: train_fixmatch.py, train_unimatch.py) ---
# UniMatch's dataset/semi.py builds, from each unlabeled crop (the weak view), strong views in this order:
# colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale with p 0.2, a Gaussian blur with p 0.5, and a
# CutMix box with p 0.5, into which the training loop pastes a partner image's strong view. The draws here
# come from the sample's own numpy Generator (StrongViewSet), never from a global RNG, so that a view is
# fixed by its stream position.
def strong_view_draws(rng):
    """dict(jitter, grayscale, blur) for strong_view, with UniMatch's probabilities: jitter None or (order,
    brightness, contrast, saturation, hue) as torchvision's ColorJitter.get_params returns them (order: a
    permutation of 0-3 = brightness, contrast, saturation, hue; factors U(0.5, 1.5), hue U(-0.25, 0.25)) with
    p 0.8; grayscale with p 0.2; blur None or σ ~ U(0.1, 2.0) with p 0.5."""
    jitter = None
    if rng.random() < 0.8:
        order = tuple(int(i) for i in rng.permutation(4))
        jitter = (order, *(float(rng.uniform(0.5, 1.5)) for _ in range(3)), float(rng.uniform(-0.25, 0.25)))
    grayscale = bool(rng.random() < 0.2)
    blur = float(rng.uniform(0.1, 2.0)) if rng.random() < 0.5 else None
    return dict(jitter=jitter, grayscale=grayscale, blur=blur)

def strong_view(image, draws):
    """PIL RGB image -> its strong view for given draws, as UniMatch's transforms compute it on PIL images:
    ColorJitter's four adjustments in the drawn order, RandomGrayscale (L, copied to 3 channels), then
    ImageFilter.GaussianBlur(radius=σ) (UniMatch's blur passes σ as PIL's radius)."""
    from PIL import ImageFilter
    from torchvision.transforms import functional as TF  # PIL's arithmetic, as torchvision applies it
    if draws["jitter"] is not None:
        order, *factors = draws["jitter"]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:  # a factor None is skipped, as ColorJitter's forward
            image = image if factors[i] is None else adjust[i](image, factors[i])
    if draws["grayscale"]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if draws["blur"] is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=draws["blur"]))
    return image

def cutmix_box_draws(size, rng, p=0.5):
    """None (probability 1 - p) or (x, y, w, h) of a box inside a crop of `size` (its side, or (H, W)), as
    UniMatch's obtain_cutmix_box: an area of U(0.02, 0.4) of the crop, drawn once; then aspect
    r ~ U(0.3, 1/0.3), w = int(sqrt(area / r)), h = int(sqrt(area · r)), corner x ~ {0..W-1},
    y ~ {0..H-1}, all three redrawn until the box lies inside."""
    h_crop, w_crop = (size, size) if isinstance(size, int) else size
    if rng.random() > p:
        return None
    area = rng.uniform(0.02, 0.4) * h_crop * w_crop
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = int(rng.integers(0, w_crop)), int(rng.integers(0, h_crop))
        if x + w <= w_crop and y + h <= h_crop:
            return x, y, w, h

def cutmix_box(size, draws):
    """(H, W) float 0/1 tensor of a crop of `size` (its side, or (H, W)), 1 inside the box `draws`
    (x, y, w, h); all 0 for None. 1 = the pixel comes from the mix partner."""
    box = torch.zeros((size, size) if isinstance(size, int) else tuple(size))
    if draws is not None:
        x, y, w, h = draws
        box[y:y + h, x:x + w] = 1
    return box

class StrongViewSet(torch.utils.data.Dataset):
    """Unlabeled crops as (weak view, n_strong strong views, valid, n_strong boxes), indexed like TrainSet by
    (sample index, augmentation seed): the weak view is the dataset's crop (augment: today's protocol
    UniMatch's weak view, the paper's its own crop); each strong view is built from it (RGB; a 4th channel,
    content or not, is kept) with its draws and then its box's, in UniMatch's order. Views (C, H, W) uint8,
    valid (H, W) uint8 (255 = image content), boxes (H, W) float, 1 = from the partner. partner=True: the
    same sample under other draws (UniMatch's second pass over one loader: the same images, independent
    augmentation)."""

    def __init__(self, split, crop, aug, n_strong, partner=False):
        self.split = split
        self.crop = tuple(crop)
        self.aug = aug
        self.n_strong = n_strong
        self.partner = partner

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        index, seed = key
        rng = np.random.default_rng([*np.atleast_1d(seed), 1] if self.partner else seed)
        weak, _, valid = augment(self.split.load(index)[0], None, rng, self.crop, self.aug)
        strong, boxes = [], []
        for _ in range(self.n_strong):
            rgb = Image.fromarray(weak[:3].permute(1, 2, 0).numpy())
            rgb = torch.from_numpy(np.array(strong_view(rgb, strong_view_draws(rng)))).permute(2, 0, 1)
            strong.append(torch.cat([rgb, weak[3:]]))  # the alpha channel, where there is one, unchanged
            boxes.append(cutmix_box(self.crop, cutmix_box_draws(self.crop, rng)))
        return (weak, *strong, valid, *boxes)

def pseudo_label_loss(logits, pseudo, conf, ignore, conf_thresh):
    """UniMatch's unlabeled loss, fp32: the cross-entropy of logits (B, K, H, W) against the pseudo-labels
    (B, H, W) where the confidence (B, H, W) reaches conf_thresh and ignore (B, H, W) is not 255 (255 =
    padding), summed, over the number of pixels that are not padding (confident or not: the loss grows with
    the confident share). 0 (no gradient) where every pixel is padding."""
    counted = ignore != IGNORE
    loss = F.cross_entropy(logits.float(), pseudo, reduction="none")  # (B, H, W)
    return torch.where(counted & (conf >= conf_thresh), loss, 0).sum() / counted.sum().clamp(min=1)

def pseudo_label_share(conf_thresh):
    """pseudo_label_loss as per_share takes it: rows -> (the loss, the pixels it is a mean over: not
    padding)."""
    def loss_fn(logits, pseudo, conf, ignore):
        return pseudo_label_loss(logits, pseudo, conf, ignore, conf_thresh), (ignore != IGNORE).sum()
    return loss_fn

def confident_share(conf, ignore, conf_thresh):
    """The share of the pixels that are not padding whose confidence reaches conf_thresh (UniMatch's mask
    ratio)."""
    counted = ignore != IGNORE
    return (counted & (conf >= conf_thresh)).sum() / counted.sum().clamp(min=1)

def padding_as_ignore(valid):
    """The loss mask v (B, 1, H, W), 1 = image content, as UniMatch's ignore mask (B, H, W): 255 on
    padding."""
    return torch.where(valid[:, 0] > 0, 0, IGNORE)

def check_fp_crop(net, crop, arch):
    """One line where the crop is smaller than the stride of the features that need_fp drops out
    (net.fp_stride): they would hold less than one pixel of the crop."""
    if min(crop) < net.fp_stride:
        raise UserError(f"--crop-size {crop[0]},{crop[1]}: {arch}'s feature perturbation drops out "
                        f"features at 1/{net.fp_stride} of the crop; "
                        f"give a crop of at least {net.fp_stride} pixels a side")

# ---- `python common.py TOOL ...`: a shortcut to `python -m tools TOOL ...`, run as its own program --------
if __name__ == "__main__":  # this file imports nothing of tools/: the shortcut starts a new process
    kit = Path(__file__).resolve().parent
    if not (kit / "tools" / "__main__.py").is_file():
        sys.exit(f"error: python common.py {' '.join(sys.argv[1:2])}: the commands live in tools/, "
                 f"which is not beside {kit / 'common.py'}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(kit), os.environ.get("PYTHONPATH")])))
    sys.exit(subprocess.run([sys.executable, "-m", "tools", *sys.argv[1:]], env=env).returncode)
