"""dfmpc_deploy.io.container: write and read .dfmpc files: bit-exact reloads, skeletons, determinism, atomicity."""
from __future__ import annotations

import dataclasses
import errno
import json
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from dfmpc_deploy.core.config import InputSpec
from dfmpc_deploy.errors import BadFileError, DfmpcError
from dfmpc_deploy.io import container as P
from dfmpc_deploy.io.container import InspectResult, inspect_packed, load_packed, save_packed
from dfmpc_deploy.io.header import MAGIC
from dfmpc_deploy.io.sizes import packed_nbytes
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import ROOT
from tests.io.helpers import (
    assert_same_model,
    bell_net,
    field_spans,
    forward,
    join,
    quick_config,
    resign,
    split,
    variant_inputs,
    variant_net,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_models():
    return {v: (variant_net(v), compensate(variant_net(v), (3, 16, 16), **quick_config(), arch=f"tiny-{v}"))
            for v in ("relu", "relu6", "nobn")}


@pytest.mark.parametrize("layout", ["ternary-base3", "ternary-2bit"])
@pytest.mark.parametrize("variant", ["relu", "relu6", "nobn"])
def test_tiny_round_trip_bit_exact(tiny_models, tmp_path, variant, layout):
    net, mp = tiny_models[variant]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "m.dfmpc"
    save_packed(mp, path, ternary_layout=layout)
    assert path.read_bytes()[:8] == MAGIC
    back = load_packed(path, model=net)
    assert_same_model(mp, back, variant_inputs())
    assert back.info["format_version"] == P.FORMAT_VERSION == 4 and not back.module.training
    assert {L.layout for L in split(path.read_bytes())[0].layers} == {layout, "kbit"}
    if variant == "relu6":
        assert any(q.in_scale is not None for q in back.layers.values())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the skeleton is not modified
    assert all(not p.is_meta for p in net.parameters())


@pytest.mark.parametrize("grid", ["int", "dorefa"])
@pytest.mark.parametrize("low,high,per_channel", [(2, 6, False), (3, 6, False), (4, 8, True), (2, 2, False),
                                                  (5, 7, True), (2, 6, True)])
def test_bit_widths_round_trip(tmp_path, low, high, per_channel, grid):
    net = variant_net("relu6")
    mp = compensate(net, (3, 16, 16), **quick_config(low, high, per_channel), grid=grid)
    assert all(q.grid == grid for q in mp.layers.values())
    save_packed(mp, tmp_path / "m.dfmpc")
    back = load_packed(tmp_path / "m.dfmpc", model=net)
    assert_same_model(mp, back, variant_inputs())
    h, _ = split((tmp_path / "m.dfmpc").read_bytes())
    assert all(r.grid == (grid if r.bits > 2 else "dorefa") for r in h.layers)
    flags = [s for s in field_spans((tmp_path / "m.dfmpc").read_bytes()) if s[0].endswith(".flags")]
    data = (tmp_path / "m.dfmpc").read_bytes()
    bit3 = [bool(data[off] & 8) for _, off, _ in flags]
    assert bit3 == [r.bits > 2 and grid == "int" for r in h.layers], "flag bit 3 marks exactly the int-grid layers"
    text = inspect_packed(tmp_path / "m.dfmpc").text
    assert (f" {grid} " in text) == (high > 2)


def test_int8_lattice_survives_packing_exactly(tmp_path):
    """Weights on an int8 lattice: 8-bit int grid -> file -> the same float weights, bit for bit."""
    net = variant_net("relu")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                q = torch.randint(-128, 128, m.weight.shape, generator=torch.Generator().manual_seed(m.weight.numel()))
                q.view(-1)[0] = -128
                m.weight.copy_(q.float() * torch.tensor(0.0123, dtype=torch.float32))
    for per_channel in (False, True):
        mp = compensate(net, (3, 16, 16), **quick_config(8, 8, per_channel), grid="int")
        save_packed(mp, tmp_path / "m.dfmpc")
        back = load_packed(tmp_path / "m.dfmpc", model=net)
        for fqn, q in back.layers.items():
            assert torch.equal(q.weight(), dict(net.named_modules())[fqn].weight), fqn


def test_shared_tiny_net_round_trip(tiny_net, tmp_path):
    mp = compensate(tiny_net, (3, 16, 16), **quick_config())
    save_packed(mp, tmp_path / "m.dfmpc")
    assert_same_model(mp, load_packed(tmp_path / "m.dfmpc", model=tiny_net), variant_inputs())


def test_resnet20_round_trip_rebuilds_architecture(tmp_path):
    from dfmpc_deploy.zoo.models import load_model
    name = "resnet20_cifar10_optA"
    mp = compensate(load_model(name, "random").module, (3, 32, 32), **quick_config(), arch=name)
    report = save_packed(mp, tmp_path / "r20.dfmpc")
    state = torch.random.get_rng_state()
    back = load_packed(tmp_path / "r20.dfmpc")  # no skeleton: rebuilt from the recorded arch (on the meta device)
    assert torch.equal(state, torch.random.get_rng_state()), "loading must not consume the caller's RNG"
    assert_same_model(mp, back, variant_inputs(4, 32))
    assert report["packed"] < report["fp32"] / 5
    assert all(not t.is_meta for t in [*back.module.parameters(), *back.module.buffers()])


def test_skeleton_callable(tiny_models, tmp_path):
    net, mp = tiny_models["relu6"]
    save_packed(mp, tmp_path / "m.dfmpc")
    asked = []

    def build(name: str) -> nn.Module:
        asked.append((name, torch.empty(1).device.type))  # called under torch.device("meta")
        return variant_net("relu6")

    assert_same_model(mp, load_packed(tmp_path / "m.dfmpc", skeleton=build), variant_inputs())
    assert asked == [("tiny-relu6", "meta")]
    with pytest.raises(BadFileError, match="does not fit"):
        load_packed(tmp_path / "m.dfmpc", skeleton=lambda name: variant_net("nobn"))


class _WithNonPersistent(nn.Module):
    """A conv net with a non-persistent buffer (not in the state dict, hence not in the file)."""

    def __init__(self):
        super().__init__()
        self.body = variant_net("relu")
        self.register_buffer("offset", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def forward(self, x):
        return self.body(x + self.offset)


def test_non_persistent_buffers_come_from_the_architecture(tmp_path):
    net = _WithNonPersistent().eval()
    mp = compensate(net, (3, 16, 16), **quick_config(), arch="np")
    save_packed(mp, tmp_path / "m.dfmpc")
    x = variant_inputs()
    for back in (load_packed(tmp_path / "m.dfmpc", model=net),
                 load_packed(tmp_path / "m.dfmpc", skeleton=lambda name: _WithNonPersistent().eval())):
        assert torch.equal(back.module.offset, torch.full((1, 3, 1, 1), 0.25))
        assert torch.equal(forward(back.module, x), forward(mp.module, x))


def test_container_does_not_import_the_zoo():
    code = ("import sys, dfmpc_deploy.io.container; "
            "print([m for m in sys.modules if m.startswith(('dfmpc_deploy.zoo', 'pytorchcv'))])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_deterministic_bytes(tiny_models, tmp_path):
    net, mp = tiny_models["relu6"]
    save_packed(mp, tmp_path / "a.dfmpc")
    save_packed(mp, tmp_path / "b.dfmpc")
    again = compensate(variant_net("relu6"), (3, 16, 16), **quick_config(), arch="tiny-relu6")  # fresh run, same model
    save_packed(again, tmp_path / "c.dfmpc")
    a = (tmp_path / "a.dfmpc").read_bytes()
    assert a == (tmp_path / "b.dfmpc").read_bytes() == (tmp_path / "c.dfmpc").read_bytes()
    save_packed(load_packed(tmp_path / "a.dfmpc", model=net), tmp_path / "d.dfmpc")  # a reload packs the same
    assert (tmp_path / "d.dfmpc").read_bytes() == a


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("crash")])
def test_atomic_write_leaves_nothing_on_failure(tiny_models, tmp_path, monkeypatch, exc):
    _, mp = tiny_models["relu"]
    old = tmp_path / "old.dfmpc"
    save_packed(mp, old)
    before = old.read_bytes()

    def fail_midway(tmp, pieces):
        with open(tmp, "wb") as fh:
            fh.write(pieces[0])
        raise exc

    monkeypatch.setattr(P, "_write_pieces", fail_midway)
    with pytest.raises(DfmpcError if isinstance(exc, OSError) else RuntimeError):
        save_packed(mp, tmp_path / "new.dfmpc")
    with pytest.raises(DfmpcError if isinstance(exc, OSError) else RuntimeError):
        save_packed(mp, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.dfmpc"]  # no new file, no temp file
    assert old.read_bytes() == before  # the previous file is untouched


def test_save_refuses_edited_weights(tiny_models, tmp_path):
    _, mp = tiny_models["relu"]
    edited = dataclasses.replace(mp, module=variant_net("relu"))  # weights no longer codes * scale
    with pytest.raises(DfmpcError, match="not codes \\* scale"):
        save_packed(edited, tmp_path / "m.dfmpc")
    with pytest.raises(ValueError, match="ternary_layout"):
        save_packed(mp, tmp_path / "m.dfmpc", ternary_layout="kbit")
    assert not (tmp_path / "m.dfmpc").exists()


def test_unregistered_arch_needs_a_skeleton(tiny_models, tmp_path):
    _, mp = tiny_models["relu"]
    save_packed(mp, tmp_path / "m.dfmpc")
    with pytest.raises(DfmpcError, match="model=") as info:
        load_packed(tmp_path / "m.dfmpc")
    assert not isinstance(info.value, BadFileError)
    with pytest.raises(BadFileError, match="does not fit"):
        load_packed(tmp_path / "m.dfmpc", model=variant_net("nobn"))
    with pytest.raises(BadFileError, match="'0.weight' is torch.float32 \\[8, 3, 3, 3\\] in the file but "
                                           "torch.float32 \\[4, 3, 3, 3\\]"):
        load_packed(tmp_path / "m.dfmpc", model=variant_net("relu", width=4))


def test_version_1_files_are_refused_in_one_line(tmp_path):
    """A v1 file starts with a u64 JSON length and '{'; it is named as such, with the fix."""
    text = b'{"__metadata__":{"format":"dfpk","format_version":"1"}}'
    (tmp_path / "old.dfmpc").write_bytes(len(text).to_bytes(8, "little") + text)
    for fn in (load_packed, inspect_packed, lambda p: P.packed_size_report(None, p)):
        with pytest.raises(BadFileError, match="is a version-1 .dfmpc file; this dfmpc-deploy .* re-pack") as info:
            fn(tmp_path / "old.dfmpc")
        assert "\n" not in str(info.value)


def test_inspect_reports_layers_and_checksums(tiny_models, tmp_path):
    _, mp = tiny_models["relu6"]
    path = tmp_path / "m.dfmpc"
    save_packed(mp, path, compress=False)
    res = inspect_packed(path)
    assert isinstance(res, InspectResult) and res.ok and not res.problems and str(res) == res.text
    assert all(fqn in res.text for fqn in mp.layers) and "ternary-base3" in res.text and "kbit" in res.text
    assert "payloads ok" in res.text and "BAD" not in res.text and res.text.endswith("verdict: ok")
    assert res.report == P.packed_size_report(mp, path) | {"fp32": res.report["fp32"]}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the last code payload
    path.write_bytes(bytes(data))
    res = inspect_packed(path)
    assert not res.ok and "payload(s) BAD: codes" in res.text and "verdict: BAD" in res.text
    with pytest.raises(BadFileError, match="checksum mismatch in the codes section"):
        load_packed(path, model=variant_net("relu6"))


def test_compressed_model_round_trip_bit_exact_and_deterministic(tmp_path):
    net = bell_net()
    mp = compensate(net, (3, 16, 16), **quick_config(), arch="tiny-bell")
    a, b, dense = tmp_path / "a.dfmpc", tmp_path / "b.dfmpc", tmp_path / "d.dfmpc"
    rep = save_packed(mp, a, compress=True)
    save_packed(mp, b, compress=True)
    assert a.read_bytes() == b.read_bytes()
    layouts = [L.layout for L in split(a.read_bytes())[0].layers]
    assert "kbit-deflate" in layouts and ("ternary-base3" in layouts or "kbit" in layouts), layouts  # mixed
    assert rep["packed"] < save_packed(mp, dense)["packed"]
    assert [L.layout for L in split(dense.read_bytes())[0].layers] == ["ternary-base3", "kbit", "kbit"]
    assert_same_model(mp, load_packed(a, model=net), variant_inputs())
    res = inspect_packed(a)
    assert res.ok and "kbit-deflate" in res.text and res.report["packed"] == rep["packed"] == a.stat().st_size


def test_loaded_model_has_no_config_and_keeps_estimator(tiny_models, tmp_path):
    _, mp = tiny_models["relu"]
    save_packed(mp, tmp_path / "m.dfmpc")
    back = load_packed(tmp_path / "m.dfmpc", model=variant_net("relu"))
    assert back.config is None and back.estimator == mp.estimator and back.arch == "tiny-relu"
    save_packed(back, tmp_path / "again.dfmpc")  # a loaded model (config None) packs again
    assert (tmp_path / "again.dfmpc").read_bytes() == (tmp_path / "m.dfmpc").read_bytes()


def test_resnet18_round_trip_default_skeleton(tmp_path):
    pytest.importorskip("pytorchcv")
    from dfmpc_deploy.zoo.models import load_model
    model = load_model("resnet18", "random").module
    mp = compensate(model, (3, 224, 224), **quick_config(), arch="resnet18")
    save_packed(mp, tmp_path / "r18.dfmpc")
    back = load_packed(tmp_path / "r18.dfmpc")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(forward(back.module, x), forward(mp.module, x))


# ------------------------------------------------------------------------------------------------ format versions

V2_FILE = ROOT / "tests" / "io" / "data" / "tiny_relu6_v2.dfmpc"  # written by dfmpc-deploy 0.2.0 (format 2)


def test_version_2_files_still_load():
    expected = json.loads(V2_FILE.with_name("tiny_relu6_v2_logits.json").read_text())["logits_hex"]
    back = load_packed(V2_FILE, model=variant_net("relu6"))
    assert back.info["format_version"] == 2 and back.input is None and back.arch == "tiny-relu6"
    y = forward(back.module, variant_inputs())
    torch.testing.assert_close(y, torch.tensor([[float.fromhex(v) for v in row] for row in expected]),
                               rtol=0, atol=1e-6)
    result = inspect_packed(V2_FILE)
    assert result.ok and ".dfmpc v2" in result.text and "input: not recorded (format version 2)" in result.text
    assert result.report["packed"] == V2_FILE.stat().st_size


V3_FILE = ROOT / "tests" / "io" / "data" / "tiny_relu6_v3.dfmpc"  # written by format 3 (before the grid flag)


def test_version_3_files_still_load_as_dorefa():
    back = load_packed(V3_FILE, model=variant_net("relu6"))
    assert back.info["format_version"] == 3 and back.arch == "tiny-relu6"
    six = [q for q in back.layers.values() if q.bits > 2]
    assert six and all(q.grid == "dorefa" and bool((q.codes % 2 != 0).all()) for q in six)
    expected = json.loads(V3_FILE.with_name("tiny_relu6_v3_logits.json").read_text())["logits_hex"]
    torch.testing.assert_close(forward(back.module, variant_inputs()),
                               torch.tensor([[float.fromhex(v) for v in row] for row in expected]), rtol=0, atol=1e-6)
    assert inspect_packed(V3_FILE).ok


@pytest.mark.parametrize("version", [2, 3])
def test_older_versions_refuse_the_grid_flag(tiny_models, tmp_path, version):
    """A format 2/3 file has no grid flag: bit 3 there is refused, as those readers refused it."""
    _, mp = tiny_models["relu6"]
    save_packed(mp, tmp_path / "m.dfmpc")
    h, payload = split((tmp_path / "m.dfmpc").read_bytes())
    assert any(r.grid == "int" for r in h.layers)
    (tmp_path / "old.dfmpc").write_bytes(join(dataclasses.replace(h, version=version, input=None), payload))
    with pytest.raises(BadFileError, match="bad flags 0x0[a-f0-9]"):
        load_packed(tmp_path / "old.dfmpc", model=variant_net("relu6"))


def test_input_spec_is_recorded(tiny_models, tmp_path):
    net, mp = tiny_models["relu6"]
    spec = InputSpec((3, 16, 16), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), resize=18)
    with_input = dataclasses.replace(mp, input=spec)
    save_packed(with_input, tmp_path / "a.dfmpc")
    save_packed(mp, tmp_path / "b.dfmpc")
    a, b = (tmp_path / "a.dfmpc").stat().st_size, (tmp_path / "b.dfmpc").stat().st_size
    assert a == b + 56 == packed_nbytes(with_input) and b == packed_nbytes(mp)
    back = load_packed(tmp_path / "a.dfmpc", model=net)
    assert back.input == spec and back.info["format_version"] == 4  # float64 mean/std: bit-exact
    assert load_packed(tmp_path / "b.dfmpc", model=net).input is None
    assert "input: 3x16x16, mean 0.4914, 0.4822, 0.4465, std 0.2023, 0.1994, 0.201, resize 18" in \
        inspect_packed(tmp_path / "a.dfmpc").text


@pytest.mark.parametrize("field, value, msg", [("input_present", 2, "input block marker 2"),
                                               ("input_h", 0, "bad input block: input shape"),
                                               ("std1", 0, "bad input block: input normalisation")])
def test_bad_input_block_is_refused(tiny_models, tmp_path, field, value, msg):
    _, mp = tiny_models["relu"]
    spec = InputSpec((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    save_packed(dataclasses.replace(mp, input=spec), tmp_path / "m.dfmpc")
    data = (tmp_path / "m.dfmpc").read_bytes()
    _, off, size = next(s for s in field_spans(data) if s[0] == field)
    raw = struct.pack("<d", value) if size == 8 else value.to_bytes(size, "little")
    (tmp_path / "bad.dfmpc").write_bytes(resign(data[:off] + raw + data[off + size:]))
    with pytest.raises(BadFileError, match=msg):
        load_packed(tmp_path / "bad.dfmpc", model=variant_net("relu"))
