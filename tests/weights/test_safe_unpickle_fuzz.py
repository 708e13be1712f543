"""Fuzz bgem3_lib.weights.safe_unpickle (issue 12): no input runs code, every failure is a CheckpointError.

Inputs: random bytes; real ``torch.save`` files (zip and legacy, written in a subprocess by
test_safe_unpickle's script, so this process never imports torch) with bytes flipped, inserted,
deleted, overwritten by huge length fields or cut off, both in the whole file and inside the zip's
``data.pkl``; and pickles assembled from opcodes that reach for ``os.system``, ``builtins.eval``,
``subprocess.Popen`` and :func:`_sentinel` through GLOBAL, STACK_GLOBAL, INST, OBJ, NEWOBJ(_EX),
EXT codes, REDUCE and BUILD, or hand the unpickler persistent ids of the wrong shape. Every payload
targets the marker file ``MARKER``; it must never appear. :func:`test_payloads_are_live` shows the
same payloads do run the sentinel under the standard unpickler, so their refusal is meaningful.
"""
from __future__ import annotations

import atexit
import copyreg
import functools
import math
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_safe_unpickle import _SAVE_SCRIPT, _legacy_header, _write_torch_zip

from bgem3_lib.weights import safe_unpickle
from bgem3_lib.weights.safe_unpickle import CheckpointError, UnsafeCheckpointError, load_torch_checkpoint

FUZZ = settings(max_examples=300, deadline=None)

_WORK = Path(tempfile.mkdtemp(prefix="safe-unpickle-fuzz-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
MARKER = _WORK / "pwned"
MOD = __name__                       # pickles name this module's sentinels as <MOD>._sentinel


def _sentinel(*args, **kwargs):
    """What a payload runs if the unpickler lets it through: leaves MARKER behind."""
    MARKER.touch()


class _SentinelType:
    """A class whose construction (NEWOBJ / INST / OBJ) or __setstate__ (BUILD) leaves MARKER behind."""

    def __new__(cls, *args, **kwargs):
        MARKER.touch()
        return super().__new__(cls)

    def __setstate__(self, state):
        MARKER.touch()


# ------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _torch_files() -> dict[str, bytes]:
    """new.pt / legacy.pt of test_safe_unpickle's script, written once by torch in a subprocess."""
    out = _WORK / "torch_save"
    out.mkdir()
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out)], check=True, timeout=120)
    return {name: (out / name).read_bytes() for name in ("new.pt", "legacy.pt")}


def _zip_members(raw: bytes) -> list[tuple[str, bytes]]:
    path = _WORK / "members.pt"
    path.write_bytes(raw)
    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _write_zip_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)


_PLAIN = (type(None), bool, int, float, str, bytes, bytearray, np.ndarray, np.memmap, safe_unpickle._Storage,
          safe_unpickle._StorageType, safe_unpickle._Rebuilder)   # np.memmap: uncompressed members are mapped
_CONTAINER = (tuple, list, dict, OrderedDict, set, frozenset)


def _assert_plain_data(obj) -> None:
    """A loaded object holds only containers, scalars, arrays and the unpickler's own objects."""
    seen, todo = set(), [obj]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, type) and x in (dict, list, tuple, OrderedDict):
            continue                                   # an allowed global, returned bare
        assert type(x) in _PLAIN + _CONTAINER, f"unexpected {type(x)!r} in the loaded object"
        if isinstance(x, np.ndarray):
            assert x.dtype.kind in "biuf" and x.flags.c_contiguous
        elif isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, _CONTAINER):
            todo.extend(x)


def _check_load(path: Path):
    """The property: loading returns plain data or raises a CheckpointError naming the file, and
    nothing runs (MARKER never appears). Returns (object or None, the CheckpointError or None)."""
    obj = error = None
    try:
        obj = load_torch_checkpoint(path)
    except CheckpointError as e:                      # UnsafeCheckpointError is one
        assert str(path) in str(e)
        error = e
    else:
        _assert_plain_data(obj)
    assert not MARKER.exists(), "the checkpoint ran code"
    return obj, error


# -------------------------------------------------------------------------- mutations

_HUGE = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 2**40, 2**62, 2**63 - 1, 2**64 - 1]

