"""Apply a trained run to new images: `python -m tools predict RUN_DIR INPUT... --out OUT_DIR`.

    python -m tools predict runs/train_cutmix_folder_-1_s1 photos/ extra.jpg --out masks/ --overlay
    python -m tools predict RUN_DIR ROOT/val/images --out pred/ --masks ROOT/val/masks     # + mIoU

INPUT: image files and folders (searched recursively; an image in a folder keeps its path below it). Writes
OUT_DIR/<name>.png per image: a palette PNG of class indices, the image's own size (viewable as colours,
readable as indices); with --overlay also <name>_overlay.jpg. With --masks, the same confusion-matrix mIoU as
training's evaluation, printed and written to OUT_DIR/results.json; the last line is then `FINAL mIoU=<miou>`.
In Python: `net, info = common.load_model(RUN_DIR)`. RUN_DIR may also be a checkpoint file: UniMatch's
released ones, a bare state dict, a run's checkpoint.pt (common.load_weights_file).
"""
import argparse
import errno
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
from common import UserError
from cutmixseg.files import not_utf8, probe, shown
from cutmixseg.pictures import palette
from cutmixseg.prepare import ISIC_SIZE, area_resize


def preprocessed(image, preprocess):
    """The image as the network saw its dataset's images: Cityscapes halved (2x2 mean, truncated), ISIC at
    248x248 (area), others as they are; (3, h, w) uint8 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if preprocess == "halve":
        return F.avg_pool2d(t[None].float(), 2, ceil_mode=True)[0].floor().to(torch.uint8)
    if preprocess == "resize 248x248":
        return torch.from_numpy(area_resize(image, ISIC_SIZE)).permute(2, 0, 1)
    return t


def logits_of(net, x, tile, window=None):
    """net(x); with tile = (h, w) the mean of overlapping windows' logits (stride half a window); else with
    window (the run's evaluation under today's protocol) its sliding windows' summed softmax."""
    H, W = x.shape[2:]
    if tile is None and window:
        return common.sliding_window(net, x, window)
    if tile is None or (tile[0] >= H and tile[1] >= W):
        return net(x).float()
    th, tw = min(tile[0], H), min(tile[1], W)
    starts = [sorted({*range(0, n - t, max(1, t // 2)), n - t}) for n, t in ((H, th), (W, tw))]
    total = None  # the summed logits, made once the first window gives the class count
    count = torch.zeros(1, 1, H, W, device=x.device)  # windows per pixel
    for y in starts[0]:
        for x0 in starts[1]:
            out = net(x[:, :, y:y + th, x0:x0 + tw]).float()
            if total is None:
                total = torch.zeros(len(x), out.shape[1], H, W, device=x.device)
            total[:, :, y:y + th, x0:x0 + tw] += out
            count[:, :, y:y + th, x0:x0 + tw] += 1
    return total / count


def predict(net, info, images, device, amp="off", tile=None, batch_size=4):
    """Class indices (H, W) int64 per image (H, W, 3) uint8, at each image's own size; images of equal size
    after preprocessing share a batch. Without a tile, a run evaluated by sliding windows predicts by them."""
    inputs = [preprocessed(image, info["preprocess"]) for image in images]
    preds = [None] * len(images)
    order = sorted(range(len(images)), key=lambda i: tuple(inputs[i].shape))
    batches = [[]]
    for i in order:
        last = batches[-1]
        if last and (inputs[i].shape != inputs[last[0]].shape or len(last) == batch_size):
            batches.append([])
        batches[-1].append(i)
    with common.inference(net):
        for batch in batches:
            with common.autocast(amp, device):
                x = common.normalise(torch.stack([inputs[i] for i in batch]), device)
                logits = logits_of(net, x, tile, info.get("eval_window"))
            for i, logit in zip(batch, logits):
                size = images[i].shape[:2]
                if logit.shape[1:] != size:  # back to the image's own size
                    logit = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0]
                pred = logit.argmax(0)
                if info["lesion_scoring"]:
                    pred = common.fill_holes(pred[None] == 1)[0].long()
                preds[i] = pred.cpu()
    return preds


def inputs_and_outputs(inputs, out):
    """[(image path, output path without suffix)], from files (named by their stem) and folders (searched
    recursively, each image keeping its path below the folder); two that would share an output are refused."""
    pairs = []
    for given in map(Path, inputs):
        if given.is_dir():
            pairs += [(p, out / p.relative_to(given).with_suffix("")) for p in common.image_files(given)]
        elif given.is_file():
            pairs.append((given, out / given.stem))
        else:
            raise UserError(f"{given}: no such image or folder")
    if not pairs:
        raise UserError(f"no images ({', '.join(common.IMAGE_SUFFIXES)}) in {' '.join(inputs)}")
    seen = {}
    for image, target in pairs:
        if target in seen:
            raise UserError(f"{seen[target]} and {image} would both be written to {target}.png; "
                            f"give them apart")
        seen[target] = image
    check_names_fit(pairs, out)
    return pairs


def check_names_fit(pairs, out):
    """Before anything is written: where an output's name holds bytes that are not UTF-8 (it keeps its
    image's), a folder named with those bytes is made and removed at once where --out is (or would be)
    made; a file system that holds UTF-8 names only (macOS, ZFS with utf8only) refuses it, and the first
    such image is named."""
    if not not_utf8(*(target for _, target in pairs)):
        return
    folder = next(p for p in (out, *out.absolute().parents) if p.is_dir())
    try:
        probe(folder, *(target for _, target in pairs))
    except OSError as e:
        if e.errno != errno.EILSEQ:
            return  # any other failure: met by the writes, as with names in UTF-8
        if not_utf8(out):
            raise UserError(f"--out {shown(out)}: the file system of {shown(folder)} holds only names in "
                            f"UTF-8, which this one is not; choose an --out named in UTF-8")
        image = next(image for image, target in pairs if not_utf8(target))
        raise UserError(f"{shown(image)}: the file system of --out {shown(out)} holds only names in UTF-8, "
                        f"which this image's (kept by its predicted mask) is not; rename it")


def main(command, argv):
    parser = argparse.ArgumentParser(prog="python -m tools predict", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder, or a checkpoint file (UniMatch's too)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders")
    parser.add_argument("--out", required=True, help="folder for the predicted masks")
    parser.add_argument("--masks", help="folder of true masks (class indices, 255 = ignore), "
                                        "matched by name: score")
    parser.add_argument("--net", default="teacher", choices=["teacher", "student"],
                        help="the evaluated one: teacher")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"],
                        help="autocast (default: bf16 on CUDA, off on CPU)")
    parser.add_argument("--tile", type=lambda t: common.parse_size(t, "--tile"),
                        help="H,W: overlapping windows")
    parser.add_argument("--overlay", action="store_true",
                        help="also <name>_overlay.jpg: the image under the colours")
    parser.add_argument("--batch-size", type=int, default=4, help="images of equal size predicted together")
    opts = parser.parse_args(argv)
    device = common.resolve_device(opts.device)
    amp = opts.amp or ("bf16" if device.type == "cuda" else "off")
    net, info = common.load_model(opts.run_dir, opts.net, device)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    pairs = inputs_and_outputs(opts.inputs, out)
    masks = None
    if opts.masks:
        masks = [mask_for(image, target, out, Path(opts.masks)) for image, target in pairs]
    colours = palette()
    conf = torch.zeros(info["num_classes"], info["num_classes"], dtype=torch.long)
    with tqdm(total=len(pairs), desc="predicting", unit="image") as bar:  # closed before any error's line
        for start in range(0, len(pairs), opts.batch_size * 8):  # a few batches' images in memory at a time
            chunk = pairs[start:start + opts.batch_size * 8]
            images = [common.read_image(image) for image, _ in chunk]
            preds = predict(net, info, images, device, amp, opts.tile, opts.batch_size)
            for k, (pred, image, (path, target)) in enumerate(zip(preds, images, chunk)):
                indices = pred.numpy().astype(np.uint8)
                png = Image.fromarray(indices, mode="P")
                png.putpalette(colours.flatten().tolist())
                common.atomic_write(target.with_name(target.name + ".png"), png)
                if opts.overlay:
                    blend = (0.5 * image + 0.5 * colours[indices]).astype(np.uint8)
                    write_jpeg(target.with_name(target.name + "_overlay.jpg"), blend)
                if masks:
                    truth = common.read_mask(masks[start + k])
                    if truth.shape != indices.shape:
                        raise UserError(f"mask {masks[start + k]} is {truth.shape[1]}x{truth.shape[0]} "
                                        f"but its image {path} is {indices.shape[1]}x{indices.shape[0]}; "
                                        f"they must match")
                    conf += common.confusion_matrix(pred, torch.from_numpy(truth), info["num_classes"])
            bar.update(len(chunk))
    if info["iteration"] is not None:
        source = f"{opts.net} of {opts.run_dir}, iteration {info['iteration']}"
    else:  # a checkpoint file
        source = f"{info['arch']} of {info['num_classes']} classes from {opts.run_dir}"
    print(f"{len(pairs)} predicted masks in {out} ({source})")
    if masks:
        iou = (common.iou_from_confusion(conf) * 100).tolist()
        results = dict(miou=float(np.mean(iou)), per_class_iou=iou, n_images=len(pairs))
        if info["lesion_scoring"]:
            results["lesion_iou"] = iou[1]
        common.atomic_write(out / "results.json", json.dumps(results, indent=2))
        print("per class: " + " ".join(f"{n}={v:.1f}" for n, v in zip(info["class_names"], iou)))
        print(f"FINAL mIoU={results['miou']:.2f}")


def mask_for(image, target, out, masks):
    """The true mask of an image: MASK_DIR/<its path below its folder>.png, else MASK_DIR/<stem>.png."""
    below = target.relative_to(out)
    for candidate in (masks / below.with_name(below.name + ".png"), masks / (image.stem + ".png")):
        if candidate.is_file():
            return candidate
    raise UserError(f"--masks {masks}: no mask for {image} (expected {masks / (image.stem + '.png')})")


def write_jpeg(path, array):
    import io
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    common.atomic_write(path, buffer.getvalue())
