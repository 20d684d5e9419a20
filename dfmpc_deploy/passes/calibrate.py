"""Calibrate pass: the inputs the statistics are re-estimated on (D3) - synthesised from the model itself by default.

``synthetic`` (data-free, the default): inputs optimised so that the FP model's BN layers see the statistics they
stored (calib_free.synth), with a budget chosen for the input size (:func:`calib_free.synth.synth_budget`) unless
``--synth-samples`` / ``--synth-steps`` say otherwise. ``real`` is a labelled reference that reads 200 real images;
``none`` keeps the FP statistics (the paper without re-calibration).

A model whose BN layers carry no statistics (identity or absent: BN folded before publication) has nothing to
synthesise from: ``synthetic`` is then skipped with a note, and the later passes fall back to what needs no
statistics (docs/MATH.md, "Models without statistics").
"""
from __future__ import annotations

from dataclasses import dataclass

from calib_free import synth_budget, synthesize_inputs
from calib_free.synth import bn_matching_losses

from ..core.options import nonnegative_int, option, positive_int, require_finite
from ..errors import UsageError
from .base import Context, Pass, register_pass

__all__ = ["Calibrate", "RECAL_CHOICES"]

#: offset of the held-out inputs' seed from the build seed (any fixed value other than 0 gives other inputs)
HOLDOUT_SEED = 7919

