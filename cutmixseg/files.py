"""The bottom of the kit: bad input as one line (UserError, excepthook), files written atomically, images and
masks read from disk, file names that are not UTF-8. Imports nothing of the kit; everything else stands on it.

File names are bytes; Python reads a byte that is not UTF-8 as a surrogate escape (0xff as U+DCFF). The kit
writes such a name back with its own bytes wherever text is written (labeled.txt, log.txt, stdout:
"surrogateescape") and as the escape \\udcff in JSON (json.dumps' default ensure_ascii), which json.loads
reads back as the same name."""
import errno
import io
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IGNORE = 255  # label value of void / padding pixels, never scored, never trained on
UMASK = os.umask(0o022)  # read here, and put back: files written atomically get the usual permissions
os.umask(UMASK)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """Bad input (a path, a file, an option): reported as one clear line, never as a traceback."""


# {"iter": a running Run's last checkpointed iteration or None, "batch", "crop": its sizes}:
# said when a run fails
CHECKPOINTED = {}


def excepthook(kind, value, tb):
    """sys.excepthook of every command: bad input, Ctrl-C, a full disk, a dead loader worker in one line each,
    saying how to go on from the last checkpoint; anything else as Python prints it."""
    # first: torch's SIGCHLD handler (where not wrapped below)
    # raises again in here as each dead worker is reaped
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if not CHECKPOINTED:
        resume = ""
    elif CHECKPOINTED["iter"] is None:
        resume = "; no checkpoint yet: the same command starts the run afresh"
    else:
        resume = f"; --resume continues from iteration {CHECKPOINTED['iter']}"
    if issubclass(kind, UserError):
        sys.stderr.write(f"error: {value}\n")
    elif issubclass(kind, KeyboardInterrupt):
        sys.stderr.write(f"interrupted{resume}\n")
    elif issubclass(kind, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        sys.stderr.write(f"error: cannot write {value.filename or 'a file'}: {value.strerror} "
                         f"(disk full?){resume}\n")
    elif issubclass(kind, torch.OutOfMemoryError) and "batch" in CHECKPOINTED:
        b, (h, w) = CHECKPOINTED["batch"], CHECKPOINTED["crop"]  # activations ~ batch x crop area
        first = str(value).split(".")[0]
        sys.stderr.write(f"error: out of GPU memory at --batch-size {b} --crop-size {h},{w} ({first}); "
                         f"about half of it fits: --batch-size {max(b // 2, 1)}, "
                         f"or --crop-size {round(0.7 * h)},{round(0.7 * w)}, "
                         f"or the same batch over more GPUs with torchrun{resume}\n")
    elif issubclass(kind, RuntimeError) and "DataLoader worker" in str(value):
        sys.stderr.write("error: a data loading worker died "
                         f"(out of memory? try fewer --num-workers){resume}\n")
    else:
        sys.__excepthook__(kind, value, tb)


def one_report_of_dead_workers(iterator):
    """`iterator` of a DataLoader whose workers just started. torch's SIGCHLD handler, installed then, raises
    once for each worker that dies; wrapped here (once per process), its first report also puts the default
    handler back: that report ends the run, and no second one breaks into the cleanup (the progress bar's last
    redraw)."""
    handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    if (callable(handler) and not hasattr(handler, "reports_once")
            and threading.current_thread() is threading.main_thread()):
        def once(signum, frame):
            try:
                handler(signum, frame)
            except RuntimeError:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                raise
        once.reports_once = True
        signal.signal(signal.SIGCHLD, once)
    return iterator


def brief(error):
    """An exception's kind and first sentence, on one line."""
    return f"{type(error).__name__}: " + " ".join(str(error).split()).split(". ")[0][:200]


def atomic_write(path, content):
    """Write text, bytes, an image (PIL, or a uint8 array: PNG) or a checkpoint (a dict: torch.save) so
    that `path` holds either its old content or the whole new one, never a half-written file."""
    buffer = io.BytesIO()
    path = Path(path)
    if isinstance(content, (Image.Image, np.ndarray)):
        (content if isinstance(content, Image.Image) else Image.fromarray(content)).save(buffer, format="PNG")
    elif isinstance(content, dict):
        torch.save(content, buffer)
    else:
        # a file name that is not UTF-8 is written with its own bytes, as the file system holds it
        buffer.write(content.encode(errors="surrogateescape") if isinstance(content, str) else content)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's file is the owner's alone; this one follows the umask
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a full disk: name the file that could not be written
            e.filename = str(path)
        raise


def start_command():
    """What every command does first: bad input ends as one line (excepthook); stdout writes a file name that
    is not UTF-8 with its own bytes, as log.txt does (under a UTF-8 locale such as en_US.UTF-8 it would refuse
    the surrogate escapes with a UnicodeEncodeError; stderr writes them escaped, as \\udcff)."""
    sys.excepthook = excepthook
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")


def not_utf8(*paths):
    """The bytes of `paths` that are not UTF-8 as surrogate escapes, each once, sorted
    ("" for UTF-8 names)."""
    return "".join(sorted({c for path in paths for c in str(path) if "\udc80" <= c <= "\udcff"}))


def shown(path):
    """A path in a message: its bytes that are not UTF-8 as \\xNN, as Python shows bytes."""
    return os.fsencode(path).decode(errors="backslashreplace")


def probe(folder, *paths):
    """A folder made and removed at once in `folder`, its name holding the bytes of `paths` that are not
    UTF-8: OSError where `folder` cannot be written, errno EILSEQ where its file system holds UTF-8 names only
    (macOS, ZFS with utf8only). Sorted, such bytes never form UTF-8 (a lead byte would need continuation bytes
    after it)."""
    os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".cutmix-seg-probe-" + not_utf8(*paths)))


def read_image(path):
    """An image file as uint8 RGB (H, W, 3); 16-bit grey scaled to 8 bits
    (a plain conversion clips it white)."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):
                grey = np.clip(np.round(np.asarray(im, np.float64) / 257), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises many kinds; the user needs the file name and the reason
        raise UserError(f"cannot read image {path}: {e}")


def image_size(path):
    """(H, W) of an image file from its header alone (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}")


def read_mask(path):
    """A single-channel PNG of class indices (255 = ignore) as a uint8 (H, W) array."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            mask = np.asarray(im)
    except Exception as e:
        raise UserError(f"cannot read mask {path}: {e}")
    if mode not in ("L", "P", "I", "I;16", "1"):  # 1: a 1-bit mask, classes 0 and 1
        raise UserError(f"mask {path} must be a single-channel PNG of class indices (mode L or P), "
                        f"got mode {mode}")
    if mask.max(initial=0) > 255:
        raise UserError(f"mask {path} holds values above 255; expected class indices with 255 = ignore")
    return mask.astype(np.uint8)


def image_files(folder):
    """The images below `folder` (nested; IMAGE_SUFFIXES in any case; hidden files such as ._x.png skipped),
    sorted; two with one name but for the suffix (a.png, a.jpg) are refused by name."""
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    stems = {}
    for p in found:
        if stems.setdefault(p.with_suffix(""), p) != p:
            raise UserError(f"{stems[p.with_suffix('')]} and {p} share one name; keep one of them")
    return found
