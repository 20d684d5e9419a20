"""Hostile inputs, second round (issue 22), one structured generator per class: decoders that would start programs
(every Pillow format outside the allow-list, whatever the file is named), shared-reference and memo-index pickle
bombs, sparse files of every kind, every image mode against its 8-bit picture, OS errors (over-long names, a full
stdout), float32-only flag values, files of one kind named as another, and output that must be only JSON.

Every generator is seeded; every refusal is one line naming the bad value; memory is measured (``ru_maxrss``)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dfmpc_deploy.cli import main
from dfmpc_deploy.errors import BadFileError, DfmpcError
from dfmpc_deploy.io.container import inspect_packed
from dfmpc_deploy.io.files import read_regular_file, sniff
from dfmpc_deploy.io.header import TensorRecord, encode_header
from dfmpc_deploy.zoo.cifar_pickle import restricted_loads
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.images import IMAGE_FORMATS, decode_image
from dfmpc_deploy.zoo.models import load_state_dict_file
from tests.conftest import ROOT
from tests.hostile.conftest import default_sigint, one_line
from tests.io.helpers import split

pytestmark = pytest.mark.usefixtures("deadline")

RNG_SEED = 22


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _picture(seed: int = RNG_SEED, size: int = 40) -> np.ndarray:
    """An 8-bit RGB picture with every value 0..255 present (so a clipped or mis-scaled decode shows)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    a.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    return a


# --- decoders: only the allow-listed formats, by content -------------------------------------------------------

def _foreign_formats() -> list[str]:
    """Every format Pillow can write that is not on the allow-list (generated, not hand-picked)."""
    from PIL import Image
    Image.init()
    skip = {"PDF", "EPS", "PALM", "XBM", "MPO", "SPIDER", "H5", "HDF5", "BUFR", "GRIB", "FITS", "WMF", "BLP", "DDS",
            "IM", "AVIF", "JPEG2000", "MSP", "PCX", "SGI", "TGA", "ICNS", "QOI"}
    return sorted(set(Image.SAVE) - set(IMAGE_FORMATS) - skip)


@pytest.mark.parametrize("fmt", _foreign_formats())
def test_formats_outside_the_allow_list_are_refused_whatever_the_name(tmp_path, fmt):
    from PIL import Image
    buf = io.BytesIO()
    try:
        Image.fromarray(_picture()).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow cannot write {fmt} here")
    f = tmp_path / "x.jpg"
    f.write_bytes(buf.getvalue())
    with pytest.raises(DfmpcError, match=r"x\.jpg'.*not a JPEG/PNG") as e:
        decode_image(f, 32, None)
    one_line(e)


def test_postscript_named_jpg_never_starts_ghostscript(tmp_path, monkeypatch):
    """A fake ``gs`` first on PATH would leave a marker; it must never run."""
    marker = tmp_path / "gs_ran"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bindir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n/Helvetica findfont 12 scalefont setfont\n"
           b"0 0 moveto (x) show\nshowpage\n%%EOF\n")
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "ok.png").write_bytes(_png(_picture()))
    (root / "a" / "evil.jpg").write_bytes(eps)
    with pytest.raises(DfmpcError, match=r"evil\.jpg'.*not a JPEG/PNG") as e:
        load_dataset(parse_data_spec(f"imagefolder:{root}"), 32, None, (0.5,) * 3, (0.25,) * 3, num_workers=0)
    one_line(e)
    assert not marker.exists()


