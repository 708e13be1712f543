"""What length bucketing saves, measured: padding per batch, forward time, tokens per second, and the
memory one encoder layer needs as the sequence grows.

A batch of token sequences is padded to its longest member, so a batch costs
``batch_size * padded_len`` token slots of which only ``sum(lengths)`` are real. :func:`batch_shapes`
lists both per batch; :func:`time_batches` runs a forward function over the padded batches and
records the seconds; :func:`throughput` turns the rows into real tokens per second and padding waste.
Comparing two orders of the *same* texts (e.g. :class:`~bgem3_lib.training.bucketing.LengthBucketSampler`
batches against :func:`~bgem3_lib.training.bucketing.random_batches`) gives the speed-up bucketing buys.

Memory: :func:`layer_activation_bytes` counts the activations one post-LN transformer layer keeps for
its backward pass (linear in the length, plus the ``heads * L * L`` attention matrices);
:func:`measure_layer_memory` measures the peak resident-memory growth of one MindSpore layer's
training step (forward + backward) in a fresh process per length (MindSpore's memory pool never
returns memory to the system, so a process can only measure its first, largest call).

>>> batch_shapes([[0, 1]], [3, 5, 4])
[{'batch_size': 2, 'padded_len': 5, 'real_tokens': 8, 'padded_tokens': 10}]
>>> throughput([{'real_tokens': 8, 'padded_tokens': 10, 'seconds': 2.0}])['tokens_per_s']
4.0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..progress import tqdm

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _lengths(lengths: Sequence[int]) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be a non-empty 1-D sequence of integers, got {arr.dtype} {arr.shape}")
    if arr.min() < 1:
        raise ValueError(f"lengths must be >= 1 token, got minimum {arr.min()}")
    return arr.astype(np.int64)


def batch_shapes(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[dict]:
    """Per batch: ``batch_size``, ``padded_len`` (longest member), ``real_tokens``, ``padded_tokens``."""
    arr = _lengths(lengths)
    rows = []
    for k, batch in enumerate(batches):
        idx = np.asarray(list(batch), dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"batch {k} is empty")
        if idx.min() < 0 or idx.max() >= arr.size:
            raise ValueError(f"batch {k} has an index outside [0, {arr.size}): {idx.tolist()}")
        longest = int(arr[idx].max())
        rows.append({"batch_size": int(idx.size), "padded_len": longest,
                     "real_tokens": int(arr[idx].sum()), "padded_tokens": int(idx.size * longest)})
    return rows


def time_batches(forward: Callable[[np.ndarray, np.ndarray], object], token_ids: Sequence[Sequence[int]],
                 batches: Sequence[Sequence[int]], pad: Callable, warmup: int = 1,
                 desc: str | None = None) -> list[dict]:
    """Run ``forward(ids [B, L], mask [B, L])`` on every batch padded by ``pad`` (e.g.
    ``model.tokenizer.pad``: list of id lists -> (ids, mask)); rows of :func:`batch_shapes` plus
    ``seconds`` (wall time of that call). ``forward`` must block until its result exists (e.g. call
    ``.asnumpy()``). The first ``warmup`` batches are run once, untimed, before the loop (first calls
    pay one-off set-up costs). ``desc``: show a progress bar with this label.
    """
    lengths = [len(t) for t in token_ids]
    rows = batch_shapes(batches, lengths)
    for batch in list(batches)[:max(0, warmup)]:
        forward(*pad([token_ids[i] for i in batch]))
    for row, batch in zip(rows, tqdm(batches, desc=desc or "timed batches", disable=desc is None)):
        ids, mask = pad([token_ids[i] for i in batch])
        if tuple(np.shape(ids)) != (row["batch_size"], row["padded_len"]) or np.shape(mask) != np.shape(ids):
            raise ValueError(f"pad returned ids {np.shape(ids)} / mask {np.shape(mask)}, expected "
                             f"{(row['batch_size'], row['padded_len'])}")
        start = time.perf_counter()
        forward(ids, mask)
        row["seconds"] = time.perf_counter() - start
    return rows


def padded_forward(encoder, n_layers: int | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``forward(ids, mask)`` for :func:`time_batches`: the embeddings and the first ``n_layers`` layers
    of a :class:`~bgem3_lib.model.encoder.M3Encoder` (all when None) on the *padded* ``[B, L]`` batch with
    MindSpore ops, as in training, where every padding slot costs as much as a real token (the packed
    inference kernels of ``forward_packed`` skip padding). Returns the ``[B, L, H]`` states as NumPy.
    """
    from ..model.encoder import encoder_inputs

    total = len(encoder.layers)
    n = total if n_layers is None else int(n_layers)
    if not 1 <= n <= total:
        raise ValueError(f"n_layers must lie in [1, {total}], got {n_layers}")

    def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ids_t, mask_t, pos_t = encoder_inputs(np.asarray(ids), np.asarray(mask), encoder.cfg)
        x = encoder.embed(ids_t, pos_t)
        return encoder.run_layers(x, encoder.mask_bias(mask_t), 0, n).asnumpy()

    return forward


