"""Summary ratios and the Markdown table for ``benchmarks/encode.py``, computed only from its JSON.

    .venv/bin/python benchmarks/encode_report.py benchmarks/results/encode.json   # re-render encode.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from encode_inputs import describe_blas

NAMES = {"bgem3_lib": "bgem3_lib (MindSpore)", "bgem3_lib-int8": "bgem3_lib int8",
         "flagembedding": "FlagEmbedding 1.4.2 (PyTorch)", "mindnlp": "MindNLP 0.5 (transformers on MindSpore)",
         "onnxruntime": "ONNX Runtime fp32", "onnxruntime-int8": "ONNX Runtime int8 (dynamic)"}
# The last line's ratios, each the worst case over every workload (case) of every size that has both systems.
SPEEDUPS = {"speedup_vs_flagembedding": "flagembedding", "speedup_vs_onnxruntime": "onnxruntime",
            "speedup_vs_mindnlp": "mindnlp"}


def _headline_size(results: dict) -> str:
    return "full" if "full" in results["sizes"] else next(iter(results["sizes"]))


def numpy_roofline(entry: dict) -> float:
    """Median NumPy matmul GFLOP/s over every measurement of the run (all workers, before and after)."""
    vals = [m["numpy_gflops"] for rnd in entry["matmul"] for m in rnd.values()]
    return float(np.median(vals)) if vals else math.nan


def paired_speedup(fast: dict, slow: dict) -> float:
    """How many times faster ``fast`` ran than ``slow`` on one case: the median over rounds of the per-round
    ratio slow seconds / fast seconds (both encode the same tokens, one right after the other in each round,
    so load that comes and goes between rounds cancels). Entries without per-round times fall back to the
    ratio of median tokens/s.

    >>> paired_speedup({"seconds_runs": [1.0, 2.0, 1.0]}, {"seconds_runs": [2.0, 4.0, 3.0]})
    2.0

    Rounds pair by index; where one side ran fewer, the other's extra rounds are left out:

    >>> paired_speedup({"seconds_runs": [1.0, 2.0, 1.0, 1.0]}, {"seconds_runs": [3.0, 6.0]})
    3.0

    Against a ``best_batches`` estimate (``encode.best_batches``): that time over the median of ``fast``'s rounds:

    >>> paired_speedup({"seconds_runs": [1.0, 2.0, 1.0]}, {"seconds": 5.0, "estimate": "best_batches"})
    5.0
    """
    a, b = fast.get("seconds_runs"), slow.get("seconds_runs")
    if a and slow.get("estimate") == "best_batches":       # --quick's MindNLP: no rounds to pair (encode.best_batches)
        return slow["seconds"] / float(np.median(a))
    if a and b:                                   # one side may have run fewer rounds (--quick's MindNLP)
        n = min(len(a), len(b))
        return float(np.median(np.asarray(b[:n]) / np.asarray(a[:n])))
    return fast["tokens_per_s"] / slow["tokens_per_s"]


def paired_range(fast: dict, slow: dict) -> tuple[float, float] | None:
    """The lowest and highest per-round ratio behind ``paired_speedup``: with n rounds that vary independently,
    they bracket the population median of the ratio with probability 1 - 2 * 0.5**n (94% at 5 rounds), a
    distribution-free interval. None without per-round times.

    >>> paired_range({"seconds_runs": [1.0, 2.0, 1.0]}, {"seconds_runs": [2.0, 4.0, 3.0]})
    (2.0, 3.0)
    """
    a, b = fast.get("seconds_runs"), slow.get("seconds_runs")
    if a and slow.get("estimate") == "best_batches":       # the spread of our rounds against the one estimate
        return slow["seconds"] / max(a), slow["seconds"] / min(a)
    if not (a and b):
        return None
    n = min(len(a), len(b))
    r = np.asarray(b[:n]) / np.asarray(a[:n])
    return float(r.min()), float(r.max())


def _ratio_cell(fast: dict, slow: dict) -> str:
    """``"1.11x (0.93-1.67)"``: the paired speedup and, in brackets, its per-round range."""
    rng = paired_range(fast, slow)
    return f"{paired_speedup(fast, slow):.2f}x" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else "")


def roofline_pct(case: dict, roof: float) -> float:
    """bgem3_lib's useful GFLOP/s on ``case`` as % of the matmul roofline: the median over rounds of that round's
    GFLOP/s / that round's NumPy matmul GFLOP/s (``numpy_gflops_runs``), else of the medians (older results).

    >>> roofline_pct({"gflop": 10.0, "numpy_gflops_runs": [100.0, 50.0],
    ...               "systems": {"bgem3_lib": {"seconds_runs": [0.2, 0.4], "gflop_per_s": 33.0}}}, 80.0)
    50.0
    """
    ours = case["systems"].get("bgem3_lib")
    if ours is None:
        return math.nan
    runs = case.get("numpy_gflops_runs")
    if runs and len(runs) == len(ours.get("seconds_runs", [])):
        return float(100 * np.median([case["gflop"] / t / g for t, g in zip(ours["seconds_runs"], runs)]))
    return 100.0 * ours["gflop_per_s"] / roof


def worst_cases(results: dict) -> dict:
    """``{ratio name: (worst value, "size/case")}``: bgem3_lib's paired speedup over each peer (minimum),
    bgem3_lib int8 over bgem3_lib float32 (minimum), bgem3_lib's peak RSS over FlagEmbedding's (maximum,
    the encode peaks and the RSS after loading)."""
    keys = [*SPEEDUPS, "int8_speedup", "rss_ratio_vs_flagembedding"]
    found: dict[str, list[tuple[float, str]]] = {k: [] for k in keys}
    for size, entry in results["sizes"].items():
        for name, c in entry.get("cases", {}).items():
            sy, where = c["systems"], f"{size}/{name}"
            ours = sy.get("bgem3_lib")
            if ours is None:
                continue
            for key, other in SPEEDUPS.items():
                if other in sy:
                    found[key].append((paired_speedup(ours, sy[other]), where))
            if "bgem3_lib-int8" in sy:
                found["int8_speedup"].append((paired_speedup(sy["bgem3_lib-int8"], ours), where))
            if "flagembedding" in sy:
                found["rss_ratio_vs_flagembedding"].append((ours["peak_rss_mb"] / sy["flagembedding"]["peak_rss_mb"],
                                                            where))
        load = entry.get("load_rss_mb", {})
        if "bgem3_lib" in load and "flagembedding" in load:
            found["rss_ratio_vs_flagembedding"].append((load["bgem3_lib"] / load["flagembedding"],
                                                        f"{size}/after load"))
    pick = {k: (max if k.startswith("rss") else min) for k in found}
    return {k: pick[k](v) if v else (math.nan, "-") for k, v in found.items()}


def summarize(results: dict) -> dict:
    size = _headline_size(results)
    mix = results["sizes"][size]["cases"]["mix"]["systems"]
    roof = numpy_roofline(results["sizes"][size])
    worst = worst_cases(results)
    return {"size": size, **{k: v for k, (v, _) in worst.items()}, "where": {k: w for k, (_, w) in worst.items()},
            "mix_speedup_vs_flagembedding": (paired_speedup(mix["bgem3_lib"], mix["flagembedding"])
                                             if "bgem3_lib" in mix and "flagembedding" in mix else math.nan),
            "roofline_pct": roofline_pct(results["sizes"][size]["cases"]["mix"], roof),
            "numpy_gflops": roof}


def last_line(summary: dict) -> str:
    """The benchmark's last printed line."""
    keys = [*SPEEDUPS, "rss_ratio_vs_flagembedding", "int8_speedup"]
    return " ".join(f"{k}={summary[k]:.2f}" for k in keys) + f" roofline_pct={summary['roofline_pct']:.1f}"


