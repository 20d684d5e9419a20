"""Data-free statistics: everything estimated from the model itself (its BatchNorm statistics), never from data.

This package has no dependency on ``dfmpc_deploy`` (dfmpc_deploy imports calib_free, never the reverse); its
``graph`` module is the graph vocabulary both share.
"""
from .bn_stats import BNStats, collect_bn_stats
from .recal import recalibrate_bn_
from .synth import SynthBudget, SynthResult, synth_budget, synthesize_inputs

__all__ = ["BNStats", "collect_bn_stats", "synthesize_inputs", "SynthResult", "SynthBudget", "synth_budget",
           "recalibrate_bn_"]
