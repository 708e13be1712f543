"""Benchmark: the in-memory HybridRetriever vs Milvus Lite (embedded file, and gRPC server on localhost), one run.

    .venv/bin/python benchmarks/milvus.py [--quick] [--queries 300] [--seed 0] [--scale-passages 2680000]
    .venv/bin/python benchmarks/milvus.py --report-only      # rewrite milvus.md from milvus.json

* Data: every TyDi QA GoldP passage of all 9 languages in one corpus (``load_task("tydi", lang)`` per
  language of ``TYDI_LANGS``; docids ``<lang>-pNNNN``, ``lang`` field set), encoded by the trained
  ``BGEM3("m3-small")`` through the on-disk encoding cache (``corpus_encodings``, max_length 512: a cache
  hit encodes nothing). ``--queries`` questions of those languages, drawn with ``--seed``, encoded with
  ``encode_queries`` (dense + sparse + ColBERT). ``--quick``: the first 2 languages only.
* Encoding (model load, cache, queries) runs in a child process; the measuring process never imports
  MindSpore, whose import forces the pure-Python protobuf runtime on the whole process (its generated
  ``*_pb2`` modules need it) and so slows pymilvus calls about 3x here (two --quick runs). Prefix with
  ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` to measure that case (what a process holding the
  model and a Milvus client gets, e.g. ``bgem3 eval --index milvus``).
* Backends: (a) ``HybridRetriever`` in process memory; (b) ``MilvusIndex`` on an embedded Milvus Lite
  database ``<tmp>/bench.db``; (c) ``MilvusIndex`` on ``python -m milvus_lite server`` started here on
  127.0.0.1 (a subprocess, stopped at the end). Milvus indexes are exact (FLAT dense, inverted sparse).
* Ingest rate: passages / wall seconds of building the ``HybridRetriever`` (a) or of ``MilvusIndex(...)`` +
  ``index.ingest(...)`` (b, c; the server's start-up is timed separately).
* Latency: one query per ``search(q, mode, k=100)`` call, as a service would, for the five modes and for
  Milvus' own Dense+Sparse fusions (``fusion="milvus-weighted"`` / ``"milvus-rrf"``); p50 / p99 in ms.
  Calls are interleaved (query i: every case, every backend, backend order rotating) so load from other
  users of the machine hits all backends alike. Two untimed warm-up queries per (backend, case).
* Agreement: for every query and mode the Milvus ranking (ids and scores) is compared with the in-memory
  one; mismatches are counted and printed (exact indexes: expected 0). MRR@10 / recall@100 of the gold
  passage per case, as a sanity check and to compare the fusions.
* Sizing: bytes per passage per field measured from the encodings, the on-disk size (``du``) of each
  Milvus Lite data directory after ingest, and an extrapolation to ``--scale-passages`` passages (an
  INPUT, not a measurement; default 2.68M = MKQA's BEIR-NQ corpus, the figure the issue text gives).

Writes ``benchmarks/results/milvus.json`` and ``benchmarks/results/milvus.md`` (generated from the JSON).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# no module that imports MindSpore at top level (see prepare())
from bgem3_lib.evaluation.encoding_store import load_encodings  # noqa: E402
from bgem3_lib.evaluation.offline_sets import TYDI_LANGS  # noqa: E402
from bgem3_lib.retrieval.index import VOCAB_SIZE  # noqa: E402
from bgem3_lib.retrieval.milvus_index import MilvusIndex, collection_name  # noqa: E402
from bgem3_lib.retrieval.milvus_retriever import MilvusRetriever  # noqa: E402
from bgem3_lib.retrieval.milvus_server import start_lite_server, stop_lite_server  # noqa: E402
from bgem3_lib.retrieval.modes import MODES  # noqa: E402
from bgem3_lib.retrieval.retriever import HybridRetriever  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
REPS = ["dense", "sparse", "colbert"]
BACKENDS = ("memory", "milvus-lite-file", "milvus-lite-server")
MILVUS_FUSIONS = ("milvus-weighted", "milvus-rrf")
# (case name, mode, fusion): the five modes with the paper's fusion, then Milvus' own Dense+Sparse rankers
CASES = [(m, m, "paper") for m in MODES] + [(f"dense+sparse:{f}", "dense+sparse", f) for f in MILVUS_FUSIONS]
DEFAULT_SCALE = 2_680_000   # INPUT, not measured: MKQA's BEIR-NQ corpus size as given in the issue text


# ---------------------------------------------------------------- data
# Encoding runs in a child process (``--prepare``): MindSpore's generated *_pb2 modules need the pure-Python
# protobuf runtime, and importing MindSpore switches the whole process to it (it sets
# PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python), which would make every pymilvus call of this process
# decode its gRPC replies in Python. The measuring process imports no MindSpore.

def prepare(out: Path, langs, n_queries: int, seed: int, max_length: int) -> None:
    """Child process: fill / read the encoding cache of every language, sample and encode the queries;
    writes ``out/prepared.json`` (cache folders, docids, fingerprints) and ``out/queries/``."""
    from bgem3_lib.evaluation.corpus_cache import cache_key, corpus_encodings, corpus_fingerprint, encodings_root
    from bgem3_lib.evaluation.encoding_store import save_encodings
    from bgem3_lib.evaluation.runner import load_task
    from bgem3_lib.model.bgem3 import BGEM3
    from bgem3_lib.model.fingerprint import model_fingerprint

    model = BGEM3("m3-small")
    model_fp = model_fingerprint(model)
    parts, docids, texts, pool = [], [], [], []
    for lang in tqdm(langs, desc="corpora (encoding cache)", unit="lang"):
        es = load_task("tydi", lang)
        ids, txt = list(es.corpus), list(es.corpus.values())
        folder = encodings_root() / cache_key(model_fp, corpus_fingerprint(ids, txt),
                                              model.resolve_max_length(max_length), model.dtype)
        cached = (folder / "meta.json").is_file()
        t0 = time.perf_counter()
        enc = corpus_encodings(model, ids, txt, REPS, max_length=max_length, mmap=True)
        if len(enc["dense_vecs"]) != len(ids):
            raise RuntimeError(f"{folder}: {len(enc['dense_vecs'])} encodings for {len(ids)} passages")
        unique = {d: d if d.startswith(f"{lang}-") else f"{lang}-{d}" for d in ids}   # TyDi ids: "<lang>-pNNNN"
        parts.append({"lang": lang, "folder": str(folder), "passages": len(ids), "queries": len(es.queries),
                      "cache_hit_before": cached, "load_or_encode_seconds": round(time.perf_counter() - t0, 2),
                      "cache_dir_bytes": du(folder)["apparent_bytes"]})
        docids += [unique[d] for d in ids]
        texts += txt
        for q, text in es.queries.items():
            pool.append((lang, text, sorted(unique[d] for d in es.qrels.get(q, {}))))
    if len(set(docids)) != len(docids):
        raise ValueError("docids are not unique across languages")
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), size=min(n_queries, len(pool)), replace=False))
    t0 = time.perf_counter()
    q = model.encode_queries([pool[i][1] for i in pick], batch_size=32, max_length=max_length,
                             return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q_secs = time.perf_counter() - t0
    save_encodings(q, out / "queries")
    (out / "prepared.json").write_text(json.dumps({
        "model_fingerprint": model_fp, "corpus_fingerprint": corpus_fingerprint(docids, texts),
        "vocab_size": int(getattr(model.tokenizer, "vocab_size", VOCAB_SIZE)), "parts": parts, "docids": docids,
        "query_pool": len(pool), "query_langs": [pool[i][0] for i in pick], "query_gold": [pool[i][2] for i in pick],
        "query_encode_seconds": round(q_secs, 2)}))


def load_prepared(prep: dict) -> tuple[dict, list, list]:
    """The corpus as one encoding dict (languages concatenated, read from the cache folders), row langs."""
    dense, lexical, colbert, langs = [], [], [], []
    for part in tqdm(prep["parts"], desc="load encodings", unit="lang"):
        enc = load_encodings(part["folder"], REPS)
        if len(enc["dense_vecs"]) != part["passages"]:
            raise RuntimeError(f"{part['folder']} changed since --prepare")
        dense.append(np.asarray(enc["dense_vecs"], np.float32))
        lexical += list(enc["lexical_weights"])
        colbert += list(enc["colbert_vecs"])
        langs += [part["lang"]] * part["passages"]
    return {"dense_vecs": np.concatenate(dense), "lexical_weights": lexical, "colbert_vecs": colbert}, langs


def one_query_dicts(q: dict) -> list[dict]:
    return [{"dense_vecs": q["dense_vecs"][i:i + 1], "lexical_weights": q["lexical_weights"][i:i + 1],
             "colbert_vecs": q["colbert_vecs"][i:i + 1]} for i in range(len(q["dense_vecs"]))]


# ---------------------------------------------------------------- Milvus

def du(path: Path) -> dict:
    """Apparent bytes (sum of file sizes) and allocated bytes (``du``: blocks) under ``path``."""
    apparent = allocated = files = 0
    paths = [Path(path)] if Path(path).is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        apparent += st.st_size
        allocated += st.st_blocks * 512
        files += 1
    return {"apparent_bytes": apparent, "allocated_bytes": allocated, "files": files}


def build_milvus(uri: str, name: str, meta: dict, enc: dict, docids, langs, vocab: int) -> tuple:
    """(MilvusRetriever, seconds of MilvusIndex creation + ingest, ingest stats)."""
    t0 = time.perf_counter()
    index = MilvusIndex(name, meta, uri=uri)
    stats = index.ingest(enc, docids, langs)
    secs = time.perf_counter() - t0
    if stats["upserted"] != meta["n"]:
        raise RuntimeError(f"expected a fresh collection at {uri}, ingest says {stats}")
    return MilvusRetriever(index, enc["colbert_vecs"], vocab_size=vocab), secs, stats


# ---------------------------------------------------------------- measuring

def run_queries(retrievers: dict, queries: list[dict], k: int) -> tuple[dict, dict, dict]:
    """Every (case, backend) on every query, one at a time -> (latency s, ids, scores)
    as {backend: {case: [per query]}}."""
    todo = [(case, mode, fusion, b) for case, mode, fusion in CASES for b in retrievers
            if fusion == "paper" or b != "memory"]

    def call(b, q, mode, fusion):
        kw = {} if fusion == "paper" else {"fusion": fusion}
        return retrievers[b].search(q, mode, k=k, **kw)

    for _case, mode, fusion, b in tqdm(todo, desc="warm-up", unit="case"):
        for q in queries[:2]:
            call(b, q, mode, fusion)
    lat = {b: {c[0]: [] for c in CASES} for b in retrievers}
    ids = {b: {c[0]: [] for c in CASES} for b in retrievers}
    scores = {b: {c[0]: [] for c in CASES} for b in retrievers}
    names = list(retrievers)
    for i, q in enumerate(tqdm(queries, desc="queries (all cases x backends)", unit="query")):
        order = names[i % len(names):] + names[:i % len(names)]          # rotate who goes first
        for case, mode, fusion in CASES:
            for b in order:
                if fusion != "paper" and b == "memory":
                    continue
                t0 = time.perf_counter()
                got_ids, got_scores = call(b, q, mode, fusion)
                lat[b][case].append(time.perf_counter() - t0)
                ids[b][case].append(got_ids[0])
                scores[b][case].append(got_scores[0])
    return lat, ids, scores


def compare(ids: dict, scores: dict, docids: list, limit: int = 20) -> dict:
    """Milvus vs in-memory rankings per mode (paper fusion); Milvus' own rankers: file vs server."""
    out = {"per_backend_mode": {}, "examples": [], "total_id_mismatches": 0, "total_score_mismatches": 0}
    pairs = [(b, "memory", case) for b in ids if b != "memory" for case, _, f in CASES if f == "paper"]
    if "milvus-lite-file" in ids and "milvus-lite-server" in ids:
        pairs += [("milvus-lite-server", "milvus-lite-file", case) for case, _, f in CASES if f != "paper"]
    for b, ref, case in pairs:
        id_bad = score_bad = 0
        for qi, (a, r) in enumerate(zip(ids[b][case], ids[ref][case])):
            if not np.array_equal(a, r):
                id_bad += 1
                first = int(np.flatnonzero(a != r)[0])
                if len(out["examples"]) < limit:
                    out["examples"].append({"backend": b, "reference": ref, "case": case, "query": qi, "rank": first,
                                            "got": docids[a[first]] if a[first] >= 0 else None,
                                            "want": docids[r[first]] if r[first] >= 0 else None,
                                            "got_score": float(scores[b][case][qi][first]),
                                            "want_score": float(scores[ref][case][qi][first])})
            if not np.array_equal(scores[b][case][qi], scores[ref][case][qi]):
                score_bad += 1
        out["per_backend_mode"][f"{b} vs {ref} [{case}]"] = {"id_mismatches": id_bad,
                                                             "score_mismatches": score_bad}
        if ref == "memory":
            out["total_id_mismatches"] += id_bad
            out["total_score_mismatches"] += score_bad
    return out


