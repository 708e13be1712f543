"""Reader for the ``e5-small-q4.bin`` weight file (multilingual-e5-small, 4-bit).

Layout (little-endian): magic ``E5S1`` + 4 reserved bytes; int32 hidden, layers, heads,
ffn, vocab, max_pos, type_vocab; float32 layer-norm eps; int32 reserved; a tokenizer
block we skip; then a tensor table (name, dtype 0=float32 / else Q4_0, element count,
absolute offset). Q4_0 packs 32 weights in 18 bytes: a float16 scale, then 16 bytes
where byte j holds weight j (low nibble) and weight j+16 (high nibble);
value = (nibble - 8) * scale.

>>> blk = np.array([2.0], np.float16).tobytes() + bytes([0x9F] + [0x88] * 15)
>>> dequantize_q4_0(np.frombuffer(blk, np.uint8), 32)[[0, 16, 1]]
array([14.,  2.,  0.], dtype=float32)

``read_e5(path)`` returns ``(header, state)`` where ``state`` uses the Hugging Face BERT
parameter names, so the same encoder loader serves e5 and BGE-M3 checkpoints.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

_HEADER = struct.Struct("<4s4x7if i")
_Q4_BLOCK = 32
_Q4_BYTES = 18


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes [n_blocks*18] -> float32 [count] (Q4_0 blocks of 32 weights)."""
    n_blocks = -(-count // _Q4_BLOCK)
    if raw.size < n_blocks * _Q4_BYTES:
        raise ValueError(f"Q4_0 data truncated: need {n_blocks * _Q4_BYTES} bytes, have {raw.size}")
    blocks = raw[: n_blocks * _Q4_BYTES].reshape(n_blocks, _Q4_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)          # [n_blocks, 1]
    packed = blocks[:, 2:]                                                     # [n_blocks, 16]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # [n_blocks, 32]
    return ((nibbles - 8.0) * scale).reshape(-1)[:count]


def _hf_name(name: str) -> str:
    """Map e5 tensor names (``l3.q.w``) to Hugging Face BERT names."""
    fixed = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    if name in fixed:
        return fixed[name]
    pieces = name.split(".")
    if len(pieces) != 3 or not re.fullmatch(r"l[0-9]+", pieces[0]) or pieces[2] not in ("w", "b"):
        raise ValueError(f"unexpected tensor name {name!r} in e5 file")
    layer, part, wb = pieces
    suffix = "weight" if wb == "w" else "bias"
    parts = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
    }
    if part not in parts:
        raise ValueError(f"unexpected tensor name {name!r} in e5 file")
    return f"encoder.layer.{int(layer[1:])}.{parts[part]}.{suffix}"


def _shapes(h: dict) -> dict[str, tuple]:
    H, F = h["hidden_size"], h["intermediate_size"]
    s = {
        "embeddings.word_embeddings.weight": (h["vocab_size"], H),
        "embeddings.position_embeddings.weight": (h["max_position_embeddings"], H),
        "embeddings.token_type_embeddings.weight": (h["type_vocab_size"], H),
    }
    for i in range(h["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            s[p + m + ".weight"] = (H, H)
        s[p + "intermediate.dense.weight"] = (F, H)
        s[p + "output.dense.weight"] = (H, F)
    return s


def read_e5(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse an e5 ``.bin``; returns (header dict, {hf_name: float32 array})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"e5 weight file not found: {path}")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    data = memoryview(buf)
    if len(data) < _HEADER.size or bytes(data[:4]) != b"E5S1":
        raise ValueError(f"{path} is not an e5 weight file (bad magic or too short)")
    magic, H, L, A, F, V, P, T, eps, _ = _HEADER.unpack_from(data, 0)
    header = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=A, intermediate_size=F,
                  vocab_size=V, max_position_embeddings=P, type_vocab_size=T, layer_norm_eps=eps)
    pos = _HEADER.size
    try:
        # tokenizer block: int32 n; four int32; uint64 blob_len; (n+1)*4 + n*4 + blob bytes
        n, = struct.unpack_from("<i", data, pos)
        pos += 4 + 16
        blob_len, = struct.unpack_from("<Q", data, pos)
        pos += 8 + (n + 1) * 4 + n * 4 + blob_len
        pos += 4                                   # int32
        m, = struct.unpack_from("<I", data, pos)
        pos += 4 + m                               # normalisation table
        count, = struct.unpack_from("<i", data, pos)
        pos += 4
        table = []
        for _ in range(count):
            nlen, = struct.unpack_from("<H", data, pos)
            pos += 2
            name = bytes(data[pos:pos + nlen]).decode("utf-8")
            pos += nlen
            dtype, numel, offset, _unused = struct.unpack_from("<BIQQ", data, pos)
            pos += 1 + 4 + 8 + 8
            table.append((name, dtype, numel, offset))
    except struct.error as exc:
        raise ValueError(f"{path} is truncated: header/tensor table ends early ({exc})") from None
    shapes = _shapes(header)
    state = {}
    for name, dtype, numel, offset in table:
        hf = _hf_name(name)
        if dtype == 0:
            end = offset + 4 * numel
            if end > len(buf):
                raise ValueError(f"{path} is truncated: tensor {name} ends at byte {end} > {len(buf)}")
            arr = np.frombuffer(buf, dtype="<f4", count=numel, offset=offset).astype(np.float32)
        else:
            nbytes = -(-numel // _Q4_BLOCK) * _Q4_BYTES
            if offset + nbytes > len(buf):
                raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
            arr = dequantize_q4_0(np.asarray(buf[offset:offset + nbytes]), numel)
        shape = shapes.get(hf, (numel,))
        if int(np.prod(shape)) != numel:
            raise ValueError(f"tensor {name} has {numel} elements, expected shape {shape}")
        state[hf] = arr.reshape(shape)
    return header, state
