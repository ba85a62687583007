"""The paper's datasets from tiny copies of their official downloads: label mappings, preparation caches,
splits and seeds on known values, clear errors for wrong layouts, and every script end to end on each."""
import json
import os
import pickle
import types
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from cutmixseg import nets
from cutmixseg import prepare
from conftest import ROOT, read_results, refused, run_main
from official_layouts import make_cityscapes, make_isic, make_pascal


def args_for(dataset, root, **kw):
    return common.parse_args(common.TrainArgs, ["--dataset", dataset, "--data-root", str(root),
                                                *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]])


def load(args):
    """The data a training run loads with these options (Run.load_data), crop default included."""
    return common.Run.load_data(types.SimpleNamespace(args=args, unlabeled=True, world=1))


@pytest.fixture(scope="session")
def layouts(official):
    """One tiny copy of each download, shared by the tests that only read it (its cache included)."""
    return official


# ---- Cityscapes -------------------------------------------------------------------------------------
def expected_half(image, label_ids):
    """The original's conversion written out pixel by pixel: 2x2 mean truncated; 2x2 majority vote of the
    labelIds with ties to the lower id; then labelId -> trainId."""
    train_id = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    h, w = label_ids.shape[0] // 2, label_ids.shape[1] // 2
    out_image, out_label = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            block = image[2 * y:2 * y + 2, 2 * x:2 * x + 2].reshape(4, 3).astype(int)
            out_image[y, x] = block.sum(0) // 4
            counts = Counter(label_ids[2 * y:2 * y + 2, 2 * x:2 * x + 2].flatten().tolist())
            best = min(counts, key=lambda v: (-counts[v], v))
            out_label[y, x] = train_id.get(best, 255)
    return out_image, out_label


def test_cityscapes_halving_and_label_mapping_on_known_pixels(tmp_path):
    image = np.zeros((4, 6, 3), np.uint8)
    image[:2, :2] = [[[1, 2, 255], [2, 2, 255]], [[2, 3, 254], [2, 3, 255]]]  # means 1.75, 2.5, 254.75
    ids = np.array([[7, 7, 26, 8, 24, 34],
                    [7, 26, 8, 26, 25, 0],    # 7 wins 3:1; tie 26/8 -> 8; all different -> 0 (void)
                    [33, 33, 3, 3, 17, 19],
                    [34, 34, 22, 22, 19, 17]], np.uint8)  # tie 33/34 -> 33; tie 3/22 -> 3 (void); 17/19 -> 17
    Image.fromarray(image).save(tmp_path / "x_leftImg8bit.png")
    Image.fromarray(ids).save(tmp_path / "x_gtFine_labelIds.png")
    half, train_ids = prepare.halve_cityscapes(tmp_path / "x_leftImg8bit.png", tmp_path / "x_gtFine_labelIds.png")
    assert half[0, 0].tolist() == [1, 2, 254]  # truncated, not rounded
    assert train_ids.tolist() == [[0, 1, 255], [18, 255, 5]]
    assert (prepare.CITYSCAPES_TRAIN_ID[[0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34]] == 255).all()
    assert prepare.CITYSCAPES_TRAIN_ID[[7, 26, 33]].tolist() == [0, 13, 18] and len(common.CITYSCAPES_CLASSES) == 19


