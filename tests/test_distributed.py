"""torchrun: two CPU processes (gloo) give the run of one process, write one set of outputs, resume
across world sizes; the global-batch BatchNorm against the plain one."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import ENV, ROOT, read_results, refused, run_main

import common
from cutmixseg import nets

# batch 4 = 2 images per process; unet_small's BatchNorm trains, so it goes through GlobalBatchNorm
SMALL = ["--iters", "6", "--eval-every", "3", "--batch-size", "4", "--num-workers", "0"]
SCRIPTS = ["train_baseline.py", "train_cutmix.py", "train_cutout.py", "train_vat.py", "train_ict.py",
           "train_stdaug.py"]


def torchrun(script, *args, nproc=2, check=True):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / script), *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def student_weights(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["student"]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("iter", "lr", "seconds_per_iter")} for r in records
            if "seconds_per_iter" in r]


def assert_same_run(a, b):
    """Same data, masks and global-batch statistics: only the float summation order differs. Adam turns
    such differences in near-zero gradients into steps of up to lr, hence the weights' tolerance."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 6
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=2e-3, abs=1e-5), (key, la, lb)
    ra, rb = read_results(a), read_results(b)
    assert ra["miou"] == pytest.approx(rb["miou"], abs=0.5)
    assert ra["student_miou"] == pytest.approx(rb["student_miou"], abs=0.5)
    wa, wb = student_weights(a), student_weights(b)
    for key in wa:  # BatchNorm's running statistics follow the weights' differences through the layers
        tolerance = dict(rtol=0.05, atol=0.01) if "running" in key else dict(atol=3e-3)
        assert torch.allclose(wa[key].float(), wb[key].float(), **tolerance), key


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_train_as_one(script, tmp_path, shared_run):
    one, _ = shared_run(script, *SMALL)  # the single process's run, through main()
    proc = torchrun(script, *SMALL, "--out", tmp_path / "two")
    assert_same_run(one, tmp_path / "two")
    assert read_results(tmp_path / "two")["world_size"] == 2
    assert proc.stdout.count("FINAL mIoU=") == 1  # one process prints and writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in one.iterdir())
    log = (tmp_path / "two" / "log.txt").read_text()
    assert log.count("eval it 6") == 1


def test_resume_with_another_number_of_processes(tmp_path, shared_run):
    whole, _ = shared_run("train_cutmix.py", *SMALL)
    # two processes train 3 iterations and checkpoint; without results.json the folder is what a kill
    # after that checkpoint leaves; one process finishes the run
    torchrun("train_cutmix.py", *SMALL[:1], "3", *SMALL[2:], "--out", tmp_path / "split")
    (tmp_path / "split" / "results.json").unlink()
    proc = run_main("train_cutmix.py", *SMALL, "--out", tmp_path / "split", "--resume")
    assert "resumed from iteration 3" in proc.stdout
    assert_same_run(whole, tmp_path / "split")


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    """What torchrun's two processes read (WORLD_SIZE=2), given in this process: refused before anything runs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    last = refused("train_baseline.py", *SMALL[:4], "--batch-size", "3", out=tmp_path / "x")
    assert last == "error: --batch-size 3 is the global batch of all 2 processes: it must be divisible by 2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batchnorm_worker(rank, port, x, weight, queue):
    """One process's share of the batch through GlobalBatchNorm; an error goes back to the test as its text."""
    try:
        batchnorm_step(rank, port, x, weight, queue)
    except BaseException:
        import traceback
        queue.put((rank, traceback.format_exc()))
        raise


