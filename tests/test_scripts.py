"""Every script end to end: the headline two as a user runs them (a subprocess), the others through main();
what a run folder holds (the run's contract), resume after a kill, shared flags, the default folder."""
import contextlib
import dataclasses
import importlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import common
from conftest import (ENV, FAST, ROOT, copy_run, make_folder_dataset, make_unlabeled, read_results, refused,
                      run_main, run_script)
from cutmixseg import nets, pictures, timing

SCRIPTS = ["train_baseline.py", "train_cutmix.py"]
RESULT_KEYS = {"miou", "student_miou", "per_class_iou", "iters", "train_seconds", "seconds_per_iter",
               "resumed_from", "dataset", "n_labeled", "arch", "method"}
# what every checkpoint.pt holds; the methods that draw masks or probes add their generator's state
CHECKPOINT_KEYS = {"student", "teacher", "optimizer", "scaler", "iter", "class_names", "rng", "timer"}
WITH_GENERATOR = {"cutmix", "cutout", "vat"}
SELF_TRAINING = {"fixmatch", "unimatch"}  # one network, no teacher: its checkpoint holds the student alone


def check_outputs(out, stdout, num_classes, iters=6):
    """The run folder of a finished run and its stdout (FINAL last); returns results.json."""
    out = Path(out)
    for name in ("args.json", "labeled.txt", "log.txt", "metrics.jsonl", "results.json", "preview.png",
                 "curves.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    results = read_results(out)
    assert RESULT_KEYS <= set(results)
    assert len(results["per_class_iou"]) == num_classes and results["iters"] == iters
    assert 0 <= results["miou"] <= 100 and results["resumed_from"] == 0
    assert abs(results["miou"] - float(np.mean(results["per_class_iou"]))) < 1e-6
    assert stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("iter" in r for r in records) and any("miou" in r for r in records)
    assert json.loads((out / "args.json").read_text())["iters"] == iters
    assert len((out / "labeled.txt").read_text().splitlines()) == results["n_labeled"]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    expected = CHECKPOINT_KEYS - ({"teacher"} if results["method"] in SELF_TRAINING else set())
    assert set(state) == expected | ({"generator"} if results["method"] in WITH_GENERATOR else set())
    assert state["iter"] == iters and set(state["timer"]) == {"iters", "seconds", "warm_iters", "warm_seconds", "wall"}
    with Image.open(out / "preview.png") as im:  # tiles scaled up to >= 192 px, two gaps, a legend below
        assert min(im.size) >= 192 and (im.width - 2 * pictures.GAP) % 3 == 0
    with Image.open(out / "curves.png") as im:  # mIoU and one panel per logged loss
        assert im.height >= 2 * 150
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_demo_end_to_end(script, shared_run):
    out, stdout = shared_run(script, *FAST, subprocess=True)
    results = check_outputs(out, stdout, num_classes=5)
    assert results["dataset"] == "demo" and results["arch"] == "unet_small" and results["n_labeled"] == 60
    assert results["method"] == script[len("train_"):-3]


def test_the_timer_leaves_the_warm_up_out_unless_nothing_else_ran(monkeypatch):
    clock = iter(range(100))  # perf_counter: 0, 1, 2, ... seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    short = timing.Timer(torch.device("cpu"), warmup=5)  # started at 0
    for _ in range(3):
        short.tick()
    short.pause()  # at 1: three iterations in one second, all of them warm-up
    assert short.state["iters"] == 0 and short.state["warm_iters"] == 3 and short.per_iteration() == 1 / 3
    long = timing.Timer(torch.device("cpu"), warmup=2)  # started at 2
    for _ in range(6):
        long.tick()  # the warm-up ends at the second: 3 (its end) and 4 (the next mark)
    long.pause()  # at 5: four iterations in 1 second
    assert (long.state["warm_iters"], long.state["warm_seconds"], long.state["iters"]) == (2, 1.0, 4)
    assert long.per_iteration() == 0.25
    resumed = timing.Timer(torch.device("cpu"), {"iters": 10, "seconds": 5.0, "wall": 9.0})  # an older checkpoint
    assert resumed.per_iteration() == 0.5 and resumed.state["warm_iters"] == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_folder_keeps_the_runs_contract(script, shared_run):
    """checkpoint.pt holds exactly what a run tracks (check_outputs), labeled.txt the labeled images by name,
    results.json the training time; common.load_model gives back the teacher that scored the run's mIoU."""
    out, _ = shared_run(script, *FAST, subprocess=True)
    results = read_results(out)
    assert results["seconds_per_iter"] > 0 and results["train_seconds"] > 0
    assert results["train_seconds"] >= results["seconds_per_iter"]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["timer"]["iters"] >= 1 and state["timer"]["seconds"] > 0 and state["timer"]["wall"] > 0
    assert state["class_names"] == ["background", "disc", "square", "triangle", "cross"]
    data = common.load_dataset("demo", n_labeled=60, with_unlabeled=False)
    assert (out / "labeled.txt").read_text().splitlines() == [data.train.names[i] for i in data.labeled]
    net, info = common.load_model(out)
    assert info["iteration"] == 6 and info["num_classes"] == 5 and not net.training
    miou, per_class, _ = common.evaluate(net, common.val_loader(data.val, 2), torch.device("cpu"), 5)
    assert miou == pytest.approx(results["miou"], abs=1e-9) and per_class == pytest.approx(results["per_class_iou"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_folder_end_to_end_unet_small(script, shared_run, shared_folder_data):
    out, stdout = shared_run(script, "--dataset", "folder", "--data-root", shared_folder_data, "--arch", "unet_small",
                             "--n-labeled", 4, *FAST)
    results = check_outputs(out, stdout, num_classes=3)
    assert results["n_labeled"] == 4
    args = json.loads((out / "args.json").read_text())
    assert args["crop_size"] == [24, 32] and args["num_classes"] is None  # crop = the images' own size


def test_folder_default_arch_is_deeplabv2(folder_data, tmp_path):
    proc = run_main("train_cutmix.py", "--dataset", "folder", "--data-root", folder_data, "--no-pretrained",
                    "--n-labeled", 4, "--iters", 2, "--eval-every", 2, "--batch-size", 1, "--num-workers", 0,
                    "--out", tmp_path / "run")
    results = check_outputs(tmp_path / "run", proc.stdout, num_classes=3, iters=2)
    assert results["arch"] == "deeplabv2"


def test_folder_images_of_mixed_sizes_are_padded_to_the_default_crop(tmp_path):
    data = make_folder_dataset(tmp_path / "a", size=(20, 20), n_train=4, n_val=2)
    bigger = make_folder_dataset(tmp_path / "b", size=(30, 26), n_train=2, n_val=2, seed=1)
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            for f in (bigger / split / kind).iterdir():
                f.rename(data / split / kind / ("big_" + f.name))
    proc = run_main("train_cutmix.py", "--dataset", "folder", "--data-root", data, "--arch", "unet_small",
                    "--n-labeled", 3, *FAST, "--crop-size", "40,36", "--out", tmp_path / "run")
    check_outputs(tmp_path / "run", proc.stdout, num_classes=3)
    # the default crop for mixed sizes is Pascal's
    assert common.default_crop([(20, 20), (30, 26)]) == (321, 321)
    assert common.default_crop([(20, 20)] * 3) == (20, 20)
    assert common.default_crop([(600, 800)]) == (321, 321)


def test_labeled_subset_follows_the_split_seed_and_the_split_file(tmp_path):
    names = [f"n{i}" for i in range(10)]
    assert common.choose_labeled(names, 3).tolist() == np.random.RandomState(12345).permutation(10)[:3].tolist()
    split = tmp_path / "labeled.txt"
    split.write_text("n7\n\nn2.png\nn5\nn1\n")
    assert common.choose_labeled(names, 3, split_file=str(split)).tolist() == [7, 2, 5]
    assert common.choose_labeled(names, -1, split_file=str(split)).tolist() == [7, 2, 5, 1]


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_miou(tmp_path):
    args = ["--iters", 40, "--eval-every", 10, "--batch-size", 2, "--num-workers", 0, "--deterministic"]
    run_main("train_cutmix.py", *args, "--out", tmp_path / "ref")
    reference = read_results(tmp_path / "ref")
    # start the same run, kill it (SIGKILL: no clean-up) once it has written a checkpoint past iteration 10
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cutmix.py"), *map(str, args), "--out", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = out / "checkpoint.pt"
        if ckpt.is_file():
            with contextlib.suppress(Exception):
                if torch.load(ckpt, weights_only=True)["iter"] >= 20:
                    break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    # without --resume the unfinished run is refused, never overwritten
    assert "--resume" in refused("train_cutmix.py", *args, "--out", out)
    resumed = run_main("train_cutmix.py", *args, "--out", out, "--resume")
    results = read_results(out)
    assert results["resumed_from"] >= 20
    assert results["miou"] == reference["miou"] and results["student_miou"] == reference["student_miou"]
    assert results["per_class_iou"] == reference["per_class_iou"]
    assert resumed.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={reference['miou']:.2f}"


def test_a_finished_run_is_never_overwritten(shared_run, tmp_path):
    out = copy_run(shared_run("train_baseline.py", *FAST, subprocess=True)[0], tmp_path)
    before = (out / "results.json").read_text()
    assert "already holds a finished run" in refused("train_baseline.py", *FAST, "--out", out)
    assert (out / "results.json").read_text() == before


def help_flags(script, capsys):
    """The options `python SCRIPT --help` lists, in its order (argparse prints the help and exits 0)."""
    module = importlib.import_module(Path(script).stem)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        common.command_line(module.Args, ["--help"])
    assert done.value.code == 0
    return [w.strip("[],") for w in capsys.readouterr().out.split() if w.startswith("--") and w != "--help"]


def test_shared_flags_agree_between_scripts(capsys):
    shared = [f.name for f in dataclasses.fields(common.TrainArgs)]
    contract = ["dataset", "protocol", "data_root", "n_labeled", "split_seed", "split_file", "arch", "no_pretrained",
                "backbone_weights", "iters", "epochs", "batch_size", "lr", "crop_size", "eval_every", "seed", "device",
                "out", "resume", "amp", "deterministic", "num_workers", "num_classes", "teacher_alpha"]
    assert shared[:len(contract)] == contract
    helps = {}
    for script in sorted(p.name for p in ROOT.glob("train_*.py")):
        module = importlib.import_module(script[:-3])
        fields = [(f.name, f.default, f.type) for f in dataclasses.fields(module.Args)]
        assert [f[0] for f in fields[:len(shared)]] == shared, script
        options = [f for f in dataclasses.fields(common.TrainArgs) if f.metadata["cli"]]  # the command line's
        assert [(f.name, f.default, f.type) for f in options] == [f for f in fields if f[0] in {o.name for o in options}]
        own = [f[0] for f in fields[len(shared):]]
        if script != "train_baseline.py":
            assert own[:2] == ["cons_weight", "conf_thresh"], script
        helps[script] = help_flags(script, capsys)
    first = helps["train_baseline.py"]
    for script, flags in helps.items():
        assert flags[:len(first)] == first, script
    assert "--n-boxes" in helps["train_cutmix.py"]


def test_unknown_dataset_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as refusal:
        common.parse_args(importlib.import_module("train_baseline").Args, ["--dataset", "mnist"])
    assert refusal.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["demo", "cityscapes", "isic2017"])
def test_args_carry_their_declared_fields_only_each_of_one_type(dataset):
    """Everything a protocol sets is a declared field, saved in args.json; no field changes its type."""
    for script in sorted(p.stem for p in ROOT.glob("train_*.py")):
        Args = importlib.import_module(script).Args
        args = common.parse_args(Args, ["--dataset", dataset, "--crop-size", "32,48"])
        assert set(vars(args)) == {f.name for f in dataclasses.fields(Args)}, script
        assert args.crop_size == (32, 48) and args.device == "cpu" and args.amp == "off"
        assert isinstance(args.aug, dict) and isinstance(args.freeze_bn, bool) and isinstance(args.num_workers, int)
        assert args.lesion_scoring == (dataset == "isic2017") and args.pretrained
    assert common.parse_args(common.TrainArgs, ["--benchmark", "2"]).pretrained is False  # random weights


def test_default_run_folder_is_the_one_the_seeds_tool_names(tmp_path):
    run_main("train_baseline.py", *FAST, "--seed", 3, "--split-seed", 7, cwd=tmp_path)
    folder = tmp_path / common.run_folder("train_baseline.py", common.parse_args(
        common.TrainArgs, ["--seed", "3", "--split-seed", "7"]))
    assert folder.name == "train_baseline_demo_60_s3_ss7" and (folder / "results.json").is_file()

    def name(*argv):
        return common.run_folder("x.py", common.parse_args(common.TrainArgs, list(map(str, argv)))).name
    assert name("--dataset", "pascal_aug", "--n-labeled", 106, "--arch", "pspnet101") == "x_pascal_aug_pspnet101_106_s1"
    assert name("--dataset", "pascal_aug", "--n-labeled", 106, "--arch", "deeplabv2") == "x_pascal_aug_106_s1"
    # today's protocol apart from the paper's; a list that --n-labeled does not pick named by its folder or stem
    lists = common.UNIMATCH_SPLITS / "cityscapes"
    assert name("--protocol", "unimatch", "--dataset", "cityscapes") == "x_cityscapes_unimatch_186_s1"
    assert name("--protocol", "unimatch", "--dataset", "cityscapes", "--arch", "unet_small") == \
        "x_cityscapes_unimatch_unet_small_186_s1"
    assert name("--protocol", "unimatch", "--dataset", "cityscapes", "--split-file", lists / "1_8" / "labeled.txt") \
        == "x_cityscapes_unimatch_372_s1"
    mine = tmp_path / "my_list.txt"
    mine.write_text("".join(line + "\n" for line in (lists / "1_8" / "labeled.txt").read_text().splitlines()[:50]))
    assert name("--protocol", "unimatch", "--dataset", "cityscapes", "--split-file", mine) == \
        "x_cityscapes_unimatch_50_my_list_s1"


def test_evaluation_and_pictures_leave_the_modes_as_they_found_them(tmp_path):
    """Run.evaluate's common.evaluate and Run.draw's preview (the teacher's predictions) restore every
    module's mode, frozen BatchNorm included."""
    net = nets.UNetSmall(3)
    split = common.Split(["a"], lambda i: (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)), [(8, 8)])
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(iter=1, miou=1.0)) + "\n")
    run = SimpleNamespace(main=True, nets=dict(teacher=net), evaluated="teacher", device=torch.device("cpu"),
                          args=SimpleNamespace(amp="off"), out=tmp_path,
                          data=SimpleNamespace(val=split, class_names=["a", "b", "c"]))
    for freeze_bn in (True, False):
        common.set_train_mode(net, freeze_bn)
        before = [m.training for m in net.modules()]
        assert not all(before) if freeze_bn else all(before)
        batches = [(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), torch.zeros(1, 16, 16, dtype=torch.long))]
        common.evaluate(net, batches, torch.device("cpu"), num_classes=3)
        assert [m.training for m in net.modules()] == before
        (tmp_path / "preview.png").unlink(missing_ok=True)
        common.Run.draw(run)
        assert [m.training for m in net.modules()] == before and (tmp_path / "preview.png").is_file()


