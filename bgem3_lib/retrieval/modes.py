"""The retrieval modes of M3 and their weights: one vocabulary, one validator, one fusion.

The paper (arXiv 2402.03216, v4, Sec. 3.2, Eq. 1) ranks with ``s_rank = w1*s_dense + w2*s_lex + w3*s_mul``
and reports five settings. Their names, everywhere in the library (``BGEM3.compute_score``, the
retriever, the evaluation runner, the CLI and the chapters):

================  ==========================  =================================================
mode              needs                       score
================  ==========================  =================================================
``dense``         dense vectors               s_dense
``sparse``        lexical weights             s_lex
``colbert``       dense + multi-vectors       s_mul (re-ranking dense candidates)
``dense+sparse``  dense + lexical weights     w_d*s_dense + w_s*s_lex
``all``           all three                   w_d*s_dense + w_s*s_lex + w_c*s_mul
================  ==========================  =================================================

FlagEmbedding's ``compute_score`` spells two of them differently (``sparse+dense``,
``colbert+sparse+dense``): :data:`ALIASES` accepts those spellings on input and
:data:`FLAGEMBEDDING_KEYS` gives them for output compatibility.

Weights are ``(w_dense, w_sparse, w_colbert)``: :func:`check_weights` is the one validator (three
finite numbers >= 0, not all zero) and :func:`fuse` the one weighted sum, raw (the retriever; Eq. 1)
or divided by the weight sum (FlagEmbedding's ``compute_score``, which rescales but never reorders).

>>> canonical_mode("sparse+dense")
'dense+sparse'
>>> check_weights("1, 0.3, 1")
(1.0, 0.3, 1.0)
>>> round(fuse("all", (1.0, 0.3, 1.0), dense=0.5, sparse=0.2, colbert=0.4), 6)
0.96
>>> round(float(fuse("dense+sparse", (0.4, 0.2, 0.4), dense=0.5, sparse=0.2, normalize=True)), 4)
0.4
"""
from __future__ import annotations

import math
from collections.abc import Sequence

MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
ALIASES = {"sparse+dense": "dense+sparse", "colbert+sparse+dense": "all", "multi-vector": "colbert"}
FLAGEMBEDDING_KEYS = {"dense": "dense", "sparse": "sparse", "colbert": "colbert",
                      "dense+sparse": "sparse+dense", "all": "colbert+sparse+dense"}
HYBRID_MODES = ("dense+sparse", "all")
REPRESENTATIONS = ("dense", "sparse", "colbert")
NEEDS = {"dense": ("dense",), "sparse": ("sparse",), "colbert": ("dense", "colbert"),
         "dense+sparse": ("dense", "sparse"), "all": ("dense", "sparse", "colbert")}
ENCODING_KEYS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}

