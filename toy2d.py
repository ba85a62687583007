"""2D toy: consistency regularization with and without low-density regions (French et al., BMVC 2020,
Sec. 3.2, Fig. 3, App. C; the original's toy2d_train.py and run_toy2d_experiments.sh).

Two classes in [-1, 1]², split by a wavy S-bending curve (class 1 left of it); 10 labeled points, 5 per
class; a dense cloud of unlabeled points; an MLP trained with a mean teacher g_φ (EMA of the student f_θ):

    L = CE(f_θ(x_l), y_l) + γ · Σ_i c_i w_i · mean_classes (f_θ(x̂_i) − g_φ(x_i))² / Σ_i w_i

    x̂ = x + N(0, σ²)
    c_i = 1 where the teacher's confidence reaches τ = 0.97 (per sample, as the original's toy)
    w_i = 1, or in the constrained run 1 only where x̂ stays within 4 px of x's distance contour

Experiments (panels of Fig. 3; same labeled points, seeds and schedule; settings as the original's scripts):
    a_supervised          gap of 2×35 px around the boundary, γ = 0       (dotted orange line in panel a)
    a_gap_isotropic       gap, isotropic σ = 6 px          cluster settings: BatchNorm, dropout, loss on
                                                           probabilities, γ = 10
    b_no_gap_isotropic    no gap, isotropic σ = 30 px      continuous settings: no norm layer, no dropout in
    d_no_gap_constrained  no gap, σ = 30 px on the contour the consistency path, loss on logits, γ = 1
    (panel c: the signed distance to the true boundary and its contours)

Run:   python toy2d.py            3 seeds × 4 experiments, 1600 steps each, a quarter of the unlabeled points
                                  (about 8 minutes on a 2-core CPU)
       python toy2d.py --full     the original's schedule: 100 epochs over all 512² points (25 supervised)
Out:   --out (runs/toy2d): a_gap_isotropic.png, b_no_gap_isotropic.png, c_distance_contours.png,
       d_no_gap_constrained.png, figure3.png (all four), results.json (teacher error %, mean of the seeds),
       log.txt
"""
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
from common import UserError, arg
from cutmixseg import guard

SIZE = 512  # the original's image: 512×512 pixels spanning [-1, 1]², so 1 px = 2/512
# the original toy2d_train.py's settings
WIDTH = 512  # hidden units per layer
LR = 2e-4  # Adam's learning rate
TEACHER_ALPHA = 0.99  # α of the teacher's EMA
CONF_THRESH = 0.97  # τ
BATCH = 512
# gap: erosion radius (px) of each class region; cons_dropout: dropout in the consistency path; sigma (px)
CLUSTER = dict(gap=35, norm="batch_norm", cons_dropout=True, loss="var", cons_weight=10.0, sigma=6.0,
               contour=0.0)
CONTINUOUS = dict(gap=0, norm="none", cons_dropout=False, loss="logits_var", cons_weight=1.0, sigma=30.0,
                  contour=0.0)
EXPERIMENTS = {  # the original's run_toy2d_experiments.sh; Fig. 3b (no script line) = 3d without the contour
    "a_supervised": dict(CLUSTER, cons_weight=0.0, full_epochs=25),
    "a_gap_isotropic": dict(CLUSTER, full_epochs=100),
    "b_no_gap_isotropic": dict(CONTINUOUS, full_epochs=100),
    "d_no_gap_constrained": dict(CONTINUOUS, contour=4.0, full_epochs=100),
}


@dataclass
class Args:
    out: str = arg("runs/toy2d", "output folder (figures and results.json at its top level)")
    seed: int = arg(1, "first seed: network initialisation, batches, perturbations, unlabeled jitter")
    seeds: int = arg(3, "seeds per experiment (--seed, --seed+1, ...); error rates are their mean")
    split_seed: int = arg(12345, "seed of the 10 labeled points, shared by every experiment and seed")
    steps: int = arg(1600, "optimizer steps of every run (ignored with --full)")
    unlabeled_share: float = arg(0.25, "share of the one-point-per-pixel unlabeled cloud kept "
                                       "(1 with --full)")
    grid: int = arg(256, "side of the evaluation grid of pixel centres over [-1, 1]² (512 with --full)")
    full: bool = arg(False, "the paper's schedule: 100 epochs of batch 512 over all points, "
                            "25 for a_supervised")
    device: str = arg("auto", "auto (CUDA when present), cpu, cuda, cuda:N")


