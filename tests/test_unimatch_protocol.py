"""Today's protocol (--protocol unimatch): UniMatch's split lists, iterations, learning rates and settings, its
data layouts, the bad input it meets, and every script end to end on tiny official-layout fixtures."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train_baseline
import train_cutmix
from conftest import read_results, refused, run_main
from cutmixseg import files, prepare

SCRIPTS = ["train_baseline.py", "train_cutmix.py", "train_cutout.py", "train_vat.py", "train_ict.py",
           "train_stdaug.py", "train_fixmatch.py", "train_unimatch.py"]
UNIMATCH = ["--protocol", "unimatch", "--device", "cpu"]


def unimatch_args(*argv, args_class=train_cutmix.Args):
    return common.parse_args(args_class, [*UNIMATCH, *map(str, argv)])


@pytest.mark.parametrize("dataset, counts", [("cityscapes", [100, 186, 372, 744, 1488]),
                                             ("pascal_aug", [92, 183, 366, 732, 1464, 662, 1323, 2646])])
def test_n_labeled_picks_unimatchs_list_of_that_count(dataset, counts):
    for n in counts:
        args = unimatch_args("--dataset", dataset, "--no-pretrained", "--n-labeled", n)
        assert args.n_labeled == n == len(prepare.read_lines(args.split_file))
        assert "u2pl" not in args.split_file
    blended = unimatch_args("--dataset", "pascal_aug", "--n-labeled", 1323).split_file
    assert blended.endswith("pascal/1_8/labeled.txt")  # CPS's blended list, as UniMatch's table


def test_a_split_file_is_used_whole_and_the_u2pl_lists_ship_too():
    u2pl = common.UNIMATCH_SPLITS / "pascal" / "u2pl_1_8" / "labeled.txt"
    args = unimatch_args("--dataset", "pascal_aug", "--split-file", u2pl)
    assert args.n_labeled == 1323 and args.split_file == str(u2pl)
    assert args.crop_size == (321, 321)  # U2PL's cells take --crop-size 513, as UniMatch's logs (README)
    assert unimatch_args("--dataset", "pascal_aug", "--split-file", u2pl, "--n-labeled", 10).n_labeled == 10


def test_the_lists_are_a_subset_of_the_training_list_and_disjoint_from_validation():
    lists = common.UNIMATCH_SPLITS / "pascal"
    train, val = ({n for _, n in prepare.read_lines(lists / f)} for f in ("train_aug.txt", "val.txt"))
    assert len(train) == 10582 and len(val) == 1449 and not train & val
    for labeled in lists.glob("*/labeled.txt"):
        assert {n for _, n in prepare.read_lines(labeled)} <= train, labeled
    city_val = {n for _, n in prepare.read_lines(common.UNIMATCH_SPLITS / "cityscapes" / "val.txt")}
    assert len(city_val) == 500 and all(n.startswith("leftImg8bit/val/") for n in city_val)


def test_settings_of_the_protocol():
    city = unimatch_args("--dataset", "cityscapes", "--no-pretrained")
    assert (city.arch, city.crop_size, city.batch_size, city.epochs, city.lr, city.backbone_lr_mult) == (
        "deeplabv3plus_deepstem", (801, 801), 8, 240, 0.005, 1.0)
    assert (city.optimizer, city.momentum, city.weight_decay, city.nesterov, city.freeze_bn) == ("sgd", 0.9, 1e-4,
                                                                                               False, False)
    assert city.ohem == dict(thresh=0.7, min_kept=200_000) and city.eval_window == 801
    assert city.loss_shares == 4  # every loss a mean per UniMatch GPU, averaged
    assert city.iters is None and city.n_labeled == 186  # iterations follow the data: epochs_to_iters
    assert unimatch_args("--dataset", "cityscapes", "--crop-size", 769).eval_window == 769  # windows = crops
    voc = unimatch_args("--dataset", "pascal_aug", "--no-pretrained")
    assert (voc.crop_size, voc.epochs, voc.lr, voc.backbone_lr_mult, voc.ohem, voc.eval_window) == (
        (321, 321), 80, 0.01, 0.1, None, None)  # UniMatch's base 0.001, the head x10
    assert unimatch_args("--dataset", "cityscapes", args_class=train_baseline.Args).batch_size == 16
    assert unimatch_args("--dataset", "cityscapes", args_class=train_baseline.Args).nesterov is False
    assert unimatch_args("--dataset", "cityscapes").cons_weight == 1.0  # the method stays the paper's


def test_iterations_per_epoch_as_unimatchs_distributed_sampler():
    def count(n_images, gpus, batch_size=8, epochs=240):
        a = SimpleNamespace(batch_size=batch_size, epochs=epochs, iters=None, eval_every=None)
        common.epochs_to_iters(a, n_images, gpus)
        return a.iters_per_epoch, a.iters, a.eval_every
    assert count(2975 - 186, 1) == (348, 83_520, 348)  # one GPU, batch 8
    assert count(2975 - 186, 4) == (349, 83_760, 349)  # 4 GPUs x 2: ceil(2789 / 4) = 698 each
    assert count(10582 - 92, 4, epochs=80) == (1311, 104_880, 1311)  # ceil(10490 / 4) = 2623: 1311 batches of 2
    assert count(186, 4, batch_size=16) == (11, 2640, 11)  # the supervised baseline: passes over the labeled
    assert count(366, 4, batch_size=16, epochs=80) == (23, 1840, 23)  # one GPU would deal 22 (1,760)
    assert count(366, 1, batch_size=16, epochs=80) == (22, 1760, 22)
    given = SimpleNamespace(batch_size=8, epochs=240, iters=100, eval_every=7)
    common.epochs_to_iters(given, 2789, 1)
    assert (given.iters, given.eval_every) == (100, 7)  # --iters and --eval-every win


def test_learning_rate_is_set_after_each_step_as_unimatch():
    w, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([dict(params=[w], lr=0.001), dict(params=[b], lr=0.01)], lr=0.001)
    args = SimpleNamespace(lr_schedule="poly_after", iters=10, poly_power=0.9)
    seen = []
    for it in range(10):
        common.set_lr(optimizer, args, it)
        seen.append([g["lr"] for g in optimizer.param_groups])
    # UniMatch: step i runs at the rate set after step i - 1: base · (1 - (i - 1) / total)^0.9; steps 0, 1 at base
    expected = [[base * (1 - max(i - 1, 0) / 10) ** 0.9 for base in (0.001, 0.01)] for i in range(10)]
    assert np.allclose(seen, expected) and seen[0] == seen[1] == [0.001, 0.01]


@pytest.mark.parametrize("dataset, classes, params", [("cityscapes", 19, 59_467_571), ("pascal_aug", 21, 59_468_085)])
def test_network_of_the_protocol_and_its_parameter_groups(dataset, classes, params):
    args = common.parse_args(common.TrainArgs, [*UNIMATCH, "--dataset", dataset, "--no-pretrained"])
    net = common.build_net(args, classes, torch.device("cpu"))
    assert sum(p.numel() for p in net.parameters()) == params
    groups = common.param_groups(net, args)
    backbone = {id(p) for p in net.backbone.parameters()}
    rates = {g["lr"] for g in groups if any(id(p) in backbone for p in g["params"])}
    assert rates == ({0.001} if dataset == "pascal_aug" else {0.005})  # the backbone at UniMatch's base rate
    assert groups[-1]["lr"] == args.lr and sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def split_file(path, names):
    path.write_text("".join(f"leftImg8bit/train/{n.split('_')[0]}/{n}_leftImg8bit.png gtFine/x.png\n"
                            for n in names))
    return path


def test_unlabeled_images_are_the_rest_of_the_training_set(official, tmp_path):
    root = official["cityscapes"]
    names = common.cityscapes_full_dataset(root)[0].names
    chosen = split_file(tmp_path / "labeled.txt", names[:2])
    data = common.load_dataset("cityscapes", root, 2, split_file=chosen, cache_dir=tmp_path / "cache",
                               protocol="unimatch")
    assert [data.train.names[i] for i in data.labeled] == names[:2]
    assert data.unlabeled.names == names[2:] and data.train.sizes[0] == (32, 64)  # full size, not halved
    image, label = data.unlabeled.load(0)
    assert image.shape == (32, 64, 3) and label.max() <= 18 or label.max() == 255
    paper = common.load_dataset("cityscapes", root, 2, split_file=chosen, cache_dir=tmp_path / "cache")
    assert paper.unlabeled.names == paper.train.names  # the paper's stream: the whole training set


def test_cityscapes_train_ids_from_label_train_ids_where_present(tmp_path):
    import official_layouts
    official_layouts.make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    train = common.cityscapes_full_dataset(tmp_path / "cs")[0]
    first = sorted((tmp_path / "cs" / "gtFine" / "train").glob("*/*_labelIds.png"))
    ids = np.asarray(Image.open(first[0]))
    assert np.array_equal(train.load(0)[1], prepare.CITYSCAPES_TRAIN_ID[ids])  # mapped from labelIds
    train_ids = np.full(ids.shape, 7, np.uint8)
    Image.fromarray(train_ids).save(str(first[0]).replace("_labelIds", "_labelTrainIds"))
    train = common.cityscapes_full_dataset(tmp_path / "cs")[0]
    assert np.array_equal(train.load(0)[1], train_ids)  # read as it is (cityscapesScripts' train ids)


def test_weak_view_pads_labels_with_ignore_and_marks_padding_invalid():
    rng = np.random.default_rng(0)
    image, label = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8), np.ones((10, 20), np.uint8)
    for _ in range(20):
        img, lab, valid = common.augment(image, label, rng, (41, 41), dict(weak_view=True))
        assert img.shape == (4, 41, 41) and lab.shape == valid.shape == (41, 41)
        assert torch.equal(lab == 255, valid == 0)  # padding: ignored if labeled, no loss if not
        assert (img[:3, valid == 0] == 0).all()  # black
        assert (img[3] == 255).all()  # and image content to the network (to_device), as UniMatch's
        unlabeled = common.augment(image, None, np.random.default_rng(1), (41, 41), dict(weak_view=True))
        assert unlabeled[1] is None and unlabeled[2].shape == (41, 41)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_the_protocol_end_to_end(official, tmp_path, script):
    root = official["cityscapes"]
    names = common.cityscapes_full_dataset(root)[0].names
    chosen = split_file(tmp_path / "labeled.txt", names[:2])
    out = tmp_path / "run"
    crop = "40" if script != "train_baseline.py" else "70"  # larger than the 64x32 images: padded, as UniMatch
    run = run_main(script, *UNIMATCH, "--dataset", "cityscapes", "--data-root", root, "--split-file", chosen,
                   "--arch", "unet_small", "--no-pretrained", "--crop-size", crop, "--batch-size", 2, "--epochs", 1,
                   "--num-workers", 0, "--cache-dir", tmp_path / "cache", "--out", out)
    results = read_results(out)
    # UniMatch's number: the best evaluation of the network UniMatch's method reports (the baseline's one model)
    reported = "teacher" if script in SCRIPTS[1:6] else "student"  # the self-training methods' too
    best = results["best_student_miou" if reported == "student" else "best_miou"]
    assert (results["reported"], results["reported_miou"]) == (reported, best)
    assert run.stdout.strip().splitlines()[-1] == f"FINAL mIoU={best:.2f}"
    assert f"reported, as UniMatch: the {reported}'s best mIoU" in run.stdout
    # a batch of 2 does not split among 4 GPUs: each loss is a mean per share of one image, said in one line
    assert ("loss: --batch-size 2 does not split among UniMatch's 4 GPUs; each loss is averaged over 2 shares of "
            "the batch (1 image each), as on 2 GPUs") in run.stdout
    iters = 1 if script == "train_baseline.py" else 2  # 2 labeled / 4 unlabeled images in batches of 2
    assert results["iters"] == iters and results["n_labeled"] == 2
    assert {"best_miou", "best_miou_iter", "best_student_miou", "student_miou"} <= set(results)
    assert (out / "labeled.txt").read_text().split() == names[:2]
    settings = json.loads((out / "args.json").read_text())
    assert settings["protocol"] == "unimatch" and settings["iters_per_epoch"] == iters
    if script == "train_cutmix.py":  # the trained model predicts as it was evaluated: full size, sliding windows
        from tools.predict import predict
        net, info = common.load_model(out)
        assert info["preprocess"] is None and info["eval_window"] == settings["eval_window"] == 40
        image = common.read_image(sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0])
        pred = predict(net, info, [image], torch.device("cpu"))[0]
        with torch.no_grad():
            expected = common.sliding_window(net, common.normalise(torch.from_numpy(image).permute(2, 0, 1)[None],
                                                                   torch.device("cpu")), 40)[0].argmax(0)
        assert pred.shape == image.shape[:2] and torch.equal(pred, expected)


@pytest.mark.slow
def test_resume_with_more_epochs_and_the_real_network(official, tmp_path):
    root = official["cityscapes"]
    chosen = split_file(tmp_path / "labeled.txt", common.cityscapes_full_dataset(root)[0].names[:2])
    out = tmp_path / "run"
    options = [*UNIMATCH, "--dataset", "cityscapes", "--data-root", root, "--split-file", chosen, "--no-pretrained",
               "--crop-size", 33, "--batch-size", 2, "--num-workers", 0, "--cache-dir", tmp_path / "cache",
               "--out", out]
    run_main("train_cutmix.py", *options, "--epochs", 1)
    first = read_results(out)
    assert first["arch"] == "deeplabv3plus_deepstem" and first["iters"] == 2
    (out / "results.json").unlink()  # as if stopped after its last checkpoint: resume goes further
    resumed = run_main("train_cutmix.py", "--out", out, "--resume", "--epochs", 2)
    results = read_results(out)
    assert results["iters"] == 4 and results["resumed_from"] == 2
    assert "--iters 4: the run goes on to iteration 4" in resumed.stdout
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"miou"' in line]) == 2


def test_pascal_in_unimatchs_own_layout(tmp_path, monkeypatch):
    root, lists = tmp_path / "pascal", tmp_path / "lists" / "pascal"
    rng = np.random.default_rng(0)
    names = [f"2007_{i:06d}" for i in range(8)]
    for n in names:
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClass").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{n}.jpg")
        Image.fromarray(rng.integers(0, 21, (20, 24), dtype=np.uint8)).save(root / "SegmentationClass" / f"{n}.png")
    lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in names]
    (lists / "2").mkdir(parents=True)
    (lists / "train_aug.txt").write_text("\n".join(lines[:6]))  # no final newline, as some of UniMatch's
    (lists / "val.txt").write_text("\n".join(lines[6:]) + "\n")
    (lists / "2" / "labeled.txt").write_text("\n".join(lines[:2]))
    monkeypatch.setattr(common, "UNIMATCH_SPLITS", lists.parent)
    train, val, classes, _ = common.pascal_unimatch_dataset(root, tmp_path / "cache")
    assert train.names == names[:6] and val.names == names[6:] and classes == 21
    args = unimatch_args("--dataset", "pascal_aug", "--n-labeled", 2)
    assert args.split_file == str(lists / "2" / "labeled.txt")
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(common.UserError, match="neither .*SegmentationClassAug nor .*SegmentationClass"):
        common.pascal_unimatch_dataset(root, tmp_path / "cache")


def test_bad_input_of_the_protocol(official, tmp_path):
    root = official["cityscapes"]
    base = [*UNIMATCH, "--dataset", "cityscapes", "--data-root", root, "--num-workers", 0,
            "--cache-dir", tmp_path / "cache"]
    names = common.cityscapes_full_dataset(root)[0].names
    chosen = split_file(tmp_path / "labeled.txt", names[:2])
    assert "covers --dataset cityscapes and pascal_aug, not isic2017" in refused(
        "train_cutmix.py", *UNIMATCH, "--dataset", "isic2017")
    assert "UniMatch's cityscapes lists hold [100, 186, 372, 744, 1488]" in refused(
        "train_cutmix.py", *base, "--n-labeled", 50)
    assert "crops squares" in refused("train_cutmix.py", *base, "--split-file", chosen, "--crop-size", "32,64")
    assert "--epochs counts today's protocol's epochs" in refused("train_cutmix.py", "--epochs", 3)
    missing = split_file(tmp_path / "missing.txt", [names[0], "zurich_000000_000000"])
    assert "line 2: 'leftImg8bit/train/zurich/zurich_000000_000000_leftImg8bit.png' is not a training image" in \
        refused("train_cutmix.py", *base, "--split-file", missing, "--no-pretrained", out=tmp_path / "r1")
    line = refused("train_cutmix.py", *base, "--split-file", chosen, "--crop-size", 33, "--batch-size", 2,
                   out=tmp_path / "r2")
    assert "--arch deeplabv3plus_deepstem needs --backbone-weights" in line and "pretrained/resnet101.pth" in line
    assert "no such file" in refused("train_cutmix.py", *base, "--split-file", chosen, "--crop-size", 33,
                                     "--batch-size", 2, "--backbone-weights", tmp_path / "nothing.pth",
                                     out=tmp_path / "r3")


def test_out_of_gpu_memory_says_what_fits(capsys, monkeypatch):
    monkeypatch.setattr(files, "CHECKPOINTED", dict(iter=None, batch=8, crop=(801, 801)))
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    files.excepthook(type(error), error, None)
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: out of GPU memory at --batch-size 8 --crop-size 801,801 (CUDA out of memory)")
    assert "--batch-size 4, or --crop-size 561,561" in line and "\n" not in line
