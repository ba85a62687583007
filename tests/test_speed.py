"""--benchmark (numbers printed, nothing written, FLOPs counted), --compile, batched teacher passes."""
import json

import pytest
import torch

from conftest import once, read_results, refused, run_main, run_script

import common
from cutmixseg import nets

# images per iteration of each script's streams at batch 8: labeled + unlabeled batches
IMAGES = {"train_baseline.py": 8, "train_cutmix.py": 24, "train_cutout.py": 16, "train_vat.py": 16,
          "train_ict.py": 24, "train_stdaug.py": 16, "train_fixmatch.py": 24, "train_unimatch.py": 24}
KEYS = {"script", "method", "dataset", "arch", "device", "amp", "compile", "world_size", "batch_size", "crop_size",
        "data", "ms_per_iter", "iters_per_s", "images_per_s", "peak_memory_gib", "memory_kind", "tflop_per_iter",
        "tflops", "peak_tflops", "mfu", "eval_seconds", "iters", "train_minutes", "run_minutes",
        "loader_images_per_s", "peak_reserved_gib", "warmup_seconds", "images_per_iter", "evaluations", "num_workers"}


def benchmark(script, *args, cwd):
    """`SCRIPT --benchmark 2 ARGS` through main() in this process, from `cwd`: (its BENCHMARK record, stdout)."""
    proc = run_main(script, "--benchmark", "2", "--num-workers", "0", *args, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
    assert len(lines) == 1, proc.stdout
    record = json.loads(lines[0][len("BENCHMARK "):])
    assert record == proc.result  # main returns what it printed
    return record, proc.stdout


@pytest.fixture(scope="session")
def demo_benchmarks(shared_root):
    """Each script's demo benchmark, once per session (all workers)."""
    def build(folder):
        records = {script: benchmark(script, cwd=folder) for script in IMAGES}
        assert list(folder.iterdir()) == []  # a benchmark writes nothing
        (folder / "records.json").write_text(json.dumps(records))
    return {script: tuple(r) for script, r in json.loads((once(shared_root, "demo_benchmarks", build)
                                                          / "records.json").read_text()).items()}


@pytest.mark.parametrize("script", list(IMAGES))
def test_demo_benchmark_reports_speed_flops_and_loading(script, demo_benchmarks):
    record, stdout = demo_benchmarks[script]
    assert set(record) == KEYS
    assert record["dataset"] == "demo" and record["data"] == "real" and record["crop_size"] == [48, 48]
    assert record["ms_per_iter"] > 0 and record["iters_per_s"] == pytest.approx(1000 / record["ms_per_iter"])
    assert record["images_per_s"] == pytest.approx(IMAGES[script] * record["iters_per_s"])
    assert record["tflop_per_iter"] > 0 and record["peak_tflops"] is None and record["mfu"] is None  # CPU
    assert record["loader_images_per_s"] > 0 and record["eval_seconds"] > 0 and record["peak_memory_gib"] > 0
    assert record["train_minutes"] == pytest.approx(1500 * record["ms_per_iter"] / 60000)
    assert record["run_minutes"] > record["train_minutes"]
    for words in ("ms/it", "TFLOP/it", "peak unknown for this device", "validation images", "1500 iterations",
                  "workers per process"):
        assert words in stdout


def test_flop_counts_follow_the_passes_of_each_method(demo_benchmarks):
    """In units of one forward pass over one batch (a backward costs about two): baseline = forward +
    backward on the labeled batch = 3; CutMix adds two teacher forwards and the student's forward and
    backward on the mixed batch = 3 + 2 + 3; Cutout and std-aug one teacher forward = 3 + 1 + 3."""
    flops = {s: r["tflop_per_iter"] for s, (r, _) in demo_benchmarks.items()}
    base = flops["train_baseline.py"]
    assert flops["train_cutmix.py"] / base == pytest.approx(8 / 3, rel=0.03)
    assert flops["train_ict.py"] / base == pytest.approx(8 / 3, rel=0.03)
    assert flops["train_cutout.py"] / base == pytest.approx(7 / 3, rel=0.03)
    assert flops["train_stdaug.py"] / base == pytest.approx(7 / 3, rel=0.03)
    # VAT: teacher forward (1); the direction's forward and backward through the frozen teacher, to
    # the input only, no weight gradients (1 + 1); the student's forward and backward (3)
    assert flops["train_vat.py"] / base == pytest.approx(9 / 3, rel=0.03)
    # FixMatch: the partner's forward (1); the labeled and weak batches' joint forward and backward (2 + 4; the
    # weak rows' gradient is 0 but computed); the strong batch's (3). UniMatch: need_fp runs the decoder over both
    # halves (the joint pass's decoder doubled) and two strong batches: 13 / 3 where the decoder is cheap (DeepLab
    # v2), more where it is most of the network (the U-Net's, at full resolution)
    assert flops["train_fixmatch.py"] / base == pytest.approx(10 / 3, rel=0.03)
    assert 13 / 3 < flops["train_unimatch.py"] / base < 19 / 3


def deeplabv2_flops(script, cwd):
    proc = run_main(script, "--arch", "deeplabv2", "--benchmark", "1", "--batch-size", "2", "--crop-size", "32",
                    "--num-workers", "0", cwd=cwd)
    assert "freeze_bn=True" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK "))
    return json.loads(line[len("BENCHMARK "):])["tflop_per_iter"]


RATIOS = {"train_cutmix.py": 8 / 3, "train_ict.py": 8 / 3, "train_cutout.py": 7 / 3, "train_stdaug.py": 7 / 3,
          "train_vat.py": 9 / 3, "train_fixmatch.py": 10 / 3, "train_unimatch.py": 13 / 3}


@pytest.mark.slow
@pytest.mark.parametrize("script", RATIOS)
def test_joint_student_pass_with_frozen_batchnorm_runs_every_script_and_counts_the_same_flops(
        script, shared_root, tmp_path):
    """DeepLab v2 (every BatchNorm frozen): the student predicts the labeled and the unlabeled batch in
    one pass (cat, split); the FLOPs per iteration keep each method's ratio to the baseline (measured once)."""
    baseline = once(shared_root, "deeplabv2_baseline_flops", lambda folder: (folder / "flops.json").write_text(
        json.dumps(deeplabv2_flops("train_baseline.py", folder))))
    base = json.loads((baseline / "flops.json").read_text())
    assert deeplabv2_flops(script, tmp_path) / base == pytest.approx(RATIOS[script], rel=0.01), script


def test_flops_of_one_forward_pass_match_the_counted_iteration(demo_benchmarks):
    from torch.utils.flop_counter import FlopCounterMode
    net = nets.UNetSmall(5)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(8, 3, 48, 48))
    forward = counter.get_total_flops() / 1e12
    assert demo_benchmarks["train_baseline.py"][0]["tflop_per_iter"] / forward == pytest.approx(3, rel=0.05)


