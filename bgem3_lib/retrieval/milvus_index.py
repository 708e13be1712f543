"""A persistent hybrid index on Milvus: the dense vectors and the lexical weights of one encoded corpus.

One collection per (corpus, model): :func:`collection_name` of their fingerprints. Fields:

==========  ========================  ============================================================
``id``      INT64, primary key        the corpus row (stable: an upsert of the same row replaces it)
``docid``   VARCHAR                   the corpus document id
``lang``    VARCHAR                   the corpus language ("" when not given)
``dense``   FLOAT_VECTOR [H]          ``dense_vecs``; index FLAT (exact, default) or HNSW, metric IP
``sparse``  SPARSE_FLOAT_VECTOR       ``lexical_weights`` {token id: weight}; SPARSE_INVERTED_INDEX, IP
==========  ========================  ============================================================

The collection's properties hold ``bgem3.meta`` (model and corpus fingerprints, row count, dimension): an
index built by another model or for another corpus is refused, not silently searched. Milvus Lite has no
multi-vector field, so ColBERT vectors stay in the encoding store.

The URI is ``$BGEM3_MILVUS_URI`` if set, else an embedded Milvus Lite database under
``$BGEM3_HOME/milvus/`` (:func:`default_uri`); ``http://host:19530`` (plus a token) is a Milvus server or
cluster, with nothing else changed. ``python -m milvus_lite server --data-dir D --port P`` serves a Lite
database over gRPC at ``http://127.0.0.1:P``.

MindSpore's generated protobuf modules need protobuf's pure-Python runtime, which a process fixes when it
first imports protobuf. So :func:`_pymilvus` imports the client under ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=
python`` unless the variable is set, and MindSpore can still load afterwards. A search-only process that
never loads MindSpore may set it to ``upb``: Milvus calls then decode about 3x faster (``benchmarks/milvus.py``).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from ..paths import cache_dir
from ..progress import tqdm

META_KEY = "bgem3.meta"
META_VERSION = 1
DENSE_KINDS = ("flat", "hnsw")
_MAX_TOPK = 16384                     # Milvus' limit on one search's limit


class MilvusIndexError(RuntimeError):
    """The Milvus index cannot serve this request (unreachable URI, another model's collection, ...)."""


def _pymilvus():
    """The ``pymilvus`` module, imported so that MindSpore can be imported later in this process."""
    if "google.protobuf" not in sys.modules:
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    import pymilvus
    return pymilvus


def default_uri() -> str:
    """``$BGEM3_MILVUS_URI``, else the embedded Milvus Lite database ``$BGEM3_HOME/milvus/bgem3.db``."""
    uri = os.environ.get("BGEM3_MILVUS_URI")
    if uri:
        return uri
    folder = cache_dir() / "milvus"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "bgem3.db")


def connect(uri: str | None = None, token: str | None = None):
    """A client for ``uri`` (default :func:`default_uri`) with ``token`` (default ``$BGEM3_MILVUS_TOKEN``),
    proven to answer -> ``(client, uri)``; :class:`MilvusIndexError` naming the URI otherwise."""
    uri = uri or default_uri()
    token = token if token is not None else os.environ.get("BGEM3_MILVUS_TOKEN", "")
    try:
        client = _pymilvus().MilvusClient(uri=uri, token=token, timeout=30)
        client.list_collections()
    except Exception as e:                                 # pymilvus raises its own MilvusException family
        raise MilvusIndexError(f"cannot reach Milvus at {uri!r}: {type(e).__name__}: {e}") from None
    return client, uri


def collection_name(corpus_fp: str, model_fp: str) -> str:
    """Milvus-safe collection name of a (corpus, model) pair of hex fingerprints.

    >>> collection_name("ab12" * 16, "cd34" * 16)
    'bgem3_ab12ab12ab12ab12_cd34cd34cd34cd34'
    """
    for what, fp in (("corpus", corpus_fp), ("model", model_fp)):
        if not fp or not all(c in "0123456789abcdef" for c in fp.lower()):
            raise ValueError(f"{what} fingerprint must be a hex string, got {fp!r}")
    return f"bgem3_{corpus_fp[:16].lower()}_{model_fp[:16].lower()}"


# Milvus stores no empty sparse vector; a passage without lexical weights gets this one token instead. No
# query holds it (token ids are < the vocabulary size), so it never scores, and reading strips it.
NO_TOKENS = 2**31 - 1