def quality(ids: dict, gold_rows: list[set]) -> dict:
    """MRR@10 and recall@100 of the gold passage per backend and case."""
    out = {}
    for b, cases in ids.items():
        for case, rows in cases.items():
            if not rows:
                continue
            rr, hit = [], []
            for row, gold in zip(rows, gold_rows):
                ranks = [r for r, j in enumerate(row.tolist()) if j in gold]
                rr.append(1.0 / (ranks[0] + 1) if ranks and ranks[0] < 10 else 0.0)
                hit.append(bool(ranks))
            out.setdefault(b, {})[case] = {"mrr@10": round(float(np.mean(rr)), 4),
                                           "recall@100": round(float(np.mean(hit)), 4)}
    return out


def overlap_at(ids: dict, backend: str, case: str, ref_case: str, k: int = 10) -> float:
    """Mean |top-k of ``case`` ∩ top-k of ``ref_case``| / k for one backend."""
    a, b = ids[backend][case], ids[backend][ref_case]
    return round(float(np.mean([len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b)])), 4)


def percentiles(secs: list[float]) -> dict:
    ms = np.asarray(secs) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "max_ms": round(float(ms.max()), 3), "n": len(secs)}


def sizing(enc: dict, docids: list, langs: list, disk: dict, scale: int, info: list) -> dict:
    """Bytes per passage per field (measured) and GB at ``scale`` passages (extrapolated linearly)."""
    n = len(docids)
    h = int(np.shape(enc["dense_vecs"])[1])
    nnz = np.array([len(d) for d in enc["lexical_weights"]])
    nvec = np.array([len(v) for v in enc["colbert_vecs"]])
    d_col = int(np.shape(enc["colbert_vecs"][0])[1])
    fields = {
        "dense": {"bytes_per_passage": 4 * h, "how": f"float32 x H={h}"},
        "sparse": {"bytes_per_passage": float(nnz.mean()) * 8,
                   "how": f"mean {nnz.mean():.1f} nonzeros/passage x (4-byte id + 4-byte float)"},
        "colbert (encoding store)": {"bytes_per_passage": float(nvec.mean()) * d_col * 4,
                                     "how": f"mean {nvec.mean():.1f} vectors/passage x D={d_col} x 4 bytes"},
        "docid": {"bytes_per_passage": float(np.mean([len(d.encode()) for d in docids])), "how": "UTF-8 bytes"},
        "lang": {"bytes_per_passage": float(np.mean([len(x.encode()) for x in langs])), "how": "UTF-8 bytes"},
    }
    fields["raw Milvus fields (dense+sparse+docid+lang+8-byte id)"] = {
        "bytes_per_passage": sum(fields[f]["bytes_per_passage"] for f in ("dense", "sparse", "docid", "lang")) + 8,
        "how": "sum of the fields Milvus stores"}
    fields["encoding cache on disk (all 3 reps, measured du)"] = {
        "bytes_per_passage": sum(i["cache_dir_bytes"] for i in info) / n, "how": "apparent size of the cache folders"}
    for backend, d in disk.items():
        fields[f"{backend} data dir on disk (measured du)"] = {
            "bytes_per_passage": d["allocated_bytes"] / n,
            "how": f"du of the data directory after ingest ({d['files']} files, "
                   f"{d['apparent_bytes'] / n:.0f} apparent bytes/passage)"}
    for f in fields.values():
        f["bytes_per_passage"] = round(f["bytes_per_passage"], 1)
        f["gb_at_scale"] = round(f["bytes_per_passage"] * scale / 1e9, 2)
    return {"passages": n, "dense_dim": h, "colbert_dim": d_col, "sparse_nnz_mean": round(float(nnz.mean()), 2),
            "sparse_nnz_p99": float(np.percentile(nnz, 99)), "colbert_vectors_mean": round(float(nvec.mean()), 2),
            "scale_passages": scale, "scale_passages_is_input": True, "fields": fields}