def batchnorm_step(rank, port, x, weight, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    bn = nets.GlobalBatchNorm(3, momentum=0.5)
    bn.weight.data.copy_(weight)
    share = x[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
    y = bn(share)
    (y * torch.arange(y.numel()).view(y.shape).float()).sum().backward()  # a loss per process
    grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
    for g in grads:
        torch.distributed.all_reduce(g)  # what all_reduce_grads sums (before its division)
    queue.put((rank, *(t.detach().numpy() for t in (y, share.grad, *grads, bn.running_mean, bn.running_var))))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("spread, offset, atol, rtol", [(3.0, 1.0, 1e-5, 0), (1e-2, 3.0, 2e-4, 1e-3)])
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(spread, offset, atol, rtol):
    """Also for channels that are nearly constant (black padding): there a variance taken as the mean square
    less the squared mean cancels to noise (outputs off by 1.5e-2 here, against 3e-5)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * spread + offset
    weight = torch.rand(3) + 0.5
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=batchnorm_worker, args=(r, port, x, weight, queue)) for r in range(2)]
    for p in procs:
        p.start()
    replies = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [reply[1] for reply in replies if isinstance(reply[1], str)]
    assert not errors, errors[0]
    results = {r[0]: [torch.from_numpy(a) for a in r[1:]] for r in replies}
    reference = nn.BatchNorm2d(3, momentum=0.5)
    reference.weight.data.copy_(weight)
    whole = x.clone().requires_grad_(True)
    y = reference(whole)
    loss = sum((y[r * 2:(r + 1) * 2] * torch.arange(y[r * 2:(r + 1) * 2].numel()).view(2, 3, 5, 6).float()).sum()
               for r in range(2))
    loss.backward()
    for r in range(2):
        y_r, grad_x, grad_w, grad_b, running_mean, running_var = results[r]
        assert torch.allclose(y_r, y[r * 2:(r + 1) * 2].detach(), atol=atol)
        assert torch.allclose(grad_x, whole.grad[r * 2:(r + 1) * 2], atol=1e-4, rtol=rtol)
        assert torch.allclose(grad_w, reference.weight.grad, atol=1e-3, rtol=rtol)
        assert torch.allclose(grad_b, reference.bias.grad, atol=1e-3, rtol=rtol)
        assert torch.allclose(running_mean, reference.running_mean, atol=1e-5)
        assert torch.allclose(running_var, reference.running_var, atol=1e-5, rtol=1e-4)


def optimiser_states(folder):
    """{run: the optimiser's state after its one step, flattened}: Adam's first moments or SGD's momentum
    buffers, i.e. the step's gradient whatever the learning rate."""
    states = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]
        key = "exp_avg" if "exp_avg" in state[0] else "momentum_buffer"
        states[run.name] = torch.cat([state[i][key].flatten() for i in sorted(state)])
    return states


def test_one_step_of_every_script_is_the_same_on_one_and_two_processes(official, tmp_path):
    """tests/one_step.py: one iteration of every script under both protocols on Cityscapes' tiny layout, with
    padded crops (unequal labeled pixels per process), confidence shares around one half, a consistency loss
    that weighs in the gradient, OHEM per UniMatch share. Float noise alone is ~2e-6; a confidence share or a
    labeled-pixel mean taken per process gives 5e-3 to 6e-2."""
    root = official["cityscapes"]
    names = common.cityscapes_full_dataset(root)[0].names
    listed = tmp_path / "labeled.txt"
    listed.write_text("".join(f"leftImg8bit/train/{n.split('_')[0]}/{n}_leftImg8bit.png x\n" for n in names[:3]))
    program = [str(ROOT / "tests" / "one_step.py"), None, str(root), str(listed)]
    for folder, launcher in (("one", [sys.executable]),
                             ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2"])):
        program[1] = str(tmp_path / folder)
        proc = subprocess.run([*launcher, *program], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = optimiser_states(tmp_path / "one"), optimiser_states(tmp_path / "two")
    assert len(one) == 14 and one.keys() == two.keys()
    for run in one:
        distance = ((one[run] - two[run]).norm() / one[run].norm()).item()
        assert distance <= 1e-5, (run, distance)
    for run in one:  # the confidence shares were neither 0 nor 1
        log = (tmp_path / "one" / run / "log.txt").read_text()
        if "conf " in log:
            share = float(log.split("conf ")[1].split()[0])
            assert 0.1 < share < 0.9, (run, share)


def loss_worker(rank, world, port, logits, labels, ohem, shares, queue):
    """This process's rows through supervised_loss; the gradient as all_reduce_grads leaves it (the mean)."""
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        n = len(logits) // world
        mine = logits[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        common.supervised_loss(mine, labels[rank * n:(rank + 1) * n], ohem, shares).backward()
        queue.put((rank, (mine.grad / world).numpy()))
        torch.distributed.destroy_process_group()
    except BaseException:
        import traceback
        queue.put((rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("ohem", [None, dict(thresh=0.7, min_kept=20)])
def test_a_share_that_spans_processes_has_one_mean(ohem):
    """4 processes of one image each, UniMatch's shares of 2: the labeled-pixel count and OHEM's threshold are
    the share's, across the two processes that hold it."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 7)
    labels = torch.randint(0, 5, (4, 6, 7)).masked_fill(torch.rand(4, 6, 7) < torch.linspace(0, 0.8, 4)[:, None,
                                                                                                          None], 255)
    whole = logits.clone().requires_grad_(True)
    common.supervised_loss(whole, labels, ohem, 2).backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=loss_worker, args=(r, 4, port, logits, labels, ohem, 2, queue)) for r in range(4)]
    for p in procs:
        p.start()
    replies = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [reply for reply in replies.values() if isinstance(reply, str)]
    assert not errors, errors[0]
    got = torch.cat([torch.from_numpy(replies[r]) for r in range(4)])
    assert torch.allclose(got, whole.grad, atol=1e-7, rtol=1e-5)


def test_benchmark_under_torchrun_counts_all_processes(tmp_path):
    proc = torchrun("train_cutmix.py", "--benchmark", "2", "--batch-size", "4", "--num-workers", "0")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
    assert len(lines) == 1  # process 0 reports
    record = json.loads(lines[0][len("BENCHMARK "):])
    assert record["world_size"] == 2 and "2 processes" in proc.stdout
    assert record["images_per_s"] * record["ms_per_iter"] / 1000 == pytest.approx(12)  # 3 streams x global 4
