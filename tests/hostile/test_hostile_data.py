"""Hostile evaluation data: pickles that try to run code, malformed CIFAR batches, image folders with hidden or empty
entries, FIFOs, decompression bombs, corrupt images and labels files. Every case: one-line DfmpcError naming the file,
nothing executed, no hang (each test runs under a 10 s alarm)."""
import os
import pickle

import numpy as np
import pytest
import torch

from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.zoo.data import list_imagefolder, load_dataset, parse_data_spec
from tests.hostile.conftest import one_line

pytestmark = pytest.mark.usefixtures("deadline")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
MARKER = "dfmpc_hostile_pwned"


def _load(spec: str, **kw):
    return load_dataset(parse_data_spec(spec), 32, None, MEAN, STD, **kw)


# --- CIFAR pickles -----------------------------------------------------------------------------------------------

class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _Eval:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return eval, (f"open({str(self.path)!r}, 'w').close()",)


def _good_batch(n=8, labels=None):
    rng = np.random.default_rng(0)
    return {b"batch_label": b"testing batch 1 of 1", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(range(n)) if labels is None else labels, b"filenames": [b"x.png"] * n}


@pytest.mark.parametrize("payload", ["system", "eval", "system_in_labels", "object_array"])
def test_cifar_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / MARKER
    batch = _good_batch()
    if payload == "system":
        obj = _System(marker)
    elif payload == "eval":
        obj = {b"data": _Eval(marker), b"labels": []}
    elif payload == "system_in_labels":
        obj = {**batch, b"labels": [_System(marker)] * 8}
    else:  # an object-dtype array whose element would be unpickled by numpy's own machinery
        obj = {**batch, b"data": np.array([_System(marker)], dtype=object)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(obj))
    with pytest.raises(DfmpcError, match="test_batch") as e:
        _load(f"cifar10:{tmp_path}")
    msg = one_line(e)
    assert "refused" in msg or "not a plain numeric dtype" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_real_format_batches_load_under_every_protocol(tmp_path, protocol):
    batch = _good_batch(labels=[np.int64(3)] + list(range(1, 8)))
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol <= 3:  # the 2009 files name numpy.core (not numpy._core); GLOBAL opcodes are text, so rename
        raw = raw.replace(b"numpy._core.", b"numpy.core.")
    (tmp_path / "test_batch").write_bytes(raw)
    ds = _load(f"cifar10:{tmp_path}", num_classes=10)
    assert ds.labels.tolist() == [3, 1, 2, 3, 4, 5, 6, 7]
    first = (batch[b"data"][0].reshape(3, 32, 32) / 255 - 0.5) / 0.25
    assert np.allclose(ds.images[0].numpy(), first, atol=1e-6)


def _cut(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


@pytest.mark.parametrize("case, expect", [
    ("empty", "unreadable pickle"),
    ("garbage", "unreadable pickle|not a CIFAR"),
    ("truncated", "truncated|unreadable"),
    ("list", "holds a list, not a dict"),
    ("wrong_key", "has no 'data' entry"),
    ("wrong_size", r"shape \(8, 100\)"),
    ("float_data", "float32 array"),
    ("label_count", "must be 8 integers"),
    ("label_range", "label 10 of image 7 is outside 0..9"),
    ("negative_label", "label -1 of image 0"),
    ("string_labels", "must be 8 integers"),
])
def test_malformed_cifar_batches(tmp_path, case, expect):
    b = _good_batch()
    raw = {
        "empty": b"",
        "garbage": np.random.default_rng(22).bytes(64),
        "truncated": _cut(pickle.dumps(b)),
        "list": pickle.dumps([1, 2, 3]),
        "wrong_key": pickle.dumps({b"pixels": b[b"data"], b"labels": b[b"labels"]}),
        "wrong_size": pickle.dumps({**b, b"data": b[b"data"][:, :100]}),
        "float_data": pickle.dumps({**b, b"data": b[b"data"].astype(np.float32)}),
        "label_count": pickle.dumps({**b, b"labels": [1] * 7}),
        "label_range": pickle.dumps({**b, b"labels": list(range(7)) + [10]}),
        "negative_label": pickle.dumps({**b, b"labels": [-1] * 8}),
        "string_labels": pickle.dumps({**b, b"labels": ["cat"] * 8}),
    }[case]
    (tmp_path / "test_batch").write_bytes(raw)
    with pytest.raises(DfmpcError, match=expect) as e:
        _load(f"cifar10:{tmp_path}")
    assert "test_batch" in one_line(e)


def test_cifar100_labels_beyond_the_model_are_refused(tmp_path):
    b = {b"data": _good_batch()[b"data"], b"fine_labels": [99] * 8}
    (tmp_path / "test").write_bytes(pickle.dumps(b))
    assert len(_load(f"cifar100:{tmp_path}", num_classes=100).labels) == 8
    with pytest.raises(DfmpcError, match="label 99 is outside 0..9 of the model"):
        _load(f"cifar100:{tmp_path}", num_classes=10)


def test_cifar_batch_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "test_batch")
    with pytest.raises(DfmpcError, match="not a regular file") as e:
        _load(f"cifar10:{tmp_path}")
    one_line(e)


