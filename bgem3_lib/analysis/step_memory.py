"""Peak memory of one real training step on long passages: plain, recompute, split batch (issue 14, step 4).

The step is the trainer's (:class:`~bgem3_lib.training.train_model.M3TrainNet`): the top ``train_layers`` of
a real encoder (``m3-small-long`` by default: e5-small with positions to 8192) and the M3 heads trainable,
starting from the hidden states the frozen layers give (the recipe's hidden cache); one real question and
``passages`` real passages of exactly ``length`` tokens (its positive and in-batch negatives; XQuAD
articles, cut). Each strategy runs in a fresh Python process: after one warm-up step on 64-token passages,
it measures its runs from the smallest to the largest and records, for each, the process's peak resident
memory during ``value_and_grad`` of the loss minus its memory before the first measured step (the memory
pool keeps what a run took, so a run's peak is at least every smaller run's).

==========================  ============================================================================
``plain``                   every trainable layer keeps its activations for backward
``recompute``               gradient checkpointing: layers (and attention blocks) rebuilt in backward
``split + recompute``       one passage per sub-batch, each recomputed in backward (the paper's split batch)
==========================  ============================================================================

A run whose count (:func:`~bgem3_lib.analysis.longdoc_eval.training_activation_bytes`, times
:data:`SAFETY`) would pass ``cap_bytes`` is not started: its row says so (``measured = False``).

:func:`largest_batch` turns two measured passage counts into the Table-9 question: how many passages of a
length fit a memory cap, per strategy (peak = fixed + per-passage x passages, fitted on the two points).

>>> largest_batch({1: 300 * 2**20, 3: 500 * 2**20}, cap_bytes=2**30)
8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .batching_stats import layer_activation_bytes, peak_rss_growth
from .longdoc_eval import training_activation_bytes

STRATEGIES = {"plain": dict(sub_batch=0, recompute=False), "recompute": dict(sub_batch=0, recompute=True),
              "split + recompute": dict(sub_batch=1, recompute=True)}
SAFETY = 4          # measured peaks ran up to ~3x the activation count (chapter 7): do not start past cap/SAFETY
QUERY = "Which river flows through the city?"


def passage_ids(tokenizer, length: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` real passages of exactly ``length`` ids (``<s>`` ... ``</s>``) -> int32 [count, length]: the
    English XQuAD text of :func:`~bgem3_lib.analysis.long_cost.texts_of_length` (the first ``k`` rows do not
    depend on ``count``)."""
    from .long_cost import texts_of_length
    texts = texts_of_length(tokenizer, length, count, seed=seed, langs=("en",))
    ids = np.asarray(tokenizer.encode_ids(texts, length, warn=False), dtype=np.int32)
    assert ids.shape == (count, length), (ids.shape, count, length)
    return ids


def step_peaks(model: str, runs: Sequence[tuple[int, int]], strategy: str, train_layers: int = 1,
               workdir: str | None = None):
    """In this process: load ``model`` once, then for each ``(length, passages)`` of ``runs`` (ascending) build
    the step's inputs and measure it; yields result rows. The memory pool keeps what earlier (smaller) runs
    took, so each peak is the process's resident growth over its state before the first step."""
    import mindspore as ms
    from mindspore import Tensor

    from ..model.bgem3 import BGEM3
    from ..model.encoder import encoder_inputs
    from ..training.train_model import M3TrainNet
    from .batching_stats import rss_bytes

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    m = BGEM3(model, backend="mindspore")
    enc, cfg = m.encoder, m.config
    if not 1 <= train_layers <= cfg.num_hidden_layers:
        raise ValueError(f"train_layers must lie in [1, {cfg.num_hidden_layers}], got {train_layers}")
    start = cfg.num_hidden_layers - train_layers

    def prepare(ids):                                  # the hidden cache: frozen layers, forward only
        t_ids, t_mask, t_pos = encoder_inputs(ids, np.ones_like(ids), cfg)
        path = None if workdir is None else os.path.join(workdir, f"{model}-{start}-{ids.shape}-{ids.sum()}.npy")
        if path and os.path.isfile(path):
            hidden = np.load(path)
        else:
            hidden = enc.run_layers(enc.embed(t_ids, t_pos), enc.mask_bias(t_mask), 0, start).asnumpy()
            if path:
                np.save(path, hidden)
        return t_ids, t_mask, t_pos, Tensor(hidden)

    q = prepare(np.asarray(m.tokenizer.encode_ids([m.query_instruction + QUERY], 64, warn=False)[0], np.int32)[None])
    net = M3TrainNet(enc, m.heads, start_layer=start, freeze_layers=start, special_ids=m.special_ids,
                     **STRATEGIES[strategy])
    grad = ms.value_and_grad(net, grad_position=None, weights=net.trainable_params(), has_aux=True)
    most = max(k for _, k in runs)
    warm = prepare(passage_ids(m.tokenizer, 64, 2))
    grad(*q, *warm)                                    # one-time allocations of the first step, not of a length
    base = None
    for length, passages in sorted(runs, key=lambda r: count_bytes(r[0], r[1], strategy, train_layers=train_layers)):
        p = prepare(passage_ids(m.tokenizer, length, most))          # the first k of the same passages
        inputs = (*q, *(x[:passages] for x in p))
        before = rss_bytes()
        base = before if base is None else base
        t0 = time.perf_counter()
        ((loss, *_), grads), grown = peak_rss_growth(lambda x=inputs: grad(*x))
        seconds = time.perf_counter() - t0
        if not np.isfinite(float(loss.asnumpy())):
            raise FloatingPointError(f"the step's loss is {loss}")
        yield {"strategy": strategy, "length": length, "passages": passages, "train_layers": train_layers,
               "measured": True, "peak_bytes": int(before + grown - base), "seconds": seconds,
               "loss": float(loss.asnumpy()), "n_grads": len(grads)}


