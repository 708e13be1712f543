"""Position tables extended without training (model.long_positions) and the m3-small-long names."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib import BGEM3
from bgem3_lib.model import loading
from bgem3_lib.model.long_positions import METHODS, POSITION_KEY, extend_positions, extend_table


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reserved", [0, 2])
def test_learned_rows_are_kept_bit_for_bit(method, reserved):
    table = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    out = extend_table(table, 40, method, reserved)
    assert out.shape == (40, 4) and out.dtype == np.float32
    assert np.array_equal(out[:12], table)


def test_tile_repeats_the_learned_rows_and_skips_the_reserved_ones():
    table = np.arange(10, dtype=np.float32).reshape(5, 2)        # rows 0, 1 reserved; 3 learned
    out = extend_table(table, 11, "tile", reserved=2)
    assert out[:, 0].tolist() == [0, 2, 4, 6, 8, 4, 6, 8, 4, 6, 8]


def test_interpolate_reads_the_table_at_stretched_positions():
    table = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    out = extend_table(table, 30, "interpolate")
    for p in range(8, 30):                                       # row p = table read at p * 7 / 29
        x = p * 7 / 29
        lo, f = int(np.floor(x)), x - np.floor(x)
        want = (1 - f) * table[lo] + f * table[min(lo + 1, 7)]
        np.testing.assert_allclose(out[p], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[29], table[7])             # the last row reads the last learned row


def test_bad_extensions_are_named():
    t = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="method"):
        extend_table(t, 8, "rope")
    with pytest.raises(ValueError, match="fewer"):
        extend_table(t, 3)
    with pytest.raises(ValueError, match=r"\[positions, hidden\]"):
        extend_table(np.zeros(4), 8)


@pytest.fixture(scope="module")
def tiny():
    return loading.resolve(str(tiny_model_dir()))                  # xlm-roberta layout, 64 usable positions


@pytest.mark.parametrize("method", METHODS)
def test_an_extended_model_encodes_short_texts_as_before_and_long_ones_whole(tiny, method):
    base, long = BGEM3(loaded=tiny), BGEM3(loaded=extend_positions(tiny, 200, method))
    assert (base.config.max_length, long.config.max_length) == (64, 200)
    assert long.encoder_state()["embeddings.position_embeddings.weight"].shape[0] == 202
    short = ["a short text", "another one here"]
    kw = dict(return_sparse=True, return_colbert_vecs=True)
    a, b = base.encode(short, **kw), long.encode(short, **kw)
    assert np.array_equal(a["dense_vecs"], b["dense_vecs"]) and a["lexical_weights"] == b["lexical_weights"]
    text = " ".join(f"w{i}" for i in range(70))
    n_tokens = len(long.tokenizer.encode_ids([text], 10_000, warn=False)[0])
    assert 64 < n_tokens <= 200
    assert len(long.encode(text, return_colbert_vecs=True)["colbert_vecs"]) == n_tokens - 1   # nothing cut
    with pytest.warns(UserWarning, match="longer than max_length"):
        cut = long.encode(" ".join(f"w{i}" for i in range(400)), return_colbert_vecs=True)
    assert len(cut["colbert_vecs"]) == 199


def test_extension_refuses_to_shrink_and_needs_a_position_table(tiny):
    with pytest.raises(ValueError, match="already accepts 64"):
        extend_positions(tiny, 32)
    from dataclasses import replace
    no_table = replace(tiny, encoder_state={k: v for k, v in tiny.encoder_state.items() if k != POSITION_KEY})
    with pytest.raises(ValueError, match="no embeddings.position_embeddings.weight"):
        extend_positions(no_table, 128)


def test_the_long_names_extend_m3_small_to_the_papers_length(tiny, monkeypatch):
    monkeypatch.setattr(loading, "m3_small_dir", lambda: tiny_model_dir())
    for name, method in loading.LONG_MODELS.items():
        got = loading.resolve(name)
        assert got.config.max_length == loading.LONG_MAX_LENGTH == 8192
        assert got.extra["position_extension"] == {"method": method, "from": 64, "to": 8192}
        table, learned = got.encoder_state[POSITION_KEY], tiny.encoder_state[POSITION_KEY]
        assert table.shape == (8194, learned.shape[1]) and np.array_equal(table[:66], learned)
        if method == "tile":              # xlm-roberta: rows 0, 1 are never a position; the tiles start at row 2
            assert np.array_equal(table[66:130], learned[2:]) and not np.array_equal(table[66], learned[0])
