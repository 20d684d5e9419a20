"""Command line: ``dfmpc-deploy build | models | inspect | export | eval | sweep`` (sweep:
dfmpc_deploy/sweep/command.py).

The build flags are not spelled here: they are the fields of :class:`dfmpc_deploy.build.BuildConfig` and of every
registered pass (dfmpc_deploy.passes), each declaring its flag once (core.options). The parsed namespace holds only
the flags the user gave, so "which flags did the user set" needs no second look at ``argv``.

User errors (:class:`DfmpcError`) print one line ``error: ...`` and exit 1 (2 for usage errors); anything else keeps
its traceback, because it is a bug. Ctrl-C exits 130, SIGTERM 143; neither leaves partial output.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def _startup_sigint(signum, frame) -> None:  # a Ctrl-C while the heavy modules import: acted on once main() runs
    _SIGINT.append(signum)


_SIGINT: list[int] = []
# Only the command line itself defers Ctrl-C during its ~5 s of imports (torch): a KeyboardInterrupt raised inside an
# import is a traceback, or is swallowed by a library's ``except`` and the build runs on to exit 0. A program that
# merely imports this module keeps Python's own handler.
if (os.path.basename(sys.argv[0] if sys.argv else "") in ("dfmpc-deploy", "__main__.py")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _startup_sigint)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__  # noqa: E402
from .build import BuildConfig, run_build  # noqa: E402
from .core.options import add_arguments, options_of  # noqa: E402
from .core.progress import Progress  # noqa: E402
from .errors import BadFileError, DfmpcError, UsageError, one_line  # noqa: E402
from .io.container import inspect_packed  # noqa: E402
from .io.files import emit, os_error_line, silence_stdout  # noqa: E402
from .io.outdir import interrupt_status, terminate_as_interrupt  # noqa: E402
from .packed import EvalConfig, ExportConfig, run_eval, run_export, top_line  # noqa: E402
from .passes.recipes import PASS_CLASSES, RECIPES  # noqa: E402
from .replay import replay  # noqa: E402
from .report import report_json  # noqa: E402
from .report.export import ExportReport, export_report_json  # noqa: E402
from .sweep.command import add_parser as add_sweep_parser  # noqa: E402
from .zoo.models import REGISTRY  # noqa: E402

__all__ = ["main", "SUBCOMMANDS"]

log = logging.getLogger("dfmpc_deploy")

_BUILD_EXAMPLE = """example:
  dfmpc-deploy build resnet56_cifar10_optA \\
      --weights ../shared/data/weights/akamaster_cifar10/resnet56-4bfd9763.th \\
      --bits 2/6 --data imagefolder:../shared/data/cifar10-test-jpg/test --target torch --out OUT
  dfmpc-deploy build resnet50 --weights random --bits 2/6 --target ort trt --out out/r50
  dfmpc-deploy build --from-report OUT/report.json --out OUT2     # the same model again, bit for bit"""


def _add_build(sub) -> None:
    p = sub.add_parser("build", parents=[_common()],
                       help="compensate a model to mixed precision, pack, export and report",
                       description="Quantize MODEL with a recipe of passes (default dfmpc: low/high-bit pairs with "
                                   "DF-MPC compensation, no data, no fine-tuning), pack it, optionally export and "
                                   "benchmark it, and write a report. Methods: " + "; ".join(
                                       f"{r.name} = {r.description} [data: {r.data_used}]" for r in RECIPES.values()),
                       epilog=_BUILD_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model name (see 'dfmpc-deploy models'); not with --from-report")
    p.add_argument("--from-report", type=Path, metavar="REPORT", default=None,
                   help="rebuild the model of a build's report.json: its options, weights (checked by SHA-256), "
                        "every pass configuration, seed, threads and device; only --out and --force apply")
    seen: set[str] = set()
    add_arguments(p, options_of(BuildConfig), seen)
    group = p.add_argument_group("compensation passes", "flags of the passes; a --method that does not run a pass, "
                                 "or pins its value, says so on stderr")
    for cls in PASS_CLASSES:
        add_arguments(group, options_of(cls), seen)
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    import dataclasses

    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and k != "from_report"}
    warn = lambda m: print(f"warning: {one_line(m, 1000)}", file=sys.stderr, flush=True)  # noqa: E731
    if args.from_report is not None:
        extra = [f"--{k.replace('_', '-')}" for k in given if k not in ("model", "out", "force")]
        if args.model is not None or extra:
            raise UsageError(f"--from-report replays every recorded setting: drop {args.model or ' '.join(extra)} "
                             f"(only --out and --force apply)")
        with Progress(enabled=None if not args.quiet else False) as prog:
            rep = replay(args.from_report, given.get("out"), given.get("force", False), prog, warn)
        return _print_build(args, rep, given.get("out", BuildConfig.__dataclass_fields__["out"].default))
    if args.model is None:
        raise UsageError("give a MODEL name (dfmpc-deploy models lists them) or --from-report REPORT")
    build_fields = {f.name for f in dataclasses.fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in given.items() if k in build_fields},
                      settings={k: v for k, v in given.items() if k not in build_fields})
    with Progress(enabled=None if not args.quiet else False) as prog:
        rep = run_build(cfg, progress=prog, warn=warn)
    return _print_build(args, rep, cfg.out)