def _cases_table(entry: dict) -> list[str]:
    systems = list(dict.fromkeys(s for c in entry["cases"].values() for s in c["systems"]))
    peers = [p for p in ("flagembedding", "onnxruntime", "mindnlp") if p in systems]
    head = ("| input | tokens | " + " | ".join(f"{NAMES[s]} tok/s" for s in systems) + " | "
            + " | ".join(f"vs {NAMES[p].split(' (')[0]}" for p in peers)
            + (" | int8 / float32" if "bgem3_lib-int8" in systems else "") + " | bgem3_lib % roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    roof = numpy_roofline(entry)
    for name, c in entry["cases"].items():
        sy = c["systems"]
        cells = []
        for s in systems:
            text = format(sy[s]["tokens_per_s"], ".1f") if s in sy else "-"
            if s in sy and "tokens_per_s_with_probe" in sy[s]:
                text += f" ({sy[s]['tokens_per_s_with_probe']:.1f} incl. probe)"
            cells.append(text)
        ours = sy.get("bgem3_lib")
        rel = [_ratio_cell(ours, sy[o]) if ours and o in sy else "n/a" for o in peers]
        if "bgem3_lib-int8" in systems:
            rel.append(_ratio_cell(sy["bgem3_lib-int8"], ours) if ours and "bgem3_lib-int8" in sy else "n/a")
        pct = roofline_pct(c, roof)
        desc = f"{name} ({c['texts']} texts, batch {c['batch_size']}, max_length {c['max_length']})"
        if c.get("alone"):
            desc += " - one system in memory at a time"
        if c.get("remeasured"):
            r = c["remeasured"]
            desc += f" - re-measured {r['date']} at {r['commit']} (`--cases`), not in the run above"
        if c.get("died"):
            desc += " - worker died, left out: " + ", ".join(c["died"])
        lines.append(f"| {desc} | {c['tokens']} | " + " | ".join(cells) + " | " + " | ".join(rel) + f" | {pct:.1f} |")
    return lines


def _rss_table(entry: dict) -> list[str]:
    systems = list(dict.fromkeys(s for c in entry["cases"].values() for s in c["systems"]))
    lines = ["| input | " + " | ".join(f"{NAMES[s]} peak RSS MB" for s in systems) + " |",
             "|---|" + "---|" * len(systems)]
    for name, c in entry["cases"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['systems'][s]['peak_rss_mb']:.0f}" if s in c["systems"] else "-"
                                                for s in systems) + " |")
    lines.append("| (after loading) | " + " | ".join(f"{entry['load_rss_mb'][s]:.0f}" if s in entry["load_rss_mb"]
                                                    else "-" for s in systems) + " |")
    return lines


