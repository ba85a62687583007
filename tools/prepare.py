"""Dataset preparation, imported by common.py before training: the demo's generated images, the one-time
check of every (image, mask) pair and image without a mask, Cityscapes halved and ISIC resized into
memory-mapped arrays once, --split-file lists and pickles, and the conversion of SBD's labels into Pascal's
SegmentationClassAug (`python common.py sbd-to-aug SBD_ROOT VOC_ROOT`)."""
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from common import IGNORE, UserError, atomic_write  # noqa: E402

try:
    import fcntl  # Unix: serialises concurrent preparations of one dataset cache
except ImportError:  # Windows: one run at a time prepares
    fcntl = None


def check_pairs(pairs_by_split, num_classes=None):
    """Decode every (image, mask) pair, or (image,) alone, once: images readable as RGB, sizes agree, masks
    hold classes below num_classes (or 255). Returns {split: [[H, W], ...], "classes": the classes seen,
    "labeled_pixels": {split: pixels that are not 255}}."""
    verdict, classes, labeled = {}, set(), {}
    for split, pairs in pairs_by_split.items():
        sizes, labeled[split] = [], 0
        for image_path, *mask_path in tqdm(pairs, desc=f"checking {split} data (once)", leave=False,
                                           disable=len(pairs) < 200):
            image = common.read_image(image_path)
            sizes.append(list(image.shape[:2]))
            if not mask_path:
                continue
            mask_path, = mask_path
            mask = common.read_mask(mask_path)
            if image.shape[:2] != mask.shape:
                raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
            values = np.unique(mask)
            values = values[values != IGNORE]
            if num_classes and len(values) and values.max() >= num_classes:
                raise UserError(f"mask {mask_path} holds class {values.max()}, but --num-classes is "
                                f"{num_classes} (expected 0..{num_classes - 1} or 255 = ignore)")
            classes.update(values.tolist())
            labeled[split] += int((mask != IGNORE).sum())
        verdict[split] = sizes
    return dict(verdict, classes=sorted(classes), labeled_pixels=labeled)


def fill_arrays(folder, pairs, convert, tag):
    """`folder`/{images,labels}.npy from convert(image path, label path) of each pair. Filled in
    <folder>.partial sample by sample, with the count of finished samples in a progress file, and renamed
    when complete: an interrupted preparation resumes where it stopped and never leaves a half-written
    cache behind; runs started together (a table's seeds) wait for the one that prepares."""
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir():  # another run prepared it while this one waited
            return
        partial, arrays = folder.with_name(folder.name + ".partial"), None
        partial.mkdir(exist_ok=True)
        progress = partial / "done.txt"
        done = int(progress.read_text()) if progress.is_file() else 0
        if done:
            arrays = [np.load(partial / f"{kind}.npy", mmap_mode="r+") for kind in ("images", "labels")
                      if (partial / f"{kind}.npy").is_file()]
        for i in tqdm(range(done, len(pairs)), initial=done, total=len(pairs), desc=f"preparing {tag} (once)",
                      dynamic_ncols=True):
            sample = convert(*pairs[i])
            if arrays is None:  # the first sample sets the arrays' shapes
                arrays = [np.lib.format.open_memmap(partial / f"{kind}.npy", "w+", np.uint8, (len(pairs), *a.shape))
                          for kind, a in zip(("images", "labels"), sample)]
            if sample[0].shape != arrays[0].shape[1:]:
                raise UserError(f"{pairs[i][0]} is {sample[0].shape[1]}x{sample[0].shape[0]} once prepared, the "
                                f"images before it {arrays[0].shape[2]}x{arrays[0].shape[1]}: they must share one "
                                f"size")
            for array, a in zip(arrays, sample):
                array[i] = a
                array.flush()
            atomic_write(progress, str(i + 1))
        del arrays  # unmapped before the rename
        os.replace(partial, folder)