def _png(a: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    (Image.fromarray(a) if mode is None else Image.fromarray(a, mode)).save(buf, format="PNG")
    return buf.getvalue()


# --- image modes: each gives the 8-bit picture's RGB values, or is refused by name -----------------------------

def _encodings(a8: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    """The same picture in many modes and formats -> (file bytes, the 8-bit RGB it must decode to)."""
    from PIL import Image
    gray = a8[..., 0]
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)
    out: dict[str, tuple[bytes, np.ndarray]] = {}

    def save(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    out["rgb_png"] = (save(Image.fromarray(a8), "PNG"), a8)
    out["l_png"] = (save(Image.fromarray(gray), "PNG"), gray_rgb)
    for fmt in ("PNG", "TIFF", "PPM"):
        out[f"gray16x257_{fmt}"] = (save(Image.fromarray(gray.astype(np.uint16) * 257), fmt), gray_rgb)
        out[f"gray16shl8_{fmt}"] = (save(Image.fromarray(gray.astype(np.uint16) << 8), fmt), gray_rgb)
    out["float01_tiff"] = (save(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"), gray_rgb)
    out["float255_tiff"] = (save(Image.fromarray(gray.astype(np.float32)), "TIFF"), gray_rgb)
    out["rgba_png"] = (save(Image.fromarray(np.dstack([a8, np.full(gray.shape, 255, np.uint8)])), "PNG"), a8)
    out["la_png"] = (save(Image.fromarray(np.dstack([gray, gray]), "LA"), "PNG"), gray_rgb)
    out["rgb_tiff"] = (save(Image.fromarray(a8), "TIFF"), a8)
    out["rgb_bmp"] = (save(Image.fromarray(a8), "BMP"), a8)
    return out


@pytest.mark.parametrize("case", sorted(_encodings(_picture())))
def test_every_mode_decodes_to_the_8bit_picture(tmp_path, case):
    a8 = _picture()
    data, want = _encodings(a8)[case]
    f = tmp_path / "img"
    f.write_bytes(data)
    got = decode_image(f, a8.shape[0], None)
    assert got.shape == (3, *a8.shape[:2])
    np.testing.assert_array_equal(got.transpose(1, 2, 0), want)


@pytest.mark.parametrize("values", ["negative", "beyond255", "nan"])
def test_float_images_outside_any_8bit_range_are_refused_by_mode(tmp_path, values):
    from PIL import Image
    a = _picture()[..., 0].astype(np.float32)
    a[0, 0] = {"negative": -3.0, "beyond255": 1000.0, "nan": np.nan}[values]
    f = tmp_path / "f.tif"
    Image.fromarray(a).save(f, format="TIFF")
    with pytest.raises(DfmpcError, match=r"f\.tif' \(mode F") as e:
        decode_image(f, 32, None)
    one_line(e)


@pytest.mark.parametrize("side", [5000, 8000, 30000])
def test_pixel_bombs_are_refused_from_the_header(tmp_path, side):
    from tests.hostile.test_hostile_data import _png_declaring
    f = tmp_path / "bomb.png"
    _png_declaring(f, side, side)
    before = _maxrss_mb()
    with pytest.raises(DfmpcError, match=r"bomb\.png' (declares .*pixels|is too large)") as e:
        decode_image(f, 32, None)
    one_line(e)
    assert _maxrss_mb() - before < 64


# --- pickle bombs: shared references and memo indexes ----------------------------------------------------------

def _shared_reference_bomb(width: int, depth: int, key: bytes = b"labels") -> bytes:
    """A protocol-2 pickle of ``{key: L[depth-1]}`` where ``L[i]`` holds ``L[i-1]`` ``width`` times (4 KB for
    width 500, depth 4, expanding to 500^4 elements)."""
    out = bytearray(b"\x80\x02]q\x00(" + b"K\x01" * width + b"e")
    for level in range(1, depth):
        out += b"0]q" + bytes([level]) + b"(" + (b"h" + bytes([level - 1])) * width + b"e"
    out += b"0}(X" + struct.pack("<I", len(key)) + key + b"h" + bytes([depth - 1]) + b"u."
    return bytes(out)


def _memo_index_bomb(index: int) -> bytes:
    return b"\x80\x02]r" + struct.pack("<I", index) + b"."


@pytest.mark.parametrize("width, depth", [(500, 4), (60, 8), (2000, 2), (3, 60)])
def test_shared_reference_pickles_are_refused_within_the_budget(tmp_path, width, depth):
    raw = _shared_reference_bomb(width, depth)
    assert len(raw) < 8192
    (tmp_path / "test_batch").write_bytes(raw)
    before, t = _maxrss_mb(), time.perf_counter()
    with pytest.raises(DfmpcError, match="test_batch") as e:
        load_dataset(parse_data_spec(f"cifar10:{tmp_path}"), 32, None, (0.5,) * 3, (0.25,) * 3)
    one_line(e)
    assert _maxrss_mb() - before < 100
    assert time.perf_counter() - t < 30


@pytest.mark.parametrize("index", [1 << 20, 1 << 28, (1 << 32) - 1])
def test_memo_indexes_cost_one_entry(index):
    before = _maxrss_mb()
    assert restricted_loads(_memo_index_bomb(index)) == []
    assert _maxrss_mb() - before < 50


# --- sparse files and declared sizes: refused before anything is allocated ------------------------------------

def _sparse(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def test_sparse_dfmpc_declaring_400_mib_is_refused_before_its_payload(good, tmp_path):
    h, _ = split(good.read_bytes())
    recs = list(h.records)
    i = next(k for k, r in enumerate(recs) if isinstance(r, TensorRecord) and r.dtype == "F32")
    recs[i] = dataclasses.replace(recs[i], shape=(100 << 20,))
    h2 = dataclasses.replace(h, records=tuple(recs))
    head = encode_header(h2)
    path = _sparse(tmp_path / "sparse.dfmpc", head, len(head) + sum(h2.section_nbytes))
    assert path.stat().st_size > 400 << 20 and path.stat().st_blocks * 512 < 1 << 20
    before = _maxrss_mb()
    with pytest.raises(BadFileError, match="sparse") as e:
        inspect_packed(path)
    one_line(e)
    assert _maxrss_mb() - before < 64
    assert main(["inspect", str(path)]) == 1


@pytest.mark.parametrize("head", [b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b""])
def test_sparse_weights_are_refused_before_reading(tmp_path, head):
    path = _sparse(tmp_path / "w.pth", head, 400 << 20)
    before = _maxrss_mb()
    with pytest.raises(DfmpcError, match="sparse") as e:
        load_state_dict_file(path)
    one_line(e)
    assert _maxrss_mb() - before < 64


def test_sparse_labels_and_images_are_refused(tmp_path):
    path = _sparse(tmp_path / "labels.txt", b"a.png 0\n", 40 << 20)
    with pytest.raises(DfmpcError, match="sparse"):
        read_regular_file(path, 64 << 20, "labels file")


def _zip_checkpoint(claim: int | None, compress: bool) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    if claim is None and not compress:
        return buf.getvalue()
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if compress and info.filename.endswith("/data/0"):
                data = bytes(claim or (64 << 20))
                z.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                z.writestr(info, data)
    return out.getvalue()


def test_zip_records_are_checked_before_torch_allocates_them(tmp_path):
    f = tmp_path / "bomb.pth"
    f.write_bytes(_zip_checkpoint(256 << 20, compress=True))
    assert f.stat().st_size < 1 << 20
    before = _maxrss_mb()
    with pytest.raises(DfmpcError, match=r"bomb\.pth.*compressed") as e:
        load_state_dict_file(f)
    one_line(e)
    assert _maxrss_mb() - before < 64
    f.write_bytes(_zip_checkpoint(None, compress=False))
    assert load_state_dict_file(f)["w"].shape == (4,)


# --- a file of one kind named as another: sniffed, named -------------------------------------------------------

def test_content_decides_what_a_weights_file_is(tmp_path, good):
    st = pytest.importorskip("safetensors.torch")
    sd = {"a.weight": torch.ones(2, 3)}
    as_pth = tmp_path / "really_safetensors.pth"
    st.save_file(sd, str(as_pth))
    assert sniff(as_pth.read_bytes()[:16]) == "safetensors"
    assert torch.equal(load_state_dict_file(as_pth)["a.weight"], sd["a.weight"])
    as_st = tmp_path / "really_torch.safetensors"
    torch.save(sd, as_st)
    assert torch.equal(load_state_dict_file(as_st)["a.weight"], sd["a.weight"])
    with pytest.raises(DfmpcError, match="is a packed .dfmpc model, not float weights") as e:
        load_state_dict_file(good)
    one_line(e)


def test_nan_in_an_integer_buffer_is_refused(tmp_path):
    from dfmpc_deploy.zoo.models import load_model
    lm = load_model("resnet20_cifar10_optA", weights="random")
    sd = {k: v.clone() for k, v in lm.module.state_dict().items()}
    key = next(k for k in sd if k.endswith("num_batches_tracked"))
    sd[key] = torch.tensor(float("nan"))
    f = tmp_path / "w.pth"
    torch.save(sd, f)
    with pytest.raises(DfmpcError, match=f"integer buffer '{key}'") as e:
        load_model("resnet20_cifar10_optA", weights=str(f))
    one_line(e)


# --- OS errors as one line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--weights", "--data"])
@pytest.mark.parametrize("shape", ["long_name", "long_path"])
def test_over_long_names_are_one_line(tmp_path, capsys, flag, shape):
    name = "x" * 300 if shape == "long_name" else "/".join(["y" * 200] * 30)
    value = str(tmp_path / name) if flag == "--weights" else f"imagefolder:{tmp_path / name}"
    code = main(["build", "resnet20_cifar10_optA", flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert not (tmp_path / "o").exists()


def _cli(args: list[str], stdout=subprocess.PIPE, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfmpc_deploy", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["models", "--json"], ["models"], ["inspect", "GOOD"], ["inspect", "GOOD", "--json"]])
def test_full_stdout_is_one_line(good, args):
    signal.alarm(0)  # a subprocess that imports torch: its own timeout below
    with open("/dev/full", "w") as full:
        r = _cli([str(good) if a == "GOOD" else a for a in args], stdout=full)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "No space left on device" in r.stderr


def test_ctrl_c_during_startup_exits_130_in_one_line(tmp_path):
    signal.alarm(0)
    p = subprocess.Popen([sys.executable, "-m", "dfmpc_deploy", "build", "resnet20_cifar10_optA", "--weights",
                          "random", "--out", str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, preexec_fn=default_sigint)
    time.sleep(1.5)  # python is up; torch is still importing (about 5 s)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err
    assert not (tmp_path / "o").exists()


# --- values finite in float64 but not in float32 ---------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--std", "1e-50,1,1"), ("--std", "1e-45,0.2,0.2"), ("--mean", "1e39,0,0"),
                                         ("--std", "1e-30,1,1"), ("--mean", "-3e38,0,0"), ("--lambda1", "1e308"),
                                         ("--lambda1", "1e38"), ("--lambda2", "-1"), ("--std", "1e-38,1,1")])
def test_float32_values_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    code = main(["build", "resnet20_cifar10_optA", "--weights", "random", flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and flag.split("-")[-1] in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--synth-samples", "1000000"], ["--batch-sizes", "65536"],
                                  ["--no-pack", "--compress"]])
def test_hopeless_or_contradictory_flags_are_one_line_up_front(tmp_path, capsys, args):
    t = time.perf_counter()
    code = main(["build", "resnet50", "--weights", "random", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and args[0] in err and "Traceback" not in err
    assert time.perf_counter() - t < 30 and not (tmp_path / "o").exists()


# --- output that says what it does -----------------------------------------------------------------------------

def test_json_verbs_print_only_json(good, capsys):
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert any(m["name"] == "resnet20_cifar10_optA" for m in models)
    assert main(["inspect", str(good), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["size"]["packed"] == good.stat().st_size
    assert main(["inspect", str(good), "-q"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["\x1b[2J\x1b[Hclear", "bell\x07", "nl\nforged: ok", "\u202eevil"])
def test_escape_sequences_are_never_echoed_raw(tmp_path, capsys, name):
    assert main(["build", name, "--weights", "random", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err and err.count("\n") == 1
    root = tmp_path / "data"
    (root / name.replace("\n", "_")).mkdir(parents=True)
    assert main(["build", "resnet20_cifar10_optA", "--weights", "random", "--data", f"imagefolder:{root}",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err and err.count("\n") == 1


def test_labels_with_a_byte_order_mark_are_read(tmp_path):
    root = tmp_path / "inet"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(_png(_picture()))
    (root / "labels.txt").write_bytes("\ufeffa.png 3\n".encode())
    ds = load_dataset(parse_data_spec(f"imagenet:{root}"), 32, None, (0.5,) * 3, (0.25,) * 3, num_classes=10)
    assert ds.labels.tolist() == [3]


def test_onnxruntime_writes_nothing_under_home(tmp_path):
    signal.alarm(0)
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": ""}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    code = "from dfmpc_deploy._deps import require; require('onnxruntime', 'ort')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT, timeout=300)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