def _print_build(args, rep, out: Path) -> int:
    if args.json:
        emit(report_json(rep))
    elif not args.quiet:
        emit(_summary(rep, Path(out)))
    return 0


def _summary(rep, out: Path) -> str:
    """Three lines for the terminal from the typed report."""
    estimator = rep.statistics.estimator if rep.statistics else ""
    lines = [f"{rep.model} {rep.bits.display()} ({rep.method}; statistics: {estimator})"]
    if rep.accuracy is not None:
        parts = [f"{k} {v.top1:.2f}%" for k, v in rep.accuracy.results.items()]
        lines.append(f"top-1 on {rep.accuracy.n} images: " + ", ".join(parts))
    if rep.size_bytes.packed is not None:
        sz = rep.size_bytes
        lines.append(f"size: fp32 {sz.fp32 / 1e6:.2f} MB -> packed {sz.packed.packed / 1e6:.3f} MB")
    lines.append(f"compensation took {rep.timings_s.get('compensate', 0):.2f} s; report: {out / 'report.md'}")
    return "\n".join(lines)


def _add_models(sub) -> None:
    p = sub.add_parser("models", parents=[_common()], help="list the model names build accepts",
                       epilog="example:\n  dfmpc-deploy models", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    specs = [REGISTRY[name] for name in sorted(REGISTRY)]
    if args.json:
        emit(json.dumps([{"name": s.name, "input_size": s.input_size, "num_classes": s.num_classes,
                          "source": s.source} for s in specs], indent=2))
    elif not args.quiet:
        emit("\n".join(f"{s.name:<26} {s.input_size:>3}px {s.num_classes:>5} classes  {s.source}" for s in specs))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", parents=[_common()], help="show a packed .dfmpc file: layers, sizes, checksums",
                       epilog="example:\n  dfmpc-deploy inspect OUT/model.dfmpc",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    """Print the check of every byte of the file (``--json``: ``{"file", "ok", "problems", "size"}``; ``-q``: only
    the exit status); exit 1 if anything is bad. A reader that closes the pipe early (``inspect ... | head -1``) ends
    the output quietly; the exit status still says whether the file is valid."""
    result = inspect_packed(args.file)
    if args.json:
        emit(json.dumps({"file": str(args.file), "ok": result.ok, "problems": list(result.problems),
                         "size": result.report}, indent=2, allow_nan=False))
    elif not args.quiet:
        emit(result.text)
    if not result.ok:
        raise BadFileError(f"{args.file}: {len(result.problems)} problem(s), the first: {result.problems[0]}")
    return 0


_EXPORT_EXAMPLE = """examples:
  dfmpc-deploy export OUT/model.dfmpc --target onnx ort --out DEPLOY
  dfmpc-deploy export model.dfmpc --target trt --data cifar10:DIR --limit 500 --out ENGINES   # on the device"""


def _add_export(sub) -> None:
    p = sub.add_parser("export", parents=[_common()],
                       help="ONNX files, ONNX Runtime latency and TensorRT engines from a packed .dfmpc file alone",
                       description="Make every ONNX variant (fp32, fp16, wdq, w8a8, w8a8_ort) and TensorRT engine that "
                                   "build --target makes, from the packed file alone (no FP weights, no compensation, "
                                   "no download), with each artifact's parity against the packed model and its "
                                   "latency in DIR/report.json. Exit 1 if a parity check fails (everything is still "
                                   "written).",
                       epilog=_EXPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="a .dfmpc file written by build")
    add_arguments(p, options_of(ExportConfig), set())
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    cfg = ExportConfig(**{k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS})
    with Progress(enabled=None if not args.quiet else False) as prog:
        rep = run_export(cfg, prog)
    if args.json:
        emit(export_report_json(rep), end="")
    elif not args.quiet:
        emit(_export_summary(rep, cfg.out))
    failed = [k for k, p in rep.parity.items() if p.ok is False]
    if failed:
        raise DfmpcError(f"parity check FAILED for {', '.join(failed)} (max abs diff "
                         f"{rep.parity[failed[0]].max_abs_diff:.3g}); see {cfg.out / 'report.json'}")
    return 0


def _export_summary(rep: ExportReport, out: Path) -> str:
    lines = [f"{rep.arch} from {rep.packed_file} (input {'x'.join(map(str, rep.input_shape))}, from the "
             f"{rep.input_source}): {len(rep.artifacts)} artifacts in {out}"]
    for k, p in rep.parity.items():
        lines.append(f"  {k:<24} max |diff| {p.max_abs_diff:.3g} of {p.max_abs_ref:.3g}, top-1 agreement "
                     f"{100 * p.top1_agreement:.1f}%" + ("" if p.ok is None else "  ok" if p.ok else "  FAILED"))
    if rep.accuracy is not None:
        lines.append(f"top-1 on {rep.accuracy.n} images: " + ", ".join(
            f"{k} {v.top1:.2f}%" for k, v in rep.accuracy.results.items()))
    return "\n".join(lines)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", parents=[_common()], help="top-1/top-5 of a packed .dfmpc file on labelled images",
                       description="Evaluate a packed file where it is deployed: the input size and normalisation "
                                   "come from the file. --json prints only {\"top1\", \"top5\", \"n\"}.",
                       epilog="example:\n  dfmpc-deploy eval OUT/model.dfmpc --data imagefolder:DIR --limit 2000 "
                              "--json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="a .dfmpc file written by build")
    add_arguments(p, options_of(EvalConfig), set())
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS})
    with Progress(enabled=None if not args.quiet else False) as prog:
        result = run_eval(cfg, prog)
    if args.json:
        emit(json.dumps({k: result[k] for k in ("top1", "top5", "n")}, allow_nan=False))
    elif not args.quiet:
        emit(top_line(result, cfg))
    return 0


