"""Evaluation datasets: ``imagefolder:DIR``, ``cifar10:DIR``, ``cifar100:DIR`` (python pickle batches).

Only used to *measure* accuracy (and, when asked explicitly, for the labelled real-data reference); the
compensation itself never reads data.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DfmpcError, UsageError

__all__ = ["DataSpec", "parse_data_spec", "load_dataset", "Dataset"]

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}


@dataclass(frozen=True)
class DataSpec:
    kind: str  # imagefolder | cifar10 | cifar100
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
    if not sep or kind not in ("imagefolder", "cifar10", "cifar100") or not path:
        raise UsageError(f"bad --data '{text}': expected imagefolder:DIR, cifar10:DIR or cifar100:DIR")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DfmpcError(f"--data directory '{p}' does not exist")
    return DataSpec(kind, p)


def _preprocess(img, size: int, resize: int | None, mean, std) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    if resize is not None:
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    if (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return arr.transpose(2, 0, 1)


def _imagefolder(root: Path, limit: int | None) -> list[tuple[Path, int]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DfmpcError(f"'{root}' has no class sub-folders (imagefolder layout is DIR/<class>/<image>)")
    items = []
    for label, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix in _IMG_EXT)
        items += [(f, label) for f in files]
    if not items:
        raise DfmpcError(f"'{root}' has class folders but no images ({', '.join(sorted(_IMG_EXT)[:4])}, ...)")
    if limit is not None and limit < len(items):
        # A fixed-stride subset covers every class (the files are grouped by class).
        idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
        items = [items[i] for i in idx]
    return items


def _cifar_pickle(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    name = "test_batch" if spec.kind == "cifar10" else "test"
    f = spec.path / name
    if not f.is_file():
        raise DfmpcError(f"'{spec.path}' has no '{name}' file (expected the python version of {spec.kind})")
    with open(f, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")  # noqa: S301 - the standard CIFAR format is a pickle; the user named it
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(d[b"labels" if spec.kind == "cifar10" else b"fine_labels"], dtype=np.int64)
    return x, y


def load_dataset(spec: DataSpec, size: int, resize: int | None, mean, std, limit: int | None = None,
                 progress=None) -> Dataset:
    """Decode and normalise the evaluation images.

    Args:
        spec: the parsed ``--data`` value.
        size, resize, mean, std: the model's preprocessing (see :class:`dfmpc_deploy.models.ModelSpec`).
        limit: evaluate on an evenly spaced subset of this many images.
        progress: optional callable(done, total) for progress display.
    """
    from PIL import Image

    if spec.kind == "imagefolder":
        items = _imagefolder(spec.path, limit)
        arrs = []
        for i, (f, _) in enumerate(items):
            try:
                with Image.open(f) as im:
                    arrs.append(_preprocess(im, size, resize, mean, std))
            except OSError as err:
                raise DfmpcError(f"cannot decode image '{f}': {err}") from err
            if progress and (i % 500 == 0 or i == len(items) - 1):
                progress(i + 1, len(items))
        x = torch.from_numpy(np.stack(arrs))
        y = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    else:
        xs, ys = _cifar_pickle(spec)
        if limit is not None and limit < len(xs):
            idx = np.linspace(0, len(xs) - 1, limit).round().astype(int)
            xs, ys = xs[idx], ys[idx]
        x = torch.from_numpy(np.stack([_preprocess(Image.fromarray(a), size, resize, mean, std) for a in xs]))
        y = torch.from_numpy(ys)
    return Dataset(str(spec), x, y)
