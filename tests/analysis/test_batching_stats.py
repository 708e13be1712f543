"""Tests for bgem3_lib.analysis.batching_stats: per-batch padding, timing rows, throughput, memory helpers."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.analysis.batching_stats import (
    batch_shapes,
    layer_activation_bytes,
    main,
    padded_forward,
    peak_rss_growth,
    throughput,
    time_batches,
)
from bgem3_lib.training.bucketing import padding_waste


def _pad(seqs):
    width = max(len(s) for s in seqs)
    ids = np.ones((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def test_batch_shapes_hand_worked_and_consistent_with_padding_waste():
    lengths = [3, 5, 4, 1]
    batches = [[0, 1], [2], [3, 2]]
    rows = batch_shapes(batches, lengths)
    assert rows == [{"batch_size": 2, "padded_len": 5, "real_tokens": 8, "padded_tokens": 10},
                    {"batch_size": 1, "padded_len": 4, "real_tokens": 4, "padded_tokens": 4},
                    {"batch_size": 2, "padded_len": 4, "real_tokens": 5, "padded_tokens": 8}]
    waste = padding_waste(batches, lengths)
    assert waste["padded_tokens"] == sum(r["padded_tokens"] for r in rows) == 22
    assert waste["real_tokens"] == sum(r["real_tokens"] for r in rows) == 17


@pytest.mark.parametrize("batches,lengths,match", [([[]], [3], "empty"), ([[0, 5]], [3, 4], "outside"),
                                                   ([[0]], [], "non-empty"), ([[0]], [0], ">= 1"),
                                                   ([[0]], [2.5], "integers")])
def test_batch_shapes_bad_input(batches, lengths, match):
    with pytest.raises(ValueError, match=match):
        batch_shapes(batches, lengths)


def test_time_batches_pads_each_batch_and_warms_up():
    token_ids = [[0, 7, 2], [0, 2], [0, 5, 6, 7, 2]]
    seen = []

    def forward(ids, mask):
        seen.append((ids.shape, int(mask.sum())))
        return ids

    rows = time_batches(forward, token_ids, [[0, 1], [2]], _pad, warmup=1)
    assert seen == [((2, 3), 5), ((2, 3), 5), ((1, 5), 5)]       # warm-up call, then the two timed ones
    assert [r["padded_tokens"] for r in rows] == [6, 5] and all(r["seconds"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="pad returned"):
        time_batches(forward, token_ids, [[0, 1]], lambda s: (np.zeros((1, 1)), np.zeros((1, 1))), warmup=0)


def test_throughput_hand_worked():
    rows = [{"real_tokens": 8, "padded_tokens": 10, "seconds": 1.5},
            {"real_tokens": 4, "padded_tokens": 6, "seconds": 0.5}]
    t = throughput(rows)
    assert t["tokens_per_s"] == 6.0 and t["padded_per_s"] == 8.0 and t["seconds"] == 2.0
    assert t["padding_waste"] == pytest.approx(0.25) and t["batches"] == 2
    with pytest.raises(ValueError, match="at least one"):
        throughput([])
    with pytest.raises(ValueError, match="positive"):
        throughput([{"real_tokens": 1, "padded_tokens": 1, "seconds": 0.0}])


def test_layer_activation_bytes_counts():
    b, n, h, a, i = 2, 8, 16, 4, 64
    ref_linear = b * n * h * 5 + b * n * i * 2          # x, q, k, v, ctx, attn-out; ffn pre/post GELU
    ref_quadratic = b * a * n * n * 2                    # scores + probabilities
    got = layer_activation_bytes(b, n, h, a, i, dtype_bytes=4)
    assert got == {"linear": 4 * ref_linear, "quadratic": 4 * ref_quadratic, "total": 4 * (ref_linear + ref_quadratic)}
    twice = layer_activation_bytes(b, 2 * n, h, a, i, dtype_bytes=4)
    assert twice["linear"] == 2 * got["linear"] and twice["quadratic"] == 4 * got["quadratic"]
    with pytest.raises(ValueError, match="length"):
        layer_activation_bytes(1, 0, 4, 2, 8)


def test_peak_rss_growth_sees_a_large_allocation():
    def alloc():
        a = np.ones(40 * 2**20 // 8)          # 40 MiB, touched
        return float(a.sum())

    result, grown = peak_rss_growth(alloc)
    assert result == 40 * 2**20 // 8
    assert grown > 30 * 2**20


def test_padded_forward_equals_the_encoder():
    from tiny_m3 import tiny_model_dir

    from bgem3_lib.model.bgem3 import BGEM3
    from bgem3_lib.model.encoder import encoder_inputs

    m = BGEM3(str(tiny_model_dir()))
    ids, mask = m.tokenizer.batch(["a short text", "a somewhat longer text with more words in it"], 32)
    full = m.encoder(*encoder_inputs(ids, mask, m.config)).asnumpy()
    np.testing.assert_allclose(padded_forward(m.encoder)(ids, mask), full, atol=1e-6)
    one = padded_forward(m.encoder, 1)(ids, mask)
    assert one.shape == full.shape and not np.allclose(one, full, atol=1e-3)
    with pytest.raises(ValueError, match="n_layers"):
        padded_forward(m.encoder, 3)


def test_layer_step_cli_in_process(capsys):
    import json
    assert main(["--batch", "2", "--length", "16", "--hidden", "32", "--heads", "4", "--intermediate", "64"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["batch"] == 2 and row["length"] == 16 and row["train"] is True and row["seconds"] > 0
    assert isinstance(row["peak_bytes"], int)
    with pytest.raises(SystemExit):
        main(["--batch", "2", "--length", "16", "--hidden", "30", "--heads", "4"])


def test_measured_peak_holds_at_least_the_activations_a_layer_keeps():
    """A training step of one layer in a fresh process: its resident peak must cover the activations it keeps
    for backward (10.7 MB here); a measurement that read 0 or a constant would fail."""
    from bgem3_lib.analysis.batching_stats import measure_layer_memory
    row = measure_layer_memory([256], batch=4, hidden=64, heads=4, intermediate=128)[0]
    assert row["estimate_bytes"] == layer_activation_bytes(4, 256, 64, 4, 128)["total"] == 10_747_904
    assert row["peak_bytes"] >= row["estimate_bytes"]


@pytest.mark.slow
def test_measure_layer_memory_grows_with_length():
    from bgem3_lib.analysis.batching_stats import measure_layer_memory
    rows = measure_layer_memory([32, 256], batch=4, hidden=64, heads=4, intermediate=128)
    assert [r["length"] for r in rows] == [32, 256]
    assert rows[1]["peak_bytes"] > rows[0]["peak_bytes"] and rows[1]["estimate_bytes"] > rows[0]["estimate_bytes"]
