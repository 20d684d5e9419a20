"""Model loading: pytorchcv names, torchvision-layout ResNets/MobileNetV2, the CIFAR option-A ResNets, local files.

pytorchcv constructors are imported from ``pytorchcv.models.<module>`` directly, never through
``pytorchcv.model_provider`` (which imports torchvision). The torchvision-layout architectures are the zoo's own
(:mod:`.torchvision_arch`); torchvision is never imported.

Weight layouts. A *family* (the name users type: ``resnet18``, ``mobilenet_v2``) has one registered architecture per
key layout it can load: ``pytorchcv`` (``features.init_block...``, ``features.stage1.unit1...``, ``output.weight``),
``torchvision`` (``conv1``/``layer1.0.conv1``/``fc``, or ``features.N.conv...``/``classifier.1``),
``torchvision-quantized`` (torchvision's quantizable models: same keys, ReLU where the float model has ReLU6; for
ResNets, which use ReLU anyway, it is the torchvision variant) and ``native`` (this zoo's CIFAR option-A ResNets, whose
keys follow akamaster's). ``--weights-format auto`` detects the layout from a file's keys; the chosen architecture's
registered name is :attr:`LoadedModel.arch` (e.g. ``resnet18_torchvision``), which is what a packed file must record
so it can be rebuilt. Every key and shape is checked (nothing dropped, nothing left at its initial value) and
integer/bool/complex tensors are refused where the model holds floats, instead of being cast. Every model, whatever
its weights' source, passes :func:`~dfmpc_deploy.core.validate.check_weights` before it is returned.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..core.stats import bn_status
from ..core.validate import check_weights
from ..errors import DfmpcError, UsageError, one_line
from ..io.files import open_regular, os_error_line, printable_path, sniff
from .cifar_resnet import OPTA_DEPTHS, CifarResNet
from .torchvision_arch import RESNET_DEPTHS, tv_mobilenet_v2, tv_resnet

__all__ = ["ModelSpec", "REGISTRY", "model_names", "get_spec", "load_model", "load_state_dict_file", "LoadedModel",
           "WEIGHTS_FORMATS", "detect_layout", "resolve_spec", "settle_bn_statistics_", "file_sha256",
           "model_from_module"]

WEIGHTS_FORMATS = ("auto", "pytorchcv", "torchvision", "torchvision-quantized", "native")

log = logging.getLogger("dfmpc_deploy")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_AKAMASTER_FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
                    56: "resnet56-4bfd9763.th", 110: "resnet110-1d1ed7c2.th"}
_TORCHVISION = "https://download.pytorch.org/models/"
_TORCHVISION_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
                      "resnet50": "resnet50-0676ba61.pth", "resnet101": "resnet101-63fe2227.pth",
                      "resnet152": "resnet152-394f9c45.pth", "mobilenet_v2": "mobilenet_v2-b0353104.pth"}


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
        layout: the key layout of its state dict, one of :data:`WEIGHTS_FORMATS` other than ``auto``.
        family: the name whose ``--weights-format`` variants include this one (default: ``name``).
    """

    name: str
    build: Callable[[bool], nn.Module]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None
    num_classes: int
    source: str
    layout: str = "pytorchcv"
    family: str = ""

    def __post_init__(self) -> None:
        if self.layout not in WEIGHTS_FORMATS[1:]:
            raise ValueError(f"model {self.name!r}: layout {self.layout!r} not in {WEIGHTS_FORMATS[1:]}")
        if not self.family:
            object.__setattr__(self, "family", self.name)


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with the provenance of its weights."""

    module: nn.Module
    spec: ModelSpec  # the architecture actually built (after --weights-format resolution)
    weights: str  # "pretrained" | "random" | a file path | "module"
    extra: dict = field(default_factory=dict)  # "weights_format": layout; "notes": list of one-line remarks;
    # "sha256": hex SHA-256 of a weights file

    @property
    def arch(self) -> str:
        """The registered name that rebuilds this architecture (record it in packed files and reports)."""
        return self.spec.name


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


def _download_into(model: nn.Module, url: str) -> None:
    """Load the state dict at ``url`` (torch hub cache) into ``model``; unreachable is one line with the way out."""
    try:
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as err:  # urllib raises several types; all mean "not reachable"
        raise DfmpcError(f"could not download {url} ({err}); pass --weights FILE or --weights random") from err
    _load_into(model, sd, url)


def _opta(depth: int) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        model = CifarResNet(depth)
        if pretrained:
            _download_into(model, _AKAMASTER + _AKAMASTER_FILES[depth])
        return model
    return build


def _torchvision(name: str, ctor: Callable[[], nn.Module]) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        model = ctor()
        if pretrained:
            if name not in _TORCHVISION_FILES:
                raise DfmpcError(f"there are no float pretrained weights for '{name}' to download (torchvision "
                                 f"publishes this model only as an int8 model); pass --weights FILE (a float "
                                 f"torchvision-layout state dict) or --weights random")
            _download_into(model, _TORCHVISION + _TORCHVISION_FILES[name])
        return model
    return build


def _spec_list() -> list[ModelSpec]:
    imnet: dict[str, Any] = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256, num_classes=1000,
                 source="pytorchcv (ImageNet-1k)")
    cifar: dict[str, Any] = dict(input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, resize=None, source="pytorchcv (CIFAR)")
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
                               "akamaster/pytorch_resnet_cifar10 (option-A shortcuts)", layout="native"))
    tv: dict[str, Any] = dict(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256, num_classes=1000)
    for d in RESNET_DEPTHS:
        specs.append(ModelSpec(f"resnet{d}_torchvision", _torchvision(f"resnet{d}", partial(tv_resnet, d)),
                               source="torchvision layout (ImageNet-1k)", layout="torchvision", family=f"resnet{d}",
                               **tv))
    specs.append(ModelSpec("mobilenet_v2", _torchvision("mobilenet_v2", partial(tv_mobilenet_v2, True)),
                           source="torchvision layout, ReLU6 (ImageNet-1k)", layout="torchvision", **tv))
    specs.append(ModelSpec("mobilenet_v2_relu", _torchvision("mobilenet_v2_relu", partial(tv_mobilenet_v2, False)),
                           source="torchvision quantizable layout, ReLU (--weights FILE only)",
                           layout="torchvision-quantized", family="mobilenet_v2", **tv))
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights files in build reports, so a rebuild can check them;
    packed files in export reports).

    Raises:
        DfmpcError: the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise DfmpcError(f"cannot read '{path}': {err.strerror or err}") from None
    return h.hexdigest()


def _zip_problem(p: Path, size: int) -> str | None:
    """Why a zip checkpoint may not be handed to ``torch.load``: a record that is compressed or claims more bytes
    than the file holds (torch would allocate the claimed size before noticing), or no zip at all."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    return (f"its record '{printable_path(info.filename, 80)}' is compressed ({info.file_size:,} "
                            f"bytes from {info.compress_size:,}); torch checkpoints store records uncompressed")
                if info.header_offset + info.file_size > size:
                    return (f"its record '{printable_path(info.filename, 80)}' claims {info.file_size:,} bytes, more "
                            f"than the {size:,}-byte file holds")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return f"its zip directory is unreadable ({one_line(str(err), 120)})"
    return None