def test_cityscapes_official_layout(layouts):
    root = layouts["cityscapes"]
    args = args_for("cityscapes", root, n_labeled=3)
    data = load(args)
    assert (len(data.train), len(data.val), data.num_classes) == (6, 2, 19)
    # sorted by city then name; the test split and the _color/_instanceIds/_polygons files are ignored
    assert data.train.names == sorted(data.train.names) and data.train.names[0] == "aachen_000000_000000"
    assert data.train.sizes == [(16, 32)] * 6 and args.crop_size == (256, 512) and args.batch_size == 4
    assert data.labeled.tolist() == np.random.RandomState(12345).permutation(6)[:3].tolist()
    for split, i in ((data.train, 4), (data.val, 1)):
        name = split.names[i]
        city = name.split("_")[0]
        sub = "train" if split is data.train else "val"
        image = np.asarray(Image.open(root / "leftImg8bit" / sub / city / f"{name}_leftImg8bit.png"))
        ids = np.asarray(Image.open(root / "gtFine" / sub / city / f"{name}_gtFine_labelIds.png"))
        want_image, want_label = expected_half(image, ids)
        got_image, got_label = split.load(i)
        assert np.array_equal(got_image, want_image) and np.array_equal(got_label, want_label)
        assert (got_label == 255).any() and (got_label < 19).any()


def test_cityscapes_cache_is_reused_and_survives_an_interrupted_preparation(tmp_path, monkeypatch):
    root = make_cityscapes(tmp_path / "cs", n_train=5, n_val=2)
    reference = load(args_for("cityscapes", root, n_labeled=2, cache_dir=tmp_path / "ref"))
    real, calls = prepare.halve_cityscapes, []

    def failing(*paths):  # the machine "dies" while preparing the 4th training image
        calls.append(paths)
        if len(calls) == 4:
            raise RuntimeError("power cut")
        return real(*paths)
    monkeypatch.setattr(prepare, "halve_cityscapes", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        load(args_for("cityscapes", root, n_labeled=2))
    cache = root / ".cutmix_seg_cache"
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name.endswith(".partial") for p in folders] == [True]  # nothing looks complete
    assert (folders[0] / "done.txt").read_text() == "3"
    calls.clear()
    monkeypatch.setattr(prepare, "halve_cityscapes", lambda *p: calls.append(p) or real(*p))
    data = load(args_for("cityscapes", root, n_labeled=2))
    assert len(calls) == 2 + 2  # resumed: the two training images left, then the validation images
    assert sorted(p.name.split("_")[1] for p in cache.iterdir() if p.is_dir()) == ["train", "val"]
    for i in range(5):
        assert all(np.array_equal(a, b) for a, b in zip(data.train.load(i), reference.train.load(i)))
    # a second run decodes nothing
    for module in (common, prepare):
        monkeypatch.setattr(module, "read_image", lambda path: pytest.fail(f"decoded {path} again"))
    again = load(args_for("cityscapes", root, n_labeled=2))
    assert np.array_equal(again.val.load(1)[1], reference.val.load(1)[1])


def test_cityscapes_known_seeds_on_the_real_split_sizes():
    names = [f"img_{i:04d}" for i in range(2975)]
    # RandomState(12345).permutation(2975)[:5], the legacy stream, fixed across numpy versions
    assert common.choose_labeled(names, 5, split_seed=12345).tolist() == [1687, 2342, 392, 1338, 76]
    assert common.choose_labeled(names, 5, split_seed=23456).tolist() == [1490, 930, 2124, 2684, 182]
    assert common.choose_labeled(names[:2000], 5, split_seed=12345).tolist() == [1818, 1727, 914, 171, 390]


# ---- Pascal VOC aug ---------------------------------------------------------------------------------
def test_pascal_names_order_and_root_variants(layouts):
    root = layouts["pascal_aug"]
    train_aug, val = layouts["pascal_names"]
    for variant in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):
        args = args_for("pascal_aug", variant, n_labeled=3)
        data = load(args)
        assert data.train.names == train_aug and data.val.names == val  # file order, never the test images
        assert data.num_classes == 21 and args.crop_size == (321, 321) and args.aug["hung_scale"]
    image, label = data.val.load(0)
    assert image.shape[:2] == label.shape == tuple(data.val.sizes[0]) and label[0, 0] == 255
    assert data.labeled.tolist() == np.random.RandomState(12345).permutation(8)[:3].tolist()