def _add_sweep(sub) -> None:
    add_sweep_parser(sub, _common())


SUBCOMMANDS = (_add_build, _add_models, _add_inspect, _add_export, _add_eval, _add_sweep)
_NOT_SETTINGS = {"command", "func", "quiet", "json", "verbose"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfmpc-deploy",
                                description="Data-free mixed-precision compensation and deployment.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,models,inspect,export,eval,sweep}")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--quiet", "-q", action="store_true", help="no progress or summary output")
    c.add_argument("--json", action="store_true", help="print the result as JSON on stdout (nothing else goes there)")
    c.add_argument("--verbose", "-v", action="store_true", help="log each stage")
    return c


def _on_sigint(signum, frame) -> None:
    _SIGINT.append(signum)
    raise KeyboardInterrupt


def _error(text: str) -> None:
    """The one line of a failed command on stderr (flattened, escapes shown, never raising)."""
    try:
        print(f"error: {one_line(text, 1000)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 user error, 2 usage error, 130 SIGINT, 143 SIGTERM).

    Every error is one line: a :class:`DfmpcError`, an ``OSError`` the commands did not name themselves (a path too
    long, a full disk, a closed stdout: :func:`~dfmpc_deploy.io.files.os_error_line`) and a ``MemoryError``. A
    Ctrl-C at any time, the startup imports included, exits 130 and is never swallowed: a run that saw one does not
    exit 0.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    if main_thread and old_sigint in (signal.default_int_handler, _startup_sigint):
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = _main(argv)
    finally:
        if main_thread and old_sigint in (signal.default_int_handler, _startup_sigint):
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if _SIGINT and code == 0:  # a library swallowed the KeyboardInterrupt: the run still was interrupted
        print("interrupted (SIGINT)", file=sys.stderr)
        code = 130
    _SIGINT.clear()
    return code


def _main(argv: Sequence[str] | None) -> int:
    with terminate_as_interrupt():  # SIGTERM/SIGHUP -> Terminated (a KeyboardInterrupt): same cleanup as Ctrl-C
        try:
            if _SIGINT:
                raise KeyboardInterrupt
            parser = _parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as done:  # --help, --version (0) or a malformed command line (2, usage printed)
                return int(done.code or 0)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
            try:
                return args.func(args)
            except UsageError as err:
                parser.print_usage(sys.stderr)
                print(f"{parser.prog}: error: {one_line(str(err), 1000)}", file=sys.stderr)
                return err.exit_code
        except DfmpcError as err:
            _error(str(err))
            return err.exit_code
        except OSError as err:  # the environment, not a bug: ENAMETOOLONG, ENOSPC, EACCES, EIO, ...
            _error(os_error_line(err))
            return 1
        except RuntimeError as err:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory", CUDA OOM
            if not any(w in str(err) for w in ("can't allocate memory", "out of memory", "not enough memory")):
                raise
            _error(f"not enough memory for this command ({one_line(str(err), 160)}); use smaller batch sizes or "
                   f"fewer samples; nothing was written")
            return 1
        except MemoryError:
            _error("not enough memory for this command (the input is too large for this machine, or a memory "
                   "limit is set); nothing was written")
            return 1
        except KeyboardInterrupt as err:
            name, code = interrupt_status(err)  # 130 SIGINT, 143 SIGTERM, 129 SIGHUP
            print(f"interrupted ({name}): nothing was written", file=sys.stderr)
            return code
    return 0


def entrypoint() -> None:
    """Console entry: exit with :func:`main`'s code. After an interrupt the code is final (130 / 143, the cleanup
    done): the process leaves at once (``os._exit`` after flushing), so that nothing in interpreter shutdown (library
    threads, a signal still pending there) can turn it into a death by signal. A stdout that cannot take the last
    buffered bytes (a closed pipe, a full disk) is silenced instead of failing again at exit."""

    code = main()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        silence_stdout()
        if code == 0:
            _error("cannot write the output to stdout")
            code = 1
    if code in (129, 130, 143):
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)
    sys.exit(code)
