"""Reading image files defensively, the standard preprocessing, and parallel decoding with a DataLoader.

Preprocessing is torchvision's evaluation transform, re-implemented on Pillow (torchvision is not imported):
``Resize(resize)`` (shorter side to ``resize``, longer side ``int(resize * long / short)``, Pillow bilinear, which
antialiases as torchvision's PIL path does), ``CenterCrop(size)`` (offsets ``int(round((w - size) / 2))``, zero padding
when the image is smaller), ``ToTensor`` (uint8 / 255) and ``Normalize(mean, std)``, all in float32.

What a data folder may hold (one-line :class:`DfmpcError` naming the file otherwise):

* only regular files are read: a FIFO, device or socket named like an image is refused (it is never opened for
  blocking reads: files are opened with ``O_NONBLOCK`` and checked with ``fstat`` before reading). Symlinks are
  followed wherever they point, as long as they end at a regular file (datasets are often assembled with symlinks);
* only the decoders of :data:`IMAGE_FORMATS` (JPEG, PNG, BMP, WebP, TIFF, PPM/PGM) are used, chosen by the content
  (Pillow's ``formats=``), never by the name: a PostScript file named ``*.jpg`` is refused, never handed to
  Ghostscript;
* at most :data:`MAX_IMAGE_BYTES` per file (a sparse file is refused) and :data:`MAX_IMAGE_PIXELS` per image, checked
  from the header before any pixel is decoded (so a small PNG declaring 8000x8000 pixels costs nothing);
* every mode gives the RGB values of the 8-bit picture (16-bit and float grayscale are scaled, never clipped:
  :func:`to_rgb8`) or is refused naming the mode;
* truncated or corrupt images are an error, never skipped or padded;
* the preprocessed float32 images must fit in 80 % of the free memory (checked before decoding, with the ``--limit``
  that would fit in the message).

Decoding errors raised in DataLoader workers are passed back as values, not exceptions, so the user sees one line
instead of the worker's traceback.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DfmpcError, UsageError, one_line
from ..io.files import file_kind, os_error_line, printable_path, read_regular_file

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "IMAGE_FORMATS", "read_regular_file", "preprocess", "decode_image",
           "to_rgb8", "normalize", "decode_images", "default_workers", "check_regular_files", "check_dataset_memory",
           "check_flag_memory"]

MAX_IMAGE_BYTES = 64 << 20
#: pixels per image (a 6000x4000 camera photo), checked from the header before decoding: at most ~100 MB decoded per
#: worker (a 16-bit or float picture: 4 bytes a pixel before it is scaled to 8 bits)
MAX_IMAGE_PIXELS = 24_000_000
#: the only decoders Pillow may use, whatever a file's name says (``Image.open(formats=...)``): a PostScript/EPS
#: file named ``*.jpg`` would otherwise start Ghostscript, and other plugins parse formats nobody evaluates on
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM")
#: modes whose values are not 8-bit: scaled to 0..255 exactly as the 8-bit picture holds them (:func:`to_rgb8`)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _crop_offset(have: int, want: int) -> int:
    # torchvision CenterCrop: pad symmetrically (extra pixel after) when smaller, else round the centred offset
    return -((want - have) // 2) if have < want else int(round((have - want) / 2.0))


def preprocess(img, size: int, resize: int | None) -> np.ndarray:
    """Resize (shorter side to ``resize``, if given) and centre-crop a PIL image to uint8 (3, size, size)."""
    from PIL import Image

    img = img if img.mode == "RGB" else img.convert("RGB")
    if resize is not None:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(resize * long / short)
        new = (resize, new_long) if w <= h else (new_long, resize)
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BILINEAR)
    w, h = img.size
    if (w, h) != (size, size):
        left, top = _crop_offset(w, size), _crop_offset(h, size)
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # C-contiguous and writable


def _wide_to_u8(im, path) -> np.ndarray:
    """The 8-bit values of a 16-bit, 32-bit integer or float grayscale picture (see :func:`to_rgb8`)."""
    mode = im.mode
    a = np.asarray(im)
    shown = printable_path(path)
    if mode.startswith("I;16") or (mode == "I" and im.format in ("PNG", "PPM")):
        # 16-bit samples (PPM's maxval is already stretched to 0..65535 by Pillow): the high byte, which is the 8-bit
        # value exactly both for v * 257 (full-range scaling) and v << 8
        a = a.astype(np.int64)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DfmpcError(f"image '{shown}' (mode {mode}) holds values outside 0..65535; convert it to 8-bit RGB")
        return (a >> 8).astype(np.uint8)
    if mode == "F":
        if a.size and not bool(np.isfinite(a).all()):
            raise DfmpcError(f"image '{shown}' (mode F, float) holds NaN or infinite values; remove or replace it")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise DfmpcError(f"image '{shown}' (mode F, float) holds values in [{lo:.3g}, {hi:.3g}], neither 0..1 nor "
                             f"0..255; convert it to 8-bit RGB")
        scale = 255.0 if hi <= 1.0 else 1.0  # 0..1 floats (the usual convention) or 8-bit values stored as floats
        return np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    raise DfmpcError(f"image '{shown}' has mode {mode} ({im.format} with 32-bit integer samples), whose range has no "
                     f"8-bit meaning; convert it to 8- or 16-bit RGB or grayscale")


def to_rgb8(im, path: str | os.PathLike = "") -> object:
    """A decoded PIL image as the 8-bit RGB picture it shows.

    8-bit modes (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ...) are converted by Pillow. Wider modes
    are scaled, never clipped: 16-bit samples (``I;16*``, and ``I`` from PNG/PPM) keep their high byte, floats (``F``)
    in 0..1 are multiplied by 255 and rounded (floats already in 0..255 are rounded). Anything else is refused
    naming the mode.

    Raises:
        DfmpcError: a mode without an 8-bit RGB meaning, or values outside its range (naming the file and mode).
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_u8(im, path), "L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise DfmpcError(f"image '{printable_path(path)}' has mode {im.mode}, which cannot be converted to RGB "
                         f"({one_line(str(err), 80)}); convert it to 8-bit RGB") from None


