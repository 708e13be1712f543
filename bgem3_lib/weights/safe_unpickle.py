"""Read ``torch.save`` checkpoints into NumPy without importing torch and without running code.

A ``torch.save`` file is a pickle whose tensors are calls to ``torch._utils._rebuild_tensor_v2``
on storages referenced by persistent id ``('storage', <storage class>, key, location, numel)``.
The bytes of storage ``key`` live in the zip member ``<archive>/data/<key>`` (current format) or
after the pickle (legacy format). Unpickling an arbitrary pickle can call any importable function,
so :class:`RestrictedUnpickler` resolves only an allow-list of globals (tensor rebuild calls,
storage classes, ``collections.OrderedDict`` and plain containers) and refuses everything else
*before* it can run, raising :class:`UnsafeCheckpointError`.

Every way a file can fail to load is one error family: :class:`CheckpointError` (a ``ValueError``)
for a truncated, corrupt or unsupported file, and its subclass :class:`UnsafeCheckpointError` for a
pickle that would run code; a missing path is ``FileNotFoundError``. Untrusted sizes are checked
before anything is allocated: a pickle's length fields, frames and memo indices must fit the bytes
that are really there, nesting is bounded (:data:`MAX_NESTING`; deeply nested tuples would crash
the interpreter while being hashed), zip members may not claim more bytes than the archive holds,
and copies made for strided / shared tensor views are bounded by the storage bytes actually read.

Tensors come back as C-contiguous NumPy arrays that own (or solely use) their memory; an uncompressed
zip member is mapped from the file copy-on-write (:mod:`bgem3_lib.weights.mapped`), so its pages are read
only when used:
fp32/fp16/fp64/int*/uint8/bool keep their dtype, bf16 is widened to float32 (exact, by shifting
the 16 stored bits into the high half of a float32).

Example::

    >>> obj = load_torch_checkpoint("colbert_linear.pt")      # doctest: +SKIP
    >>> obj["weight"].shape, obj["weight"].dtype               # doctest: +SKIP
    ((1024, 1024), dtype('float16'))
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import tqdm
from .mapped import map_array
from .pickle_checks import MAX_NESTING, CheckpointError, UnsafeCheckpointError, _brief, check_pickle, check_tree

__all__ = ["CheckpointError", "UnsafeCheckpointError", "RestrictedUnpickler", "load_torch_checkpoint",
           "bfloat16_bits_to_float32", "MAX_NESTING"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_COPY_BASE = 2**26         # bytes that tensor-view copies may use on top of 4x the storage bytes read
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this

# torch storage class name -> (NumPy dtype of the stored elements, is bfloat16)
_STORAGE_DTYPES = {
    "FloatStorage": ("f4", False), "HalfStorage": ("f2", False), "BFloat16Storage": ("u2", True),
    "DoubleStorage": ("f8", False), "LongStorage": ("i8", False), "IntStorage": ("i4", False),
    "ShortStorage": ("i2", False), "CharStorage": ("i1", False), "ByteStorage": ("u1", False),
    "BoolStorage": ("?", False),
}
_CONTAINERS = {("collections", "OrderedDict"): OrderedDict, ("builtins", "dict"): dict,
               ("builtins", "list"): list, ("builtins", "tuple"): tuple}
_REBUILDERS = {"_rebuild_tensor_v2": "_rebuild_tensor", "_rebuild_parameter": "_rebuild_parameter",
               "_rebuild_parameter_with_state": "_rebuild_parameter"}


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns (any shape) -> float32 of the same shape, exactly.

    >>> bfloat16_bits_to_float32(np.array([0x3F80, 0xC000], dtype=np.uint16))
    array([ 1., -2.], dtype=float32)
    """
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True, slots=True)      # no __dict__ and no __setstate__: BUILD cannot rewrite it
class _StorageType:
    name: str
    dtype: np.dtype
    is_bf16: bool

    def __setstate__(self, state):         # replaces the field-by-field one dataclass adds for slots
        raise pickle.UnpicklingError("a storage type cannot be given pickled state")


class _Storage:
    """One storage's elements as a flat array (``None`` while only the pickle structure is read)."""

    __slots__ = ("array", "stype", "handed_out")

    def __init__(self, array: np.ndarray | None, stype: _StorageType):
        self.array, self.stype, self.handed_out = array, stype, False

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage cannot be given pickled state")


