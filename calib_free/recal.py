"""Re-estimate BatchNorm running statistics of a (quantized) model from a batch of inputs."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["recalibrate_bn_"]


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, inputs: torch.Tensor, names: Iterable[str] | None = None,
                    batch_size: int = 256) -> None:
    """In place: set the running mean/var of the named BN layers (all when ``names`` is None) to the statistics
    of their inputs when ``inputs`` flow through ``model``.

    Layers are updated together in one pass in network order: every re-estimated BN already normalises with its
    new statistics when the layers after it are measured (cumulative average over batches, ``momentum=None``).
    """
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    if names is not None:
        wanted = set(names)
        targets = {n: m for n, m in targets.items() if n in wanted}
    saved = {n: (m.momentum, m.training) for n, m in targets.items()}
    was = model.training
    model.eval()
    try:
        for m in targets.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        if len(inputs) <= batch_size:
            model(inputs)
        else:
            # Each batch is normalised by its own statistics while the running averages accumulate, so later
            # layers see slightly different inputs than the final statistics describe; with a single batch
            # (the default: 32 synthetic samples) they are exactly the statistics the later layers saw.
            for i in range(0, len(inputs), batch_size):
                model(inputs[i:i + batch_size])
    finally:
        for n, m in targets.items():
            m.momentum, tr = saved[n]
            m.train(tr)
        model.train(was)