# ---- --split-file: the labeled subset named by a list, or the original's pickled permutation ----------
def read_split_file(path, names):
    """Indices into `names` of a --split-file: a .pkl index permutation of the training order (the
    original's data/splits/pascal_aug/split_0.pkl), else text, one name per line (or labeled.txt's
    "JPEGImages/x.jpg SegmentationClassAug/x.png" lines), matched by name or stem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--split-file {path}: no such file")
    if path.suffix == ".pkl":
        return read_permutation(path, len(names))
    index = {**{name: i for i, name in enumerate(names)}, **{Path(name).stem: i for i, name in enumerate(names)}}
    chosen = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name = line.split()[0]
        key = name if name in index else Path(name).stem
        if key not in index:
            raise UserError(f"--split-file {path}, line {line_no}: {name!r} is not a training image of this dataset")
        chosen.append(index[key])
    return np.array(chosen, dtype=np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles a numpy array and nothing else: a pickle naming any other global (os.system, ...) is
    refused before it can run, so a downloaded split file cannot execute code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}  # encode: protocol 2's bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a split file has no need of")
        return super().find_class(module, name)


def read_permutation(path, n):
    """The int array pickled in `path` (no arbitrary code runs); it must be a permutation of 0..n-1."""
    try:
        with open(path, "rb") as f:
            perm = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2 too
    except Exception as e:
        raise UserError(f"--split-file {path}: not a pickled numpy index array ({e})")
    if not (isinstance(perm, np.ndarray) and perm.ndim == 1 and perm.dtype.kind in "iu"
            and np.array_equal(np.sort(perm), np.arange(n))):
        raise UserError(f"--split-file {path}: expected a permutation of the {n} training images' indices "
                        f"(numpy int array of shape ({n},)), got {getattr(perm, 'shape', type(perm).__name__)}")
    return perm.astype(np.int64)


# ---- demo: built-in, generated at every run, deterministic, classes told apart by shape alone --------
DEMO_CLASSES = ["background", "disc", "square", "triangle", "cross"]


def demo_image(rng, size=48):
    """One demo image and its label map. Objects and background draw their colours from one distribution,
    so only shape tells the classes apart; smooth background texture, clutter strokes and noise make sure no
    low-density gap separates object pixels from background pixels (paper Sec. 3.1)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def texture(contrast):
        c1 = rng.uniform(0, 255, 3)
        c2 = np.clip(c1 + rng.normal(0, contrast, 3), 0, 255)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        wave = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        return c1 + (c2 - c1) * wave[..., None]

    image = texture(contrast=80)
    for _ in range(rng.integers(2, 5)):  # clutter: strokes in object-like colours
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6), 0, 1)
        dist = np.hypot(xx - x0 - t * (x1 - x0), yy - y0 - t * (y1 - y0))
        image = np.where((dist < rng.uniform(0.7, 1.6))[..., None], texture(contrast=30), image)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = rng.integers(1, len(DEMO_CLASSES))
        cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.13, 0.23) * size
        theta = rng.uniform(0, 2 * np.pi)
        u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
        v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
        if cls == 1:
            inside = u ** 2 + v ** 2 < r ** 2
        elif cls == 2:
            inside = np.maximum(np.abs(u), np.abs(v)) < r * 0.8
        elif cls == 3:  # equilateral triangle: three half-planes
            inside = np.ones_like(u, bool)
            for k in range(3):
                a = theta + k * 2 * np.pi / 3
                inside &= np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy) < r * 0.55
        else:
            inside = (np.minimum(np.abs(u), np.abs(v)) < r * 0.3) & (np.maximum(np.abs(u), np.abs(v)) < r)
        image = np.where(inside[..., None], texture(contrast=30), image)
        label[inside] = cls
    image = image + rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def demo_dataset(n_train=600, n_val=100, size=48):
    rng = np.random.default_rng(20200907)  # fixed: the demo is the same data on every machine
    images, labels = (np.stack(a) for a in zip(*[demo_image(rng, size) for _ in range(n_train + n_val)]))
    split = lambda first, n: common.Split([f"demo_{i:04d}" for i in range(first, first + n)],  # noqa: E731
                                   lambda i: (images[first + i], labels[first + i]), [(size, size)] * n)
    return split(0, n_train), split(n_train, n_val), len(DEMO_CLASSES), DEMO_CLASSES


