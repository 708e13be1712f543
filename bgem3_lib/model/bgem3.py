"""``BGEM3``: encode and score with the M3 model, API-compatible with FlagEmbedding's
``BGEM3FlagModel``.

>>> m = BGEM3("m3-small-base")                                        # doctest: +SKIP
>>> out = m.encode(["query: hello", "query: bonjour"], return_sparse=False)   # doctest: +SKIP
>>> out["dense_vecs"].shape                                           # doctest: +SKIP
(2, 384)
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..kernels import cpu as cpu_kernels
from ..kernels import int8 as int8_kernels
from ..progress import tqdm
from ..retrieval.modes import FLAGEMBEDDING_KEYS, check_weights, fuse_all
from ..retrieval.scoring import colbert_score, lexical_matching_score
from ..weights.checkpoint_io import save_state_dict
from .config import M3Config
from .encoder import DTYPES, M3Encoder, cast_encoder, load_hf_state
from .heads import M3Heads, colbert_embedding, dense_embedding, sparse_embedding
from .loading import LoadedModel, resolve
from .runtime import set_device, spinning_threads_idle
from .tokenization import M3Tokenizer, check_texts

BACKENDS = ("kernels", "mindspore")


def _why_no_kernels(backend: str | None, device: str, dtype: str, config: M3Config) -> str | None:
    """The first reason the fused CPU kernels (for ``dtype="int8"`` the int8 ones) cannot run, None when they can.
    Checked in order, each only once the ones before it passed: the last builds the kernels.

    >>> cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    >>> _why_no_kernels("mindspore", "CPU", "int8", cfg), _why_no_kernels(None, "CPU", "float16", cfg)
    ("backend='mindspore' has no int8 path", "dtype 'float16' is not float32")
    """
    int8 = dtype == "int8"
    if int8 and backend == "mindspore":
        return "backend='mindspore' has no int8 path"
    if device != "CPU":
        return f"the device is {device}, not CPU"
    if DTYPES[dtype] != ms.float32:                   # int8: float32 outside the quantised linear maps
        return f"dtype {dtype!r} is not float32"
    if config.hidden_act != "gelu":
        return f"hidden_act {config.hidden_act!r} is not erf GELU"
    if not (int8_kernels if int8 else cpu_kernels).available():
        return "they are unavailable here (BGEM3_CPU_KERNELS=0, or no compiler/OpenBLAS: see the warning)"
    return None


def select_backend(backend: str | None, device: str, dtype: str, config: M3Config) -> str:
    """The inference backend, chosen once at load: ``"kernels"`` (the fused CPU kernels of
    :mod:`bgem3_lib.kernels.cpu`: CPU, float32, erf GELU, and they build here) or ``"mindspore"`` (plain
    MindSpore cells: every device and dtype, the path Ascend and GPU run). ``None`` picks the kernels
    when they can run and falls back otherwise; asking for ``"kernels"`` where they cannot is an error.
    ``dtype="int8"`` runs only on the int8 CPU kernels (:mod:`bgem3_lib.kernels.int8`): an error elsewhere."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} (or None: automatic)")
    if backend == "mindspore" and dtype != "int8":
        return backend
    why = _why_no_kernels(backend, device, dtype, config)
    if why is None:
        return "kernels"
    if dtype == "int8":
        raise ValueError(f"dtype='int8' runs only on the int8 CPU kernels: {why}")
    if backend == "kernels":
        raise ValueError(f"backend='kernels' cannot run: {why}")
    return "mindspore"


