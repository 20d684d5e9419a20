"""Structured fuzzer of the .dfmpc reader: mutates header fields, records, payload values and raw bytes of valid
files of tiny models, then loads and inspects each mutant.

    python -m tests.hostile.fuzz_packed [--cases 5000] [--seed 0] [--memory-mib 256]

Every case must either raise a DfmpcError (BadFileError) or load a model that is finite (every float tensor finite,
no BatchNorm variance negative) and runs; ``inspect_packed``
must raise, or return text whose every line is printable, and may call a file ok only if ``load_packed`` accepts it
(or refuses it only for not fitting the skeleton, which inspect does not see). Anything else is a crash; a case over
2 s is a hang. The process runs under RLIMIT_AS = its baseline + ``--memory-mib``. Prints one JSON summary line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from dfmpc_deploy.core.config import InputSpec
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.io.container import inspect_packed, load_packed, save_packed
from dfmpc_deploy.io.header import DTYPES, LayerRecord, TensorRecord
from dfmpc_deploy.io.layouts import CodeLayout
from dfmpc_deploy.passes.recipes import compensate
from tests.io.helpers import (
    OddNet,
    bell_net,
    field_spans,
    join,
    poke,
    quick_config,
    resign,
    sections,
    split,
    variant_inputs,
    variant_net,
)

INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 31, 63, 64, 127, 128, 242, 243, 255, 256, 1 << 15, 0xFFFF,
               1 << 16, 1 << 28, 1 << 31, 0xFFFFFFFF, 1 << 32, 1 << 62, (1 << 64) - 1]
ESCAPES = ["\x1b[31m", "\n", "\r", "\x00", "\u202e", "\x07", "\\", "é", "\ud7ff"]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e38, 1e-45, 3.0]


@dataclasses.dataclass
class Base:
    name: str
    make_net: object
    data: bytes
    spans: list
    x: torch.Tensor
    parts: tuple = ()  # (header, payload)


def make_bases(tmp: Path) -> list[Base]:
    specs = [("relu6-base3", lambda: variant_net("relu6"), {}),
             ("nobn-2bit", lambda: variant_net("nobn"), {"ternary_layout": "ternary-2bit"}),
             ("bell-deflate", bell_net, {"compress": True}),
             ("odd-dtypes", lambda: OddNet().eval(), {})]
    bases = []
    for name, make, kw in specs:
        mp = compensate(make(), (3, 16, 16), **quick_config(), arch=name)
        if name == "relu6-base3":  # one base records its input (format 3's input block is fuzzed too)
            mp.input = InputSpec((3, 16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize=18)
        save_packed(mp, tmp / f"{name}.dfmpc", **kw)
        data = (tmp / f"{name}.dfmpc").read_bytes()
        bases.append(Base(name, make(), data, field_spans(data), variant_inputs(2), split(data)))
    return bases


# ------------------------------------------------------------------------------------------------ mutators

def _value(rng: random.Random, old: int, size: int) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(INTERESTING)
    if r < 0.8:
        return old + rng.choice([-2, -1, 1, 2])
    return rng.getrandbits(8 * size)


def m_field(rng, base, bases):
    """One header field set to an interesting value, re-signed (mostly)."""
    name, off, size = rng.choice(base.spans)
    if size <= 8:
        old = int.from_bytes(base.data[off:off + size], "little")
        out = poke(base.data, off, size, _value(rng, old, size))
    else:  # names, digests, strings: one byte
        i = off + rng.randrange(size)
        out = poke(base.data, i, 1, rng.choice([0, 0x0A, 0x1B, 0x2E, 0x7F, 0x80, 0xC3, 0xFF, rng.getrandbits(8)]))
    return f"field:{name.split('.')[-1]}", resign(out) if rng.random() < 0.85 else out


def _fit_payload(rng, h, payload: bytes) -> bytes:
    """Payload cut or padded to the sizes the (mutated) header declares, so the checks past the size run."""
    need = sum(h.section_nbytes)
    if need > 1 << 24:
        return payload
    if len(payload) >= need:
        return payload[:need]
    pad = bytes(need - len(payload)) if rng.random() < 0.5 else rng.randbytes(need - len(payload))
    return payload + pad


def _record_change(rng, r, n_records: int, names: list[str]):
    if isinstance(r, TensorRecord):
        what = rng.choice(["dtype", "shape", "name"])
        if what == "dtype":
            return what, dataclasses.replace(r, dtype=rng.choice([d for d, _ in DTYPES.values()]))
    else:
        what = rng.choice(["shape", "name", "bits", "layout", "role", "kind", "partner", "in_scale", "scale_once",
                           "in_scale_once", "nbytes"])
        if what == "bits":
            return what, dataclasses.replace(r, bits=rng.randint(2, 8))
        if what == "layout":
            return what, dataclasses.replace(r, layout=rng.choice(list(CodeLayout)))
        if what == "role":
            return what, dataclasses.replace(r, role=rng.choice(["low", "high", "high-compensating"]))
        if what == "kind":
            return what, dataclasses.replace(r, kind=rng.choice(["conv", "linear"]))
        if what == "partner":
            return what, dataclasses.replace(r, partner=rng.choice([None, rng.randrange(n_records)]))
        if what in ("in_scale", "scale_once", "in_scale_once"):
            return what, dataclasses.replace(r, **{what: not getattr(r, what)})
        if what == "nbytes":
            return what, dataclasses.replace(r, nbytes=max(0, min(0xFFFFFFFF, _value(rng, r.nbytes, 4))))
    if what == "shape":
        shape = list(r.shape)
        op = rng.choice(["dim", "add", "drop", "swap"])
        if op == "dim" and shape:
            i = rng.randrange(len(shape))
            shape[i] = max(0, min(0xFFFFFFFF, _value(rng, shape[i], 4)))
        elif op == "add":
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 3]))
        elif op == "drop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif len(shape) > 1:
            shape.reverse()
        return what, dataclasses.replace(r, shape=tuple(shape))
    name = rng.choice([rng.choice(names), r.name + rng.choice(ESCAPES), rng.choice(ESCAPES) + r.name,
                       r.name.replace(".", rng.choice(ESCAPES), 1), "x" * rng.choice([1, 250, 255])])
    return "name", dataclasses.replace(r, name=name)


def m_record(rng, base, bases):
    """One record's field changed through the header model (re-encoded, digests fixed), payload fitted."""
    h, payload = base.parts
    recs = list(h.records)
    i = rng.randrange(len(recs))
    what, recs[i] = _record_change(rng, recs[i], len(recs), [r.name for r in recs])
    if isinstance(recs[i], LayerRecord) and rng.random() < 0.5 and recs[i].layout not in (
            CodeLayout.KBIT_DEFLATE, CodeLayout.TERNARY_DEFLATE):
        from dfmpc_deploy.io.layouts import layout_nbytes
        try:
            recs[i] = dataclasses.replace(recs[i], nbytes=layout_nbytes(recs[i].layout, recs[i].bits, recs[i].numel))
        except (ValueError, OverflowError):
            pass
    h = dataclasses.replace(h, records=tuple(recs))
    if rng.random() < 0.7:
        payload = _fit_payload(rng, h, payload)
    return f"record:{what}", join(h, payload)