# ---------------------------------------------------------------------------------------------------
# Data: the true boundary, the low-density gap, the signed distance to the boundary
# ---------------------------------------------------------------------------------------------------
def boundary_x(y):
    """The true boundary x = b(y): roughly vertical, with three S-bends (stands in for the original's
    hand-drawn curve_mask_v3.png, which the kit does not ship). Class 1 lies left of it."""
    t = (y + 1) / 2
    return -0.04 + 0.30 * np.sin(2 * np.pi * 1.6 * t + 0.6) + 0.10 * np.sin(2 * np.pi * 3.3 * t + 1.9)


def true_class(points):
    """(N, 2) points as (x, y) in [-1, 1] -> (N,) int64 class, 1 left of the boundary."""
    return (points[:, 0] < boundary_x(points[:, 1])).astype(np.int64)


def pixel_centres(size):
    """(size², 2) centres of a size×size grid over [-1, 1]², row-major, as (x, y)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], 1).astype(np.float32)


def erode(region, radius):
    """Binary erosion by the 4-neighbour cross, `radius` times (scipy's binary_erosion(iterations=r)).

    Outside the image counts as outside the region (scipy's border_value=0), so the gap run's clusters
    also keep `radius` px away from the image border, as in the original's data."""
    for _ in range(radius):
        p = np.pad(region, 1)
        region = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return region


def signed_distance(mask):
    """Exact Euclidean distance (px) from each pixel to the nearest pixel of the other class: positive in
    class 1, negative in class 0 (the original: scipy's distance_transform_edt on each class).

    The nearest other-class pixel always has a 4-neighbour in this class (a step towards the query
    pixel would otherwise find a nearer one), so a brute-force search over those edge pixels is exact."""
    H, W = mask.shape
    yx = torch.from_numpy(np.stack(np.mgrid[0:H, 0:W], -1).reshape(-1, 2)).double()
    out = torch.zeros(H * W, dtype=torch.float64)
    for cls, sign in ((1, 1.0), (0, -1.0)):
        inside = mask == cls
        p = np.pad(inside, 1)
        touches = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        targets = yx[torch.from_numpy((~inside & touches).ravel())]  # (K, 2) edge pixels of the other class
        queries = torch.from_numpy(inside.ravel()).nonzero()[:, 0]
        if len(targets) == 0:
            continue
        for chunk in queries.split(8192):
            d = torch.cdist(yx[chunk], targets, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
            out[chunk] = sign * d
    return out.view(H, W).numpy()


@dataclass
class Toy:
    mask: np.ndarray          # (SIZE, SIZE) true class per pixel
    dist: np.ndarray          # (SIZE, SIZE) signed distance to the boundary, px
    x_l: np.ndarray           # (10, 2) labeled points
    y_l: np.ndarray           # (10,)


def make_toy(split_seed, near=90):
    """The true class map, its signed distance map and the 10 labeled points.

    As the original's curve_mask_v3_35.pkl, the labeled points come from the gap data (outside the 35 px
    erosion) with 6 px of jitter, and every run shares them. The original drew them at random; here each
    class gets one point per fifth of the curve's height, at most `near` px from it, as a person marking
    both sides of the curve would: points far from a stretch of the curve leave its side undecided for
    much longer than the short default schedule."""
    mask = true_class(pixel_centres(SIZE)).reshape(SIZE, SIZE)
    dist = signed_distance(mask)
    rng = np.random.RandomState(split_seed)
    x_l, y_l = [], []
    for cls in (0, 1):
        rows, cols = np.nonzero(erode(mask == cls, CLUSTER["gap"]) & (np.abs(dist) <= near))
        band = (rows - rows.min()) * 5 // (rows.max() + 1 - rows.min())  # fifths of the height
        pick = [rng.choice(np.flatnonzero(band == b)) for b in range(5)]
        x_l.append(np.stack([cols[pick], rows[pick]], 1) + 0.5 + rng.normal(0, 6.0, (5, 2)))
        y_l += [cls] * 5
    x_l = np.concatenate(x_l) / SIZE * 2 - 1
    return Toy(mask, dist, x_l.astype(np.float32), np.array(y_l))


def unlabeled_points(toy, gap, share, rng):
    """One point per pixel of the (eroded) class regions, a random `share` kept (at least 2: an
    unlabeled batch of one point gives BatchNorm no statistics), jittered by 2 px (the original's
    default img_noise_std)."""
    keep = erode(toy.mask == 0, gap) | erode(toy.mask == 1, gap) if gap else np.ones_like(toy.mask)
    rows, cols = np.nonzero(keep)
    pick = rng.permutation(len(rows))[:max(2, round(share * len(rows)))]
    px = np.stack([cols[pick], rows[pick]], 1) + 0.5 + rng.normal(0, 2.0, (len(pick), 2))
    return (px / SIZE * 2 - 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Network and training
# ---------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """3 × [Linear(·, 512) → BatchNorm or nothing → ReLU], Dropout(0.5), Linear(512, 2): the original's
    toy MLP (App. C mentions neither BatchNorm nor dropout)."""

    def __init__(self, norm):
        super().__init__()
        layers = []
        width = 2  # the input: (x, y)
        for _ in range(3):
            norm_layer = [nn.BatchNorm1d(WIDTH)] if norm == "batch_norm" else []
            layers = layers + [nn.Linear(width, WIDTH), *norm_layer, nn.ReLU()]
            width = WIDTH
        self.hidden = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.5)
        self.final = nn.Linear(WIDTH, 2)

    def forward(self, x, dropout=True, copies=None):
        h = self.hidden(x) if copies is None else self.hidden(x)[copies]  # (len(copies), WIDTH)
        return self.final(self.drop(h) if dropout else h)


def sample_map(dist_map, points):
    """Bilinear look-up of a (1, 1, SIZE, SIZE) map at (N, 2) points in [-1, 1]² -> (N,)."""
    return F.grid_sample(dist_map, points.view(1, 1, -1, 2), align_corners=False).view(-1)


def consistency_loss(logits_s, logits_t, contour_w, exp, conf_thresh=CONF_THRESH):
    """Σ_i c_i w_i · mean_classes(d_i²) / Σ_i w_i with d = difference of probabilities ("var") or logits
    ("logits_var"); returns (loss, share of confident teacher predictions)."""
    p_s, p_t = logits_s.softmax(1), logits_t.softmax(1)
    conf_weight = (p_t.amax(1) >= conf_thresh).float()  # (B,) per sample, not averaged (toy only)
    d = (p_s - p_t) if exp["loss"] == "var" else (logits_s - logits_t)
    loss = (d.pow(2).mean(1) * conf_weight * contour_w).sum() / contour_w.sum().clamp(min=1)
    return loss, conf_weight.mean()


def train(exp, toy, x_u, steps, seed, device):
    """Train one student/teacher pair; returns the teacher (eval mode) and the mean of
    [supervised loss, consistency loss, confident share, accepted share] over the steps."""
    torch.manual_seed(seed)  # initialisation and dropout
    gen = torch.Generator(device).manual_seed(seed)  # batches and perturbations
    student = MLP(exp["norm"]).to(device)
    teacher = common.make_teacher(student)
    ema = common.ema_pairs(teacher, student)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    x_l, y_l = torch.from_numpy(toy.x_l).to(device), torch.from_numpy(toy.y_l).to(device)
    x_u = torch.from_numpy(x_u).to(device)
    dist_map = torch.from_numpy(toy.dist).float().to(device)[None, None]
    sigma = exp["sigma"] / SIZE * 2  # σ is given in pixels of the 512×512 image
    # both in train mode, as the original: BN batch statistics and dropout in the teacher
    student.train()
    teacher.train()
    order = torch.randperm(len(x_u), generator=gen, device=device)  # a pass over the unlabeled points
    pos = 0  # the next batch's start in `order`
    sums = torch.zeros(4, device=device)  # of the logged means
    for _ in range(steps):
        # 1. supervised loss; the labeled stream repeats shuffles of the 10 points (~51 copies per batch)
        n_shuffles = -(-BATCH // len(x_l))  # enough for one batch
        shuffles = [torch.randperm(len(x_l), generator=gen, device=device) for _ in range(n_shuffles)]
        idx_l = torch.cat(shuffles)[:BATCH]
        # without BatchNorm, copies of a point share their hidden features: compute them once per point
        # (dropout still draws a mask per copy); with it, batch statistics need the whole batch
        logits_l = student(x_l, copies=idx_l) if exp["norm"] == "none" else student(x_l[idx_l])
        loss_sup = F.cross_entropy(logits_l, y_l[idx_l])
        loss_cons = conf = accepted = torch.zeros((), device=device)
        if exp["cons_weight"] > 0:
            # 2. the teacher sees x, the student the perturbed x̂
            if pos + BATCH > len(order):  # a new pass over the unlabeled points
                order = torch.randperm(len(x_u), generator=gen, device=device)
                pos = 0
            x = x_u[order[pos:pos + BATCH]]  # (BATCH, 2)
            pos += BATCH
            x_hat = x + sigma * torch.randn(x.shape, generator=gen, device=device)
            with torch.no_grad():
                logits_t = teacher(x, dropout=exp["cons_dropout"])
            logits_s = student(x_hat, dropout=exp["cons_dropout"])
            # 3. constrained run: only perturbations that stay on x's distance contour count
            contour_w = torch.ones(len(x), device=device)
            if exp["contour"] > 0:
                change = sample_map(dist_map, x_hat) - sample_map(dist_map, x)  # (BATCH,) px
                contour_w = (change.abs() <= exp["contour"]).float()
            # 4. confidence-masked squared difference
            loss_cons, conf = consistency_loss(logits_s, logits_t, contour_w, exp)
            accepted = contour_w.mean()
        # 5. one step, then the teacher follows the student by EMA
        optimizer.zero_grad(set_to_none=True)
        (loss_sup + exp["cons_weight"] * loss_cons).backward()
        optimizer.step()
        common.ema_update(ema, TEACHER_ALPHA)
        sums += torch.stack([loss_sup.detach(), loss_cons.detach(), conf, accepted])
    teacher.eval()
    return teacher, (sums / max(steps, 1)).tolist()


@torch.no_grad()
def predict(net, points, device):
    """P(class 1) of `net` (eval mode) at (N, 2) points."""
    out = [net(chunk.to(device)).softmax(1)[:, 1].cpu() for chunk in torch.from_numpy(points).split(16384)]
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------------
# Pictures (Pillow only): background 1 - density, green P(class 1), magenta true boundary, labeled circles
# ---------------------------------------------------------------------------------------------------
def upsample(values, size):
    """(g, g) map -> (size, size), bilinear (the evaluation grid may be coarser than the picture)."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def edges(classes):
    """Both pixels of every horizontally or vertically adjacent pair whose classes differ (a 2 px line)."""
    h, v = classes[:, 1:] != classes[:, :-1], classes[1:, :] != classes[:-1, :]
    e = np.zeros(classes.shape, bool)
    e[:, :-1] |= h
    e[:, 1:] |= h
    e[:-1, :] |= v
    e[1:, :] |= v
    return e


def blend(vis, colour, alpha):
    return vis + (np.array(colour, np.float32) - vis) * alpha[..., None]


def density_background(points, share):
    """1 - 0.75^(points per pixel): darker = denser (the original's rendering), scaled back to the full
    one-point-per-pixel cloud when only a share of it is used."""
    px = np.clip(((points + 1) / 2 * SIZE).astype(int), 0, SIZE - 1)
    count = np.bincount(px[:, 1] * SIZE + px[:, 0], minlength=SIZE * SIZE).reshape(SIZE, SIZE)
    return np.repeat((0.75 ** (count / share))[..., None], 3, 2).astype(np.float32)


def finish(vis, toy, dotted=None):
    """Magenta true boundary, optional dotted orange boundary, labeled points; -> PIL image."""
    vis = blend(vis, (1, 0, 1), 0.7 * edges(toy.mask))
    if dotted is not None:  # every other 4-px run of the boundary's pixels
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        dots = edges(dotted) & (((xx + yy) // 4) % 2 == 0)
        vis = blend(vis, (1, 0.55, 0), dots.astype(np.float32))
    image = Image.fromarray((np.clip(vis, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for (x, y), cls in zip((toy.x_l + 1) / 2 * SIZE, toy.y_l):
        colour = (0, 128, 255) if cls == 0 else (255, 0, 0)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    return image


def prediction_panel(toy, points, p1, share, dotted=None):
    vis = blend(density_background(points, share), (0, 0.75, 0), 0.3 * upsample(p1, SIZE))
    return finish(vis, toy, None if dotted is None else upsample(dotted, SIZE) >= 0.5)


def distance_panel(toy, spacing=16):
    """Fig. 3c: |distance| as colour strength (green = class 1, blue = class 0), contours every 16 px."""
    d = toy.dist
    strength = np.abs(d) / np.abs(d).max()
    vis = np.ones((SIZE, SIZE, 3), np.float32)
    vis = blend(vis, (0.1, 0.6, 0.1), (d > 0) * strength)
    vis = blend(vis, (0.15, 0.3, 0.85), (d < 0) * strength)
    vis = blend(vis, (0, 0, 0), 0.35 * edges(np.floor(d / spacing)))
    return finish(vis, toy)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def combine(panels, captions):
    """2 × 2 panels with a caption above each."""
    head = 40  # pixels above each panel, for its caption
    f = font(17)
    sheet = Image.new("RGB", (2 * SIZE + 10, 2 * (SIZE + head) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, caption) in enumerate(zip(panels, captions)):
        x, y = (k % 2) * (SIZE + 10), (k // 2) * (SIZE + head + 10)
        draw.text((x + 4, y + 10), caption, fill="black", font=f)
        sheet.paste(panel, (x, y + head))
    return sheet


# ---------------------------------------------------------------------------------------------------
# Command line and main
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    args = Args(**common.command_line(Args, argv))
    common.check_limits(args)  # --seed, --split-seed, --steps, --seeds, --grid
    if args.seed + args.seeds > 2**32:
        raise UserError(f"--seed {args.seed} --seeds {args.seeds}: the last seed must stay below 2**32")
    if not 0 < args.unlabeled_share <= 1:
        raise UserError(f"--unlabeled-share must lie in (0, 1], got {args.unlabeled_share}")
    return args


def run_experiment(name, seed, toy, args, device):
    """One experiment with one seed: train, then the teacher's error (%) on the evaluation grid."""
    exp = EXPERIMENTS[name]
    started = time.perf_counter()
    share, grid = (1.0, SIZE) if args.full else (args.unlabeled_share, args.grid)
    x_u = unlabeled_points(toy, exp["gap"], share, np.random.RandomState(seed))
    steps = exp["full_epochs"] * -(-len(x_u) // BATCH) if args.full else args.steps
    teacher, (sup, cons, conf, accepted) = train(exp, toy, x_u, steps, seed, device)
    points = pixel_centres(grid)
    p1 = predict(teacher, points, device)
    error = 100 * float(((p1 >= 0.5) != true_class(points)).mean())
    line = (f"{name} seed {seed} | {steps} steps, {len(x_u)} unlabeled | sup {sup:.4f} | cons {cons:.4f} | "
            f"conf {conf:.2f} | accepted {accepted:.2f} | {time.perf_counter() - started:.0f} s | "
            f"error {error:.2f}%")
    return name, seed, error, p1.reshape(grid, grid), line


def single_thread():
    torch.set_num_threads(1)


def run_all(jobs, toy, args, device, workers):
    """Yield run_experiment's results as they finish, in `workers` single-threaded processes (CPU)."""
    if workers == 1:
        yield from (run_experiment(*job, toy, args, device) for job in jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=single_thread) as pool:
        for future in as_completed([pool.submit(run_experiment, *job, toy, args, device) for job in jobs]):
            yield future.result()


def main(args):
    device = common.resolve_device(args.device)
    share = 1.0 if args.full else args.unlabeled_share
    out = guard.fresh_folder(args.out)  # an earlier run's: refused
    lines = []
    started = time.perf_counter()

    def log(line):
        tqdm.write(line)
        lines.append(line)

    log("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())) + f" device={device}")
    toy = make_toy(args.split_seed)
    seeds = range(args.seed, args.seed + args.seeds)
    jobs = [(name, seed) for name in EXPERIMENTS if name != "a_supervised" for seed in seeds]
    jobs += [("a_supervised", seed) for seed in seeds]  # the cheapest last, so that the workers end together
    # On a CPU, one single-threaded process per core beats one process on all cores: 512-wide layers are
    # too small to keep two threads busy, and on a shared machine one busy core does not stall the other
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 1 if device.type == "cuda" else min(len(jobs), cores)
    errors = {name: {} for name in EXPERIMENTS}  # {seed: error %} per experiment
    shown = {}  # the first seed's (unlabeled points, P(class 1)) per experiment
    for name, seed, error, p1, line in tqdm(run_all(jobs, toy, args, device, workers), total=len(jobs),
                                            desc="runs", leave=False):
        errors[name][seed] = error
        log(line)
        if seed == args.seed:  # the pictures show the first seed
            x_u = unlabeled_points(toy, EXPERIMENTS[name]["gap"], share, np.random.RandomState(seed))
            shown[name] = (x_u, p1)

    # the figure: one PNG per panel and the 2 × 2 sheet, written only once every run has finished
    panels = {
        "a_gap_isotropic": prediction_panel(toy, *shown["a_gap_isotropic"], share,
                                            dotted=shown["a_supervised"][1]),
        "b_no_gap_isotropic": prediction_panel(toy, *shown["b_no_gap_isotropic"], share),
        "c_distance_contours": distance_panel(toy),
        "d_no_gap_constrained": prediction_panel(toy, *shown["d_no_gap_constrained"], share),
    }
    mean = {name: float(np.mean(list(errors[name].values()))) for name in EXPERIMENTS}
    captions = [f"(a) gap, isotropic: {mean['a_gap_isotropic']:.1f}% (orange: supervised, "
                f"{mean['a_supervised']:.1f}%)",
                f"(b) no gap, isotropic: {mean['b_no_gap_isotropic']:.1f}% error",
                "(c) signed distance to the boundary, contours every 16 px",
                f"(d) no gap, along contours: {mean['d_no_gap_constrained']:.1f}% error"]
    for name, panel in panels.items():
        common.atomic_write(out / f"{name}.png", panel)
    common.atomic_write(out / "figure3.png", combine(list(panels.values()), captions))
    for name, value in mean.items():
        log(f"{name:22s} error {value:6.2f}%  (mean of {args.seeds} seeds: "
            f"{' '.join(f'{errors[name][s]:.2f}' for s in sorted(errors[name]))})")
    log(f"total {time.perf_counter() - started:.0f} s on {workers} worker(s); "
        f"figures and results.json in {out}")
    common.atomic_write(out / "log.txt", "\n".join(lines) + "\n")
    common.atomic_write(out / "results.json", json.dumps(mean, indent=2))
    return mean


if __name__ == "__main__":
    main(parse_args())
