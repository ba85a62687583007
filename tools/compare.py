"""Several runs in one picture: `python -m tools compare RUN... [--out PICTURE.png]`.

    python -m tools compare runs/train_baseline_demo_60_s* runs/train_cutmix_demo_60_s* --out demo.png

Draws each run's teacher mIoU at its evaluations against the iteration (its metrics.jsonl), one curve per
run (the runs of one method in shades of one colour, so that several seeds stay apart), with a legend naming
each run by its folder and its final numbers (results.json; an unfinished run: its last evaluation). Prints
the same numbers as a table, then the picture's path.
"""
import argparse
import colorsys
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from common import UserError
from cutmixseg.files import atomic_write
from cutmixseg.pictures import INK, PAPER
from tools.paper import METHOD_ORDER

HUES = dict(zip(METHOD_ORDER, (0.60, 0.33, 0.83, 0.12, 0.50, 0.02)))  # a colour per method: blue ... red
GRID = (225, 225, 225)
WIDTH = 800  # pixels: the picture
PLOT_HEIGHT = 360  # pixels: the plot, without its margins
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 30, 36  # pixels: the plot's margins
ROW = 16  # pixels per legend line


def read_run(folder):
    """{name, method, points [(iter, mIoU)], results or None} of a run folder; one line when it is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"compare: {folder}: no such run folder")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"compare: {folder}: no metrics.jsonl (a run folder has one from its first log)")
    evaluations = {}  # iter -> mIoU; a resumed run's repeated iterations: the last record wins
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else {}
            if isinstance(record, dict) and "miou" in record and "iter" in record:
                evaluations[int(record["iter"])] = float(record["miou"])
        except (ValueError, TypeError, OverflowError):  # a line cut by a killed run, or no numbers in it
            raise UserError(f"compare: {metrics}: line {number} is no JSON record of numbers")
    evaluations = {it: v for it, v in evaluations.items() if math.isfinite(v)}
    if not evaluations:
        raise UserError(f"compare: {metrics}: no evaluation yet (no record with \"miou\" and \"iter\")")
    results = None  # an unfinished run has none yet
    if (folder / "results.json").is_file():
        try:
            results = json.loads((folder / "results.json").read_text())
        except ValueError:
            results = None
        if not isinstance(results, dict) or not isinstance(results.get("miou"), (int, float)):
            raise UserError(f"compare: {folder / 'results.json'}: unreadable (expected a JSON object with "
                            f"\"miou\")")
    method = (results or {}).get("method") or folder.resolve().name.removeprefix("train_").split("_")[0]
    points = sorted(evaluations.items())  # [(iter, mIoU)]
    return dict(name=folder.resolve().name, method=method, points=points, results=results)


def final_numbers(run):
    """The legend's and the table's words: results.json's mIoU (ISIC: and the lesion IoU), the best evaluation
    when it beats the last one; an unfinished run's last evaluation."""
    if run["results"] is None:
        it, miou = run["points"][-1]
        return f"unfinished: mIoU {miou:.2f} at it {it}"
    r = run["results"]
    words = f"mIoU {r['miou']:.2f}" + (f", lesion IoU {r['lesion_iou']:.2f}" if "lesion_iou" in r else "")
    if isinstance(r.get("best_miou"), (int, float)) and r["best_miou"] > r["miou"]:
        words += f" (best {r['best_miou']:.2f} at it {r['best_miou_iter']})"
    return words + f", {r.get('iters', run['points'][-1][0])} it"


def colours(runs):
    """One colour per run: a hue per method, its runs from dark to light."""
    by_method = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    colour = {}
    for n, (method, group) in enumerate(by_method.items()):
        hue = HUES.get(method, (0.07 + 0.37 * n) % 1.0)  # a method outside METHOD_ORDER: a hue of its own
        for j, run in enumerate(group):  # dark to light
            lightness = 0.3 + 0.35 * j / (len(group) - 1) if len(group) > 1 else 0.42
            colour[id(run)] = tuple(round(255 * c) for c in colorsys.hls_to_rgb(hue, lightness, 0.75))
    return colour


def nice_step(span, ticks=6):
    """A round step (1, 2 or 5 times a power of ten) that cuts `span` into about `ticks` parts."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def draw(runs):
    """The picture: the curves over a grid, axes labelled, the legend below."""
    font = ImageFont.load_default()
    colour = colours(runs)
    values = [v for run in runs for _, v in run["points"]]
    y_step = nice_step(max(max(values) - min(values), 1.0))
    lo, hi = math.floor(min(values) / y_step) * y_step, math.ceil(max(values) / y_step) * y_step
    hi = hi if hi > lo else lo + y_step
    last = max(1, max(it for run in runs for it, _ in run["points"]))
    x_step = max(1, round(nice_step(last)))  # whole iterations
    height = TOP + PLOT_HEIGHT + BOTTOM + ROW * len(runs) + 8
    picture = Image.new("RGB", (WIDTH, height), PAPER)
    pen = ImageDraw.Draw(picture)
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP, TOP + PLOT_HEIGHT

    def x_of(it):
        return left + (right - left) * it / last

    def y_of(v):
        return bottom - (bottom - top) * (v - lo) / (hi - lo)
    pen.text((left, 8), "teacher mIoU (%) at each evaluation", fill=INK, font=font)
    for k in range(round((hi - lo) / y_step) + 1):  # horizontal grid lines, labelled on the left
        v = lo + k * y_step
        label = f"{v:.4g}"
        pen.line([(left, y_of(v)), (right, y_of(v))], fill=GRID)
        pen.text((left - 6 - pen.textlength(label, font=font), y_of(v) - 6), label, fill=INK, font=font)
    for it in range(0, last + 1, x_step):  # vertical grid lines, labelled below
        pen.line([(x_of(it), top), (x_of(it), bottom)], fill=GRID)
        label_left = x_of(it) - pen.textlength(str(it), font=font) / 2
        pen.text((label_left, bottom + 4), str(it), fill=INK, font=font)
    pen.text((right - pen.textlength("iteration", font=font), bottom + 18), "iteration", fill=INK, font=font)
    pen.rectangle([left, top, right, bottom], outline=INK)
    for run in runs:
        xy = [(x_of(it), y_of(v)) for it, v in run["points"]]
        if len(xy) > 1:
            pen.line(xy, fill=colour[id(run)], width=2)
        for x, y in xy:
            pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour[id(run)])
    for row, run in enumerate(runs):  # the legend: swatch, folder name, final numbers
        y = bottom + BOTTOM + row * ROW
        pen.rectangle([left, y + 2, left + 20, y + 11], fill=colour[id(run)])
        pen.text((left + 28, y), f"{run['name']}: {final_numbers(run)}", fill=INK, font=font)
    return picture


def main(command, argv):
    parser = argparse.ArgumentParser(prog="python -m tools compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (metrics.jsonl, results.json)")
    parser.add_argument("--out", default="compare.png", help="the picture, a .png (default: %(default)s)")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise UserError(f"compare: --out {out}: expected a .png file to write")
    runs = [read_run(folder) for folder in opts.runs]
    if len({run["name"] for run in runs}) < len(runs):  # folders of one name in other places: their paths
        for run, folder in zip(runs, opts.runs):
            run["name"] = folder
    atomic_write(out, draw(runs))
    print("| run | method | final |\n|---|---|---|")
    for run in runs:
        print(f"| {run['name']} | {run['method']} | {final_numbers(run)} |")
    print(f"picture: {out}")
