"""Fuzz BGEM3.encode (issue 12) on the tiny random model: arbitrary Unicode texts and non-text items.

Property: a ValueError / TypeError naming ``texts[i]`` for an item that really is bad (not a str, a
lone surrogate, or blank by :func:`is_blank`), or else one finite dense vector, one sparse weight dict
with finite weights and one finite ColBERT matrix per input; the only warning allowed is truncation.
"""
from __future__ import annotations

import functools
import math
import re
import warnings

import numpy as np
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from tiny_m3 import tiny_model_dir

from bgem3_lib.model.bgem3 import BGEM3
from bgem3_lib.model.tokenization import is_blank

MAX_LENGTH = 32


@functools.lru_cache(maxsize=None)
def _model() -> BGEM3:
    """Built once per module (hypothesis does not allow function-scoped fixtures)."""
    return BGEM3(str(tiny_model_dir()))


# blank-looking characters: spaces and separators (Zs/Zl/Zp), controls (Cc), format / zero-width (Cf)
_BLANKISH = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u200b\u200c\u200d\u2028\u2029\u202f" \
            "\u205f\u2060\u3000\ufeff\u00ad\u180e\x00\x7f"
_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_char = st.characters() | st.sampled_from(_BLANKISH)
_text = st.one_of(
    st.text(_char, max_size=30),                                                    # any category ...
    st.text(st.characters(codec="utf-8") | _surrogate, max_size=10),                 # ... incl. lone surrogates
    st.text(st.sampled_from(_BLANKISH), max_size=6),                                 # empty / blank
    st.builds(lambda w, n: (w + " ") * n, st.text(_char, min_size=1, max_size=8), st.integers(40, 400)),  # long
)
_not_text = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=6), st.booleans(),
                      st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                max_size=1))
_good = st.text(_char, min_size=1, max_size=30).filter(lambda t: not is_blank(t))   # no surrogate: st.characters
_good = st.one_of(_good, _good.map(np.str_),
                  st.builds(lambda w, n: (w + " ") * n, _good, st.integers(10, 100)))    # > MAX_LENGTH tokens
_texts = st.one_of(st.lists(_good, min_size=1, max_size=6),                              # encodes
                   st.lists(st.one_of(_good, _text, _text.map(np.str_), _not_text), min_size=1, max_size=6))


def _bad(item) -> bool:
    """An item encode must refuse: not a str, a lone surrogate, or blank."""
    return not isinstance(item, str) or any("\ud800" <= c <= "\udfff" for c in item) or is_blank(item)


def _finite(x) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x, dtype=np.float64))))


@settings(max_examples=100, deadline=None)
@given(texts=_texts, container=st.sampled_from([list, tuple]))
@example(texts=["ok", "\u200b\u200b"], container=list)
@example(texts=["ok", "a\udc80b"], container=list)
@example(texts=["ok", b"bytes"], container=tuple)
@example(texts=["word " * 200, "\x0c page", "x\u2028y"], container=list)
def test_encode_refuses_bad_items_or_embeds_every_text(texts, container):
    model = _model()
    bad = [i for i, t in enumerate(texts) if _bad(t)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = model.encode(container(texts), max_length=MAX_LENGTH, return_dense=True, return_sparse=True,
                               return_colbert_vecs=True)
        except (ValueError, TypeError) as e:
            m = re.search(r"\btexts\[(\d+)\]", str(e))
            assert m, f"error does not name the item: {e!r}"
            i = int(m.group(1))
            assert i in bad, f"texts[{i}] = {texts[i]!r} is fine, but: {e}"
            assert isinstance(e, TypeError) == (not isinstance(texts[i], str)), e
            return
    assert not bad, f"texts{bad} should have been refused"
    event("encoded")
    for w in caught:
        assert "truncated" in str(w.message), f"unexpected warning: {w.message}"
    n, hidden = len(texts), model.config.hidden_size
    dense = out["dense_vecs"]
    assert dense.shape == (n, hidden) and _finite(dense)
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-4)
    assert len(out["lexical_weights"]) == n and len(out["colbert_vecs"]) == n
    for weights, vecs in zip(out["lexical_weights"], out["colbert_vecs"]):
        assert isinstance(weights, dict)
        assert all(isinstance(k, str) and math.isfinite(v) and v >= 0 for k, v in weights.items())
        assert vecs.ndim == 2 and vecs.shape[1] == hidden and 1 <= vecs.shape[0] < MAX_LENGTH and _finite(vecs)
