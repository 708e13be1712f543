"""Explorers that work in the rendered book, with no kernel: the data goes into the page, the browser recomputes.

A chapter's ipywidgets need a live kernel; the built HTML keeps only their last picture. For the static
page the chapter shows an HTML explorer instead (``book/_static/bgem3_widgets.js``, served by the book,
does the work in the browser):

* :func:`weight_explorer_html` - chapter 5's three weight sliders and metric toggle. The page carries,
  per benchmark and language, every query's candidate scores (dense, sparse, ColBERT; float32, base64)
  and its relevance judgements; the script recombines them with the reader's weights in float32, exactly
  as :func:`~bgem3_lib.retrieval.modes.fuse` does, ranks with the retriever's tie rule and draws nDCG@10
  or Recall@20 per language against the paper's weights, as the Python figure does. ``checks`` holds
  the values :func:`~bgem3_lib.analysis.weight_search.evaluate_weights` computed at a few weight vectors
  during the build, so ``book/check_book.py`` can move the sliders there and compare (to 1e-6).
* :func:`image_switcher_html` - a figure with a few discrete variants (chapter 2's pooling x score):
  every variant is drawn by Python at build time and the buttons switch between them.

``tests/analysis/test_static_widgets.py`` runs the script under node and compares its numbers with
:func:`python_values` at many weightings (equal to 1e-12).
"""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence

import numpy as np

from .weight_search import CandidateScores, Judgements, evaluate_weights

EXPLORER_CLASS = "bgem3-weight-explorer"
SWITCHER_CLASS = "bgem3-image-switcher"


def _b64(x: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype=dtype).tobytes()).decode("ascii")


def encode_set(cs: CandidateScores, judged: Judgements) -> dict:
    """One (benchmark, language): candidate counts per query, the three scores of the valid candidates
    (row-major, float32 little-endian, base64) and the judgements (candidate column and gain of each
    relevant candidate, the ideal gains, the number of relevant documents)."""
    valid = cs.valid
    counts = valid.sum(1)
    if not (valid == (np.arange(valid.shape[1]) < counts[:, None])).all():
        raise ValueError("candidate rows must hold their valid candidates first, then pads")
    out = {"counts": counts.tolist()}
    for name in ("dense", "sparse", "colbert"):
        out[name] = _b64(getattr(cs, name)[valid], "<f4")
    has = judged.cols >= 0
    out["rel_cols"] = [row[h].tolist() for row, h in zip(judged.cols, has)]
    out["rel_gains"] = [row[h].tolist() for row, h in zip(judged.gains, has)]
    out["ideal"] = [row[row > 0].tolist() for row in judged.ideal]
    out["n_relevant"] = judged.n_relevant.tolist()
    return out


def python_values(data: Mapping, weights, metric: str) -> list[float]:
    """The metric per set at ``weights`` (one triple, or one per set), as the chapter's Python figure computes it."""
    per_set = weights if np.ndim(weights) == 2 else [weights] * len(data)
    return [float(evaluate_weights(cs, judged, w, (metric,))[metric][0])
            for (cs, judged), w in zip(data.values(), per_set)]


def explorer_payload(data: Mapping, labels: Sequence[str], metrics: Sequence[str], initial: Sequence[float],
                     reference: Sequence[Sequence[float]], check_weights: Sequence[Sequence[float]] = ()) -> dict:
    """JSON-ready payload of :func:`weight_explorer_html` (``data``: {(task, lang): (CandidateScores,
    Judgements)}; ``reference``: the paper's weights per set, drawn as ticks)."""
    if len(labels) != len(data) or len(reference) != len(data):
        raise ValueError(f"{len(data)} sets but {len(labels)} labels and {len(reference)} reference weights")
    checks = [{"weights": [float(x) for x in w], "metric": m, "values": python_values(data, w, m)}
              for w in check_weights for m in metrics]
    ref_values = {m: python_values(data, reference, m) for m in metrics}
    return {"metrics": list(metrics), "labels": list(labels), "initial": [float(x) for x in initial],
            "reference": [[float(x) for x in w] for w in reference], "reference_values": ref_values,
            "sets": [encode_set(cs, judged) for cs, judged in data.values()], "checks": checks}


def weight_explorer_html(payload: Mapping, element_id: str, step: float = 0.05) -> str:
    """The static explorer: three range sliders, the metric buttons, an SVG chart and the data."""
    sliders = "".join(
        f'<label>w_{name} <input type="range" min="0" max="1" step="{step}" value="{v}" data-weight="{i}">'
        f'<output>{v:.2f}</output></label>'
        for i, (name, v) in enumerate(zip(("dense", "sparse", "colbert"), payload["initial"])))
    buttons = "".join(f'<button type="button" data-metric="{html.escape(m)}"{" aria-pressed=true" if i == 0 else ""}>'
                      f'{html.escape(m)}</button>' for i, m in enumerate(payload["metrics"]))
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    return (f'<div class="{EXPLORER_CLASS}" id="{html.escape(element_id)}">'
            f'<div class="bgem3-sliders">{sliders}</div><div class="bgem3-buttons">metric {buttons}</div>'
            f'<svg class="bgem3-chart" viewBox="0 0 900 340" width="100%" role="img"></svg>'
            f'<script type="application/json" class="bgem3-data">{data}</script></div>')


def image_switcher_html(images: Mapping[tuple, bytes], controls: Mapping[str, Sequence[str]], initial: Sequence[str],
                        element_id: str) -> str:
    """Buttons per control (``{name: options}``) switching between PNGs drawn at build time, one per
    combination of options (``images[(option of control 1, option of control 2, ...)]``)."""
    names = list(controls)
    missing = [key for key in _combinations([controls[n] for n in names]) if key not in images]
    if missing:
        raise ValueError(f"no image for the option combination(s) {missing[:3]}")
    groups = "".join(
        f'<div class="bgem3-buttons" data-control="{html.escape(n)}">{html.escape(n)} ' + "".join(
            f'<button type="button" data-option="{html.escape(o)}"'
            f'{" aria-pressed=true" if o == initial[i] else ""}>{html.escape(o)}</button>' for o in controls[n])
        + "</div>" for i, n in enumerate(names))
    imgs = "".join(f'<img alt="{html.escape(" / ".join(key))}" data-key="{html.escape(json.dumps(list(key)))}"'
                   f'{"" if list(key) == list(initial) else " hidden"} src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode("ascii")}">' for key, png in images.items())
    return (f'<div class="{SWITCHER_CLASS}" id="{html.escape(element_id)}" '
            f'data-controls="{html.escape(json.dumps(names))}">{groups}<div class="bgem3-images">{imgs}</div></div>')


def _combinations(options: list[Sequence[str]]) -> list[tuple]:
    out = [()]
    for opts in options:
        out = [key + (o,) for key in out for o in opts]
    return out
