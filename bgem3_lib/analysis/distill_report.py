"""Reading a self-distillation run: the training log, smoothed loss curves, a collapsed sparse head,
and the three score matrices of a real batch for the losses of :mod:`bgem3_lib.training.losses`.

* :func:`load_training_log` / :func:`loss_frame` - ``training_log.json`` (written by
  :func:`bgem3_lib.training.recipe.run_m3_small`) as a tidy table ``step, run, part, value``;
* :func:`smooth` - trailing moving average for noisy per-batch losses;
* :func:`uniform_loss` and :func:`collapse_step` - the InfoNCE of a softmax that cannot tell
  ``N`` candidates apart is ``ln N`` (every score equal, e.g. a sparse head whose ReLU outputs only
  zeros); ``collapse_step`` finds the step from which a loss stays there;
* :func:`recipe_summary` - what a recipe trained, froze, and how long it took;
* :func:`pad_lexical`, :func:`pad_multivectors`, :func:`batch_scores` - ``BGEM3.encode`` outputs
  (dicts of token weights, ragged multi-vectors) padded into the ``[B, L]`` / ``[B, n, H]`` arrays that
  :func:`~bgem3_lib.training.losses.sparse_scores` and :func:`~bgem3_lib.training.losses.colbert_scores` take.

>>> round(uniform_loss(10, 4), 6)                       # ln 40: 10 queries x (1 positive + 3 negatives)
3.688879
>>> smooth([1.0, 3.0, 5.0, 7.0], window=2).tolist()     # means of the last <= 2 values
[1.0, 2.0, 4.0, 6.0]
>>> w, ids = pad_lexical([{"7": 0.5, "9": 0.25}, {}])
>>> w.tolist(), ids.tolist()
([[0.5, 0.25], [0.0, 0.0]], [[7, 9], [-1, -1]])
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

LOSS_PARTS = ("dense", "lex", "mul", "inter", "L", "distill_dense", "distill_lex", "distill_mul", "L_distill",
              "loss")


def load_training_log(model_dir: str | Path) -> dict:
    """The summary dict of ``model_dir/training_log.json`` (keys ``recipe``, ``seconds``, ``log``, ...).

    FileNotFoundError names the file and the command that writes it; ValueError if ``log`` is missing
    or empty.
    """
    path = Path(model_dir) / "training_log.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the model first "
                                "(python -m bgem3_lib train --recipe m3-small [--no-self-distill])")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (truncated?): {err}") from None
    if not isinstance(summary, dict) or not summary.get("log"):
        raise ValueError(f"{path} holds no per-step 'log' entries")
    return summary


def loss_frame(summary: Mapping, run: str) -> pd.DataFrame:
    """Tidy per-step losses: columns ``step, run, part, value`` for every part of :data:`LOSS_PARTS`
    present in the log (``distill_*`` only exist for runs with self-distillation).

    >>> loss_frame({"log": [{"step": 1, "dense": 2.0, "lex": 3.0, "grad_norm": 1.0}]}, "a").values.tolist()
    [[1, 'a', 'dense', 2.0], [1, 'a', 'lex', 3.0]]
    """
    log = summary.get("log") if isinstance(summary, Mapping) else None
    if not log:
        raise ValueError("summary holds no per-step 'log' entries")
    rows = [{"step": int(entry["step"]), "run": run, "part": part, "value": float(entry[part])}
            for entry in log for part in LOSS_PARTS if part in entry]
    if not rows:
        raise ValueError(f"no loss parts {LOSS_PARTS} in the log entries")
    df = pd.DataFrame(rows, columns=["step", "run", "part", "value"])
    if not np.isfinite(df["value"]).all():
        raise ValueError(f"run {run!r}: the log holds NaN or infinite losses")
    return df


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``, shape ``[n]``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or infinite entries")
    window = int(window)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (csum[i] - csum[lo]) / (i - lo)


def uniform_loss(batch_size: int, group_size: int) -> float:
    """InfoNCE of a uniform softmax over the ``batch_size * group_size`` in-batch candidates: ``ln N``."""
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size}, {group_size}")
    return math.log(batch_size * group_size)


def collapse_step(steps: Sequence[int], losses: Sequence[float], uniform: Sequence[float] | float,
                  tol: float = 1e-3) -> int | None:
    """First step from which every later loss lies within ``tol`` of the uniform loss (None if the last
    one does not): the step where a head stopped telling candidates apart for good.

    >>> collapse_step([1, 2, 3, 4], [1.0, 3.69, 3.6889, 3.6889], 3.688879)
    3
    """
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    uniform = np.broadcast_to(np.asarray(uniform, dtype=np.float64), losses.shape)
    if steps.shape != losses.shape or losses.ndim != 1 or losses.size == 0:
        raise ValueError(f"steps and losses must be equal-length non-empty 1-D arrays, got {steps.shape}, "
                         f"{losses.shape}")
    off = np.abs(losses - uniform) > tol
    if off[-1]:
        return None
    last_off = np.flatnonzero(off)
    return int(steps[last_off[-1] + 1]) if last_off.size else int(steps[0])


def recipe_summary(summary: Mapping, n_layers: int) -> dict:
    """The settings a reader needs from a training log: steps, batch shape, what was trained and frozen,
    learning rates, temperature, self-distillation, and wall times (seconds)."""
    r = summary["recipe"]
    log = summary["log"]
    train_layers = int(r["train_layers"])
    if not 0 <= train_layers <= n_layers:
        raise ValueError(f"train_layers {train_layers} outside [0, {n_layers}]")
    frozen = "embeddings" + (f" + layers 0-{n_layers - train_layers - 1}" if train_layers < n_layers else "")
    trained = "sparse + ColBERT heads" + (f" + top {train_layers} layer(s)" if train_layers else "")
    batch = [int(e["batch_size"]) for e in log if "batch_size" in e]
    sec = summary.get("seconds", {})
    return {"self-distillation": bool(r["use_self_distill"]), "steps": int(r["steps"]),
            "queries per batch (mean)": float(np.mean(batch)) if batch else float("nan"),
            "passages per query": 1 + int(r["n_negatives"]), "temperature": float(r["temperature"]),
            "trained": trained, "frozen": frozen + f" (of {n_layers})",
            "sparse head lr": float(r["head_lr"]), "ColBERT head lr": float(r["colbert_lr"]),
            "encoder lr": float(r["encoder_lr"]) if train_layers else 0.0,
            "training examples": int(summary.get("examples", {}).get("train", 0)),
            "caching frozen states (s)": float(sec.get("cache_states", float("nan"))),
            "training steps (s)": float(sec.get("train", float("nan"))),
            "total wall time (s)": float(sec.get("total", float("nan")))}


def pad_lexical(lexical_weights: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``encode()``'s ``lexical_weights`` (one ``{token_id: weight}`` per text) -> (weights ``[R, L]``
    float32, ids ``[R, L]`` int64), ``L`` = most tokens of any text (at least 1); padding has weight 0
    and id -1, so it never adds to a lexical score.
    """
    if isinstance(lexical_weights, Mapping) or len(lexical_weights) == 0:
        raise ValueError("expected a non-empty list of {token_id: weight} dicts")
    width = max(1, max(len(d) for d in lexical_weights))
    w = np.zeros((len(lexical_weights), width), np.float32)
    ids = np.full((len(lexical_weights), width), -1, np.int64)
    for i, d in enumerate(lexical_weights):
        if not isinstance(d, Mapping):
            raise TypeError(f"lexical_weights[{i}] must be a dict, got {type(d).__name__}")
        if d:
            ids[i, :len(d)] = [int(t) for t in d]
            w[i, :len(d)] = list(d.values())
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("lexical weights must be finite and non-negative")
    return w, ids