def machine() -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else None
    return {"python": platform.python_version(), "system": platform.system(), "processor": platform.machine(),
            "cpu": cpu, "cpus": os.cpu_count(),
            "versions": {p: version(p) for p in ("pymilvus", "milvus-lite", "numpy", "scipy", "faiss-cpu",
                                                 "mindspore", "grpcio", "pyarrow")}}


# ---------------------------------------------------------------- report

def markdown(res: dict) -> str:
    """The Markdown report, generated from the JSON result."""
    lat, ing = res["latency"], res["ingest"]
    head = ["backend", "ingest passages/s"] + [c[0] for c in CASES]
    lines = [f"# Milvus Lite vs in-memory retrieval ({res['corpus']['passages']} passages, "
             f"{res['queries']['n']} queries, k={res['k']})", "",
             f"TyDi QA GoldP, languages {', '.join(res['corpus']['langs'])}; model `{res['model']}`; "
             f"run {res['run']['date']} on {res['machine']['cpus']} CPUs ({res['machine']['cpu']}), "
             f"pymilvus {res['machine']['versions']['pymilvus']}, milvus-lite "
             f"{res['machine']['versions']['milvus-lite']}; protobuf runtime of the client process "
             f"`{res['machine']['protobuf_runtime_client']}`, server env PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION "
             f"`{res['machine']['protobuf_env_server']}`. Generated from `milvus.json` by `benchmarks/milvus.py`.",
             "", "## Query latency, one query per call: p50 / p99 ms", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in BACKENDS:
        if b not in lat:
            continue
        cells = [b, f"{ing[b]['passages_per_s']:,.0f}"]
        for case, _, _ in CASES:
            p = lat[b].get(case)
            cells.append(f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f}" if p else "—")
        lines.append("| " + " | ".join(cells) + " |")
    mm = res["agreement"]
    lines += ["", f"Rankings (ids) differing from the in-memory retriever, all queries x modes: "
              f"**{mm['total_id_mismatches']}**; score rows differing: **{mm['total_score_mismatches']}** "
              "(exact FLAT index: expected 0).", "",
              "| comparison | id mismatches | score mismatches |", "|---|---|---|"]
    lines += [f"| {k} | {v['id_mismatches']} | {v['score_mismatches']} |" for k, v in mm["per_backend_mode"].items()]
    q = res["quality"]
    lines += ["", "## Gold-passage quality per case (sanity check; compares the fusions)", "",
              "| backend | " + " | ".join(c[0] for c in CASES) + " |", "|" + "---|" * (len(CASES) + 1)]
    for b in BACKENDS:
        if b in q:
            lines.append(f"| {b} | " + " | ".join(
                f"{q[b][c[0]]['mrr@10']:.3f} / {q[b][c[0]]['recall@100']:.3f}" if c[0] in q[b] else "—"
                for c in CASES) + " |")
    lines += ["", "Cells: MRR@10 / recall@100. Top-10 overlap with the paper's Dense+Sparse (Eq. 1) ranking: " +
              ", ".join(f"{k} {v:.3f}" for k, v in res["fusion_top10_overlap_with_paper"].items()) + ".", ""]
    s = res["sizing"]
    lines += ["## Sizing", "",
              f"Measured on {s['passages']} passages: dense H={s['dense_dim']}, sparse {s['sparse_nnz_mean']} "
              f"nonzeros/passage on average (p99 {s['sparse_nnz_p99']:.0f}), ColBERT {s['colbert_vectors_mean']} "
              f"vectors/passage of D={s['colbert_dim']}. GB at scale = bytes/passage x "
              f"{s['scale_passages']:,} passages, an INPUT (`--scale-passages`), not a measurement.", "",
              f"| field | bytes/passage | GB at {s['scale_passages']:,} passages | how |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['bytes_per_passage']:,.1f} | {v['gb_at_scale']:,.2f} | {v['how']} |"
              for k, v in s["fields"].items()]
    f = s["fields"]
    raw = f["raw Milvus fields (dense+sparse+docid+lang+8-byte id)"]["bytes_per_passage"]
    disk_lines = [f"{k.split(' data dir')[0]} uses {v['bytes_per_passage'] / raw:.2f}x the raw field bytes"
                  for k, v in f.items() if "data dir" in k]
    lines += ["", "Extrapolation (linear in the passage count; this model's H and this corpus' token "
              f"statistics — BGE-M3 proper has H=1024 and longer passages change the sparse and ColBERT "
              f"rows): at {s['scale_passages']:,} passages Milvus holds "
              f"{f['dense']['gb_at_scale']:.2f} GB dense + {f['sparse']['gb_at_scale']:.2f} GB sparse "
              f"vectors (raw), while ColBERT vectors kept in the encoding store would need "
              f"{f['colbert (encoding store)']['gb_at_scale']:.2f} GB. " + "; ".join(disk_lines) + ".", ""]
    lines += ["## Run", "", f"`{res['run']['command'].strip()}`: {res['run']['seconds']:.0f} s in total "
              f"(load average {res['run']['loadavg_start']} at start, {res['run']['loadavg_end']} at end). "
              f"Milvus Lite server start-up {res['ingest']['milvus-lite-server'].get('server_start_s', 0):.1f} s "
              "(not in its ingest rate).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {TYDI_LANGS[:2]} (a smoke run)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--scale-passages", type=int, default=DEFAULT_SCALE,
                    help="INPUT passage count for the sizing extrapolation (default: BEIR-NQ's 2.68M)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result (default results/milvus.json, results/milvus_quick.json with --quick)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from an existing .json")
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)      # internal: the encoding child process
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, TYDI_LANGS[:2] if args.quick else TYDI_LANGS, args.queries, args.seed,
                args.max_length)
        return
    # this process never loads MindSpore: protobuf's fast runtime (the library defaults to the pure-Python
    # one, which MindSpore needs, when nothing is set: see bgem3_lib.retrieval.milvus_index)
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "upb")
    args.out = args.out or OUT / ("milvus_quick.json" if args.quick else "milvus.json")
    md_path = args.out.with_suffix(".md")
    if args.report_only:
        md_path.write_text(markdown(json.loads(args.out.read_text())) + "\n")
        print(f"wrote {md_path}")
        return

    start, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bgem3-milvus-bench-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", str(tmp), "--queries",
                        str(args.queries), "--seed", str(args.seed), "--max-length", str(args.max_length),
                        *(["--quick"] if args.quick else [])], check=True, env=env, cwd=str(ROOT))
        prep = json.loads((tmp / "prepared.json").read_text())
        queries = one_query_dicts(load_encodings(tmp / "queries"))
        res = measure(args, prep, queries, tmp)
    res["run"] = {"command": " ".join(["python benchmarks/milvus.py", *sys.argv[1:]]),
                  "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - start, 1),
                  "loadavg_start": [round(x, 2) for x in load_start],
                  "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    md_path.write_text(md + "\n")
    print(md)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} and {md_path.name}")


