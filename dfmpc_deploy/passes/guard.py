"""The data-free guard: a correction is kept only if it brings the model closer to the FP model on held-out inputs.

Synthetic inputs at 224 px never match every BN layer exactly, so a correction estimated on them (statistics,
error-feedback codes) can make a model worse. The guard measures what a correction did with a criterion that reads
no data: the mean KL divergence ``KL(p_FP || p_Q)`` between the FP model's and the quantized model's output
distributions on synthetic inputs *held out* from the ones the correction was fitted on (the calibrate pass
synthesises them with another seed). A guarded pass whose divergence is not lower than before it ran is undone (the
working model and the codes restored) and the report says so, with both values.

Since the first pass of every recipe is plain rounding (``rtn``), a recipe whose corrections are all guarded ends no
worse than ``rtn`` on this criterion.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["holdout_kl", "mean_kl", "Snapshot", "snapshot", "restore", "guarded_apply"]


@torch.no_grad()
def holdout_kl(ctx: Any) -> float | None:
    """Mean ``KL(p_FP || p_Q)`` (nats) over the held-out synthetic inputs, or None when there are none."""
    if ctx.holdout is None:
        return None
    x = ctx.holdout.to(ctx.device)
    ref = ctx.shared.get("holdout_fp_logp")
    if ref is None:
        fp = ctx.fp_model.to(ctx.device)
        ref = ctx.shared["holdout_fp_logp"] = F.log_softmax(fp(x).float(), dim=1)
        fp.to("cpu")
    ctx.model.to(ctx.device)
    return mean_kl(ref, F.log_softmax(ctx.model(x).float(), dim=1))


def mean_kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over rows of ``KL(p || q)`` (nats) from log-probabilities (N, classes)."""
    return float((logp.exp() * (logp - logq)).sum(1).mean())


@dataclass
class Snapshot:
    """What a pass may change: the working model's tensors, the codes and scales, the statistics source."""

    state: dict[str, torch.Tensor]
    layers: dict[str, Any]
    estimator: str


def snapshot(ctx: Any) -> Snapshot:
    """A copy of everything a correction pass changes in ``ctx``."""
    return Snapshot({k: v.detach().clone() for k, v in ctx.model.state_dict().items()}, copy.deepcopy(ctx.layers),
                    ctx.estimator)


def restore(ctx: Any, snap: Snapshot) -> None:
    """Put ``ctx`` (a :class:`~dfmpc_deploy.passes.base.Context`) back as it was when ``snap`` was taken."""
    ctx.model.load_state_dict(snap.state)
    ctx.layers.clear()
    ctx.layers.update(snap.layers)
    ctx.estimator = snap.estimator


def guarded_apply(p: Any, ctx: Any) -> dict[str, Any]:
    """Run pass ``p`` on ``ctx``; undo it when the held-out divergence does not fall. The returned info carries
    ``guard``: ``{"kept", "kl_before", "kl_after"}`` (absent when there are no held-out inputs)."""
    before = holdout_kl(ctx)
    if before is None:
        return p.apply(ctx) or {}
    snap = snapshot(ctx)
    info = dict(p.apply(ctx) or {})
    after = holdout_kl(ctx)
    assert after is not None
    kept = after < before
    if not kept:
        restore(ctx, snap)
    info["guard"] = {"kept": kept, "kl_before": round(before, 6), "kl_after": round(after, 6)}
    return info
