"""Length-bucketed batching for fine-tuning (M3-Embedding, arXiv 2402.03216, "efficient batching").

Training examples (a query, its positive and its hard negatives) have very different token counts. If a
batch mixes a 30-token example with an 8000-token one, every sequence is padded to 8000 tokens and most
of the compute is spent on padding. The paper therefore groups the training data by length and draws
each batch from a single length range, with a larger batch for shorter ranges (its table lists one batch
size per range 0-500, 500-1000, 1000-2000, ..., 7000-8192 tokens).

We do not copy that table. Instead each bucket's batch size is derived from a *token budget*:

    batch_size(bucket) = max(1, token_budget // upper_length(bucket))

so ``batch_size * max_length_in_batch <= token_budget`` holds for every batch whose size is above 1
(a single example longer than the budget still forms a batch of one). The budget counts tokens of one
padded sequence per example; fold the group size (1 positive + negatives) into it if memory is the target.

Example: lengths ``[10, 700, 20, 900]``, boundaries ``(500, 1000)``, budget ``2000`` give two buckets,
``{0, 2}`` (batch size 4) and ``{1, 3}`` (batch size 2), hence the batches ``[0, 2]`` and ``[1, 3]``
in a seeded random order.

Also here: ``padding_waste`` (how many padded tokens are wasted), ``random_batches`` (the baseline
without bucketing) and ``split_batch`` (the partition of one batch into gradient-checkpointed
sub-batches used by split-batch training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

# Upper token lengths of the paper's length ranges: (0,500], (500,1000], ..., (7000,8192].
DEFAULT_BOUNDARIES: tuple[int, ...] = (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8192)


def example_length(query_tokens: int, positive_tokens: int, negative_tokens: Sequence[int] = ()) -> int:
    """Length of one training example: the largest token count among query, positive and negatives.

    >>> example_length(12, 180, [240, 95])
    240
    """
    counts = [int(query_tokens), int(positive_tokens), *(int(n) for n in negative_tokens)]
    if min(counts) < 0:
        raise ValueError(f"token counts must be non-negative, got {counts}")
    return max(counts)


def _as_lengths(lengths: Sequence[int]) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("lengths must be whole token counts (no NaN, no fractions)")
        arr = arr.astype(np.int64)
    if arr.min() < 1:
        raise ValueError(f"lengths must be >= 1 token, got minimum {arr.min()}")
    return arr.astype(np.int64)


def bucket_batch_sizes(boundaries: Sequence[int], token_budget: int) -> tuple[int, ...]:
    """Batch size per bucket, ``max(1, token_budget // upper)``.

    >>> bucket_batch_sizes((500, 1000, 8192), 16384)
    (32, 16, 2)
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    return tuple(max(1, int(token_budget) // int(b)) for b in boundaries)


def assign_buckets(lengths: Sequence[int], boundaries: Sequence[int] = DEFAULT_BOUNDARIES) -> np.ndarray:
    """Bucket id of each example: bucket ``k`` holds lengths in ``(boundaries[k-1], boundaries[k]]``.

    >>> assign_buckets([1, 500, 501, 8192]).tolist()
    [0, 0, 1, 8]
    """
    arr = _as_lengths(lengths)
    bounds = np.asarray(boundaries, dtype=np.int64)
    if bounds.ndim != 1 or bounds.size == 0 or np.any(np.diff(bounds) <= 0) or bounds[0] < 1:
        raise ValueError(f"boundaries must be strictly increasing positive ints, got {list(boundaries)}")
    if arr.max() > bounds[-1]:
        raise ValueError(
            f"example length {arr.max()} exceeds the largest boundary {bounds[-1]}; truncate the example "
            "or add a boundary"
        )
    return np.searchsorted(bounds, arr, side="left")


class LengthBucketSampler:
    """Batches of example indices, each batch drawn from one length bucket.

    Args:
        lengths: ``[N]`` token length of each example (see :func:`example_length`).
        boundaries: increasing upper lengths of the buckets (default: the paper's ranges).
        token_budget: padded tokens allowed per batch; gives each bucket's batch size.
        seed: base seed; the batches of epoch ``e`` depend only on ``(seed, e)``.
        shuffle: shuffle examples within buckets and the order of batches; if False, batches are
            consecutive indices per bucket, buckets in increasing length.
        drop_last: drop each bucket's final incomplete batch.
        batch_sizes: optional explicit batch size per bucket (overrides ``token_budget``), e.g. a table.

    ``epoch(e)`` returns all batches of epoch ``e``. Iterating the sampler yields the remaining batches
    of the current epoch and then moves to the next epoch; ``state_dict()`` records the position, so a
    sampler restored with ``load_state_dict`` continues with exactly the batches the original would.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        boundaries: Sequence[int] = DEFAULT_BOUNDARIES,
        token_budget: int = 16384,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        self.lengths = _as_lengths(lengths)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.buckets = assign_buckets(self.lengths, self.boundaries)
        if batch_sizes is None:
            self.batch_sizes = bucket_batch_sizes(self.boundaries, token_budget)
        else:
            if len(batch_sizes) != len(self.boundaries) or min(batch_sizes) < 1:
                raise ValueError(
                    f"batch_sizes needs one size >= 1 per bucket ({len(self.boundaries)}), got {batch_sizes}"
                )
            self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.token_budget = int(token_budget)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._members = [np.flatnonzero(self.buckets == k) for k in range(len(self.boundaries))]
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        """Number of batches per epoch (the same for every epoch)."""
        total = 0
        for members, size in zip(self._members, self.batch_sizes):
            total += len(members) // size if self.drop_last else -(-len(members) // size)
        return total

    def epoch(self, e: int) -> list[list[int]]:
        """All batches of epoch ``e``; a deterministic function of ``(seed, e)``."""
        if e < 0:
            raise ValueError(f"epoch must be >= 0, got {e}")
        rng = np.random.default_rng([self.seed, int(e)])
        batches: list[list[int]] = []
        for members, size in zip(self._members, self.batch_sizes):
            order = rng.permutation(members) if self.shuffle else members
            stop = len(order) - len(order) % size if self.drop_last else len(order)
            batches.extend(order[i : i + size].tolist() for i in range(0, stop, size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch(self._epoch)
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield batch
        self._epoch += 1
        self._position = 0

    def _fingerprint(self) -> str:
        digest = hashlib.sha1(self.lengths.tobytes())
        digest.update(repr((self.boundaries, self.batch_sizes, self.shuffle, self.drop_last)).encode())
        return digest.hexdigest()

    def state_dict(self) -> dict:
        """Position of the sampler: ``{"seed", "epoch", "position", "fingerprint"}`` (JSON-serialisable)."""
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` from a sampler over the same data."""
        missing = {"seed", "epoch", "position", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing keys {sorted(missing)}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("sampler state was saved for different lengths/boundaries/batch sizes")
        if not 0 <= int(state["position"]) <= len(self) or int(state["epoch"]) < 0:
            raise ValueError(f"invalid sampler position {state['epoch']}:{state['position']}")
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict:
    """Padded vs real tokens when every batch is padded to its longest example.

    Returns ``{"padded_tokens", "real_tokens", "waste_fraction"}`` with
    ``waste_fraction = 1 - real_tokens / padded_tokens``.

    >>> padding_waste([[0, 1], [2]], [2, 4, 3])
    {'padded_tokens': 11, 'real_tokens': 9, 'waste_fraction': 0.18181818181818177}
    """
    arr = _as_lengths(lengths)
    padded = real = 0
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        if idx.size == 0:
            raise ValueError("padding_waste got an empty batch")
        if idx.min() < 0 or idx.max() >= arr.size:
            raise ValueError(f"batch index out of range [0, {arr.size}): {list(batch)}")
        padded += int(idx.size * arr[idx].max())
        real += int(arr[idx].sum())
    waste = 1.0 - real / padded if padded else 0.0
    return {"padded_tokens": padded, "real_tokens": real, "waste_fraction": waste}


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Baseline without bucketing: a seeded permutation of ``range(n)`` cut into batches of ``batch_size``.

    >>> sorted(sum(random_batches(5, 2, seed=1), []))
    [0, 1, 2, 3, 4]
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def split_batch(batch_indices: Sequence[int], sub_batch_size: int) -> list[list[int]]:
    """Cut one batch into consecutive sub-batches of at most ``sub_batch_size`` (split-batch training).

    The model encodes each sub-batch separately (with gradient checkpointing) and concatenates the
    embeddings before the loss, so the loss still sees the whole batch.

    >>> split_batch([7, 3, 9, 1, 4], 2)
    [[7, 3], [9, 1], [4]]
    """
    if sub_batch_size < 1:
        raise ValueError(f"sub_batch_size must be >= 1, got {sub_batch_size}")
    items = list(batch_indices)
    if not items:
        raise ValueError("split_batch got an empty batch")
    return [items[i : i + sub_batch_size] for i in range(0, len(items), sub_batch_size)]


def length_chunks(lengths: Sequence[int], max_chunks: int) -> list[list[int]]:
    """Partition one batch's texts into at most ``max_chunks`` length-sorted chunks of least padding.

    Bucketing by example length leaves the padding *inside* an example: its positive and negatives
    differ in length, and one padded passage matrix pads every text to the batch's longest. Encoding the
    batch's texts instead in chunks of similar length, each padded to its own longest, removes most of
    it. Sorted by length, the best partition into ``k`` contiguous runs minimises
    ``sum(len(run) * max(run))`` (padded tokens); found exactly by dynamic programming in O(k n^2).

    Returns positions into ``lengths``: chunks in increasing length, each in increasing length (ties by
    position), together every position exactly once.

    >>> length_chunks([100, 12, 90, 15, 11], 2)
    [[4, 1, 3], [2, 0]]
    >>> length_chunks([5, 9], 1)
    [[0, 1]]
    """
    arr = _as_lengths(lengths)
    if int(max_chunks) != max_chunks or max_chunks < 1:
        raise ValueError(f"max_chunks must be a whole number >= 1, got {max_chunks}")
    order = np.argsort(arr, kind="stable")
    s = arr[order]
    n, k = len(s), min(int(max_chunks), len(s))
    # cost[c][j]: least padded tokens of the first j sorted texts in c runs; cut[c][j]: start of the last run
    cost = np.full((k + 1, n + 1), np.inf)
    cut = np.zeros((k + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            starts = np.arange(c - 1, j)                  # the last run is s[i:j], padded to s[j-1]
            total = cost[c - 1, starts] + (j - starts) * s[j - 1]
            best = int(np.argmin(total))
            cost[c, j], cut[c, j] = total[best], starts[best]
    c = int(np.argmin(cost[1:, n])) + 1                   # fewest runs among the optimal ones
    runs, j = [], n
    while c > 0:
        i = int(cut[c, j])
        runs.append(order[i:j].tolist())
        j, c = i, c - 1
    return runs[::-1]


def chunk_batches(batches: Sequence[Sequence[int]], lengths: Sequence[int], max_chunks: int) -> list[list[list[int]]]:
    """Each batch of text indices -> its :func:`length_chunks` (lists of text indices, each chunk padded
    alone), as the trainer encodes a batch's passages.

    >>> chunk_batches([[0, 1, 2]], [100, 12, 90], 2)
    [[[1], [2, 0]]]
    """
    arr = _as_lengths(lengths)
    out = []
    for batch in batches:
        items = list(batch)
        if not items:
            raise ValueError("chunk_batches got an empty batch")
        out.append([[items[j] for j in ch] for ch in length_chunks(arr[items], max_chunks)])
    return out