class _Rebuilder:
    """A tensor-rebuild callable handed to the pickle; immutable, so BUILD cannot attach state to it."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name, value):
        raise AttributeError("a rebuild function cannot be modified")

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def _c_contiguous(size: tuple, stride: tuple) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in x):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {_brief.repr(x)}")
    return tuple(x)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild globals and containers.

    ``storage_reader(key, stype, numel) -> np.ndarray | None`` supplies storage elements (flat,
    dtype ``stype.dtype``); ``None`` builds placeholders (tensors then load as ``None``).
    :meth:`load` first checks the pickle's opcodes (:func:`_check_pickle`) and afterwards the
    result's shape (:func:`_check_tree`); copies made for tensor views may total 64 MiB plus four
    times the storage bytes read.
    """

    def __init__(self, file, source: str, storage_reader=None, byteorder: str = "<"):
        if not (hasattr(file, "seekable") and file.seekable()):
            file = io.BytesIO(file.read())
        super().__init__(file)
        self.file, self.source, self.storage_reader, self.byteorder = file, source, storage_reader, byteorder
        self.storages: dict[str, _Storage] = {}
        self.copy_budget = _COPY_BASE

    def load(self):
        start = self.file.tell()
        end = self.file.seek(0, io.SEEK_END)
        self.file.seek(start)
        check_pickle(self.file, end, self.source)
        self.file.seek(start)
        obj = super().load()
        check_tree(obj)
        return obj

    def find_class(self, module: str, name: str):
        # protocol < 3 pickles written by Python 3 spell some globals the Python 2 way
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _CONTAINERS:
            return _CONTAINERS[(module, name)]
        if module == "torch._utils" and name in _REBUILDERS:
            return _Rebuilder(getattr(self, _REBUILDERS[name]))
        if module == "torch" and name in _STORAGE_DTYPES:
            code, is_bf16 = _STORAGE_DTYPES[name]
            return _StorageType(name, np.dtype(self.byteorder + code), is_bf16)
        raise UnsafeCheckpointError(
            f"refused global {module}.{name} in {self.source}: only tensor rebuild calls, torch storage "
            "classes and plain containers are allowed (the file may try to run code, or uses an "
            "unsupported torch feature)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id {_brief.repr(pid)}")
        stype, key, numel = pid[1], pid[2], pid[4]
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) \
                or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference {_brief.repr(pid)}")
        if key not in self.storages:
            array = None if self.storage_reader is None else self.storage_reader(key, stype, numel)
            if array is not None:
                self.copy_budget += 4 * array.nbytes
            self.storages[key] = _Storage(array, stype)
        storage = self.storages[key]
        if storage.stype != stype:
            raise pickle.UnpicklingError(
                f"storage {key} is referenced as {storage.stype.name} and {stype.name}")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise pickle.UnpicklingError(f"malformed storage view {_brief.repr(view)}")
        view_key, offset, view_numel = view           # legacy format: a slice of a root storage
        if view_key not in self.storages:
            sub = None if storage.array is None else storage.array[offset:offset + view_numel]
            if sub is not None and len(sub) != view_numel:
                raise pickle.UnpicklingError(f"storage view {view_key} exceeds storage {key}")
            self.storages[view_key] = _Storage(sub, stype)
        return self.storages[view_key]

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        """torch._utils._rebuild_tensor_v2: a strided view on a storage -> np.ndarray [*size]."""
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
        if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
            raise pickle.UnpicklingError(f"bad tensor geometry: offset={_brief.repr(offset)} "
                                         f"size={_brief.repr(size)} stride={_brief.repr(stride)}")
        if storage.array is None:
            return None
        flat, stype = storage.array, storage.stype
        count = math.prod(size)
        if count == 0:
            out = np.zeros(size, dtype=flat.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= len(flat):
                raise pickle.UnpicklingError(
                    f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds its storage "
                    f"of {len(flat)} elements")
            whole = offset == 0 and count == len(flat) and _c_contiguous(size, stride)
            if whole and not storage.handed_out:       # common case: reuse the storage, no copy
                storage.handed_out = True
                out = flat.reshape(size)
            else:                                      # view / shared storage: an independent copy
                self.copy_budget -= count * flat.dtype.itemsize
                if self.copy_budget < 0:
                    raise pickle.UnpicklingError(
                        f"tensor views (offset {offset}, size {_brief.repr(size)}, stride {_brief.repr(stride)}) "
                        "would copy far more bytes than the checkpoint's storages hold")
                step = flat.dtype.itemsize
                view = np.lib.stride_tricks.as_strided(
                    flat[offset:], shape=size, strides=[s * step for s in stride], writeable=False)
                out = np.array(view, order="C")
        if stype.is_bf16:
            out = bfloat16_bits_to_float32(out)
        elif not out.dtype.isnative:
            out = out.astype(out.dtype.newbyteorder("="))
        return out

    @staticmethod
    def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
        """torch._utils._rebuild_parameter(_with_state): a Parameter is just its data here."""
        if data is not None and not isinstance(data, np.ndarray):
            raise pickle.UnpicklingError(f"parameter wraps a {type(data).__name__}, not a tensor")
        return data


def _read_member(zf: zipfile.ZipFile, name: str, archive_size: int) -> bytearray:
    """A member's bytes; its recorded sizes are checked against the archive before allocating."""
    info = zf.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{zf.filename}: member {name} uses zip compression method {info.compress_type}; "
                              "torch checkpoints are stored uncompressed (or deflated)")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
    if info.compress_size > archive_size - info.header_offset or info.file_size > ratio * info.compress_size + 64:
        raise zipfile.BadZipFile(f"member {name} claims more bytes than the archive holds")
    buf = bytearray(info.file_size)
    with zf.open(info) as f:
        if f.readinto(buf) != info.file_size:
            raise zipfile.BadZipFile(f"member {name} is shorter than recorded")
    return buf


