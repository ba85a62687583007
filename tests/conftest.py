"""Shared helpers: run a script as a user would, and build tiny datasets in the official layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# a few iterations, tiny crops: every script end to end in seconds
FAST = ["--iters", "6", "--eval-every", "3", "--batch-size", "2", "--num-workers", "0"]


# one thread per run: faster for tiny workloads, and the same float arithmetic in every run
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_script(script, *args, cwd=None, check=True, timeout=600, env=None, preexec_fn=None):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_results(out):
    return json.loads((Path(out) / "results.json").read_text())


def shapes_sample(rng, h, w, num_classes):
    """An image whose label map is a few rectangles of classes 1..num_classes-1 on class 0."""
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    for _ in range(3):
        c = rng.integers(1, num_classes)
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(3, h // 2), x0 + rng.integers(3, w // 2)
        label[y0:y1, x0:x1] = c
        image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] // 2 + 40 * c).astype(np.uint8)
    return image, label


def make_folder_dataset(root, n_train=12, n_val=4, size=(24, 32), num_classes=3, seed=0, jpg_every=3):
    """ROOT/{train,val}/{images,masks}: PNG and JPEG images, L-mode class-index masks, a 255 border."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = shapes_sample(rng, *size, num_classes)
            label[0, :] = 255
            suffix = ".jpg" if i % jpg_every == 0 else ".png"
            Image.fromarray(image).save(root / split / "images" / f"img_{i:03d}{suffix}")
            Image.fromarray(label, mode="L").save(root / split / "masks" / f"img_{i:03d}.png")
    return root


@pytest.fixture
def folder_data(tmp_path):
    return make_folder_dataset(tmp_path / "data")