def test_the_kit_cites_only_what_ships():
    """The implementation notes the kit was written from do not ship: no code, test or README cites them."""
    import re
    files = [*ROOT.glob("*.py"), *ROOT.glob("cutmixseg/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py"),
             ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for path in files:
        text = path.read_text()
        assert "REF" + "ERENCE" not in text and "\u00a7" not in text, path  # spelt apart: this file is read too
        assert not re.search(r"\bG\d{1,2}\b", text), (path, re.search(r".{30}\bG\d{1,2}\b.{30}", text))


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("train_*.py")))
def test_masks_that_are_99_percent_ignore_never_stop_a_run(script, tmp_path):
    """Scribble-like partial labels: most batches hold no labeled pixel; their supervised loss is 0."""
    root = make_folder_dataset(tmp_path / "data", n_train=8, size=(24, 32))
    rng = np.random.default_rng(0)
    for i, mask in enumerate(sorted((root / "train" / "masks").iterdir())):
        label = np.array(Image.open(mask))
        keep = rng.random(label.shape) < (0.03 if i == 0 else 0.0)  # one image with a few labeled pixels
        Image.fromarray(np.where(keep, label, 255).astype(np.uint8), mode="L").save(mask)
    proc = run_main(script, *FAST, "--dataset", "folder", "--data-root", root, "--arch", "unet_small",
                    "--n-labeled", 8, "--num-classes", 3, "--out", tmp_path / "run")
    sup = [json.loads(line)["sup"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if "sup" in line]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("FINAL mIoU=") and all(np.isfinite(sup))
    assert 0.0 in sup and max(sup) > 0  # batches without a labeled pixel count exactly 0, the others do


def test_folder_unlabeled_images_are_read_nested_in_every_format(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    names = make_unlabeled(root / "unlabeled")
    data = common.load_dataset("folder", root, n_labeled=-1)
    assert len(data.train) == 12 and len(data.unlabeled) == 12 + len(names)
    assert data.unlabeled.names[:12] == data.train.names and data.unlabeled.names[12:] == names
    image, label = data.unlabeled.load(12 + names.index("sub/deeper/e.webp"))
    assert image.shape == (50, 20, 3) and label is None and data.unlabeled.sizes[12 + names.index("sub/c.bmp")] == [10, 12]
    assert common.load_dataset("folder", root, n_labeled=-1, with_unlabeled=False).unlabeled is None


@pytest.mark.parametrize("script", ["train_cutmix.py", "train_cutout.py", "train_vat.py", "train_ict.py",
                                    "train_stdaug.py"])
def test_every_semi_supervised_script_trains_on_folder_images_without_masks(script, tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_train=4)
    names = make_unlabeled(root / "unlabeled")
    proc = run_main(script, *FAST, "--dataset", "folder", "--data-root", root, "--arch", "unet_small",
                    "--out", tmp_path / "run")
    assert f"data: 4 train (4 labeled), {4 + len(names)} unlabeled ({len(names)} without masks), 4 val" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("FINAL mIoU=")


def test_unlabeled_dir_is_ignored_by_the_baseline_with_one_line(tmp_path):
    make_unlabeled(tmp_path / "extra")
    proc = run_main("train_baseline.py", *FAST, "--unlabeled-dir", tmp_path / "extra", "--out", tmp_path / "run")
    assert f"--unlabeled-dir {tmp_path / 'extra'}: ignored, baseline trains on labeled images only" in proc.stdout
    assert "no unlabeled stream" in proc.stdout


@pytest.mark.parametrize("problem", ["corrupt", "empty", "missing"])
def test_a_bad_unlabeled_dir_stops_the_run_before_anything_is_written(problem, tmp_path):
    extra = tmp_path / "extra"
    if problem != "missing":
        extra.mkdir()
    if problem == "corrupt":
        make_unlabeled(extra / "ok")
        (extra / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    last = refused("train_cutmix.py", *FAST, "--unlabeled-dir", extra, out=tmp_path / "run")
    assert {"corrupt": "broken.jpg", "empty": "no images", "missing": "no such folder"}[problem] in last


def test_pictures_draw_a_legend_and_one_curve_per_series(tmp_path):
    colours = pictures.palette()
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0] and colours[255].tolist() == [255] * 3
    records = [dict(iter=5, lr=1e-3, seconds_per_iter=0.1, sup=1.0, cons=0.2), dict(iter=10, miou=20.0, per_class_iou=[])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert pictures.curves(tmp_path / "metrics.jsonl", panel=100).size == (640, 300)  # mIoU, sup, cons
    split = common.Split(["a"], lambda i: (np.zeros((12, 16, 3), np.uint8), np.ones((12, 16), np.uint8)), [(12, 16)])
    net = nets.UNetSmall(2).eval()
    with torch.no_grad():
        picture = pictures.preview(lambda images: net(common.normalise(images, torch.device("cpu"))).argmax(1),
                                   split, ["bg", "thing"])
    assert picture.width == 3 * 16 * 16 + 2 * pictures.GAP  # 12 px short side -> x16 >= 192; two gaps
    assert picture.height > 12 * 16
    legend = np.asarray(picture)[pictures.TITLE_BAND + 12 * 16:]
    assert (legend == colours[1]).all(-1).any()  # the swatch of class 1


def test_preview_titles_its_columns_and_sets_truth_and_prediction_apart():
    """"image", "ground truth", "prediction" centred in a band above their columns; between the columns a
    gap of a grey no class colour has, so that two black backgrounds do not run into each other."""
    image = np.full((12, 16, 3), 90, np.uint8)
    split = common.Split(["a", "b"], lambda i: (image, np.zeros((12, 16), np.uint8)), [(12, 16)] * 2)
    background = lambda images: torch.zeros(len(images), 12, 16, dtype=torch.long)  # noqa: E731
    picture = np.asarray(pictures.preview(background, split, ["bg", "thing"]))
    tile, gap, band = 16 * 16, pictures.GAP, pictures.TITLE_BAND
    font = ImageFont.load_default()
    for c, title in enumerate(pictures.TITLES):  # each title's ink: within its column, as long as its text
        left = c * (tile + gap)
        ink = np.nonzero((picture[:band, left:left + tile] < 128).all(-1).any(0))[0]
        length = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)
        assert abs(ink[-1] + 1 - ink[0] - length) <= 2, title
        assert abs((ink[0] + ink[-1]) / 2 - tile / 2) <= 2, title  # centred
    assert pictures.TITLES == ("image", "ground truth", "prediction")
    row = picture[band:band + 12 * 16]  # the first image's row
    truth, between, prediction = (row[:, x:x + w] for x, w in ((tile + gap, tile), (2 * tile + gap, gap),
                                                               (2 * (tile + gap), tile)))
    assert (truth == 0).all() and (prediction == 0).all()  # both black: the background class
    assert (between == pictures.GAP_COLOUR).all()
    assert not (pictures.palette() == pictures.GAP_COLOUR).all(-1).any()  # no class has the gap's grey
    assert (picture[band + 12 * 16:band + 12 * 16 + gap] == pictures.GAP_COLOUR).all()  # and between the rows
