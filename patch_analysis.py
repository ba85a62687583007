"""No low-density regions at class boundaries: patch distances in a segmentation data set (French et al.,
BMVC 2020, Sec. 3.1, Fig. 1, Fig. 2, App. B; the original's patch_dist.py and
intra_inter_class_patch_dist.py, with their two notebooks).

Figure 1: for one training image, the mean L2 distance between the P×P patch centred on each pixel and
the four patches centred on its neighbours. Patches one pixel apart differ by a patch of the image
gradient, so (App. B.1), e.g. for the west neighbour,

    d_west(p) = sqrt( (1^{P×P} * Σ_channels (Δ_x I)²)(p) )        (* = box filter)

A box filter is a low-pass filter: for P = 225 the map is smooth and ignores the class boundaries (red):
nothing marks them as a low-density region. Darker = larger distance.

Figure 2: anchors A centred on a pixel next to a class boundary, negatives N centred on the neighbour across
it, positives P = the nearest patch of A's class centred in any *other* training image (exact sliding-window
search, ‖P − A‖² = ‖P‖² + ‖A‖² − 2⟨P, A⟩ with the cross term by FFT, on the GPU when
present). The histogram of |N − A| / |P − A| (plain L2, as the original's notebook) sits near 1/3 on
Cityscapes: the neighbour across the boundary is ~3× closer than the best match in another image.

Run:   python patch_analysis.py                                   demo data, about 3 minutes on 2 CPU cores
       python patch_analysis.py --dataset cityscapes --data-root DATA --n-anchors 1000   (the paper's run)
Out:   --out (runs/patch_analysis_<dataset>): figure1.png, figure1_image.png, figure1_patch_dist_<P>.png,
       figure2_ratio_histogram.png, results.json (median_ratio, ...)
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
from common import UserError, arg
from cutmixseg import guard

NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # west, east, north, south as (d_row, d_col)


@dataclass
class Args:
    dataset: str = arg("demo", "dataset, as for the training scripts", choices=list(common.DATASETS))
    data_root: str = arg(None, "folder holding the dataset (default: $CITYSCAPES_DATASET for cityscapes, "
                               "then data/<dataset>; folder needs it)")
    num_classes: int = arg(None, "class count for --dataset folder (default: from the masks)")
    out: str = arg(None, "output folder (default: runs/patch_analysis_<dataset>)")
    image_index: int = arg(0, "Figure 1: index of the training image shown")
    patch_sizes: str = arg("15,225", "Figure 1: patch sizes (odd), comma-separated")
    patch_size: int = arg(225, "Figure 2: patch size (odd)")
    n_anchors: int = arg(200, "Figure 2: anchor/negative pairs drawn from all class-boundary pixels "
                              "(paper: 1000)")
    max_images: int = arg(-1, "Figure 2: training images used, a random subset; -1 = all")
    seed: int = arg(12345, "seed of the anchor choice and of the image subset")
    device: str = arg("auto", "auto (CUDA when present), cpu, cuda, cuda:N")


# ---------------------------------------------------------------------------------------------------
# Patch arithmetic: symmetric padding, box sums, neighbour distance maps
# ---------------------------------------------------------------------------------------------------
def symmetric_pad(image, pad):
    """(H, W, ...) tensor padded by `pad` on each side with mirrored content, edge pixel repeated
    (numpy's 'symmetric'); pads wider than the image mirror again, so any patch fits any image."""
    rows = torch.from_numpy(np.pad(np.arange(image.shape[0]), pad, mode="symmetric")).to(image.device)
    cols = torch.from_numpy(np.pad(np.arange(image.shape[1]), pad, mode="symmetric")).to(image.device)
    return image[rows][:, cols]


def box_sum(x, size):
    """Sums of every size×size window of a (H, W) tensor -> (H - size + 1, W - size + 1), by cumulative
    sums in float64 (exact enough for the 225² = 50,625-pixel windows)."""
    s = torch.nn.functional.pad(x.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    return s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]


def neighbour_distance_map(image, size):
    """(H, W, C) float image -> (H, W) mean L2 distance from the size×size patch at each pixel to the
    patches at its four neighbours (patch_dist.py: symmetric padding, then box sums of squared
    one-pixel differences summed over channels)."""
    pad = size // 2
    x = symmetric_pad(image.double(), pad + 1)
    centre = x[1:-1, 1:-1]
    total = 0
    for dr, dc in NEIGHBOURS:
        shifted = x[1 + dr:x.shape[0] - 1 + dr, 1 + dc:x.shape[1] - 1 + dc]
        total = total + box_sum((shifted - centre).pow(2).sum(-1), size).clamp(min=0).sqrt()
    return total / 4


def extract_patch(padded, pad, row, col):
    """The (2·pad + 1)² patch centred on pixel (row, col) of the image that `padded` pads by `pad`."""
    return padded[row:row + 2 * pad + 1, col:col + 2 * pad + 1]


# ---------------------------------------------------------------------------------------------------
# Figure 2: anchors at class boundaries and the exact nearest-patch search
# ---------------------------------------------------------------------------------------------------
def boundary_pairs(label, pad):
    """(K, 4) int64 rows [direction, row, col, class]: pixels whose 4-neighbour in `direction` has another
    class, neither void. As the original, both patches must lie inside the image; along an axis too
    short for that (shorter than the patch + 2) every position is kept and patches hold mirrored content."""
    H, W = label.shape
    lo_r, hi_r = (pad + 1, H - pad - 2) if H >= 2 * pad + 3 else (0, H - 1)
    lo_c, hi_c = (pad + 1, W - pad - 2) if W >= 2 * pad + 3 else (0, W - 1)
    rows, cols = np.mgrid[0:H, 0:W]
    out = []
    for d, (dr, dc) in enumerate(NEIGHBOURS):
        nr, nc = rows + dr, cols + dc
        ok = (nr >= 0) & (nr < H) & (nc >= 0) & (nc < W)
        ok &= (rows >= lo_r) & (rows <= hi_r) & (cols >= lo_c) & (cols <= hi_c)
        other = label[nr.clip(0, H - 1), nc.clip(0, W - 1)]
        ok &= (label != common.IGNORE) & (other != common.IGNORE) & (other != label)
        r, c = np.nonzero(ok)
        out.append(np.stack([np.full_like(r, d), r, c, label[r, c]], 1))
    return np.concatenate(out).astype(np.int64)


def choose_anchors(split, images, pad, n_anchors, seed):
    """n_anchors (image, direction, row, col, class) drawn uniformly from all boundary pairs of `images`.

    Two passes over the labels keep memory small: count the pairs per image, draw global indices, then
    look the chosen ones up (Cityscapes holds tens of millions of pairs)."""
    counts = np.array([len(boundary_pairs(split.load(i)[1], pad))
                       for i in tqdm(images, desc="boundaries", leave=False)])
    if counts.sum() == 0:
        raise UserError("no class boundary between two non-void classes in the training images used")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(counts.sum(), min(n_anchors, counts.sum()), replace=False))
    owner = np.searchsorted(np.cumsum(counts), chosen, side="right")  # position in `images`
    rows = []
    for k in np.unique(owner):
        pairs = boundary_pairs(split.load(images[k])[1], pad)
        local = chosen[owner == k] - (np.cumsum(counts)[k] - counts[k])
        rows.append(np.concatenate([np.full((len(local), 1), images[k]), pairs[local]], 1))
    return np.concatenate(rows)  # (n, 5) [image, direction, row, col, class]


