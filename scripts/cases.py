"""Shared by the accuracy scripts: the real CIFAR-10 ResNets and test set in ../shared/data."""
from __future__ import annotations

from pathlib import Path

from dfmpc_deploy.zoo.data import Dataset, load_dataset, parse_data_spec
from dfmpc_deploy.zoo.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
MODELS = {"resnet20": ("resnet20_cifar10_optA", "resnet20-12fca82f.th"),
          "resnet56": ("resnet56_cifar10_optA", "resnet56-4bfd9763.th")}


def load_case(key: str, limit: int | None) -> tuple[str, LoadedModel, Dataset]:
    """(model name, pretrained model, preprocessed test images) for ``key`` in :data:`MODELS`."""
    name, wfile = MODELS[key]
    lm = load_model(name, str(SHARED / "weights" / "akamaster_cifar10" / wfile))
    s = lm.spec
    data = load_dataset(parse_data_spec(f"imagefolder:{SHARED / 'cifar10-test-jpg' / 'test'}"), s.input_size,
                        s.resize, s.mean, s.std, limit)
    return name, lm, data
