"""``BGEM3FlagModel``: FlagEmbedding 1.4.2's BGE-M3 interface on :class:`~bgem3_lib.model.bgem3.BGEM3`.

Code written for FlagEmbedding runs with one changed import::

    from bgem3_lib import BGEM3FlagModel            # was: from FlagEmbedding import BGEM3FlagModel
    model = BGEM3FlagModel("/models/bge-m3", use_fp16=True)

The constructor takes FlagEmbedding's parameters with its defaults (``batch_size=256``, query and passage
``max_length`` 512, ``return_dense=True``), and the methods users call keep their signatures:
``encode``, ``encode_queries``, ``encode_corpus``, ``compute_score`` (FlagEmbedding's five keys),
``compute_lexical_matching_score``, ``colbert_score``, ``convert_id_to_token``. How each argument maps:

* ``use_fp16`` / ``use_bf16``: float16 / bfloat16 on GPU and Ascend. On CPU FlagEmbedding loads the weights
  in half precision and then computes in float32 (``model.float()``); so does this class: the weights are
  rounded to float16 / bfloat16 once and the model runs float32 (``use_fp16=False`` keeps them exact).
* ``devices``: ``None`` (``$BGEM3_DEVICE``, else CPU), ``"cpu"``, ``"cuda[:i]"`` or an int (GPU i),
  ``"npu[:i]"`` (Ascend i). Several devices need one process each: run the script under ``msrun``
  (worker ``r`` takes ``devices[r]``); in one plain process a list of several is an error.
* ``pooling_method``: ``"cls"`` or ``"mean"``; ``None`` (this class's default) keeps the model's own
  pooling, which for BGE-M3 is FlagEmbedding's ``"cls"`` (M3-small pools by mean).
* ``query_instruction_for_retrieval`` + ``query_instruction_format`` prefix queries as in FlagEmbedding;
  when no instruction is given, the model's own prefix is used (none for BGE-M3, ``"query: "`` for e5).
  ``passage_instruction_for_retrieval`` / ``passage_instruction_format`` (keyword arguments) likewise.
* ``truncate_dim`` cuts dense and ColBERT vectors, re-normalised when ``normalize_embeddings``.
* ``colbert_dim``: -1 or the checkpoint's ColBERT width (another value is an error: the weights fix it).
* ``cache_dir`` and ``trust_remote_code``: nothing is ever downloaded or run from a model folder here,
  so they cannot be honoured; passing them warns once. Unknown keyword arguments warn once too.

``max_length`` beyond the model's positions is cut to the position table with a warning. Outputs are
NumPy arrays (``convert_to_numpy=False`` is an error: there is no torch tensor to return).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..retrieval.modes import FLAGEMBEDDING_KEYS, HYBRID_MODES
from ..retrieval.scoring import colbert_score as _colbert_score
from ..retrieval.scoring import lexical_matching_score
from .bgem3 import BGEM3
from .heads import l2_normalize

_COMPAT_KWARGS = ("passage_instruction_for_retrieval", "passage_instruction_format", "convert_to_numpy")
_DEVICE_PREFIXES = {"cpu": "CPU", "cuda": "GPU", "gpu": "GPU", "npu": "Ascend", "ascend": "Ascend"}


def parse_devices(devices, env: Mapping[str, str] | None = None) -> tuple[str | None, int | None]:
    """FlagEmbedding's ``devices`` -> (MindSpore device or None for the default, device id or None).

    >>> parse_devices("cuda:1"), parse_devices(None), parse_devices("cpu")
    (('GPU', 1), (None, None), ('CPU', None))
    >>> parse_devices(["npu:0", "npu:1"], {"RANK_ID": "1", "RANK_SIZE": "2"})     # msrun worker 1 of 2
    ('Ascend', 1)
    """
    env = os.environ if env is None else env
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise ValueError("devices is an empty list")
        world = int(env.get("RANK_SIZE", env.get("MS_WORKER_NUM", "1")) or 1)
        if len(devices) > 1 and world != len(devices):
            raise ValueError(f"devices={list(devices)!r} asks for {len(devices)} devices: bgem3_lib runs one process "
                             f"per device; launch the script with `msrun --worker_num={len(devices)} "
                             f"--local_worker_num={len(devices)} ...` (worker r takes devices[r]), or pass one device")
        devices = devices[int(env.get("RANK_ID", "0") or 0)] if len(devices) > 1 else devices[0]
    if devices is None:
        return None, None
    if isinstance(devices, bool) or not isinstance(devices, (str, int, np.integer)):
        raise ValueError(f"devices must be a string, an integer or a list of them, got {devices!r}")
    if isinstance(devices, (int, np.integer)):
        return "GPU", int(devices)
    name, _, index = devices.strip().lower().partition(":")
    if name not in _DEVICE_PREFIXES or (index and not index.isdigit()):
        raise ValueError(f"unknown device {devices!r}; use 'cpu', 'cuda:<i>' (GPU) or 'npu:<i>' (Ascend)")
    device = _DEVICE_PREFIXES[name]
    return device, (int(index) if index and device != "CPU" else None)


def round_weights(model: BGEM3, dtype: str) -> None:
    """Round every encoder and head parameter of ``model`` to ``dtype`` (float16 / bfloat16) and back to
    float32 in place: what FlagEmbedding's half-precision load followed by ``model.float()`` computes with."""
    import mindspore as ms
    target = {"float16": ms.float16, "bfloat16": ms.bfloat16}[dtype]
    cells = [model.encoder] + ([model.heads] if model.heads is not None else [])
    for cell in cells:
        for p in cell.get_parameters():
            if p.dtype == ms.float32:
                p.set_data(p.data.astype(target).astype(ms.float32))


