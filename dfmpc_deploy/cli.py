"""Command line: ``dfmpc-deploy build | models | inspect``.

User errors (:class:`DfmpcError`) print one line ``error: ...`` and exit 1 (2 for usage errors); anything else keeps
its traceback, because it is a bug. Ctrl-C exits 130 and leaves no partial output.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .core.config import QuantConfig, parse_bits
from .errors import DfmpcError, UsageError
from .passes.recipes import FLAGS, METHODS

__all__ = ["main", "SUBCOMMANDS"]

log = logging.getLogger("dfmpc_deploy")

_BUILD_EXAMPLE = """example:
  dfmpc-deploy build resnet56_cifar10_optA \\
      --weights ../shared/data/weights/akamaster_cifar10/resnet56-4bfd9763.th \\
      --bits 2/6 --data imagefolder:../shared/data/cifar10-test-jpg/test --target torch --out OUT
  dfmpc-deploy build resnet50 --weights random --bits 2/6 --target ort trt --out out/r50"""


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return vals  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return v


def _explicit_fields(argv: Sequence[str]) -> frozenset[str]:
    """QuantConfig fields whose build flags (methods.FLAGS) appear in ``argv``, whatever the value given."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return frozenset(f for f, flag in FLAGS.items() if flag in given)


def _add_build(sub) -> None:
    p = sub.add_parser("build", parents=[_common()], help="compensate a model to mixed precision, pack, export and report",
                       description="Quantize MODEL to low/high-bit pairs with DF-MPC compensation (no data, no "
                                   "fine-tuning), pack it, optionally export/benchmark it, and write a report.",
                       epilog=_BUILD_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model name (see 'dfmpc-deploy models')")
    p.add_argument("--weights", default="pretrained",
                   help="'pretrained' (download), 'random' (seeded, for size/latency/export only) or a local "
                        ".pth/.th/.safetensors state dict (default: pretrained)")
    p.add_argument("--bits", default="2/6", help="LOW/HIGH bit widths, 2 <= LOW <= HIGH <= 8; 2 = ternary (default 2/6)")
    p.add_argument("--method", default="dfmpc", choices=list(METHODS),
                   help="quantization method (default dfmpc): " + "; ".join(
                       f"{s.name} = {s.description} [data: {s.data_used}]" for s in METHODS.values()))
    p.add_argument("--lambda1", type=float, default=0.5, help="Eq. 22 weight of the BN bias term (default 0.5)")
    p.add_argument("--lambda2", type=float, default=0.0, help="Eq. 22 ridge on c (default 0)")
    p.add_argument("--c-mode", default="off", choices=["paper", "norm", "off"],
                   help="fold the closed-form c: 'paper' (Eq. 27), 'norm' (without least-squares shrinkage) or "
                        "'off' (default: c = 1; measured best once the BN statistics are re-estimated, see README)")
    p.add_argument("--recal", default="synthetic", choices=["synthetic", "none", "real"],
                   help="BN statistics of the low-bit layers: 'synthetic' (data-free, default), 'none', or "
                        "'real' (labelled reference using 200 images of --data)")
    p.add_argument("--recal-scope", default=QuantConfig.recal_scope, choices=["low", "all"],
                   help="re-estimate only the low-bit layers' BN (default) or every BN")
    p.add_argument("--rounding", default=QuantConfig.rounding, choices=["nearest", "gptq"],
                   help="code choice: 'nearest' (the paper) or 'gptq' error feedback on the synthetic samples")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel quantizer ranges")
    p.add_argument("--size-budget-mb", type=_positive_float, metavar="MB",
                   help="choose each layer's width in LOW..HIGH of --bits by data-free sensitivity so that "
                        "model.dfmpc fits MB megabytes (10^6 bytes); e.g. 0.54")
    p.add_argument("--avg-bits", type=_positive_float,
                   help="the same, as an average of bits per weight of the integer codes (ternary = 1.6), e.g. 3.5")
    p.add_argument("--finetune-steps", type=int, default=QuantConfig.finetune_steps,
                   help=f"gdfq only: generator + fine-tuning iterations (default {QuantConfig.finetune_steps})")
    p.add_argument("--synth-samples", type=_positive_int, default=QuantConfig.synth_samples)
    p.add_argument("--synth-steps", type=_positive_int, default=QuantConfig.synth_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="evaluation data: imagefolder:DIR, cifar10:DIR or cifar100:DIR")
    p.add_argument("--limit", type=_positive_int, help="evaluate on N evenly spaced images")
    p.add_argument("--mean", type=_floats3, help="override input normalisation mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats3, help="override input normalisation std")
    p.add_argument("--target", nargs="+", default=["torch"], choices=["torch", "onnx", "ort", "trt", "torch-cuda"],
                   help="artifacts to produce/time (default torch: fake-quant model only)")
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 8, 32])
    p.add_argument("--no-pack", action="store_true", help="skip writing model.dfmpc")
    p.add_argument("--compress", action="store_true",
                   help="Huffman-code the integer codes in model.dfmpc (trained weights: ~0.8x the dense file)")
    p.add_argument("--out", required=True, type=Path, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow full unpickling of a --weights file you trust (default: tensors only)")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from .build import BuildConfig, run_build
    from .core.progress import Progress
    from .zoo.data import parse_data_spec

    bits = parse_bits(args.bits)
    qcfg = QuantConfig(bits=bits, lambda1=args.lambda1, lambda2=args.lambda2,
                       compensation=args.c_mode != "off", c_mode="paper" if args.c_mode == "off" else args.c_mode,
                       per_channel=args.per_channel, recal=args.recal, recal_scope=args.recal_scope,
                       rounding=args.rounding, synth_samples=args.synth_samples, synth_steps=args.synth_steps,
                       seed=args.seed, finetune_steps=args.finetune_steps, avg_bits=args.avg_bits,
                       size_budget_bytes=round(args.size_budget_mb * 1e6) if args.size_budget_mb else None)
    data = parse_data_spec(args.data) if args.data else None
    from .zoo.models import get_spec
    get_spec(args.model)  # fail fast on an unknown name
    cfg = BuildConfig(model=args.model, weights=args.weights, quant=qcfg, method=args.method, data=data,
                      limit=args.limit, mean=args.mean, std=args.std, targets=tuple(args.target),
                      batch_sizes=tuple(args.batch_sizes), out=args.out, force=args.force,
                      unsafe_pickle=args.unsafe_pickle, pack=not args.no_pack, compress=args.compress,
                      explicit=_explicit_fields(sys.argv[1:] if args.argv is None else args.argv))
    with Progress(enabled=None if not args.quiet else False) as prog:
        rep = run_build(cfg, progress=prog, warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rep, indent=2))
    elif not args.quiet:
        print(_summary(rep, args.out))
    return 0


