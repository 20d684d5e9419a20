"""Hostile inputs to the .dfmpc reader (corrupt and hostile files): every case is one line naming the problem,
exit 1, no traceback, no hang, bounded memory, no partial output, nothing executed."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import pytest

from dfmpc_deploy.cli import main
from dfmpc_deploy.errors import BadFileError
from dfmpc_deploy.io.container import inspect_packed, load_packed, packed_size_report, save_packed
from dfmpc_deploy.io.layouts import CodeLayout
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import ROOT
from tests.io.helpers import join, quick_config, split, variant_net

pytestmark = pytest.mark.usefixtures("deadline")

READERS = {"load": lambda p: load_packed(p, model=variant_net("relu6")), "inspect": inspect_packed,
           "size report": lambda p: packed_size_report(None, p)}


def _special_files(tmp_path) -> dict:
    fifo = tmp_path / "fifo.dfmpc"
    os.mkfifo(fifo)
    (tmp_path / "dir.dfmpc").mkdir()
    files = {"FIFO": fifo, "directory": tmp_path / "dir.dfmpc", "missing": tmp_path / "nope.dfmpc"}
    if os.path.exists("/dev/zero"):
        files["/dev/zero"] = "/dev/zero"
        os.symlink("/dev/zero", tmp_path / "zero.dfmpc")
        files["link to /dev/zero"] = tmp_path / "zero.dfmpc"
    return files


@pytest.mark.parametrize("reader", list(READERS))
def test_only_regular_files_are_read(tmp_path, reader):
    for kind, path in _special_files(tmp_path).items():
        t = time.perf_counter()
        with pytest.raises(BadFileError, match="not a regular file|cannot read") as info:
            READERS[reader](path)
        assert time.perf_counter() - t < 2, kind
        assert "\n" not in str(info.value), kind


def test_cli_inspect_special_files(tmp_path, capsys):
    for kind, path in _special_files(tmp_path).items():
        assert main(["inspect", str(path)]) == 1, kind
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (kind, out, err)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_files_are_refused_from_their_first_bytes(good, tmp_path):
    """2 GB (sparse) files: a bad magic, and a valid file followed by 2 GB; neither is read past its header."""
    bad = tmp_path / "bad.dfmpc"
    with open(bad, "wb") as fh:
        fh.write(b"\x00" * 16)
        fh.truncate(2 << 30)
    grown = tmp_path / "grown.dfmpc"
    grown.write_bytes(good.read_bytes())
    with open(grown, "r+b") as fh:
        fh.truncate(2 << 30)
    before = _maxrss_mb()
    for path, message in ((bad, "not a .dfmpc file"), (grown, "declares .* the file has 2147483648")):
        for name, read in READERS.items():
            t = time.perf_counter()
            with pytest.raises(BadFileError, match=message):
                read(path)
            assert time.perf_counter() - t < 1, name
    assert _maxrss_mb() - before < 50


def test_small_file_naming_a_big_architecture(good, tmp_path):
    """Its records are checked against the architecture built on the meta device: refused without allocating it."""
    pytest.importorskip("pytorchcv")
    h, payload = split(good.read_bytes())
    path = tmp_path / "big.dfmpc"
    path.write_bytes(join(dataclasses.replace(h, arch="resnet152"), payload))
    before, t = _maxrss_mb(), time.perf_counter()
    with pytest.raises(BadFileError, match="does not fit the ResNet architecture"):
        load_packed(path)
    assert time.perf_counter() - t < 5 and _maxrss_mb() - before < 100  # ResNet-152's weights are 241 MB


ESCAPES = "\x1b[2J\x1b]0;owned\x07\r\n   1  fake  ok\u202e\x00"


def test_names_are_escaped_everywhere(good, tmp_path, capsys):
    """Keys, arch and estimator holding terminal escapes, newlines and bidi overrides cannot forge output."""
    h, payload = split(good.read_bytes())
    recs = list(h.records)
    recs[0] = dataclasses.replace(recs[0], name=f"0{ESCAPES}.weight")
    recs[1] = dataclasses.replace(recs[1], name=f"1{ESCAPES}.bias")
    path = tmp_path / "esc.dfmpc"
    path.write_bytes(join(dataclasses.replace(h, arch=ESCAPES, estimator=ESCAPES, records=tuple(recs)), payload))
    res = inspect_packed(path)
    assert res.ok  # well-formed, only oddly named
    plain = inspect_packed(good).text
    assert len(res.text.splitlines()) == len(plain.splitlines())
    assert all(line.isprintable() for line in res.text.splitlines()), res.text
    assert "\\x1b[2J" in res.text and "\\u202e" in res.text
    with pytest.raises(BadFileError) as info:  # the error line names the key, escaped
        load_packed(path, model=variant_net("relu6"))
    assert str(info.value).isprintable() and "\\x1b" in str(info.value)
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and out.count("\n") == len(plain.splitlines())


def _bad_content(good, tmp_path):
    """The good file with an invalid base-3 byte in a code payload (checksums fixed): only decoding finds it."""
    from tests.io.helpers import edit_payload, layer_offsets

    def edit(h, buf):
        r = next(r for r in h.layers if r.bits == 2)
        buf[layer_offsets(h)[r.fqn][2]] = 255
    path = tmp_path / "bad.dfmpc"
    path.write_bytes(edit_payload(good.read_bytes(), edit))
    return path


def test_inspect_exit_status(good, tmp_path, capsys):
    assert main(["inspect", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip().endswith("verdict: ok") and err == ""
    assert main(["inspect", str(_bad_content(good, tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert "verdict: BAD" in out and "255 > 242" in err and err.count("\n") == 1


@pytest.mark.parametrize("which,code", [("good", 0), ("bad", 1)])
def test_inspect_into_a_closed_pipe(good, tmp_path, which, code):
    """``inspect | head -1``: the reader is gone before the output is written; quiet exit, status = the verdict."""
    path = good if which == "good" else _bad_content(good, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "dfmpc_deploy", "inspect", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported torch, so its first write meets a closed pipe
    signal.alarm(0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


MEMORY_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    torch.set_num_threads(1)
    from dfmpc_deploy.errors import BadFileError, DfmpcError
    from dfmpc_deploy.io.container import inspect_packed, load_packed
    from dfmpc_deploy.zoo.models import get_spec

    def vm():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024

    legit, tiny, model_bytes, claim = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    hostile = sys.argv[5:]
    from tests.io.helpers import variant_net
    load_packed(tiny, model=variant_net("relu6"))  # warm-up: lazy imports, allocator arenas
    inspect_packed(tiny)
    with torch.device("meta"):
        get_spec("resnet18").build(False)
    base, size, mib = vm(), os.path.getsize(legit), 1 << 20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    out = {"base": base, "refused": []}
    resource.setrlimit(resource.RLIMIT_AS, (base + 64 * mib, hard))
    for p in hostile:
        try:
            load_packed(p)
        except BadFileError as err:
            out["refused"].append(str(err)[:60])
    resource.setrlimit(resource.RLIMIT_AS, (base + 2 * os.path.getsize(claim) + 32 * mib, hard))
    out["claim_ok"] = inspect_packed(claim).ok  # a valid file; 2^27 one-scale channels must not be expanded
    resource.setrlimit(resource.RLIMIT_AS, (base + 2 * size + 32 * mib, hard))
    out["inspect_ok"] = inspect_packed(legit).ok
    resource.setrlimit(resource.RLIMIT_AS, (base + 2 * size + 2 * model_bytes + 64 * mib, hard))
    out["loaded_layers"] = len(load_packed(legit).layers)
    resource.setrlimit(resource.RLIMIT_AS, (base + 2 * size + model_bytes // 2, hard))
    try:  # the limit is real: with too little memory the same load fails, in one line
        load_packed(legit)
    except DfmpcError as err:
        out["tight"] = str(err)
    print(json.dumps(out))
""")


