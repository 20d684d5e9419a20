"""Model loading: pytorchcv names, the CIFAR option-A ResNets, local weight files, or any nn.Module.

pytorchcv constructors are imported from ``pytorchcv.models.<module>`` directly, never through
``pytorchcv.model_provider`` (which imports torchvision).
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._deps import require
from ..errors import DfmpcError
from .cifar_resnet import OPTA_DEPTHS, CifarResNet

__all__ = ["ModelSpec", "REGISTRY", "model_names", "get_spec", "load_model", "load_state_dict_file", "LoadedModel"]

log = logging.getLogger("dfmpc_deploy")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_AKAMASTER_FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
                    56: "resnet56-4bfd9763.th", 110: "resnet110-1d1ed7c2.th"}


@dataclass(frozen=True)
class ModelSpec:
    """What we know about a named architecture.

    Args:
        name: the name users type.
        build: ``build(pretrained: bool) -> nn.Module``.
        input_size: square input side in pixels.
        mean, std: input normalisation on RGB in [0, 1].
        resize: resize the shorter side to this before the centre crop (ImageNet style), or None.
        num_classes: size of the classifier.
        source: where the pretrained weights come from (shown by ``dfmpc-deploy models``).
    """

    name: str
    build: Callable[[bool], nn.Module]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None
    num_classes: int
    source: str


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with the provenance of its weights."""

    module: nn.Module
    spec: ModelSpec
    weights: str  # "pretrained" | "random" | a file path | "module"
    extra: dict = field(default_factory=dict)


def _pytorchcv(module: str, fn: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        require("pytorchcv", "models")
        ctor = getattr(importlib.import_module(f"pytorchcv.models.{module}"), fn)
        if not pretrained:
            return ctor(pretrained=False)
        try:
            return ctor(pretrained=True)
        except Exception as err:  # network or cache errors surface as many different exception types
            raise DfmpcError(
                f"could not fetch pytorchcv's pretrained weights for '{fn}' ({type(err).__name__}: {err}); "
                f"if you are offline pass --weights FILE (a local state dict) or --weights random") from err
    return build


def _opta(depth: int) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        model = CifarResNet(depth)
        if pretrained:
            url = _AKAMASTER + _AKAMASTER_FILES[depth]
            try:
                sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            except Exception as err:  # urllib raises several types; all mean "not reachable"
                raise DfmpcError(f"could not download {url} ({err}); pass --weights FILE or --weights random") from err
            _load_into(model, sd, url)
        return model
    return build


def _spec_list() -> list[ModelSpec]:
    imnet = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256, num_classes=1000,
                 source="pytorchcv (ImageNet-1k)")
    cifar = dict(input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, resize=None, source="pytorchcv (CIFAR)")
    specs = [ModelSpec(n, _pytorchcv(mod, n), **imnet) for mod, n in [
        ("resnet", "resnet18"), ("resnet", "resnet34"), ("resnet", "resnet50"), ("resnet", "resnet101"),
        ("resnet", "resnet152"), ("vgg", "vgg16"), ("vgg", "bn_vgg16"), ("densenet", "densenet121"),
        ("mobilenetv2", "mobilenetv2_w1")]]
    for d in (20, 56, 110):
        specs.append(ModelSpec(f"resnet{d}_cifar10", _pytorchcv("resnet_cifar", f"resnet{d}_cifar10"),
                               num_classes=10, **cifar))
        specs.append(ModelSpec(f"resnet{d}_cifar100", _pytorchcv("resnet_cifar", f"resnet{d}_cifar100"),
                               num_classes=100, **cifar))
    for d in OPTA_DEPTHS:
        specs.append(ModelSpec(f"resnet{d}_cifar10_optA", _opta(d), 32, IMAGENET_MEAN, IMAGENET_STD, None, 10,
                               "akamaster/pytorch_resnet_cifar10 (option-A shortcuts)"))
    return specs


REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _spec_list()}


