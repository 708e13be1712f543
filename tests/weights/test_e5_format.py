"""The e5 ``.bin`` reader: the real ``e5-small-q4.bin`` (header, tensor table, values read back with a
separate struct parser and a per-element Q4_0 decoder), small files written here from known values (the
writer packs nibbles by hand, so every expected weight is known exactly), and truncated/corrupt files."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from bgem3_lib.weights.assets import asset_path
from bgem3_lib.weights.e5_format import dequantize_q4_0, read_e5

# ---------------------------------------------------------------- an independent writer / decoder


def q4_block(nibbles, scale: float) -> bytes:
    """One Q4_0 block: float16 scale, then byte j = nibble j (low) | nibble j+16 (high)."""
    nibbles = list(nibbles) + [8] * (32 - len(nibbles))        # pad a last partial block with zeros
    assert len(nibbles) == 32 and all(0 <= q <= 15 for q in nibbles)
    return struct.pack("<e", scale) + bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))


def q4_encode(nibbles: np.ndarray, scales: list) -> bytes:
    return b"".join(q4_block(nibbles[i * 32:(i + 1) * 32].tolist(), s) for i, s in enumerate(scales))


def q4_decode_slow(raw: bytes, count: int) -> np.ndarray:
    """Element by element: block i // 32, byte 2 + (i % 16) of it, low nibble for j < 16, else high."""
    out = []
    for i in range(count):
        blk, j = divmod(i, 32)
        scale = struct.unpack_from("<e", raw, blk * 18)[0]
        byte = raw[blk * 18 + 2 + j % 16]
        q = byte & 0x0F if j < 16 else byte >> 4
        out.append((q - 8) * scale)
    return np.array(out, np.float32)


def write_e5(path, header: dict, tensors: list, vocab_n: int = 3, blob: bytes = b"abc", norm: bytes = b"xy",
             truncate: int | None = None, magic: bytes = b"E5S1"):
    """Write an e5 file. ``tensors``: (name, dtype, numel, payload bytes) with dtype 0 = float32, 1 = Q4_0."""
    h = header
    head = magic + b"\0" * 4 + struct.pack("<7ifi", h["H"], h["L"], h["A"], h["F"], h["V"], h["P"], h["T"],
                                           h["eps"], 0)
    tok = struct.pack("<i4iQ", vocab_n, 0, 2, 1, 3, len(blob)) + b"\0" * ((vocab_n + 1) * 4 + vocab_n * 4) + blob
    tok += struct.pack("<i", 0) + struct.pack("<I", len(norm)) + norm
    table_len = 4 + sum(2 + len(n.encode()) + 1 + 4 + 8 + 8 for n, *_ in tensors)
    offset = len(head) + len(tok) + table_len
    table, data = struct.pack("<i", len(tensors)), b""
    for name, dtype, numel, payload in tensors:
        enc = name.encode()
        table += struct.pack("<H", len(enc)) + enc + struct.pack("<BIQQ", dtype, numel, offset + len(data),
                                                                 len(payload))
        data += payload
    blob_all = head + tok + table + data
    path.write_bytes(blob_all[:truncate] if truncate is not None else blob_all)
    return len(head) + len(tok), len(blob_all)


TINY = dict(H=4, L=1, A=2, F=8, V=10, P=6, T=2, eps=1e-5)


def tiny_tensors(rng):
    """Known values: Q4 word embeddings [10, 4] (40 = 1 full + 1 partial block), Q4 position table [6, 4]
    (24: one partial block), float32 layer norm and bias, Q4 FFN weight [8, 4] (exactly one block)."""
    word_q = rng.integers(0, 16, 40)
    pos_q = rng.integers(0, 16, 24)
    fi_q = rng.integers(0, 16, 32)
    ln = rng.normal(size=4).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    scales = {"word": [0.5, 0.125], "pos": [0.25], "fi": [2.0]}              # exact in float16
    expected = {
        "embeddings.word_embeddings.weight": ((word_q - 8) * np.repeat([0.5, 0.125], 32)[:40]).reshape(10, 4),
        "embeddings.position_embeddings.weight": ((pos_q - 8) * 0.25).reshape(6, 4),
        "embeddings.LayerNorm.weight": ln,
        "encoder.layer.0.intermediate.dense.weight": ((fi_q - 8) * 2.0).reshape(8, 4),
        "encoder.layer.0.intermediate.dense.bias": bias,
    }
    tensors = [("emb.word", 1, 40, q4_encode(word_q, scales["word"])),
               ("emb.pos", 1, 24, q4_encode(pos_q, scales["pos"])),
               ("emb.ln.w", 0, 4, ln.astype("<f4").tobytes()),
               ("l0.fi.w", 1, 32, q4_encode(fi_q, scales["fi"])),
               ("l0.fi.b", 0, 8, bias.astype("<f4").tobytes())]
    return tensors, {k: v.astype(np.float32) for k, v in expected.items()}


# ---------------------------------------------------------------- dequantisation