def _sparse_lines(sp: dict) -> list[str]:
    lines = ["| system / path | batch x length | tokens | extra peak RSS MB | KB per token |", "|---|---|---|---|---|"]
    for key, label in (("bgem3_lib", "bgem3_lib encode(return_sparse), whole encode"),
                       ("flagembedding_old", "FlagEmbedding B x L x V scatter (old path), step alone"),
                       ("flagembedding_new", "FlagEmbedding B x V scatter_reduce, step alone")):
        for r in sp.get(key, []):
            lines.append(f"| {label} | {r['batch']} x {r['length']} | {r['tokens']} | {r['extra_mb']:.0f} | "
                         f"{1024 * r['extra_mb'] / r['tokens']:.1f} |")
    big = max((r for r in sp.get("bgem3_lib", [])), key=lambda r: r["tokens"], default=None)
    if big:
        lines.append("")
        lines.append(f"A B x L x V float32 tensor at {big['batch']} x {big['length']} would be "
                     f"{big['tokens'] * 250002 * 4 / 2 ** 30:.0f} GiB; bgem3_lib's whole encode at that size peaked "
                     f"{big['extra_mb']:.0f} MB above the loaded model.")
    return lines


def _products_note(results: dict) -> str:
    """Where bgem3_lib's float32 linear layers ran in this run (its workers report it per case)."""
    seen = sorted({sy["linear_products"] for size in results["sizes"].values() for case in size["cases"].values()
                   for name, sy in case["systems"].items() if name == "bgem3_lib" and "linear_products" in sy})
    return f" bgem3_lib's float32 linear layers ran on: {', '.join(seen)}." if seen else ""


def _repeat_note(results: dict) -> str:
    """Which (size/case, system) encoded their input more than once per round (--quick: short calls, and every call
    of FlagEmbedding, whose times vary most)."""
    rep = [f"{NAMES[s].split(' (')[0]} on {size}/{name} x{e['repeat']}" for size, entry in results["sizes"].items()
           for name, c in entry.get("cases", {}).items() for s, e in c["systems"].items() if e.get("repeat", 1) > 1]
    return (f"; short calls, and FlagEmbedding's (its time varies most), encoded their input back to back per round "
            f"({', '.join(rep)})" if rep else "")