def throughput(rows: Sequence[dict]) -> dict:
    """Totals of :func:`time_batches` rows: ``real_tokens``, ``padded_tokens``, ``seconds``,
    ``tokens_per_s`` (real tokens per second), ``padded_per_s`` and ``padding_waste``."""
    if not rows:
        raise ValueError("throughput needs at least one timed batch")
    real = sum(int(r["real_tokens"]) for r in rows)
    padded = sum(int(r["padded_tokens"]) for r in rows)
    seconds = float(sum(float(r["seconds"]) for r in rows))
    if not np.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"total seconds must be positive, got {seconds}")
    return {"batches": len(rows), "real_tokens": real, "padded_tokens": padded, "seconds": seconds,
            "tokens_per_s": real / seconds, "padded_per_s": padded / seconds,
            "padding_waste": 1.0 - real / padded}


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_growth(fn: Callable[[], object], interval: float = 5e-4) -> tuple[object, int]:
    """``(fn(), peak resident bytes during the call minus the bytes before it)``, sampled every
    ``interval`` seconds by a background thread."""
    best, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            best[0] = max(best[0], rss_bytes())
            time.sleep(interval)

    before = rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    return result, max(best[0], rss_bytes()) - before


def layer_activation_bytes(batch: int, length: int, hidden: int, heads: int, intermediate: int,
                           dtype_bytes: int = 4) -> dict:
    """Activations one post-LN transformer layer keeps for backward, in bytes (LayerNorm statistics
    and biases ignored): the input, q, k, v, the attention context and the attention output
    (``5 * B * L * H``), the FFN's pre- and post-GELU states (``2 * B * L * I``): the *linear* part;
    and the attention scores and probabilities (``2 * B * heads * L * L``): the *quadratic* part.

    >>> layer_activation_bytes(1, 2, 4, 2, 8, dtype_bytes=1)
    {'linear': 72, 'quadratic': 16, 'total': 88}
    """
    for name, v in (("batch", batch), ("length", length), ("hidden", hidden), ("heads", heads),
                    ("intermediate", intermediate), ("dtype_bytes", dtype_bytes)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    linear = batch * length * (5 * hidden + 2 * intermediate) * dtype_bytes
    quadratic = 2 * batch * heads * length * length * dtype_bytes
    return {"linear": int(linear), "quadratic": int(quadratic), "total": int(linear + quadratic)}


def _layer_step(batch: int, length: int, hidden: int, heads: int, intermediate: int, train: bool) -> dict:
    """In this process: peak RSS growth of one e5-shaped layer's forward (+ backward if ``train``)."""
    import mindspore as ms
    from mindspore import Tensor

    from ..model.config import M3Config
    from ..model.encoder import Layer

    cfg = M3Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                   intermediate_size=intermediate, vocab_size=8, model_type="bert")
    layer = Layer(cfg)
    layer.set_train(train)
    x = Tensor(np.random.default_rng(0).standard_normal((batch, length, hidden), dtype=np.float32))
    bias = Tensor(np.zeros((batch, 1, 1, length), np.float32))
    if train:
        step = ms.value_and_grad(lambda h: layer(h, bias).sum(), None, layer.trainable_params())

        def fn():
            return [g.asnumpy() for g in step(x)[1]]
    else:
        def fn():
            return layer(x, bias).asnumpy()
    start = time.perf_counter()
    _, grown = peak_rss_growth(fn)
    return {"batch": batch, "length": length, "train": train, "peak_bytes": int(grown),
            "seconds": time.perf_counter() - start}


def measure_layer_memory(lengths: Sequence[int], batch: int = 8, hidden: int = 384, heads: int = 12,
                         intermediate: int = 1536, train: bool = True, timeout: float = 600.0) -> list[dict]:
    """Peak resident-memory growth of one layer's training step (or forward, ``train=False``) for each
    length, each in a fresh Python process. Rows: ``batch, length, train, peak_bytes, seconds`` plus
    ``estimate_bytes`` from :func:`layer_activation_bytes` (float32).
    """
    lengths = [int(x) for x in _lengths(lengths)]
    rows = []
    for length in tqdm(lengths, desc="layer memory", disable=len(lengths) < 2):
        cmd = [sys.executable, "-m", "bgem3_lib.analysis.batching_stats", "--batch", str(batch),
               "--length", str(length), "--hidden", str(hidden), "--heads", str(heads),
               "--intermediate", str(intermediate)]
        if not train:
            cmd.append("--forward-only")
        env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"layer memory run for length {length} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        row = json.loads(lines[-1])
        row["estimate_bytes"] = layer_activation_bytes(batch, length, hidden, heads, intermediate)["total"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS growth of one encoder layer's step (JSON line)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--forward-only", action="store_true")
    a = ap.parse_args(argv)
    if min(a.batch, a.length, a.hidden, a.heads, a.intermediate) < 1 or a.hidden % a.heads:
        ap.error("sizes must be positive and hidden divisible by heads")
    print(json.dumps(_layer_step(a.batch, a.length, a.hidden, a.heads, a.intermediate, not a.forward_only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
