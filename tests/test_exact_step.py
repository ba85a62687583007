"""The step a run takes, defined once for any number of processes: losses as means per UniMatch-GPU share
(today's protocol) or over the whole batch (the paper's), the padding the network sees, epochs as UniMatch's 4
GPUs deal them, the default numerics, the reported network, and UniMatch's checkpoints scored by the kit."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import refused
from tools import evaluate as evaluate_tool


def ragged_batch(n, classes=4, size=(6, 7), seed=0):
    """Logits and labels whose rows hold very different numbers of labeled pixels (row 0: all, last: few)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, *size, generator=g)
    labels = torch.randint(0, classes, (n, *size), generator=g)
    ignored = torch.rand(n, *size, generator=g) < torch.linspace(0, 0.9, n)[:, None, None]
    return logits, labels.masked_fill(ignored, 255)


def test_the_paper_takes_one_mean_over_the_batchs_labeled_pixels():
    logits, labels = ragged_batch(4)
    keep = labels != 255
    by_hand = F.cross_entropy(logits, labels.clamp(max=3), reduction="none")[keep].mean()
    assert common.supervised_loss(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the single process's number is F.cross_entropy's own mean, to the bit (the paper's runs do not move)
    assert torch.equal(common.supervised_loss(logits, labels), F.cross_entropy(logits, labels, ignore_index=255))


def test_today_averages_the_means_of_unimatchs_four_gpu_shares():
    logits, labels = ragged_batch(8)  # 8 labeled images: 2 per UniMatch GPU
    shares = []
    for rows in torch.arange(8).split(2):
        keep = labels[rows] != 255
        shares.append(F.cross_entropy(logits[rows], labels[rows].clamp(max=3), reduction="none")[keep].mean())
    expected = torch.stack(shares).mean()
    got = common.supervised_loss(logits, labels, shares=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # unequal labeled counts: a pixel of the sparse last share weighs far more than one of the first
    assert abs(got.item() - common.supervised_loss(logits, labels).item()) > 0.01


def test_a_share_without_labeled_pixels_counts_zero():
    logits, labels = ragged_batch(4)
    labels[2:] = 255
    loss = common.supervised_loss(logits.requires_grad_(True), labels, shares=2)
    first = F.cross_entropy(logits[:2].detach(), labels[:2], ignore_index=255)
    assert loss.item() == pytest.approx(first.item() / 2, rel=1e-6) and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad[2:].abs().sum() == 0


@pytest.mark.parametrize("batch, per_gpu", [(16, 4), (8, 2)])
def test_ohem_keeps_its_pixels_per_gpu_share(batch, per_gpu):
    """UniMatch's supervised.py runs OHEM on 4 images per GPU (16 on 4), fixmatch.py and unimatch.py on 2."""
    logits, labels = ragged_batch(batch, classes=5, size=(10, 10), seed=1)
    ohem = dict(thresh=0.7, min_kept=150)
    expected = torch.stack([common.ohem_loss(lo, la, **ohem) for lo, la in zip(logits.split(per_gpu),
                                                                               labels.split(per_gpu))]).mean()
    got = common.supervised_loss(logits, labels, ohem, shares=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() == pytest.approx(common.ohem_loss(logits, labels, per_images=per_gpu, **ohem).item(), rel=1e-6)
    whole = common.ohem_loss(logits, labels, **ohem)  # one share: at least 150 pixels of the whole batch
    assert abs(whole.item() - got.item()) > 1e-3


def test_the_confidence_share_of_one_process_is_its_mean():
    t = (torch.rand(4, 1, 5, 5) > 0.3).float()
    assert torch.equal(common.global_mean(t), t.mean())


def test_share_rows_cut_a_process_rows_where_a_share_ends(monkeypatch):
    assert common.share_rows(8, 4) == [(0, slice(0, 2)), (1, slice(2, 4)), (2, slice(4, 6)), (3, slice(6, 8))]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # rows 4-7 of a global batch of 8
    assert common.share_rows(4, 4) == [(2, slice(0, 2)), (3, slice(2, 4))]
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")  # row 3 of 8, in the second share of 2
    assert common.share_rows(1, 4) == [(1, slice(0, 1))]
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")  # rows 0-3 of 12 in shares of 3: a share ends inside this process
    assert common.share_rows(4, 4) == [(0, slice(0, 3)), (1, slice(3, 4))]


def test_batches_that_do_not_split_four_ways_use_as_many_gpus_as_they_split(monkeypatch):
    def shares(batch):
        return common.parse_args(common.TrainArgs, ["--protocol", "unimatch", "--dataset", "pascal_aug",
                                                    "--batch-size", str(batch), "--no-pretrained"]).loss_shares
    assert [shares(b) for b in (8, 16, 6, 9, 2, 5)] == [4, 4, 3, 3, 2, 1]
    assert common.parse_args(common.TrainArgs, ["--batch-size", "6"]).loss_shares == 1  # the paper's: one mean


def test_padding_reaches_the_network_as_each_protocol_pads():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    black = [(0 - m) / s for m, s in zip(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    img, _, valid = common.augment(image, None, rng, (41, 41), dict(weak_view=True))
    x, v = common.to_device((img[None], valid[None]), torch.device("cpu"))
    assert (v == 0).any()
    padded = x[0][:, v[0, 0] == 0]  # UniMatch pads black before normalising: (-2.12, -2.04, -1.80)
    assert torch.allclose(padded, torch.tensor(black)[:, None].expand_as(padded), atol=1e-5)
    img, _, valid = common.augment(image, None, rng, (41, 41), dict(hflip=True))
    x, v = common.to_device((img[None], valid[None]), torch.device("cpu"))
    assert (v == 0).any() and (x[0][:, v[0, 0] == 0] == 0).all()  # the paper's code: the mean colour, 0


@pytest.mark.parametrize("world", [1, 4])
def test_epochs_are_dealt_to_unimatchs_four_gpus_on_any_number_of_processes(world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    for dataset, total in (("cityscapes", 2975), ("pascal_aug", 10582)):
        folder = common.UNIMATCH_SPLITS / ("pascal" if dataset == "pascal_aug" else dataset)
        for listed in sorted(folder.glob("*/labeled.txt")):
            n = len(common.prepare.read_lines(listed))
            for batch, images in ((8, total - n), (16, n)):  # the semi-supervised methods, the baseline
                args = common.parse_args(common.TrainArgs, ["--protocol", "unimatch", "--dataset", dataset,
                                                            "--split-file", str(listed), "--batch-size", str(batch),
                                                            "--no-pretrained", "--device", "cpu"])
                common.epochs_to_iters(args, images, args.loss_shares)
                per_gpu = -(-images // 4)  # DistributedSampler pads to a multiple of 4; full batches only
                assert args.iters_per_epoch == per_gpu // (batch // 4), (listed, batch)
    baseline = SimpleNamespace(batch_size=16, epochs=80, iters=None, eval_every=None)
    common.epochs_to_iters(baseline, 366, 4)
    assert (baseline.iters_per_epoch, baseline.iters) == (23, 1840)  # Pascal 366, as UniMatch's 4 GPUs


def test_default_numerics():
    assert common.default_amp("unimatch", "cuda") == "tf32"  # UniMatch's: fp32, TF32 convolutions
    assert common.default_amp("paper", "cuda:1") == "bf16"
    assert common.default_amp("unimatch", "cpu") == common.default_amp("paper", "cpu") == "off"
    args = common.parse_args(common.TrainArgs, ["--protocol", "unimatch", "--dataset", "pascal_aug", "--amp", "bf16",
                                                "--no-pretrained", "--device", "cpu"])
    assert args.amp == "bf16"  # bf16 stays an option
    with common.autocast("tf32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def unimatch_checkpoint(net, path):
    """A file as UniMatch's training saves it: DDP's 'module.' prefixes, the optimiser, the epoch, the best."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(dict(model=state, optimizer={}, epoch=79, previous_best=70.0), path)
    return path


def test_a_unimatch_checkpoint_is_loaded_and_scored(tmp_path, capsys):
    torch.manual_seed(0)
    net = common.build_net(SimpleNamespace(arch="unet_small", pretrained=False, aspp_all_branches=False), 5,
                           torch.device("cpu"))
    path = unimatch_checkpoint(net, tmp_path / "latest.pth")
    loaded, info = common.load_model(path)
    assert (info["arch"], info["num_classes"], info["eval_window"]) == ("unet_small", 5, None)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    bare = tmp_path / "bare.pth"
    torch.save(net.state_dict(), bare)  # a bare state dict, without the prefixes
    assert common.load_model(bare)[1]["arch"] == "unet_small"
    # scored as a run evaluates: the demo's validation images, its confusion-matrix mIoU
    data = common.load_dataset("demo", with_unlabeled=False)
    expected = common.evaluate(loaded, common.val_loader(data.val, 8), torch.device("cpu"), 5)[0]
    evaluate_tool.main("evaluate", [str(path), "--dataset", "demo", "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"mIoU={expected:.2f}"
    record = json.loads((tmp_path / "latest.pth.evaluation.json").read_text())
    assert record["miou"] == pytest.approx(expected) and len(record["per_class_iou"]) == 5


def test_the_deep_stem_network_is_recognised_as_unimatchs_cityscapes_model():
    with torch.device("meta"):
        net = common.build_net(SimpleNamespace(arch="deeplabv3plus_deepstem", pretrained=False,
                                               aspp_all_branches=False), 19, torch.device("meta"))
    assert common.recognise_weights(net.state_dict(), "x.pth") == ("deeplabv3plus_deepstem", 19)


def test_foreign_files_are_refused_by_name(tmp_path):
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(common.UserError, match="notes.pth: not a checkpoint that can be read"):
        common.load_model(junk)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(common.UserError, match="other.pth: weights of no network the kit builds"):
        common.load_model(other)
    net = common.build_net(SimpleNamespace(arch="unet_small", pretrained=False, aspp_all_branches=False), 7,
                           torch.device("cpu"))
    seven = unimatch_checkpoint(net, tmp_path / "seven.pth")
    with pytest.raises(common.UserError, match="seven.pth holds a unet_small of 7 classes; --dataset demo has 5"):
        evaluate_tool.main("evaluate", [str(seven), "--dataset", "demo"])


def test_evaluate_refuses_what_is_not_there(tmp_path):
    with pytest.raises(common.UserError, match="no such run folder or checkpoint file"):
        evaluate_tool.main("evaluate", [str(tmp_path / "missing")])
    with pytest.raises(common.UserError, match="no run there"):
        evaluate_tool.main("evaluate", [str(tmp_path)])