# --- image folders -----------------------------------------------------------------------------------------------

def _png(path, color=(200, 10, 10), size=(8, 8)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _folder(tmp_path, classes=("cat", "dog", "emu")):
    root = tmp_path / "data"
    for i, c in enumerate(classes):
        _png(root / c / "a.png", (i * 80, 0, 0))
    return root


def test_hidden_entries_are_skipped_and_labels_stay(tmp_path):
    root = _folder(tmp_path)
    _png(root / ".ipynb_checkpoints" / "a.png")  # hidden class folder with an image: would shift labels
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _png(root / "dog" / "._a.png")  # macOS resource fork named like an image
    (root / "README.txt").write_text("not a class")
    files, labels, classes = list_imagefolder(root, num_classes=3)
    assert classes == ["cat", "dog", "emu"] and labels == [0, 1, 2]
    assert [f.parent.name for f in files] == classes


def test_empty_class_folder_is_refused_not_skipped(tmp_path):
    root = _folder(tmp_path)
    (root / "dingo").mkdir()  # sorts between cat and dog: skipping it would shift dog and emu
    with pytest.raises(DfmpcError, match=r"class folder '.*dingo' \(class 1 of 4\) has no images") as e:
        _load(f"imagefolder:{root}")
    one_line(e)


def test_class_count_must_match_the_model(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DfmpcError, match="has 3 class folders but the model has 10 classes"):
        _load(f"imagefolder:{root}", num_classes=10)


def test_fifo_named_like_an_image_does_not_hang(tmp_path):
    root = _folder(tmp_path)
    os.mkfifo(root / "dog" / "b.jpg")
    with pytest.raises(DfmpcError, match=r"'.*b\.jpg' is .*not a regular file") as e:
        _load(f"imagefolder:{root}")
    one_line(e)


def test_symlinks_to_regular_files_are_followed_dangling_ones_refused(tmp_path):
    root = _folder(tmp_path)
    _png(tmp_path / "elsewhere" / "x.png", (0, 0, 255))
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "emu" / "b.png")
    ds = _load(f"imagefolder:{root}", num_classes=3)
    assert ds.labels.tolist() == [0, 1, 2, 2]
    os.symlink(tmp_path / "missing.png", root / "emu" / "c.png")
    with pytest.raises(DfmpcError, match=r"image '.*c\.png' does not exist"):
        _load(f"imagefolder:{root}")


