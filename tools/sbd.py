"""Pascal's SegmentationClassAug labels built from SBD, once:
`python -m tools sbd-to-aug SBD_ROOT VOC_ROOT`."""
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
from common import UserError, atomic_write


def sbd_to_aug(sbd, voc):
    """Build VOC2012/SegmentationClassAug/NAME.png (class indices, 255 = void) from SBD's
    dataset/cls/NAME.mat, VOC's own SegmentationClass labels winning where both exist, as in the usual
    SegmentationClassAug.

    Needs scipy, for this step only. Each PNG is written atomically and existing ones are kept: re-run it
    after an interruption."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("sbd-to-aug reads SBD's .mat files with scipy, needed for this step only: "
                        "pip install scipy")
    sbd, voc = Path(sbd), common.voc2012_folder(Path(voc))
    candidates = (sbd / "dataset" / "cls", sbd / "benchmark_RELEASE" / "dataset" / "cls", sbd / "cls")
    cls = next((d for d in candidates if d.is_dir()), None)
    if cls is None:
        raise UserError(f"{sbd}: no dataset/cls/ folder of .mat labels; "
                        f"expected SBD's benchmark.tgz unpacked "
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
            try:
                mat = loadmat(source, squeeze_me=True, struct_as_record=False)
            except Exception as e:  # scipy raises many kinds for a truncated or foreign file
                raise UserError(f"{source}: not a readable .mat file ({type(e).__name__}: {e}); "
                                f"re-extract SBD's benchmark.tgz")
            if not hasattr(mat.get("GTcls"), "Segmentation"):
                raise UserError(f"{source}: holds no GTcls.Segmentation; "
                                f"expected SBD's dataset/cls/NAME.mat labels")
            label = np.asarray(mat["GTcls"].Segmentation).astype(np.uint8)
        atomic_write(target, label)
    print(f"{len(sources)} labels in {voc / 'SegmentationClassAug'}")


def main(command, argv):
    """python -m tools sbd-to-aug SBD_ROOT VOC_ROOT"""
    if len(argv) != 2:
        sys.exit("usage: python -m tools sbd-to-aug SBD_ROOT VOC_ROOT  "
                 "(builds VOC2012/SegmentationClassAug from SBD's dataset/cls/*.mat; README 'Datasets')")
    sbd_to_aug(*argv)
