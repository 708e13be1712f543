"""Checkpoint files <-> flat ``{name: np.ndarray}`` state dicts.

Formats, chosen by suffix:

* ``.safetensors`` — written with ``safetensors.numpy``, read as arrays mapped from the file
  (:mod:`bgem3_lib.weights.mapped`: pages are read when used); BF16 tensors (which NumPy cannot hold)
  are widened to float32.
* ``.bin`` / ``.pt`` / ``.pth`` — ``torch.save`` files (e.g. ``pytorch_model.bin``,
  ``colbert_linear.pt``, ``sparse_linear.pt`` of ``BAAI/bge-m3``), read by the restricted
  unpickler of :mod:`bgem3_lib.weights.safe_unpickle`: no torch import, no code from the file runs.
* ``.ckpt`` — MindSpore checkpoints (``mindspore`` is imported only for this format).

Example::

    >>> state = strip_prefix({"roberta.pooler.dense.bias": np.zeros(4, np.float32)})
    >>> list(state), state["pooler.dense.bias"].shape
    (['pooler.dense.bias'], (4,))
    >>> check_shapes(state, {"pooler.dense.bias": (4,)})   # passes silently
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..paths import atomic_write
from .mapped import map_array
from .safe_unpickle import bfloat16_bits_to_float32, load_torch_checkpoint

__all__ = ["load_state_dict", "save_state_dict", "strip_prefix", "check_shapes"]

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_SAVE_KINDS = "bfiu?"          # NumPy dtype kinds both writers accept: float, int, uint, bool


def _flatten(obj, prefix: str, out: dict) -> None:
    """Nested mappings of arrays -> ``{"outer.inner": array}``; non-array leaves are skipped."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", out)


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}


def _safetensors_array(path: Path, data_start: int, name: str, info: dict) -> np.ndarray:
    """One tensor of a safetensors file, mapped from the file (BF16 widened to float32, a misaligned
    tensor copied)."""
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {info.get('dtype')!r}, which this reader does not support")
    dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
    begin, stop = info["data_offsets"]
    if stop - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"tensor {name!r}: {stop - begin} bytes for shape {shape}")
    if 0 in shape:
        arr = np.zeros(shape, dtype)
    else:
        arr = map_array(path, data_start + begin, dtype, shape)
        if (data_start + begin) % dtype.itemsize:
            arr = np.array(arr)
    return bfloat16_bits_to_float32(arr) if info["dtype"] == "BF16" else arr


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor mapped from the file (:mod:`.mapped`); ``safe_open`` validates the header first."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        return {k: _safetensors_array(path, 8 + n, k, header[k]) for k in names}
    except (SafetensorError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ValueError(f"{path} is truncated or corrupt (not a readable safetensors file): {e}") from e


def _load_mindspore(path: Path) -> dict[str, np.ndarray]:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt (not a readable MindSpore checkpoint): {e}") from e
    out = {}
    for name, param in params.items():
        if param.dtype == ms.bfloat16:
            param = param.astype(ms.float32)
        out[name] = param.asnumpy()
    return out


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a checkpoint file into ``{name: np.ndarray}`` (nested dicts flattened with ``.``).

    fp16 stays float16, bf16 becomes float32, other dtypes are kept. Raises FileNotFoundError for
    a missing file, ValueError for a truncated/corrupt file or unknown suffix, and
    :class:`~bgem3_lib.weights.safe_unpickle.UnsafeCheckpointError` for a pickle that would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix == ".ckpt":
        return _load_mindspore(path)
    if suffix in TORCH_SUFFIXES:
        obj = load_torch_checkpoint(path)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
        state: dict[str, np.ndarray] = {}
        _flatten(obj, "", state)
        if not state:
            raise ValueError(f"{path} holds no tensors")
        return state
    raise ValueError(f"unsupported checkpoint suffix {path.suffix!r} for {path}; expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or .ckpt")


def _check_tensors(tensors) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict name -> np.ndarray, got {type(tensors).__name__}")
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(value).__name__}, not an np.ndarray")
        if value.dtype.kind not in _SAVE_KINDS:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}, which checkpoints cannot store")
        out[name] = np.ascontiguousarray(value)
    return out


def _write_mindspore(tensors: dict[str, np.ndarray], path: str) -> None:
    import mindspore as ms

    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], path)


def save_state_dict(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Write ``{name: np.ndarray}`` to ``.safetensors`` or MindSpore ``.ckpt``, atomically.

    The file is written under a temporary name in the target directory and moved into place with
    ``os.replace``, so readers never see a half-written checkpoint and a failed write leaves any
    previous file untouched.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"cannot save {path}: suffix must be .safetensors or .ckpt")
    tensors = _check_tensors(tensors)
    with atomic_write(path, suffix=".tmp" + suffix) as tmp:
        if suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(tensors, str(tmp))
        else:
            _write_mindspore(tensors, str(tmp))


def strip_prefix(state: dict, prefixes: tuple[str, ...] = ("roberta.", "bert.", "model.")) -> dict:
    """Drop leading wrapper prefixes from every key (repeatedly, e.g. ``model.roberta.x`` -> ``x``).

    ``{"roberta.a": x}`` and ``{"a": x}`` both give ``{"a": x}``; two keys that collide after
    stripping raise ValueError.
    """
    out = {}
    for key, value in state.items():
        name = key
        while True:
            match = next((p for p in prefixes if p and name.startswith(p)), None)
            if match is None:
                break
            name = name[len(match):]
        if name in out:
            raise ValueError(f"keys collide after stripping prefixes {prefixes}: {key!r} -> {name!r}")
        out[name] = value
    return out


def check_shapes(state: dict, expected: dict[str, tuple]) -> None:
    """Raise ValueError listing every missing key and every ``name: expected (..), found (..)``.

    Keys of ``state`` that are not in ``expected`` are ignored.

    >>> check_shapes({"w": np.zeros((2, 3))}, {"w": (3, 2)})
    Traceback (most recent call last):
    ValueError: checkpoint does not match the model: shape mismatch: w: expected (3, 2), found (2, 3)
    """
    missing = [k for k in expected if k not in state]
    wrong = [f"{k}: expected {tuple(shape)}, found {tuple(np.shape(state[k]))}"
             for k, shape in expected.items()
             if k in state and tuple(np.shape(state[k])) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong))
    if problems:
        raise ValueError("checkpoint does not match the model: " + " | ".join(problems))
