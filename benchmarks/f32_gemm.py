"""Benchmark: the package's AVX-512 float32 kernel (``kernels/gemm_f32.h``) against the BLAS under the CPU kernels.

    .venv/bin/python benchmarks/f32_gemm.py [--runs 9] [--encode-runs 5] [--quick]

Two parts, each a paired comparison in one process, the two sides taking turns call by call (so load from other
users of the machine hits both alike); a ratio is the median over rounds of BLAS seconds / kernel seconds, shown
with its lowest and highest round:

* products: ``kernels.cpu.product`` (y = x @ W^T, both workers, the way the encoder's linear layers call it) on
  the encoder's weight shapes at M3-small (384 / 1536) and full size (1024 / 4096), 64 to 2048 token rows;
* encode: ``BGEM3.encode`` (dense, sparse and ColBERT) of the random-weight M3-small checkpoint in the BAAI layout
  (``encode_inputs.make_checkpoint``), fixed-length batches, kernel on against off; the dense outputs of the two
  must agree to 1e-5.

Which BLAS kernel runs depends on the machine's ``OPENBLAS_CORETYPE``; the results file keeps one entry per
OpenBLAS kernel, so a pinned run (the machine's own environment) and an unpinned one
(``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE``) sit side by side in ``results/f32_gemm.{json,md}`` (full mode
only). The last line printed is ``f32gemm_speedup_vs_blas=…`` (the worst product ratio) and
``encode_speedup=…``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from encode_inputs import ROOT, blas_info, cpu_model, describe_blas, make_checkpoint

from bgem3_lib.kernels import cpu as ck

OUT = ROOT / "benchmarks" / "results" / "f32_gemm"
SHAPES = {"m3-small qkv (384 x 384)": (384, 384), "m3-small ffn in (1536 x 384)": (1536, 384),
          "m3-small ffn out (384 x 1536)": (384, 1536), "full qkv (1024 x 1024)": (1024, 1024),
          "full ffn in (4096 x 1024)": (4096, 1024), "full ffn out (1024 x 4096)": (1024, 4096)}
ROWS = (64, 256, 1024, 2048)
ENCODES = {"16 x 512 tokens, batch 4": (16, 512, 4), "64 x 128 tokens, batch 8": (64, 128, 8)}


def paired(on, off, runs: int) -> dict:
    """Seconds of ``runs`` rounds of on() and off() (one warm-up each; the order alternates by round):
    ``{"on", "off"}`` medians, ``speedup`` = median of off / on per round, ``low`` / ``high`` its extreme rounds."""
    ck.set_f32gemm(True)
    on()
    ck.set_f32gemm(False)
    off()
    t = {True: [], False: []}
    for r in range(runs):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            ck.set_f32gemm(side)
            t0 = time.perf_counter()
            (on if side else off)()
            t[side].append(time.perf_counter() - t0)
    ratio = np.array(t[False]) / np.array(t[True])
    return {"on": float(np.median(t[True])), "off": float(np.median(t[False])),
            "speedup": float(np.median(ratio)), "low": float(ratio.min()), "high": float(ratio.max())}


def products(runs: int, rows: tuple) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, (n, k) in SHAPES.items():
        w = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float32)
            res = paired(lambda x=x, w=w: ck.product(x, w), lambda x=x, w=w: ck.product(x, w), runs)
            res["gflop_per_s_on"] = 2 * m * n * k / res["on"] / 1e9
            res["gflop_per_s_off"] = 2 * m * n * k / res["off"] / 1e9
            out[f"{name}, {m} rows"] = res
            print(f"{name}, {m} rows: {res['speedup']:.2f}x ({res['low']:.2f}-{res['high']:.2f}), "
                  f"{res['gflop_per_s_on']:.0f} vs {res['gflop_per_s_off']:.0f} GFLOP/s", flush=True)
    return out


def encodes(runs: int, cases: dict) -> dict:
    import warnings

    from bgem3_lib import BGEM3
    warnings.filterwarnings("ignore", message=".*were truncated")       # fixed lengths: truncation is the point
    model = BGEM3(str(make_checkpoint("m3-small")), dtype="float32")
    words = "the of and to in a is that for it as was with be by on not this are or from at which".split()
    rng = np.random.default_rng(0)
    out = {}
    for name, (count, length, batch) in cases.items():
        texts = [" ".join(rng.choice(words, length)) for _ in range(count)]

        def run(texts=texts, batch=batch, length=length):
            return model.encode(texts, batch_size=batch, max_length=length, return_dense=True, return_sparse=True,
                                return_colbert_vecs=True, show_progress=False)["dense_vecs"]
        ck.set_f32gemm(True)
        a = run()
        ck.set_f32gemm(False)
        diff = float(np.abs(a - run()).max())
        if not diff <= 1e-5:
            raise SystemExit(f"{name}: dense outputs with and without the kernel differ by {diff:.3g} (> 1e-5)")
        res = paired(run, run, runs)
        res["max_abs_dense_diff"] = diff
        out[name] = res
        print(f"encode {name}: {res['speedup']:.2f}x ({res['low']:.2f}-{res['high']:.2f}), {res['on']:.2f} s vs "
              f"{res['off']:.2f} s, dense diff {diff:.1e}", flush=True)
    return out


def markdown(results: dict) -> str:
    lines = ["# The AVX-512 float32 kernel against the BLAS", "",
             "Generated by `benchmarks/f32_gemm.py` from `f32_gemm.json`; do not edit by hand. Each cell: BLAS "
             "seconds / kernel seconds, median over interleaved rounds in one process, lowest and highest round in "
             "brackets; products give both sides' GFLOP/s.", ""]
    for kernel, run in results.items():
        lines += [f"## OpenBLAS {kernel} kernel", "",
                  f"{run['cpu_model']}; {run['blas']}; {run['runs']} rounds; at {run['commit']}.", "",
                  "| product | speedup | kernel / BLAS GFLOP/s |", "|---|---|---|"]
        lines += [f"| {k} | {v['speedup']:.2f}x ({v['low']:.2f}-{v['high']:.2f}) | {v['gflop_per_s_on']:.0f} / "
                  f"{v['gflop_per_s_off']:.0f} |" for k, v in run["products"].items()]
        lines += ["", "| M3-small encode | speedup | kernel / BLAS seconds | max dense diff |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['speedup']:.2f}x ({v['low']:.2f}-{v['high']:.2f}) | {v['on']:.2f} / {v['off']:.2f} |"
                  f" {v['max_abs_dense_diff']:.1e} |" for k, v in run["encode"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--encode-runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds; writes no results")
    args = ap.parse_args()
    if not ck.set_f32gemm(True):
        raise SystemExit("the AVX-512 float32 kernel does not run here (no AVX-512, or the CPU kernels are off)")
    blas = blas_info()
    print(describe_blas(blas), flush=True)
    rows = (256, 1024) if args.quick else ROWS
    runs, encode_runs = (3, 3) if args.quick else (args.runs, args.encode_runs)
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    run = {"cpu_model": cpu_model(), "blas": describe_blas(blas), "runs": runs, "commit": commit,
           "products": products(runs, rows),
           "encode": encodes(encode_runs, dict(list(ENCODES.items())[:1]) if args.quick else ENCODES)}
    ck.choose_f32gemm(ck._state["lib"])
    if not args.quick:
        old = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").is_file() else {}
        old[blas["kernel"]] = run
        OUT.with_suffix(".json").write_text(json.dumps(old, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(markdown(old))
    worst = min(v["speedup"] for v in run["products"].values())
    enc = min(v["speedup"] for v in run["encode"].values())
    print(f"f32gemm_speedup_vs_blas={worst:.2f} encode_speedup={enc:.2f}")


if __name__ == "__main__":
    main()
