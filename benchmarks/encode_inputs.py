"""Inputs for ``benchmarks/encode.py``: the random BAAI-layout checkpoints, the real length mix, fixed-length
texts, exact token counts (as every system truncates) and useful-FLOP counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bgem3_lib.paths import cache_dir  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX tiles (the kernels' float32 products run there when it does):
    ratios differ between CPUs, so the results say which one measured them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return f"{name}, {'with' if ' amx_bf16' in info else 'without'} AMX"


_BLAS_PROBE = ("import json, numpy, threadpoolctl; print(json.dumps([i for i in threadpoolctl.threadpool_info() "
               "if i.get('user_api') == 'blas']))")
BLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def blas_info() -> dict:
    """NumPy's BLAS as a process started with this environment loads it (bgem3_lib's float32 products run on it;
    FlagEmbedding's and ONNX Runtime's do not): ``{"library", "version", "kernel", "pinned", "native"}``.

    Some machines set ``OPENBLAS_CORETYPE`` (with ``OPENBLAS_L2_SIZE``) to keep old OpenBLAS builds off new CPUs;
    pinned to Haswell (AVX2) on an AVX-512 CPU, OpenBLAS's float32 matmul runs at half speed. ``pinned`` is then
    the pin and ``native`` the kernel OpenBLAS picks for this CPU without the pins, else both are None."""
    def probe(env: dict) -> dict:
        out = subprocess.run([sys.executable, "-c", _BLAS_PROBE], env=env, capture_output=True, text=True)
        found = json.loads(out.stdout or "[]") if out.returncode == 0 else []
        return found[0] if found else {}

    here = probe(dict(os.environ))
    pinned = os.environ.get("OPENBLAS_CORETYPE") or None
    native = probe({k: v for k, v in os.environ.items() if k not in BLAS_PINS}) if pinned else {}
    return {"library": here.get("internal_api", "?"), "version": here.get("version") or "?",
            "kernel": here.get("architecture") or "?", "pinned": pinned, "native": native.get("architecture")}


def describe_blas(info: dict) -> str:
    """One line for the results, e.g. "OpenBLAS 0.3.23.dev, Haswell kernel (pinned by OPENBLAS_CORETYPE=Haswell;
    this CPU's own: Cooperlake)".

    >>> describe_blas({"library": "openblas", "version": "0.3.23.dev", "kernel": "Cooperlake", "pinned": None,
    ...                "native": None})
    'OpenBLAS 0.3.23.dev, Cooperlake kernel'
    """
    name = {"openblas": "OpenBLAS", "mkl": "MKL"}.get(info["library"], info["library"])
    line = f"{name} {info['version']}, {info['kernel']} kernel"
    if info.get("pinned"):
        line += f" (pinned by OPENBLAS_CORETYPE={info['pinned']}; this CPU's own: {info.get('native') or '?'})"
    return line


def warn_if_pinned(info: dict) -> None:
    """Say on stderr when the machine's OPENBLAS_CORETYPE holds OpenBLAS below this CPU's own kernel."""
    if info.get("pinned") and info.get("native") and info["native"] != info["kernel"]:
        print(f"warning: OPENBLAS_CORETYPE={info['pinned']} holds OpenBLAS to its {info['kernel']} kernel on a CPU "
              f"whose own is {info['native']}; bgem3_lib's linear layers then run on its own AVX-512 kernel, the rest "
              f"of its products on that OpenBLAS; its peers' do not use it. To "
              f"measure this CPU: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE <this command>", file=sys.stderr,
              flush=True)


SIZES = {"full": dict(layers=24, hidden=1024, heads=16, ffn=4096, max_pos=8194),
         "m3-small": dict(layers=12, hidden=384, heads=12, ffn=1536, max_pos=8194)}


def make_checkpoint(size: str) -> Path:
    out = cache_dir() / "bench" / f"bge-m3-random-{size}-seed0"
    if (out / "sparse_linear.pt").is_file():
        return out
    from bgem3_lib.analysis.torch_reference import run_reference
    from bgem3_lib.weights.assets import asset_path
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    print(f"writing the random {size} checkpoint to {out} ...", flush=True)
    run_reference("write_bge_m3_checkpoint", out_dir=str(tmp), tokenizer_json=str(asset_path("tokenizer.json")),
                  seed=0, **SIZES[size])
    tmp.rename(out)
    return out


class Tokens:
    """Token counts exactly as all three systems truncate (``<s> ... </s>``, at most max_length)."""

    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(tokenizer_json))

    def lengths(self, texts: list[str], max_length: int) -> list[int]:
        return [min(len(e.ids), max_length) for e in self.tok.encode_batch(texts)]


def real_mix(n_queries: int, n_passages: int, n_docs: int, seed: int = 0) -> list[str]:
    """Queries, passages and long documents in many languages, shuffled (fixed seed)."""
    from bgem3_lib.evaluation.offline_sets import (
        TYDI_LANGS,
        XQUAD_LANGS,
        load_tydi,
        load_xquad_longdoc,
        load_xquad_xling,
    )
    rng = np.random.default_rng(seed)
    pick = lambda pool, k: [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]  # noqa: E731
    queries = [q for lang in ("de", "zh", "ar", "ru", "hi", "th") for q in load_xquad_xling(lang).queries.values()]
    passages = [p for lang in TYDI_LANGS[:5] for p in load_tydi(lang).corpus.values()]
    docs = [d for lang in XQUAD_LANGS[::3] for d in load_xquad_longdoc(lang).corpus.values()]
    texts = pick(queries, n_queries) + pick(passages, n_passages) + pick(docs, n_docs)
    return [texts[i] for i in rng.permutation(len(texts))]


def long_texts(count: int, min_tokens: int, tokens: Tokens) -> list[str]:
    """``count`` distinct real texts of at least ``min_tokens`` tokens (XQuAD articles joined)."""
    from bgem3_lib.evaluation.offline_sets import XQUAD_LANGS, load_xquad_longdoc
    docs = [d for lang in XQUAD_LANGS for d in load_xquad_longdoc(lang).corpus.values()]
    out, i = [], 0
    while len(out) < count:
        text = ""
        while not text or tokens.lengths([text], 10 ** 6)[0] < min_tokens + 2:
            text += docs[i % len(docs)] + "\n"
            i += 1
        out.append(text)
    return out


def flops_per_text(n: int, cfg: dict) -> float:
    """Useful FLOPs of one text of n tokens: projections + FFN + attention per layer, plus the heads."""
    H, F, layers = cfg["hidden"], cfg["ffn"], cfg["layers"]
    return layers * (2.0 * n * (4 * H * H + 2 * H * F) + 4.0 * n * n * H) + 2.0 * n * H * (H + 1)


def make_case(name, texts, max_length, batch_size, tokens: Tokens, cfg, tmp: Path, systems) -> dict:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(texts))
    lengths = tokens.lengths(texts, max_length)
    longest = tmp / f"{name}-longest.json"         # its longest batch: what a spare process warms up on
    by_length = sorted(range(len(texts)), key=lambda i: -lengths[i])
    longest.write_text(json.dumps([texts[i] for i in by_length[:batch_size]]))
    return {"name": name, "texts": str(path), "longest_batch": str(longest), "max_length": max_length,
            "batch_size": batch_size,
            "tokens": int(sum(lengths)), "n_texts": len(texts),
            "gflop": sum(flops_per_text(n, cfg) for n in lengths) / 1e9, "systems": list(systems)}




def padded_slots(lengths: list[int], batch_size: int, sort: bool) -> int:
    """Token slots a padded forward computes: each batch is padded to its longest text.

    >>> padded_slots([1, 9, 2, 8], 2, sort=False), padded_slots([1, 9, 2, 8], 2, sort=True)
    (34, 22)
    """
    order = sorted(lengths, reverse=True) if sort else list(lengths)
    return sum(len(order[i:i + batch_size]) * max(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