def model_names() -> list[str]:
    """All names that ``build`` accepts."""
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Look up a model name; unknown names raise a one-line error with close matches."""
    if name in REGISTRY:
        return REGISTRY[name]
    prefixed = [n for n in sorted(REGISTRY) if n.lower().startswith(name.lower())]
    close = (prefixed + [n for n in difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
                         if n not in prefixed])[:4]
    hint = f"did you mean {', '.join(close)}?" if close else "run 'dfmpc-deploy models' for the list"
    raise DfmpcError(f"unknown model '{name}': {hint}")


def load_state_dict_file(path: str | os.PathLike, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch pickle (.pth/.pt/.th), safely by default.

    Handles checkpoints wrapping the weights in ``state_dict``/``model`` and strips ``module.`` prefixes.

    Raises:
        DfmpcError: missing/unreadable file, or a pickle that needs ``--unsafe-pickle``.
    """
    p = Path(path)
    if not p.is_file():
        raise DfmpcError(f"weights file '{p}' does not exist (pass a .pth/.th/.safetensors file, 'pretrained' or "
                         f"'random')")
    if p.suffix == ".safetensors":
        st = require("safetensors.torch", "models")
        try:
            sd = st.load_file(str(p))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise DfmpcError(f"cannot read '{p}' as safetensors: {err}") from err
    else:
        if unsafe_pickle:
            log.warning("--unsafe-pickle: unpickling %s can run arbitrary code; only use files you trust", p)
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=not unsafe_pickle)
        except Exception as err:  # pickle/zip errors come in many types
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and "weights_only" not in ln]
            msg = (lines[-1][:200] if lines else "") or f"not a torch checkpoint ({type(err).__name__})"
            if "Unsupported global" in str(err):
                raise DfmpcError(f"'{p}' holds more than tensors and is not loaded by default for safety; "
                                 f"if you trust it, re-run with --unsafe-pickle") from err
            raise DfmpcError(f"cannot read weights '{p}': {msg}") from err
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DfmpcError(f"'{p}' does not contain a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], origin: str) -> None:
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} of wrong shape (e.g. {bad_shape[0]})")
        raise DfmpcError(f"weights '{origin}' do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in sd.items()}, strict=False)


@torch.no_grad()
def settle_bn_statistics_(model: nn.Module, input_shape: tuple[int, int, int], seed: int = 0, batch: int = 8) -> None:
    """In place: give every BatchNorm the statistics of its input when Gaussian images flow through ``model``.

    A freshly initialised model's BN layers hold identity statistics (mean 0, variance 1), which describe no input;
    a trained model's describe its training data. Seeded random weights are meant to exercise the pipeline the way
    a trained model does (sizes, latency, and the work of every pass), so they get the population statistics of
    N(0, 1) inputs - still labelled random in every report.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batch
    model.train()
    try:
        model(torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(seed)))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def load_model(name: str, weights: str = "pretrained", seed: int = 0, unsafe_pickle: bool = False) -> LoadedModel:
    """Build a named model with pretrained, seeded random or local weights, in eval mode.

    Args:
        name: a name from :func:`model_names`.
        weights: ``"pretrained"`` (download), ``"random"`` (seeded init, labelled as such), or a file path.
        seed: seed for ``"random"``.
        unsafe_pickle: allow full unpickling of a trusted local file.

    Example::

        >>> lm = load_model("resnet20_cifar10_optA", weights="random")
        >>> lm.module(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    spec = get_spec(name)
    if weights == "random":
        torch.manual_seed(seed)
        model = spec.build(False)
        settle_bn_statistics_(model, (3, spec.input_size, spec.input_size), seed)
    elif weights == "pretrained":
        model = spec.build(True)
    else:
        sd = load_state_dict_file(weights, unsafe_pickle=unsafe_pickle)
        model = spec.build(False)
        _load_into(model, sd, str(weights))
    return LoadedModel(model.eval(), spec, weights)
