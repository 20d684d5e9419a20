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
than the file holds; the pure-Python unpickler keeps its memo in a dict (no index can make it allocate), and the
objects it returns are walked within a budget of one element per byte of the file, so shared references (a list
holding one list a thousand times, a thousand deep) cannot expand into gigabytes; labels must be a flat list of
integers before numpy sees them.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DfmpcError, one_line
from ..io.files import read_regular_file

__all__ = ["Refused", "RestrictedUnpickler", "restricted_loads", "read_cifar_batch", "MAX_BATCH_BYTES"]

MAX_BATCH_BYTES = 1 << 30  # the real test batches are ~31 MB; a bound keeps a hostile file from exhausting memory
_NUMERIC_KINDS = "biuf"


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


class Refused(pickle.UnpicklingError):
    """A record this reader refuses (a global, a dtype, a shape, a pickle bomb), as opposed to a malformed pickle."""


class _DType:
    """Stands in for ``numpy.dtype`` while unpickling; only a plain numeric dtype in one byte order is accepted."""

    def __init__(self, obj, align=False, copy=False):
        try:
            dt = np.dtype(_text(obj))
        except TypeError as err:
            raise Refused(f"bad numpy dtype {obj!r}") from err
        if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise Refused(f"numpy dtype {dt!s} is not a plain numeric dtype")
        self.dtype = dt

    def __setstate__(self, state) -> None:
        # (version, byteorder, subdescr, names, fields, elsize, alignment, flags): only the byte order matters for
        # a numeric dtype; structured parts would be a different (refused) dtype.
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise Refused("numpy dtype record is not a plain numeric dtype")
        order = _text(state[1])
        if order not in "<>|=" or len(order) != 1:
            raise Refused(f"bad numpy byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder("<" if order == "<" else ">")


class _NDArrayName:
    """What the name ``numpy.ndarray`` resolves to: only a marker for :func:`_reconstruct`."""


class _Array:
    """Stands in for an array built by ``_reconstruct`` + ``__setstate__``; ``array`` is set from raw bytes only."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise Refused("malformed numpy array record")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)):
            raise Refused("numpy array record holds objects, not raw numeric data")
        self.array = _from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _from_bytes(raw, dtype, shape, order: Literal["C", "F"]) -> np.ndarray:
    if not isinstance(dtype, _DType) or not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
        raise Refused("malformed numpy array record")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if min(shape, default=0) < 0 or n * dtype.dtype.itemsize != len(memoryview(raw).cast("B")):
        raise Refused(f"numpy array record: {len(raw)} bytes do not fill shape {shape}")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


def _reconstruct(subtype, shape, dtype) -> _Array:
    if subtype is not _NDArrayName:
        raise Refused(f"array subtype {subtype!r} is not numpy.ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise Refused("malformed numpy array record")
    return _from_bytes(bytes(buf), dtype, shape, "F" if _text(order) == "F" else "C")


def _scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise Refused("malformed numpy scalar record")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _latin1(text, encoding="latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode is only admitted for latin-1 strings")
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


class _Budget:
    """How many containers and elements :func:`_unwrap` may visit: at most one per byte of the pickle (plus a little).
    Every distinct object of a pickle costs at least one byte; a structure that visits more shares references (a
    list holding the same list a thousand times, a thousand deep), and expanding it would cost memory and time
    exponential in the file size."""

    def __init__(self, nbytes: int):
        self.left = nbytes + 4096

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise Refused("its objects expand to more elements than the file has bytes (shared "
                                         "references: a pickle bomb)")


def _unwrap(obj, budget: _Budget, depth: int = 0):
    """Replace the :class:`_Array` stand-ins by their arrays (in dicts and lists, a few levels deep)."""
    budget.spend(1)
    if isinstance(obj, _Array):
        if obj.array is None:
            raise Refused("numpy array record without data")
        return obj.array
    if depth < 4 and isinstance(obj, dict):
        budget.spend(len(obj))
        return {k: _unwrap(v, budget, depth + 1) for k, v in obj.items()}
    if depth < 4 and isinstance(obj, list):
        budget.spend(len(obj))
        return [_unwrap(v, budget, depth + 1) for v in obj]
    if isinstance(obj, _DType) or callable(obj):
        raise Refused("a bare numpy dtype or function where data was expected")
    return obj


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only the numpy globals of a plain numeric array (see the module docstring).

    It is the pure-Python unpickler: its memo is a dict, so a ``LONG_BINPUT`` index of 2^30 costs one entry (the C
    unpickler's memo is an array it would grow to that index and clear, gigabytes for four bytes of pickle).
    """

    def find_class(self, module: str, name: str):
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise Refused(f"it names the global '{module}.{name}', which a data file has no use "
                                         f"for (refused: unpickling it could run code)") from None


def restricted_loads(data: bytes):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as Python-2 CIFAR files need).

    Raises:
        Refused: a refused global, a malformed numpy record or a pickle bomb; any other exception means a
            malformed pickle (nothing outside the admitted set was imported or called).
    """
    return _unwrap(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load(), _Budget(len(data)))


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
    except Refused as err:
        raise DfmpcError(f"{hint}: {one_line(str(err), 200)}") from None
    except Exception as err:  # noqa: BLE001 - malformed pickles raise many types; no foreign code ran (find_class)
        msg = one_line(str(err), 160) if str(err) else type(err).__name__
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
    if isinstance(labels, (list, tuple)) and not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        bad = next(v for v in labels if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
        raise DfmpcError(f"{hint}: '{label_key}' must be {len(data)} integers (one per image); it holds a "
                         f"{type(bad).__name__}")
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DfmpcError(f"{hint}: '{label_key}' is a {type(labels).__name__}, not a list of integers")
    try:
        y = np.asarray(labels)
    except (ValueError, OverflowError) as err:
        raise DfmpcError(f"{hint}: '{label_key}' is not a list of integers ({one_line(str(err), 120)})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DfmpcError(f"{hint}: '{label_key}' must be {len(data)} integers (one per image), got "
                         f"{y.dtype} of shape {y.shape}")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DfmpcError(f"'{path}': label {int(y[bad[0]])} of image {int(bad[0])} is outside 0..{num_classes - 1} "
                         f"({len(bad)} such labels); the file is corrupt or of another dataset")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y.astype(np.int64)