mutation_st = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 16)),
    st.tuples(st.just("huge"), st.integers(0, 2**31), st.sampled_from(_HUGE), st.sampled_from(["<I", "<Q", ">I"])),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, pos, *rest in mutations:
        pos = pos % (len(buf) + 1)
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= 1 << rest[0]
        elif kind == "set" and pos < len(buf):
            buf[pos] = rest[0]
        elif kind == "insert":
            buf[pos:pos] = rest[0]
        elif kind == "delete":
            del buf[pos:pos + rest[0]]
        elif kind == "huge":
            value, fmt = rest
            raw = struct.pack(fmt, value & (0xFFFF_FFFF if fmt.endswith("I") else 2**64 - 1))
            buf[pos:pos + len(raw)] = raw
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@FUZZ
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"]))
@example(data=b"", prefix=b"")
def test_random_bytes(data, prefix):
    path = _WORK / "random.bin"
    path.write_bytes(prefix + data)
    _check_load(path)


@FUZZ
@given(name=st.sampled_from(["new.pt", "legacy.pt"]), mutations=st.lists(mutation_st, min_size=1, max_size=4))
def test_mutated_checkpoint_file(name, mutations):
    path = _WORK / name
    path.write_bytes(_mutate(_torch_files()[name], mutations))
    _check_load(path)


@FUZZ
@given(mutations=st.lists(mutation_st, min_size=1, max_size=4),
       splice=st.none() | st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)))
def test_mutated_data_pkl(mutations, splice):
    """The zip is intact (fresh CRCs), so the damaged data.pkl reaches the unpickler itself."""
    members = _zip_members(_torch_files()["new.pt"])
    i = next(k for k, (n, _) in enumerate(members) if n.endswith("/data.pkl"))
    pkl = _mutate(members[i][1], mutations)
    if splice is not None:                            # a dangerous fragment dropped into the stream
        frag = _GLOBALS_BY_INDEX[splice[0] % len(_GLOBALS_BY_INDEX)]
        at = splice[1] % (len(pkl) + 1)
        pkl = pkl[:at] + frag + pkl[at:]
    members[i] = (members[i][0], pkl)
    path = _WORK / "pytorch_model.bin"
    _write_zip_members(path, members)
    _check_load(path)


def test_unmutated_files_still_load():
    for name, raw in _torch_files().items():
        path = _WORK / name
        path.write_bytes(raw)
        obj, _ = _check_load(path)
        assert isinstance(obj, dict) and obj["f32"].shape == (3, 4), name


# ------------------------------------------------------------ hand-built dangerous pickles

def _u(text: str) -> bytes:                           # SHORT_BINUNICODE or BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:                           # BININT, or LONG1 for big values
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_pickle(offset: int, size: tuple, stride: tuple, numel: int) -> bytes:
    """{"w": _rebuild_tensor_v2(<FloatStorage '0' of numel>, offset, size, stride, False, OrderedDict())}
    (test_safe_unpickle's builder, with integers of any size)."""
    pid = b"(" + _u("storage") + _global("torch", "FloatStorage") + _u("0") + _u("cpu") + _int(numel) + b"t"
    args = (b"(" + pid + b"Q" + _int(offset) + b"(" + b"".join(map(_int, size)) + b"t(" + b"".join(map(_int, stride))
            + b"t\x89" + _global("collections", "OrderedDict") + b")Rt")
    return b"\x80\x02}" + _u("w") + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Rs."


_SHELL = f"touch {MARKER}"
_PY = f"open({str(MARKER)!r}, 'w').close()"
# (module, name, args as a pickled tuple): each call would leave MARKER behind
_TARGETS = [
    ("os", "system", b"(" + _u(_SHELL) + b"t"),
    ("posix", "system", b"(" + _u(_SHELL) + b"t"),
    ("builtins", "eval", b"(" + _u(_PY) + b"t"),
    ("builtins", "exec", b"(" + _u(_PY) + b"t"),
    ("__builtin__", "eval", b"(" + _u(_PY) + b"t"),  # protocol-2 spelling, mapped to builtins.eval
    ("subprocess", "Popen", b"((" + _u("touch") + _u(str(MARKER)) + b"lt"),
    (MOD, "_sentinel", b"(" + _u("x") + b"t"),
    (MOD, "_SentinelType", b")"),
    ("torch._utils", "_rebuild_tensor_v2.__globals__", b")"),   # dotted names reach attributes
    ("collections", "OrderedDict.fromkeys", b"(]t"),
]
_GLOBALS_BY_INDEX = [_global(m, n) for m, n, _ in _TARGETS] + [
    _u(m) + _u(n) + b"\x93" for m, n, _ in _TARGETS]
