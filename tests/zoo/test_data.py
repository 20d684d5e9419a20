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


def _imagenet_dir(tmp_path, n=6, size=(300, 200), sub="images"):
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / sub).mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / sub / f"im{i}.png")
        lines.append(f"im{i}.png {i * 7}")
    (tmp_path / "labels.txt").write_text("# file index\n" + "\n".join(lines) + "\n\n")
    return tmp_path


def test_imagenet_spec_reads_labels_and_matches_torchvision_preprocessing(tmp_path):
    from PIL import Image
    root = _imagenet_dir(tmp_path)
    ds = load_dataset(parse_data_spec(f"imagenet:{root}"), 224, 256, MEAN, STD)
    assert ds.images.shape == (6, 3, 224, 224) and ds.labels.tolist() == [0, 7, 14, 21, 28, 35]
    # torchvision Resize(256): 300x200 -> 384x256 (int(256 * 300 / 200)), CenterCrop(224): left 80, top 16
    with Image.open(root / "images" / "im3.png") as im:
        ref = np.asarray(im.convert("RGB").resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240)), np.float32)
    ref = ((ref / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    assert np.array_equal(ds.images[3].numpy(), ref)


def test_imagenet_files_may_sit_beside_labels_and_subset_is_spread(tmp_path):
    root = _imagenet_dir(tmp_path, n=5, size=(40, 40), sub=".")
    ds = load_dataset(parse_data_spec(f"imagenet:{root}"), 32, None, MEAN, STD, limit=3, num_classes=29)
    assert ds.labels.tolist() == [0, 14, 28]


def test_parallel_decoding_equals_serial(tmp_path):
    from dfmpc_deploy.zoo.images import decode_images
    root = _imagenet_dir(tmp_path, n=20, size=(24, 20))
    files = sorted((root / "images").iterdir())
    serial = decode_images(files, 16, 18, MEAN, STD, num_workers=0)
    parallel = decode_images(files, 16, 18, MEAN, STD, num_workers=2, batch_size=4)
    assert torch.equal(serial, parallel)


def test_worker_error_is_one_line(tmp_path):
    from dfmpc_deploy.zoo.images import decode_images
    root = _imagenet_dir(tmp_path, n=12, size=(24, 20))
    (root / "images" / "im7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DfmpcError, match=r"cannot decode image '.*im7\.png'") as e:
        decode_images(sorted((root / "images").iterdir()), 16, 18, MEAN, STD, num_workers=2, batch_size=2)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_channels_last_evaluation_leaves_the_model_as_it_was(tiny_net):
    from dfmpc_deploy.zoo.data import Dataset
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_net(x)
    y = ref.argmax(1)
    acc = accuracy(tiny_net, Dataset("t", x, y), batch_size=5)
    assert acc["top1"] == 100.0
    assert all(p.is_contiguous() for p in tiny_net.parameters())
    with torch.no_grad():
        assert torch.allclose(tiny_net(x), ref, atol=1e-6)


def test_labels_outside_the_model_are_refused_at_evaluation(tiny_net):
    from dfmpc_deploy.zoo.data import Dataset
    with pytest.raises(DfmpcError, match="label 10 is outside the model's 10 classes"):
        accuracy(tiny_net, Dataset("t", torch.randn(2, 3, 16, 16), torch.tensor([1, 10])))


def test_inference_copy_folds_bn_and_keeps_the_function(tiny_net):
    from dfmpc_deploy.zoo.evaluate import inference_copy, logits
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    folded = inference_copy(tiny_net)
    assert folded is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_net.modules()) == 3  # the original is untouched
    with torch.no_grad():
        ref = tiny_net(x)
        assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits(tiny_net, x), ref, rtol=1e-5, atol=1e-5)


def test_untraceable_model_is_evaluated_as_it_is():
    from dfmpc_deploy.zoo.evaluate import inference_copy, logits

    class Dynamic(torch.nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))

    m = Dynamic().eval()
    x = torch.randn(3, 3, 8, 8)
    assert inference_copy(m) is None
    with torch.no_grad():
        assert torch.allclose(logits(m, x), m(x), atol=1e-6)
    assert m.conv.weight.is_contiguous()
