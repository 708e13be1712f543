"""Benchmark: the int8 CPU kernels (``bgem3_lib.kernels.int8``) against the float32 ones (OpenBLAS sgemm).

    .venv/bin/python benchmarks/int8_gemm.py [--runs 5] [--seq-len 512] [--tokens 2048]

* GEMM: x [T, K] @ W^T + b for the XLM-R large shapes [2048, 1024] x [4096, 1024] (FFN in),
  [2048, 4096] x [1024, 4096] (FFN out) and [2048, 1024] x [3072, 1024] (fused qkv). Without the framework:
  NumPy's sgemm into a preallocated output vs the int8 kernel (row quantisation, AMX or VNNI GEMM, dequantisation +
  bias) called on NumPy arrays (``int8.call_kernel``). Through MindSpore (``ops.Custom``, a new output tensor
  and its ``asnumpy`` copy each call): ``kernels.cpu.linear`` (sgemm + bias) vs ``kernels.int8.linear``.
  GFLOP/s counts 2 T K N for every system (int8 "GFLOP-equivalents").
* Layer: one full-size encoder layer (hidden 1024, 16 heads, FFN 4096) on ``--tokens`` packed tokens in
  sequences of ``--seq-len``: float32 fused sub-layers vs int8 ones, and the int8 output's error.

Median of ``--runs`` timed runs after one warm-up, the systems taking turns; random weights with fixed seeds.
The GEMM timings include MindSpore's output allocation and ``asnumpy`` copy, the same for both kernels.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspore import Tensor  # noqa: E402

from bgem3_lib.kernels import cpu as ck  # noqa: E402
from bgem3_lib.kernels import int8 as qk  # noqa: E402

GEMMS = {"ffn in  [2048,1024]x[4096,1024]": (2048, 1024, 4096),
         "ffn out [2048,4096]x[1024,4096]": (2048, 4096, 1024),
         "qkv     [2048,1024]x[3072,1024]": (2048, 1024, 3072)}


def timed(fns, runs: int) -> list[float]:
    """Median seconds of ``runs`` calls of each function after one warm-up, the functions taking turns (so load
    from other users of the machine hits them alike); each must block until its result exists."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(runs):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def gemm_rows(runs: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    rows = []
    for name, (t, k, n) in GEMMS.items():
        x, w = rng.standard_normal((t, k), np.float32), (0.03 * rng.standard_normal((n, k))).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        tx, tw, tb, layer = Tensor(x), Tensor(w), Tensor(b), qk.QuantLinear(w, b)
        flops, y = 2.0 * t * k * n, np.empty((t, n), np.float32)
        arrays = [x, layer.packed.asnumpy(), layer.scale.asnumpy(), layer.wsum.asnumpy(), b]
        secs = timed([lambda x=x, w=w, y=y: np.matmul(x, w.T, out=y),
                      lambda arrays=arrays, y=y: qk.call_kernel("m3_int8_linear", arrays, y),
                      lambda tx=tx, tw=tw, tb=tb: ck.linear(tx, tw, tb).asnumpy(),
                      lambda tx=tx, layer=layer: qk.linear(tx, layer).asnumpy()], runs)
        rows.append((name, *(flops / s / 1e9 for s in secs)))
    return rows


def full_layer(runs: int, tokens: int, seq_len: int) -> dict:
    H, A, F = 1024, 16, 4096
    rng = np.random.default_rng(1)

    def dense(n, k):
        return SimpleNamespace(weight=Tensor((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)),
                               bias=Tensor((0.1 * rng.standard_normal(n)).astype(np.float32)))

    def norm():
        return SimpleNamespace(gamma=Tensor(np.ones(H, np.float32)), beta=Tensor(np.zeros(H, np.float32)))

    att = SimpleNamespace(qkv=dense(3 * H, H), out=dense(H, H), norm=norm())
    ffn = SimpleNamespace(inner=dense(F, H), outer=dense(H, F), norm=norm())
    quant = {name: qk.QuantLinear(cell.weight.asnumpy(), cell.bias.asnumpy()) for name, cell in
             (("qkv", att.qkv), ("out", att.out), ("inner", ffn.inner), ("outer", ffn.outer))}
    lengths = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
    offsets = Tensor(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    heads, eps = Tensor(np.array([A], np.int32)), ck.scalar(1e-5)
    x = Tensor(rng.standard_normal((tokens, H)).astype(np.float32))

    def run_float():
        return ck.ffn_block(ck.attention_block(x, att, offsets, heads, eps), ffn, eps).asnumpy()

    def run_int8():
        y = qk.attention_block(x, quant["qkv"], quant["out"], att.norm, offsets, heads, eps)
        return qk.ffn_block(y, quant["inner"], quant["outer"], ffn.norm, eps).asnumpy()

    ref, out = run_float(), run_int8()
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    float_s, int8_s = timed([run_float, run_int8], runs)
    return {"float_s": float_s, "int8_s": int8_s, "max_abs_err": float(np.abs(ref - out).max()),
            "min_cos": float(cos.min()), "lengths": f"{len(lengths)} x {seq_len}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    if not qk.available():
        raise SystemExit("the int8 CPU kernels are not available here")
    kernel = "AVX-512 VNNI" if qk.uses_vnni() else "scalar fallback"
    print(f"int8 micro-kernel: {kernel}; median of {args.runs} runs")
    print(f"{'GFLOP/s':32s} | {'no framework: sgemm':>19s} {'int8':>6s} {'ratio':>6s} | "
          f"{'MindSpore: float32 kernel':>25s} {'int8':>6s} {'ratio':>6s}")
    for name, sgemm, int8_raw, float_ms, int8_ms in gemm_rows(args.runs):
        print(f"{name:32s} | {sgemm:19.1f} {int8_raw:6.1f} {int8_raw / sgemm:5.2f}x | "
              f"{float_ms:25.1f} {int8_ms:6.1f} {int8_ms / float_ms:5.2f}x")
    r = full_layer(args.runs, args.tokens, args.seq_len)
    print(f"full-size layer, {args.tokens} tokens ({r['lengths']}): float32 {r['float_s'] * 1e3:.0f} ms, "
          f"int8 {r['int8_s'] * 1e3:.0f} ms, speedup {r['float_s'] / r['int8_s']:.2f}x "
          f"(int8 vs float32 output: max |diff| {r['max_abs_err']:.3f}, min row cosine {r['min_cos']:.5f})")


if __name__ == "__main__":
    main()