def test_benchmark_without_data_uses_the_protocols_shapes(tmp_path):
    record, stdout = benchmark("train_cutmix.py", "--dataset", "cityscapes", "--arch", "unet_small",
                               "--crop-size", "64,128", "--batch-size", "2", cwd=tmp_path)
    assert record["data"] == "synthetic" and record["loader_images_per_s"] is None
    assert record["crop_size"] == [64, 128] and record["iters"] == 40000 and record["images_per_s"] > 0
    assert "500 validation images" in stdout and "40000 iterations" in stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_benchmark_needs_no_pretrained_weights(tmp_path):
    # deeplabv2 would load ImageNet weights; the benchmark times random ones (this machine has none)
    record, _ = benchmark("train_baseline.py", "--dataset", "cityscapes", "--crop-size", "33,33", "--batch-size",
                          "1", cwd=tmp_path)
    assert record["arch"] == "deeplabv2" and record["tflop_per_iter"] > 0


def test_negative_benchmark_is_refused():
    assert refused("train_cutmix.py", "--benchmark", "-1") == "error: --benchmark expects a number of iterations, got -1"


def test_forward_each_batches_only_where_batchnorm_uses_running_statistics():
    torch.manual_seed(0)
    net = nets.UNetSmall(3)
    a, b = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    net.train()  # batch statistics: one pass per batch, as two separate calls
    with torch.no_grad():
        out_a, out_b = common.forward_each(net, a, b)
        assert torch.equal(out_a, net(a)) and torch.equal(out_b, net(b))
        joint = net(torch.cat([a, b]))[:2]
    assert not torch.allclose(out_a, joint, atol=1e-4)  # concatenating would have changed the statistics
    net.eval()
    with torch.no_grad():
        out_a, out_b = common.forward_each(net, a, b)
        assert out_a.shape == (2, 3, 16, 16) and out_b.shape == (3, 3, 16, 16)
        assert torch.allclose(out_a, net(a), atol=1e-5) and torch.allclose(out_b, net(b), atol=1e-5)