def m_records(rng, base, bases):
    """Records dropped, duplicated, swapped or reversed."""
    h, payload = base.parts
    recs = list(h.records)
    op = rng.choice(["drop", "dup", "swap", "reverse"])
    i, j = rng.randrange(len(recs)), rng.randrange(len(recs))
    if op == "drop":
        recs.pop(i)
    elif op == "dup":
        recs.insert(j, recs[i])
    elif op == "swap":
        recs[i], recs[j] = recs[j], recs[i]
    else:
        recs.reverse()
    h = dataclasses.replace(h, records=tuple(recs))
    return f"records:{op}", join(h, _fit_payload(rng, h, payload) if rng.random() < 0.7 else payload)


def m_payload(rng, base, bases):
    """Values inside one section (floats to NaN/Inf/0, code bytes to invalid values, random bytes), digests fixed."""
    h, payload = base.parts
    parts = [bytearray(p) for p in sections(h, payload)]
    k = rng.choice([k for k in range(3) if parts[k]])
    buf = parts[k]
    for _ in range(rng.choice([1, 1, 1, 2, 8])):
        if k < 2 and len(buf) >= 4 and rng.random() < 0.6:
            i = rng.randrange(len(buf) // 4) * 4
            buf[i:i + 4] = struct.pack("<f", rng.choice(FLOATS))
        else:
            i = rng.choice([rng.randrange(len(buf)), len(buf) - 1])
            buf[i] = rng.choice([0, 1, 3, 121, 242, 243, 255, buf[i] ^ (1 << rng.randrange(8))])
    return f"payload:{['tensors', 'scales', 'codes'][k]}", join(h, b"".join(bytes(p) for p in parts),
                                                                fix_digests=rng.random() < 0.9)


def m_bytes(rng, base, bases):
    """Raw byte damage anywhere: truncation, bit flips, insertion, deletion, appended bytes."""
    d = bytearray(base.data)
    op = rng.choice(["truncate", "flip", "insert", "delete", "append"])
    pos = rng.randrange(len(d))
    if op == "truncate":
        d = d[:pos]
    elif op == "flip":
        for p in [pos] + [rng.randrange(len(d)) for _ in range(rng.randrange(4))]:
            d[p] ^= 1 << rng.randrange(8)
    elif op == "insert":
        d[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif op == "delete":
        del d[pos:pos + rng.randint(1, 64)]
    else:
        d += rng.randbytes(rng.randint(1, 32))
    return f"bytes:{op}", resign(bytes(d)) if rng.random() < 0.5 else bytes(d)


def m_splice(rng, base, bases):
    """The header of one file on the payload of another, or strings replaced (arch, estimator)."""
    h, payload = base.parts
    if rng.random() < 0.5:
        other = rng.choice(bases)
        return "splice", join(h, other.parts[1])
    s = "".join(rng.choice(ESCAPES + ["resnet18", "a", " "]) for _ in range(rng.randint(1, 12)))
    field = rng.choice(["arch", "estimator"])
    try:
        return f"string:{field}", join(dataclasses.replace(h, **{field: s}), payload)
    except ValueError:
        return "string:invalid", base.data


MUTATORS = [(m_field, 4), (m_record, 4), (m_records, 1), (m_payload, 3), (m_bytes, 2), (m_splice, 1)]


# ------------------------------------------------------------------------------------------------ one case

def run_case(path: Path, base: Base) -> str:
    """'loaded' or 'refused'; raises AssertionError (or anything) on a violated guarantee."""
    loaded, fit_only = False, False
    try:
        mp = load_packed(path, model=base.make_net)
    except DfmpcError as err:
        msg = str(err)
        assert "\n" not in msg and msg.isprintable(), f"error line not printable: {msg!r}"
        fit_only = "does not fit" in msg
    else:
        loaded = True
        for k, t in mp.module.state_dict().items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), f"non-finite '{k}' loaded"
            assert not k.endswith("running_var") or bool((t >= 0).all()), f"negative variance in '{k}' loaded"
        with torch.no_grad():  # runs (outputs may still overflow: finite weights do not bound activations)
            mp.module(base.x)
    try:
        res = inspect_packed(path)
    except DfmpcError as err:
        assert not loaded, f"inspect refused a file that loads: {err}"
    else:
        assert all(line.isprintable() for line in res.text.splitlines()), "inspect printed a non-printable line"
        assert res.ok == (not res.problems)
        if loaded:
            assert res.ok, f"inspect flags a file that loads: {res.problems[:1]}"
        elif not fit_only:
            assert not res.ok, "inspect calls ok a file that load refuses"
    return "loaded" if loaded else "refused"


def _vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-mib", type=int, default=256, help="RLIMIT_AS above the baseline (0: no limit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bases = make_bases(tmp)
        path = tmp / "case.dfmpc"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # rewritten in place: creating a file per case is slow

        def write(data: bytes) -> None:  # (truncating to 0 first makes ext4 flush the file: ~3 ms a case)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))

        for b in bases:  # warm-up: every lazy import and allocator arena before the limit
            write(b.data)
            run_case(path, b)
        if args.memory_mib:
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (args.memory_mib << 20), hard))
        funcs, weights = zip(*MUTATORS)
        outcomes, kinds, crashes, slow = Counter(), Counter(), [], []
        for i in range(args.cases):
            base = rng.choice(bases)
            label, data = rng.choices(funcs, weights)[0](rng, base, bases)
            write(data)
            t = time.perf_counter()
            try:
                outcomes[run_case(path, base)] += 1
            except BaseException as err:  # noqa: BLE001 - every escape is a finding
                if isinstance(err, KeyboardInterrupt):
                    raise
                crashes.append({"case": i, "base": base.name, "mutation": label,
                                "error": f"{type(err).__name__}: {err}"[:300],
                                "where": traceback.format_exc(limit=-2)[-600:]})
            if time.perf_counter() - t > 2:
                slow.append({"case": i, "mutation": label, "seconds": round(time.perf_counter() - t, 2)})
            kinds[label.split(":")[0]] += 1
        os.close(fd)
    print(json.dumps({"cases": args.cases, "seed": args.seed, "outcomes": outcomes, "mutations": kinds,
                      "crashes": crashes[:20], "n_crashes": len(crashes), "slow": slow[:20],
                      "seconds": round(time.perf_counter() - t0, 2), "pid": os.getpid()}))
    return 1 if crashes or slow else 0


if __name__ == "__main__":
    sys.exit(main())
