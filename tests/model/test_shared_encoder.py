"""shared_encoder_pass: two models on one encoder run it once per batch and keep their own vectors."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor
from tiny_m3 import tiny_model_dir

from bgem3_lib import BGEM3
from bgem3_lib.model.shared_encoder import shared_encoder_pass

TEXTS = [" ".join(["word"] * n) + f" text {n}" for n in (3, 17, 8, 1, 30, 12, 5, 22, 9, 2)]


def _encode(m, **kw):
    return m.encode_corpus(TEXTS, batch_size=4, return_sparse=True, return_colbert_vecs=True, **kw)


def _same(x, y) -> bool:
    return (np.array_equal(x["dense_vecs"], y["dense_vecs"]) and x["lexical_weights"] == y["lexical_weights"]
            and all(np.array_equal(a, b) for a, b in zip(x["colbert_vecs"], y["colbert_vecs"])))


@pytest.fixture(scope="module")
def pair():
    path = str(tiny_model_dir())
    a, b = BGEM3(path), BGEM3(path)
    for p in b.heads.get_parameters():                 # other heads on the same encoder
        p.set_data(Tensor((-1.5 * p.asnumpy() + 0.1).astype(np.float32)))
    return a, b


def test_one_encoder_pass_gives_each_model_its_own_vectors(pair):
    a, b = pair
    alone = [_encode(m) for m in (a, b)]
    assert alone[0]["lexical_weights"] != alone[1]["lexical_weights"]         # the heads do differ
    with shared_encoder_pass([a, b]) as counts:
        together = [_encode(m) for m in (a, b)]
    assert counts == {"encoder": 3, "shared": 3}                             # 10 texts in batches of 4
    assert all(_same(x, y) for x, y in zip(alone, together))
    assert a._encoder_pass is None and b._encoder_pass is None                # left as found


def test_a_full_memo_drops_old_batches_and_stays_exact(pair):
    a, b = pair
    alone = [_encode(m) for m in (a, b)]
    with shared_encoder_pass([a, b], max_bytes=1) as counts:                  # keeps one batch at most
        together = [_encode(m) for m in (a, b)]
    assert counts["encoder"] > 3 and all(_same(x, y) for x, y in zip(alone, together))


def test_models_with_another_encoder_are_refused(pair):
    other = BGEM3(str(tiny_model_dir(seed=1)))
    with pytest.raises(ValueError, match="one encoder"):
        with shared_encoder_pass([pair[0], other]):
            pass
    with pytest.raises(ValueError, match="at least one"):
        with shared_encoder_pass([]):
            pass


def test_batches_of_the_same_shape_are_told_apart_by_their_tokens(pair):
    a, _ = pair
    texts = ["word one", "text two"]                                          # 4 tokens each, other tokens
    alone = [a.encode_corpus([t], return_sparse=True) for t in texts]
    with shared_encoder_pass([a]) as counts:
        together = [a.encode_corpus([t], return_sparse=True) for t in texts]
    assert counts == {"encoder": 2, "shared": 0}
    assert all(np.array_equal(x["dense_vecs"], y["dense_vecs"]) for x, y in zip(alone, together))