def measure(args, prep: dict, queries: list[dict], tmp: Path) -> dict:
    """Build the three backends, run every query, compare: the result dict (without "run")."""
    from google.protobuf.internal import api_implementation
    docids, vocab = prep["docids"], prep["vocab_size"]
    enc, doc_langs = load_prepared(prep)
    n = len(docids)
    row_of = {d: i for i, d in enumerate(docids)}
    gold_rows = [{row_of[d] for d in g} for g in prep["query_gold"]]
    langs = [p["lang"] for p in prep["parts"]]
    info = [{k: v for k, v in p.items() if k != "folder"} for p in prep["parts"]]
    print(f"corpus: {n} passages in {len(langs)} languages; {len(queries)} of {prep['query_pool']} queries "
          f"(encoded in {prep['query_encode_seconds']:.1f} s); protobuf runtime here: "
          f"{api_implementation.Type()}", flush=True)
    model_fp, corpus_fp = prep["model_fingerprint"], prep["corpus_fingerprint"]
    meta = {"model": model_fp, "corpus": corpus_fp, "n": n, "dim": int(enc["dense_vecs"].shape[1])}
    name = collection_name(corpus_fp, model_fp)
    retrievers, ingest, disk, proc = {}, {}, {}, None
    try:
        t0 = time.perf_counter()
        retrievers["memory"] = HybridRetriever(enc, vocab_size=vocab)
        secs = time.perf_counter() - t0
        ingest["memory"] = {"seconds": round(secs, 3), "passages_per_s": n / secs}
        print(f"memory: built in {secs:.2f} s", flush=True)

        db = tmp / "bench.db"
        retrievers["milvus-lite-file"], secs, stats = build_milvus(str(db), name, meta, enc, docids,
                                                                    doc_langs, vocab)
        ingest["milvus-lite-file"] = {"seconds": round(secs, 3), "passages_per_s": n / secs, **stats,
                                      "uri": "<tmp>/bench.db"}
        disk["milvus-lite-file"] = du(db)
        print(f"milvus-lite-file: ingested in {secs:.2f} s, {disk['milvus-lite-file']}", flush=True)

        proc, uri, start_s = start_lite_server(tmp / "srv", tmp / "server.log")
        retrievers["milvus-lite-server"], secs, stats = build_milvus(uri, name, meta, enc, docids,
                                                                      doc_langs, vocab)
        ingest["milvus-lite-server"] = {"seconds": round(secs, 3), "passages_per_s": n / secs, **stats,
                                        "uri": "http://127.0.0.1:<port>", "server_start_s": round(start_s, 2)}
        disk["milvus-lite-server"] = du(tmp / "srv")
        print(f"milvus-lite-server: up in {start_s:.1f} s, ingested in {secs:.2f} s, "
              f"{disk['milvus-lite-server']}", flush=True)

        lat, ids, scores = run_queries(retrievers, queries, args.k)
    finally:
        for r in retrievers.values():
            if isinstance(r, MilvusRetriever):
                try:
                    r.index.client.close()
                except Exception as e:             # report, keep cleaning up
                    print(f"closing {r.index.uri}: {type(e).__name__}: {e}")
        stop_lite_server(proc)

    agreement = compare(ids, scores, docids)
    for ex in agreement["examples"]:
        print(f"MISMATCH {ex}")
    print(f"rankings differing from the in-memory retriever: {agreement['total_id_mismatches']} "
          f"(score rows: {agreement['total_score_mismatches']})")
    overlap = {f"{b} {f}": overlap_at(ids, b, f"dense+sparse:{f}", "dense+sparse")
               for b in ids if b != "memory" for f in MILVUS_FUSIONS}
    res = {
        "model": "m3-small", "model_fingerprint": model_fp, "k": args.k, "seed": args.seed,
        "max_length": args.max_length, "quick": args.quick,
        "corpus": {"task": "tydi", "langs": list(langs), "passages": n, "per_lang": info,
                   "corpus_fingerprint": corpus_fp},
        "queries": {"n": len(queries), "pool": prep["query_pool"], "encode_seconds": prep["query_encode_seconds"],
                    "per_lang": {lang: prep["query_langs"].count(lang) for lang in langs}},
        "ingest": {b: {**v, "passages_per_s": round(v["passages_per_s"], 1)} for b, v in ingest.items()},
        "latency": {b: {case: percentiles(v) for case, v in cases.items() if v} for b, cases in lat.items()},
        "agreement": agreement, "quality": quality(ids, gold_rows), "fusion_top10_overlap_with_paper": overlap,
        "disk": disk, "sizing": sizing(enc, docids, doc_langs, disk, args.scale_passages, info),
        "machine": {**machine(), "protobuf_runtime_client": api_implementation.Type(),
                    "protobuf_env_server": os.environ.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "unset (upb)")},
    }
    return res

if __name__ == "__main__":
    main()
