"""Score a run or a checkpoint file on a validation split, exactly as a run evaluates it.

    python -m tools evaluate runs/train_cutmix_cityscapes_372_s1
    python -m tools evaluate latest.pth --dataset cityscapes --data-root data/cityscapes --protocol unimatch

SOURCE is a run folder or a checkpoint file: UniMatch's released checkpoints, a bare state dict (with or
without DDP's 'module.' prefixes) or a run's checkpoint.pt. The training scripts' own options choose the
images and the windows (--dataset, --data-root, --protocol, --crop-size: the sliding windows' side under
today's protocol, --cache-dir, --device, --amp); a run folder's own settings fill in those not given.
Prints the per-class IoU, writes mIoU and per-class IoU as JSON (--json; default: evaluation.json in the run
folder, or SOURCE.evaluation.json beside a file), and its last line is `mIoU=<value>`.
"""
import argparse
import json
from pathlib import Path

import common
from common import UserError
from cutmixseg import guard

# the settings of a run folder that choose what it was evaluated on, taken where not given
RUN_SETTINGS = ("dataset", "protocol", "data_root", "crop_size", "cache_dir", "num_classes", "batch_size")


def main(command, argv):
    parser = argparse.ArgumentParser(prog="python -m tools evaluate", description=__doc__.split("\n")[0],
                                     epilog="Any other option is a training script's "
                                            "(python train_baseline.py --help).")
    parser.add_argument("source", help="a run folder or a checkpoint file")
    parser.add_argument("--net", choices=["teacher", "student"],
                        help="a run's network "
                             "(default: the one it reports; a file: the teacher of a run's file)")
    parser.add_argument("--json", help="where to write the scores (default: beside SOURCE)")
    opts, rest = parser.parse_known_args(argv)
    source = Path(opts.source).expanduser()
    if not source.exists():
        raise UserError(f"{source}: no such run folder or checkpoint file")
    given = common.command_line(common.TrainArgs, rest)
    saved = {}
    if source.is_dir():
        if not (source / "args.json").is_file():
            raise UserError(f"{source}: no run there "
                            f"(expected a run folder with args.json and checkpoint.pt)")
        saved = guard.read_json(source / "args.json", "record of the run's settings")
        for key in RUN_SETTINGS:
            if saved.get(key) is not None and key not in given:
                given[key] = saved[key]
    args = common.resolve(common.TrainArgs, given)
    device = common.resolve_device(args.device)
    amp = args.amp or common.default_amp(args.protocol, str(device))
    net_name = opts.net or saved.get("reported_net", "teacher")
    net, info = common.load_model(source, net_name, device)
    data = common.load_dataset(args.dataset, args.data_root, args.n_labeled, args.split_seed, args.split_file,
                               args.num_classes, args.cache_dir, with_unlabeled=False, protocol=args.protocol)
    if info["num_classes"] != data.num_classes:
        raise UserError(f"{source} holds a {info['arch']} of {info['num_classes']} classes; --dataset "
                        f"{args.dataset} has {data.num_classes}")
    loader = common.val_loader(data.val, args.batch_size, args.num_workers)
    miou, per_class, _ = common.evaluate(net, loader, device, data.num_classes, amp, args.lesion_scoring,
                                         window=args.eval_window)
    how = f"sliding windows of {args.eval_window}" if args.eval_window else "whole images"
    print(f"{source} ({net_name if source.is_dir() else info['arch']}) on {len(data.val)} {args.dataset} "
          f"validation images, {how}:")
    for name, value in zip(data.class_names, per_class):
        print(f"  {name:<16} {value:6.2f}")
    if source.is_dir():
        default = source / "evaluation.json"
    else:
        default = source.with_name(source.name + ".evaluation.json")
    out = Path(opts.json).expanduser() if opts.json else default
    record = dict(source=str(source.resolve()), net=net_name if source.is_dir() else None, arch=info["arch"],
                  dataset=args.dataset, protocol=args.protocol, eval_window=args.eval_window, miou=miou,
                  per_class_iou=dict(zip(data.class_names, per_class)))
    try:
        common.atomic_write(out, json.dumps(record, indent=2))
    except OSError as e:
        raise UserError(f"--json {out}: cannot be written ({e.strerror or e}); give another --json")
    print(f"scores in {out}")
    print(f"mIoU={miou:.2f}")
    return 0
