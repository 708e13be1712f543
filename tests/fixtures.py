"""Shared test fixtures: multilingual texts read in place from ../shared/data (never copied)."""
from __future__ import annotations

import json

from bgem3_lib.paths import data_dir

XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")


def xquad(lang: str) -> dict:
    return json.loads((data_dir() / "xquad" / f"xquad.{lang}.json").read_text())


def multilingual_texts(per_lang: int = 4) -> list[str]:
    """>= 50 texts in >= 10 scripts: XQuAD questions and paragraph openings in 12 languages,
    plus one-word texts, padding spaces / an ideographic space / a zero-width space around words (blank
    texts themselves are refused by ``check_texts``), and hand-picked scripts."""
    texts = []
    for lang in XQUAD_LANGS:
        art = xquad(lang)["data"][0]["paragraphs"]
        for j in range(per_lang // 2):
            texts.append(art[j]["qas"][0]["question"])
            texts.append(art[j]["context"][:300])
    texts += ["hello", "Привет", "東京", "שלום עולם", "こんにちは、世界", "ქართული ენა", "안녕하세요",
              "  padded  ", "\u3000全角", "zero\u200bwidth", "naïve café", "emoji 🙂 test", "x"]
    return texts


def long_text(lang: str = "en", paragraphs: int = 12) -> str:
    """Consecutive XQuAD paragraphs joined: ~2,000+ tokens, longer than the tests' max_length."""
    paras = [p["context"] for art in xquad(lang)["data"] for p in art["paragraphs"]]
    return " ".join(paras[:paragraphs])


def product_case(rng, m: int, n: int, k: int):
    """A float32 product x [m, k] @ w^T (w [n, k], small weights) with its float64 value and the error's scale
    sum_k |x w|, for the kernels' product tests: ``x, w, exact, size``."""
    import numpy as np
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    size = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    return x, w, exact, size


def on_f32_kernel(fn, expect: bool = True, calls=None):
    """``fn()``'s result, asserting that the AVX-512 float32 kernel computed products in it (``expect``) or none
    (the BLAS did). ``calls``: the kernel's call counter (default ``kernels.cpu.f32gemm_calls``; the training
    library's is ``kernels.train.f32gemm_calls``). The count tells the paths apart where the bits may not: an
    AVX-512 BLAS can sum in this kernel's order."""
    if calls is None:
        from bgem3_lib.kernels.cpu import f32gemm_calls as calls
    before = calls()
    out = fn()
    assert (calls() > before) is expect
    return out