def _fewer_rounds(results: dict, runs: int) -> dict:
    """{system: rounds} for the systems that ran fewer than ``runs`` timed rounds in some case (--quick), the least.

    >>> _fewer_rounds({"sizes": {"s": {"cases": {"a": {"systems": {"x": {"seconds_runs": [1, 2]},
    ...                "y": {"seconds_runs": [1, 2, 3]}}}, "b": {"systems": {"x": {"seconds_runs": [1]}}}}}}}, 3)
    {'x': 1}
    """
    out: dict = {}
    for entry in results["sizes"].values():
        for c in entry.get("cases", {}).values():
            for s, e in c["systems"].items():
                n = len(e.get("seconds_runs", []))
                if 0 < n < runs:
                    out[s] = min(n, out.get(s, n))
    return out


def _fewer_rounds_note(results: dict, runs: int) -> str:
    """" (ONNX Runtime int8 (dynamic): its first 2, as no ratio uses it)" for systems other than MindNLP that ran
    fewer rounds than the others (--quick).

    >>> _fewer_rounds_note({"sizes": {"s": {"cases": {"mix": {"systems": {"onnxruntime-int8": {"seconds_runs": [1, 2]},
    ...                     "onnxruntime": {"seconds_runs": [1, 2, 3, 4]}}}}}}}, 4)
    ' (ONNX Runtime int8 (dynamic): its first 2, as no ratio uses it)'
    """
    fewer = {s: n for s, n in _fewer_rounds(results, runs).items() if s != "mindnlp"}
    if not fewer:
        return ""
    return " (" + "; ".join(f"{NAMES[s]}: its first {n}" for s, n in fewer.items()) + ", as no ratio uses it)"


def _mindnlp_rounds_note(results: dict, runs: int) -> str:
    """" (its first N rounds only, paired with ours)" where MindNLP ran fewer rounds than the others (--quick), and
    how its time was taken where it is a ``best_batches`` estimate.

    >>> _mindnlp_rounds_note({"sizes": {"s": {"cases": {"mix": {"systems": {"mindnlp": {"seconds_runs": [9.0]}}}}}}}, 4)
    ' (its first round only, paired with ours)'
    """
    n = _fewer_rounds(results, runs).get("mindnlp")
    best = any(c["systems"].get("mindnlp", {}).get("estimate") == "best_batches"
               for e in results["sizes"].values() for c in e.get("cases", {}).values())
    if best:
        rounds = f"its first {n} rounds" if n else "its rounds"
        return (f" ({rounds} only; its time, tokens/s and ratio: each of its batches' fastest round, summed, since "
                "its short batches run up to 50% slower in some calls, different ones each time; the ratio is that "
                "time over the median of our rounds, in brackets over our slowest and fastest round)")
    if n is None:
        return ""
    return f" (its first {'round' if n == 1 else f'{n} rounds'} only, paired with ours)"


