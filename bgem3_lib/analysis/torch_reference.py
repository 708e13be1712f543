"""PyTorch reference runs, each in a separate process (PyTorch must not share a process with
MindSpore/MindNLP): the tests' equivalence checks, the benchmarks and chapter 9 call them.

``run_reference(func_name, **kwargs)`` starts ``python -m bgem3_lib.analysis.torch_reference func_name
'{json kwargs}'``; the fresh process calls the function, and pickles nothing: inputs and outputs go
through ``.npz``/JSON files in a temporary directory. Nothing here is imported by the model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_MODULE = "bgem3_lib.analysis.torch_reference"
REFERENCE_FUNCTIONS = ("bert_hidden", "write_bge_m3_checkpoint", "flagembedding_outputs")


def run_reference(func: str, timeout: int = 1800, **kwargs) -> None:
    """Run ``func(**kwargs)`` of this module in a fresh Python process (``python -m``); RuntimeError on failure."""
    if func not in REFERENCE_FUNCTIONS:
        raise ValueError(f"unknown reference function {func!r}; choose one of {REFERENCE_FUNCTIONS}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", __name__ if __name__ != "__main__" else _MODULE, func,
                           json.dumps(kwargs)], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"reference process {func} failed:\n{proc.stderr[-4000:]}")


def bert_hidden(e5_path: str, ids_npz: str, out_npz: str) -> None:
    """multilingual-e5-small through transformers.BertModel (torch, fp32) -> last_hidden_state."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from bgem3_lib.weights.e5_format import read_e5
    header, state = read_e5(e5_path)
    cfg = BertConfig(vocab_size=header["vocab_size"], hidden_size=header["hidden_size"],
                     num_hidden_layers=header["num_hidden_layers"],
                     num_attention_heads=header["num_attention_heads"],
                     intermediate_size=header["intermediate_size"],
                     max_position_embeddings=header["max_position_embeddings"],
                     type_vocab_size=header["type_vocab_size"], layer_norm_eps=header["layer_norm_eps"],
                     hidden_act="gelu", pad_token_id=1, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    data = np.load(ids_npz)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(data["input_ids"]).long(),
                    attention_mask=torch.from_numpy(data["attention_mask"]).long()).last_hidden_state
    np.savez(out_npz, hidden=out.numpy())


def write_bge_m3_checkpoint(out_dir: str, tokenizer_json: str, layers: int, hidden: int, heads: int,
                            ffn: int, max_pos: int, seed: int) -> None:
    """A random checkpoint in the exact BAAI/bge-m3 file layout, written by torch itself."""
    import shutil

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_pos,
                           type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, hidden_act="gelu")
    model = XLMRobertaModel(cfg)
    with torch.no_grad():   # random biases and norms too, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "LayerNorm.weight" in name:
                p.uniform_(0.8, 1.2)
    cfg.save_pretrained(out)

    def save(obj, name: str) -> None:       # a new file moved into place: a process mapping the old one keeps it
        torch.save(obj, out / f"{name}.tmp")
        os.replace(out / f"{name}.tmp", out / name)

    save(model.state_dict(), "pytorch_model.bin")
    colbert = torch.nn.Linear(hidden, hidden)
    sparse = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        sparse.weight.normal_(0, 0.05)
        sparse.bias.fill_(0.01)
    save({k: v.half() for k, v in colbert.state_dict().items()}, "colbert_linear.pt")
    save({k: v.half() for k, v in sparse.state_dict().items()}, "sparse_linear.pt")
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizer", "model_max_length": max_pos - 2, "bos_token": "<s>",
        "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>"}))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}))


def flagembedding_outputs(model_dir: str, texts_json: str, pairs_json: str, out_dir: str,
                          max_length: int, max_query_length: int, max_passage_length: int,
                          batch_size: int, weights: list) -> None:
    """FlagEmbedding 1.4.2 BGEM3FlagModel (torch CPU, fp32): encode + compute_score."""
    import numpy as np
    from FlagEmbedding import BGEM3FlagModel
    texts = json.loads(Path(texts_json).read_text())
    pairs = json.loads(Path(pairs_json).read_text())
    m = BGEM3FlagModel(model_dir, use_fp16=False, devices="cpu")
    enc = m.encode(texts, batch_size=batch_size, max_length=max_length, return_dense=True,
                   return_sparse=True, return_colbert_vecs=True)
    out = Path(out_dir)
    np.save(out / "dense.npy", enc["dense_vecs"])
    (out / "lexical.json").write_text(json.dumps([{k: float(v) for k, v in d.items()}
                                                   for d in enc["lexical_weights"]]))
    np.savez(out / "colbert.npz", *enc["colbert_vecs"])
    scores = m.compute_score(pairs, batch_size=batch_size, max_query_length=max_query_length,
                             max_passage_length=max_passage_length, weights_for_different_modes=weights)
    (out / "scores.json").write_text(json.dumps({k: [float(x) for x in v] for k, v in scores.items()}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in REFERENCE_FUNCTIONS:
        sys.exit(f"usage: python -m {_MODULE} {{{','.join(REFERENCE_FUNCTIONS)}}} JSON_KWARGS")
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