class BGEM3:
    """M3 encoder + dense / sparse / ColBERT heads on MindSpore.

    The facade owns the defaults and resolves them once: ``device=None`` is ``$BGEM3_DEVICE``, else CPU
    (:func:`~bgem3_lib.model.runtime.set_device`); ``max_length=None`` is the model's position table
    (:meth:`resolve_max_length`). Everything below receives resolved values. ``backend=None`` picks the
    fused CPU kernels where they run, else plain MindSpore (:func:`select_backend`).
    """

    def __init__(self, model_name_or_path: str | Path = "m3-small", device: str | None = None,
                 dtype: str = "float32", pooling: str | None = None, normalize_embeddings: bool = True,
                 loaded: LoadedModel | None = None, backend: str | None = None, device_id: int | None = None):
        self.device = set_device(device, device_id)
        lm = loaded if loaded is not None else resolve(model_name_or_path)
        self.source = lm.source
        self.config: M3Config = lm.config
        if pooling is not None:
            self.config.pooling = pooling
        self.normalize_embeddings = normalize_embeddings
        self.query_instruction, self.passage_instruction = lm.instructions
        self.tokenizer = M3Tokenizer.from_file(lm.tokenizer_path)
        self.encoder = M3Encoder(self.config)
        load_hf_state(self.encoder, lm.encoder_state, share_memory=loaded is None)  # resolve()'s arrays: no copy
        if DTYPES.get(dtype) == ms.bfloat16 and self.device == "CPU":
            raise ValueError("dtype='bfloat16' needs device='Ascend' or 'GPU': MindSpore's CPU backend has no "
                             "bfloat16 matrix multiply; use float32 (or float16) on CPU")
        self.dtype = dtype
        cast_encoder(self.encoder, dtype)
        self.encoder.set_train(False)
        self.backend = select_backend(backend, self.device, dtype, self.config)
        if dtype == "int8":
            self.encoder.quantize_int8()
        self.encoder.use_cpu_kernels = self.backend == "kernels"
        self.heads = None
        if lm.heads_state is not None:
            self.heads = M3Heads(self.config.hidden_size, lm.heads_state["colbert_linear.weight"].shape[0])
            self.load_heads(lm.heads_state)
        self.special_ids = (self.config.bos_token_id, self.config.eos_token_id,
                            self.config.pad_token_id, self.config.unk_token_id)

    # ------------------------------------------------------------------ weights
    def load_heads(self, heads_state: dict) -> None:
        H = self.config.hidden_size
        expected = {"colbert_linear.weight": (self.heads.colbert_linear.weight.shape[0], H),
                    "colbert_linear.bias": (self.heads.colbert_linear.weight.shape[0],),
                    "sparse_linear.weight": (1, H), "sparse_linear.bias": (1,)}
        for name, shape in expected.items():
            if name not in heads_state:
                raise ValueError(f"head weights have no tensor {name!r}")
            arr = np.asarray(heads_state[name], dtype=np.float32)
            if arr.shape != shape:
                raise ValueError(f"head tensor {name!r} has shape {arr.shape}, the model expects {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"head tensor {name!r} contains NaN or inf")
            cell = getattr(self.heads, name.split(".")[0])
            getattr(cell, name.split(".")[1]).set_data(Tensor(arr))

    def heads_state(self) -> dict[str, np.ndarray]:
        if self.heads is None:
            return {}
        return {f"{c}.{p}": getattr(getattr(self.heads, c), p).asnumpy()
                for c in ("colbert_linear", "sparse_linear") for p in ("weight", "bias")}

    def encoder_state(self) -> dict[str, np.ndarray]:
        from .encoder import hf_to_encoder_names
        if self.encoder.int8:
            raise ValueError("an int8 model holds quantised weights only: save the float32 model instead")
        params = {p.name: p.asnumpy().astype(np.float32) for p in self.encoder.get_parameters()}
        return {hf: params[ours] for ours, hf in hf_to_encoder_names(self.config).items()}

    def save_pretrained(self, path: str | Path, tokenizer_path: str | Path | None = None) -> Path:
        """Write config.json, model.safetensors, heads.safetensors (and the tokenizer) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_state_dict(self.encoder_state(), path / "model.safetensors")
        if self.heads is not None:
            save_state_dict(self.heads_state(), path / "heads.safetensors")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, path / "tokenizer.json")
        if self.query_instruction:
            (path / "e5_prefixes").write_text(json.dumps([self.query_instruction, self.passage_instruction]))
        return path

    def resolve_max_length(self, max_length: int | None = None) -> int:
        """``None`` -> the model's maximum (8192 for BGE-M3, 512 for e5); an integer >= 2 is kept, and one
        beyond the position table is cut to it with a warning (as a tokenizer with ``model_max_length``
        does: ``encode(..., max_length=8192)`` on a 512-position model encodes 512 tokens)."""
        if max_length is None:
            return self.config.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (room for <s> and </s>), got {max_length!r}")
        if max_length > self.config.max_length:
            warnings.warn(f"max_length={max_length} exceeds the model's position table: texts are cut at "
                          f"{self.config.max_length} tokens", stacklevel=3)
            return self.config.max_length
        return int(max_length)

    # ------------------------------------------------------------------ forward
    def _forward(self, input_ids: np.ndarray, mask: np.ndarray, dense: bool, sparse: bool, colbert: bool):
        """One padded batch -> dense [B,H] / lexical dicts / colbert list (NumPy).

        The encoder returns only the attended tokens, packed [T, H] with offsets [B+1]; the paper-named
        heads of :mod:`bgem3_lib.model.heads` read them: ``dense_embedding`` (CLS or mean),
        ``sparse_embedding`` (one weight per token), ``colbert_embedding`` (tokens 1..n-1)."""
        if (sparse or colbert) and self.heads is None:
            raise ValueError(f"model {self.source!r} has no sparse/ColBERT heads (dense only); "
                             "load 'm3-small' or a BGE-M3 directory with colbert_linear.pt/sparse_linear.pt")
        run_encoder = getattr(self, "_encoder_pass", None) or self.encoder.forward_packed   # model.shared_encoder
        packed, offsets = run_encoder(input_ids, mask)                          # [T, H], [B+1]
        out = {}
        if dense:
            if self.config.pooling == "cls":                                   # gather B rows, not T
                states, offs = ops.gather(packed, Tensor(offsets[:-1]), 0).asnumpy(), np.arange(len(offsets))
            else:
                states, offs = packed.asnumpy(), offsets
            out["dense"] = dense_embedding(states, offs, self.config.pooling, self.normalize_embeddings)
        if sparse:
            weights = self.heads.sparse_weights(packed).asnumpy()             # [T]: O(T), never T*V
            out["sparse"] = sparse_embedding(weights, input_ids[mask.astype(bool)], offsets, self.special_ids)
        if colbert:
            lin = self.heads.colbert_linear
            vecs = (cpu_kernels.linear(packed, lin.weight, lin.bias) if self.encoder.cpu_kernels_ready()
                    else self.heads.colbert_states(packed)).asnumpy()          # [T, D]
            out["colbert"] = colbert_embedding(vecs, offsets, self.normalize_embeddings)
        return out

    def encode(self, sentences: str | Sequence[str], batch_size: int = 256, max_length: int | None = None,
               return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False,
               sort_by_length: bool = True, show_progress: bool | None = None) -> dict:
        """Encode texts. Returns ``dense_vecs`` [N, H], ``lexical_weights`` (list of dict),
        ``colbert_vecs`` (list of [n_i, H]) in input order (a single string gives single items)."""
        single = isinstance(sentences, str)
        texts = check_texts(sentences)
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise ValueError("choose at least one of return_dense, return_sparse, return_colbert_vecs")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenizer.encode_ids(texts, self.resolve_max_length(max_length))
        order = np.argsort([-len(x) for x in ids], kind="stable") if sort_by_length else np.arange(len(ids))
        dense, lexical, colbert = [None] * len(ids), [None] * len(ids), [None] * len(ids)
        starts = range(0, len(ids), batch_size)
        show = show_progress if show_progress is not None else len(starts) > 2
        with spinning_threads_idle():
            for s in tqdm(starts, desc="encode", disable=not show):
                idx = order[s:s + batch_size]
                input_ids, mask = self.tokenizer.pad([ids[i] for i in idx])
                out = self._forward(input_ids, mask, return_dense, return_sparse, return_colbert_vecs)
                for j, i in enumerate(idx):
                    if return_dense:
                        dense[i] = out["dense"][j]
                    if return_sparse:
                        lexical[i] = out["sparse"][j]
                    if return_colbert_vecs:
                        colbert[i] = out["colbert"][j]
        result = {"dense_vecs": np.stack(dense) if return_dense else None,
                  "lexical_weights": lexical if return_sparse else None,
                  "colbert_vecs": colbert if return_colbert_vecs else None}
        if single:
            result = {k: (v[0] if v is not None else None) for k, v in result.items()}
        return result

    def encode_queries(self, queries, **kw) -> dict:
        """``encode`` with the model's query prefix (``"query: "`` for e5, none for BGE-M3)."""
        return self.encode(self._prefix(queries, self.query_instruction), **kw)

    def encode_corpus(self, passages, **kw) -> dict:
        return self.encode(self._prefix(passages, self.passage_instruction), **kw)

    @staticmethod
    def _prefix(texts, prefix: str):
        if isinstance(texts, str):
            return prefix + texts
        return [prefix + t if isinstance(t, str) else t for t in check_texts(texts)]

    # ------------------------------------------------------------------ scoring
    def compute_score(self, sentence_pairs, batch_size: int = 256, max_query_length: int | None = None,
                      max_passage_length: int | None = None, weights_for_different_modes=None) -> dict:
        """Score (query, passage) pairs in all modes, as FlagEmbedding's ``compute_score``.

        Returns {mode: list of float} under the library's mode names (:data:`~bgem3_lib.retrieval.modes.MODES`)
        and FlagEmbedding's spellings of the same lists (``sparse+dense``, ``colbert+sparse+dense``):
        ``dense+sparse`` = (w_d*dense + w_s*sparse)/(w_d + w_s), ``all`` =
        (w_d*dense + w_s*sparse + w_c*colbert)/(w_d + w_s + w_c) (:func:`~bgem3_lib.retrieval.modes.fuse`).
        ``weights_for_different_modes`` = [w_dense, w_sparse, w_colbert], default [1, 1, 1], validated by
        :func:`~bgem3_lib.retrieval.modes.check_weights` (finite, >= 0, not all zero).
        As in the official code, within a batch a passage shorter than the longest one also
        "sees" zero padding vectors, so a ColBERT max-sim below 0 is floored at 0 for it.
        """
        if (isinstance(sentence_pairs, (tuple, list)) and len(sentence_pairs) == 2
                and all(isinstance(s, str) for s in sentence_pairs)):          # one pair, as FlagEmbedding reads it
            sentence_pairs, single = [sentence_pairs], True
        else:
            single = False
        if not isinstance(sentence_pairs, (list, tuple)) or len(sentence_pairs) == 0:
            raise ValueError("sentence_pairs must be a non-empty list of (query, passage) pairs")
        for i, p in enumerate(sentence_pairs):
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise ValueError(f"sentence_pairs[{i}] is not a (query, passage) pair: {p!r:.80}")
        w = check_weights((1.0, 1.0, 1.0) if weights_for_different_modes is None else weights_for_different_modes,
                          name="weights_for_different_modes")
        max_query_length = min(512, self.config.max_length) if max_query_length is None else max_query_length
        max_query_length = self.resolve_max_length(max_query_length)
        max_passage_length = self.resolve_max_length(max_passage_length)
        raw = {"dense": [], "sparse": [], "colbert": []}
        for s in range(0, len(sentence_pairs), batch_size):
            batch = sentence_pairs[s:s + batch_size]
            kw = dict(batch_size=len(batch), return_sparse=True, return_colbert_vecs=True, show_progress=False)
            q = self.encode([p[0] for p in batch], max_length=max_query_length, **kw)
            p = self.encode([p[1] for p in batch], max_length=max_passage_length, **kw)
            longest = max(len(v) for v in p["colbert_vecs"])
            for i in range(len(batch)):
                pv = p["colbert_vecs"][i]
                if len(pv) < longest:
                    pv = np.vstack([pv, np.zeros((1, pv.shape[1]), pv.dtype)])
                raw["dense"].append(float(np.dot(q["dense_vecs"][i], p["dense_vecs"][i])))
                raw["sparse"].append(float(lexical_matching_score(q["lexical_weights"][i], p["lexical_weights"][i])))
                raw["colbert"].append(float(colbert_score(q["colbert_vecs"][i], pv)))
        fused = fuse_all(w, **{k: np.asarray(v, np.float64) for k, v in raw.items()}, normalize=True)
        scores = {}
        for mode, values in fused.items():
            scores[mode] = scores[FLAGEMBEDDING_KEYS[mode]] = [float(x) for x in values]
        if single:
            return {k: v[0] for k, v in scores.items()}
        return scores