def test_memory_is_bounded_by_the_file_and_the_model(good, tmp_path):
    """Under RLIMIT_AS: hostile files are refused within 64 MiB of the baseline, inspect stays within 2 x file +
    32 MiB, and load within 2 x file + 2 x the model's float32 state dict + 64 MiB (docs/FORMAT.md)."""
    signal.alarm(0)  # building the ResNet-18 fixtures takes longer than the read deadline; the child has its timeout
    pytest.importorskip("pytorchcv")
    from dfmpc_deploy.zoo.models import load_model
    signal.alarm(0)  # the ResNet-18 compensation alone takes ~8 s on a loaded 2-core machine; it reads no file
    mp = compensate(load_model("resnet18", "random").module, (3, 224, 224), **quick_config(), arch="resnet18")
    signal.alarm(60)
    legit = tmp_path / "r18.dfmpc"
    save_packed(mp, legit)
    model_bytes = sum(v.numel() * v.element_size() for v in mp.module.state_dict().values())
    h, payload = split(good.read_bytes())
    recs = list(h.records)
    recs[0] = dataclasses.replace(recs[0], shape=(1 << 14, 1 << 14, 1, 1), nbytes=(1 << 28) // 5 + 1)
    big_layer, big_arch, sparse = tmp_path / "big_layer.dfmpc", tmp_path / "big_arch.dfmpc", tmp_path / "sparse"
    big_layer.write_bytes(join(dataclasses.replace(h, records=tuple(recs)), payload))
    # a consistent 130 KB file claiming a layer of 2^27 weights (a valid deflate stream at deflate's maximum ratio)
    # with one scale for all its channels: inspect, which has no architecture to bound it, must stay bounded
    claim = tmp_path / "claim.dfmpc"
    n, z = 1 << 27, zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = b"".join([z.compress(bytes(1 << 20)) for _ in range(n >> 20)] + [z.flush()])
    recs = list(h.records)
    recs[6] = dataclasses.replace(recs[6], shape=(n, 1, 1, 1), layout=CodeLayout.KBIT_DEFLATE, nbytes=len(stream),
                                  scale_once=True, in_scale=False, in_scale_once=False)
    ch = dataclasses.replace(h, records=tuple(recs))
    t_len, s_len, _ = ch.section_nbytes
    old_codes = payload[len(payload) - sum(r.nbytes for r in h.layers):]
    codes = old_codes[:h.records[0].nbytes] + stream + old_codes[-h.records[12].nbytes:]
    claim.write_bytes(join(ch, payload[:t_len] + struct.pack("<f", 1.0) * (s_len // 4) + codes))
    with open(sparse, "wb") as fh:
        fh.truncate(2 << 30)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(legit), str(good), str(model_bytes), str(claim),
                        str(big_layer), str(big_arch), str(sparse)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert len(out["refused"]) == 3, out
    assert out["claim_ok"], out
    assert out["inspect_ok"] and out["loaded_layers"] == len(mp.layers)
    assert "not enough memory" in out.get("tight", ""), out