_EXT = {("os", "system"): b"\x82\xf0", ("builtins", "eval"): b"\x82\xf1", (MOD, "_sentinel"): b"\x82\xf2",
        ("subprocess", "Popen"): b"\x83\x34\x12", (MOD, "_SentinelType"): b"\x84\x01\x00\xff\x7f"}



@pytest.fixture(scope="module", autouse=True)
def _extension_codes():
    """EXT1/EXT2/EXT4 codes registered (as a pickling library would) for dangerous globals, each once
    resolved by the standard unpickler, which caches code -> object process-wide (the C unpickler
    then takes a cached code without calling find_class)."""
    codes = {0xF0: ("os", "system"), 0xF1: ("builtins", "eval"), 0xF2: (MOD, "_sentinel"),
             0x1234: ("subprocess", "Popen"), 0x7FFF0001: (MOD, "_SentinelType")}
    for code, (module, name) in codes.items():
        copyreg.add_extension(module, name, code)
        assert pickle.loads(b"\x80\x02" + _EXT[(module, name)] + b".") is getattr(sys.modules[module], name)
    MARKER.unlink(missing_ok=True)
    yield
    for code, (module, name) in codes.items():
        copyreg.remove_extension(module, name, code)


def _payload(target: int, how: str) -> bytes:
    """One value whose unpickling calls target ``target`` (if its global is resolved)."""
    module, name, args = _TARGETS[target]
    ref = {"STACK_GLOBAL": _u(module) + _u(name) + b"\x93",
           "EXT": _EXT.get((module, name), _global(module, name))}.get(how, _global(module, name))
    if how == "INST":                                 # MARK args INST: calls module.name(*args)
        return b"(" + args[1:-1] + b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    if how == "OBJ":                                  # MARK cls args OBJ
        return b"(" + ref + args[1:-1] + b"o"
    if how == "NEWOBJ":                               # cls.__new__(cls, *args)
        return ref + args + b"\x81"
    if how == "NEWOBJ_EX":
        return ref + args + b"}\x92"
    if how == "BUILD":                                # an object, then state for its __setstate__
        return ref + b")\x81" + b"}" + _u("k") + _u("v") + b"sb"
    return ref + args + b"R"                          # GLOBAL / STACK_GLOBAL / EXT + REDUCE


_HOWS = ["GLOBAL", "STACK_GLOBAL", "EXT", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"]


def _place(value: bytes, where: str) -> bytes:
    """Put a value where a torch pickle has values: top level, dict value, list item, tensor argument,
    inside a persistent id, as BUILD state of an OrderedDict."""
    if where == "dict":
        return b"}" + _u("weight") + value + b"s"
    if where == "list":
        return b"]" + value + b"a"
    if where == "tensor":
        return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + value + b"K\x00(K\x01t(K\x01t\x89"
                + _global("collections", "OrderedDict") + b")Rt" + b"R")
    if where == "persid":
        return b"(" + _u("storage") + value + _u("0") + _u("cpu") + b"K\x01tQ"
    if where == "state":
        return _global("collections", "OrderedDict") + b")R}" + _u("_metadata") + value + b"sb"
    return value


def _as_file(pkl: bytes, layout: str, protocol: int) -> Path:
    body = b"\x80" + bytes([protocol]) + pkl + b"."
    path = _WORK / "pytorch_model.bin"
    if layout == "zip":
        _write_torch_zip(path, body)
    else:
        path.write_bytes(body if layout == "raw" else _legacy_header() + body)
    return path


_LAYOUTS = st.sampled_from(["zip", "raw", "legacy"])


@pytest.mark.parametrize("how", _HOWS)
def test_payloads_are_live(how):
    """The standard unpickler runs every payload shape (so refusing them below means something)."""
    target = 7 if how in ("NEWOBJ", "NEWOBJ_EX", "BUILD") else 6       # a class / a function
    for where in ("top", "dict", "list", "state"):
        MARKER.unlink(missing_ok=True)
        try:
            pickle.loads(b"\x80\x02" + _place(_payload(target, how), where) + b".")
            assert MARKER.exists(), (how, where)
        finally:
            MARKER.unlink(missing_ok=True)


@FUZZ
@given(target=st.integers(0, len(_TARGETS) - 1), how=st.sampled_from(_HOWS),
       where=st.sampled_from(["top", "dict", "list", "tensor", "persid", "state"]),
       layout=_LAYOUTS, protocol=st.sampled_from([2, 4]))
