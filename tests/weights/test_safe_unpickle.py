"""bgem3_lib.weights.safe_unpickle: torch.save files read without torch; pickles that would run code refused.

Reference files are written by real ``torch.save`` in a subprocess, which also dumps every tensor
as ``.npy`` (bf16 via ``tensor.float()``), so the test process itself never imports torch.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from bgem3_lib.weights.safe_unpickle import UnsafeCheckpointError, bfloat16_bits_to_float32, load_torch_checkpoint

ROOT = Path(__file__).resolve().parents[2]

_SAVE_SCRIPT = r"""
import collections, sys
import numpy as np, torch
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
a = torch.randn(3, 4, generator=g)
obj = {
    "f32": a, "t": a.t(), "sl": a[1:, ::2],                      # three views of one storage
    "f16": (3 * a).half(), "bf16": (7 * a).bfloat16(), "f64": a.double(),
    "i64": torch.arange(-3, 9).reshape(3, 4), "i32": torch.arange(5, dtype=torch.int32),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": a > 0, "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
    "param": torch.nn.Parameter(a.clone()),
    "nested": collections.OrderedDict(inner={"row": a[2]}),
    "lst": [a[0], 7, "text"],
}
def dump(prefix, o):
    items = o.items() if isinstance(o, dict) else enumerate(o)
    for k, v in items:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            np.save(f"{out}/ref_{prefix}{k}.npy", (v.float() if v.dtype == torch.bfloat16 else v).numpy())
        elif isinstance(v, (dict, list)):
            dump(f"{prefix}{k}.", v)
dump("", obj)
torch.save(obj, f"{out}/new.pt")
torch.save(obj, f"{out}/legacy.pt", _use_new_zipfile_serialization=False)
torch.save(torch.nn.Linear(4, 2).state_dict(), f"{out}/linear.pt")
"""


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch_save")
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out)], check=True, timeout=120)
    return out


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


@pytest.mark.parametrize("name", ["new.pt", "legacy.pt"])
def test_tensors_match_torch(torch_files, name):
    obj = load_torch_checkpoint(torch_files / name)
    refs = sorted(torch_files.glob("ref_*.npy"))
    assert len(refs) == 16
    for ref_path in refs:
        ref = np.load(ref_path)
        got = _lookup(obj, ref_path.stem[4:])
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype, ref_path.stem
        assert got.shape == ref.shape and np.array_equal(got, ref), ref_path.stem
    assert obj["f16"].dtype == np.float16 and obj["bf16"].dtype == np.float32
    assert isinstance(obj["nested"], OrderedDict) and obj["lst"][1:] == [7, "text"]


def test_views_of_one_storage_come_back_independent(torch_files):
    obj = load_torch_checkpoint(torch_files / "new.pt")
    a, t, sl = obj["f32"], obj["t"], obj["sl"]
    np.testing.assert_array_equal(t, a.T)
    np.testing.assert_array_equal(sl, a[1:, ::2])
    assert t.flags.c_contiguous and sl.flags.c_contiguous
    assert not np.shares_memory(a, t) and not np.shares_memory(a, sl)
    before = t.copy()
    a += 1.0                                   # writable, and writing does not leak into the views
    np.testing.assert_array_equal(t, before)


def test_module_state_dict(torch_files):
    state = load_torch_checkpoint(torch_files / "linear.pt")
    assert isinstance(state, OrderedDict) and list(state) == ["weight", "bias"]
    assert state["weight"].shape == (2, 4) and state["bias"].shape == (2,)


def test_loading_does_not_import_torch(torch_files):
    code = ("import sys; from bgem3_lib.weights.safe_unpickle import load_torch_checkpoint as L; "
            f"L({str(torch_files / 'new.pt')!r}); L({str(torch_files / 'legacy.pt')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_bfloat16_bits_hand_worked():
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001, 0x4049], dtype=np.uint16)
    expected = np.array([1.0, -2.0, np.inf, 2.0**-133, 3.140625], dtype=np.float32)
    np.testing.assert_array_equal(bfloat16_bits_to_float32(bits), expected)


# ---------------------------------------------------------------- pickles that would run code

class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(pwned: Path):
    return {
        "os.system": (os.system, (f"touch {pwned}",)),
        "builtins.eval": (builtins.eval, (f"__import__('pathlib').Path({str(pwned)!r}).touch()",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(pwned)],)),
    }


def _write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")


def _legacy_header() -> bytes:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps(info, 2)


@pytest.mark.parametrize("layout", ["zip", "raw", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_code_in_pickle_is_refused_before_running(tmp_path, layout, protocol, payload):
    pwned = tmp_path / "pwned"
    func, args = _payloads(pwned)[payload]
    pkl = pickle.dumps({"weight": _Evil(func, args)}, protocol=protocol)
    path = tmp_path / "pytorch_model.bin"
    if layout == "zip":
        _write_torch_zip(path, pkl)
    else:
        path.write_bytes(pkl if layout == "raw" else _legacy_header() + pkl)
    refused = f"{func.__module__}.{func.__qualname__}"        # e.g. posix.system on Linux
    with pytest.raises(UnsafeCheckpointError, match=rf"refused global {refused} in .*pytorch_model\.bin"):
        load_torch_checkpoint(path)
    assert not pwned.exists()
    assert issubclass(UnsafeCheckpointError, ValueError)


# ------------------------------------------------- hand-assembled tensors (protocol 2 opcodes)

def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor_pickle(offset: int, size: tuple, stride: tuple, numel: int) -> bytes:
    """{"w": _rebuild_tensor_v2(<FloatStorage '0' of numel>, offset, size, stride, False, OrderedDict())}."""
    pid = _tup(_s("storage"), b"ctorch\nFloatStorage\n", _s("0"), _s("cpu"), _i(numel))
    args = _tup(pid + b"Q", _i(offset), _tup(*map(_i, size)), _tup(*map(_i, stride)), b"\x89",
                b"ccollections\nOrderedDict\n)R")
    return b"\x80\x02}" + _s("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


def test_hand_assembled_strided_tensor(tmp_path):
    path = tmp_path / "w.pt"
    storage = np.arange(8, dtype="<f4").tobytes()
    _write_torch_zip(path, _tensor_pickle(1, (2, 3), (1, 2), 8), {"0": storage})
    # element [i, j] = storage[1 + i + 2 j]
    np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], [[1, 3, 5], [2, 4, 6]])


@pytest.mark.parametrize("offset,size,stride,numel,storage_len", [
    (1, (2, 3), (1, 3), 8, 8),      # last element would be storage[8]: past the end
    (0, (4,), (1,), 4, 2),          # record holds fewer bytes than the storage claims
])
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, numel, storage_len):
    path = tmp_path / "w.pt"
    _write_torch_zip(path, _tensor_pickle(offset, size, stride, numel),
                     {"0": np.zeros(storage_len, "<f4").tobytes()})
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_torch_checkpoint(path)


# -------------------------------------------------------------------------- damaged files

@pytest.mark.parametrize("name,keep", [("new.pt", 0.5), ("new.pt", 0.98), ("legacy.pt", 0.75)])
def test_truncated_checkpoint(torch_files, tmp_path, name, keep):
    raw = (torch_files / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match=rf"{name}.* truncated or corrupt"):
        load_torch_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch_checkpoint(tmp_path / "nope.pt")


def test_tar_format_is_reported_unsupported(tmp_path):
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("pickle")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(ValueError, match="unsupported"):
        load_torch_checkpoint(path)
