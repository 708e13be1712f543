"""Resolve a model name or directory into (config, encoder weights, head weights, tokenizer).

Accepted sources:

* a directory in the ``BAAI/bge-m3`` layout: ``config.json``, ``model.safetensors`` **or**
  ``pytorch_model.bin`` (keys with or without ``roberta.``), ``colbert_linear.pt`` and
  ``sparse_linear.pt`` (fp16 on the hub), ``tokenizer.json``;
* a directory written by ``BGEM3.save_pretrained`` (``heads.safetensors`` instead of the ``.pt``);
* ``"m3-small-base"``: the real multilingual-e5-small weights from the asset cache (dense only);
* ``"m3-small"``: ``m3-small-base`` + heads trained by ``python -m bgem3_lib train``, in the cache;
* ``"m3-small-long"`` / ``"m3-small-long-interp"``: ``m3-small`` accepting 8192 tokens, its position table
  extended without training by tiling or by interpolation (:mod:`bgem3_lib.model.long_positions`).

``.bin``/``.pt`` files are read by a restricted unpickler that never runs code from the file.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..paths import cache_dir
from ..weights.assets import asset_path
from ..weights.checkpoint_io import load_state_dict, strip_prefix
from ..weights.e5_format import read_e5
from .config import M3Config

E5_PREFIXES = ("query: ", "passage: ")
# M3-small with its 512 learned positions extended, untrained, to the paper's 8192 (§1; the value is pinned to
# analysis.paper_numbers.MAX_LENGTH by its tests): the paper's "w.o. long" setting (model.long_positions).
LONG_MODELS = {"m3-small-long": "tile", "m3-small-long-interp": "interpolate"}
LONG_MAX_LENGTH = 8192


@dataclass
class LoadedModel:
    config: M3Config
    encoder_state: dict
    heads_state: dict | None
    tokenizer_path: Path
    source: str
    instructions: tuple[str, str] = ("", "")          # (query prefix, passage prefix)
    extra: dict = field(default_factory=dict)


def m3_small_dir() -> Path:
    return cache_dir() / "models" / "m3-small"


def load_base() -> LoadedModel:
    header, state = read_e5(asset_path("e5-small-q4.bin"))
    cfg = M3Config.from_e5_header(header)
    return LoadedModel(cfg, state, None, asset_path("tokenizer.json"), "m3-small-base", E5_PREFIXES)


def _heads_from_dir(path: Path) -> dict | None:
    if (path / "heads.safetensors").is_file():
        return load_state_dict(path / "heads.safetensors")
    colbert, sparse = path / "colbert_linear.pt", path / "sparse_linear.pt"
    if colbert.is_file() != sparse.is_file():
        missing = sparse if colbert.is_file() else colbert
        raise FileNotFoundError(f"{missing} is missing (found its sibling head file in {path})")
    if not colbert.is_file():
        return None
    heads = {}
    for name, f in (("colbert_linear", colbert), ("sparse_linear", sparse)):
        for k, v in load_state_dict(f).items():
            heads[f"{name}.{k.split('.')[-1]}"] = np.asarray(v, dtype=np.float32)
    return heads


def load_directory(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = M3Config.from_json(path / "config.json")
    for name in ("model.safetensors", "pytorch_model.bin", "model.ckpt"):
        if (path / name).is_file():
            state = strip_prefix(load_state_dict(path / name))
            break
    else:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or model.ckpt in {path}")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        warnings.warn(f"{path} has no tokenizer.json: using the bundled XLM-R tokenizer (the one BGE-M3 and "
                      "multilingual-e5 share); put the model's own tokenizer.json there if it differs", stacklevel=3)
        tok = asset_path("tokenizer.json")
    prefixes = E5_PREFIXES if (path / "e5_prefixes").is_file() else ("", "")
    return LoadedModel(cfg, state, _heads_from_dir(path), tok, str(path), prefixes)


def resolve(name_or_path: str | Path) -> LoadedModel:
    if name_or_path in LONG_MODELS:
        from .long_positions import extend_positions
        return extend_positions(resolve("m3-small"), LONG_MAX_LENGTH, LONG_MODELS[name_or_path])
    if name_or_path == "m3-small-base":
        return load_base()
    if name_or_path == "m3-small":
        d = m3_small_dir()
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"M3-small is not trained yet (looked in {d}); run `python -m bgem3_lib train --recipe m3-small` "
                "or `make book`, which trains it when missing")
        return load_directory(d)
    path = Path(name_or_path)
    if path.exists():
        return load_directory(path)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a model directory nor a known name ('m3-small', 'm3-small-base', "
        f"{', '.join(repr(n) for n in LONG_MODELS)}). "
        "For the real BGE-M3, download BAAI/bge-m3 (config.json, pytorch_model.bin, colbert_linear.pt, "
        "sparse_linear.pt, tokenizer.json) and pass its directory.")