@example(target=6, how="EXT", where="dict", layout="zip", protocol=2)    # a cached extension code
def test_dangerous_payloads_are_refused(target, how, where, layout, protocol):
    path = _as_file(_place(_payload(target, how), where), layout, protocol)
    _, error = _check_load(path)    # ran nothing (checked by _check_load)
    assert isinstance(error, UnsafeCheckpointError), error      # refused at the global, before any call


_STORAGE = _global("torch", "FloatStorage")
_PIDS = [                                             # persistent ids of the wrong shape
    b")", b"(" + _u("storage") + b"t", b"(" + _u("evil") + _STORAGE + _u("0") + _u("cpu") + b"K\x01t",
    b"(" + _u("storage") + _u("FloatStorage") + _u("0") + _u("cpu") + b"K\x01t",
    b"(" + _u("storage") + _STORAGE + b"K\x00" + _u("cpu") + b"K\x01t",
    b"(" + _u("storage") + _STORAGE + _u("0") + _u("cpu") + b"J\xff\xff\xff\xfft",
    b"(" + _u("storage") + _STORAGE + _u("0") + _u("cpu") + b"K\x04(" + _u("v") + b"K\x00K\xfftt",
    b"(" + _u("storage") + _STORAGE + _u("0") + _u("cpu") + b"K\x04(]K\x00K\x01tt",
    b"(" + _u("storage") + _STORAGE + _u("../../etc/passwd") + _u("cpu") + b"K\x01t",
    b"(" + _u("storage") + _STORAGE + b"C\x02\xff\xfe" + _u("cpu") + b"K\x01t",
    b"]", _u("storage"),
]
_FRAGMENTS = (_GLOBALS_BY_INDEX + list(_EXT.values()) + [p + b"Q" for p in _PIDS] + [
    b"(", b"t", b"\x85", b"\x86", b"\x87", b")", b"]", b"}", b"l", b"d", b"a", b"e", b"s", b"u", b"R", b"b",
    b"o", b"\x81", b"\x92", b"Q", b"0", b"1", b"2", b"\x94", b"q\x00", b"q\x01", b"h\x00", b"h\x01",
    b"r\xff\xff\xff\x7f", b"j\x00\x00\x00\x01", b"N", b"\x88", b"\x89", b"K\x01", b"J\xff\xff\xff\xff",
    b"\x8f", b"\x90", b"\x91", b"P0\n", b"Pstorage\n", b"\x82\x00", b"\x82\x07", b"\x83\xff\xff",
    b"\x84\xff\xff\xff\xff", b"\x98", b"\x97", b"\x95\x00\x00\x00\x00\x00\x00\x00\x01",
    _u(_SHELL), _u(_PY), _u("touch"), _u(str(MARKER)), _global("collections", "OrderedDict"),
    _global("torch._utils", "_rebuild_tensor_v2"), _global("torch._utils", "_rebuild_parameter"),
    _STORAGE, _global("torch", "BFloat16Storage"), _global("builtins", "dict"), _global("builtins", "list"),
    b"\x8e" + struct.pack("<Q", 2**40), b"X\xff\xff\xff\x7f", b"(" * 40, b")" + b"\x85" * 150,
    b"icollections\nOrderedDict\n", b"i" + MOD.encode() + b"\n_sentinel\n", b"S'x'\n", b"V\\ud800\n",
])


@FUZZ
@given(ops=st.lists(st.sampled_from(_FRAGMENTS), max_size=24), payload=st.none() | st.tuples(
    st.integers(0, len(_TARGETS) - 1), st.sampled_from(_HOWS), st.integers(0, 24)),
    layout=_LAYOUTS, protocol=st.sampled_from([2, 4]))
@example(ops=[_PIDS[0] + b"Q"], payload=None, layout="raw", protocol=2)
def test_opcode_soup(ops, payload, layout, protocol):
    """Random opcode sequences (dangerous globals, wrong persistent ids, stack and memo abuse), with or
    without a well-formed payload spliced in: plain data or a CheckpointError, never a call."""
    if payload is not None:
        target, how, at = payload
        ops = ops[:at] + [_payload(target, how)] + ops[at:]
    _check_load(_as_file(b"".join(ops), layout, protocol))


# ------------------------------------------------------------ huge claims in tiny files

@FUZZ
@given(numel=st.sampled_from([0, 1, 7, 8, 2**20, 2**31, 2**40]), stored=st.integers(0, 40),
       offset=st.sampled_from([0, 1, 7, 2**33]),
       geometry=st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 2**12, 2**31]), st.sampled_from([0, 1, 2, 2**40])),
                         min_size=0, max_size=4))