_KIND_NAMES = {"dfmpc": "a packed .dfmpc model", "zip": "a torch checkpoint (zip)",
               "pickle": "a legacy torch checkpoint (pickle)", "safetensors": "a safetensors file"}


def load_state_dict_file(path: str | os.PathLike, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a torch checkpoint (zip or legacy pickle), safely by default.

    What the file is comes from its content, not its name (:func:`dfmpc_deploy.io.files.sniff`): a safetensors file
    named ``.pth`` is read as safetensors, a packed ``.dfmpc`` model is refused by name. A zip checkpoint whose records
    are compressed or claim more bytes than the file holds is refused before ``torch.load`` allocates them; a sparse
    file is refused before it is read. Handles checkpoints wrapping the weights in ``state_dict``/``model`` and strips
    ``module.`` prefixes.

    Raises:
        DfmpcError: missing, non-regular, sparse or unreadable file, a file of another kind, a pickle that needs
            ``--unsafe-pickle``, or content that is not a ``{str: tensor}`` dict.
    """
    p = Path(path)
    fd, st = open_regular(p, "weights file", sparse_ok=False)
    try:
        head = os.read(fd, 16)
    except OSError as err:
        raise DfmpcError(os_error_line(err, "weights file", p)) from None
    finally:
        os.close(fd)
    kind = sniff(head)
    shown = printable_path(p)
    if kind == "dfmpc":
        raise DfmpcError(f"'{shown}' is a packed .dfmpc model, not float weights: evaluate or export it with "
                         f"'dfmpc-deploy eval/export {shown}', or give --weights the float state dict it was built "
                         f"from")
    if kind == "unknown":
        raise DfmpcError(f"cannot read weights '{shown}': by its content it is neither a torch checkpoint (zip or "
                         f"pickle) nor a safetensors file (it starts with {head[:8]!r}); pass a .pth/.th/.safetensors "
                         f"state dict")
    if kind == "safetensors":
        st_mod = require("safetensors.torch", "models")
        try:
            sd = st_mod.load_file(str(p))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise DfmpcError(f"cannot read '{shown}' as safetensors: {one_line(str(err), 200)}") from None
    else:
        if kind == "zip":
            problem = _zip_problem(p, st.st_size)
            if problem:
                raise DfmpcError(f"weights '{shown}' ({_KIND_NAMES[kind]}) is refused: {problem}")
        if unsafe_pickle:
            log.warning("--unsafe-pickle: unpickling %s can run arbitrary code; only use files you trust", shown)
        try:
            with open(p, "rb") as fh:  # a file object: torch.load would pick a loader by the name's suffix
                sd = torch.load(fh, map_location="cpu", weights_only=not unsafe_pickle)
        except Exception as err:  # noqa: BLE001 - pickle/zip errors come in many types
            glob = re.search(r"unsupported global\W+(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
            if glob:
                raise DfmpcError(f"'{shown}' holds more than tensors (it names {glob.group(1)}) and is not loaded "
                                 f"by default for safety; if you trust it, re-run with --unsafe-pickle") from None
            lines = [ln.strip() for ln in str(err).splitlines()
                     if ln.strip() and not any(w in ln for w in ("weights_only", "WeightsUnpickler", "documentation"))]
            msg = one_line(lines[-1], 200) if lines else type(err).__name__
            raise DfmpcError(f"cannot read weights '{shown}': not a readable torch checkpoint ({_KIND_NAMES[kind]} "
                             f"by its content, but truncated or corrupt: {msg})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise DfmpcError(f"'{printable_path(p)}' does not contain a state dict (a non-empty dict of names to tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def detect_layout(keys) -> str | None:
    """Which key layout a state dict uses: ``pytorchcv``, ``torchvision``, ``native`` or None (unrecognised).

    ``torchvision`` covers the quantizable models too (same keys); ``native`` is this zoo's option-A CIFAR ResNet.
    """
    keys = set(keys)
    if any(k.startswith(("features.init_block.", "features.stage1.")) for k in keys):
        return "pytorchcv"
    if {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= keys:
        return "torchvision"
    if {"features.0.0.weight", "classifier.1.weight"} <= keys:
        return "torchvision"
    if {"conv1.weight", "layer1.0.conv1.weight", "linear.weight"} <= keys:
        return "native"
    return None


def _variants(family: str) -> dict[str, ModelSpec]:
    return {s.layout: s for s in REGISTRY.values() if s.family == family}


def resolve_spec(name: str, weights_format: str = "auto", keys=None, origin: str = "") -> ModelSpec:
    """The architecture to build for model ``name``, a weights format and (for a file) its state-dict keys.

    ``auto`` keeps ``name``'s own architecture unless ``keys`` show another layout of the same family; an explicit
    format picks that variant of the family (``torchvision-quantized`` falls back to ``torchvision`` where the
    family has no separate quantizable variant, as for ResNets).

    Raises:
        UsageError: unknown format. DfmpcError: unknown name, keys in no known layout, or a family without the layout.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise UsageError(f"bad --weights-format '{weights_format}': choose one of {', '.join(WEIGHTS_FORMATS)}")
    spec = get_spec(name)
    variants = _variants(spec.family)
    have = ", ".join(sorted(variants))
    if weights_format == "auto":
        if keys is None:
            return spec
        layout = detect_layout(keys)
        if layout is None:
            first = ", ".join(list(keys)[:3])
            raise DfmpcError(f"weights '{origin}' are in neither the pytorchcv layout (features.init_block..., "
                             f"output.weight) nor the torchvision layout (conv1/layer1.0.conv1/fc, or features.N.conv"
                             f"/classifier.1) (first keys: {first}); pass --weights-format {'|'.join(variants)}")
        if layout == spec.layout or (layout == "torchvision" and spec.layout == "torchvision-quantized"):
            return spec
        if layout in variants:
            return variants[layout]
        raise DfmpcError(f"weights '{origin}' are in the {layout} layout, but '{name}' is available in the {have} "
                         f"layout only; pick a model of that layout (dfmpc-deploy models) or convert the weights")
    want = weights_format
    if want == "torchvision-quantized" and want not in variants:
        want = "torchvision"
    if want not in variants:
        raise DfmpcError(f"--weights-format {weights_format}: '{name}' is available in the {have} layout only")
    return variants[want]


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
        layout = detect_layout(sd)
        seen = f" (the file's keys look like the {layout} layout)" if layout else ""
        raise DfmpcError(f"weights '{origin}' do not fit the architecture: {'; '.join(parts)}{seen}")
    for k, v in own.items():
        src = sd.get(k)
        if src is not None and v.is_floating_point() and not src.is_floating_point():
            raise DfmpcError(f"weights '{origin}': tensor '{k}' is {str(src.dtype).replace('torch.', '')} where the "
                             f"model holds floats; refusing to cast it silently (re-export the weights as float32)")
        if src is not None and not v.is_floating_point() and src.is_floating_point() and src.numel() and not bool(
                (torch.isfinite(src) & (src == src.round()) & (src.abs() <= 2.0 ** 53)).all()):
            raise DfmpcError(f"weights '{origin}': integer buffer '{k}' holds non-finite, fractional or huge "
                             f"values in the file ({str(src.dtype).replace('torch.', '')}); refusing to cast them "
                             f"silently (re-export the weights)")
    model.load_state_dict(dict(sd), strict=False)


@torch.no_grad()
def settle_bn_statistics_(model: nn.Module, input_shape: tuple[int, int, int], seed: int = 0, batch: int = 8) -> None:
    """In place: give every BatchNorm the statistics of its input when image-like noise flows through ``model``.

    A freshly initialised model's BN layers hold identity statistics (mean 0, variance 1), which describe no input;
    a trained model's describe its training data. Seeded random weights are meant to exercise the pipeline the way
    a trained model does (sizes, latency, and the work of every pass, input synthesis included), so they get the
    population statistics of spatially smooth noise (Gaussian noise at 1/8 of the resolution, upsampled bilinearly
    and standardised per channel, as normalised photographs are smooth): white noise, where synthesis starts, does
    not match them. Every report still labels the weights random.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    if not bns:
        return
    c, h, w = input_shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((batch, c, max(1, h // 8), max(1, w // 8)), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batch
    model.train()
    try:
        model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def _on_int8_grid(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` whose values are all ``k * step`` (``step`` (rows, 1)) with integer ``|k| <= 128``."""
    k = w / step
    return ((k - k.round()).abs().amax(1) < 1e-3) & (k.abs().amax(1) <= 128.5)


@torch.no_grad()
def int8_dequantized(model: nn.Module, min_fraction: float = 0.95) -> bool:
    """Whether the Conv2d / Linear weights of ``model`` look dequantized from symmetric 8-bit integers: in at least
    ``min_fraction`` of the non-zero filters every value is an integer multiple ``k * step`` with ``|k| <= 128``
    (to 1e-3 of a step). The step is searched as the filter's smallest non-zero magnitude / 1..8, then, for the
    filters that fail, as its largest magnitude / 1..128.

    Continuous (float-trained) weights never pass: the multiples would have to be integers *and* span at most 128
    steps. Quantization-aware-trained models exported as float (e.g. torchvision's quantizable models, dequantized)
    pass whatever their per-tensor or per-channel scales.
    """
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (filters that failed the quick search, their magnitudes)
    ok = total = 0
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight.detach().float().flatten(1)
        a = w.abs()
        w, a = w[(a > 0).any(1)], a[(a > 0).any(1)]
        smallest = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(1, keepdim=True)
        row_ok = torch.zeros(len(w), dtype=torch.bool)
        for d in range(1, 9):
            row_ok |= _on_int8_grid(w, smallest / d)
        ok += int(row_ok.sum())
        total += len(w)
        rows.append((w[~row_ok], a[~row_ok]))
    if total == 0 or ok < total / 2:  # float weights fail the quick search almost everywhere: no slow search
        return False
    for w, a in rows:
        if len(w):
            largest, row_ok = a.amax(1, keepdim=True), torch.zeros(len(w), dtype=torch.bool)
            for k in range(1, 129):
                row_ok |= _on_int8_grid(w, largest / k)
            ok += int(row_ok.sum())
    return ok >= min_fraction * total


def load_model(name: str, weights: str = "pretrained", seed: int = 0, unsafe_pickle: bool = False,
               weights_format: str = "auto") -> LoadedModel:
    """Build a named model with pretrained, seeded random or local weights, in eval mode, checked.

    Args:
        name: a name from :func:`model_names`.
        weights: ``"pretrained"`` (download), ``"random"`` (seeded init, labelled as such), or a file path.
        seed: seed for ``"random"``.
        unsafe_pickle: allow full unpickling of a trusted local file.
        weights_format: one of :data:`WEIGHTS_FORMATS`; see :func:`resolve_spec`.

    Returns:
        LoadedModel whose ``arch`` may differ from ``name`` (e.g. ``resnet18`` with torchvision-layout weights is
        ``resnet18_torchvision``); ``extra["weights_format"]`` is the layout, ``extra["notes"]`` lists remarks for
        the report (e.g. BN layers with identity statistics).

    Raises:
        DfmpcError: unknown name, unreadable or mismatched weights, or weights that fail
            :func:`~dfmpc_deploy.core.validate.check_weights`. UsageError: unknown ``weights_format``.

    Example::

        >>> lm = load_model("resnet20_cifar10_optA", weights="random")
        >>> lm.module(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    notes: list[str] = []
    if weights in ("random", "pretrained"):
        spec = resolve_spec(name, weights_format)
        if weights == "random":
            torch.manual_seed(seed)
        model = spec.build(weights == "pretrained")
        if weights == "random":
            settle_bn_statistics_(model, (3, spec.input_size, spec.input_size), seed)
    else:
        sd = load_state_dict_file(weights, unsafe_pickle=unsafe_pickle)
        digest = file_sha256(weights)
        spec = resolve_spec(name, weights_format, keys=list(sd), origin=str(weights))
        with torch.random.fork_rng(devices=[]):  # the initial values are all overwritten
            model = spec.build(False)
        _load_into(model, sd, str(weights))
        if bn_status(model) == "identity":
            notes.append(f"every BatchNorm in '{weights}' has identity statistics (mean 0, variance 1), as when BN was "
                         f"folded into the convolutions before export: statistics read from BN describe no activations")
            quantizable = _variants(spec.family).get("torchvision-quantized")
            if weights_format == "auto" and quantizable is not None and quantizable is not spec:
                if int8_dequantized(model):
                    notes.append(f"the weights are dequantized INT8 (each filter an integer multiple of one step, at "
                                 f"most 128 steps) with BN folded: the form torchvision's quantizable model exports, "
                                 f"which uses ReLU, so they are loaded as {quantizable.name} (pass --weights-format "
                                 f"torchvision to keep {spec.name})")
                    spec = quantizable
                    with torch.random.fork_rng(devices=[]):
                        model = spec.build(False)
                    _load_into(model, sd, str(weights))
                else:
                    notes.append(f"BN-folded torchvision weights often come from torchvision's quantizable model, "
                                 f"which uses ReLU: if so, pass --weights-format torchvision-quantized "
                                 f"({quantizable.name})")
    if spec.name != name:
        log.info("model %s with %s-layout weights: architecture %s", name, spec.layout, spec.name)
    for note in notes:
        log.warning("warning: %s", note)
    check_weights(model)
    extra: dict[str, Any] = {"weights_format": spec.layout, "notes": notes}
    if weights not in ("random", "pretrained"):
        extra["sha256"] = digest
    return LoadedModel(model.eval(), spec, weights, extra)


@torch.no_grad()
def model_from_module(module: nn.Module, name: str, input_shape: tuple[int, int, int],
                      mean: tuple[float, float, float], std: tuple[float, float, float]) -> LoadedModel:
    """Your own ``nn.Module`` as a :class:`LoadedModel` (the ``load`` stage for the Python API's ``build``).

    The module is checked like any loaded model (:func:`~dfmpc_deploy.core.validate.check_weights`) and run once on
    zeros to learn its class count; it is not modified (a copy is put in eval mode). The spec's ``build`` returns a
    fresh copy of it, so a packed file of it loads with ``load_packed(path, model=module)``.

    Args:
        module: the FP32 model.
        name: the name recorded in reports and packed files (e.g. the class name).
        input_shape: (C, H, W) of one input.
        mean, std: the input normalisation its training used, per channel of pixels in [0, 1].

    Raises:
        DfmpcError: not an nn.Module, weights that fail the checks, or a forward pass that fails on zeros.
    """
    if not isinstance(module, nn.Module):
        raise DfmpcError(f"model must be an nn.Module or a model name, got {type(module).__name__}")
    model = copy.deepcopy(module).eval()
    check_weights(model)
    try:
        out = model(torch.zeros((1, *input_shape)))
    except Exception as err:  # noqa: BLE001 - any error of the user's forward means the input shape does not fit
        raise DfmpcError(f"{name}: a forward pass on a zero input of shape {tuple(input_shape)} failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); pass the "
                         f"input_shape your model takes") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DfmpcError(f"{name}: the model must return (batch, classes) logits, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    spec = ModelSpec(name, lambda _: copy.deepcopy(module), int(input_shape[-1]), tuple(mean),  # type: ignore[arg-type]
                     tuple(std), None, int(out.shape[1]), "nn.Module given to the Python API", layout="native")  # type: ignore[arg-type]
    notes = [] if bn_status(model) == "real" else [
        f"{name}: its BatchNorm layers carry no trained statistics ({bn_status(model)})"]
    return LoadedModel(model, spec, "module", {"weights_format": "module", "notes": notes})
