"""The XLM-RoBERTa / BERT encoder as thin MindSpore ``nn.Cell``s (post-LN transformer).

Shapes: ``input_ids`` / ``attention_mask`` / ``position_ids`` are ``[B, L]`` int32;
the encoder returns ``last_hidden_state`` ``[B, L, H]``.

Query, key and value projections are fused into one ``[3H, H]`` matrix (one matmul
instead of three); ``load_hf_state`` splits the Hugging Face names onto it.

Inference goes through ``M3Encoder.forward_packed``: only the attended tokens are computed, packed
end to end as ``[T, H]`` (``offsets [B+1]`` mark the texts). On CPU with float32 weights it runs the
fused kernels of ``cpu_kernels`` (NumPy's BLAS, no FLOP spent on padding); elsewhere (GPU, Ascend,
fp16/bf16, training) the plain MindSpore cells below, whose output is then packed the same way.

A new ``M3Encoder`` holds zeros (allocated lazily, so building one costs no memory) until
``load_hf_state`` fills it; ``share_memory=True`` there adopts the checkpoint's arrays without a copy.

>>> cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
...                intermediate_size=16, vocab_size=10, max_position_embeddings=12)
>>> enc = M3Encoder(cfg)
>>> ids = np.array([[0, 5, 2]], np.int32)
>>> enc(*encoder_inputs(ids, np.ones_like(ids), cfg)).shape
(1, 3, 8)
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..kernels import cpu as cpu_kernels
from ..kernels import int8 as int8_kernels
from ..kernels import packed
from ..weights.mapped import release
from .config import M3Config

DTYPES = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16, "fp16": ms.float16,
          "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
          "int8": ms.float32}     # int8: the layers' linear maps quantised (M3Encoder.quantize_int8), the rest float32


# Query rows per attention block: the plain cells hold at most [B, heads, ATTENTION_BLOCK, L] scores at once
# (at 8192 tokens and BGE-M3's 16 heads, 0.5 GB per block instead of 4.3 GB for the whole L x L).
ATTENTION_BLOCK = 1024


def position_ids_for(input_ids: np.ndarray, attention_mask: np.ndarray, cfg: M3Config) -> np.ndarray:
    """[B, L] position ids: XLM-R counts non-pad tokens from pad_id+1; BERT counts from 0.

    >>> cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    >>> position_ids_for(np.array([[0, 7, 2, 1]]), np.array([[1, 1, 1, 0]]), cfg).tolist()
    [[2, 3, 4, 1]]
    """
    if cfg.model_type == "xlm-roberta":
        not_pad = (input_ids != cfg.pad_token_id).astype(np.int64)
        return (np.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id).astype(np.int32)
    return np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int32), input_ids.shape).copy()


def check_batch(input_ids: np.ndarray, attention_mask: np.ndarray, cfg: M3Config) -> None:
    """ValueError unless ids/mask are both [B, L], L fits the position table and ids fit the vocabulary."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                         "must both be [B, L]")
    if input_ids.shape[1] > cfg.max_length:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum {cfg.max_length}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {input_ids.min()}..{input_ids.max()}")


def pack_offsets(attention_mask: np.ndarray) -> np.ndarray:
    """[B, L] 0/1 mask -> int32 [B+1] row offsets of each text in the packed token matrix.

    >>> pack_offsets(np.array([[1, 1, 1, 0], [1, 1, 0, 0]])).tolist()
    [0, 3, 5]
    """
    return np.concatenate([[0], np.cumsum(attention_mask.astype(bool).sum(1))]).astype(np.int32)


def encoder_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, cfg: M3Config):
    """NumPy batch -> the three int32 MindSpore tensors ``M3Encoder`` takes."""
    check_batch(input_ids, attention_mask, cfg)
    pos = position_ids_for(input_ids, attention_mask, cfg)
    return (Tensor(input_ids.astype(np.int32)), Tensor(attention_mask.astype(np.int32)), Tensor(pos))