@example(numel=1, stored=1, offset=0, geometry=[(2**13, 0), (2**13, 0)])       # 1 float broadcast to 256 MiB
@example(numel=8, stored=8, offset=0, geometry=[(2**13, 1), (2**13, 1)])       # overlapping rows of 8 floats
def test_tensor_geometry_is_checked_before_allocating(numel, stored, offset, geometry):
    """A few-byte file whose tensor claims a huge storage or a huge (overlapping, stride-0) view:
    the exact strided view of the stored floats, or a CheckpointError, and never gigabytes."""
    size, stride = tuple(n for n, _ in geometry), tuple(s for _, s in geometry)
    path = _WORK / "w.pt"
    storage = np.arange(stored, dtype="<f4")
    _write_torch_zip(path, _tensor_pickle(offset, size, stride, numel), {"0": storage.tobytes()})
    tracemalloc.start()
    try:
        obj, _ = _check_load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**27, f"peak {peak} bytes"
    if obj is not None:
        assert stored >= numel
        want = np.zeros(size, np.float32) if math.prod(size) == 0 else \
            np.lib.stride_tricks.as_strided(storage[offset:numel], size, [s * 4 for s in stride])
        assert obj["w"].shape == size
        np.testing.assert_array_equal(obj["w"], want)


@pytest.mark.parametrize("layout", ["stored", "deflated", "legacy"])
def test_tiny_file_claiming_a_huge_storage(layout):
    """Recorded sizes (zip central directory, legacy element counts) larger than the file are refused."""
    path = _WORK / "huge.pt"
    if layout == "legacy":
        pkl = b"\x80\x02" + _tensor_pickle(0, (4,), (1,), 4)[2:]
        keys = pickle.dumps(["0"], 2)
        path.write_bytes(_legacy_header() + pkl + keys + struct.pack("<q", 2**40) + b"\x00" * 16)
    else:
        _write_torch_zip(path, _tensor_pickle(0, (4,), (1,), 4), {"0": b"\x00" * 16})
        raw = bytearray(path.read_bytes())
        central = raw.index(b"PK\x01\x02")                             # the central directory's ...
        entry = raw.index(b"archive/data/0", central) - 46             # ... record of the storage (name at +46)
        if layout == "deflated":       # a 16-byte deflate stream cannot hold 4 GiB (ratio > 1032)
            raw[entry + 10:entry + 12] = struct.pack("<H", zipfile.ZIP_DEFLATED)
            raw[entry + 24:entry + 28] = struct.pack("<I", 2**32 - 1)
        else:                          # compressed and uncompressed sizes both far past the file's end
            raw[entry + 20:entry + 28] = struct.pack("<II", 2**32 - 1, 2**32 - 1)
        path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"huge\.pt.* truncated or corrupt"):
            load_torch_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, f"peak {peak} bytes"


@pytest.mark.parametrize("pkl", [
    b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",          # BINBYTES8 longer than the file
    b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",            # FRAME longer than the file
    b"\x80\x02Nr\x00\x00\x00\x80.",                                 # memo index 2**31 (a 32 GiB table)
    b"\x80\x02" + b"]q\x00" + b"h\x00a" * 2 + b".",                  # a list that contains itself
    b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".",                 # lists nested 5000 deep
], ids=["bytes8", "frame", "memo", "cycle", "deep-list"])
def test_pickle_claims_are_checked_before_the_unpickler_acts(pkl):
    """Without the opcode pre-check these are a MemoryError, or a RecursionError in any caller that
    walks the result."""
    path = _WORK / "claims.pt"
    path.write_bytes(pkl)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torch_checkpoint(path)


def test_deeply_nested_tuple_key_does_not_crash():
    """Hashing a tuple nested 300k deep (a dict key) overflows the C stack: without the nesting limit
    the interpreter dies with SIGSEGV, so this runs in a child process."""
    path = _WORK / "deep.pt"
    path.write_bytes(b"\x80\x02}" + b")" + b"\x85" * 300_000 + b"Ns.")
    code = ("from bgem3_lib.weights.safe_unpickle import CheckpointError, load_torch_checkpoint as L\n"
            f"try:\n    L({str(path)!r})\nexcept CheckpointError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-500:]}"
    assert "nests values deeper than 100 levels" in out.stdout