def decode_image(path: str | os.PathLike, size: int, resize: int | None, data: bytes | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read (unless ``data`` is given), decode and preprocess one image file to uint8 (3, size, size).

    Only the decoders of :data:`IMAGE_FORMATS` are tried, whatever the file's name says; the pixel count is checked
    from the header before any pixel is decoded; the decoded picture is made 8-bit RGB by :func:`to_rgb8`.

    Raises:
        DfmpcError: see the module docstring; the message names ``path``.
    """
    from PIL import Image, UnidentifiedImageError

    shown = printable_path(path)
    if data is None:
        data = read_regular_file(path, MAX_IMAGE_BYTES, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im_ctx = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            except UnidentifiedImageError:
                raise DfmpcError(f"cannot decode image '{shown}': by its content it is not a "
                                 f"{'/'.join(IMAGE_FORMATS)} image, whatever its name (no other decoder is used); "
                                 f"remove or convert it") from None
            with im_ctx as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DfmpcError(f"image '{shown}' declares {w}x{h} pixels, more than the limit of "
                                     f"{max_pixels:,} (a decompression bomb or an oversized photo); remove or "
                                     f"downscale it")
                im.load()
                return preprocess(to_rgb8(im, path), size, resize)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DfmpcError(f"image '{shown}' is too large to decode safely ({one_line(str(err), 120)}); remove or "
                         f"downscale it") from None
    except DfmpcError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's format plugins raise many types on malformed files
        msg = one_line(str(err), 160) if str(err) else type(err).__name__
        raise DfmpcError(f"cannot decode image '{shown}' ({msg}); the file is truncated or corrupt: remove or "
                         f"replace it") from None


def normalize(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std`` (the ToTensor + Normalize arithmetic)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (u8.float() / 255.0 - m) / s


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: working memory per input element, as a multiple of the input's own float32 bytes: a forward pass keeps a few
#: activation maps (latency batches), synthesis keeps every activation for the backward pass (a ResNet-50 holds
#: ~150x its input; the factors err on the generous side so only hopeless values are refused)
FORWARD_FACTOR = 32
BACKWARD_FACTOR = 64


def check_flag_memory(flag: str, n: int, input_shape: Sequence[int], factor: int) -> None:
    """Refuse up front, naming ``flag``, when ``n`` inputs of ``input_shape`` need more than 80 % of the free memory
    (``n x 4 x C x H x W x factor`` bytes), instead of failing in the allocator later.

    Raises:
        UsageError: naming the flag, the bytes needed and the largest value that fits.
    """

    free = available_memory_bytes()
    per = 4 * factor * int(np.prod(input_shape))
    if free is None or n * per <= 0.8 * free:
        return
    fit = max(1, int(0.8 * free // per))
    raise UsageError(f"{flag} {n}: {n} inputs of {'x'.join(map(str, input_shape))} need about {n * per / 2**30:.1f} "
                     f"GiB of working memory, more than the {free / 2**30:.1f} GiB free; give {fit} or fewer")


def check_dataset_memory(n: int, size: int) -> None:
    """Refuse up front when ``n`` preprocessed float32 images of ``size`` px would not fit in 80 % of free memory.

    Raises:
        DfmpcError: naming the bytes needed, the bytes free and the ``--limit`` that would fit.
    """
    free = available_memory_bytes()
    per_image = 3 * size * size * 4
    if free is None or n * per_image <= 0.8 * free:
        return
    fit = int(0.8 * free // per_image)
    raise DfmpcError(f"{n} images at {size} px need {n * per_image / 1e9:.1f} GB as float32, more than the "
                     f"{free / 1e9:.1f} GB of free memory; evaluate on a subset with --limit {fit} or fewer")


def default_workers() -> int:
    """DataLoader worker processes: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Files(torch.utils.data.Dataset):
    """Image paths -> (index, uint8 array or None, error message or None); errors travel as values."""

    def __init__(self, paths: Sequence[str], size: int, resize: int | None):
        self.paths, self.size, self.resize = list(paths), size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, decode_image(self.paths[i], self.size, self.resize), None
        except DfmpcError as err:
            return i, None, str(err)


def _collate(batch) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """One uint8 tensor per batch (one shared-memory transfer from a worker), or the batch's first error."""
    idx = torch.tensor([i for i, _, _ in batch])
    err = next((e for _, _, e in batch if e is not None), None)
    if err is not None:
        return idx, None, err
    return idx, torch.from_numpy(np.stack([a for _, a, _ in batch])), None


def decode_images(paths: Sequence[str | os.PathLike], size: int, resize: int | None, mean: Sequence[float],
                  std: Sequence[float], num_workers: int | None = None, batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Decode and normalise image files in parallel (``torch.utils.data.DataLoader`` with worker processes).

    Args:
        paths: image files, in output order.
        size, resize: centre-crop side and shorter-side resize (None: no resize) in pixels.
        mean, std: per-channel normalisation of RGB in [0, 1].
        num_workers: worker processes (default :func:`default_workers`; 0 decodes in this process, as does any
            list shorter than two batches).
        batch_size: images per worker task.
        progress: optional ``progress(done, total)``.

    Returns:
        float32 (N, 3, size, size).

    Raises:
        DfmpcError: the first file that cannot be read or decoded (one line naming it), or too little memory for the
            decoded images (:func:`check_dataset_memory`).
    """
    n = len(paths)
    check_dataset_memory(n, size)
    workers = default_workers() if num_workers is None else num_workers
    if n < 2 * batch_size:
        workers = 0
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    loader = torch.utils.data.DataLoader(_Files([str(p) for p in paths], size, resize), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    done = 0
    try:
        for idx, u8, err in loader:
            if err is not None or u8 is None:
                raise DfmpcError(err or "image decoding failed")
            out[idx] = normalize(u8, mean, std)
            done += len(idx)
            if progress:
                progress(done, n)
    except RuntimeError as err:  # a worker killed (out of memory, signal): the loader raises RuntimeError
        first = str(err).splitlines()[0][:200]
        raise DfmpcError(f"decoding images failed ({first}); retry with fewer data workers") from None
    return out


def check_regular_files(paths: Sequence[Path]) -> None:
    """Check every path is (or links to) a regular file before the slow decoding starts.

    Raises:
        DfmpcError: the first missing entry or one that is not a regular file.
    """
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as err:
            raise DfmpcError(os_error_line(err, "image", p)) from None
        if not stat.S_ISREG(st.st_mode):
            raise DfmpcError(f"image '{printable_path(p)}' is {file_kind(st.st_mode)}, not a regular file; remove it")
