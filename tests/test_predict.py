"""`python -m tools predict` (and its shortcut `python common.py predict`): a finished run applied to new
images (palette PNGs at the images' own sizes, folder structure kept, --tile, --overlay, --masks scoring as
training's evaluation), load_model, bad input."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ENV, FAST, ROOT, kit_state, make_folder_dataset, read_results
from cutmixseg import nets, pictures
from tools import predict as P


@pytest.fixture(scope="session")
def trained(shared_run, shared_folder_data):
    """A finished folder run (unet_small) and its data: the one tests/test_scripts.py checks."""
    run, _ = shared_run("train_cutmix.py", "--dataset", "folder", "--data-root", shared_folder_data, "--arch",
                        "unet_small", "--n-labeled", 4, *FAST)
    return run, shared_folder_data


def common_py(*argv, cwd):
    """`python common.py COMMAND ...`, the shortcut that starts `python -m tools COMMAND ...`."""
    return subprocess.run([sys.executable, str(ROOT / "common.py"), *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def predict_main(*argv, cwd, capsys):
    """`python -m tools predict ARGV` in this process: (stdout; a UserError propagates)."""
    capsys.readouterr()
    with kit_state(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        P.main("predict", [str(a) for a in argv])
    return SimpleNamespace(stdout=capsys.readouterr().out)


def test_predicting_the_validation_images_reproduces_the_runs_miou(trained, tmp_path):
    run, root = trained
    proc = common_py("predict", run, root / "val" / "images", "--out", tmp_path / "pred", "--masks",
                     root / "val" / "masks", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert results["n_images"] == len(list((root / "val" / "images").iterdir())) == 4
    assert len(results["per_class_iou"]) == 3
    assert results["miou"] == pytest.approx(read_results(run)["miou"], abs=1e-9)
    assert proc.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={read_results(run)['miou']:.2f}"
    for image in (root / "val" / "images").iterdir():
        out = Image.open(tmp_path / "pred" / (image.stem + ".png"))
        assert out.mode == "P" and out.size == Image.open(image).size and np.asarray(out).max() < 3
        assert out.getpalette()[:9] == pictures.palette()[:3].flatten().tolist()


def test_folders_keep_their_structure_images_keep_their_size_and_overlays_are_written(trained, tmp_path, capsys):
    run, _ = trained
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    sizes = {"photos/a.jpg": (30, 50), "photos/sub/b.PNG": (17, 23), "single.webp": (40, 28)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    proc = predict_main(run, tmp_path / "photos", tmp_path / "single.webp", "--out", tmp_path / "out", "--overlay",
                        cwd=tmp_path, capsys=capsys)
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"3 predicted masks in {tmp_path / 'out'} (teacher of ")
    for name, target in (("photos/a.jpg", "a"), ("photos/sub/b.PNG", "sub/b"), ("single.webp", "single")):
        mask = Image.open(tmp_path / "out" / f"{target}.png")
        assert mask.size == Image.open(tmp_path / name).size and mask.mode == "P"
        assert Image.open(tmp_path / "out" / f"{target}_overlay.jpg").size == mask.size
    assert not (tmp_path / "out" / "results.json").exists()


def test_tiles_agree_with_whole_images_up_to_their_borders(trained):
    run, root = trained
    net, info = common.load_model(run)
    image = np.asarray(Image.open(next((root / "val" / "images").iterdir())).convert("RGB"))
    image = np.concatenate([image, image[::-1]], 0)  # 48x32
    whole, = P.predict(net, info, [image], torch.device("cpu"))
    same, = P.predict(net, info, [image], torch.device("cpu"), tile=(64, 64))  # one tile holds it all
    tiled, = P.predict(net, info, [image], torch.device("cpu"), tile=(24, 24))
    assert torch.equal(whole, same) and whole.shape == (48, 32) and tiled.shape == (48, 32)
    assert (whole == tiled).float().mean() > 0.6


def test_load_model_gives_the_runs_teacher_which_scores_the_runs_miou(trained):
    run, root = trained
    net, info = common.load_model(run)
    assert info["class_names"] == ["0", "1", "2"] and info["preprocess"] is None and not net.training
    teacher = nets.UNetSmall(3)
    teacher.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["teacher"])
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(net(x), teacher.eval()(x))
    student, _ = common.load_model(run, net="student")
    with torch.no_grad():
        assert not torch.equal(student(x), net(x))
    val = common.load_dataset("folder", root, with_unlabeled=False).val
    miou, per_class, _ = common.evaluate(net, common.val_loader(val, 2), torch.device("cpu"), info["num_classes"])
    assert miou == pytest.approx(read_results(run)["miou"], abs=1e-9)
    assert per_class == pytest.approx(read_results(run)["per_class_iou"], abs=1e-9)


def test_preprocessing_follows_the_dataset():
    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    halved = P.preprocessed(image, "halve")
    assert halved.shape == (3, 3, 4)
    assert np.array_equal(halved.permute(1, 2, 0).numpy(), image.reshape(3, 2, 4, 2, 3).sum((1, 3)) // 4)
    assert P.preprocessed(image, "resize 248x248").shape == (3, 248, 248)
    assert torch.equal(P.preprocessed(image, None).permute(1, 2, 0), torch.from_numpy(image))


@pytest.mark.parametrize("case", ["no run", "no checkpoint", "unreadable image", "missing mask", "mask size",
                                  "one output twice", "no images"])
def test_bad_input_gets_one_line(case, trained, tmp_path, capsys):
    run, root = trained
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(images / "x.png")
    Image.fromarray(np.zeros((24, 32), np.uint8), mode="L").save(masks / "x.png")
    argv, words = [run, images, "--out", tmp_path / "out"], ""
    if case == "no run":
        argv[0], words = tmp_path / "nowhere", "no run there"
    elif case == "no checkpoint":
        (tmp_path / "unfinished").mkdir()
        (tmp_path / "unfinished" / "args.json").write_text((run / "args.json").read_text())
        argv[0], words = tmp_path / "unfinished", "no checkpoint.pt"
    elif case == "unreadable image":
        (images / "y.jpg").write_bytes(b"not a jpeg")
        words = "y.jpg"
    elif case == "missing mask":
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(images / "z.png")
        argv += ["--masks", masks]
        words = "no mask for"
    elif case == "mask size":
        Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(masks / "x.png")
        argv += ["--masks", masks]
        words = "must match"
    elif case == "one output twice":  # a file and a folder's image, both named x
        (tmp_path / "other").mkdir()
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "other" / "x.jpg")
        argv.insert(2, tmp_path / "other" / "x.jpg")
        words = "would both be written"
    else:
        (images / "x.png").unlink()
        words = "no images"
    with pytest.raises(common.UserError) as refusal:  # `error: ...` on one line, as common's excepthook prints it
        predict_main(*argv, cwd=tmp_path, capsys=capsys)
    assert "\n" not in str(refusal.value) and words in str(refusal.value), str(refusal.value)


@pytest.mark.slow
def test_the_readme_walk_through_runs_as_written(tmp_path, monkeypatch):
    """Every command of README's 'From a folder of photos to masks', on generated data (training shortened:
    the options appended to its line win), then its Python lines."""
    import re
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From a folder of photos to masks"):]
    commands = [line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
                if line and not line.startswith("#")]
    root = make_folder_dataset(tmp_path / "ROOT", n_train=6, n_val=3)
    photos = tmp_path / "new_photos" / "sub"
    photos.mkdir(parents=True)
    for i, (h, w) in enumerate([(30, 40), (24, 32)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    assert len(commands) == 3
    for line in commands:
        argv = shlex.split(line.replace("ROOT", str(root)))
        assert argv[0] == "python"
        extra = [*FAST, "--arch", "unet_small", "--no-pretrained"] if argv[1].startswith("train_") else []
        # `python -m tools ...` from the kit's folder: here its path stands in for that folder
        command = [sys.executable, *argv[1:3]] if argv[1] == "-m" else [sys.executable, str(ROOT / argv[1])]
        env = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), ENV.get("PYTHONPATH")])))
        proc = subprocess.run([*command, *argv[2 + (argv[1] == "-m"):], *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "predicted" / "sub" / "p0.png").is_file()
    assert (tmp_path / "predicted" / "sub" / "p1_overlay.jpg").is_file()
    assert json.loads((tmp_path / "scored" / "results.json").read_text())["n_images"] == 3
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(tmp_path / "photo.jpg")
    namespace = {}
    monkeypatch.chdir(tmp_path)
    exec(code, namespace)
    assert namespace["classes"].shape == (20, 28) and namespace["info"]["num_classes"] == 3