def _summary(rep: dict, out: Path) -> str:
    lines = [f"{rep['model']} {rep['bits']} ({rep['method']}; statistics: {rep['estimator']})"]
    acc = rep.get("accuracy")
    if acc:
        parts = [f"{k} {v['top1']:.2f}%" for k, v in acc.items() if isinstance(v, dict) and "top1" in v]
        lines.append(f"top-1 on {acc['n']} images: " + ", ".join(parts))
    sz = rep.get("size_bytes", {})
    if "packed" in sz:
        lines.append(f"size: fp32 {sz['fp32'] / 1e6:.2f} MB -> packed {sz['packed'] / 1e6:.3f} MB")
    lines.append(f"compensation took {rep['timings_s'].get('compensate', 0):.2f} s; report: {out / 'report.md'}")
    return "\n".join(lines)


def _add_models(sub) -> None:
    p = sub.add_parser("models", parents=[_common()], help="list the model names build accepts",
                       epilog="example:\n  dfmpc-deploy models", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from .zoo.models import REGISTRY
    for name in sorted(REGISTRY):
        s = REGISTRY[name]
        print(f"{name:<26} {s.input_size:>3}px {s.num_classes:>5} classes  {s.source}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", parents=[_common()], help="show a packed .dfmpc file: layers, sizes, checksums",
                       epilog="example:\n  dfmpc-deploy inspect OUT/model.dfmpc",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    """Print the check of every byte of the file; exit 1 if anything is bad. A reader that closes the pipe early
    (``inspect ... | head -1``) ends the output quietly; the exit status still says whether the file is valid."""
    import os

    from .errors import BadFileError
    from .io.container import inspect_packed
    result = inspect_packed(args.file)
    try:
        print(result.text, flush=True)
    except BrokenPipeError:  # silence the interpreter's own flush of the closed stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if not result.ok:
        raise BadFileError(f"{args.file}: {len(result.problems)} problem(s), the first: {result.problems[0]}")
    return 0


SUBCOMMANDS = (_add_build, _add_models, _add_inspect)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfmpc-deploy", description="Data-free mixed-precision compensation and deployment.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,models,inspect}")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--quiet", "-q", action="store_true", help="no progress or summary output")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--verbose", "-v", action="store_true", help="log each stage")
    return c


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except UsageError as err:
        parser.error(str(err))  # exits 2 with the usage line
    except DfmpcError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


def entrypoint() -> None:
    sys.exit(main())
