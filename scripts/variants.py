"""One build of a model by a recipe with chosen settings: the data-free proxies first, then top-1 (issue 19 variants).

Each run is appended as one JSON line to results/issue19_variants.jsonl (``--log``), with what the passes reported
(synthesis loss, guard, statistics chosen) and two data-free proxies: the guard's held-out KL, and the KL and the
top-1 agreement with the FP model on ``--val-samples`` further synthetic inputs (another seed; made once per model
and cached under ``--cache``). The accuracy on the images comes last, so that a variant is judged by the proxies and
the images only report it (README, "Choices by data-free criteria").

    python scripts/variants.py --model mbv2 --method dfmpc --set bits=4 per_channel=true [--set seed=1] [--limit N]

``--set`` takes ``field=value`` pairs of the recipe's settings (CLI flags map 1:1 to field names; values are read as
JSON where they parse, else as strings); ``seed`` is the build seed. ``--tag`` labels a run made with a code change
that no setting exposes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from calib_free import synth_budget, synthesize_inputs
from dfmpc_deploy.passes.base import run_recipe
from dfmpc_deploy.passes.calibrate import Calibrate
from dfmpc_deploy.passes.guard import mean_kl
from dfmpc_deploy.passes.recipes import RECIPES
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR = SHARED / "weights" / "akamaster_cifar10"
MODELS = {  # name: (architecture, weights, weights format, input shape, data spec, resize)
    "mbv2": ("mobilenet_v2", SHARED / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_bn_restored.pth",
             "torchvision-quantized", (3, 224, 224), f"imagenet:{SHARED / 'imagenet_val_1300'}", 256),
    "mbv2f": ("mobilenet_v2", SHARED / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_tvq_dequant_float.pth",
              "torchvision-quantized", (3, 224, 224), f"imagenet:{SHARED / 'imagenet_val_1300'}", 256),
    "r20": ("resnet20_cifar10_optA", CIFAR / "resnet20-12fca82f.th", "auto", (3, 32, 32),
            f"imagefolder:{SHARED / 'cifar10-test-jpg' / 'test'}", None),
    "r56": ("resnet56_cifar10_optA", CIFAR / "resnet56-4bfd9763.th", "auto", (3, 32, 32),
            f"imagefolder:{SHARED / 'cifar10-test-jpg' / 'test'}", None),
}
VAL_SEED = 1_000_003


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _flatten(info: dict, prefix: str) -> dict:
    keep = ("loss_final", "holdout_loss_final", "guard", "stats", "stats_kl", "rounded_layers", "grouped_rounded",
            "grid_multipliers", "output_steps_changed", "equalized", "kept")
    return {f"{prefix}.{k}": v for k, v in info.items() if k in keep}


@torch.no_grad()
def _proxy(fp, q, x: torch.Tensor) -> tuple[float, float]:
    """Mean KL(p_FP || p_Q) and top-1 agreement (%) on ``x``."""
    lp, lq = F.log_softmax(fp(x).float(), 1), F.log_softmax(q(x).float(), 1)
    return mean_kl(lp, lq), float((lp.argmax(1) == lq.argmax(1)).float().mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="mbv2")
    ap.add_argument("--method", default="dfmpc", choices=sorted(RECIPES))
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--tag", default="", help="labels a code change that no setting exposes")
    ap.add_argument("--limit", type=int, help="evaluate on this many images (evenly spaced)")
    ap.add_argument("--val-samples", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cache", default="/tmp/dfmpc_variants_cache")
    ap.add_argument("--log", default=str(ROOT / "results" / "issue19_variants.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch, weights, fmt, shape, data, resize = MODELS[args.model]
    settings = dict(kv.split("=", 1) for kv in args.set)
    settings = {k: v if k == "bits" else _value(v) for k, v in settings.items()}
    seed = int(settings.pop("seed", 0))
    lm = load_model(arch, str(weights), weights_format=fmt)
    t = time.perf_counter()
    mp = run_recipe(RECIPES[args.method], lm.module, shape, settings, arch=arch, seed=seed)
    seconds = round(time.perf_counter() - t, 1)
    row: dict = {"model": args.model, "method": args.method,
                 "settings": [f"{k}={json.dumps(v)}" for k, v in settings.items()] + ([f"seed={seed}"] if seed else []),
                 "tag": args.tag, "seconds": seconds, "threads": torch.get_num_threads()}
    for rec in mp.config.passes:
        row.update(_flatten(dict(rec.info), rec.name))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    vpath = cache / f"{args.model}_val{args.val_samples}.pt"
    if args.val_samples and lm.module is not None:
        if vpath.exists():
            xv = torch.load(vpath)
        else:
            xv = synthesize_inputs(lm.module, shape, n=args.val_samples, steps=40, lr=Calibrate.synth_lr,
                                   seed=VAL_SEED, coarse=synth_budget(shape).coarse).inputs
            torch.save(xv, vpath)
        row["val_kl"], row["val_agree"] = (round(v, 5) for v in _proxy(lm.module.eval(), mp.module.eval(), xv))
    print(json.dumps(row), flush=True)
    ds = load_dataset(parse_data_spec(data), shape[1], resize, lm.spec.mean, lm.spec.std, args.limit,
                      num_classes=1000 if args.model.startswith("mbv2") else 10)
    acc = accuracy(mp.module, ds)
    row.update(top1=acc["top1"], top5=acc["top5"], n=acc["n"])
    print(json.dumps({k: row[k] for k in ("settings", "tag", "val_kl", "val_agree", "top1", "n") if k in row}))
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
