"""Tiny copies of the official dataset downloads: real folder and file names, real formats, the usual clutter.

Sizes are small (Cityscapes 64x32 instead of 2048x1024) so that preparing and training take seconds.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cutmixseg.pictures import palette

CITIES = ("aachen", "bochum", "bremen")


def save(array, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def blocky(rng, h, w, values, block=4):
    """An (h, w) map of `values` in block x block patches, so that 2x2 votes and crops see structure."""
    small = rng.choice(values, size=(-(-h // block), -(-w // block))).astype(np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:h, :w]


def make_cityscapes(root, n_train=6, n_val=2, size=(32, 64), seed=0):
    """ROOT/leftImg8bit/{train,val,test}/<city>/<city>_000000_0000NN_leftImg8bit.png and ROOT/gtFine/...
    with _labelIds (every id 0-33, void ones included), _color, _instanceIds and _polygons.json."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val), ("test", 2)):
        for i in range(n):
            city = CITIES[i % len(CITIES)]
            name = f"{city}_000000_{i:06d}"
            save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), root / "leftImg8bit" / split / city /
                 f"{name}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            label_ids = blocky(rng, h, w, np.arange(34), block=2) if split != "test" else np.zeros((h, w), np.uint8)
            save(label_ids, gt / f"{name}_gtFine_labelIds.png")
            save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), gt / f"{name}_gtFine_color.png")
            save(label_ids.astype(np.uint16) * 1000, gt / f"{name}_gtFine_instanceIds.png")
            (gt / f"{name}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": h, "imgWidth": w,
                                                                           "objects": []}))
    (root / "license.txt").write_text("clutter")
    return root


def make_pascal(root, n_trainaug=8, n_voc_train=3, n_val=3, n_test=2, train_aug_txt=True, seed=0):
    """VOCdevkit/VOC2012 with JPEGs of varied sizes (test images have no label), SegmentationClassAug
    (L-mode indices, 255 borders), SegmentationClass (palette PNGs), ImageSets/Segmentation/{train,val}.txt
    and, if asked, ImageSets/SegmentationAug/train_aug.txt (in a shuffled order, as a file order to keep).

    Returns (folder holding VOCdevkit, train_aug names in file order, val names)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    names = [f"2007_{i:06d}" for i in range(n_trainaug + n_val + n_test)]
    train, val, test = names[:n_trainaug], names[n_trainaug:n_trainaug + n_val], names[n_trainaug + n_val:]
    colours = palette().flatten().tolist()
    for i, name in enumerate(names):
        h, w = 24 + 4 * (i % 3), 28 + 6 * (i % 4)  # a few sizes
        save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), voc / "JPEGImages" / f"{name}.jpg", quality=90)
        if name in test:
            continue
        label = blocky(rng, h, w, np.arange(21))
        label[0, :] = label[:, 0] = 255  # VOC's boundary / void class
        save(label, voc / "SegmentationClassAug" / f"{name}.png")
        if name in val or name in train[:n_voc_train]:
            pal = Image.fromarray(label, mode="P")
            pal.putpalette(colours)
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            pal.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{name}.xml").write_text("<annotation/>")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{n}\n" for n in train[:n_voc_train]))
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in val))
    (sets / "trainval.txt").write_text("".join(f"{n}\n" for n in train[:n_voc_train] + val))
    order = [train[k] for k in np.random.default_rng(seed + 1).permutation(len(train))]
    if train_aug_txt:
        aug = voc / "ImageSets" / "SegmentationAug"
        aug.mkdir(parents=True)
        (aug / "train_aug.txt").write_text("".join(f"{n}\n" for n in order))
        (aug / "val.txt").write_text("".join(f"{n}\n" for n in val))
    return root, (order if train_aug_txt else sorted(train)), val


def isic_lesion(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7), h * rng.uniform(0.15, 0.3), w * 0.25
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).astype(np.uint8) * 255


def make_isic(root, n_train=6, n_val=3, seed=0):
    """ROOT/ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_00000NN.jpg of varied sizes, with superpixel
    PNGs and a metadata CSV beside them, and ..._Part1_GroundTruth/ISIC_00000NN_segmentation.png (0 / 255)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    k = 0
    for part, n in (("Training", n_train), ("Validation", n_val), ("Test_v2", 1)):
        data, truth = root / f"ISIC-2017_{part}_Data", root / f"ISIC-2017_{part}_Part1_GroundTruth"
        data.mkdir(parents=True)
        (data / f"ISIC-2017_{part}_Data_metadata.csv").write_text("image_id,age_approximate,sex\n")
        for i in range(n):
            name = f"ISIC_{k:07d}"
            k += 1
            h, w = 250 + 17 * (i % 3), 260 + 31 * (i % 4)
            lesion = isic_lesion(rng, h, w)
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8) + (lesion[..., None] // 2)
            save(image.astype(np.uint8), data / f"{name}.jpg", quality=90)
            save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), data / f"{name}_superpixels.png")
            save(lesion, truth / f"{name}_segmentation.png")
    return root