def write_markdown(results: dict, summary: dict, path: Path) -> None:
    m = results["meta"]
    runs = "; ".join(f"{p} {v['date']}, load average {v['load_avg_start'][0]:.1f} -> {v['load_avg_end'][0]:.1f}, "
                     f"{v['wall_seconds'] / 60:.1f} min" for p, v in m["parts"].items())
    worst = "; ".join(f"{k} = {summary[k]:.2f} ({summary['where'][k]})"
                      for k in (*SPEEDUPS, "rss_ratio_vs_flagembedding", "int8_speedup"))
    out = ["# Encoding speed: bgem3_lib vs FlagEmbedding, ONNX Runtime and MindNLP", "",
           f"Generated by `benchmarks/encode.py{' --quick' if m['quick'] else ''}` from `{path.stem}.json`; "
           "do not edit by hand.", "",
           f"Machine: {m['cpus']} CPUs ({m.get('cpu_model') or m['machine']}), shared with other jobs, so only "
           f"ratios measured within one run mean anything. tokens/s: median of {m['runs']} interleaved rounds"
           f"{_fewer_rounds_note(results, m['runs'])} after a warm-up; ratios: median over rounds of the per-round "
           "time ratio (the two runs of a round "
           f"follow each other, so load that changes between rounds cancels){_repeat_note(results)}; in brackets "
           f"beside a ratio: its lowest and highest round (with {m['runs']} rounds a "
           f"{100 * (1 - 2 * 0.5 ** m['runs']):.0f}% distribution-free interval for the median). Parts: {runs}."
           + (f" NumPy's BLAS: {describe_blas(m['blas'])}." if "blas" in m else "")
           + _products_note(results), "",
           f"**Worst case over every workload** (bgem3_lib float32 speedup over each peer; int8 over float32; "
           f"peak RSS over FlagEmbedding's, the largest): {worst}.", "",
           f"Real length mix at {summary['size']} size: {summary['mix_speedup_vs_flagembedding']:.2f}x FlagEmbedding, "
           f"{summary['roofline_pct']:.1f}% of this machine's matmul roofline (NumPy float32 matmul "
           f"{summary['numpy_gflops']:.1f} GFLOP/s measured in the same run). FlagEmbedding's numbers exclude the "
           "extra forward of its longest batch that its `encode` runs to probe the batch size (shown in brackets "
           "with it). MindNLP, 4-15x slower than the others, runs the real mix only, to bound the run time"
           f"{_mindnlp_rounds_note(results, m['runs'])}. Every "
           "float32 engine's dense output was checked against FlagEmbedding's (<= 1e-4) on the warm-up round, before "
           "its timings counted.", ""]
    for size, entry in results["sizes"].items():
        cfg = entry["config"]
        out += [f"## {size}: {cfg['layers']} layers x {cfg['hidden']} hidden, random BAAI-layout checkpoint", ""]
        out += _cases_table(entry) + [""] + _rss_table(entry) + [""]
        mm = entry["matmul"]
        fw = {s: float(np.median([r[s]["framework_gflops"] for r in mm if s in r])) for s in mm[0]}
        out.append("Matmul 1024x1024x4096 float32 GFLOP/s (median over the run): NumPy "
                   f"{numpy_roofline(entry):.1f}; " + "; ".join(f"{NAMES[s].split(' (')[0]} framework {v:.1f}"
                                                             for s, v in fw.items()) + ".")
        out.append("")
        diffs = {s: e.get("max_abs_dense_diff_vs_flagembedding") for s, e in entry["cases"]["mix"]["systems"].items()}
        out.append("Same weights, same outputs: max |dense - FlagEmbedding dense| on the mix: " +
                   ", ".join(f"{s} {d:.1e}" for s, d in diffs.items() if d is not None) + ".")
        out.append("")
        if "sorting" in entry:
            st = entry["sorting"]
            i, sl = st["input"], st["padded_slots"]
            out += [f"Length-sorted vs input-order batches (bgem3_lib, tokens/s) on a second real mix: {i['n_texts']} "
                    f"texts, {i['tokens']} tokens, batch {i['batch_size']}, max_length {i['max_length']}; a padded "
                    f"forward computes {sl['sorted']} token slots sorted vs {sl['unsorted']} unsorted "
                    f"({sl['unsorted'] / sl['sorted']:.2f}x).", "",
                    f"Tokens/s: median of {len(st['packed_sorted'].get('seconds_runs', [])) or '?'} rounds; "
                    "sorted / unsorted: median over rounds of the per-round ratio (lowest and highest round).", "",
                    "| path | sorted | unsorted | sorted / unsorted |", "|---|---|---|---|"]
            for p in ("packed", "padded"):
                if f"{p}_sorted" not in st:
                    continue
                a, b = st[f"{p}_sorted"]["tokens_per_s"], st[f"{p}_unsorted"]["tokens_per_s"]
                label = ("packed CPU kernels (no padding computed)" if p == "packed"
                         else "plain MindSpore ops, padded (GPU/Ascend path)")
                out.append(f"| {label} | {a:.1f} | {b:.1f} | {_ratio_cell(st[f'{p}_sorted'], st[f'{p}_unsorted'])} |")
            out.append("")
        if "sparse_rss" in entry:
            out += ["Sparse output memory (peak RSS growth):", ""] + _sparse_lines(entry["sparse_rss"]) + [""]
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    s = summarize(res)
    write_markdown(res, s, src.with_suffix(".md"))
    print(last_line(s))
