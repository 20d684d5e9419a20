"""Top-1 / top-5 accuracy of a model on a preprocessed :class:`~dfmpc_deploy.data.Dataset`."""
from __future__ import annotations

import torch
from torch import nn

from .data import Dataset

__all__ = ["accuracy", "logits"]


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 250, progress=None) -> torch.Tensor:
    """Run ``model`` in eval mode over ``images`` in batches; returns (N, classes) float32 logits."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(images[i:i + batch_size]).float())
        if progress:
            progress(min(i + batch_size, len(images)), len(images))
    return torch.cat(outs)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 250, progress=None) -> dict:
    """Top-1 and top-5 in percent, with the number of images.

    Returns:
        ``{"top1": float, "top5": float, "n": int}``
    """
    out = logits(model, data.images, batch_size, progress)
    k = min(5, out.shape[1])
    topk = out.topk(k, dim=1).indices
    hit = topk == data.labels[:, None]
    return {"top1": round(100.0 * hit[:, 0].float().mean().item(), 2),
            "top5": round(100.0 * hit.any(dim=1).float().mean().item(), 2), "n": len(data.labels)}
