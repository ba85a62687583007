"""One training iteration of every script under both protocols, in one program: `python tests/one_step.py OUT
DATA_ROOT LIST` in one process, or under `torchrun --nproc_per_node=N` in N. Each run writes its checkpoint (the
optimiser's state after the step: the step's gradient, whatever the learning rate) into OUT/<script>_<protocol>.
tests/test_distributed.py compares the two. One program for all runs: one interpreter start-up, not one each."""
import contextlib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402

# train_unimatch.py is left out: its feature perturbation's dropout is a draw of each process (as on UniMatch's GPUs)
SCRIPTS = ["train_baseline.py", "train_cutmix.py", "train_cutout.py", "train_vat.py", "train_ict.py",
           "train_stdaug.py", "train_fixmatch.py"]
# Cityscapes' tiny official layout: the paper's halved images (16x32) in padded crops, today's full ones
# (32x64) in UniMatch's weak view with OHEM; unet_small (BatchNorm trains: global statistics) for speed
PROTOCOLS = {"paper": ["--crop-size", "20,36", "--batch-size", "4"],
             "unimatch": ["--protocol", "unimatch", "--crop-size", "16", "--no-pretrained"]}


THRESHOLDS = {"train_vat.py": "0.0668"}


def runs(out, data_root, split_list):
    """(folder, script, argv) of every run."""
    for script in SCRIPTS:
        for protocol, options in PROTOCOLS.items():
            argv = ["--dataset", "cityscapes", "--data-root", data_root, "--arch", "unet_small", "--iters", "1",
                    "--num-workers", "0", "--out", f"{out}/{Path(script).stem}_{protocol}", *options]
            argv += ["--split-file", split_list] if protocol == "unimatch" else ["--n-labeled", "4"]
            yield script, argv


def main(out, data_root, split_list):
    # one process group for all runs (torchrun's rendezvous serves one): each run ends at a barrier only
    common.leave_process_group = lambda: common.process_group()[1] > 1 and torch.distributed.barrier()
    for script, argv in runs(out, data_root, split_list):
        module = importlib.import_module(Path(script).stem)
        if hasattr(module.Args, "conf_thresh"):  # confidence shares neither 0 nor 1, a consistency loss that
            # weighs in the gradient: a share taken per process would show (VAT's teacher in eval mode, at its
            # initial BatchNorm statistics, is less sure)
            argv += ["--conf-thresh", THRESHOLDS.get(script, "0.1"), "--cons-weight", "30"]
        sys.argv = [str(ROOT / script), *argv]
        with contextlib.redirect_stdout(sys.stderr):
            module.main(common.parse_args(module.Args, argv))


if __name__ == "__main__":
    main(*sys.argv[1:])