def _png_declaring(path, w, h):
    """A valid PNG header (IHDR, CRC) that declares w x h pixels, with almost no pixel data."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    path.write_bytes(data + b"\0\0\0\0IEND\xaeB`\x82")


@pytest.mark.parametrize("w, h", [(20000, 20000), (10000, 10000), (9000, 9000)])  # Pillow error, warning, ours
def test_decompression_bomb_isone_line(tmp_path, w, h):
    root = _folder(tmp_path)
    _png_declaring(root / "cat" / "bomb.png", w, h)
    assert (root / "cat" / "bomb.png").stat().st_size < 200
    with pytest.raises(DfmpcError, match=r"image '.*bomb\.png' .*(too large|more than the limit)") as e:
        _load(f"imagefolder:{root}")
    one_line(e)


@pytest.mark.parametrize("content", ["truncated_jpeg", "text", "empty", "png_header_only"])
def test_corrupt_images_name_the_file(tmp_path, content):
    from PIL import Image
    root = _folder(tmp_path)
    f = root / "dog" / "bad.jpg"
    if content == "truncated_jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(f, quality=90)
        f.write_bytes(f.read_bytes()[:600])
    elif content == "text":
        f.write_text("<html>not an image</html>")
    elif content == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DfmpcError, match=r"cannot decode image '.*bad\.jpg'") as e:
        _load(f"imagefolder:{root}")
    one_line(e)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    import dfmpc_deploy.zoo.images as images
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    root = _folder(tmp_path)
    (root / "dog" / "big.png").write_bytes(b"\0" * 101)
    with pytest.raises(DfmpcError, match=r"big\.png' is 0 MiB, more than the 0 MiB limit|big\.png' is .* limit"):
        _load(f"imagefolder:{root}")


def test_dataset_larger_than_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    import dfmpc_deploy.zoo.images as images
    root = _folder(tmp_path)
    monkeypatch.setattr(images, "available_memory_bytes", lambda: 3 * 32 * 32 * 4 * 2)  # room for 2 images
    with pytest.raises(DfmpcError, match=r"3 images at 32 px need .* --limit 1 or fewer") as e:
        _load(f"imagefolder:{root}")
    one_line(e)
    assert len(_load(f"imagefolder:{root}", limit=1).labels) == 1
    (tmp_path / "test_batch").write_bytes(pickle.dumps(_good_batch()))
    with pytest.raises(DfmpcError, match=r"8 images at 32 px need"):
        _load(f"cifar10:{tmp_path}")


# --- imagenet:DIR labels files -----------------------------------------------------------------------------------

def _imagenet(tmp_path, lines):
    root = tmp_path / "inet"
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png")
    (root / "labels.txt").write_text(lines)
    return root


@pytest.mark.parametrize("lines, expect", [
    ("", "lists no images"),
    ("a.png\n", r"labels.txt:1: expected '<file> <class index>'"),
    ("a.png 1\nb.png x\n", r"labels.txt:2: class index 'x' is not an integer"),
    ("a.png -3\n", r"class index -3 is outside"),
    ("a.png 1000\n", r"class index 1000 is outside 0..999 \(the model has 1000 classes\)"),
    ("/etc/passwd 1\n", "must be a path inside"),
    ("../inet/images/a.png 1\n", "must be a path inside"),
    ("c.png 1\n", r"'c.png' is neither in"),
    ("a.png 1\nimages/a.png 2\n", r"labels.txt:2: 'images/a.png' is listed twice \(first on line 1\)"),
])
def test_bad_labels_files(tmp_path, lines, expect):
    root = _imagenet(tmp_path, lines)
    with pytest.raises(DfmpcError, match=expect) as e:
        _load(f"imagenet:{root}", num_classes=1000)
    one_line(e)


def test_labels_file_missing_binary_or_fifo(tmp_path):
    root = _imagenet(tmp_path, "a.png 1\n")
    (root / "labels.txt").unlink()
    with pytest.raises(DfmpcError, match="needs '.*labels.txt'"):
        _load(f"imagenet:{root}")
    (root / "labels.txt").write_bytes(b"a.png 1\n\xff\xfe\n")
    with pytest.raises(DfmpcError, match="not UTF-8"):
        _load(f"imagenet:{root}")
    (root / "labels.txt").unlink()
    os.mkfifo(root / "labels.txt")
    with pytest.raises(DfmpcError, match="not a regular file"):
        _load(f"imagenet:{root}")


def test_imagenet_entry_that_is_a_device_is_refused(tmp_path):
    root = _imagenet(tmp_path, "a.png 1\nzero.png 2\n")
    os.symlink("/dev/zero", root / "images" / "zero.png")
    with pytest.raises(DfmpcError, match=r"zero\.png' is .*not a regular file"):
        _load(f"imagenet:{root}")


# --- through the CLI ---------------------------------------------------------------------------------------------

def test_cli_malicious_cifar_exits_1_runs_nothing_writes_nothing(tmp_path, capsys):
    from dfmpc_deploy.cli import main
    data = tmp_path / "cifar"
    data.mkdir()
    marker = tmp_path / MARKER
    (data / "test_batch").write_bytes(pickle.dumps(_System(marker)))
    code = main(["build", "resnet20_cifar10_optA", "--weights", "random", "--data", f"cifar10:{data}",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "posix.system" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_dataset_tensors_are_finite_and_labelled_int64(tmp_path):
    root = _folder(tmp_path)
    ds = _load(f"imagefolder:{root}", num_classes=3)
    assert ds.labels.dtype == torch.int64 and bool(torch.isfinite(ds.images).all())
