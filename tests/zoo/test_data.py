import pickle

import numpy as np
import pytest
import torch

from dfmpc_deploy.errors import DfmpcError, UsageError
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _cifar_dir(tmp_path, kind):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)
    labels = list(rng.integers(0, 10, 20))
    key, name = (b"labels", "test_batch") if kind == "cifar10" else (b"fine_labels", "test")
    with open(tmp_path / name, "wb") as fh:
        pickle.dump({b"data": data, key: labels}, fh)
    return data, labels


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, kind):
    data, labels = _cifar_dir(tmp_path, kind)
    ds = load_dataset(parse_data_spec(f"{kind}:{tmp_path}"), 32, None, MEAN, STD)
    assert ds.images.shape == (20, 3, 32, 32) and ds.labels.tolist() == labels
    first = (data[0].reshape(3, 32, 32).astype(np.float32) / 255 - 0.5) / 0.25  # CHW planes, normalised
    assert np.allclose(ds.images[0].numpy(), first, atol=1e-6)
    assert len(load_dataset(parse_data_spec(f"{kind}:{tmp_path}"), 32, None, MEAN, STD, limit=5).labels) == 5


def test_imagefolder_labels_follow_sorted_folders(tmp_path):
    from PIL import Image
    for c, color in [("b_cls", (0, 0, 255)), ("a_cls", (255, 0, 0))]:
        (tmp_path / c).mkdir()
        Image.new("RGB", (40, 30), color).save(tmp_path / c / "x.png")
    ds = load_dataset(parse_data_spec(f"imagefolder:{tmp_path}"), 24, 28, MEAN, STD)
    assert ds.images.shape == (2, 3, 24, 24) and ds.labels.tolist() == [0, 1]
    assert ds.images[0, 0].mean() > 1.5 and ds.images[1, 2].mean() > 1.5  # a_cls red, b_cls blue


def test_top1_top5(tmp_path):
    from dfmpc_deploy.zoo.data import Dataset

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :6]

    x = torch.zeros(3, 6)
    x[0, 2], x[1, 0], x[2, 5] = 1, 1, 1
    acc = accuracy(Fixed(), Dataset("t", x, torch.tensor([2, 3, 5])))
    assert acc["top1"] == pytest.approx(66.67) and acc["n"] == 3


def test_bad_specs(tmp_path):
    with pytest.raises(UsageError):
        parse_data_spec("folder:" + str(tmp_path))
    with pytest.raises(DfmpcError, match="does not exist"):
        parse_data_spec(f"cifar10:{tmp_path / 'none'}")
    with pytest.raises(DfmpcError, match="test_batch"):
        load_dataset(parse_data_spec(f"cifar10:{tmp_path}"), 32, None, MEAN, STD)
