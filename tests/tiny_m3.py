"""A tiny random M3 model (XLM-R tokenizer, hidden 32, 2 layers, dense+sparse+ColBERT heads) saved by
``BGEM3.save_pretrained``, built once per test process."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bgem3_lib.weights.assets import asset_path


def _shape(hf_name: str, cfg) -> tuple[int, ...]:
    """Shape of a Hugging Face BERT/XLM-R encoder tensor."""
    H, inner = cfg.hidden_size, cfg.intermediate_size
    if hf_name.endswith("_embeddings.weight"):
        table = hf_name.split(".")[1].rsplit("_", 1)[0]
        rows = {"word": cfg.vocab_size, "position": cfg.max_position_embeddings, "token_type": cfg.type_vocab_size}
        return (rows[table], H)
    if "LayerNorm" in hf_name:
        return (H,)
    if "intermediate.dense" in hf_name:
        out, inp = inner, H
    elif ".output.dense" in hf_name and ".attention." not in hf_name:
        out, inp = H, inner
    else:
        out, inp = H, H
    return (out,) if hf_name.endswith("bias") else (out, inp)


@functools.lru_cache(maxsize=None)
def tiny_model_dir(seed: int = 0) -> Path:
    from bgem3_lib.model.bgem3 import BGEM3
    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import hf_to_encoder_names
    from bgem3_lib.model.loading import LoadedModel

    cfg = M3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=66)                     # 64 usable tokens
    rng = np.random.default_rng(seed)
    state = {}
    for hf in hf_to_encoder_names(cfg).values():
        base = 1.0 if hf.endswith("LayerNorm.weight") else 0.0
        scale = 0.1 if "LayerNorm" in hf else 0.5
        state[hf] = (base + scale * rng.standard_normal(_shape(hf, cfg))).astype(np.float32)
    for i in range(cfg.num_hidden_layers):
        for n in ("query", "key", "value"):
            base = f"encoder.layer.{i}.attention.self.{n}"
            state[base + ".weight"] = (0.2 * rng.standard_normal((32, 32))).astype(np.float32)
            state[base + ".bias"] = (0.1 * rng.standard_normal(32)).astype(np.float32)
    heads = {"colbert_linear.weight": (0.2 * rng.standard_normal((32, 32))).astype(np.float32),
             "colbert_linear.bias": (0.1 * rng.standard_normal(32)).astype(np.float32),
             "sparse_linear.weight": (0.3 * rng.standard_normal((1, 32))).astype(np.float32),
             "sparse_linear.bias": np.array([0.5], np.float32)}
    tok = asset_path("tokenizer.json")
    model = BGEM3(loaded=LoadedModel(cfg, state, heads, tok, "tiny-random"))
    tmp = tempfile.mkdtemp(prefix="bgem3-tiny-")
    atexit.register(shutil.rmtree, tmp, True)
    out = Path(tmp) / "model"
    return model.save_pretrained(out, tokenizer_path=tok)


class TableModel:
    """A stand-in for ``BGEM3`` whose encodings are looked up per text, so rankings can be worked
    out by hand. Texts not in ``table`` get pseudo-random unit vectors seeded by the text.
    ``corpus_calls`` counts ``encode_corpus`` calls (the cache tests check it stays 0)."""

    def __init__(self, table: dict | None = None, heads: bool = True, dim: int = 2):
        from types import SimpleNamespace
        self.table = table or {}
        self.dim = dim
        self.heads = object() if heads else None
        self.config = SimpleNamespace(max_length=512, to_dict=lambda: {"table": True})
        self.dtype, self.source = "float32", "table-model"
        self.query_instruction = self.passage_instruction = ""
        self.normalize_embeddings = True
        self._bgem3_fingerprint = f"table-model-{id(self)}"
        self.tokenizer = SimpleNamespace(vocab_size=250_002, encode_ids=lambda texts, max_length, warn=True:
                                         [[0] * min(len(t.split()) + 2, max_length) for t in texts])
        self.corpus_calls = 0

    def resolve_max_length(self, max_length=None) -> int:
        return self.config.max_length if max_length is None else int(max_length)

    def _lookup(self, text: str):
        if text in self.table:
            return self.table[text]
        import zlib
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        v = rng.standard_normal(self.dim).astype(np.float32)
        v /= np.linalg.norm(v)
        return v, {str(int(rng.integers(5, 50))): 1.0}, v[None, :]

    def encode(self, texts, batch_size=32, max_length=None, return_dense=True, return_sparse=False,
               return_colbert_vecs=False, show_progress=None, **_):
        rows = [self._lookup(t) for t in texts]
        return {"dense_vecs": np.array([r[0] for r in rows], np.float32) if return_dense else None,
                "lexical_weights": [dict(r[1]) for r in rows] if return_sparse else None,
                "colbert_vecs": [np.asarray(r[2], np.float32) for r in rows] if return_colbert_vecs else None}

    def encode_queries(self, texts, **kw):
        return self.encode(texts, **kw)

    def encode_corpus(self, texts, **kw):
        self.corpus_calls += 1
        return self.encode(texts, **kw)