# ---- Cityscapes: half size, as the original's conversion script --------------------------------------
# labelId -> trainId for the 19 evaluated classes; every other id (void 0-6, 9, 10, ..., license plate 34) -> 255
CITYSCAPES_TRAIN_ID = np.full(256, IGNORE, np.uint8)
CITYSCAPES_TRAIN_ID[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = np.arange(19)


def halve_cityscapes(image_path, label_path=None):
    """Half size as the original's convert_cityscapes.py: the image by 2x2 mean truncated to uint8; the
    labelIds by 2x2 majority vote, ties to the lower id, then mapped to trainIds. (image,) without a label."""
    image = common.read_image(image_path)
    label = common.read_mask(label_path) if label_path else None
    h, w = image.shape[:2]
    if (label is not None and label.shape != (h, w)) or h % 2 or w % 2:
        raise UserError(f"{label_path or image_path} and {image_path} ({w}x{h}) must share one even size (2048x1024 "
                        f"in the official download)")
    image = (image.reshape(h // 2, 2, w // 2, 2, 3).sum((1, 3), dtype=np.uint16) // 4).astype(np.uint8)
    if label is None:
        return (image,)
    blocks = label.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(h // 2, w // 2, 4)
    votes = (blocks[..., :, None] == blocks[..., None, :]).sum(-1)  # (h/2, w/2, 4): votes for each entry's id
    winner = np.take_along_axis(blocks, (votes * 256 - blocks).argmax(-1)[..., None], -1)[..., 0]
    return image, CITYSCAPES_TRAIN_ID[winner]


# ---- ISIC 2017: 248x248, as the original's conversion script -----------------------------------------
ISIC_SIZE = (248, 248)


def shrink_isic(image_path, truth_path=None):
    """248x248 by area interpolation, image and ground truth alike (the original's convert_isic.py used
    cv2.INTER_AREA), then lesion where the resized ground truth is >= 127. (image,) without a ground truth."""
    image = common.read_image(image_path)
    if truth_path is None:
        return (area_resize(image, ISIC_SIZE),)
    truth = common.read_mask(truth_path)
    if image.shape[:2] != truth.shape:
        raise UserError(f"ground truth {truth_path} is {truth.shape[1]}x{truth.shape[0]} but its image "
                        f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must match")
    return area_resize(image, ISIC_SIZE), (area_resize(truth, ISIC_SIZE) >= 127).astype(np.uint8)


def area_resize(a, size):
    """Resize a uint8 (H, W) or (H, W, C) array by area averaging, as OpenCV's INTER_AREA when shrinking:
    each output pixel is the mean of the input area it covers, pixels partly inside weighted by that part."""
    out = a
    for axis, m in enumerate(size):
        x = np.moveaxis(out, axis, 0)  # resize along the first axis
        n, rows = len(x), []
        edges = np.arange(m + 1) * (n / m)
        for lo, hi in zip(edges[:-1], edges[1:]):  # one output pixel: the input interval [lo, hi)
            pixels = np.arange(int(lo), min(math.ceil(hi), n))
            inside = np.minimum(pixels + 1, hi) - np.maximum(pixels, lo)  # the part of each pixel inside
            rows.append(np.tensordot(inside / (hi - lo), x[pixels[0]:pixels[-1] + 1], 1))
        out = np.moveaxis(np.stack(rows), 0, axis)
    return np.rint(out).clip(0, 255).astype(np.uint8)


# ---- Pascal: SegmentationClassAug from SBD -----------------------------------------------------------
def sbd_to_aug(sbd, voc):
    """Build VOC2012/SegmentationClassAug/NAME.png (class indices, 255 = void) from SBD's dataset/cls/NAME.mat,
    VOC's own SegmentationClass labels winning where both exist, as in the usual SegmentationClassAug.

    Needs scipy, for this step only. Each PNG is written atomically and existing ones are kept: re-run it
    after an interruption."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("sbd-to-aug reads SBD's .mat files with scipy, needed for this step only: pip install scipy")
    sbd, voc = Path(sbd), common.voc2012_folder(Path(voc))
    cls = next((d for d in (sbd / "dataset" / "cls", sbd / "benchmark_RELEASE" / "dataset" / "cls", sbd / "cls")
                if d.is_dir()), None)
    if cls is None:
        raise UserError(f"{sbd}: no dataset/cls/ folder of .mat labels; expected SBD's benchmark.tgz unpacked "
                        f"(http://home.bharathh.info/pubs/codes/SBD/download.html)")
    if voc is None or not (voc / "SegmentationClass").is_dir():
        raise UserError(f"no VOC2012 folder with JPEGImages/ and SegmentationClass/ there; expected "
                        f"{common.LAYOUTS['pascal_aug']}")
    sources = {p.stem: p for p in cls.glob("*.mat")}
    sources.update({p.stem: p for p in (voc / "SegmentationClass").glob("*.png")})  # VOC's own labels win
    for name, source in tqdm(sorted(sources.items()), desc="writing SegmentationClassAug"):
        target = voc / "SegmentationClassAug" / f"{name}.png"
        if target.is_file():
            continue
        if source.suffix == ".png":
            label = common.read_mask(source)  # palette indices, 255 = boundary
        else:
            label = loadmat(source, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation.astype(np.uint8)
        atomic_write(target, label)
    print(f"{len(sources)} labels in {voc / 'SegmentationClassAug'}")


def main(command, argv):
    """python common.py sbd-to-aug SBD_ROOT VOC_ROOT"""
    if len(argv) != 2:
        sys.exit("usage: python common.py sbd-to-aug SBD_ROOT VOC_ROOT  (builds VOC2012/SegmentationClassAug from "
                 "SBD's dataset/cls/*.mat; README 'Datasets')")
    sbd_to_aug(*argv)
