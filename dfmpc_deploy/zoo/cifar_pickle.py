"""Read the CIFAR-10/100 "python version" batch files without letting them run code.

The format (cs.toronto.edu/~kriz/cifar.html) is a pickle of a dict: ``data`` a numpy uint8 array (N, 3072) of CHW
planes, ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100) a list of N ints, plus ``batch_label``/``filenames``
strings. The original files were written by Python 2 (``bytes`` keys once read with ``encoding="bytes"``); re-pickled
copies from Python 3 use ``str`` keys and newer numpy reduce functions. A pickle can name *any* global, which is how a
malicious batch file runs ``os.system``; :class:`RestrictedUnpickler` resolves only the few numpy globals an array
pickle needs, each wrapped so it builds nothing but a plain numeric array:

* ``numpy.ndarray`` and ``numpy[._]core.multiarray._reconstruct`` (protocols 0-4) - only for ``ndarray`` itself;
* ``numpy[._]core.numeric._frombuffer`` (protocol 5);
* ``numpy.dtype`` - only bool/int/uint/float dtypes (an object dtype would unpickle arbitrary elements);
* ``numpy[._]core.multiarray.scalar`` (numpy integer scalars in a label list) - numeric dtypes only;
* ``_codecs.encode`` (how protocol 2 stores ``bytes`` from Python 3) - only to latin-1.

None of them reaches numpy's own reduce functions or ``__setstate__``: each resolves to a stand-in of this module
that validates the record and builds the array with ``np.frombuffer`` from raw bytes, so no state a pickle supplies
(dtype flags, object elements) gets into numpy. Every other global is refused before it is imported. The file is
read whole into memory first (size-capped), so a length field in the pickle cannot make the reader allocate more
than the file holds.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DfmpcError
from .images import read_regular_file

__all__ = ["RestrictedUnpickler", "restricted_loads", "read_cifar_batch", "MAX_BATCH_BYTES"]

MAX_BATCH_BYTES = 1 << 30  # the real test batches are ~31 MB; a bound keeps a hostile file from exhausting memory
_NUMERIC_KINDS = "biuf"


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


class _DType:
    """Stands in for ``numpy.dtype`` while unpickling; only a plain numeric dtype in one byte order is accepted."""

    def __init__(self, obj, align=False, copy=False):
        try:
            dt = np.dtype(_text(obj))
        except TypeError as err:
            raise pickle.UnpicklingError(f"bad numpy dtype {obj!r}") from err
        if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise pickle.UnpicklingError(f"numpy dtype {dt!s} is not a plain numeric dtype")
        self.dtype = dt

    def __setstate__(self, state) -> None:
        # (version, byteorder, subdescr, names, fields, elsize, alignment, flags): only the byte order matters for
        # a numeric dtype; structured parts would be a different (refused) dtype.
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("numpy dtype record is not a plain numeric dtype")
        order = _text(state[1])
        if order not in "<>|=" or len(order) != 1:
            raise pickle.UnpicklingError(f"bad numpy byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder("<" if order == "<" else ">")


class _NDArrayName:
    """What the name ``numpy.ndarray`` resolves to: only a marker for :func:`_reconstruct`."""


class _Array:
    """Stands in for an array built by ``_reconstruct`` + ``__setstate__``; ``array`` is set from raw bytes only."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array record")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy array record holds objects, not raw numeric data")
        self.array = _from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _from_bytes(raw, dtype, shape, order: Literal["C", "F"]) -> np.ndarray:
    if not isinstance(dtype, _DType) or not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
        raise pickle.UnpicklingError("malformed numpy array record")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if min(shape, default=0) < 0 or n * dtype.dtype.itemsize != len(memoryview(raw).cast("B")):
        raise pickle.UnpicklingError(f"numpy array record: {len(raw)} bytes do not fill shape {shape}")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


def _reconstruct(subtype, shape, dtype) -> _Array:
    if subtype is not _NDArrayName:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("malformed numpy array record")
    return _from_bytes(bytes(buf), dtype, shape, "F" if _text(order) == "F" else "C")


def _scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar record")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _latin1(text, encoding="latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only admitted for latin-1 strings")
    return text.encode("latin1")


_ADMITTED = {
    ("numpy", "ndarray"): _NDArrayName,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _latin1,
}


def _unwrap(obj, depth: int = 0):
    """Replace the :class:`_Array` stand-ins by their arrays (in dicts and lists, a few levels deep)."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("numpy array record without data")
        return obj.array
    if depth < 4 and isinstance(obj, dict):
        return {k: _unwrap(v, depth + 1) for k, v in obj.items()}
    if depth < 4 and isinstance(obj, list):
        return [_unwrap(v, depth + 1) for v in obj]
    if isinstance(obj, _DType) or callable(obj):
        raise pickle.UnpicklingError("a bare numpy dtype or function where data was expected")
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals of a plain numeric array (see the module docstring)."""

    def find_class(self, module: str, name: str):
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names the global '{module}.{name}', which a data file has no use "
                                         f"for (refused: unpickling it could run code)") from None


def restricted_loads(data: bytes):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as Python-2 CIFAR files need).

    Raises:
        pickle.UnpicklingError: a refused global or a malformed numpy record; any other exception means a
            malformed pickle (nothing outside the admitted set was imported or called).
    """
    return _unwrap(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())


def _field(d: dict, key: str):
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CIFAR batch file.

    Args:
        path: the ``test_batch`` (CIFAR-10) or ``test`` (CIFAR-100) file.
        label_key: ``"labels"`` or ``"fine_labels"``.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        ``(images, labels)``: uint8 (N, 32, 32, 3) HWC and int64 (N,).

    Raises:
        DfmpcError: not a regular file, too large, not a pickle, a pickle that names a refused global, or a dict
            without the expected keys, shapes, dtypes or label range; one line naming the file and the problem.
    """
    raw = read_regular_file(path, MAX_BATCH_BYTES, what="CIFAR batch file")
    hint = f"'{path}' is not a CIFAR python-version batch file"
    try:
        d = restricted_loads(raw)
    except pickle.UnpicklingError as err:
        raise DfmpcError(f"{hint}: {err}") from None
    except Exception as err:  # noqa: BLE001 - malformed pickles raise many types; no foreign code ran (find_class)
        msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DfmpcError(f"{hint} (unreadable pickle: {msg})") from None
    if not isinstance(d, dict):
        raise DfmpcError(f"{hint}: it holds a {type(d).__name__}, not a dict")
    data, labels = _field(d, "data"), _field(d, label_key)
    if data is None or labels is None:
        keys = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))[:160]
        raise DfmpcError(f"{hint}: it has no '{'data' if data is None else label_key}' entry (keys: {keys})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DfmpcError(f"{hint}: 'data' is a {what}, expected a uint8 array of shape (N, 3072)")
    try:
        y = np.asarray(labels)
    except ValueError as err:
        raise DfmpcError(f"{hint}: '{label_key}' is not a list of integers ({err})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DfmpcError(f"{hint}: '{label_key}' must be {len(data)} integers (one per image), got "
                         f"{y.dtype} of shape {y.shape}")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DfmpcError(f"'{path}': label {int(y[bad[0]])} of image {int(bad[0])} is outside 0..{num_classes - 1} "
                         f"({len(bad)} such labels); the file is corrupt or of another dataset")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y.astype(np.int64)
