"""UniMatch's weak view for given draws (common.weak_view_draws): the whole image resized, padded, cropped
and flipped on PIL images (scale_crop_flip, the reference), and the same crop, bit for bit, from the image
rows that it reaches alone (scale_crop_flip_window: a third of the work on Cityscapes, and of a memory-mapped
image only those rows are read)."""
import functools
import math

import numpy as np
from PIL import Image

from .files import IGNORE


def long_side_size(size, long_side):
    """(w, h) with the long side `long_side` and the short side rounded half up, as UniMatch's resize."""
    w, h = size
    short = int(1.0 * min(w, h) * long_side / max(w, h) + 0.5)
    return (long_side, short) if w >= h else (short, long_side)


def scale_crop_flip(image, mask, long_side, x, y, flip, crop, fill=IGNORE):
    """UniMatch's weak view for given draws (common.weak_view_draws): resize, pad, crop, flip, on PIL images.

    image RGB, mask L/P or None -> (crop x crop image, mask or None). The long side becomes `long_side`
    (image bilinear, mask nearest); padding on the right and bottom only, up to `crop` (image 0, mask
    `fill`: 255 for labels; UniMatch marks unlabeled padding with 254); then the box (x, y, x+crop, y+crop)
    and a left-right flip if `flip`."""
    size = long_side_size(image.size, long_side)
    padded = (max(size[0], crop), max(size[1], crop))

    def view(im, resample, value):
        canvas = Image.new(im.mode, padded, value)
        if im.mode == "P":  # a new P image gets a default palette: keep the mask's colours
            canvas.putpalette(im.getpalette())
        canvas.paste(im.resize(size, resample), (0, 0))
        im = canvas.crop((x, y, x + crop, y + crop))
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

    return (view(image, Image.Resampling.BILINEAR, 0),
            view(mask, Image.Resampling.NEAREST, fill) if mask is not None else None)


def scale_crop_flip_arrays(image, label, long_side, x, y, flip, crop, fill=IGNORE):
    """scale_crop_flip on arrays in and out, as scale_crop_flip_window takes them: the whole image resized."""
    views = scale_crop_flip(Image.fromarray(np.asarray(image)), None if label is None else
                            Image.fromarray(np.asarray(label)), long_side, x, y, flip, crop, fill)
    return tuple(None if v is None else np.array(v) for v in views)


def scale_crop_flip_window(image, label, long_side, x, y, flip, crop, fill=IGNORE):
    """scale_crop_flip's crop, bit for bit, from the image rows that it reaches alone (of a memory-mapped
    image, only those are read), on arrays: image (H, W, 3) uint8, label (H, W) or None -> (crop, crop, 3),
    (crop, crop) or None.

    PIL's bilinear resize runs two passes, each rounded to uint8: along the rows, then along the columns.
    Each runs here as PIL runs it on the whole image, on less: the first on the rows that the crop's filter
    reaches, the second on the crop's columns, whose other rows stay 0 (beyond the filter's reach). A box
    (resize(..., box=)) would cost less, but PIL holds it in float32: its filter shifts by ~1e-4 pixel, and
    where a resized pixel's centre falls on a source pixel's edge both passes round the other way, two grey
    levels apart. The label takes PIL's nearest source pixels, read off PIL itself (nearest_sources).
    Pillow 13 runs the column pass first where the height shrinks more than twice as much as the width
    (images over twice as tall as wide): those are cropped by scale_crop_flip itself."""
    h, w = image.shape[:2]
    ow, oh = long_side_size((w, h), long_side)
    if h - oh > 0 and h - oh > 2 * (w - ow):
        return scale_crop_flip_arrays(image, label, long_side, x, y, flip, crop, fill)
    cw, ch = min(x + crop, ow) - x, min(y + crop, oh) - y  # the resized image's part of the crop
    top, bottom = rows_reached(y, ch, h, oh)
    rows = Image.fromarray(np.asarray(image[top:bottom]))
    if ow != w:  # pass 1: every column of the resized width, as PIL computes them; the crop's are kept
        rows = rows.resize((ow, bottom - top), Image.Resampling.BILINEAR)
    columns = Image.new("RGB", (cw, h))  # 0 beyond the filter's reach
    columns.paste(rows.crop((x, 0, x + cw, bottom - top)), (0, top))
    if oh != h:  # pass 2: every row of the resized height, of which the crop's are kept
        columns = columns.resize((cw, oh), Image.Resampling.BILINEAR)
    img = columns.crop((0, y, cw, y + ch))
    if (cw, ch) != (crop, crop):  # padding: 0 on the right and bottom
        padded = Image.new("RGB", (crop, crop))
        padded.paste(img, (0, 0))
        img = padded
    img = np.array(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)
    if label is None:
        return img, None
    source_rows, source_columns = nearest_sources((w, h), (ow, oh))
    lab = np.full((crop, crop), fill, np.uint8)
    lab[:ch, :cw] = np.take(np.take(label, source_rows[y:y + ch], 0), source_columns[x:x + cw], 1)
    return img, np.ascontiguousarray(lab[:, ::-1]) if flip else lab


def rows_reached(y, n, h, oh):
    """[top, bottom): the source rows (of h) that PIL's bilinear filter reads for the resized rows y..y+n-1
    (of oh): a resized row centred at (row + 0.5) · h/oh reaches max(h/oh, 1) rows either side; one more row
    for rounding."""
    scale = h / oh
    reach = max(scale, 1.0)
    return max(int(y * scale - reach) - 1, 0), min(math.ceil((y + n) * scale + reach) + 1, h)


@functools.lru_cache(maxsize=256)
def nearest_sources(size, resized):
    """(source row of each resized row, source column of each resized column) of PIL's nearest resize from
    size (w, h) to resized (w, h): a column and a row of indices (mode I), each resized by PIL."""
    w, h = size
    ow, oh = resized
    rows = Image.fromarray(np.arange(h, dtype=np.int32)[:, None]).resize((1, oh), Image.Resampling.NEAREST)
    columns = Image.fromarray(np.arange(w, dtype=np.int32)[None]).resize((ow, 1), Image.Resampling.NEAREST)
    return np.asarray(rows)[:, 0], np.asarray(columns)[0]