def test_one_student_pass_over_both_batches_gives_the_gradients_of_two():
    """Step 4 of the scripts: where no BatchNorm uses batch statistics the labeled and the unlabeled
    batch share one forward pass and one backward pass of the summed loss; the gradients are those of
    two passes."""
    torch.manual_seed(0)
    x_l, x_u = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    y_l, target = torch.randint(0, 3, (2, 16, 16)), torch.rand(2, 3, 16, 16)
    for bn_trains in (False, True):
        net = nets.UNetSmall(3).double()
        net.train()
        if not bn_trains:
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

        def loss_of(logits_l, logits_u):
            return (torch.nn.functional.cross_entropy(logits_l, y_l)
                    + 0.5 * (logits_u.softmax(1) - target.double()).pow(2).sum(1).mean())

        separate = torch.autograd.grad(loss_of(net(x_l.double()), net(x_u.double())), list(net.parameters()))
        joint = torch.autograd.grad(loss_of(*common.forward_each(net, x_l.double(), x_u.double())),
                                    list(net.parameters()))
        for g_separate, g_joint in zip(separate, joint):
            assert torch.allclose(g_separate, g_joint, rtol=1e-9, atol=1e-12)


def test_evaluation_stays_eager_under_compile():
    """--compile compiles the training shapes only: evaluating whole images of other sizes compiles nothing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    net = nets.UNetSmall(3)
    net.compile(backend="eager", dynamic=False)
    net(torch.randn(2, 3, 16, 16))
    compiled = counters["frames"]["ok"]
    assert compiled >= 1
    batches = [(torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8), torch.randint(0, 3, (1, h, w)))
               for h, w in ((24, 40), (32, 32), (40, 24))]
    miou, per_class, _ = common.evaluate(net, batches, torch.device("cpu"), num_classes=3)
    assert counters["frames"]["ok"] == compiled and 0 <= miou <= 100 and len(per_class) == 3
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tmp_path):
    """The compiled run in a process of its own: torch.compile's caches and settings stay there."""
    args = ["--iters", "3", "--eval-every", "3", "--batch-size", "2", "--num-workers", "0"]
    run_main("train_baseline.py", *args, "--out", tmp_path / "eager")
    run_script("train_baseline.py", *args, "--compile", "--out", tmp_path / "compiled", timeout=900)
    eager, compiled = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("eager", "compiled"))
    for e, c in zip(eager, compiled):
        if "sup" in e:
            assert c["sup"] == pytest.approx(e["sup"], rel=1e-3)
    # the checkpoint keeps the plain module names: it loads into an uncompiled net
    state = torch.load(tmp_path / "compiled" / "checkpoint.pt", map_location="cpu", weights_only=True)
    nets.UNetSmall(5).load_state_dict(state["student"])
    assert read_results(tmp_path / "compiled")["miou"] == pytest.approx(read_results(tmp_path / "eager")["miou"],
                                                                        abs=0.5)


@pytest.mark.slow
def test_costs_command_prints_one_row_per_cell(tmp_path, capfd, monkeypatch):
    """`python -m tools costs` in this process; the benchmarks it runs are programs of their own."""
    from tools import costs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    costs.main("costs", ["--datasets", "demo", "--methods", "baseline", "cutmix", "--iters", "1", "--", "--num-workers",
                         "0"])
    out, err = capfd.readouterr()
    assert "failed" not in out, err
    rows = [line for line in out.splitlines() if line.startswith("| demo |")]
    assert [row.split(" | ")[2] for row in rows] == ["baseline", "cutmix"]
    assert all("| unet_small |" in row and "8, 48x48" in row for row in rows)
    assert list(tmp_path.iterdir()) == []
