"""The built-in demo dataset, generated at every run (common.load_dataset("demo")): 600 training and 100
validation images of 48x48 pixels, five classes told apart by shape alone."""
import numpy as np

DEMO_CLASSES = ["background", "disc", "square", "triangle", "cross"]


def demo_image(rng, size=48):
    """One demo image and its label map. Objects and background draw their colours from one distribution,
    so only shape tells the classes apart; smooth background texture, clutter strokes and noise make sure no
    low-density gap separates object pixels from background pixels (paper Sec. 3.1)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def texture(contrast):
        c1 = rng.uniform(0, 255, 3)
        c2 = np.clip(c1 + rng.normal(0, contrast, 3), 0, 255)
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(0.05, 0.3)
        wave = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        return c1 + (c2 - c1) * wave[..., None]

    image = texture(contrast=80)
    for _ in range(rng.integers(2, 5)):  # clutter: strokes in object-like colours
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0))
                    / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6), 0, 1)
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


def demo_splits(n_train=600, n_val=100, size=48):
    """[(names, load, sizes) of the training images, the same of the validation images] (common.Split's
    arguments), the classes told apart by shape alone."""
    rng = np.random.default_rng(20200907)  # fixed: the demo is the same data on every machine
    images, labels = (np.stack(a) for a in zip(*[demo_image(rng, size) for _ in range(n_train + n_val)]))
    split = lambda first, n: ([f"demo_{i:04d}" for i in range(first, first + n)],  # noqa: E731
                              lambda i: (images[first + i], labels[first + i]), [(size, size)] * n)
    return [split(0, n_train), split(n_train, n_val)]
