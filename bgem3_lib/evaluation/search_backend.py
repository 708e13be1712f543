"""Where an evaluation searches: in process memory (default) or a persistent Milvus index.

``SearchBackend("memory")`` builds a :class:`~bgem3_lib.retrieval.retriever.HybridRetriever` from the corpus
encodings, as every run did so far. ``SearchBackend("milvus", uri=..., token=...)`` ingests the same
encodings (idempotent, resumable: :meth:`~bgem3_lib.retrieval.milvus_index.MilvusIndex.ingest`) into the
collection of this (corpus, encodings) pair and searches it with
:class:`~bgem3_lib.retrieval.milvus_retriever.MilvusRetriever`; the collection is keyed by the encoding
cache's key (model fingerprint, corpus, max_length, dtype), so any change of model or settings gets its own.
Both rank identically with exact (FLAT) indexes.

>>> SearchBackend("memory").kind, SearchBackend("milvus", uri="http://db:19530").uri
('memory', 'http://db:19530')
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..model.fingerprint import model_fingerprint
from ..retrieval.index import VOCAB_SIZE
from ..retrieval.milvus_index import DENSE_KINDS, MilvusIndex, collection_name, connect
from ..retrieval.milvus_retriever import MilvusRetriever
from ..retrieval.retriever import HybridRetriever
from .corpus_cache import cache_key, corpus_fingerprint

KINDS = ("memory", "milvus")


@dataclass(frozen=True)
class SearchBackend:
    kind: str = "memory"
    uri: str | None = None            # Milvus: None -> $BGEM3_MILVUS_URI or the embedded Lite database
    token: str | None = None
    dense_kind: str = "flat"          # Milvus dense index: "flat" (exact) or "hnsw"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {self.kind!r}")
        if self.dense_kind not in DENSE_KINDS:
            raise ValueError(f"dense index kind must be one of {DENSE_KINDS}, got {self.dense_kind!r}")
        if self.kind == "memory" and (self.uri or self.token):
            raise ValueError("a Milvus URI or token was given, but the index is 'memory' (use --index milvus)")

    def check(self) -> None:
        """Fail now (before any model load or encoding) if the Milvus URI cannot be reached."""
        if self.kind == "milvus":
            connect(self.uri, self.token)

    def needs(self) -> tuple[str, ...]:
        """Representations the backend itself stores (Milvus: dense and sparse)."""
        return ("dense", "sparse") if self.kind == "milvus" else ()

    def retriever(self, model, docids: Sequence[str], texts: Sequence[str], enc: Mapping, lang: str,
                  max_length: int) -> HybridRetriever:
        vocab = getattr(model.tokenizer, "vocab_size", VOCAB_SIZE)
        if self.kind == "memory":
            return HybridRetriever(enc, vocab_size=vocab)
        if enc.get("lexical_weights") is None:
            raise ValueError(f"the Milvus index stores dense and sparse vectors; model {model.source!r} gives "
                             "no lexical weights (a dense-only model): use --index memory")
        corpus_fp = corpus_fingerprint(docids, texts)
        key = cache_key(model_fingerprint(model), corpus_fp, max_length, model.dtype)
        meta = {"model": key, "corpus": corpus_fp, "n": len(docids), "dim": int(np.shape(enc["dense_vecs"])[1])}
        index = MilvusIndex(collection_name(corpus_fp, key), meta, uri=self.uri, token=self.token,
                            dense_kind=self.dense_kind)
        index.ingest(enc, docids, [lang] * len(docids))
        return MilvusRetriever(index, enc.get("colbert_vecs"), vocab_size=vocab)


MEMORY = SearchBackend()