def lexical_to_milvus(weights: Mapping[str, float], stored: bool = False) -> dict[int, float]:
    """``{"6": 0.5}`` -> ``{6: 0.5}`` (Milvus' sparse vector), ascending token ids; ``stored=True`` marks an
    empty one with :data:`NO_TOKENS`.

    >>> lexical_to_milvus({"9": 0.25, "6": 0.5}), lexical_to_milvus({}, stored=True)
    ({6: 0.5, 9: 0.25}, {2147483647: 1.0})
    """
    out = {int(t): float(w) for t, w in sorted(weights.items(), key=lambda kv: int(kv[0]))}
    if stored and not out:
        return {NO_TOKENS: 1.0}
    if NO_TOKENS in out:
        raise ValueError(f"token id {NO_TOKENS} is reserved (it marks a passage without lexical weights)")
    return out


class MilvusIndex:
    """Dense + lexical index of one corpus in a Milvus collection (see the module docstring).

    ``meta``: ``{"model": fp, "corpus": fp, "n": rows, "dim": H}``, checked against a collection that
    exists and written into a new one. ``dense_kind``: "flat" (exact) or "hnsw" (``hnsw_m``,
    ``ef_construction``; searched with ``ef = max(ef_search, depth)``).
    """

    def __init__(self, name: str, meta: Mapping, uri: str | None = None, token: str | None = None,
                 dense_kind: str = "flat", hnsw_m: int = 16, ef_construction: int = 200, ef_search: int = 256):
        if dense_kind not in DENSE_KINDS:
            raise ValueError(f"dense_kind must be one of {DENSE_KINDS}, got {dense_kind!r}")
        missing = {"model", "corpus", "n", "dim"} - set(meta)
        if missing:
            raise ValueError(f"meta needs {sorted(missing)}")
        if int(meta["n"]) < 1:
            raise ValueError("empty corpus: nothing to index in Milvus")
        self.name, self.dense_kind, self.ef_search = name, dense_kind, int(ef_search)
        self.meta = {"version": META_VERSION, **{k: meta[k] for k in ("model", "corpus")},
                     "n": int(meta["n"]), "dim": int(meta["dim"]), "dense_kind": dense_kind}
        self.client, self.uri = connect(uri, token)
        if self.client.has_collection(name):
            self._check_meta()
        else:
            self._create(hnsw_m, ef_construction)
        self.client.load_collection(name)

    # ------------------------------------------------------------ collection
    def _create(self, hnsw_m: int, ef_construction: int) -> None:
        DataType = _pymilvus().DataType
        c = self.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("docid", DataType.VARCHAR, max_length=1024)
        schema.add_field("lang", DataType.VARCHAR, max_length=32)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=self.meta["dim"])
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        index = c.prepare_index_params()
        if self.dense_kind == "flat":
            index.add_index("dense", index_type="FLAT", metric_type="IP")
        else:
            index.add_index("dense", index_type="HNSW", metric_type="IP",
                            params={"M": int(hnsw_m), "efConstruction": int(ef_construction)})
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        c.create_collection(self.name, schema=schema, index_params=index)
        c.alter_collection_properties(self.name, properties={META_KEY: json.dumps(self.meta, sort_keys=True)})

    def stored_meta(self) -> dict:
        props = self.client.describe_collection(self.name).get("properties") or {}
        try:
            return json.loads(props.get(META_KEY, "{}"))
        except json.JSONDecodeError:
            return {}

    def _check_meta(self) -> None:
        have = self.stored_meta()
        if not have:
            raise MilvusIndexError(f"collection {self.name!r} at {self.uri!r} was not built by bgem3_lib "
                                   f"(no {META_KEY} property): choose another collection name or drop it")
        for key in ("model", "corpus", "dim", "n", "dense_kind"):
            if have.get(key) != self.meta[key]:
                what = {"model": "another model (fingerprint mismatch)", "corpus": "another corpus",
                        "dim": "another dense dimension", "n": "a corpus of another size",
                        "dense_kind": "another dense index kind"}[key]
                raise MilvusIndexError(f"collection {self.name!r} at {self.uri!r} holds {what}: stored "
                                       f"{key}={have.get(key)!r}, this one {self.meta[key]!r}. Drop it "
                                       "(MilvusIndex.drop) or use another collection")

    def drop(self) -> None:
        self.client.drop_collection(self.name)

    def count(self, lo: int | None = None, hi: int | None = None) -> int:
        """Rows stored (with ``lo``/``hi``: rows whose id lies in [lo, hi))."""
        expr = "" if lo is None else f"id >= {int(lo)} and id < {int(hi)}"
        res = self.client.query(self.name, filter=expr, output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    # ------------------------------------------------------------ ingest
    def ingest(self, encodings: Mapping, docids: Sequence[str], langs: Sequence[str] | None = None,
               batch_size: int = 1000, progress: bool = True) -> dict:
        """Upsert every corpus row (idempotent, by row id); batches already complete are skipped, so a
        killed ingest restarted ends with exactly the corpus. Returns ``{"upserted": rows, "skipped": rows}``.

        ``encodings``: ``dense_vecs`` [N, H] and ``lexical_weights`` (N dicts), e.g. the encoding store's.
        """
        dense, lexical = encodings.get("dense_vecs"), encodings.get("lexical_weights")
        if dense is None or lexical is None:
            raise ValueError("ingest needs dense_vecs and lexical_weights")
        n = self.meta["n"]
        if len(dense) != n or len(lexical) != n or len(docids) != n or (langs is not None and len(langs) != n):
            raise ValueError(f"this index holds {n} rows: got {len(dense)} dense vectors, {len(lexical)} "
                             f"lexical weights, {len(docids)} docids"
                             + ("" if langs is None else f", {len(langs)} langs"))
        if np.shape(dense)[1] != self.meta["dim"]:
            raise ValueError(f"dense dimension {np.shape(dense)[1]} != the collection's {self.meta['dim']}")
        done = self.count()
        stats = {"upserted": 0, "skipped": 0}
        with tqdm(total=n, desc=f"milvus ingest {self.name}", unit="passage", disable=not progress) as bar:
            for s in range(0, n, batch_size):
                e = min(n, s + batch_size)
                if done and self.count(s, e) == e - s:
                    stats["skipped"] += e - s
                    bar.update(e - s)
                    continue
                vecs = np.asarray(dense[s:e], np.float32)
                if not np.isfinite(vecs).all():
                    raise ValueError(f"dense_vecs rows {s}..{e - 1} hold NaN or inf")
                rows = [{"id": i, "docid": str(docids[i]), "lang": "" if langs is None else str(langs[i]),
                         "dense": vecs[i - s].tolist(), "sparse": lexical_to_milvus(lexical[i], stored=True)}
                        for i in range(s, e)]
                self.client.upsert(self.name, rows)
                stats["upserted"] += e - s
                bar.update(e - s)
        self.client.flush(self.name)
        got = self.count()
        if got != n:
            raise MilvusIndexError(f"collection {self.name!r} holds {got} rows after ingest, expected {n}")
        return stats

    # ------------------------------------------------------------ search primitives
    def _search(self, data: list, field: str, depth: int, params: dict) -> list[list]:
        hits = []
        for s in range(0, len(data), 256):
            hits += self.client.search(self.name, data=data[s:s + 256], anns_field=field, limit=depth,
                                       output_fields=["id"], search_params={"metric_type": "IP", **params})
        return hits

    @staticmethod
    def _ids(hits: list[list], depth: int) -> np.ndarray:
        out = np.full((len(hits), depth), -1, np.int64)
        for i, row in enumerate(hits):
            ids = [h["id"] for h in row][:depth]
            out[i, :len(ids)] = ids
        return out

    def _depth(self, depth: int) -> int:
        depth = min(int(depth), self.meta["n"])
        if depth > _MAX_TOPK:
            raise ValueError(f"Milvus returns at most {_MAX_TOPK} hits per search, asked for {depth}")
        return depth

    def dense_top(self, q_dense: np.ndarray, depth: int) -> np.ndarray:
        """Dense top-``depth`` row ids per query [Nq, depth] (-1 = none)."""
        depth = self._depth(depth)
        q = np.asarray(q_dense, np.float32)
        if q.ndim != 2 or q.shape[1] != self.meta["dim"]:
            raise ValueError(f"query dense vectors must be [Nq, {self.meta['dim']}], got {q.shape}")
        params = {"params": {"ef": max(self.ef_search, depth)}} if self.dense_kind == "hnsw" else {}
        return self._ids(self._search([v.tolist() for v in q], "dense", depth, params), depth)

    def sparse_top(self, q_lexical: Sequence[Mapping[str, float]], depth: int) -> np.ndarray:
        """Lexical top-``depth`` row ids per query [Nq, depth]. Milvus returns only passages sharing a token
        with the query; the rest of the ``depth`` slots take the lowest rows it did not return (score 0,
        ties by row: what an exhaustive search ranks there)."""
        depth = self._depth(depth)
        data = [lexical_to_milvus(w) for w in q_lexical]
        live = [i for i, d in enumerate(data) if d]
        out = np.full((len(data), depth), -1, np.int64)
        if live:
            out[live] = self._ids(self._search([data[i] for i in live], "sparse", depth, {}), depth)
        for row in out:
            hits = row[row >= 0]
            if len(hits) < depth:
                row[len(hits):] = np.setdiff1d(np.arange(depth + len(hits)), hits)[:depth - len(hits)]
        return out

    def vectors(self, ids: np.ndarray, dense: bool = True, lexical: bool = True
                ) -> tuple[np.ndarray | None, list[dict[int, float]] | None]:
        """Stored (dense [U, H] float32, lexical dicts) of ``ids``, in the given order; only the fields
        asked for are read (None for the others)."""
        ids = [int(i) for i in ids]
        fields = ["id"] + ["dense"] * dense + ["sparse"] * lexical
        if not (dense or lexical):
            return None, None
        got = {}
        for s in range(0, len(ids), 1000):
            for row in self.client.get(self.name, ids=ids[s:s + 1000], output_fields=fields):
                got[int(row["id"])] = row
        missing = [i for i in ids if i not in got]
        if missing:
            raise MilvusIndexError(f"collection {self.name!r} lacks rows {missing[:5]}: ingest it again")
        vecs = np.asarray([got[i]["dense"] for i in ids], np.float32).reshape(len(ids), self.meta["dim"]) \
            if dense else None
        lex = [{t: w for t, w in got[i]["sparse"].items() if t != NO_TOKENS} for i in ids] if lexical else None
        return vecs, lex

    def milvus_hybrid(self, q_dense: np.ndarray, q_lexical: Sequence[Mapping[str, float]], k: int,
                      ranker: str, weights: Sequence[float] = (1.0, 0.3), depth: int = 1000,
                      rrf_k: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """Milvus' own fusion of its dense and sparse top-``depth``: ``ranker`` "weighted"
        (``WeightedRanker``, which normalises each score before weighting) or "rrf" (``RRFRanker``).
        -> (ids [Nq, k] int64, Milvus' fused scores [Nq, k] float32)."""
        pm = _pymilvus()
        AnnSearchRequest, RRFRanker, WeightedRanker = pm.AnnSearchRequest, pm.RRFRanker, pm.WeightedRanker
        if ranker not in ("weighted", "rrf"):
            raise ValueError(f"ranker must be 'weighted' or 'rrf', got {ranker!r}")
        depth, k = self._depth(depth), min(int(k), self.meta["n"])
        q_dense = np.asarray(q_dense, np.float32)
        ids = np.full((len(q_dense), k), -1, np.int64)
        scores = np.full((len(q_dense), k), -np.inf, np.float32)
        has_tokens = [bool(ql) for ql in q_lexical]                         # one hybrid_search per group and
        groups = [([i for i, t in enumerate(has_tokens) if t], True), ([i for i, t in enumerate(has_tokens) if not t],
                                                                        False)]
        for rows, lexical in groups:                                        # block of queries, not per query
            for s in range(0, len(rows), 256):
                block = rows[s:s + 256]
                reqs = [AnnSearchRequest(data=[q_dense[i].tolist() for i in block], anns_field="dense",
                                         param={"metric_type": "IP"}, limit=depth)]
                if lexical:
                    reqs.append(AnnSearchRequest(data=[lexical_to_milvus(q_lexical[i]) for i in block],
                                                 anns_field="sparse", param={"metric_type": "IP"}, limit=depth))
                rank = (WeightedRanker(*[float(w) for w in weights[:len(reqs)]]) if ranker == "weighted"
                        else RRFRanker(rrf_k))
                hits = self.client.hybrid_search(self.name, reqs=reqs, ranker=rank, limit=k, output_fields=["id"])
                for i, row in zip(block, hits):
                    ids[i, :len(row)] = [h["id"] for h in row]
                    scores[i, :len(row)] = [h["distance"] for h in row]
        return ids, scores
