"""The pictures a run leaves beside its numbers, drawn with Pillow: preview.png (image | ground truth |
teacher's prediction, titled, with a legend of the class colours) and curves.png (teacher mIoU and the logged
losses against the iteration), redrawn by common.Run at every evaluation."""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import IGNORE, atomic_write

TILE = 192  # a small image is scaled up (nearest) until its short side is at least this many pixels
INK, PAPER = (40, 40, 40), (255, 255, 255)
# The preview's columns, their titles in a band above them, and the gap between tiles: a grey that no class
# colour has (the palette's channels are multiples of 32, or 255 for ignore)
TITLES = ("image", "ground truth", "prediction")
TITLE_BAND = 20  # pixels
GAP = 8  # pixels
GAP_COLOUR = (200, 200, 200)


def palette(num_classes=256):
    """(256, 3) uint8 colours per class index, Pascal's bit-interleaved palette; 255 (ignore) white."""
    c = np.arange(256)
    colours = np.stack([sum(((c >> (3 * k + ch)) & 1) << (7 - k) for k in range(8)) for ch in range(3)], 1)
    colours[IGNORE] = 255
    return colours.astype(np.uint8)


def legend(class_names, colours, width):
    """A strip of colour swatches with the class names, wrapped to `width` pixels."""
    font = ImageFont.load_default()
    cell = 18  # pixels per row
    entries = [(colours[c], name) for c, name in enumerate(class_names)] + [(colours[IGNORE], "ignore")]
    sizes = [16 + 6 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name, font=font)) + 14
             for _, name in entries]
    rows = [[]]  # (entry, x) row by row
    x = 0
    for entry, size in zip(entries, sizes):
        if rows[-1] and x + size > width:
            rows.append([])
            x = 0
        rows[-1].append((entry, x))
        x += size
    strip = Image.new("RGB", (width, cell * len(rows) + 6), PAPER)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        for (colour, name), x in row:
            y = 4 + r * cell
            draw.rectangle([x + 4, y, x + 18, y + 13], fill=tuple(int(v) for v in colour), outline=INK)
            draw.text((x + 24, y), name, fill=INK, font=font)
    return strip


def preview(predict, split, class_names, n=4):
    """image | ground truth | prediction for the first n validation images, under the columns' titles,
    scaled up (nearest) so that a tile is at least TILE pixels on its short side, above a legend of the class
    colours with their names. The tiles stand apart by GAP pixels of a grey that no class has (the truth and
    the prediction both paint the background black). predict: uint8 images (B, 3, H, W) -> class indices
    (B, H, W)."""
    colours = palette()
    rows = []
    with torch.no_grad():
        for i in range(min(n, len(split))):
            image, label = split.load(i)
            pred = predict(split[i][0][None])[0].cpu().numpy()
            k = max(1, math.ceil(TILE / min(image.shape[:2])))
            rows.append([tile.repeat(k, 0).repeat(k, 1) for tile in (image, colours[label], colours[pred])])
    widths = [max(row[c].shape[1] for row in rows) for c in range(3)]  # a column as wide as its widest tile
    lefts = [0, widths[0] + GAP, widths[0] + widths[1] + 2 * GAP]
    width = lefts[2] + widths[2]
    heights = [row[0].shape[0] for row in rows]
    picture = Image.new("RGB", (width, TITLE_BAND + sum(heights) + GAP * (len(rows) - 1)), GAP_COLOUR)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    draw.rectangle([0, 0, width - 1, TITLE_BAND - 1], fill=PAPER)
    for title, left, column in zip(TITLES, lefts, widths):
        draw.text((left + (column - draw.textlength(title, font=font)) / 2, 4), title, fill=INK, font=font)
    top = TITLE_BAND
    for row, height in zip(rows, heights):
        for tile, left in zip(row, lefts):
            picture.paste(Image.fromarray(tile), (left, top))
        top += height + GAP
    key = legend(class_names, colours, width)
    out = Image.new("RGB", (width, picture.height + key.height), PAPER)
    out.paste(picture, (0, 0))
    out.paste(key, (0, picture.height))
    return out


def curves(metrics_path, width=640, panel=150):
    """One panel per series of metrics.jsonl against the iteration: the teacher's mIoU (at evaluations),
    then each logged loss (at log intervals), each with its range written beside it."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    # a run without teacher evaluates its student
    evaluated = next((r["network"] for r in records if "network" in r), "teacher")
    series = {f"{evaluated} mIoU": [(r["iter"], r["miou"]) for r in records if "miou" in r]}
    logged = (k for r in records if "lr" in r for k in r if k not in ("iter", "lr", "seconds_per_iter"))
    for name in dict.fromkeys(logged):
        series[name] = [(r["iter"], r[name]) for r in records if name in r and "lr" in r]
    last = max((r["iter"] for r in records), default=1)
    font = ImageFont.load_default()
    left = 70  # pixels: the room for the range on the left
    pad = 16
    picture = Image.new("RGB", (width, panel * len(series)), PAPER)
    draw = ImageDraw.Draw(picture)
    for p, (name, points) in enumerate(series.items()):
        top, bottom, right = p * panel + pad, (p + 1) * panel - pad, width - pad
        draw.rectangle([left, top, right, bottom], outline=INK)
        draw.text((left + 6, top + 4), name, fill=INK, font=font)
        draw.text((left, bottom + 2), "0", fill=INK, font=font)
        draw.text((right - 40, bottom + 2), f"{last} it", fill=INK, font=font)
        if not points:
            continue
        values = [v for _, v in points]
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0
        draw.text((4, top), f"{hi:.4g}", fill=INK, font=font)
        draw.text((4, bottom - 10), f"{lo:.4g}", fill=INK, font=font)
        xy = [(left + (right - left) * it / last, bottom - (bottom - top) * (v - lo) / span)
              for it, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=(30, 90, 200), width=2)
        for x, y in xy[-1:] if not name.endswith(" mIoU") else xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 60, 30))
    return picture


def draw_run(run_dir, predict, split, class_names):
    """preview.png (predict: see preview) and curves.png of a run folder, each written atomically."""
    atomic_write(Path(run_dir) / "preview.png", preview(predict, split, class_names))
    atomic_write(Path(run_dir) / "curves.png", curves(Path(run_dir) / "metrics.jsonl"))