def _map_member(zf: zipfile.ZipFile, name: str, archive_size: int, stype: _StorageType, numel: int):
    """An uncompressed member's first ``numel`` elements mapped from the file (:mod:`.mapped`: pages are read
    only when used), or None when it cannot be (compressed, misaligned, big-endian or too small)."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or not stype.dtype.isnative or numel == 0:
        return None
    if info.file_size > archive_size - info.header_offset or info.file_size < numel * stype.dtype.itemsize:
        return None                                   # _read_member raises the precise error
    zf.fp.seek(info.header_offset)
    header = zf.fp.read(30)                           # the local file header: name and extra lengths at 26, 28
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"member {name} has no local file header")
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    if start % stype.dtype.itemsize:
        return None
    try:
        return map_array(zf.filename, start, stype.dtype, (numel,))
    except ValueError as exc:
        raise zipfile.BadZipFile(str(exc)) from exc


def _load_zip(path: Path):
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(
                f"{path} is a zip archive but not a torch.save checkpoint (no <archive>/data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        order = "<"
        if prefix + "byteorder" in names:
            order = ">" if _read_member(zf, prefix + "byteorder", size).strip() == b"big" else "<"

        total = sum(min(i.file_size, size) for i in zf.infolist() if i.filename.startswith(prefix + "data/"))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {path.name}",
                   disable=total < 2**28)               # a bar only for large checkpoints

        def reader(key: str, stype: _StorageType, numel: int) -> np.ndarray:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise pickle.UnpicklingError(f"storage record {member} is missing")
            mapped = _map_member(zf, member, size, stype, numel)
            if mapped is not None:
                bar.update(mapped.nbytes)
                return mapped
            buf = _read_member(zf, member, size)
            bar.update(len(buf))
            if len(buf) < numel * stype.dtype.itemsize:
                raise pickle.UnpicklingError(f"storage record {member} holds {len(buf)} bytes, "
                                             f"expected {numel} x {stype.dtype.itemsize}")
            return np.frombuffer(buf, dtype=stype.dtype, count=numel)

        data_pkl = io.BytesIO(_read_member(zf, pkls[0], size))
        with bar:
            return RestrictedUnpickler(data_pkl, str(path), reader, order).load()


def _load_legacy(path: Path):
    """Legacy (pre-1.6, ``_use_new_zipfile_serialization=False``) format: header pickles, the
    object pickle, the list of storage keys, then per key an int64 element count and raw bytes.
    The object pickle is read twice: once to learn storage types, once with the data in place."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = RestrictedUnpickler(f, str(path))
        if first.load() != LEGACY_MAGIC or first.load() != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path} is not a torch checkpoint (bad magic number or protocol version)")
        sys_info = first.load()
        order = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
        start = f.tell()
        probe = RestrictedUnpickler(f, str(path), None, order)
        probe.load()
        keys = RestrictedUnpickler(f, str(path)).load()
        arrays = {}
        for key in keys:
            stype = probe.storages[key].stype
            (numel,) = struct.unpack(order + "q", f.read(8))
            if not 0 <= numel * stype.dtype.itemsize <= size - f.tell():
                raise EOFError(f"storage {key} claims {numel} elements, more than the file holds")
            raw = bytearray(f.read(numel * stype.dtype.itemsize))
            if len(raw) != numel * stype.dtype.itemsize:
                raise EOFError(f"storage {key} is cut short")
            arrays[key] = np.frombuffer(raw, dtype=stype.dtype)
        f.seek(start)

        def reader(key, stype, numel):
            if key not in arrays or len(arrays[key]) < numel:
                raise pickle.UnpicklingError(f"storage {key} is missing or too short")
            return arrays[key]

        return RestrictedUnpickler(f, str(path), reader, order).load()


def load_torch_checkpoint(path: str | Path):
    """Unpickle a ``torch.save`` file safely; tensors become NumPy arrays, containers stay as saved.

    Raises FileNotFoundError (missing path), and for any problem with the file's contents a
    :class:`CheckpointError` (a ``ValueError``): :class:`UnsafeCheckpointError` for a disallowed
    global (refused before it runs), otherwise "truncated or corrupt" / unsupported format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        if head == b"PK\x03\x04":
            raise zipfile.BadZipFile("no end-of-archive record")
        if tarfile.is_tarfile(path):
            raise CheckpointError(f"{path} uses torch's pre-1.0 tar checkpoint format, which is unsupported; "
                                  "re-save it with a current torch.save")
        return _load_legacy(path)
    except CheckpointError:
        raise
    # RuntimeError covers RecursionError and zipfile's NotImplementedError / encrypted-member errors;
    # OSError covers seeks to bad offsets recorded in a damaged archive (the file itself opened fine)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error, zlib.error, LookupError,
            ValueError, TypeError, AttributeError, ArithmeticError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt (not a readable torch checkpoint): {e}") from e