def test_dequantize_matches_slow_decoder_and_known_values():
    rng = np.random.default_rng(0)
    nib = rng.integers(0, 16, 96)
    scales = [0.75, -1.5, 3.0625]
    raw = q4_encode(nib, scales)
    got = dequantize_q4_0(np.frombuffer(raw, np.uint8), 96)
    assert got.dtype == np.float32 and got.shape == (96,)
    np.testing.assert_array_equal(got, q4_decode_slow(raw, 96))
    np.testing.assert_array_equal(got, (nib - 8) * np.repeat(scales, 32))
    # a count that ends inside the last block: only the first 70 values
    np.testing.assert_array_equal(dequantize_q4_0(np.frombuffer(raw, np.uint8), 70), got[:70])
    # byte 0x9F: weight 0 = 0xF - 8 = 7, weight 16 = 0x9 - 8 = 1
    blk = np.frombuffer(struct.pack("<e", 2.0) + bytes([0x9F] + [0x88] * 15), np.uint8)
    out = dequantize_q4_0(blk, 32)
    assert out[0] == 14.0 and out[16] == 2.0 and not out[1:16].any() and not out[17:].any()


def test_dequantize_truncated_raw_names_sizes():
    raw = np.zeros(18 * 2 - 1, np.uint8)
    with pytest.raises(ValueError, match="need 36 bytes, have 35"):
        dequantize_q4_0(raw, 33)


# ---------------------------------------------------------------- small hand-made files


