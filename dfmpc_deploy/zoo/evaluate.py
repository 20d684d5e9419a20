"""Top-1 / top-5 accuracy of a model on a preprocessed :class:`~dfmpc_deploy.zoo.data.Dataset`."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import DfmpcError
from .data import Dataset

__all__ = ["accuracy", "logits", "auto_batch_size"]

_PIXELS_PER_BATCH = 2_000_000


def auto_batch_size(images: torch.Tensor) -> int:
    """About two million input pixels per batch: 250 CIFAR images (32 px), 39 ImageNet images (224 px).

    Larger ImageNet batches only add memory traffic on a CPU (activations of 250 images at 224 px are gigabytes).
    """
    hw = images.shape[-1] * images.shape[-2] if images.dim() == 4 else 1
    return max(1, min(250, _PIXELS_PER_BATCH // max(hw, 1)))


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run ``model`` in eval mode over ``images`` in batches; returns (N, classes) float32 logits.

    4-D inputs run in channels-last memory format (2x faster for CNNs on CPU, measured on MobileNetV2); the model's
    parameters are converted for the run and converted back to the contiguous format afterwards.
    """
    model.eval()
    bs = batch_size or auto_batch_size(images)
    nhwc = images.dim() == 4
    if nhwc:
        model.to(memory_format=torch.channels_last)
    outs = []
    try:
        for i in range(0, len(images), bs):
            x = images[i:i + bs]
            outs.append(model(x.contiguous(memory_format=torch.channels_last) if nhwc else x).float())
            if progress:
                progress(min(i + bs, len(images)), len(images))
    finally:
        if nhwc:
            model.to(memory_format=torch.contiguous_format)
    return torch.cat(outs) if outs else torch.empty(0, 0)


def accuracy(model: nn.Module, data: Dataset, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Top-1 and top-5 in percent, with the number of images.

    Returns:
        ``{"top1": float, "top5": float, "n": int}``

    Raises:
        DfmpcError: a label outside the model's classes (the data belongs to another label set), or no images.
    """
    if len(data.labels) == 0:
        raise DfmpcError(f"dataset '{data.name}' has no images to evaluate")
    out = logits(model, data.images, batch_size, progress)
    classes = out.shape[1]
    bad = (data.labels < 0) | (data.labels >= classes)
    if bool(bad.any()):
        first = int(data.labels[bad][0])
        raise DfmpcError(f"dataset '{data.name}': label {first} is outside the model's {classes} classes "
                         f"({int(bad.sum())} such labels); evaluate with data of the model's label set")
    k = min(5, classes)
    topk = out.topk(k, dim=1).indices
    hit = topk == data.labels[:, None]
    return {"top1": round(100.0 * hit[:, 0].float().mean().item(), 2),
            "top5": round(100.0 * hit.any(dim=1).float().mean().item(), 2), "n": len(data.labels)}