def to_float(image, device):
    """uint8 (H, W, 3) -> float32 in [-0.5, 0.5] on the device. Distances do not change under a shift,
    and centring shrinks ‖P‖² and ⟨P, A⟩, so their float32 difference loses fewer digits."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).float() / 255 - 0.5


def nearest_patches(split, images, anchors, anchor_patches, fft_size, device, chunk):
    """For each anchor: the smallest ‖P − A‖ over patches centred on a pixel of its class in any image
    of `images` but its own, and where (image, row, col). Exact: every pixel of every image is a candidate."""
    n = len(anchors)
    size = anchor_patches.shape[1]  # P
    pad = size // 2
    best = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    where = np.full((n, 3), -1, dtype=np.int64)
    a_sq = anchor_patches.double().pow(2).sum((1, 2, 3))  # (n,) ‖A‖²
    classes = torch.from_numpy(anchors[:, 4]).to(device)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        # the correlation with A is a product of spectra; A sits in the top-left corner of the FFT grid
        kernels = anchor_patches[sl].permute(0, 3, 1, 2)  # (k, C, P, P)
        a_spec = torch.fft.rfft2(kernels, s=fft_size).conj()
        for i in tqdm(images, desc=f"search {start + 1}-{min(n, start + chunk)}/{n}", leave=False):
            image, label = split.load(i)
            H, W = label.shape
            padded = symmetric_pad(to_float(image, device), pad)  # (H + P - 1, W + P - 1, C)
            p_sq = box_sum(padded.pow(2).sum(-1), size)  # (H, W) ‖P‖² for the patch at each pixel
            spec = torch.fft.rfft2(padded.permute(2, 0, 1), s=fft_size)  # (C, *fft_size)
            # (k, H, W) ⟨P, A⟩ for the patch at each pixel
            cross = torch.fft.irfft2((spec[None] * a_spec).sum(1), s=fft_size)[:, :H, :W]
            d_sq = p_sq[None] + a_sq[sl, None, None] - 2 * cross.double()
            label_t = torch.from_numpy(label).to(device)
            d_sq = d_sq.masked_fill(label_t[None] != classes[sl, None, None], math.inf)
            own = torch.from_numpy(anchors[sl, 0] == i).to(device)  # the anchors taken from this image
            d_sq[own] = math.inf  # never the anchor's own image
            value, index = d_sq.flatten(1).min(1)
            better = (value < best[sl]).cpu().numpy()
            best[sl] = torch.minimum(best[sl], value)
            idx = index.cpu().numpy()
            located = np.stack([np.full_like(idx, i), idx // W, idx % W], 1)  # (k, 3) image, row, col
            where[start:start + len(idx)][better] = located[better]
    return best.clamp(min=0).sqrt().cpu().numpy(), where


# ---------------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ---------------------------------------------------------------------------------------------------
# matplotlib's 'Blues' (ColorBrewer, 9 steps), interpolated linearly: light = small, dark = large
BLUES = np.array([[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
                  [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]], np.float64)


def blues(values):
    t = np.clip(values, 0, 1) * (len(BLUES) - 1)
    lo = np.floor(t).astype(int).clip(0, len(BLUES) - 2)
    return BLUES[lo] + (BLUES[lo + 1] - BLUES[lo]) * (t - lo)[..., None]


def label_edges(label):
    """Pixels where the label changes to the right or below (any change, void included)."""
    e = np.zeros(label.shape, bool)
    e[:, :-1] |= label[:, 1:] != label[:, :-1]
    e[:-1, :] |= label[1:, :] != label[:-1, :]
    return e


def with_boundaries(rgb, label):
    """Red class boundaries at alpha 0.75 over an (H, W, 3) float RGB image -> uint8."""
    alpha = 0.75 * label_edges(label)[..., None]
    return (rgb * (1 - alpha) + np.array([255, 0, 0]) * alpha).clip(0, 255).astype(np.uint8)


def enlarge(image, min_side=256):
    """Nearest-neighbour enlargement so that small images (demo: 48 px) stay visible."""
    factor = max(1, math.ceil(min_side / min(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, 0), factor, 1)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def side_by_side(images, captions):
    head = 30  # pixels above the images, for their captions
    gap = 8  # pixels between two images
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    sheet = Image.new("RGB", (width, head + max(im.shape[0] for im in images)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for im, caption in zip(images, captions):
        draw.text((x + 2, 6), caption, fill="black", font=font(15))
        sheet.paste(Image.fromarray(im), (x, head))
        x += im.shape[1] + gap
    return sheet


def histogram_png(ratios, median, title, bins=50, width=640, height=340):
    """A bar histogram with axes, ticks, labels and the median as a dashed red line."""
    counts, edges = np.histogram(ratios, bins=bins)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    f = font(13)
    left, right, top, bottom = 60, width - 20, 35, height - 55
    x_of = lambda v: left + (v - edges[0]) / max(edges[-1] - edges[0], 1e-12) * (right - left)
    y_of = lambda c: bottom - c / max(counts.max(), 1) * (bottom - top)
    for c, e0, e1 in zip(counts, edges[:-1], edges[1:]):
        draw.rectangle([x_of(e0), y_of(c), max(x_of(e1) - 1, x_of(e0)), bottom], fill=(31, 119, 180))
    draw.line([left, bottom, right, bottom], fill="black")
    draw.line([left, top, left, bottom], fill="black")
    for v in np.linspace(edges[0], edges[-1], 6):
        draw.line([x_of(v), bottom, x_of(v), bottom + 4], fill="black")
        draw.text((x_of(v) - 12, bottom + 6), f"{v:.2f}", fill="black", font=f)
    for c in np.linspace(0, counts.max(), 5):
        draw.line([left - 4, y_of(c), left, y_of(c)], fill="black")
        draw.text((left - 34, y_of(c) - 7), f"{c:.0f}", fill="black", font=f)
    for y in range(top, bottom, 8):
        draw.line([x_of(median), y, x_of(median), y + 4], fill=(214, 39, 40), width=2)
    draw.text((x_of(median) + 5, top), f"median {median:.3f}", fill=(214, 39, 40), font=f)
    draw.text((width // 2 - 80, 10), title, fill="black", font=font(15))
    draw.text((left + 40, height - 25), "Distance ratio - inter-class dist : intra-class dist", fill="black",
              font=f)
    return image


# ---------------------------------------------------------------------------------------------------
# Command line and main
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    args = Args(**common.command_line(Args, argv))
    common.check_limits(args)  # --seed, --n-anchors
    try:
        args.patch_sizes = [int(v) for v in args.patch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--patch-sizes expects odd numbers separated by commas, got {args.patch_sizes!r}")
    for size in args.patch_sizes + [args.patch_size]:
        if size < 1 or size % 2 == 0:
            raise UserError(f"--patch-size(s): patches need an odd size (a centre pixel), got {size}")
    if args.max_images == 0 or args.max_images < -1 or args.max_images == 1:
        raise UserError(f"--max-images must be -1 (all) or at least 2 (positives come from other images), "
                        f"got {args.max_images}")
    return args


def main(args):
    device = common.resolve_device(args.device)
    out = Path(args.out or f"runs/patch_analysis_{args.dataset}")
    guard.fresh_folder(out, create=False)  # checked first: an earlier run's folder, or a file, is refused
    train = common.load_dataset(args.dataset, args.data_root, num_classes=args.num_classes).train
    if not 0 <= args.image_index < len(train):
        raise UserError(f"--image-index {args.image_index}: the training set has {len(train)} images")
    started = time.perf_counter()
    results = {}
    files = {}

    # --- Figure 1: neighbour-patch distance maps of one image --------------------------------------
    image, label = train.load(args.image_index)
    shown, captions = [enlarge(image)], ["image"]
    files["figure1_image.png"] = shown[0]
    edge = label_edges(label)
    for size in args.patch_sizes:
        dist = neighbour_distance_map(to_float(image, device), size).cpu().numpy()
        picture = enlarge(with_boundaries(blues(dist / max(dist.max(), 1e-12)), label))
        files[f"figure1_patch_dist_{size}.png"] = picture
        shown.append(picture)
        captions.append(f"{size}x{size} patches")
        # a low-density boundary would show up as larger distances on the boundary than elsewhere
        ratio = float(dist[edge].mean() / dist.mean()) if edge.any() else None
        results[f"boundary_to_mean_distance_{size}"] = ratio
        print(f"figure 1, {size}x{size}: mean distance {dist.mean():.3f}, on class boundaries "
              f"{dist[edge].mean() if edge.any() else float('nan'):.3f}")
    files["figure1.png"] = side_by_side(shown, captions)

    # --- Figure 2: inter-class (neighbour across the boundary) vs intra-class (other image) distance -------
    n = len(train)
    if args.max_images == -1 or args.max_images >= n:
        images = np.arange(n)
    else:  # a random subset
        images = np.sort(np.random.RandomState(args.seed).permutation(n)[:args.max_images])
    pad = args.patch_size // 2
    anchors = choose_anchors(train, images, pad, args.n_anchors, args.seed)
    a_patches, n_patches = [], []  # the anchors' and the negatives' patches
    loaded = None  # the image that `padded` holds
    for img, d, r, c, _ in anchors:  # sorted by image: each image is loaded and padded once
        if img != loaded:
            padded = symmetric_pad(to_float(train.load(img)[0], device), pad)
            loaded = img
        a_patches.append(extract_patch(padded, pad, r, c))
        n_patches.append(extract_patch(padded, pad, r + NEIGHBOURS[d][0], c + NEIGHBOURS[d][1]))
    a_patches, n_patches = torch.stack(a_patches), torch.stack(n_patches)  # (n, P, P, C)
    inter = (n_patches.double() - a_patches.double()).flatten(1).norm(dim=1).cpu().numpy()
    sizes = np.array([train.sizes[i] for i in images])
    fft_size = tuple(int(v) for v in sizes.max(0) + args.patch_size - 1)
    # anchors per FFT batch: their spectra, products and distance maps (~64 bytes per frequency) in ~1 GB
    chunk = max(1, 2**30 // (64 * fft_size[0] * (fft_size[1] // 2 + 1)))
    t0 = time.perf_counter()
    intra, where = nearest_patches(train, images, anchors, a_patches, fft_size, device, chunk)
    search_seconds = time.perf_counter() - t0
    found = np.isfinite(intra) & (intra > 0)
    ratios = inter[found] / intra[found]
    if len(ratios) == 0:
        raise UserError("no anchor has a patch of its class in another image; use more --max-images")
    median = float(np.median(ratios))
    title = (f"{args.dataset} training set ({len(ratios)} anchors, "
             f"{args.patch_size}x{args.patch_size} patches)")
    files["figure2_ratio_histogram.png"] = histogram_png(ratios, median, title)
    results.update(median_ratio=median, mean_ratio=float(ratios.mean()), n_anchors=int(len(ratios)),
                   n_anchors_without_positive=int((~found).sum()), n_images=int(len(images)),
                   patch_size=args.patch_size, median_inter_class_distance=float(np.median(inter[found])),
                   median_intra_class_distance=float(np.median(intra[found])),
                   seconds_per_image_anchor=search_seconds / (len(images) * len(anchors)),
                   seconds=time.perf_counter() - started, device=str(device))
    for name, content in files.items():
        common.atomic_write(out / name, content)
    common.atomic_write(out / "results.json", json.dumps(results, indent=2))
    print(f"figure 2: {len(ratios)} anchors from {len(images)} images, patch {args.patch_size}: median "
          f"|N-A|/|P-A| = {median:.3f} (search {search_seconds:.1f} s, "
          f"{1e3 * results['seconds_per_image_anchor']:.2f} ms per image and anchor)")
    print(f"median_ratio={median:.4f}; figures and results.json in {out}")
    return results


if __name__ == "__main__":
    main(parse_args())
