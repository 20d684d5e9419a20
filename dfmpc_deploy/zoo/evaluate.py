"""Top-1 / top-5 accuracy of a model on a preprocessed :class:`~dfmpc_deploy.zoo.data.Dataset`.

Speed (measured on MobileNetV2, 224 px, 2 CPU threads): the model is evaluated as a *copy* in which every eval-mode
BatchNorm that is the sole consumer of a conv is folded into that conv (``torch.nn.utils.fusion``; the same function
up to float rounding, 1.2e-6 relative on the logits), in batches of about two million input pixels: 1.5x faster from
the folding. Engines (``engine=``):

* ``torch``: the copy in channels-last memory format (about 2x faster than contiguous);
* ``ort``: the copy exported to ONNX in memory and run by ONNX Runtime's CPU provider with as many threads as torch
  uses - 4.4x faster than ``torch`` on MobileNetV2 at 224 px (a batch of 39 images: 2.1 s against 9.1 s on the shared
  2-core machine), whose depthwise convolutions PyTorch's CPU kernels run slowly. Same function up to float rounding;
* ``auto`` (default): ``ort`` for inputs larger than 64x64 px when onnx and onnxruntime are installed and the model
  exports, else ``torch`` (small inputs such as CIFAR's keep the engine their published numbers were measured with).

The caller's model is never modified. A model torch.fx cannot trace is evaluated as it is, by torch.
"""
from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .._deps import available, require
from ..errors import DfmpcError, UsageError
from .data import Dataset

__all__ = ["accuracy", "logits", "auto_batch_size", "inference_copy", "ENGINES", "ort_forward"]

log = logging.getLogger("dfmpc_deploy")

_PIXELS_PER_BATCH = 2_000_000
#: evaluation engines (module docstring)
ENGINES = ("auto", "torch", "ort")
_ORT_MIN_PIXELS = 64 * 64  # ``auto`` uses ONNX Runtime for inputs larger than this


def auto_batch_size(images: torch.Tensor) -> int:
    """About two million input pixels per batch: 250 CIFAR images (32 px), 39 ImageNet images (224 px).

    Larger ImageNet batches only add memory traffic on a CPU (activations of 250 images at 224 px are gigabytes).
    """
    hw = images.shape[-1] * images.shape[-2] if images.dim() == 4 else 1
    return max(1, min(250, _PIXELS_PER_BATCH // max(hw, 1)))


def inference_copy(model: nn.Module, graph: fx.Graph | None = None) -> nn.Module | None:
    """An eval-mode copy of ``model`` with each conv -> BatchNorm pair folded into one conv, or None if untraceable.

    Only a BatchNorm2d in eval mode with running statistics whose input is a Conv2d output used by nothing else is
    folded (then the conv's output exists only through the BN, so folding changes no other value). ``graph``: the
    architecture's traced fx graph when the caller has one (``GraphAnalysis.graph``), so the model is not traced again.
    """
    try:
        copied = copy.deepcopy(model).eval()
        gm = fx.GraphModule(copied, copy.deepcopy(graph)) if graph is not None else fx.symbolic_trace(copied)
    except Exception as err:  # noqa: BLE001 - fx and deepcopy raise many types for dynamic models; eager still works
        log.debug("evaluating %s unfolded: %s", type(model).__name__, err)
        return None
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d) or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        bn = mods.get(bn_node.target) if bn_node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None or bn.running_var is None:
            continue
        fused = fuse_conv_bn_eval(mods[node.target], bn)
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        mods[node.target] = fused
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def ort_forward(run: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> logits`` computed by ONNX Runtime (CPU, ``torch.get_num_threads()`` threads) for the module ``run``,
    exported in memory with a symbolic batch dimension; None when onnx/onnxruntime are missing or the export or the
    session fails (the caller then evaluates with torch).

    Args:
        run: eval-mode module on the CPU (e.g. :func:`inference_copy`'s copy).
        example: one input batch (its first image is traced).
    """
    if not (available("onnx") and available("onnxruntime")):
        return None
    ort = require("onnxruntime", "ort")

    buf = io.BytesIO()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(run, (example[:1],), buf, **legacy, opset_version=17, input_names=["input"],  # type: ignore[arg-type]
                              output_names=["output"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on a shared CPU
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - the exporter and ORT raise many types; torch still evaluates it
        log.info("evaluating %s with torch: ONNX Runtime cannot run it (%s)", type(run).__name__,
                 str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    return lambda x: torch.from_numpy(sess.run(None, {"input": x.detach().float().contiguous().numpy()})[0])


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int | None = None,
           progress: Callable[[int, int], None] | None = None, graph: fx.Graph | None = None,
           engine: str = "auto") -> torch.Tensor:
    """Run ``model`` in eval mode over ``images`` in batches; returns (N, classes) float32 logits.

    4-D inputs run through :func:`inference_copy`, by ONNX Runtime or in channels-last memory format per ``engine``
    (see the module docstring); a model that cannot be traced runs as it is in torch, converted to channels-last
    for the run and back afterwards.

    Raises:
        UsageError: an unknown ``engine``.
    """
    if engine not in ENGINES:
        raise UsageError(f"bad evaluation engine '{engine}': choose one of {', '.join(ENGINES)}")
    model.eval()
    bs = batch_size or auto_batch_size(images)
    nhwc = images.dim() == 4
    run = inference_copy(model, graph) if nhwc else None
    if run is not None and len(images) and _on_cpu(run) and (
            engine == "ort" or (engine == "auto" and images.shape[-1] * images.shape[-2] > _ORT_MIN_PIXELS)):
        fwd = ort_forward(run, images[:1])
        if fwd is not None:
            log.info("evaluating %s with ONNX Runtime (%d threads)", type(model).__name__, torch.get_num_threads())
            return _batched(fwd, images, bs, progress)
    in_place = run is None
    if run is None:
        run = model
    if nhwc:
        run.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid, missing in the stubs
    try:
        return _batched(lambda x: run(x.contiguous(memory_format=torch.channels_last) if nhwc else x), images, bs,
                        progress)
    finally:
        if nhwc and in_place:
            model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _batched(fwd: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, bs: int,
             progress: Callable[[int, int], None] | None) -> torch.Tensor:
    outs = []
    for i in range(0, len(images), bs):
        outs.append(fwd(images[i:i + bs]).float())
        if progress:
            progress(min(i + bs, len(images)), len(images))
    return torch.cat(outs) if outs else torch.empty(0, 0)


def accuracy(model: nn.Module, data: Dataset, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None, graph: fx.Graph | None = None,
             engine: str = "auto") -> dict:
    """Top-1 and top-5 in percent, with the number of images (``engine``: see the module docstring).

    Returns:
        ``{"top1": float, "top5": float, "n": int}``

    Raises:
        DfmpcError: a label outside the model's classes (the data belongs to another label set), or no images.
    """
    if len(data.labels) == 0:
        raise DfmpcError(f"dataset '{data.name}' has no images to evaluate")
    out = logits(model, data.images, batch_size, progress, graph, engine)
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