# (w_dense, w_sparse, w_colbert) per benchmark and hybrid mode: the paper's settings, held here only.
# MIRACL: Sec. 4.1 and MKQA: Sec. 4.2 (the teacher weights w = (1, 0.3, 1) of Sec. 3.3); MLDR: Sec. 4.3, Table 3
# ("Dense+Sparse" 0.2/0.8, "All" 0.15/0.5/0.35). Colbert weight 0 where a mode ignores it.
PAPER_WEIGHTS: dict[str, dict[str, tuple[float, float, float]]] = {
    "miracl": {"dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)},
    "mkqa": {"dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)},
    "mldr": {"dense+sparse": (0.2, 0.8, 0.0), "all": (0.15, 0.5, 0.35)},
}
# The self-distillation teacher's weights (Sec. 3.3): s_inter = w1*s_dense + w2*s_lex + w3*s_mul.
TEACHER_WEIGHTS = (1.0, 0.3, 1.0)


def canonical_mode(mode: str) -> str:
    """The canonical name of ``mode`` (aliases accepted); ValueError naming the known modes."""
    name = ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if name not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return name


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    """``"dense,all"`` or a list -> canonical modes, duplicates dropped, order kept; at least one.

    >>> parse_modes("dense, sparse+dense,dense")
    ['dense', 'dense+sparse']
    """
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    items = [m for m in items if m != ""]
    if not items:
        raise ValueError(f"no mode given; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(canonical_mode(m) for m in items))


def needed_representations(modes: Sequence[str]) -> list[str]:
    """The representations (``dense``, ``sparse``, ``colbert``) that ``modes`` need, in that order.

    >>> needed_representations(["colbert"])
    ['dense', 'colbert']
    """
    used = {r for m in modes for r in NEEDS[canonical_mode(m)]}
    return [r for r in REPRESENTATIONS if r in used]


def check_weights(weights: str | Sequence[float], name: str = "weights") -> tuple[float, float, float]:
    """Validate ``(w_dense, w_sparse, w_colbert)`` (or ``"d,s,c"``): three finite numbers >= 0, not all zero.

    ``name`` is how errors call the argument (e.g. ``weights_for_different_modes``, ``--weights``)."""
    raw = weights.split(",") if isinstance(weights, str) else weights
    if raw is None or isinstance(raw, (int, float)):
        raise ValueError(f"{name} must be three numbers (w_dense, w_sparse, w_colbert), got {weights!r}")
    try:
        w = tuple(float(x) for x in raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (w_dense, w_sparse, w_colbert), got {weights!r}") from None
    if len(w) != 3:
        raise ValueError(f"{name} must be (w_dense, w_sparse, w_colbert), got {len(w)} values: {w}")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"{name} must be finite and >= 0, got {w}")
    if sum(w) == 0:
        raise ValueError(f"{name} are all zero: {w}")
    return w


def paper_weights(benchmark: str, mode: str) -> tuple[float, float, float]:
    """The paper's weights for a hybrid ``mode`` on ``benchmark`` (``miracl``, ``mkqa``, ``mldr``);
    single modes get (1, 1, 1), which :func:`fuse` does not use."""
    if benchmark not in PAPER_WEIGHTS:
        raise ValueError(f"no paper weights for benchmark {benchmark!r}; known: {', '.join(PAPER_WEIGHTS)}")
    return PAPER_WEIGHTS[benchmark].get(canonical_mode(mode), (1.0, 1.0, 1.0))


def fuse(mode: str, weights: Sequence[float], dense=None, sparse=None, colbert=None, normalize: bool = False):
    """The score of ``mode`` from the three raw scores (scalars or arrays of one shape).

    ``dense+sparse`` = w_d*dense + w_s*sparse; ``all`` adds w_c*colbert; single modes return their own
    score. ``normalize=True`` divides by the weights used (FlagEmbedding's ``compute_score``). The
    sums are evaluated in the scores' dtype, in one fixed order, so every caller ranks identically.
    """
    mode = canonical_mode(mode)
    w = check_weights(weights)
    given = {"dense": dense, "sparse": sparse, "colbert": colbert}
    if mode in ("dense", "sparse", "colbert"):
        if given[mode] is None:
            raise ValueError(f"mode {mode!r} needs the {mode} score")
        return given[mode]
    parts = ("dense", "sparse") if mode == "dense+sparse" else ("dense", "sparse", "colbert")
    missing = [p for p in parts if given[p] is None]
    if missing:
        raise ValueError(f"mode {mode!r} needs the {' and '.join(missing)} score(s)")
    used = [w[REPRESENTATIONS.index(p)] for p in parts]
    if normalize and sum(used) == 0:
        raise ValueError(f"weights {w} give mode {mode!r} a zero weight sum: its normalised score is undefined")
    out = used[0] * given["dense"] + used[1] * given["sparse"]
    if mode == "all":
        out += used[2] * given["colbert"]
    return out / sum(used) if normalize else out


def fuse_all(weights: Sequence[float], dense, sparse, colbert, normalize: bool = True) -> dict:
    """All five modes' scores from the three raw ones: ``{mode: score}`` (canonical names).

    >>> out = fuse_all((0.4, 0.2, 0.4), 0.5, 0.2, 0.4)
    >>> round(float(out["dense+sparse"]), 4), round(float(out["all"]), 4)
    (0.4, 0.4)
    """
    return {m: fuse(m, weights, dense=dense, sparse=sparse, colbert=colbert, normalize=normalize) for m in MODES}
