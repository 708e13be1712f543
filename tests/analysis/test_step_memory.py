"""bgem3_lib.analysis.step_memory: real passages of exact lengths, the count used to skip runs, the
largest batch under a cap, and a real (tiny) measurement in a subprocess."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.analysis import step_memory as sm
from bgem3_lib.model.tokenization import M3Tokenizer


def test_passage_ids_are_real_text_of_exact_length():
    tok = M3Tokenizer.from_file()
    ids = sm.passage_ids(tok, 700, 3)
    assert ids.shape == (3, 700) and ids.dtype == np.int32
    assert (ids[:, 0] == 0).all() and (ids[:, -1] == 2).all()                 # <s> ... </s>
    assert len({tuple(r) for r in ids}) == 3 and not np.isin(ids[:, 1:-1], [0, 1, 2]).any()
    np.testing.assert_array_equal(sm.passage_ids(tok, 700, 1)[0], ids[0])     # the first k of the same passages
    assert "the" in tok.decode(ids[0][1:-1].tolist()).lower().split()
    with pytest.raises(ValueError, match="fewer than"):
        sm.passage_ids(tok, 10**6, 1)
    with pytest.raises(ValueError, match="integer > 2"):
        sm.passage_ids(tok, 2, 1)


def test_count_bytes_orders_the_strategies():
    plain, rec, split = (sm.count_bytes(4096, 4, s) for s in sm.STRATEGIES)
    assert plain > rec > split > 0
    assert sm.count_bytes(512, 4, "plain") == 4 * sm.count_bytes(512, 1, "plain")          # linear in passages
    # past ATTENTION_BLOCK, recompute keeps one block of scores: linear in length, not quadratic
    r1, r2 = sm.count_bytes(4096, 1, "recompute"), sm.count_bytes(8192, 1, "recompute")
    assert r2 / r1 < 2.1 and sm.count_bytes(8192, 1, "plain") / sm.count_bytes(4096, 1, "plain") > 3


def test_largest_batch():
    assert sm.largest_batch({2: 200.0, 4: 300.0}, 1000.0) == 18          # fixed 100 + 50 per passage
    assert sm.largest_batch({2: 200.0, 4: 300.0}, 90.0) == 0
    assert sm.largest_batch({2: 300.0, 4: 300.0}, 500.0) == 4            # no measurable growth: what was run
    with pytest.raises(ValueError, match="two passage counts"):
        sm.largest_batch({2: 1.0}, 10.0)


def test_runs_past_the_cap_are_not_started():
    rows = sm.measure_step_memory([8192], passages=(2, 4), strategies=("plain",), cap_bytes=2**20)
    assert [(r["measured"], r["peak_bytes"], r["length"], r["passages"]) for r in rows] == \
        [(False, None, 8192, 2), (False, None, 8192, 4)]
    assert rows[0]["count_bytes"] == sm.count_bytes(8192, 2, "plain")


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match="strategy must be one of"):
        next(sm.step_peaks("m3-small-long", [(512, 2)], "checkpoint-everything"))
