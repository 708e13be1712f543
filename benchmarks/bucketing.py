"""Benchmark: length-bucketed vs random batches for fine-tuning, on MLQA's real length distribution.

Both arms run the same number of :class:`~bgem3_lib.training.trainer.Trainer` steps of the same model: the
real multilingual-e5-small configuration whose top ``--layers`` layers and the two heads are trained
(as in the M3-small recipe with ``train_layers > 0``), starting from states "cached" at the layer below.
Those input states are seeded random numbers (their values do not change the cost); token ids and
lengths are the real MLQA training examples (query, positive, 3 same-article negatives, cut at 512
tokens). Arms:

* bucketed: :class:`~bgem3_lib.training.bucketing.LengthBucketSampler`, batch size ``token_budget // bucket upper``,
  and the batch's passages encoded in ``--chunks`` length-sorted chunks (the trainer's default,
  :func:`~bgem3_lib.training.bucketing.length_chunks`), which removes the padding left inside an example's group;
* bucketed, one matrix: the same batches with every passage padded to the batch's longest (isolates the
  chunks' share);
* random (same budget): :func:`~bgem3_lib.training.bucketing.random_batches` with the one batch size that fits the
  same memory budget for any example, ``token_budget // 512`` — what a fixed batch size must be without
  bucketing (the paper's setting; the headline ratio);
* random (same examples): random batches of the bucketed arm's mean batch size (more examples per step
  than the budget allows for long examples; isolates the padding effect).

Reported: real (non-padding) tokens per second over all texts of the measured steps, padding waste of
those steps and of a whole epoch (every text slot, padded as the arm pads), and the tokens/s ratio
(target >= 2x). Results go to ``benchmarks/results/bucketing.json`` and a table to ``bucketing.md``.
The CPU may be shared with other jobs: the arms alternate step by step so a load change hits all alike.

    .venv/bin/python benchmarks/bucketing.py [--steps 8] [--layers 1] [--token-budget 4096] [--seed 0] [--chunks 4]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bgem3_lib.analysis.batching_stats import batch_shapes  # noqa: E402
from bgem3_lib.training.bucketing import LengthBucketSampler, chunk_batches, random_batches  # noqa: E402
from bgem3_lib.training.trainer import TrainConfig  # noqa: E402

BOUNDARIES = (64, 128, 192, 256, 320, 384, 448, 512)


def mlqa_examples(seed: int, max_len: int = 512):
    """Token ids of every text and (query, positive, *negatives) index groups of MLQA train examples."""
    from bgem3_lib.model.tokenization import M3Tokenizer
    from bgem3_lib.training.data import build_examples, load_mlqa, unique_texts

    examples = build_examples(load_mlqa(), n_negatives=3, seed=seed, split="train")
    texts, groups = unique_texts(examples)
    ids = M3Tokenizer.from_file().encode_ids(texts, max_len, warn=False)
    return ids, groups


def make_trainer(ids, groups, layers: int, token_budget: int, seed: int):
    import mindspore as ms

    from bgem3_lib.model.encoder import M3Encoder
    from bgem3_lib.model.heads import M3Heads
    from bgem3_lib.model.loading import load_base
    from bgem3_lib.training.train_model import M3TrainNet, TextStore
    from bgem3_lib.training.trainer import TrainConfig, Trainer, make_deterministic

    make_deterministic(seed)
    cfg = load_base().config
    enc = M3Encoder(cfg)
    rng = np.random.default_rng(seed)
    for p in enc.get_parameters():
        if p.name.startswith("layers.") and not p.name.endswith("gamma"):
            p.set_data(ms.Tensor(rng.standard_normal(p.shape, dtype=np.float32) * 0.02))
    start = cfg.num_hidden_layers - layers

    def hidden(i):            # seeded stand-in for cached states: the cost does not depend on the values
        return np.random.default_rng([seed, i]).standard_normal((len(ids[i]), cfg.hidden_size),
                                                                dtype=np.float32).astype(np.float16)

    net = M3TrainNet(enc, M3Heads(cfg.hidden_size), start_layer=start, freeze_layers=start)
    tc = TrainConfig(steps=10**6, lr=1e-5, head_lr=1e-3, token_budget=token_budget, boundaries=BOUNDARIES,
                     seed=seed, start_layer=start, freeze_layers=start)
    return Trainer(net, TextStore(ids, cfg.pad_token_id, hidden=hidden), groups, tc)


def epoch_padding(batches, groups, text_len, chunks: int) -> dict:
    """Real and padded token slots of a whole epoch, counted as the trainer pads: the queries of a batch
    in one matrix, its passages in one matrix (``chunks == 1``) or in length chunks."""
    queries = [[groups[e][0] for e in b] for b in batches]
    passages = [[i for e in b for i in groups[e][1:]] for b in batches]
    mats = queries + (passages if chunks <= 1 else [m for ms in chunk_batches(passages, text_len, chunks) for m in ms])
    rows = batch_shapes(mats, text_len)
    real, padded = (sum(r[k] for r in rows) for k in ("real_tokens", "padded_tokens"))
    return {"real_tokens": int(real), "padded_tokens": int(padded), "waste_fraction": 1 - real / padded}


def step_on(trainer, batch: list[int], chunks: int) -> tuple[float, int, int]:
    """One optimizer step on the given examples, passages in ``chunks`` length chunks (1: one padded
    matrix); returns (seconds, real tokens, padded tokens)."""
    trainer.next_batch = lambda: batch
    trainer.cfg.length_chunks = chunks
    t = time.perf_counter()
    rec = trainer.train_step()
    return time.perf_counter() - t, rec["tokens"], rec["padded_tokens"]


ARMS = ("bucketed", "bucketed_one_matrix", "random_same_budget", "random_same_examples")


def write_table(result: dict, out: Path) -> Path:
    """The Markdown table of a result (``out`` with suffix ``.md``)."""
    cfg, waste = result["config"], result["epoch_padding_waste"]
    table = ["| arm | real tokens/s | step padding waste | epoch padding waste | examples |",
             "|---|---|---|---|---|"]
    table += [f"| {name} | {result[name]['tokens_per_s']:.0f} | {result[name]['padding_waste']:.1%} | "
              f"{waste[name]['waste_fraction']:.1%} | {result[name]['examples']} |" for name in ARMS]
    md = out.with_suffix(".md")
    md.write_text(f"# Bucketed vs random batches ({cfg['steps']} training steps per arm, token budget "
                  f"{cfg['token_budget']}, {cfg['layers']} trainable layer(s) + heads)\n\n" + "\n".join(table) +
                  f"\n\nbucketed / random: {result['speedup_vs_random_same_budget']:.2f}x (same budget), "
                  f"{result['speedup_vs_random_same_examples']:.2f}x (same examples); length chunks alone "
                  f"{result['speedup_vs_bucketed_one_matrix']:.2f}x. Generated from `{out.name}`.\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--token-budget", type=int, default=TrainConfig().token_budget,
                    help="padded tokens per text slot and batch (default: the trainer's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=4, help="length chunks of the bucketed arm's passages")
    ap.add_argument("--table-only", action="store_true", help="rewrite bucketing.md from bucketing.json")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "bucketing.json"
    if args.table_only:
        print(f"wrote {write_table(json.loads(out.read_text()), out)}")
        return

    ids, groups = mlqa_examples(args.seed)
    lengths = [max(len(ids[i]) for i in g) for g in groups]
    sampler = LengthBucketSampler(lengths, BOUNDARIES, token_budget=args.token_budget, seed=args.seed)
    bucketed = sampler.epoch(0)
    mean_bs = max(1, round(float(np.mean([len(b) for b in bucketed]))))
    budget_bs = max(1, args.token_budget // BOUNDARIES[-1])
    arms_batches = {"bucketed": (bucketed, args.chunks),
                    "bucketed_one_matrix": (bucketed, 1),
                    "random_same_budget": (random_batches(len(groups), budget_bs, seed=args.seed), 1),
                    "random_same_examples": (random_batches(len(groups), mean_bs, seed=args.seed), 1)}
    text_len = [len(x) for x in ids]
    epoch_waste = {k: epoch_padding(b, groups, text_len, c) for k, (b, c) in arms_batches.items()}
    print(f"{len(groups)} MLQA examples; bucketed {len(bucketed)} batches/epoch; random batch sizes "
          f"{budget_bs} (same budget) and {mean_bs} (same examples)")

    trainer = make_trainer(ids, groups, args.layers, args.token_budget, args.seed)
    step_on(trainer, bucketed[-1][:2], args.chunks)       # warm-up (first-call overheads)
    arms = {k: [] for k in arms_batches}
    for s in range(args.steps):                           # alternate arms: shared-CPU load hits all alike
        for name, (batches, chunks) in arms_batches.items():
            arms[name].append(step_on(trainer, batches[s], chunks))
            sec, real, padded = arms[name][-1]
            print(f"step {s:3d} {name:20s} {sec:6.2f}s real {real:6d} padded {padded:6d}")
    result = {"config": vars(args) | {"boundaries": BOUNDARIES, "random_batch_sizes": [budget_bs, mean_bs],
                                      "examples": len(groups), "model": "multilingual-e5-small top layers + heads"},
              "epoch_padding_waste": epoch_waste, "machine": platform.platform(),
              "examples_per_bucket": dict(zip(map(str, BOUNDARIES),
                                              np.bincount(sampler.buckets, minlength=len(BOUNDARIES)).tolist()))}
    for name, rows in arms.items():
        sec, real, padded = (float(np.sum([r[k] for r in rows])) for k in range(3))
        result[name] = {"seconds": sec, "real_tokens": int(real), "padded_tokens": int(padded),
                        "tokens_per_s": real / sec, "padding_waste": 1 - real / padded,
                        "examples": int(sum(len(b) for b in arms_batches[name][0][:args.steps])),
                        "length_chunks": arms_batches[name][1]}
    for base in ("random_same_budget", "random_same_examples", "bucketed_one_matrix"):
        result[f"speedup_vs_{base}"] = result["bucketed"]["tokens_per_s"] / result[base]["tokens_per_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name in arms:
        print(f"{name:20s} {result[name]['tokens_per_s']:7.0f} real tokens/s, padding waste "
              f"{result[name]['padding_waste']:.1%} (epoch: {epoch_waste[name]['waste_fraction']:.1%})")
    print(f"ratio bucketed / random: {result['speedup_vs_random_same_budget']:.2f}x (same budget), "
          f"{result['speedup_vs_random_same_examples']:.2f}x (same examples); length chunks alone: "
          f"{result['speedup_vs_bucketed_one_matrix']:.2f}x")
    md = write_table(result, out)
    print(f"wrote {out} and {md.name}")


if __name__ == "__main__":
    main()