def test_pascal_without_train_aug_txt_uses_every_label_outside_val(tmp_path):
    root, train, val = make_pascal(tmp_path / "p", train_aug_txt=False)
    data = load(args_for("pascal_aug", root, n_labeled=2))
    assert data.train.names == train == sorted(train) and len(train) == 8 and data.val.names == val


def test_pascal_split_files(layouts, tmp_path):
    root = layouts["pascal_aug"]
    train_aug, _ = layouts["pascal_names"]
    labeled = tmp_path / "labeled.txt"  # the format of other semi-supervised segmentation code
    labeled.write_text("".join(f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png\n" for n in train_aug[5:1:-1]))
    data = load(args_for("pascal_aug", root, n_labeled=3, split_file=labeled))
    assert [data.train.names[i] for i in data.labeled] == train_aug[5:2:-1]
    # the original's split_0.pkl: a pickled numpy permutation over the train_aug.txt order
    perm = np.random.RandomState(0).permutation(8)
    split = tmp_path / "split_0.pkl"
    split.write_bytes(pickle.dumps(perm))
    data = load(args_for("pascal_aug", root, n_labeled=3, split_file=split))
    assert data.labeled.tolist() == perm[:3].tolist()
    assert load(args_for("pascal_aug", root, n_labeled=-1, split_file=split)).labeled.tolist() == \
        perm.tolist()
    # numpy 1.x pickles name numpy.core.multiarray (as the real file does)
    split.write_bytes(pickle.dumps(perm, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert prepare.read_permutation(split, 8).tolist() == perm.tolist()


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    victim = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {victim}",)
    split = tmp_path / "split_0.pkl"
    split.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(common.UserError, match="posix.system|os.system"):
        prepare.read_permutation(split, 8)
    assert not victim.exists()
    split.write_bytes(pickle.dumps(np.arange(5)))  # not a permutation of the 8 training images
    with pytest.raises(common.UserError, match="permutation of the 8"):
        prepare.read_permutation(split, 8)


def test_sbd_to_aug(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root, _, _ = make_pascal(tmp_path / "p", n_trainaug=4, n_val=2, n_voc_train=1)
    voc = root / "VOCdevkit" / "VOC2012"
    own = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
    expected = {p.stem: np.asarray(Image.open(p)) for p in (voc / "SegmentationClassAug").glob("*.png")}
    for p in (voc / "SegmentationClassAug").iterdir():
        p.unlink()
    cls = tmp_path / "benchmark_RELEASE" / "dataset" / "cls"
    cls.mkdir(parents=True)
    for name, label in expected.items():  # SBD has no void: its own labels for VOC's images differ
        seg = np.where(label == 255, 0, label) if name not in own else np.full_like(label, 3)
        scipy_io.savemat(cls / f"{name}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": [1]}})
    from tools import sbd
    sbd.sbd_to_aug(tmp_path / "benchmark_RELEASE", root)
    for name, label in expected.items():
        written = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{name}.png"))
        want = label if name in own else np.where(label == 255, 0, label)  # VOC's own PNG wins
        assert written.dtype == np.uint8 and np.array_equal(written, want), name


# ---- ISIC 2017 --------------------------------------------------------------------------------------
def test_area_resize_against_a_direct_computation():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (13, 11, 3), dtype=np.uint8)

    def overlap(j, step, i):  # length of [j step, (j + 1) step) ∩ [i, i + 1)
        return max(0.0, min((j + 1) * step, i + 1) - max(j * step, i))
    out = prepare.area_resize(a, (5, 4))
    for y in range(5):
        for x in range(4):
            wy = np.array([overlap(y, 13 / 5, i) for i in range(13)])
            wx = np.array([overlap(x, 11 / 4, i) for i in range(11)])
            want = np.einsum("i,j,ijc->c", wy, wx, a.astype(float)) / (13 / 5 * 11 / 4)
            assert np.abs(out[y, x] - want).max() <= 0.5 + 1e-9
    block = prepare.area_resize(a[:12, :10, 0], (6, 5))  # integer factors: the plain block mean
    assert np.array_equal(block, np.rint(a[:12, :10, 0].reshape(6, 2, 5, 2).mean((1, 3))).astype(np.uint8))


def test_isic_lesion_threshold_after_resizing(tmp_path):
    truth = np.zeros((496, 496), np.uint8)
    truth[0, 0:2] = 254  # 2x2 mean 127 -> lesion
    truth[0, 2:4] = 252  # 126 -> background
    truth[2:4, 0:2] = 255  # 255 -> lesion
    Image.fromarray(truth).save(tmp_path / "t.png")
    Image.fromarray(np.zeros((496, 496, 3), np.uint8)).save(tmp_path / "i.jpg")
    image, lesion = prepare.shrink_isic(tmp_path / "i.jpg", tmp_path / "t.png")
    assert image.shape == (248, 248, 3) and lesion.shape == (248, 248)
    assert lesion[:2, :2].tolist() == [[1, 0], [1, 0]] and lesion.sum() == 2


def test_isic_official_layout(layouts):
    root = layouts["isic2017"]
    args = args_for("isic2017", root, n_labeled=4)
    data = load(args)
    assert (len(data.train), len(data.val), data.num_classes) == (6, 2, 2)
    assert data.train.names == [f"ISIC_{k:07d}" for k in range(6)] and data.val.names[0] == "ISIC_0000006"
    assert data.labeled.tolist() == np.random.RandomState(12345).permutation(6)[:4].tolist()
    assert args.optimizer == "sgd" and args.lr_schedule == "poly" and args.lesion_scoring and args.eval_every == 400
    image, lesion = data.val.load(1)
    truth = np.asarray(Image.open(root / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000007_segmentation.png"))
    source = np.asarray(Image.open(root / "ISIC-2017_Validation_Data" / "ISIC_0000007.jpg"))
    assert np.array_equal(lesion, (prepare.area_resize(truth, (248, 248)) >= 127).astype(np.uint8))
    assert np.array_equal(image, prepare.area_resize(source, (248, 248))) and set(np.unique(lesion)) == {0, 1}


def test_isic_protocol_per_arch():
    assert args_for("isic2017", "x").lr == 0.1 and args_for("isic2017", "x").arch == "denseunet161"
    assert args_for("isic2017", "x", arch="deeplabv2").lr == 2.5e-4
    assert args_for("isic2017", "x", arch="unet_small").lr == 0.1
    assert args_for("isic2017", "x", arch="unet_small", lr=0.05).lr == 0.05  # the command line wins
    assert args_for("cityscapes", "x").lr == 3e-5 and not hasattr(args_for("cityscapes", "x"), "arch_overrides")
    fields = [f.name for f in common.dataclasses.fields(common.TrainArgs)]
    assert fields[fields.index("aspp_all_branches") + 1] == "cache_dir"


def test_hole_filling_on_a_hand_made_mask():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0],
                         [1, 0, 1, 0, 1, 0],   # (1,1): closed off to 4-neighbours, only diagonal to the border
                         [1, 1, 1, 0, 1, 0],
                         [0, 1, 1, 1, 1, 0],
                         [0, 1, 0, 0, 1, 1],   # open to the bottom border: not a hole
                         [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    filled = common.fill_holes(mask[None])[0]
    want = mask.clone()
    want[1, 1] = want[1, 3] = want[2, 3] = True
    assert torch.equal(filled, want)
    assert torch.equal(common.fill_holes(torch.zeros(2, 4, 5, dtype=torch.bool)), torch.zeros(2, 4, 5, dtype=torch.bool))


def test_evaluation_fills_holes_only_where_the_protocol_says(tmp_path):
    ring = torch.zeros(1, 8, 8, dtype=torch.bool)
    ring[0, 1:7, 1:7] = True
    ring[0, 3:5, 3:5] = False

    class Ring(torch.nn.Module):
        def forward(self, x):
            return torch.stack([~ring, ring], 1).float().expand(len(x), -1, -1, -1)
    truth = torch.zeros(1, 8, 8, dtype=torch.uint8)
    truth[0, 1:7, 1:7] = 1
    loader = [(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), truth)]
    _, iou, _ = common.evaluate(Ring(), loader, torch.device("cpu"), num_classes=2, lesion_scoring=True)
    assert iou == [100.0, 100.0]
    _, iou, _ = common.evaluate(Ring(), loader, torch.device("cpu"), num_classes=2, lesion_scoring=False)
    assert iou[1] == pytest.approx(100 * 32 / 36)


def test_rotate_scale_crop_geometry():
    class Fixed:  # every draw at its upper bound: θ = rot, s = max_scale, centre at the far end
        def uniform(self, low=0.0, high=1.0, size=None):
            return np.full(size, high) if size else high
    n = 6
    image = np.random.default_rng(0).integers(0, 256, (n, n, 3), dtype=np.uint8)
    label = np.arange(n * n, dtype=np.uint8).reshape(n, n)
    img, lab, valid = common.augment(image, label, Fixed(), (n, n), dict(rot=90.0, max_scale=1.0))
    # output (y, x) samples input row n - x, column y (centre n/2, as cv2.warpAffine with T(crop/2))
    for y in range(n):
        for x in range(1, n):
            assert lab[y, x] == label[n - x, y] and img[:3, y, x].tolist() == image[n - x, y].tolist()
    assert (lab[:, 0] == 255).all() and (valid[:, 0] == 0).all() and (valid[:, 1:] == 255).all()
    assert all(img[:3, y, 0].tolist() == image[n - 2, y].tolist() for y in range(n))  # reflect-101 border
    assert (img[3] == 255).all()  # alpha: no pixel of a rotated crop is padding
    # random draws: a crop of the right size whose labels all come from the image, or are 255 outside it
    rng = np.random.default_rng(1)
    for _ in range(5):
        aug = dict(common.DATASETS["isic2017"]["aug"], transpose=False)  # a non-square crop: x and y apart
        img, lab, valid = common.augment(image, label, rng, (4, 5), aug)
        assert img.shape == (4, 4, 5) and lab.shape == valid.shape == (4, 5)
        assert torch.equal(lab == 255, valid == 0) and set(lab[lab != 255].tolist()) <= set(range(n * n))


def test_the_net_sees_the_mirrored_image_beyond_a_rotated_crop_and_zero_beyond_a_padded_one():
    """ISIC: as the original, the image is mirrored (reflect-101) where a rotated crop leaves the image,
    with label 255 and valid 0 there; the network gets those mirrored pixels. Pascal's padding becomes 0."""
    class Fixed:  # θ = 90°, scale 1, the crop centred at the image's far end: column 0 lies outside
        def uniform(self, low=0.0, high=1.0, size=None):
            return np.full(size, high) if size else high
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3) * 2
    img, lab, valid = common.augment(image, np.zeros((6, 6), np.uint8), Fixed(), (6, 6), dict(rot=90.0, max_scale=1.0))
    x, y, v = common.to_device((img[None], lab[None], valid[None]), torch.device("cpu"))
    mean, std = (torch.tensor(t).view(3, 1) for t in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    for row in range(6):  # output column 0 maps to input column -1 of row 6 - 0: reflect-101 gives row 4
        want = (torch.tensor(image[4, row], dtype=torch.float32).view(3, 1) / 255 - mean) / std
        assert torch.allclose(x[0, :, row, :1], want) and y[0, row, 0] == 255 and v[0, 0, row, 0] == 0
    assert x[0, :, :, 0].abs().mean() > 0.3  # the mirrored content is there, not the mean colour
    # a crop larger than the image (Pascal, Cityscapes): centred padding, 0 after normalisation, valid 0
    img, lab, valid = common.augment(image, np.zeros((6, 6), np.uint8), np.random.default_rng(0), (8, 10), {})
    x, y, v = common.to_device((img[None], lab[None], valid[None]), torch.device("cpu"))
    assert img.shape == (3, 8, 10) and (x[0, :, 0] == 0).all() and (x[0, :, :, :2] == 0).all()
    assert (v[0, 0, 1:7, 2:8] == 1).all() and v.sum() == 36 and (y[0, 0] == 255).all()


def test_padding_for_the_dense_unet_is_centred_and_cropped_back():
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7) + 1
    padded, crop = nets.pad_centred(x, 4)  # 5 -> 8: 1 above, 2 below; 7 -> 8: 0 left, 1 right
    assert padded.shape == (1, 1, 8, 8) and torch.equal(padded[..., 1:6, 0:7], x)
    assert padded.sum() == x.sum() and torch.equal(padded[crop], x)
    assert nets.pad_centred(torch.ones(1, 3, 248, 248), 32)[1][-2:] == (slice(4, 252), slice(4, 252))
    net = nets.DenseUNet161(num_classes=2).eval()  # 40 -> 64, centred: the same as padding by 12 all round
    image = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(net(image), net(F.pad(image, (12, 12, 12, 12)))[..., 12:52, 12:52], atol=1e-5)


# ---- bad layouts: one clear line naming what is missing, the layout and where to get it -----------------
def break_layout(kind, root):
    if kind == "cityscapes: no gtFine":
        os.rename(root / "gtFine", root / "gtFine_trainvaltest")
        return "gtFine/train", "cityscapes-dataset.com"
    if kind == "cityscapes: missing label":
        (root / "gtFine" / "val" / "bochum" / "bochum_000000_000001_gtFine_labelIds.png").unlink()
        return "bochum_000000_000001_gtFine_labelIds.png", "gtFine_trainvaltest.zip"
    if kind == "pascal: no JPEGImages":
        os.rename(root / "VOCdevkit" / "VOC2012" / "JPEGImages", root / "VOCdevkit" / "VOC2012" / "images")
        return "JPEGImages", "host.robots.ox.ac.uk"
    if kind == "pascal: no SegmentationClassAug":
        for p in (root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").iterdir():
            p.unlink()
        (root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").rmdir()
        return "SegmentationClassAug", "sbd-to-aug"
    if kind == "pascal: listed image without label":
        (root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / "2007_000009.png").unlink()
        return "2007_000009.png", "SegmentationClassAug.zip"
    if kind == "isic: no ground truth folder":
        os.rename(root / "ISIC-2017_Validation_Part1_GroundTruth", root / "gt")
        return "ISIC-2017_Validation_Part1_GroundTruth", "challenge.isic-archive.com"
    if kind == "isic: image without ground truth":
        (root / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000002_segmentation.png").unlink()
        return "ISIC_0000002_segmentation.png", "ISIC-2017_Training_Part1_GroundTruth"


BROKEN = ["cityscapes: no gtFine", "cityscapes: missing label", "pascal: no JPEGImages",
          "pascal: no SegmentationClassAug", "pascal: listed image without label", "isic: no ground truth folder",
          "isic: image without ground truth"]


@pytest.mark.parametrize("kind", BROKEN)
def test_wrong_layouts_give_one_clear_message(kind, tmp_path):
    dataset = {"cityscapes": "cityscapes", "pascal": "pascal_aug", "isic": "isic2017"}[kind.split(":")[0]]
    root = {"cityscapes": make_cityscapes, "pascal_aug": lambda r: make_pascal(r)[0], "isic2017": make_isic}[dataset](
        tmp_path / "data")
    missing, source = break_layout(kind, root)
    with pytest.raises(common.UserError) as error:
        load(args_for(dataset, root, n_labeled=2))
    message = str(error.value)
    assert "\n" not in message and missing in message and source in message and "expected layout" in message


@pytest.mark.parametrize("dataset", ["cityscapes", "pascal_aug", "isic2017"])
def test_a_wrong_root_stops_the_script_before_any_output(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    last = refused("train_baseline.py", "--dataset", dataset, "--data-root", tmp_path / "empty", "--arch", "unet_small",
                   "--no-pretrained", out=tmp_path / "run")
    assert "expected layout" in last


# ---- every script end to end on each tiny layout ----------------------------------------------------------
SCRIPTS = sorted(p.name for p in ROOT.glob("train_*.py"))
CROPS = {"cityscapes": "16,32", "pascal_aug": "24,24", "isic2017": "48,48"}


@pytest.mark.parametrize("dataset", ["cityscapes", "pascal_aug", "isic2017"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_end_to_end(script, dataset, layouts, tmp_path):
    out = tmp_path / "run"
    proc = run_main(script, "--dataset", dataset, "--data-root", layouts[dataset], "--n-labeled", 3, "--arch", "unet_small",
               "--no-pretrained", "--iters", 4, "--eval-every", 2, "--batch-size", 2, "--num-workers", 0,
               "--crop-size", CROPS[dataset], "--out", out)
    results = read_results(out)
    assert results["dataset"] == dataset and results["n_labeled"] == 3 and results["iters"] == 4
    assert len(results["per_class_iou"]) == {"cityscapes": 19, "pascal_aug": 21, "isic2017": 2}[dataset]
    assert proc.stdout.rstrip().splitlines()[-1] == f"FINAL mIoU={results['miou']:.2f}"
    if dataset == "isic2017":
        assert results["lesion_iou"] == results["per_class_iou"][1] and "lesion IoU" in proc.stdout
    args = json.loads((out / "args.json").read_text())
    assert args["cache_dir"] is None and args["split_seed"] == 12345


@pytest.mark.parametrize("dataset", ["cityscapes", "pascal_aug", "isic2017"])
def test_unlabeled_dir_joins_each_official_dataset_prepared_as_its_training_images(dataset, layouts, tmp_path):
    """--unlabeled-dir: Cityscapes' extra images halved and cached like its training images, ISIC's resized
    to 248x248 and cached, Pascal's decoded on the fly; the paper's stream (the training set) comes first."""
    extra, rng = tmp_path / "extra", np.random.default_rng(0)
    shapes = {"cityscapes": [(32, 64)] * 3, "pascal_aug": [(20, 30), (40, 28)], "isic2017": [(300, 400), (90, 120)]}
    for i, (h, w) in enumerate(shapes[dataset]):
        (extra / f"city_{i}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(extra / f"city_{i}" / f"x{i}.png")
    data = load(args_for(dataset, layouts[dataset], n_labeled=3, unlabeled_dir=extra))
    n = len(data.train)
    assert len(data.unlabeled) == n + len(shapes[dataset]) and data.unlabeled.names[:n] == data.train.names
    image, label = data.unlabeled.load(n + 1)
    want = {"cityscapes": (16, 32, 3), "pascal_aug": (40, 28, 3), "isic2017": (248, 248, 3)}[dataset]
    assert image.shape == want and label is None
    if dataset == "cityscapes":  # the 2x2 mean, truncated, as the training images
        source = np.array(Image.open(extra / "city_1" / "x1.png")).astype(np.uint16)
        assert np.array_equal(image, (source.reshape(16, 2, 32, 2, 3).sum((1, 3)) // 4).astype(np.uint8))
    out = tmp_path / "run"
    proc = run_main("train_cutmix.py", "--dataset", dataset, "--data-root", layouts[dataset], "--n-labeled", 3,
               "--unlabeled-dir", extra, "--arch", "unet_small", "--no-pretrained", "--iters", 2, "--eval-every", 2,
               "--batch-size", 2, "--num-workers", 0, "--crop-size", CROPS[dataset], "--out", out)
    assert f"{n + len(shapes[dataset])} unlabeled ({len(shapes[dataset])} without masks)" in proc.stdout