#: where the statistics come from; ``real`` is a labelled reference that needs data
RECAL_CHOICES = ("synthetic", "none", "real")


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Choose the calibration inputs.

    Args:
        recal: ``synthetic`` (data-free), ``none`` (FP statistics kept) or ``real`` (reference, reads data).
        synth_samples, synth_steps: synthesis budget; None = chosen for the input size.
        synth_lr: Adam learning rate of the synthesis.
        synth_coarse: fraction of the steps run at half the resolution first; None = the budget's.
        holdout_samples: synthetic inputs held out (another seed) for the data-free guard (passes/guard.py);
            None = half of the samples, at least 2; 0 = none (no guard).
    """

    name = "calibrate"
    recal: str = option("synthetic", flag="--recal", choices=RECAL_CHOICES,
                        help="BN statistics of the low-bit layers: 'synthetic' (data-free), 'none' (FP statistics "
                             "kept), or 'real' (labelled reference using 200 images of --data)")
    synth_samples: int | None = option(None, flag="--synth-samples", parse=positive_int, metavar="N",
                                       help="synthetic samples (default: 32 for inputs up to 64x64 px, 8 above)")
    synth_steps: int | None = option(None, flag="--synth-steps", parse=nonnegative_int, metavar="N",
                                     help="at most N synthesis steps; stops early when the loss stops improving "
                                          "(default: 100 up to 64x64 px, 40 above)")
    synth_lr: float = 0.25
    synth_coarse: float | None = None
    holdout_samples: int | None = None

    def __post_init__(self) -> None:
        if self.recal not in RECAL_CHOICES:
            raise UsageError(f"bad --recal '{self.recal}': choose one of {', '.join(RECAL_CHOICES)}")
        if self.synth_samples is not None and not (isinstance(self.synth_samples, int) and self.synth_samples >= 1):
            raise UsageError(f"bad --synth-samples {self.synth_samples!r}: give 1 or more, e.g. 32")
        if self.synth_steps is not None and not (isinstance(self.synth_steps, int) and self.synth_steps >= 0):
            raise UsageError(f"bad --synth-steps {self.synth_steps!r}: give 0 or more, e.g. 100")
        require_finite("synth_lr", self.synth_lr, lo=1e-9)
        if self.synth_coarse is not None:
            require_finite("synth_coarse", self.synth_coarse, lo=0.0, hi=1.0)
        if self.holdout_samples is not None and not (isinstance(self.holdout_samples, int)
                                                     and self.holdout_samples >= 0):
            raise UsageError(f"bad holdout_samples {self.holdout_samples!r}: give 0 or more")

    def apply(self, ctx: Context) -> dict:
        if self.recal == "none":
            ctx.inputs, ctx.estimator = None, "none (FP statistics kept)"
            return {"source": "none"}
        if self.recal == "real":
            if ctx.real_inputs is None:
                raise UsageError("--recal real is a labelled reference that needs --data (it reads real images)")
            ctx.inputs = ctx.real_inputs.to(ctx.device)
            ctx.shared["inputs_real"] = True
            ctx.estimator = f"REAL-DATA reference ({len(ctx.real_inputs)} images; not data-free)"
            return {"source": "real", "images": len(ctx.real_inputs)}
        if ctx.bn_status != "real":
            ctx.inputs = None
            ctx.estimator = (f"none: the model's BN layers carry no statistics ({ctx.bn_status}; BN folded before "
                             f"publication?), so nothing can be synthesised")
            return {"source": "none", "skipped": f"bn statistics {ctx.bn_status}"}
        budget = synth_budget(ctx.input_shape)
        n = self.synth_samples or budget.samples
        steps = budget.steps if self.synth_steps is None else self.synth_steps
        coarse = budget.coarse if self.synth_coarse is None else self.synth_coarse
        fp = ctx.fp_model if ctx.device.type == "cpu" else _on(ctx.fp_model, ctx.device)
        syn = synthesize_inputs(fp, ctx.input_shape, n=n, steps=steps, lr=self.synth_lr, seed=ctx.seed,
                                progress=ctx.task("synthesise inputs"), device=ctx.device, coarse=coarse)
        ctx.inputs = syn.inputs
        n_hold = max(2, n // 2) if self.holdout_samples is None else self.holdout_samples
        hold = None
        if n_hold:
            hold = synthesize_inputs(fp, ctx.input_shape, n=n_hold, steps=steps, lr=self.synth_lr,
                                     seed=ctx.seed + HOLDOUT_SEED, progress=ctx.task("synthesise held-out inputs"),
                                     device=ctx.device, coarse=coarse)
            ctx.holdout = hold.inputs
        c2f = f", the first {syn.coarse_steps} at half size" if syn.coarse_steps else ""
        ctx.estimator = (f"synthetic BN-statistics matching ({n} samples at {ctx.input_shape[1]}x{ctx.input_shape[2]} "
                         f"px, {syn.steps} Adam steps{c2f}; no data)")
        per_bn = bn_matching_losses(fp, syn.inputs)
        ctx.shared["bn_mismatch"] = per_bn  # recalibrate trusts the synthetic inputs where they match (step_by)
        return {"source": "synthetic", "samples": n, "steps_run": syn.steps, "steps_max": steps,
                "coarse_steps": syn.coarse_steps,
                "resolution": int(ctx.input_shape[1]), "stopped_early": syn.stopped_early,
                "loss_initial": round(syn.initial_loss, 5), "loss_final": round(syn.final_loss, 5),
                "holdout_samples": n_hold, "holdout_loss_final": None if hold is None else round(hold.final_loss, 5),
                "per_bn": synthesis_quality(per_bn)}


def synthesis_quality(per_bn: dict[str, float]) -> dict:
    """Summary of the per-BN-layer matching loss (:func:`calib_free.synth.bn_matching_losses`) for the report: the
    layer count, median and mean, the layers above 1 (a mismatch of about one standard deviation or more), and the
    five worst layers (``name loss``, comma-separated)."""
    vals = sorted(per_bn.values())
    if not vals:
        return {"layers": 0}
    worst = sorted(per_bn.items(), key=lambda kv: -kv[1])[:5]
    return {"layers": len(vals), "median": round(vals[len(vals) // 2], 4), "mean": round(sum(vals) / len(vals), 4),
            "above_1": sum(v > 1 for v in vals), "worst": ", ".join(f"{k} {v:.3g}" for k, v in worst)}


def _on(model, device):
    import copy
    return copy.deepcopy(model).to(device)