def count_bytes(length: int, passages: int, strategy: str, hidden: int = 384, heads: int = 12,
                intermediate: int = 1536, train_layers: int = 1) -> int:
    """The activation count of a step (passages only; queries are short) for a strategy, float32. With
    recompute, the attention scores rebuilt in backward are one ATTENTION_BLOCK of query rows at a time.

    >>> count_bytes(8192, 2, "plain") > 5 * count_bytes(8192, 2, "recompute") > 0
    True
    """
    from ..model.encoder import ATTENTION_BLOCK
    s = STRATEGIES[strategy]
    out = training_activation_bytes(passages, length, hidden, heads, intermediate, layers=train_layers,
                                    recompute=s["recompute"], sub_batch=s["sub_batch"] or None)
    if s["recompute"] and length > ATTENTION_BLOCK:
        quad = layer_activation_bytes(s["sub_batch"] or passages, length, hidden, heads, intermediate)["quadratic"]
        out["total"] -= quad * (1 - ATTENTION_BLOCK / length)
    return int(out["total"])


def measure_step_memory(lengths: Sequence[int], passages: Sequence[int] = (2, 4), strategies=tuple(STRATEGIES),
                        model: str = "m3-small-long", train_layers: int = 1, cap_bytes: int = 8 * 2**30,
                        timeout: float = 3600.0) -> list[dict]:
    """One row per (strategy, length, passages); each strategy runs in its own fresh process. A run is
    skipped (``measured`` False, ``peak_bytes`` None) when SAFETY x its count would pass ``cap_bytes``.
    Rows carry ``count_bytes``, the activation count of :func:`count_bytes`."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgem3-step-memory-") as work:
        for s in tqdm(list(strategies), desc="training-step memory"):
            runs, counts = [], {}
            for n in lengths:
                for k in passages:
                    counts[n, k] = count_bytes(int(n), int(k), s, train_layers=train_layers)
                    if SAFETY * counts[n, k] > cap_bytes:
                        rows.append({"strategy": s, "length": int(n), "passages": int(k), "train_layers": train_layers,
                                     "measured": False, "peak_bytes": None, "seconds": None,
                                     "count_bytes": counts[n, k]})
                    else:
                        runs.append(f"{int(n)}x{int(k)}")
            if not runs:
                continue
            cmd = [sys.executable, "-m", "bgem3_lib.analysis.step_memory", "--model", model, "--strategy", s,
                   "--train-layers", str(train_layers), "--workdir", work, "--runs", *runs]
            env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"), TQDM_DISABLE="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            got = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or len(got) != len(runs):
                raise RuntimeError(f"step memory runs of {s!r} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            rows += [{**r, "count_bytes": counts[r["length"], r["passages"]]} for r in got]
    return rows


def largest_batch(peaks: Mapping[int, float], cap_bytes: float) -> int:
    """Passages per step that fit ``cap_bytes``, from measured peaks ``{passages: bytes}`` at two (or more)
    passage counts: a least-squares line peak = fixed + slope x passages, then floor((cap - fixed) / slope).
    The line is fitted in closed form from centred sums (no LAPACK): equal peaks give a slope of exactly 0,
    where ``np.polyfit`` left a rounding residue of 1e-14 under OpenBLAS's Haswell kernel (and a batch of 4e15).

    >>> largest_batch({2: 200.0, 4: 300.0}, 1000.0)
    18
    """
    if len(peaks) < 2:
        raise ValueError(f"need peaks at two passage counts at least, got {dict(peaks)}")
    k = np.array(sorted(peaks), float)
    y = np.array([peaks[int(x)] for x in k], float)
    dk, dy = k - k.mean(), y - y.mean()
    slope = float((dk * dy).sum() / (dk * dk).sum())
    fixed = float(y.mean() - slope * k.mean())
    if slope <= 0:
        return int(k.max()) if y.max() <= cap_bytes else 0
    return max(0, int((cap_bytes - fixed) // slope))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="m3-small-long")
    ap.add_argument("--train-layers", type=int, default=1)
    ap.add_argument("--strategy", choices=list(STRATEGIES), help="measure these runs in this process")
    ap.add_argument("--runs", nargs="+", help="LENGTHxPASSAGES, e.g. 512x1 512x2")
    ap.add_argument("--workdir", help="where hidden states are shared between strategies")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                    help="without --strategy: the table over every strategy, 2 and 4 passages")
    ap.add_argument("--cap-gib", type=float, default=8.0, help="without --strategy: skip runs past this")
    a = ap.parse_args(argv)
    if a.strategy is None:
        for r in measure_step_memory(a.lengths, (2, 4), model=a.model, train_layers=a.train_layers,
                                     cap_bytes=int(a.cap_gib * 2**30)):
            print(json.dumps(r), flush=True)
        return 0
    if not a.runs:
        ap.error("--strategy needs --runs")
    try:
        runs = [tuple(int(v) for v in r.split("x")) for r in a.runs]
    except ValueError:
        ap.error(f"--runs must look like 2048x2, got {a.runs}")
    for row in step_peaks(a.model, runs, a.strategy, a.train_layers, a.workdir):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
