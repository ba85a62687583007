"""Dataset preparation, run by common.py before training: the one-time check of every (image, mask) pair and
image without a mask (its verdict cached), Cityscapes halved and ISIC resized into memory-mapped arrays once,
--split-file lists and pickles."""
import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .files import IGNORE, UserError, atomic_write, read_image, read_mask

try:
    import fcntl  # Unix: serialises concurrent preparations of one dataset cache
except ImportError:  # Windows: one run at a time prepares
    fcntl = None


def check_pairs(pairs_by_split, num_classes=None):
    """Decode every (image, mask) pair, or (image,) alone, once: images readable as RGB, sizes agree, masks
    hold classes below num_classes (or 255). Returns {split: [[H, W], ...], "classes": the classes seen,
    "labeled_pixels": {split: pixels that are not 255}}."""
    verdict = {}
    classes = set()
    labeled = {}
    for split, pairs in pairs_by_split.items():
        sizes = []
        labeled[split] = 0
        for image_path, *mask_path in tqdm(pairs, desc=f"checking {split} data (once)", leave=False,
                                           disable=len(pairs) < 200):
            image = read_image(image_path)
            sizes.append(list(image.shape[:2]))
            if not mask_path:
                continue
            mask_path, = mask_path
            mask = read_mask(mask_path)
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


def verdict(pairs_by_split, cache, num_classes=None):
    """check_pairs' verdict on these files, from the cache (keyed by the files' names, sizes and times) or
    checked now and cached; a cached verdict that cannot be read is checked again, with a line."""
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for pairs in pairs_by_split.values()
             for pair in pairs for p in pair]
    digest = hashlib.sha1(json.dumps([files, num_classes, 2]).encode()).hexdigest()[:16]
    path = cache / f"verdict_{digest}.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text())
            expected = {**{split: list for split in pairs_by_split}, "classes": list, "labeled_pixels": dict}
            if all(isinstance(found.get(key), kind) for key, kind in expected.items()):
                return found
        except (OSError, ValueError, RecursionError, AttributeError):
            pass
        print(f"{path}: a cached check that cannot be read; checking the data again")
    found = check_pairs(pairs_by_split, num_classes)
    atomic_write(path, json.dumps(found))
    return found


def arrays(root, cache, tag, pairs, convert, nbytes=None, with_root=False):
    """(images, labels or None) of `pairs`, memory-mapped from the cache, prepared by the function `convert`
    (image path[, label path]) -> (image[, label]) the first time (fill_arrays). The folder's name hashes
    the source files' names (below `root`; with_root: and `root` itself, so that a copy of the data
    elsewhere is prepared anew), sizes and times: changed data is prepared anew; a prepared folder that
    cannot be read, too, with a line. nbytes (the arrays' size): a preparation the disk has no room for is
    not begun: a line, and None."""
    files = [(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p.resolve()),
              p.stat().st_size, p.stat().st_mtime_ns) for pair in pairs for p in pair]
    key = [str(Path(root).resolve()), files] if with_root else files
    folder = cache / f"{tag}_{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}"
    if nbytes and not folder.is_dir() and not has_room(folder, nbytes):
        return None
    for _ in range(2):
        if not folder.is_dir():
            fill_arrays(folder, pairs, convert, tag)
        try:
            images, labels = (np.load(f, mmap_mode="r") if f.is_file() else None
                              for f in (folder / "images.npy", folder / "labels.npy"))
            complete = images is not None and len(images) == len(pairs)
            if not complete or (labels is not None and len(labels) != len(pairs)):
                raise ValueError(f"expected arrays of {len(pairs)} samples")
            return images, labels
        except (OSError, ValueError) as e:
            print(f"{folder}: prepared data that cannot be read ({e}); preparing it again")
            shutil.rmtree(folder)
    raise UserError(f"{folder}: the data prepared there cannot be read back; is the disk full?")


SPARE = 2 ** 30  # bytes left free beside a cache prepared now: the run's checkpoints and logs


def has_room(folder, nbytes):
    """Whether the disk of the cache has room for arrays of nbytes in `folder` (what an interrupted
    preparation wrote in its .partial folder counts as room) and SPARE besides; if not, one line says so."""
    partial = folder.with_name(folder.name + ".partial")
    written = sum(getattr(f.stat(), "st_blocks", 0) * 512 for f in partial.glob("*.npy"))  # none: no folder
    free = shutil.disk_usage(folder.parent).free
    if free + written >= nbytes + SPARE:
        return True
    print(f"{folder.parent}: keeping the decoded images there takes {(nbytes - written) / 1e9:.1f} GB more, "
          f"{free / 1e9:.1f} GB are free: decoding them on the fly instead (slower; --cache-dir elsewhere?)")
    return False


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
        partial = folder.with_name(folder.name + ".partial")
        arrays = None
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
                arrays = [np.lib.format.open_memmap(partial / f"{kind}.npy", "w+", np.uint8,
                                                    (len(pairs), *a.shape))
                          for kind, a in zip(("images", "labels"), sample)]
            if sample[0].shape != arrays[0].shape[1:]:
                raise UserError(f"{pairs[i][0]} is {sample[0].shape[1]}x{sample[0].shape[0]} once prepared, "
                                f"the images before it {arrays[0].shape[2]}x{arrays[0].shape[1]}: "
                                f"they must share one size")
            for array, a in zip(arrays, sample):
                array[i] = a
                array.flush()
            atomic_write(progress, str(i + 1))
        del arrays  # unmapped before the rename
        os.replace(partial, folder)