def _dense(n_in: int, n_out: int) -> nn.Dense:
    """A Dense layer whose weights start at zero (lazily, no memory) until a checkpoint is loaded."""
    return nn.Dense(n_in, n_out, weight_init="zeros", bias_init="zeros")


class Embeddings(nn.Cell):
    def __init__(self, cfg: M3Config):
        super().__init__()
        H = cfg.hidden_size
        self.word = Parameter(initializer("zeros", (cfg.vocab_size, H), ms.float32), name="word")
        self.position = Parameter(initializer("zeros", (cfg.max_position_embeddings, H), ms.float32), name="position")
        self.token_type = Parameter(initializer("zeros", (cfg.type_vocab_size, H), ms.float32), name="token_type")
        self.norm = nn.LayerNorm((H,), epsilon=cfg.layer_norm_eps)

    def construct(self, input_ids, position_ids):
        x = ops.gather(self.word, input_ids, 0) + ops.gather(self.position, position_ids, 0)
        x = x + self.token_type[0]        # token type 0 everywhere (single-segment inputs)
        return self.norm(x)


class BlockAttention(nn.Cell):
    """softmax(q k^T * scale + mask) v for a block of query rows: q [B, A, l, D], kt [B, A, D, L], v [B, A, L, D],
    mask_bias [B, 1, 1, L] -> [B, A, l, D] (a Cell, so that training can recompute it block by block)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def construct(self, q, kt, v, mask_bias):
        scores = ops.matmul(q, kt) * self.scale + mask_bias                # [B, A, l, L]
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        return ops.matmul(probs, v)


class SelfAttention(nn.Cell):
    """Post-LN multi-head self-attention. Past ATTENTION_BLOCK tokens the scores are computed ATTENTION_BLOCK
    query rows at a time; with ``recompute_blocks`` (set by training's gradient checkpointing) each block is
    also rebuilt in the backward pass, so no more than one block's [B, heads, block, L] scores are kept."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.recompute_blocks = False
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # three projections, as the checkpoint stores them: each parameter can share the file-mapped tensor
        # (a fused [3H, H] copy was 302 MB of resident memory at full size right after loading)
        self.query = _dense(cfg.hidden_size, cfg.hidden_size)
        self.key = _dense(cfg.hidden_size, cfg.hidden_size)
        self.value = _dense(cfg.hidden_size, cfg.hidden_size)
        self.out = _dense(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layer_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.attend = BlockAttention(self.scale)

    def construct(self, x, mask_bias):
        B, L, H = x.shape
        q, k, v = (f(x).reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
                   for f in (self.query, self.key, self.value))           # [B, A, L, D]
        kt = k.transpose(0, 1, 3, 2)                                      # [B, A, D, L]
        if L <= ATTENTION_BLOCK:
            ctx = self.attend(q, kt, v, mask_bias)
        else:                       # softmax is per query row: blocks of rows give the same result exactly
            run = (lambda *a: ms.recompute(self.attend, *a)) if self.recompute_blocks else self.attend
            ctx = ops.cat([run(q[:, :, s:s + ATTENTION_BLOCK], kt, v, mask_bias)
                           for s in range(0, L, ATTENTION_BLOCK)], axis=2)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, L, H)
        return self.norm(x + self.out(ctx)).astype(x.dtype)           # LayerNorm in float32, back to x's dtype


class FeedForward(nn.Cell):
    def __init__(self, cfg: M3Config):
        super().__init__()
        self.inner = _dense(cfg.hidden_size, cfg.intermediate_size)
        self.outer = _dense(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm((cfg.hidden_size,), epsilon=cfg.layer_norm_eps)
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"

    def construct(self, x):
        return self.norm(x + self.outer(ops.gelu(self.inner(x), approximate=self.approximate))).astype(x.dtype)


class Layer(nn.Cell):
    def __init__(self, cfg: M3Config):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def construct(self, x, mask_bias):
        return self.ffn(self.attention(x, mask_bias))


class M3Encoder(nn.Cell):
    """Embeddings + ``num_hidden_layers`` post-LN layers -> last hidden state [B, L, H]."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.CellList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.use_cpu_kernels = True       # False forces the plain-op path in forward_packed
        self.int8 = False                 # True once quantize_int8 ran: only the int8 CPU kernels can run it
        self._packs = None                # per layer (attention, FFN) packed weights, or [] (drop_packed_weights)

    def construct(self, input_ids, attention_mask, position_ids):
        x = self.embed(input_ids, position_ids)
        return self.run_layers(x, self.mask_bias(attention_mask), 0, len(self.layers))

    def embed(self, input_ids, position_ids):
        """[B, L] ids -> [B, L, H] embedding output (in the layers' dtype)."""
        return self.embeddings(input_ids, position_ids).astype(self.layers[0].attention.query.weight.dtype)

    def mask_bias(self, attention_mask):
        """[B, L] 0/1 mask -> additive [B, 1, 1, L] bias: 0 where attended, dtype-min where padded."""
        dtype = self.layers[0].attention.query.weight.dtype
        neg = {ms.float16: -65504.0, ms.bfloat16: -3.3895313892515355e38}.get(dtype, -3.4028234663852886e38)
        return ((1.0 - attention_mask.astype(ms.float32)) * neg).astype(dtype)[:, None, None, :]

    def run_layers(self, x, mask_bias, start: int, end: int):
        """Apply layers ``start..end-1`` to hidden states [B, L, H] (for cached lower layers)."""
        for i in range(start, end):
            x = self.layers[i](x, mask_bias)
        return x

    def cpu_kernels_ready(self) -> bool:
        """True when ``forward_packed`` will use the fused CPU kernels (inference, float32, erf GELU)."""
        if self.int8:
            return not self.training and int8_kernels.available()
        return (self.use_cpu_kernels and not self.training and self.cfg.hidden_act == "gelu"
                and self.layers[0].attention.query.weight.dtype == ms.float32 and cpu_kernels.available())

    def forward_packed(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Inference on a NumPy batch [B, L] -> (hidden states of the attended tokens, packed in row
        order, Tensor [T, H] float32; offsets int32 [B+1]). Text b is rows offsets[b]:offsets[b+1]."""
        check_batch(input_ids, attention_mask, self.cfg)
        offsets = pack_offsets(attention_mask)
        keep = attention_mask.astype(bool)
        if self.cpu_kernels_ready():
            pos = position_ids_for(input_ids, attention_mask, self.cfg)
            return self._packed_cpu(input_ids[keep], pos[keep], offsets), offsets
        if self.int8:
            raise RuntimeError("an int8-quantised encoder runs only on the int8 CPU kernels (CPU, inference)")
        hidden = self(*encoder_inputs(input_ids, attention_mask, self.cfg)).astype(ms.float32)
        rows = Tensor(np.flatnonzero(keep).astype(np.int32))
        return ops.gather(hidden.reshape(-1, hidden.shape[-1]), rows, 0), offsets

    def set_train(self, mode: bool = True):
        self.drop_packed_weights()        # a training step changes the weights the packings were made from
        return super().set_train(mode)

    def drop_packed_weights(self) -> None:
        """Forget the layers' packed float32 weights (``kernels.packed``); the next packed-token inference packs
        them again where wanted. Called on training and loading; call it after changing weights in place."""
        self._packs = None

    def uses_packed_weights(self) -> bool:
        """True when the last packed-token inference ran on weights packed once (``layer_packs``)."""
        return bool(self._packs)

    def layer_packs(self) -> list:
        """Per layer, (attention, FFN) ``kernels.packed.PackedWeights`` for the fused float32 kernels, made on
        first use where ``packed.wanted`` (the packings fit the memory budget), else (None, None)."""
        if self._packs is None:
            weights = [([a.query.weight, a.key.weight, a.value.weight, a.out.weight], [f.inner.weight, f.outer.weight])
                       for a, f in ((layer.attention, layer.ffn) for layer in self.layers)]
            shapes = [tuple(w.shape) for att, ffn in weights for w in att + ffn]
            self._packs = ([(packed.PackedWeights(att), packed.PackedWeights(ffn)) for att, ffn in weights]
                           if packed.wanted(shapes) else [])
        return self._packs or [(None, None)] * len(self.layers)

    def _packed_cpu(self, ids: np.ndarray, pos: np.ndarray, offsets: np.ndarray):
        ck, e = cpu_kernels, self.embeddings
        eps = ck.scalar(self.cfg.layer_norm_eps)
        heads, off = Tensor(np.array([self.cfg.num_attention_heads], np.int32)), Tensor(offsets)
        x = ck.embed(Tensor(ids.astype(np.int32)), Tensor(pos.astype(np.int32)), e.word, e.position,
                     e.token_type, e.norm.gamma, e.norm.beta, eps)
        packs = self.layer_packs() if not self.int8 else None
        for i, layer in enumerate(self.layers):
            a, f = layer.attention, layer.ffn
            if self.int8:
                x = int8_kernels.attention_block(x, a.qkv, a.out, a.norm, off, heads, eps)
                x = int8_kernels.ffn_block(x, f.inner, f.outer, f.norm, eps)
            else:
                x = ck.ffn_block(ck.attention_block(x, a, off, heads, eps, packs[i][0]), f, eps, packs[i][1])
        return x

    def quantize_int8(self) -> None:
        """Replace each layer's linear layers by ``int8_kernels.QuantLinear`` (``attention.qkv``: query, key and
        value fused into one [3H, H]; ``attention.out``, ``ffn.inner``, ``ffn.outer``): int8 weights per output
        channel, a quarter of the float32 bytes, which are released. Irreversible."""
        self.drop_packed_weights()
        for i, layer in enumerate(self.layers):
            a = layer.attention
            parts = [getattr(a, n) for n in ("query", "key", "value")]
            quant = {"attention.qkv": int8_kernels.QuantLinear(
                np.concatenate([d.weight.asnumpy() for d in parts]), np.concatenate([d.bias.asnumpy() for d in parts]))}
            quant.update({path: int8_kernels.QuantLinear.from_dense(getattr(getattr(layer, path.split(".")[0]),
                                                                            path.split(".")[1]))
                          for path in ("attention.out", "ffn.inner", "ffn.outer")})
            for n in ("query", "key", "value"):
                delattr(a, n)
            for path, q in quant.items():
                owner, name = path.split(".")
                setattr(getattr(layer, owner), name, q)
                for p in q.get_parameters():
                    p.name = f"layers.{i}.{path}.{p.name.rsplit('.', 1)[-1]}"
        self.int8 = True
        int8_kernels.release_freed_memory()


def hf_to_encoder_names(cfg: M3Config) -> dict[str, str]:
    """Map our parameter names to the Hugging Face names they load from."""
    m = {
        "embeddings.word": "embeddings.word_embeddings.weight",
        "embeddings.position": "embeddings.position_embeddings.weight",
        "embeddings.token_type": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.gamma": "embeddings.LayerNorm.weight",
        "embeddings.norm.beta": "embeddings.LayerNorm.bias",
    }
    for i in range(cfg.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for o, h in (("attention.query", "attention.self.query"), ("attention.key", "attention.self.key"),
                     ("attention.value", "attention.self.value"), ("attention.out", "attention.output.dense"),
                     ("ffn.inner", "intermediate.dense"), ("ffn.outer", "output.dense")):
            m[ours + o + ".weight"] = hf + h + ".weight"
            m[ours + o + ".bias"] = hf + h + ".bias"
        for o, h in (("attention.norm", "attention.output.LayerNorm"), ("ffn.norm", "output.LayerNorm")):
            m[ours + o + ".gamma"] = hf + h + ".weight"
            m[ours + o + ".beta"] = hf + h + ".bias"
    return m


def _take(state: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in state:
        raise ValueError(f"checkpoint has no tensor {key!r}")
    arr = np.asarray(state[key])
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"tensor {key!r} has shape {tuple(arr.shape)}, the model expects {tuple(shape)}")
    flat = arr.reshape(-1)
    for i in range(0, flat.size, 1 << 20):          # in chunks: no full-size temporary copy
        chunk = flat[i:i + (1 << 20)]
        if not np.isfinite(chunk.astype(np.float32, copy=False)).all():
            raise ValueError(f"tensor {key!r} contains NaN or inf")
        release(chunk)                              # a file-mapped tensor: checked pages leave memory again
    return arr


def _tensor(arr: np.ndarray, dtype, share: bool) -> Tensor:
    """float32 array -> Tensor; with ``share`` a writable float32 C-contiguous array is used in place."""
    arr = np.asarray(arr)
    if share and dtype == ms.float32 and arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.writeable:
        return Tensor.from_numpy(arr)
    return Tensor(arr.astype(np.float32), dtype)


IGNORED_TENSORS = ("pooler.", "embeddings.position_ids")     # in HF checkpoints, unused by retrieval


def unexpected_tensors(state: dict, cfg: M3Config) -> list[str]:
    """Names in ``state`` that an encoder of ``cfg`` has no place for (the pooler and the position-id buffer
    of Hugging Face checkpoints excepted), e.g. layers beyond ``num_hidden_layers``.

    >>> cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    >>> unexpected_tensors({"encoder.layer.1.output.dense.bias": 0, "pooler.dense.bias": 0}, cfg)
    ['encoder.layer.1.output.dense.bias']
    """
    known = set(hf_to_encoder_names(cfg).values())
    return sorted(k for k in state if k not in known and not k.startswith(IGNORED_TENSORS))


def load_hf_state(encoder: M3Encoder, state: dict[str, np.ndarray], share_memory: bool = False) -> None:
    """Copy a Hugging Face-named state dict (prefix already stripped) into ``encoder``.

    ``share_memory=True`` lets the parameters take over the state's float32 arrays without a copy
    (half the peak memory for a 2.3 GB checkpoint); only for a state nobody else will read or write."""
    cfg = encoder.cfg
    params = {p.name: p for p in encoder.get_parameters()}
    missing = [h for h in hf_to_encoder_names(cfg).values() if h not in state]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} encoder tensor(s) that config.json describes "
                         f"({cfg.num_hidden_layers} layers), e.g. {missing[:5]}: the config and the weights "
                         "disagree")
    unexpected = unexpected_tensors(state, cfg)
    if unexpected:
        raise ValueError(f"checkpoint holds {len(unexpected)} tensor(s) config.json does not describe (e.g. "
                         f"{unexpected[:3]}): config and weights disagree "
                         f"({cfg.num_hidden_layers} layers in the config)")
    encoder.drop_packed_weights()
    for ours, hf in hf_to_encoder_names(cfg).items():
        p = params[ours]
        p.set_data(_tensor(_take(state, hf, p.shape), p.dtype, share_memory))


def cast_encoder(encoder: M3Encoder, dtype: str) -> M3Encoder:
    """Cast the transformer layers to ``dtype`` (float32/float16/bfloat16); embeddings and
    layer norms stay float32 for stability. ``int8`` casts to float32: ``M3Encoder.quantize_int8`` follows."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    target = DTYPES[dtype]
    encoder.drop_packed_weights()
    for name, p in encoder.parameters_and_names():
        if name.startswith("layers.") and ".norm." not in name:
            p.set_dtype(target)          # set_data(x.astype(t)) keeps the old dtype in MindSpore 2.7
    for layer in encoder.layers:
        for norm in (layer.attention.norm, layer.ffn.norm):
            norm.to_float(ms.float32)
    return encoder
