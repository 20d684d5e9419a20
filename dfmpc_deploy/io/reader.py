"""The bounded reader of ``.dfmpc`` files: open only regular files, read the header and check it before anything
else, read the payload exactly, and slice it into records (docs/FORMAT.md, section 4)."""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator

import torch

from ..errors import BadFileError, DfmpcError, one_line
from .files import check_not_sparse, file_kind
from .header import (
    DIGEST_BYTES,
    PREAMBLE_BYTES,
    SECTIONS,
    Header,
    LayerRecord,
    TensorRecord,
    parse_header,
    parse_preamble,
    printable,
)
from .plan import check_finite, check_layer_scales, check_variance, torch_dtype

__all__ = ["REPACK", "PackedFile", "walk", "bad_sections", "tensor_from_bytes", "layer_scales", "check_layer",
           "check_tensor"]

REPACK = "; the file is corrupt: re-pack the model"


# ---------------------------------------------------------------------------------------------------- reading

class PackedFile:
    """An open ``.dfmpc`` file whose header has been read and validated (context manager; closes the descriptor)."""

    def __init__(self, path: str | os.PathLike):
        self.source = printable(str(path), 200)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            self.fd = os.open(path, flags)
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise BadFileError(f"cannot read packed model '{self.source}': {reason}") from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadFileError(f"{self.source} is {file_kind(st.st_mode)}, not a regular file; give the path of "
                                   f"a .dfmpc file")
            self.stat, self.path = st, path
            self.size = st.st_size
            head = self._read(min(PREAMBLE_BYTES, self.size))
            n = parse_preamble(head, self.size, self.source)
            self.header: Header = parse_header(head + self._read(n + DIGEST_BYTES), self.size, self.source)
            self.offset = PREAMBLE_BYTES + n + DIGEST_BYTES
        except BaseException:
            os.close(self.fd)
            raise

    def _read(self, n: int) -> bytes:
        return bytes(self._read_into(bytearray(n)))

    def _read_into(self, buf: bytearray) -> bytearray:
        view, pos = memoryview(buf), 0
        while pos < len(buf):
            try:
                got = os.readv(self.fd, [view[pos:]])
            except OSError as err:
                raise BadFileError(f"cannot read packed model '{self.source}': {err.strerror or err}") from None
            if got == 0:
                raise BadFileError(f"{self.source}: truncated while being read ({pos} of {len(buf)} bytes)")
            pos += got
        return buf

    def read_payload(self) -> memoryview:
        """The three sections, read exactly (the header has already matched them to the file size). A sparse file
        is refused first: its declared sizes fit its length, but its holes would be allocated as zeros."""
        try:
            check_not_sparse(self.stat, "packed model", self.path)
        except DfmpcError as err:
            raise BadFileError(str(err)) from None
        buf = self._read_into(bytearray(self.size - self.offset))
        try:
            extra = os.read(self.fd, 1)
        except OSError as err:
            raise BadFileError(f"cannot read packed model '{self.source}': {err.strerror or err}") from None
        if extra:
            raise BadFileError(f"{self.source}: the file grew while being read; read it again when it is complete")
        return memoryview(buf)

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def walk(h: Header, payload: memoryview) -> Iterator[tuple[TensorRecord | LayerRecord, memoryview, memoryview,
                                                           memoryview | None]]:
    """Each record with its bytes: (record, tensor bytes or codes, scale bytes, in_scale bytes)."""
    t_len, s_len, _ = h.section_nbytes
    tpos, spos, cpos = 0, t_len, t_len + s_len
    for r in h.records:
        if isinstance(r, TensorRecord):
            yield r, payload[tpos:tpos + r.nbytes], payload[0:0], None
            tpos += r.nbytes
            continue
        sc = payload[spos:spos + 4 * r.scale_count]
        spos += 4 * r.scale_count
        ins = payload[spos:spos + 4 * r.in_scale_count] if r.in_scale else None
        spos += 4 * r.in_scale_count
        yield r, payload[cpos:cpos + r.nbytes], sc, ins
        cpos += r.nbytes


def bad_sections(h: Header, payload: memoryview) -> list[str]:
    sizes = h.section_nbytes
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    return [name for name, start, size, digest in zip(SECTIONS, starts, sizes, h.digests)
            if hashlib.sha256(payload[start:start + size]).digest() != digest]


def tensor_from_bytes(dtype: str, shape: tuple[int, ...], data: memoryview) -> torch.Tensor:
    """A new tensor (its own memory) of a file dtype name and shape from ``data`` (exactly its bytes)."""
    if not len(data):
        try:  # no element, but the other dimensions may still be too large to describe (strides overflow)
            return torch.empty(shape, dtype=torch_dtype(dtype))
        except RuntimeError as err:
            raise BadFileError(f"an empty tensor of shape {list(shape)} cannot be represented "
                               f"({one_line(str(err), 80)}){REPACK}") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(torch_dtype(dtype)).reshape(shape)


def layer_scales(r: LayerRecord, sc: memoryview, ins: memoryview | None,
                 expand: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's scale (and in_scale) as stored, or with ``expand`` one per channel (only once the shape has been
    checked against the architecture: a scale stored once could otherwise claim any number of channels)."""
    scale = tensor_from_bytes("F32", (r.scale_count,), sc)
    in_scale = None if ins is None else tensor_from_bytes("F32", (r.in_scale_count,), ins)
    if not expand:
        return scale, in_scale
    return scale.expand(r.shape[0]).clone(), None if in_scale is None else in_scale.expand(r.shape[1]).clone()


def check_layer(r: LayerRecord, scale: torch.Tensor, in_scale: torch.Tensor | None,
                codes_all_zero: Callable[[], bool], where: str) -> None:
    """BadFileError if the layer's scales are not finite, would overflow a weight, or are all 0 on non-zero codes."""
    check_layer_scales(r.bits, scale, in_scale, codes_all_zero, f"{where}layer '{printable(r.fqn)}'", BadFileError)


def check_tensor(r: TensorRecord, t: torch.Tensor, where: str) -> None:
    """BadFileError if a stored tensor is not finite or is a negative BatchNorm variance."""
    check_finite(t, f"{where}'{printable(r.name)}'", BadFileError)
    check_variance(r.name, t, f"{where}'{printable(r.name)}'", BadFileError)