# ---- --split-file: the labeled subset named by a list, or the original's pickled permutation ----------
def read_lines(path):
    """[(line number, line without blanks at its ends)] of the non-empty lines of a text list (UTF-8, a
    byte-order mark allowed, any line ends; bytes that are not UTF-8 read as a file name's, surrogate
    escapes): a --split-file (labeled.txt), or UniMatch's "image mask" lists."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--split-file {path}: no such file")
    # a byte-order mark is no part of the first name;
    # a control character but tabs and line ends: no text at all
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    if any(c < " " and c not in "\t\n\r" for c in text):
        raise UserError(f"--split-file {path}: neither a text list of image names (UTF-8, one per line) "
                        f"nor a pickled index array")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def check_listable(names, root):
    """Training images' `names`, which labeled.txt (one name a line) may list: each must come back from
    read_lines as it is, without a control character (a line break among them), another line break (U+2028,
    ...) or a blank at either end; the first that would not is refused by name."""
    for name in names:
        if name != name.strip() or name.splitlines() != [name] or any(c < " " for c in name):
            raise UserError(f"--data-root {root}: labeled.txt (one name a line) cannot hold the training "
                            f"image {name!r}; rename it without line breaks, control characters or blanks "
                            f"at its ends")


def read_split_file(path, names):
    """Indices into `names` of a --split-file, told apart by content: a pickled index permutation of the
    training order (the original's data/splits/pascal_aug/split_0.pkl, whatever its suffix), else UTF-8
    text (a byte-order mark allowed), one name per line (or labeled.txt's "JPEGImages/x.jpg
    SegmentationClassAug/x.png" lines), matched by name or stem; a name given twice is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--split-file {path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".pkl" or raw[:1] == b"\x80":  # pickle protocols 2 and later begin with 0x80
        return read_permutation(path, len(names))
    by_name = {name: i for i, name in enumerate(names)}
    by_stem = {Path(name).stem: i for i, name in enumerate(names)}
    index = {**by_name, **by_stem}
    chosen = {}  # index -> line number
    for line_no, line in read_lines(path):
        # a name with blanks in it, else the line's first word
        name = line if line in index else line.split()[0]
        # else its stem, less the suffix of UniMatch's Cityscapes lines
        key = name if name in index else Path(name).stem.removesuffix("_leftImg8bit")
        if key not in index:
            raise UserError(f"--split-file {path}, line {line_no}: {name!r} "
                            f"is not a training image of this dataset")
        if index[key] in chosen:
            raise UserError(f"--split-file {path}, line {line_no}: {name!r} is named again (line "
                            f"{chosen[index[key]]}); each labeled image once")
        chosen[index[key]] = line_no
    if not chosen:
        raise UserError(f"--split-file {path}: names no image; expected one training image name per line")
    return np.array(list(chosen), dtype=np.int64)


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
                        f"(numpy int array of shape ({n},)), "
                        f"got {getattr(perm, 'shape', type(perm).__name__)}")
    return perm.astype(np.int64)


# ---- Cityscapes: half size, as the original's conversion script --------------------------------------
# labelId -> trainId for the 19 evaluated classes;
# every other id (void 0-6, 9, 10, ..., license plate 34) -> 255
CITYSCAPES_TRAIN_ID = np.full(256, IGNORE, np.uint8)
CITYSCAPES_TRAIN_ID[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                     31, 32, 33]] = np.arange(19)


def halve_cityscapes(image_path, label_path=None):
    """Half size as the original's convert_cityscapes.py: the image by 2x2 mean truncated to uint8; the
    labelIds by 2x2 majority vote, ties to the lower id, then mapped to trainIds. (image,) without a label."""
    image = read_image(image_path)
    label = read_mask(label_path) if label_path else None
    h, w = image.shape[:2]
    if (label is not None and label.shape != (h, w)) or h % 2 or w % 2:
        raise UserError(f"{label_path or image_path} and {image_path} ({w}x{h}) must share one even size "
                        f"(2048x1024 in the official download)")
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
    image = read_image(image_path)
    if truth_path is None:
        return (area_resize(image, ISIC_SIZE),)
    truth = read_mask(truth_path)
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
        n = len(x)
        rows = []
        edges = np.arange(m + 1) * (n / m)
        for lo, hi in zip(edges[:-1], edges[1:]):  # one output pixel: the input interval [lo, hi)
            pixels = np.arange(int(lo), min(math.ceil(hi), n))
            inside = np.minimum(pixels + 1, hi) - np.maximum(pixels, lo)  # the part of each pixel inside
            rows.append(np.tensordot(inside / (hi - lo), x[pixels[0]:pixels[-1] + 1], 1))
        out = np.moveaxis(np.stack(rows), 0, axis)
    return np.rint(out).clip(0, 255).astype(np.uint8)
