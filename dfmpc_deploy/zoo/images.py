"""Reading image files defensively, the standard preprocessing, and parallel decoding with a DataLoader.

Preprocessing is torchvision's evaluation transform, re-implemented on Pillow (torchvision is not imported):
``Resize(resize)`` (shorter side to ``resize``, longer side ``int(resize * long / short)``, Pillow bilinear, which
antialiases as torchvision's PIL path does), ``CenterCrop(size)`` (offsets ``int(round((w - size) / 2))``, zero padding
when the image is smaller), ``ToTensor`` (uint8 / 255) and ``Normalize(mean, std)``, all in float32.

What a data folder may hold (one-line :class:`DfmpcError` naming the file otherwise):

* only regular files are read: a FIFO, device or socket named like an image is refused (it is never opened for
  blocking reads: files are opened with ``O_NONBLOCK`` and checked with ``fstat`` before reading). Symlinks are
  followed wherever they point, as long as they end at a regular file (datasets are often assembled with symlinks);
* at most :data:`MAX_IMAGE_BYTES` per file and :data:`MAX_IMAGE_PIXELS` per image, checked from the header before
  any pixel is decoded (so a small PNG declaring 20000x20000 pixels costs nothing);
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

from ..errors import DfmpcError

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "read_regular_file", "preprocess", "decode_image",
           "normalize", "decode_images", "default_workers", "check_regular_files", "check_dataset_memory"]

MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64_000_000  # below Pillow's own 89 M-pixel warning; ~200 MB decoded RGB at most per worker


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """Read a whole regular file of at most ``max_bytes`` bytes, without blocking on FIFOs or devices.

    Raises:
        DfmpcError: missing, unreadable, not a regular file, or larger than ``max_bytes``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise DfmpcError(f"cannot open {what} '{path}': {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DfmpcError(f"{what} '{path}' is not a regular file (a FIFO, device or socket); remove it")
        if st.st_size > max_bytes:
            raise DfmpcError(f"{what} '{path}' is {st.st_size / 2**20:.0f} MiB, more than the {max_bytes >> 20} MiB "
                             f"limit; remove or shrink it")
        chunks, total = [], 0
        while total <= max_bytes:  # the file may grow after fstat: never read past the limit
            chunk = os.read(fd, min(1 << 22, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise DfmpcError(f"{what} '{path}' grew past the {max_bytes >> 20} MiB limit while being read")
        return b"".join(chunks)
    except OSError as err:
        raise DfmpcError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    finally:
        os.close(fd)


def _crop_offset(have: int, want: int) -> int:
    # torchvision CenterCrop: pad symmetrically (extra pixel after) when smaller, else round the centred offset
    return -((want - have) // 2) if have < want else int(round((have - want) / 2.0))


def preprocess(img, size: int, resize: int | None) -> np.ndarray:
    """Resize (shorter side to ``resize``, if given) and centre-crop a PIL image to uint8 (3, size, size)."""
    from PIL import Image

    img = img.convert("RGB")
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


def decode_image(path: str | os.PathLike, size: int, resize: int | None, data: bytes | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read (unless ``data`` is given), decode and preprocess one image file to uint8 (3, size, size).

    Raises:
        DfmpcError: see the module docstring; the message names ``path``.
    """
    from PIL import Image

    if data is None:
        data = read_regular_file(path, MAX_IMAGE_BYTES, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DfmpcError(f"image '{path}' declares {w}x{h} pixels, more than the limit of {max_pixels:,} "
                                     f"(a decompression bomb or an oversized photo); remove or downscale it")
                im.load()
                return preprocess(im, size, resize)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DfmpcError(f"image '{path}' is too large to decode safely ({err}); remove or downscale it") from None
    except DfmpcError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's format plugins raise many types on malformed files
        msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DfmpcError(f"cannot decode image '{path}' ({msg}); the file is truncated or corrupt: remove or "
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
            raise DfmpcError(f"cannot read image '{p}': {err.strerror or err}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DfmpcError(f"image '{p}' is not a regular file (a FIFO, device, socket or directory); remove it")