def pad_multivectors(vecs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged multi-vectors (``R`` arrays ``[n_i, H]``) -> (``[R, n, H]`` zero-padded, mask ``[R, n]`` bool)."""
    if len(vecs) == 0:
        raise ValueError("expected a non-empty list of [n_i, H] arrays")
    arrs = [np.asarray(v, dtype=np.float32) for v in vecs]
    for i, a in enumerate(arrs):
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"vecs[{i}] must be a non-empty [n, H] array, got shape {a.shape}")
    if len({a.shape[1] for a in arrs}) != 1:
        raise ValueError(f"hidden sizes differ: {sorted({a.shape[1] for a in arrs})}")
    n = max(a.shape[0] for a in arrs)
    out = np.zeros((len(arrs), n, arrs[0].shape[1]), np.float32)
    mask = np.zeros((len(arrs), n), bool)
    for i, a in enumerate(arrs):
        out[i, :len(a)], mask[i, :len(a)] = a, True
    return out, mask


def batch_scores(q_enc: Mapping, p_enc: Mapping) -> dict[str, np.ndarray]:
    """The three ``[B, N]`` score matrices of a training batch (``s_dense``, ``s_lex``, ``s_mul``) from
    ``BGEM3.encode`` outputs of ``B`` queries and ``N`` passages (dense, sparse and ColBERT all returned),
    computed by :mod:`bgem3_lib.training.losses`. Keys ``dense``, ``lex``, ``mul`` (float64 NumPy arrays).
    """
    from ..training.losses import colbert_scores, dense_scores, sparse_scores

    for name, enc in (("q_enc", q_enc), ("p_enc", p_enc)):
        missing = [k for k in ("dense_vecs", "lexical_weights", "colbert_vecs") if enc.get(k) is None]
        if missing:
            raise ValueError(f"{name} lacks {missing}: encode with return_sparse and return_colbert_vecs")
    qw, qi = pad_lexical(q_enc["lexical_weights"])
    pw, pi = pad_lexical(p_enc["lexical_weights"])
    qc, qm = pad_multivectors(q_enc["colbert_vecs"])
    pc, pm = pad_multivectors(p_enc["colbert_vecs"])
    qd = np.asarray(q_enc["dense_vecs"], np.float64)
    pd_ = np.asarray(p_enc["dense_vecs"], np.float64)
    return {"dense": dense_scores(qd, pd_).asnumpy(),
            "lex": sparse_scores(qw.astype(np.float64), qi, pw.astype(np.float64), pi).asnumpy(),
            "mul": colbert_scores(qc.astype(np.float64), qm, pc.astype(np.float64), pm).asnumpy()}