def test_read_hand_made_file(tmp_path):
    tensors, expected = tiny_tensors(np.random.default_rng(1))
    write_e5(tmp_path / "tiny.bin", TINY, tensors)
    header, state = read_e5(tmp_path / "tiny.bin")
    assert header == dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                          vocab_size=10, max_position_embeddings=6, type_vocab_size=2,
                          layer_norm_eps=pytest.approx(1e-5, rel=1e-6))
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state[k].dtype == np.float32 and state[k].shape == v.shape, k
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_all_tensor_names_map_to_hf_bert_names(tmp_path):
    parts = {"q": ("attention.self.query", (4, 4)), "k": ("attention.self.key", (4, 4)),
             "v": ("attention.self.value", (4, 4)), "ao": ("attention.output.dense", (4, 4)),
             "aln": ("attention.output.LayerNorm", None), "fi": ("intermediate.dense", (8, 4)),
             "fo": ("output.dense", (4, 8)), "oln": ("output.LayerNorm", None)}
    tensors, expected_shapes = [], {}
    rng = np.random.default_rng(2)
    for layer in (0, 1):
        for short, (hf, shape) in parts.items():
            for wb, suffix in (("w", "weight"), ("b", "bias")):
                shp = shape if (wb == "w" and shape is not None) else ((shape or (4,))[0],)
                numel = int(np.prod(shp))
                vals = rng.normal(size=numel).astype("<f4")
                tensors.append((f"l{layer}.{short}.{wb}", 0, numel, vals.tobytes()))
                expected_shapes[f"encoder.layer.{layer}.{hf}.{suffix}"] = (shp, vals)
    tensors.append(("emb.type", 0, 8, np.arange(8, dtype="<f4").tobytes()))
    tensors.append(("emb.ln.b", 0, 4, np.arange(4, dtype="<f4").tobytes()))
    write_e5(tmp_path / "names.bin", dict(TINY, L=2), tensors)
    _, state = read_e5(tmp_path / "names.bin")
    assert len(state) == len(tensors)
    for k, (shape, vals) in expected_shapes.items():
        assert state[k].shape == shape, k
        np.testing.assert_array_equal(state[k].reshape(-1), vals)
    np.testing.assert_array_equal(state["embeddings.token_type_embeddings.weight"], np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(state["embeddings.LayerNorm.bias"], np.arange(4))


# ---------------------------------------------------------------- truncated / corrupt files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="e5 weight file not found"):
        read_e5(tmp_path / "nope.bin")


def test_bad_magic_and_short_file(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(3))
    write_e5(tmp_path / "magic.bin", TINY, tensors, magic=b"GGUF")
    with pytest.raises(ValueError, match="not an e5 weight file"):
        read_e5(tmp_path / "magic.bin")
    (tmp_path / "short.bin").write_bytes(b"E5S1\0\0\0\0\1\0\0\0")
    with pytest.raises(ValueError, match="not an e5 weight file"):
        read_e5(tmp_path / "short.bin")


def test_file_cut_inside_the_table(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(4))
    table_start, _ = write_e5(tmp_path / "ok.bin", TINY, tensors)
    for cut in (60, table_start + 2, table_start + 20):
        write_e5(tmp_path / "cut.bin", TINY, tensors, truncate=cut)
        with pytest.raises(ValueError, match="is truncated: header/tensor table ends early"):
            read_e5(tmp_path / "cut.bin")


def test_file_cut_inside_tensor_data_names_the_tensor(tmp_path):
    rng = np.random.default_rng(5)
    tensors, _ = tiny_tensors(rng)
    last_f32 = tensors[:4] + [tensors[4]]            # l0.fi.b (float32, 32 bytes) is the last payload
    _, size = write_e5(tmp_path / "f.bin", TINY, last_f32, truncate=None)
    write_e5(tmp_path / "f.bin", TINY, last_f32, truncate=size - 4)
    with pytest.raises(ValueError, match=r"truncated: tensor l0\.fi\.b ends at byte"):
        read_e5(tmp_path / "f.bin")
    last_q4 = [tensors[4], tensors[0]]                # emb.word (Q4, 36 bytes) last
    _, size = write_e5(tmp_path / "q.bin", TINY, last_q4)
    write_e5(tmp_path / "q.bin", TINY, last_q4, truncate=size - 1)
    with pytest.raises(ValueError, match=r"truncated: tensor emb\.word ends past the end"):
        read_e5(tmp_path / "q.bin")


def test_element_count_that_does_not_fit_the_header_shape(tmp_path):
    write_e5(tmp_path / "n.bin", TINY, [("l0.q.w", 0, 12, np.zeros(12, "<f4").tobytes())])
    with pytest.raises(ValueError, match=r"tensor l0\.q\.w has 12 elements, expected shape \(4, 4\)"):
        read_e5(tmp_path / "n.bin")


@pytest.mark.parametrize("name", ["l0.zz.w", "l0.q.x", "x0.q.w"])
def test_unknown_tensor_names(tmp_path, name):
    write_e5(tmp_path / "u.bin", TINY, [(name, 0, 4, np.zeros(4, "<f4").tobytes())])
    with pytest.raises(ValueError, match=f"unexpected tensor name '{name}'"):
        read_e5(tmp_path / "u.bin")


@pytest.mark.parametrize("name", ["garbage", "l0.q", "l0.q.w.extra", "lx.q.w"])
def test_malformed_tensor_names_are_named(tmp_path, name):
    write_e5(tmp_path / "m.bin", TINY, [(name, 0, 4, np.zeros(4, "<f4").tobytes())])
    with pytest.raises(ValueError, match="unexpected tensor name"):
        read_e5(tmp_path / "m.bin")


# ---------------------------------------------------------------- the real asset


def _real_table(raw: bytes):
    """Independent parse of the real file's tensor table: {name: (dtype, numel, offset)}."""
    pos = 44
    n, = struct.unpack_from("<i", raw, pos)
    blob_len, = struct.unpack_from("<Q", raw, pos + 20)
    pos += 28 + (2 * n + 1) * 4 + blob_len + 4
    m, = struct.unpack_from("<I", raw, pos)
    pos += 4 + m
    count, = struct.unpack_from("<i", raw, pos)
    pos += 4
    table = {}
    for _ in range(count):
        nlen, = struct.unpack_from("<H", raw, pos)
        name = raw[pos + 2:pos + 2 + nlen].decode()
        pos += 2 + nlen
        table[name] = struct.unpack_from("<BIQ", raw, pos)
        pos += 21
    return table


@pytest.fixture(scope="module")
def real():
    path = asset_path("e5-small-q4.bin")
    return path.read_bytes(), read_e5(path)


def test_real_file_header(real):
    _, (header, _) = real
    # multilingual-e5-small: BERT-small shape over the XLM-R vocabulary (+35 added tokens), 512 positions
    assert header == dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                          vocab_size=250037, max_position_embeddings=512, type_vocab_size=2,
                          layer_norm_eps=pytest.approx(1e-12, rel=1e-6))


def test_real_file_tensors_against_independent_parse(real):
    raw, (header, state) = real
    table = _real_table(raw)
    assert len(table) == len(state) == 5 + 12 * 16
    assert state["embeddings.word_embeddings.weight"].shape == (250037, 384)
    assert state["encoder.layer.11.output.dense.weight"].shape == (384, 1536)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    # a float32 tensor, byte for byte
    dtype, numel, off = table["emb.ln.w"]
    assert dtype == 0 and numel == 384
    np.testing.assert_array_equal(state["embeddings.LayerNorm.weight"],
                                  np.array(struct.unpack_from("<384f", raw, off), np.float32))
    # Q4_0 tensors: the first 3 blocks and the last (partial or full) block, element by element
    for short, hf in (("l0.q.w", "encoder.layer.0.attention.self.query.weight"),
                      ("emb.word", "embeddings.word_embeddings.weight"),
                      ("l11.fo.w", "encoder.layer.11.output.dense.weight")):
        dtype, numel, off = table[short]
        assert dtype != 0, short
        flat = state[hf].reshape(-1)
        np.testing.assert_array_equal(flat[:96], q4_decode_slow(raw[off:off + 54], 96), err_msg=short)
        last = (numel - 1) // 32
        tail = q4_decode_slow(raw[off + last * 18:off + last * 18 + 18], numel - last * 32)
        np.testing.assert_array_equal(flat[last * 32:], tail, err_msg=short)
