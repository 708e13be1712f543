"""Tests for bgem3_lib.training.bucketing: length-bucketed batches, resume, padding waste, split batches."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgem3_lib.analysis.batching_stats import batch_shapes
from bgem3_lib.training.bucketing import (
    DEFAULT_BOUNDARIES,
    LengthBucketSampler,
    assign_buckets,
    bucket_batch_sizes,
    chunk_batches,
    example_length,
    length_chunks,
    padding_waste,
    random_batches,
    split_batch,
)

FAST = settings(max_examples=40, deadline=None)

lengths_st = st.lists(st.integers(min_value=1, max_value=8192), min_size=1, max_size=120)
budget_st = st.integers(min_value=1, max_value=40000)


def _all_indices(batches):
    return sorted(i for b in batches for i in b)


# ---------------------------------------------------------------- hand-worked examples


def test_docstring_example():
    sampler = LengthBucketSampler([10, 700, 20, 900], boundaries=(500, 1000), token_budget=2000, seed=0)
    assert sampler.batch_sizes == (4, 2)
    assert sorted(sorted(b) for b in sampler.epoch(0)) == [[0, 2], [1, 3]]


def test_bucket_edges_and_batch_sizes():
    assert assign_buckets([1, 500, 501, 1000, 1001, 8192]).tolist() == [0, 0, 1, 1, 2, 8]
    assert bucket_batch_sizes(DEFAULT_BOUNDARIES, 16384) == (32, 16, 8, 5, 4, 3, 2, 2, 2)
    assert bucket_batch_sizes((500, 1000), 300) == (1, 1)
    assert example_length(12, 180, [240, 95]) == 240


def test_padding_waste_hand_example():
    out = padding_waste([[0, 1], [2]], [2, 4, 3])
    assert out["padded_tokens"] == 2 * 4 + 3
    assert out["real_tokens"] == 9
    assert out["waste_fraction"] == pytest.approx(2 / 11)


def test_split_batch_and_random_batches():
    assert split_batch([7, 3, 9, 1, 4], 2) == [[7, 3], [9, 1], [4]]
    assert split_batch([5], 8) == [[5]]
    rb = random_batches(7, 3, seed=4)
    assert [len(b) for b in rb] == [3, 3, 1]
    assert _all_indices(rb) == list(range(7))
    assert rb == random_batches(7, 3, seed=4)
    assert rb != random_batches(7, 3, seed=5)


def test_no_shuffle_is_ordered_by_bucket():
    sampler = LengthBucketSampler([900, 10, 20, 30], boundaries=(500, 1000), token_budget=1000, shuffle=False)
    assert sampler.epoch(0) == [[1, 2], [3], [0]]
    assert sampler.epoch(3) == sampler.epoch(0)


def test_drop_last_drops_incomplete_batches():
    sampler = LengthBucketSampler([10] * 5 + [900] * 3, boundaries=(500, 1000), token_budget=2000,
                                  drop_last=True, seed=1)
    assert sampler.batch_sizes == (4, 2)
    batches = sampler.epoch(0)
    assert len(batches) == len(sampler) == 2
    assert sorted(len(b) for b in batches) == [2, 4] and len(set(_all_indices(batches))) == 6


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[]), "non-empty"),
        (dict(lengths=[0, 3]), ">= 1"),
        (dict(lengths=[3.5]), "whole token counts"),
        (dict(lengths=[float("nan")]), "whole token counts"),
        (dict(lengths=[9000]), "exceeds the largest boundary"),
        (dict(lengths=[3], boundaries=(10, 5)), "strictly increasing"),
        (dict(lengths=[3], token_budget=0), "token_budget"),
        (dict(lengths=[3], boundaries=(10,), batch_sizes=(0,)), "batch_sizes"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthBucketSampler(**kwargs)


def test_bad_helper_input_raises():
    with pytest.raises(ValueError, match="sub_batch_size"):
        split_batch([1, 2], 0)
    with pytest.raises(ValueError, match="empty batch"):
        split_batch([], 2)
    with pytest.raises(ValueError, match="out of range"):
        padding_waste([[0, 3]], [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        random_batches(4, 0)
    with pytest.raises(ValueError, match="non-negative"):
        example_length(-1, 3)


def test_load_state_rejects_other_data():
    a = LengthBucketSampler([10, 20, 30], token_budget=1000)
    b = LengthBucketSampler([10, 20, 31], token_budget=1000)
    with pytest.raises(ValueError, match="different lengths"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        a.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------- properties


@FAST
@given(lengths=lengths_st, budget=budget_st, seed=st.integers(0, 2**31), e=st.integers(0, 50))
def test_each_index_once_per_epoch(lengths, budget, seed, e):
    sampler = LengthBucketSampler(lengths, token_budget=budget, seed=seed)
    batches = sampler.epoch(e)
    assert _all_indices(batches) == list(range(len(lengths)))
    assert len(batches) == len(sampler)


@FAST
@given(lengths=lengths_st, budget=budget_st, seed=st.integers(0, 2**31))
def test_batches_within_one_bucket_and_budget(lengths, budget, seed):
    sampler = LengthBucketSampler(lengths, token_budget=budget, seed=seed)
    lens = np.asarray(lengths)
    bounds = (0,) + DEFAULT_BOUNDARIES
    for batch in sampler.epoch(0):
        k = {int(sampler.buckets[i]) for i in batch}
        assert len(k) == 1
        (k,) = k
        # independent check of bucket membership against the raw boundaries
        assert all(bounds[k] < lens[i] <= bounds[k + 1] for i in batch)
        assert 1 <= len(batch) <= sampler.batch_sizes[k]
        assert len(batch) == 1 or len(batch) * lens[batch].max() <= budget


@FAST
@given(lengths=lengths_st, budget=budget_st, seed=st.integers(0, 2**31), e=st.integers(0, 50))
def test_determinism(lengths, budget, seed, e):
    a = LengthBucketSampler(lengths, token_budget=budget, seed=seed).epoch(e)
    b = LengthBucketSampler(lengths, token_budget=budget, seed=seed).epoch(e)
    assert a == b


def test_epochs_and_seeds_differ():
    lengths = np.random.default_rng(0).integers(1, 3000, size=200)
    s = LengthBucketSampler(lengths, token_budget=8000, seed=3)
    assert s.epoch(0) != s.epoch(1)
    assert s.epoch(0) != LengthBucketSampler(lengths, token_budget=8000, seed=4).epoch(0)


@FAST
@given(lengths=lengths_st, budget=budget_st, seed=st.integers(0, 2**31), stop=st.integers(0, 400))
def test_resume_continues_identically(lengths, budget, seed, stop):
    def stream(sampler, n_epochs):
        out = []
        for _ in range(n_epochs):
            out.extend(iter(sampler))
        return out

    n_epochs = 3
    reference = stream(LengthBucketSampler(lengths, token_budget=budget, seed=seed), n_epochs)
    stop = min(stop, len(reference))

    first = LengthBucketSampler(lengths, token_budget=budget, seed=seed)
    consumed, it = [], iter(first)
    while len(consumed) < stop:
        try:
            consumed.append(next(it))
        except StopIteration:
            it = iter(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file

    resumed = LengthBucketSampler(lengths, token_budget=budget, seed=seed + 1)  # seed comes from state
    resumed.load_state_dict(state)
    rest = []
    while len(consumed) + len(rest) < len(reference):
        rest.extend(iter(resumed))
    assert consumed + rest == reference


skewed_st = st.tuples(
    st.integers(0, 2**31),  # seed for lengths, buckets and baseline
    st.integers(64, 300),  # number of examples
    st.integers(2, 16),  # common batch size
)


@settings(max_examples=30, deadline=None)
@given(params=skewed_st)
def test_bucketed_waste_below_random_on_skewed_lengths(params):
    seed, n, batch = params
    rng = np.random.default_rng(seed)
    # skewed: mostly short examples, a long tail up to 8192 tokens
    lengths = np.where(rng.random(n) < 0.8, rng.integers(8, 500, n), rng.integers(500, 8193, n))
    sizes = (batch,) * len(DEFAULT_BOUNDARIES)  # same batch size as the baseline: fair comparison
    bucketed = LengthBucketSampler(lengths, seed=seed, batch_sizes=sizes).epoch(0)
    baseline = random_batches(n, batch, seed=seed)
    assert (
        padding_waste(bucketed, lengths)["padded_tokens"]
        <= padding_waste(baseline, lengths)["padded_tokens"]
    )


def test_budget_derived_buckets_cut_waste_substantially():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, size=2000).astype(int) + 1, 8192)
    bucketed = LengthBucketSampler(lengths, token_budget=16384, seed=0).epoch(0)
    mean_batch = len(lengths) // len(bucketed)  # about 21 examples per batch
    baseline = random_batches(len(lengths), mean_batch, seed=0)
    # measured: 0.41 bucketed vs 0.78 random
    assert padding_waste(bucketed, lengths)["waste_fraction"] < 0.6 * padding_waste(baseline, lengths)[
        "waste_fraction"
    ]


def _padded(lengths, chunks):
    """Padded slots of encoding ``chunks`` of ``lengths`` (each chunk padded to its own longest)."""
    return sum(row["padded_tokens"] for row in batch_shapes(chunks, lengths))


def _brute_force_chunk_cost(lengths, k):
    """Least padded tokens over every partition of the sorted lengths into <= k contiguous runs."""
    from itertools import combinations

    s = sorted(lengths)
    best = None
    for r in range(min(k, len(s))):
        for cuts in combinations(range(1, len(s)), r):
            edges = (0, *cuts, len(s))
            cost = sum((b - a) * s[b - 1] for a, b in zip(edges, edges[1:]))
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=9), st.integers(1, 5))
def test_length_chunks_is_an_optimal_partition(lengths, k):
    chunks = length_chunks(lengths, k)
    flat = [i for ch in chunks for i in ch]
    assert sorted(flat) == list(range(len(lengths)))                 # every text exactly once
    assert 1 <= len(chunks) <= k and all(chunks)
    assert [lengths[i] for i in flat] == sorted(lengths)              # runs of the sorted order
    assert _padded(lengths, chunks) == _brute_force_chunk_cost(lengths, k)
    assert _padded(lengths, chunks) <= len(lengths) * max(lengths)


def test_length_chunks_bad_input():
    with pytest.raises(ValueError, match="max_chunks"):
        length_chunks([3, 4], 0)
    with pytest.raises(ValueError, match="non-empty"):
        length_chunks([], 2)
    with pytest.raises(ValueError, match=">= 1 token"):
        length_chunks([3, 0], 2)


def test_chunk_batches_pads_each_chunk_alone():
    lengths = [100, 12, 90, 15, 11, 40]
    out = chunk_batches([[0, 1, 2], [3, 4, 5]], lengths, 2)
    assert out == [[[1], [2, 0]], [[4, 3], [5]]]
    for batch, chunks in zip([[0, 1, 2], [3, 4, 5]], out):
        assert sorted(i for ch in chunks for i in ch) == batch
    padded = sum(len(ch) * max(lengths[i] for i in ch) for chunks in out for ch in chunks)
    assert padded == 12 + 2 * 100 + 2 * 15 + 40
    with pytest.raises(ValueError, match="empty batch"):
        chunk_batches([[0], []], lengths, 2)
