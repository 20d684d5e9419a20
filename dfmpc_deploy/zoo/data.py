"""Evaluation datasets: ``imagefolder:DIR``, ``imagenet:DIR``, ``cifar10:DIR``, ``cifar100:DIR``.

Only used to *measure* accuracy (and, when asked explicitly, for the labelled real-data reference); the
compensation itself never reads data.

* ``imagefolder:DIR``: ``DIR/<class>/<image>``; the label of a class is its position among the class folders in
  sorted order. Names starting with ``.`` (``.ipynb_checkpoints``, ``.DS_Store``, editor files) are skipped at every
  level; files without an image extension are ignored. A class folder without images is refused, never skipped:
  skipping it would silently shift every later label. When the model's class count is known, the number of class
  folders must equal it (a stray or missing folder shifts labels the same way).
* ``imagenet:DIR``: ``DIR/labels.txt`` with ``<file> <class index>`` lines (blank and ``#`` lines ignored; ILSVRC's
  validation ground truth in that form is what ``../shared/data/imagenet_val_1300`` holds). Each file is looked up
  relative to ``DIR``, then ``DIR/images``; absolute names and ``..`` are refused so every entry stays in ``DIR``.
  A listed name is read even if it starts with ``.`` (skipping hidden entries is a rule for directory listings).
* ``cifar10:DIR`` / ``cifar100:DIR``: the python-version batch ``test_batch`` / ``test``, read by the restricted
  unpickler of :mod:`.cifar_pickle` (nothing in the file can run code).

Labels must lie in ``[0, num_classes)`` of the model when the caller gives ``num_classes``. File-level rules (regular
files only, size and pixel limits, one-line errors for corrupt images) are in :mod:`.images`; preprocessing is
torchvision's evaluation transform (resize shorter side, centre crop, ImageNet mean/std) on Pillow.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DfmpcError, UsageError
from .cifar_pickle import read_cifar_batch
from .images import check_dataset_memory, check_regular_files, decode_images, normalize, preprocess, read_regular_file

__all__ = ["DataSpec", "DATA_KINDS", "parse_data_spec", "load_dataset", "Dataset", "list_imagefolder",
           "read_labels_file"]

DATA_KINDS = ("imagefolder", "imagenet", "cifar10", "cifar100")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
MAX_LABELS_BYTES = 64 << 20
_CIFAR = {"cifar10": ("test_batch", "labels", 10), "cifar100": ("test", "fine_labels", 100)}


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``kind`` is one of :data:`DATA_KINDS`, ``path`` an existing directory."""

    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass
class Dataset:
    """Preprocessed images (N, 3, H, W) float32 and labels (N,) int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``KIND:DIR``; the directory must exist.

    Raises:
        UsageError: malformed spec; DfmpcError: missing directory.
    """
    kind, sep, path = str(text).partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise UsageError(f"bad --data '{text}': expected imagefolder:DIR, imagenet:DIR (DIR/labels.txt), "
                         f"cifar10:DIR or cifar100:DIR")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DfmpcError(f"--data directory '{p}' does not exist")
    return DataSpec(kind, p)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image_name(name: str) -> bool:
    return _visible(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_imagefolder(root: Path, num_classes: int | None = None) -> tuple[list[Path], list[int], list[str]]:
    """List ``root/<class>/<image>`` (see the module docstring for what is skipped and what is refused).

    Returns:
        ``(files, labels, classes)`` in class order, files sorted by name within a class.

    Raises:
        DfmpcError: no class folders, an empty class folder, a class count that differs from ``num_classes``, or an
            image entry that is not a regular file.
    """
    classes = sorted(d.name for d in root.iterdir() if _visible(d.name) and d.is_dir())
    if not classes:
        raise DfmpcError(f"'{root}' has no class sub-folders (imagefolder layout is DIR/<class>/<image>)")
    if num_classes is not None and len(classes) != num_classes:
        raise DfmpcError(f"'{root}' has {len(classes)} class folders but the model has {num_classes} classes; "
                         f"imagefolder labels are the sorted folder positions, so they must match one to one "
                         f"(folders: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); for a subset of "
                         f"classes use imagenet:DIR with a labels.txt")
    files: list[Path] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        found = sorted(f for f in (root / c).iterdir() if _is_image_name(f.name))
        if not found:
            raise DfmpcError(f"class folder '{root / c}' (class {label} of {len(classes)}) has no images; labels are "
                             f"the sorted folder positions, so an empty class would shift or misname the others: "
                             f"add its images, remove the folder, or use imagenet:DIR with a labels.txt")
        files += found
        labels += [label] * len(found)
    check_regular_files(files)
    return files, labels, classes


def read_labels_file(root: Path, num_classes: int | None = None) -> tuple[list[Path], list[int]]:
    """Read ``root/labels.txt`` (``<file> <class index>`` lines) and resolve every file.

    Raises:
        DfmpcError: missing or unreadable labels file, a malformed line, an index out of range, a name outside
            ``root``, a missing or duplicated file, or an entry that is not a regular file (one line naming it).
    """
    f = root / "labels.txt"
    if not os.path.lexists(f):
        raise DfmpcError(f"imagenet:{root} needs '{f}' with one '<file> <class index>' line per image")
    try:
        text = read_regular_file(f, MAX_LABELS_BYTES, "labels file").decode("utf-8-sig")  # a BOM is not text
    except UnicodeDecodeError as err:
        raise DfmpcError(f"labels file '{f}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    files: list[Path] = []
    labels: list[int] = []
    seen: dict[Path, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{f}:{lineno}"
        parts = s.rsplit(None, 1)
        if len(parts) != 2:
            raise DfmpcError(f"{where}: expected '<file> <class index>', got {s[:80]!r}")
        name, idx = parts
        try:
            y = int(idx)
        except ValueError:
            raise DfmpcError(f"{where}: class index {idx[:20]!r} is not an integer") from None
        if y < 0 or (num_classes is not None and y >= num_classes):
            top = f"{num_classes - 1} (the model has {num_classes} classes)" if num_classes is not None else "..."
            raise DfmpcError(f"{where}: class index {y} is outside 0..{top}")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise DfmpcError(f"{where}: '{name}' must be a path inside '{root}' (no absolute paths, no '..')")
        path = root / rel if os.path.lexists(root / rel) else root / "images" / rel
        if not os.path.lexists(path):
            raise DfmpcError(f"{where}: '{name}' is neither in '{root}' nor in '{root / 'images'}'")
        if path in seen:
            raise DfmpcError(f"{where}: '{name}' is listed twice (first on line {seen[path]})")
        seen[path] = lineno
        files.append(path)
        labels.append(y)
    if not files:
        raise DfmpcError(f"labels file '{f}' lists no images ('<file> <class index>' lines)")
    check_regular_files(files)
    return files, labels


def _subset(n: int, limit: int | None) -> np.ndarray | None:
    # A fixed-stride subset covers every class when the items are grouped by class.
    if limit is None or limit >= n:
        return None
    return np.linspace(0, n - 1, limit).round().astype(int)


def _check_labels(y: np.ndarray, num_classes: int | None, origin: str) -> None:
    if num_classes is None or len(y) == 0:
        return
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DfmpcError(f"{origin}: label {int(y[bad[0]])} is outside 0..{num_classes - 1} of the model "
                         f"({len(bad)} such labels); the data belongs to another label set")


def load_dataset(spec: DataSpec, size: int, resize: int | None, mean: Sequence[float], std: Sequence[float],
                 limit: int | None = None, progress: Callable[[int, int], None] | None = None,
                 num_classes: int | None = None, num_workers: int | None = None) -> Dataset:
    """Decode and normalise the evaluation images.

    Args:
        spec: the parsed ``--data`` value.
        size, resize, mean, std: the model's preprocessing (see :class:`dfmpc_deploy.zoo.models.ModelSpec`).
        limit: evaluate on an evenly spaced subset of this many images.
        progress: optional callable(done, total) for progress display.
        num_classes: the model's class count; labels outside ``[0, num_classes)`` are refused (and imagefolder
            class folders must number exactly this many).
        num_workers: image-decoding worker processes (default: the CPUs available; see
            :func:`dfmpc_deploy.zoo.images.decode_images`).

    Raises:
        DfmpcError: anything wrong with the data (one line naming the file and the fix).
    """
    if spec.kind in _CIFAR:
        name, key, classes = _CIFAR[spec.kind]
        xs, ys = read_cifar_batch(spec.path / name, key, classes)
        _check_labels(ys, num_classes, str(spec.path / name))
        idx = _subset(len(xs), limit)
        if idx is not None:
            xs, ys = xs[idx], ys[idx]
        check_dataset_memory(len(xs), size)
        if resize is None and xs.shape[1:3] == (size, size):
            x = normalize(torch.from_numpy(xs).permute(0, 3, 1, 2), mean, std)
        else:
            from PIL import Image
            u8 = np.stack([preprocess(Image.fromarray(a), size, resize) for a in xs])
            x = normalize(torch.from_numpy(u8), mean, std)
        return Dataset(str(spec), x.contiguous(), torch.from_numpy(ys))
    if spec.kind == "imagefolder":
        files, labels, _ = list_imagefolder(spec.path, num_classes)
    else:
        files, labels = read_labels_file(spec.path, num_classes)
    idx = _subset(len(files), limit)
    if idx is not None:
        files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    x = decode_images(files, size, resize, mean, std, num_workers=num_workers, progress=progress)
    return Dataset(str(spec), x, torch.tensor(labels, dtype=torch.int64))