class BGEM3FlagModel:
    """FlagEmbedding 1.4.2's ``BGEM3FlagModel`` constructor and methods over :class:`BGEM3` (module docstring)."""

    def __init__(self, model_name_or_path: str, normalize_embeddings: bool = True, use_fp16: bool = True,
                 use_bf16: bool = False, query_instruction_for_retrieval: str | None = None,
                 query_instruction_format: str = "{}{}", devices=None, pooling_method: str | None = None,
                 trust_remote_code: bool = False, cache_dir: str | None = None, colbert_dim: int = -1,
                 batch_size: int = 256, query_max_length: int = 512, passage_max_length: int = 512,
                 return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False,
                 truncate_dim: int | None = None, **kwargs: Any):
        self._warn_unused(kwargs, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
        device, device_id = parse_devices(devices)
        if pooling_method not in (None, "cls", "mean"):
            raise ValueError(f"pooling_method must be 'cls' or 'mean' (or None: the model's own), "
                             f"got {pooling_method!r}")
        from .runtime import canonical_device
        half = canonical_device(device) != "CPU"            # FlagEmbedding runs float32 on CPU whatever it is asked
        dtype = "bfloat16" if use_bf16 and half else "float16" if use_fp16 and half else "float32"
        self.model = BGEM3(model_name_or_path, device=device, device_id=device_id, dtype=dtype,
                           pooling=pooling_method, normalize_embeddings=normalize_embeddings)
        if not half and (use_fp16 or use_bf16):
            round_weights(self.model, "bfloat16" if use_bf16 else "float16")
        if colbert_dim not in (-1, None) and self.model.heads is not None:
            width = self.model.heads.colbert_linear.weight.shape[0]
            if int(colbert_dim) != width:
                raise ValueError(f"colbert_dim={colbert_dim} but the checkpoint's colbert_linear has {width} outputs")
        for name, value in (("batch_size", batch_size), ("query_max_length", query_max_length),
                            ("passage_max_length", passage_max_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or truncate_dim < 1
                                         or not isinstance(truncate_dim, (int, np.integer))):
            raise ValueError(f"truncate_dim must be a positive integer or None, got {truncate_dim!r}")
        self.normalize_embeddings, self.truncate_dim = normalize_embeddings, truncate_dim
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_retrieval = kwargs.get("passage_instruction_for_retrieval")
        self.passage_instruction_format = kwargs.get("passage_instruction_format", "{}{}")
        self.batch_size = batch_size
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.return_dense, self.return_sparse = return_dense, return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        self.tokenizer = self.model.tokenizer

    @staticmethod
    def _warn_unused(kwargs: Mapping, **named) -> None:
        if named.get("cache_dir") is not None:
            warnings.warn("cache_dir is where FlagEmbedding keeps Hugging Face Hub downloads; bgem3_lib downloads "
                          "nothing (pass a local directory or a bgem3_lib model name), so it is ignored", stacklevel=3)
        if named.get("trust_remote_code"):
            warnings.warn("trust_remote_code=True has no effect: bgem3_lib never runs code from a model folder",
                          stacklevel=3)
        unknown = sorted(set(kwargs) - set(_COMPAT_KWARGS) - {"instruction", "instruction_format"})
        if unknown:
            warnings.warn(f"BGEM3FlagModel ignores the keyword argument(s) {unknown}: FlagEmbedding passes them to "
                          "its tokenizer or model, which bgem3_lib does not have", stacklevel=3)
        if kwargs.get("convert_to_numpy", True) is False:
            raise ValueError("convert_to_numpy=False asks for torch tensors: bgem3_lib returns NumPy arrays only")

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _instruct(texts, instruction: str | None, instruction_format: str):
        if instruction is None:
            return texts
        fmt = instruction_format.replace("\\n", "\n")
        return fmt.format(instruction, texts) if isinstance(texts, str) else [fmt.format(instruction, t) for t in texts]

    def _encode(self, fn, texts, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs) -> dict:
        out = fn(texts, batch_size=self.batch_size if batch_size is None else batch_size, max_length=max_length,
                 return_dense=self.return_dense if return_dense is None else return_dense,
                 return_sparse=self.return_sparse if return_sparse is None else return_sparse,
                 return_colbert_vecs=self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs)
        if self.truncate_dim is not None:
            norm = l2_normalize if self.normalize_embeddings else (lambda x: x)
            if out["dense_vecs"] is not None:
                out["dense_vecs"] = norm(out["dense_vecs"][..., :self.truncate_dim])
            if out["colbert_vecs"] is not None:
                cut = out["colbert_vecs"]
                out["colbert_vecs"] = (norm(cut[..., :self.truncate_dim]) if isinstance(cut, np.ndarray)
                                       else [norm(v[..., :self.truncate_dim]) for v in cut])
        return out

    def encode(self, sentences, batch_size: int | None = None, max_length: int | None = None,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None, **kwargs: Any) -> dict:
        """``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` of ``sentences`` (passage max length by default;
        ``instruction`` / ``instruction_format`` keywords prefix them as FlagEmbedding's ``encode`` does)."""
        self._warn_unused(kwargs)
        texts = self._instruct(sentences, kwargs.get("instruction"), kwargs.get("instruction_format") or "{}{}")
        return self._encode(self.model.encode, texts, batch_size,
                            self.passage_max_length if max_length is None else max_length,
                            return_dense, return_sparse, return_colbert_vecs)

    def _encode_side(self, texts, own_prefix_fn, instruction, instruction_format, default_max_length,
                     batch_size, max_length, flags, kwargs) -> dict:
        """Queries or passages: the instruction when one is set, else the model's own prefix (``own_prefix_fn``)."""
        self._warn_unused(kwargs)
        max_length = default_max_length if max_length is None else max_length
        if instruction is None:
            return self._encode(own_prefix_fn, texts, batch_size, max_length, *flags)
        return self._encode(self.model.encode, self._instruct(texts, instruction, instruction_format), batch_size,
                            max_length, *flags)

    def encode_queries(self, queries, batch_size: int | None = None, max_length: int | None = None,
                       return_dense: bool | None = None, return_sparse: bool | None = None,
                       return_colbert_vecs: bool | None = None, **kwargs: Any) -> dict:
        """``encode`` with the query instruction (or the model's query prefix) and ``query_max_length``."""
        return self._encode_side(queries, self.model.encode_queries, self.query_instruction_for_retrieval,
                                 self.query_instruction_format, self.query_max_length, batch_size, max_length,
                                 (return_dense, return_sparse, return_colbert_vecs), kwargs)

    def encode_corpus(self, corpus, batch_size: int | None = None, max_length: int | None = None,
                      return_dense: bool | None = None, return_sparse: bool | None = None,
                      return_colbert_vecs: bool | None = None, **kwargs: Any) -> dict:
        """``encode`` with the passage instruction (or the model's passage prefix) and ``passage_max_length``."""
        return self._encode_side(corpus, self.model.encode_corpus, self.passage_instruction_for_retrieval,
                                 self.passage_instruction_format, self.passage_max_length, batch_size, max_length,
                                 (return_dense, return_sparse, return_colbert_vecs), kwargs)

    # ------------------------------------------------------------------ scoring
    def compute_score(self, sentence_pairs, batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None, weights_for_different_modes=None, **kwargs: Any):
        """FlagEmbedding's five score lists (``colbert``, ``sparse``, ``dense``, ``sparse+dense``,
        ``colbert+sparse+dense``) of (query, passage) pairs; one pair gives floats, an empty list ``[]``."""
        self._warn_unused(kwargs)
        if isinstance(sentence_pairs, list) and len(sentence_pairs) == 0:
            return []
        scores = self.model.compute_score(
            sentence_pairs, batch_size=self.batch_size if batch_size is None else batch_size,
            max_query_length=self.query_max_length if max_query_length is None else max_query_length,
            max_passage_length=self.passage_max_length if max_passage_length is None else max_passage_length,
            weights_for_different_modes=weights_for_different_modes)
        keys = ["colbert", "sparse", "dense", *HYBRID_MODES]
        return {FLAGEMBEDDING_KEYS[m]: scores[m] for m in keys}

    def compute_lexical_matching_score(self, lexical_weights_1, lexical_weights_2):
        """Two dicts -> their lexical score (float); two lists of dicts -> the score matrix [N1, N2]."""
        if isinstance(lexical_weights_1, Mapping) and isinstance(lexical_weights_2, Mapping):
            return lexical_matching_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[lexical_matching_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise ValueError("lexical weights must be two dicts {token_id: weight} or two lists of such dicts, got "
                         f"{type(lexical_weights_1).__name__} and {type(lexical_weights_2).__name__}")

    def colbert_score(self, q_reps, p_reps) -> np.float32:
        """Multi-vector score of query vectors [n, D] against passage vectors [m, D]."""
        return np.float32(_colbert_score(q_reps, p_reps))

    def convert_id_to_token(self, lexical_weights):
        """``{token_id: weight}`` (or a list of them) -> ``{token text: weight}``; one dict in, one dict out,
        and a list of one dict also gives one dict, as in FlagEmbedding."""
        items = [lexical_weights] if isinstance(lexical_weights, Mapping) else list(lexical_weights)
        out = [{self.tokenizer.decode([int(i)]): w for i, w in item.items()} for item in items]
        return out[0] if len(out) == 1 else out


__all__ = ["BGEM3FlagModel", "parse_devices"]
