"""The M3-small training step in PyTorch: the reference for :mod:`bgem3_lib.analysis.train_step_worker`.

The same computation as the trainer's step (:class:`~bgem3_lib.training.train_model.M3TrainNet` +
:mod:`~bgem3_lib.training.losses` + :mod:`~bgem3_lib.training.optim`), written as a PyTorch user would:

* the trainable top layers: post-LN BERT/XLM-R layers (fused ``[3H, H]`` query/key/value projection,
  ``F.scaled_dot_product_attention`` with the additive padding mask, as ``transformers``' default "sdpa"
  attention; ``attention="eager"`` for ``softmax(q k^T / sqrt(d) + mask) v``), exact GELU, LayerNorm;
* the heads on the padded batch: dense = pooled state (mean or CLS), L2-normalised; sparse = ReLU(linear),
  0 at padding and special tokens; ColBERT = linear of tokens 1.., L2-normalised, 0 at padding;
* the scores of every query against every passage (passages in their length chunks, put back in the
  batch's order): dense inner products, lexical matching (a token repeated in a text counts once, with its
  largest weight), ColBERT late interaction; InfoNCE per mode and for the teacher ``s_inter``, the
  self-distillation terms, ``L_final = (L + L') / 2``;
* ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW`` (``foreach``) with one
  group per (peak learning rate, weight decay) and the warm-up + linear-decay schedule: the same update as
  :class:`~bgem3_lib.training.optim.AdamW` (decoupled decay, bias correction).

Weights and the padded batch come from the ``.npz``/``.json`` that the MindSpore worker wrote
(:func:`~bgem3_lib.analysis.train_step_worker.export_step`), parameter names included. PyTorch runs only in
its own process (``python -m bgem3_lib.analysis.torch_train_step SPEC_JSON``, a worker answering the
commands of :mod:`~bgem3_lib.analysis.train_throughput`); importing this module imports no PyTorch.

>>> [round(lr_at(s, warmup=2, total=6), 3) for s in range(6)]
[0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

NEG = float(np.finfo(np.float32).min)       # the additive mask of a padded key (the encoder's mask_bias)


def lr_at(step: int, warmup: int, total: int) -> float:
    """The trainer's schedule factor (:func:`bgem3_lib.training.optim.lr_at` with peak 1), without MindSpore."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _layer(x, bias, P: dict, pre: str, heads: int, eps: float, attention: str):
    """One post-LN encoder layer on ``x [B, L, H]`` with ``bias [B, 1, 1, L]`` (the encoder's ``Layer``)."""
    import torch.nn.functional as F
    B, L, H = x.shape
    q, k, v = (F.linear(x, P[pre + f"attention.{n}.weight"], P[pre + f"attention.{n}.bias"])
               .view(B, L, heads, H // heads).transpose(1, 2) for n in ("query", "key", "value"))  # [B, A, L, D]
    if attention == "sdpa":
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        ctx = (q @ k.transpose(-1, -2) * (H // heads) ** -0.5 + bias).softmax(-1) @ v
    ctx = ctx.transpose(1, 2).reshape(B, L, H)
    x = F.layer_norm(x + F.linear(ctx, P[pre + "attention.out.weight"], P[pre + "attention.out.bias"]), (H,),
                     P[pre + "attention.norm.gamma"], P[pre + "attention.norm.beta"], eps)
    inner = F.gelu(F.linear(x, P[pre + "ffn.inner.weight"], P[pre + "ffn.inner.bias"]))
    return F.layer_norm(x + F.linear(inner, P[pre + "ffn.outer.weight"], P[pre + "ffn.outer.bias"]), (H,),
                        P[pre + "ffn.norm.gamma"], P[pre + "ffn.norm.beta"], eps)


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _unique_token_weights(w, ids):
    """Each id's largest weight on its first position, 0 at its repeats (``losses._unique_token_weights``)."""
    import torch
    same = ids[:, :, None] == ids[:, None, :]
    pooled = torch.where(same, w[:, None, :].expand(same.shape), torch.full_like(w[:, None, :], NEG)).amax(-1)
    L = ids.shape[1]
    repeat = (same & torch.ones(L, L, dtype=torch.bool).tril(-1)).any(-1)
    return torch.where(repeat, torch.zeros_like(pooled), pooled)


def sparse_scores(q_w, q_ids, p_w, p_ids):
    """``[B, N]`` lexical matching scores of query and passage token weights (``losses.sparse_scores``)."""
    q_u, p_u = _unique_token_weights(q_w, q_ids), _unique_token_weights(p_w, p_ids)
    match = (q_ids[:, :, None, None] == p_ids[None, None]).to(q_u.dtype)           # [B, Lq, N, Lp]
    return ((match * p_u[None, None]).sum(-1) * q_u[:, :, None]).sum(1)


def colbert_scores(q, q_mask, p, p_mask):
    """``[B, N]``: mean over valid query tokens of the max over valid passage tokens (``losses.colbert_scores``)."""
    import torch
    b, n, h = q.shape
    big_n, m, _ = p.shape
    sim = (q.reshape(b * n, h) @ p.reshape(big_n * m, h).T).reshape(b, n, big_n, m)
    sim = torch.where(p_mask.bool()[None, None], sim, torch.full_like(sim, NEG))
    weight = q_mask.to(sim.dtype)[:, :, None]
    return (sim.amax(-1) * weight).sum(1) / weight.sum(1)


def m3_loss(s_dense, s_lex, s_mul, target, weights, temperature: float, lambdas, use_self_distill: bool) -> dict:
    """The unified loss with self-distillation (``losses.m3_loss``): a dict of 0-d tensors, ``total`` included."""
    import torch.nn.functional as F
    w1, w2, w3 = weights
    l1, l2, l3 = lambdas
    s_inter = w1 * s_dense + w2 * s_lex + w3 * s_mul
    modes = {"dense": s_dense, "lex": s_lex, "mul": s_mul}
    out = {k: F.cross_entropy(s / temperature, target) for k, s in {**modes, "inter": s_inter}.items()}
    out["L"] = (l1 * out["dense"] + l2 * out["lex"] + l3 * out["mul"] + out["inter"]) / 4
    if not use_self_distill:
        out["total"] = out["L"]
        return out
    teacher = F.softmax(s_inter / temperature, dim=-1).detach()
    for k, s in modes.items():
        out[f"distill_{k}"] = -(teacher * F.log_softmax(s / temperature, dim=-1)).sum(-1).mean()
    out["L_distill"] = (l1 * out["distill_dense"] + l2 * out["distill_lex"] + l3 * out["distill_mul"]) / 3
    out["total"] = (out["L"] + out["L_distill"]) / 2
    return out


class TorchStep:
    """The worker's state: parameters, optimizer and batch of the last ``setup``."""

    def __init__(self, spec: dict, attention: str = "sdpa"):
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        self.spec, self.attention = spec, attention
        self.step = 0

    def setup(self, layers: int, dir: str) -> dict:
        import torch
        path = Path(dir) / "step"
        meta = json.loads(path.with_suffix(".json").read_text())
        data = np.load(path.with_suffix(".npz"))
        cfg = meta["config"]
        self.meta, self.cfg = meta, cfg
        self.P = {n: torch.tensor(data[f"param/{n}"], requires_grad=True) for n in meta["params"]}
        self.params = [self.P[n] for n in meta["params"]]
        self.layer_prefixes = [f"layers.{i}." for i in range(meta["start_layer"], cfg["num_hidden_layers"])]
        if len(self.layer_prefixes) != layers:
            raise ValueError(f"the exported step trains {len(self.layer_prefixes)} layers, not {layers}")
        groups: dict = {}
        for n, peak, decay in zip(meta["params"], meta["peaks"], meta["decays"]):
            groups.setdefault((peak, decay), []).append(self.P[n])
        self.peaks = [peak for peak, _ in groups]
        self.opt = torch.optim.AdamW([{"params": ps, "lr": peak, "weight_decay": decay}
                                      for (peak, decay), ps in groups.items()],
                                     betas=tuple(meta["betas"]), eps=meta["eps"], foreach=True)
        self.q = [data[k] for k in ("q_ids", "q_mask", "q_hidden")]
        self.p = [[data[f"p{c}_{k}"] for k in ("ids", "mask", "hidden")] for c in range(meta["chunks"])]
        self.order = data["p_order"] if "p_order" in data.files else None
        self.step = 0
        masks = [self.q[1]] + [p[1] for p in self.p]
        return {"tokens": int(sum(m.sum() for m in masks)), "padded_tokens": int(sum(m.size for m in masks)),
                "n_params": len(self.params), "param_values": int(sum(p.numel() for p in self.params))}

    def _encode(self, ids, mask, hidden):
        import torch
        cfg = self.cfg
        x = hidden
        bias = ((1.0 - mask.to(torch.float32)) * NEG)[:, None, None, :]
        for pre in self.layer_prefixes:
            x = _layer(x, bias, self.P, pre, cfg["num_attention_heads"], cfg["layer_norm_eps"], self.attention)
        m = mask.to(torch.float32)
        dense = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True) if cfg["pooling"] == "mean" else x[:, 0]
        keep = m
        for s in self.meta["special_ids"]:
            keep = keep * (ids != s).to(torch.float32)
        P = self.P
        sparse = torch.relu(x @ P["sparse_linear.weight"].T + P["sparse_linear.bias"]).squeeze(-1) * keep
        colbert = _normalize(x[:, 1:] @ P["colbert_linear.weight"].T + P["colbert_linear.bias"]) * m[:, 1:, None]
        return _normalize(dense), sparse, colbert

    def loss(self) -> dict:
        """The batch's loss parts (``total`` included), built from the NumPy batch as a data loader hands it over."""
        import torch
        q_ids, q_mask, q_hidden = (torch.from_numpy(a) for a in self.q)
        q_dense, q_sparse, q_col = self._encode(q_ids, q_mask, q_hidden)
        dense, lex, mul = [], [], []
        for ids, mask, hidden in self.p:
            ids, mask, hidden = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(hidden)
            p_dense, p_sparse, p_col = self._encode(ids, mask, hidden)
            dense.append(p_dense)
            lex.append(sparse_scores(q_sparse, q_ids, p_sparse, ids))
            mul.append(colbert_scores(q_col, q_mask[:, 1:], p_col, mask[:, 1:]))
        p_dense, s_lex, s_mul = torch.cat(dense), torch.cat(lex, 1), torch.cat(mul, 1)
        if self.order is not None:
            order = torch.from_numpy(self.order).long()
            p_dense, s_lex, s_mul = p_dense[order], s_lex[:, order], s_mul[:, order]
        b = q_ids.shape[0]
        target = torch.arange(b) * (p_dense.shape[0] // b)
        m = self.meta
        return m3_loss(q_dense @ p_dense.T, s_lex, s_mul, target, m["teacher_weights"], m["temperature"],
                       m["lambdas"], m["use_self_distill"])

    def check(self) -> dict:
        import torch

        from .train_throughput import CHECK_NAMES
        t0 = time.perf_counter()
        out = self.loss()
        grads = torch.autograd.grad(out["total"], self.params)
        parts = {k: float(out[k]) for k in CHECK_NAMES if k in out}
        seconds = time.perf_counter() - t0
        norms = {n: float(np.linalg.norm(g.numpy().astype(np.float64))) for n, g in zip(self.meta["params"], grads)}
        return {"parts": parts, "grad_norms": norms, "global_norm": float(np.sqrt(sum(v * v for v in norms.values()))),
                "seconds": seconds}

    def train_step(self) -> dict:
        import torch
        out = self.loss()
        self.opt.zero_grad(set_to_none=True)
        out["total"].backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.meta["clip_norm"], foreach=True))
        if not np.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}")
        factor = lr_at(self.step, self.meta["warmup_steps"], self.meta["total_steps"])
        for group, peak in zip(self.opt.param_groups, self.peaks):
            group["lr"] = peak * factor
        self.opt.step()
        self.step += 1
        return {"loss": float(out["total"]), "grad_norm": norm}

    def steps(self, n: int) -> dict:
        from .train_throughput import timed_steps
        return timed_steps(self.train_step, n)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bgem3_lib.analysis.torch_train_step SPEC_JSON")
    from .train_throughput import serve
    spec = json.loads(sys.argv[1])
    serve(TorchStep(spec, attention=spec.get("torch_attention", "sdpa")))
