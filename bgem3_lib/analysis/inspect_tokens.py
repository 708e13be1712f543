"""Looking inside the sparse and multi-vector representations, token by token.

Lexical weights (paper Sec. 3.1): position i of a text gets ``w_i = ReLU(W_lex^T h_i)``; the text's
weight for token id t is the max of ``w_i`` over the positions holding t; ``<s> </s> <pad> <unk>``
and zero weights are dropped (:func:`bgem3_lib.model.heads.sparse_embedding`). Here:

* :func:`token_weights` - the per-position weights *before* the max (one forward pass);
* :func:`position_weights` - a text's lexical dict spread back over its positions;
* :func:`highlight_html` / :func:`highlight_figure` - weights drawn on the text (HTML spans whose
  background opacity is ``weight / vmax``; the same picture as a static matplotlib figure);
* :func:`shared_tokens`, :func:`document_frequency`, :func:`gold_ranks`, :func:`matched_run` -
  which tokens make a lexical score, how rare they are, where the gold passage lands;
* :func:`maxsim_matrix`, :func:`maxsim`, :func:`best_window` - the ColBERT token-to-token matrix
  ``S = E_q E_p^T`` [n, m] and its row maxima (their mean is the multi-vector score);
* :func:`storage_bytes` - bytes per text of each representation.

>>> shared_tokens({"7": 0.5, "9": 0.1}, {"7": 0.4, "8": 1.0})
[('7', 0.5, 0.4, 0.2)]
>>> print(highlight_html(["<s>", "\u2581Super", "\u2581Bowl", "</s>"], [0.0, 0.2, 0.4, 0.0], vmax=0.4,
...                      legend=False))                                          # doctest: +ELLIPSIS
<div class="bgem3-highlight" ...> <span ...rgba(214,39,40,0.500)...>Super</span> <span ...1.000)...>Bowl</span></div>
"""
from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from ..model.tokenization import check_texts
from ..retrieval.metrics import run_from_scores
from ..retrieval.scoring import _finite_matrix

SPECIAL_PIECES = ("<s>", "</s>", "<pad>", "<unk>")
WORD_START = "\u2581"                      # sentencepiece's "starts a new word" marker
_MONO_ADVANCE = 0.602                      # advance width of a DejaVu Sans Mono glyph, in em


# ---------------------------------------------------------------- tokens and their weights

def text_pieces(tokenizer, text: str, max_length: int) -> tuple[np.ndarray, list[str]]:
    """One text -> (ids [n] int64, pieces [n]) with ``<s>`` and ``</s>``, cut as the model cuts it.

    ColBERT vectors belong to pieces ``[1:]`` (``<s>`` has none, ``</s>`` has one).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r:.60}")
    ids = tokenizer.encode_ids([text], max_length, warn=False)[0]
    return np.asarray(ids, np.int64), [tokenizer.id_to_token(i) for i in ids]


def token_weights(model, texts: Sequence[str], max_length: int | None = None) -> list[np.ndarray]:
    """Per-position sparse weights ``ReLU(W_lex^T h_i)`` before the max per id (one padded batch).

    ``texts`` are encoded as given (add ``model.query_instruction`` / ``passage_instruction``
    yourself). Returns one float32 array [n_i] per text, aligned with
    ``model.tokenizer.encode_ids(texts, max_length)`` (``<s>`` and ``</s>`` included). Meant for a
    few texts: everything goes through the encoder at once.
    """
    if getattr(model, "heads", None) is None:
        raise ValueError(f"model {getattr(model, 'source', model)!r} has no sparse head (dense only)")
    texts = check_texts(texts)
    max_length = model.resolve_max_length(max_length)
    ids = model.tokenizer.encode_ids(texts, max_length, warn=False)
    input_ids, mask = model.tokenizer.pad(ids)
    packed, offsets = model.encoder.forward_packed(input_ids, mask)          # [T, H], [B+1]
    w = model.heads.sparse_weights(packed[None]).asnumpy()[0].astype(np.float32)
    assert w.shape == (int(offsets[-1]),) == (sum(map(len, ids)),), (w.shape, offsets[-1])
    return [w[offsets[b]:offsets[b + 1]] for b in range(len(texts))]


def position_weights(ids, lexical: Mapping[str, float]) -> np.ndarray:
    """Token ids [n] and the text's ``{token_id_str: weight}`` -> [n] float32 weight per position
    (the max over the id's positions; 0 for ids the dict lacks: special tokens, zero weights).

    >>> position_weights([0, 10, 11, 10, 2], {"10": 0.5, "11": 0.25}).tolist()
    [0.0, 0.5, 0.25, 0.5, 0.0]
    """
    if not isinstance(lexical, Mapping):
        raise TypeError(f"lexical must be a dict {{token_id: weight}}, got {type(lexical).__name__}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape}, dtype {ids.dtype}")
    return np.array([lexical.get(str(int(t)), 0.0) for t in ids], np.float32)


def shared_tokens(qw: Mapping[str, float], pw: Mapping[str, float]) -> list[tuple[str, float, float, float]]:
    """``(token_id, w_q, w_p, w_q * w_p)`` for the ids in both dicts, largest product first (ties by
    id). The products sum to :func:`bgem3_lib.retrieval.scoring.lexical_matching_score` ``(qw, pw)``."""
    for name, d in (("qw", qw), ("pw", pw)):
        if not isinstance(d, Mapping):
            raise TypeError(f"{name}: expected a dict {{token_id: weight}}, got {type(d).__name__}")
    rows = [(t, float(w), float(pw[t]), float(w) * float(pw[t])) for t, w in qw.items() if t in pw]
    return sorted(rows, key=lambda r: (-r[3], r[0]))


def document_frequency(lexical: Sequence[Mapping[str, float]]) -> Counter:
    """Number of texts whose lexical dict holds each token id: ``Counter {token_id_str: df}``."""
    if isinstance(lexical, Mapping):
        raise TypeError("expected a list of lexical dicts (one per text), got a single dict")
    return Counter(t for d in lexical for t in d)


# ---------------------------------------------------------------- ranks

def gold_ranks(scores, gold) -> np.ndarray:
    """Scores [Nq, N] and the gold column per query [Nq] -> 1-based rank of the gold column [Nq],
    every tie counted against it: ``rank = #{j : scores[q, j] >= scores[q, gold]}``. A query whose
    scores are all equal (no shared token at all) gets rank N, a miss, not a lucky tie-break.

    >>> gold_ranks(np.array([[0.2, 0.5, 0.2], [0.0, 0.0, 0.0]]), [2, 0]).tolist()
    [3, 3]
    """
    s = _finite_matrix("scores", scores)
    g = np.asarray(gold)
    if g.shape != (s.shape[0],) or g.dtype.kind not in "iu":
        raise ValueError(f"gold must be {s.shape[0]} integer column indices, got shape {g.shape}, dtype {g.dtype}")
    if g.size and (g.min() < 0 or g.max() >= s.shape[1]):
        raise ValueError(f"gold columns must lie in [0, {s.shape[1]}), got [{g.min()}, {g.max()}]")
    gold_scores = s[np.arange(s.shape[0]), g]
    return (s >= gold_scores[:, None]).sum(axis=1).astype(np.int64)


def matched_run(scores, qids: Sequence[str], docids: Sequence[str], k: int = 100) -> dict[str, dict[str, float]]:
    """:func:`~bgem3_lib.retrieval.metrics.run_from_scores` without the documents whose score is 0: what an
    inverted index returns (only documents sharing a token with the query), so a query with no
    shared token retrieves nothing instead of the first k documents of the corpus."""
    s = _finite_matrix("scores", scores)
    run = run_from_scores(s, qids, docids, k)
    col = {d: j for j, d in enumerate(docids)}
    return {q: {d: v for d, v in docs.items() if s[i, col[d]] != 0} for i, (q, docs) in enumerate(run.items())}


# ---------------------------------------------------------------- drawing weights on text

def piece_text(piece: str) -> str:
    """Display form of a sentencepiece piece: the word-start marker becomes a space."""
    return piece.replace(WORD_START, " ")


def _check_pieces(pieces: Sequence[str], weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(pieces),):
        raise ValueError(f"{len(pieces)} pieces but weights of shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    return w


def _vmax(w: np.ndarray, vmax: float | None) -> float:
    v = float(w.max()) if vmax is None and w.size else float(vmax or 0.0)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"vmax must be finite and >= 0, got {vmax!r}")
    return v if v > 0 else 1.0


def legend_html(vmax: float, rgb=(214, 39, 40)) -> str:
    """A small colour scale from 0 to ``vmax`` matching :func:`highlight_html`."""
    r, g, b = rgb
    return (f'<span style="font-size:0.8em;color:#555">0 <span style="display:inline-block;width:120px;'
            f'height:0.8em;vertical-align:middle;background:linear-gradient(to right,rgba({r},{g},{b},0),'
            f'rgba({r},{g},{b},1))"></span> {vmax:.3g}</span>')


def highlight_html(pieces: Sequence[str], weights, vmax: float | None = None, rgb=(214, 39, 40),
                   label: str | None = None, legend: bool = True, skip=SPECIAL_PIECES) -> str:
    """Pieces [n] and weights [n] (>= 0) -> HTML: one ``<span>`` per piece, background opacity
    ``min(weight / vmax, 1)`` (``vmax`` defaults to the largest weight), the weight as tooltip.
    Pieces in ``skip`` are left out; a word-start marker becomes a plain space between spans."""
    w = _check_pieces(pieces, weights)
    top = _vmax(w, vmax)
    r, g, b = rgb
    parts = ['<div class="bgem3-highlight" style="line-height:1.9;margin:0.3em 0">']
    if label:
        parts.append(f"<b>{html.escape(label)}</b> ")
    if legend:
        parts.append(legend_html(top, rgb) + "<br>")
    for piece, weight in zip(pieces, w):
        if piece in skip:
            continue
        text = piece_text(piece)
        if text.startswith(" "):
            parts.append(" ")
            text = text[1:]
        alpha = min(weight / top, 1.0)
        parts.append(f'<span title="{html.escape(piece)}: {weight:.3f}" style="background-color:'
                     f'rgba({r},{g},{b},{alpha:.3f});border-radius:2px">{html.escape(text)}</span>')
    parts.append("</div>")
    return "".join(parts)


def flow_layout(texts: Sequence[str], width: int) -> list[tuple[int, int, str]]:
    """Greedy line filling in character cells: display texts -> ``(line, column, text)`` each; a
    text that would overrun ``width`` starts the next line, without its leading space.

    >>> flow_layout([" ab", " cd", "e"], width=4)
    [(0, 0, 'ab'), (1, 0, 'cd'), (1, 2, 'e')]
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    out, line, col = [], 0, 0
    for t in texts:
        if col == 0:
            t = t.lstrip(" ")
        elif col + len(t) > width:
            line, col, t = line + 1, 0, t.lstrip(" ")
        out.append((line, col, t))
        col += len(t)
    return out


def highlight_figure(rows: Sequence[tuple[str, Sequence[str], Sequence[float]]], vmax: float | None = None,
                     width: int = 90, cmap: str = "Reds", fontsize: float = 9.0, skip=SPECIAL_PIECES):
    """Static twin of :func:`highlight_html`: rows of ``(title, pieces, weights)`` drawn as monospace
    text on boxes coloured ``cmap(weight / vmax)`` (one shared ``vmax``), plus a colour bar.
    Returns the matplotlib figure (one axes per row, heights following the line counts)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    prepared = []
    for title, pieces, weights in rows:
        w = _check_pieces(pieces, weights)
        keep = [i for i, p in enumerate(pieces) if p not in skip]
        cells = flow_layout([piece_text(pieces[i]) for i in keep], width)
        prepared.append((title, cells, w[keep]))
    top = _vmax(np.concatenate([p[2] for p in prepared]) if prepared else np.zeros(0), vmax)
    lines = [max((c[0] for c in cells), default=0) + 1 for _, cells, _ in prepared]
    line_in = fontsize / 72 * 1.9                                    # height of a text line, inches
    fig_w = width * fontsize / 72 * _MONO_ADVANCE / 0.86 + 0.8
    fig_h = sum(lines) * line_in + 0.42 * len(rows) + 0.1
    fig, axes = plt.subplots(len(rows), 1, squeeze=False, figsize=(fig_w, fig_h),
                             gridspec_kw={"height_ratios": [n + 0.9 for n in lines], "hspace": 0.35})
    fig.subplots_adjust(left=0.01, right=1 - 0.75 / fig_w, top=1 - 0.3 / fig_h, bottom=0.05 / fig_h)
    colours = plt.get_cmap(cmap)
    fig.colorbar(plt.cm.ScalarMappable(Normalize(0, top), colours), ax=axes[:, 0].tolist(), fraction=0.02,
                 pad=0.01, label="weight")
    # one character cell = axes width / width: the font size that makes monospace text fill it exactly
    size = axes[0, 0].get_position().width * fig_w * 72 / (width * _MONO_ADVANCE)
    for ax, (title, cells, w), n in zip(axes[:, 0], prepared, lines):
        for (line, col, text), weight in zip(cells, w):
            lead = len(text) - len(text.lstrip(" "))                 # a word's leading space stays white
            ax.add_patch(Rectangle((col + lead, -line - 0.42), len(text) - lead, 0.84, lw=0,
                                   color=colours(min(weight / top, 1.0))))
            ax.text(col, -line, text, family="DejaVu Sans Mono", fontsize=size, va="center", ha="left")
        ax.set_xlim(0, width)
        ax.set_ylim(-n + 0.45, 0.55)
        ax.set_title(title, loc="left", fontsize=fontsize + 1)
        ax.axis("off")
    return fig


# ---------------------------------------------------------------- late interaction

def maxsim_matrix(q, p) -> np.ndarray:
    """Token-to-token similarities ``S = E_q E_p^T``: q [n, H], p [m, H] -> [n, m] float32."""
    q = _finite_matrix("q", q)
    p = _finite_matrix("p", p)
    if q.shape[0] == 0 or p.shape[0] == 0 or q.shape[1] != p.shape[1]:
        raise ValueError(f"need [n, H] and [m, H] with n, m >= 1 and one H, got {q.shape} and {p.shape}")
    return q.astype(np.float32) @ p.astype(np.float32).T


def maxsim(sim) -> tuple[np.ndarray, np.ndarray, float]:
    """Row maxima of a similarity matrix [n, m] -> (best column [n], best value [n], their mean:
    the multi-vector score ``s_mul = 1/n sum_i max_j S[i, j]``)."""
    s = _finite_matrix("sim", sim)
    if 0 in s.shape:
        raise ValueError(f"sim must be non-empty, got shape {s.shape}")
    best = s.argmax(axis=1)
    values = s[np.arange(s.shape[0]), best]
    return best, values, float(values.mean())


def best_window(sim, width: int) -> int:
    """First column of the ``width`` consecutive columns of ``sim`` [n, m] that hold the most row
    maxima (ties: larger sum of those maxima, then the earlier start); 0 when ``width >= m``."""
    best, values, _ = maxsim(sim)
    m = np.asarray(sim).shape[1]
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if width >= m:
        return 0
    starts = np.arange(m - width + 1)
    inside = (best[None, :] >= starts[:, None]) & (best[None, :] < starts[:, None] + width)
    count, mass = inside.sum(axis=1), (inside * values[None, :]).sum(axis=1)
    return int(np.lexsort((starts, -mass, -count))[0])


# ---------------------------------------------------------------- cost

def storage_bytes(enc: Mapping, value_bytes: int = 4, id_bytes: int = 4) -> dict[str, np.ndarray]:
    """Bytes per text of each representation in an ``encode()`` dict -> {"dense", "sparse",
    "colbert": int64 [N]} for the keys present: ``H * value_bytes``, ``nnz * (id_bytes +
    value_bytes)`` (token id + weight), ``n_i * H_colbert * value_bytes``."""
    if not isinstance(enc, Mapping):
        raise TypeError(f"expected the dict returned by encode(), got {type(enc).__name__}")
    if value_bytes < 1 or id_bytes < 1:
        raise ValueError(f"byte sizes must be >= 1, got value_bytes={value_bytes}, id_bytes={id_bytes}")
    out = {}
    if enc.get("dense_vecs") is not None:
        d = np.asarray(enc["dense_vecs"])
        if d.ndim != 2:
            raise ValueError(f"dense_vecs must be [N, H], got shape {d.shape}")
        out["dense"] = np.full(d.shape[0], d.shape[1] * value_bytes, np.int64)
    if enc.get("lexical_weights") is not None:
        out["sparse"] = np.array([len(x) * (id_bytes + value_bytes) for x in enc["lexical_weights"]], np.int64)
    if enc.get("colbert_vecs") is not None:
        shapes = [np.shape(v) for v in enc["colbert_vecs"]]
        if any(len(s) != 2 for s in shapes):
            raise ValueError("colbert_vecs must be a list of [n_i, H] arrays")
        out["colbert"] = np.array([s[0] * s[1] * value_bytes for s in shapes], np.int64)
    if not out:
        raise ValueError(f"no dense_vecs / lexical_weights / colbert_vecs in {list(enc)}")
    return out
