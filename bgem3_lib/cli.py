"""Command line: ``python -m bgem3_lib {eval,encode,train} ...``.

Examples::

    python -m bgem3_lib eval --task tydi --model m3-small-base --modes dense --out /tmp/eval_tydi
    python -m bgem3_lib eval --task miracl --model /models/bge-m3 \\
        --modes dense,sparse,colbert,dense+sparse,all --langs sw,yo --device Ascend --out res --shard 0/2
    python -m bgem3_lib encode --model m3-small-base --input texts.txt --kind passage --out texts.npz
    python -m bgem3_lib train --recipe m3-small [--no-self-distill] [--out DIR]

``eval`` under ``msrun`` takes its shard from the launcher (see :mod:`bgem3_lib.evaluation.distributed`); the
extra scheduler process ``msrun`` starts exits at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .evaluation.distributed import is_msrun_scheduler, parse_shard
from .paths import LockedError, file_lock, remove_stale_temps
from .retrieval.milvus_index import MilvusIndexError
from .retrieval.modes import MODES, check_weights, parse_modes


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _weights(text: str) -> tuple[float, float, float]:
    try:
        return check_weights(text, name="--weights")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _modes(text: str) -> list[str]:
    try:
        return parse_modes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'m3-small', 'm3-small-base' or a model directory "
                   "(e.g. a BAAI/bge-m3 download)")
    p.add_argument("--device", default=None, choices=["CPU", "GPU", "Ascend"],
                   help="default: $BGEM3_DEVICE, else CPU")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8"],
                   help="int8: the encoder's linear layers quantised (CPU only, bgem3_lib.kernels.int8)")
    p.add_argument("--max-length", type=_positive, default=None, help="passage tokens (default: the model's)")
    p.add_argument("--batch-size", type=_positive, default=32)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .evaluation.runner import TASKS
    parser = argparse.ArgumentParser(prog="python -m bgem3_lib", description="BGE-M3 on MindSpore")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,encode,train,info}")

    ev = sub.add_parser("eval", help="retrieval evaluation -> results.csv / results.json")
    ev.add_argument("--task", required=True, choices=TASKS)
    _model_args(ev)
    ev.add_argument("--modes", type=_modes, default=["dense"],
                    help=f"comma-separated, from {','.join(MODES)}")
    ev.add_argument("--langs", type=_csv, default=None, help="comma-separated (default: all of the task's)")
    ev.add_argument("--out", required=True, type=Path, help="output directory")
    ev.add_argument("--shard", type=_shard, default=None,
                    help="encode corpus shard i of n (default: from msrun's RANK_ID/RANK_SIZE, else 0/1)")
    ev.add_argument("--weights", type=_weights, default=None,
                    help="hybrid weights dense,sparse,colbert (default: the paper's for the task)")
    ev.add_argument("--limit-queries", type=_positive, default=None, help="first N queries per language")
    ev.add_argument("--limit-docs", type=_positive, default=None,
                    help="seeded sub-corpus of N documents per language (relevant ones kept; queries then "
                         "drawn with the same seed)")
    ev.add_argument("--index", default="memory", choices=["memory", "milvus"],
                    help="where the corpus is searched: in process memory, or a persistent Milvus index "
                         "(default URI: $BGEM3_MILVUS_URI, else an embedded Milvus Lite database in $BGEM3_HOME)")
    ev.add_argument("--milvus-uri", default=None,
                    help="a Milvus Lite .db path, or http://host:19530 for a Milvus server or cluster")
    ev.add_argument("--milvus-token", default=None, help="Milvus token (user:password), default $BGEM3_MILVUS_TOKEN")
    ev.add_argument("--milvus-dense", default="flat", choices=["flat", "hnsw"],
                    help="Milvus dense index: flat (exact, default) or hnsw (approximate, large corpora)")
    ev.add_argument("--cache", type=Path, default=None,
                    help="encoding cache (default: $BGEM3_HOME/encodings)")

    en = sub.add_parser("encode", help="encode texts from a file (one per line, or .jsonl 'text') -> .npz")
    _model_args(en)
    en.add_argument("--input", required=True, type=Path)
    en.add_argument("--out", required=True, type=Path, help="output .npz")
    en.add_argument("--kind", default="passage", choices=["query", "passage", "raw"],
                    help="prefix convention: encode_queries / encode_corpus / encode (no prefix)")
    en.add_argument("--sparse", action="store_true", help="also lexical weights")
    en.add_argument("--colbert", action="store_true", help="also multi-vector (ColBERT) vectors")
    en.add_argument("--chunk-texts", type=_positive, default=512,
                    help="commit progress every N texts to OUT.partial/; a killed run, restarted with the same "
                         "command, resumes there (default 512)")

    tr = sub.add_parser("train", help="fine-tune with a recipe (unified loss, self-distillation)")
    tr.add_argument("--recipe", default="m3-small", choices=["m3-small"],
                    help="training recipe (default: m3-small, see bgem3_lib/training/recipe.py)")
    tr.add_argument("--no-self-distill", action="store_true",
                    help="ablation: unified loss without self-knowledge distillation")
    tr.add_argument("--out", default=None,
                    help="output model directory (default: the asset cache, m3-small or m3-small-nosd)")
    tr.add_argument("--base", default="m3-small-base", help="starting model (name or directory)")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--steps", type=_positive, default=None)
    tr.add_argument("--train-layers", type=int, default=None,
                    help="top encoder layers to train (0: heads only, dense stays the base's)")
    tr.add_argument("--passage-tokens", type=_positive, default=None, help="training passage token budget")
    tr.add_argument("--fresh", action="store_true", help="ignore (delete) an earlier run's checkpoint")
    sub.add_parser("info", help="the BLAS under the CPU kernels, its running kernel, and whether it is narrower "
                                "than this CPU (e.g. pinned by OPENBLAS_CORETYPE)")
    return parser


def _cmd_info(args) -> int:
    """Print what the CPU kernels' float32 products run on (``kernels.blas_check.blas_report``)."""
    from .kernels.blas_check import blas_report
    rep = blas_report()
    print(f"BLAS: {rep['lib'] or 'none found (the model runs plain MindSpore ops)'}")
    print(f"OpenBLAS kernel: {rep['core'] or 'unknown'}"
          + (f" (OPENBLAS_CORETYPE={rep['pinned']})" if rep["pinned"] else ""))
    if rep["note"]:
        print(f"note: {rep['note']}")
    from .kernels import cpu
    if not cpu.available():
        where = "plain MindSpore ops (the CPU kernels are unavailable)"
    elif cpu.uses_bf16x3():
        where = "AMX tiles as bfloat16 triples (gemm_bf16x3.h)"
    elif cpu.uses_f32gemm():
        where = "this package's AVX-512 float32 kernel (gemm_f32.h; BGEM3_F32GEMM=0: the BLAS)"
    else:
        where = "the BLAS (BGEM3_F32GEMM=1: this package's AVX-512 kernel, where the CPU has AVX-512)"
    print(f"linear layers' float32 products (64 rows or more): {where}")
    if not cpu.available():
        attention = "plain MindSpore ops"
    elif cpu.uses_bf16x3_attention():
        attention = ("AMX tiles as bfloat16 triples, online softmax (attention_bf16x3.h; head sizes that are "
                     "multiples of 32)")
    elif os.environ.get("BGEM3_ATTENTION_BLAS") == "1":
        attention = "the BLAS (BGEM3_ATTENTION_BLAS=1)"
    else:
        attention = ("this package's AVX-512 register-tiled kernel where the CPU has AVX-512 and the head size is a "
                     "multiple of 16 (kernels_common.h), else the BLAS")
    print(f"attention's float32 products: {attention}")
    return 0


def input_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file, split on ``\\n`` only (a ``\\r\\n`` ending loses its ``\\r``; form feeds,
    U+2028 and other separators ``str.splitlines`` would break on stay inside their line). Invalid UTF-8
    names the file, the line and the byte offset.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
    ...     _ = f.write("one\\x0cstill one\\r\\ntwo \\u2028 too\\n".encode())
    >>> input_lines(Path(f.name)); os.unlink(f.name)
    ['one\\x0cstill one', 'two \\u2028 too']
    """
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} ({e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                   # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_texts(path: Path) -> list[str]:
    """Texts of a file: one per line (``\\n``), or for ``.jsonl`` the ``title``+``text`` of each row (an
    object with a string ``text``). A text the model would refuse is refused here with its line: blank
    (:func:`~bgem3_lib.model.tokenization.is_blank`) or holding a lone surrogate (a ``\\udXXX`` escape)."""
    from .model.tokenization import is_blank
    texts = []
    for n, line in enumerate(input_lines(path), 1):
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                    or not isinstance(row.get("title"), (str, type(None))):
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field holding a string "
                                 f"(and an optional string 'title'), got {line[:80]!r}")
            line = f"{row.get('title') or ''} {row['text']}".strip()
            bad = next((i for i, c in enumerate(line) if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:
                raise ValueError(f"{path}:{n}: lone surrogate {line[bad]!r} at character {bad}: not valid Unicode")
        if is_blank(line):
            raise ValueError(f"{path}:{n}: empty text (only whitespace, control or zero-width characters)")
        texts.append(line)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove it is a writable folder, before any work is
    done; ValueError naming ``what`` otherwise (a file in the way, no permission, a read-only disk).

    >>> import tempfile
    >>> writable_dir(Path(tempfile.mkdtemp()) / "new" / "dir", "--out").is_dir()
    True
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


def _cmd_eval(args) -> int:
    if is_msrun_scheduler():
        print("[eval] msrun scheduler process: no encoding work here, exiting")
        return 0
    from .evaluation.distributed import resolve_shard
    from .evaluation.runner import check_langs, out_dir_lock, run_eval
    from .evaluation.search_backend import SearchBackend
    from .model.bgem3 import BGEM3
    check_langs(args.task, args.langs)                 # everything that can fail fast fails before the model loads
    writable_dir(args.out, "--out")
    if args.cache is not None:
        writable_dir(args.cache, "--cache")
    backend = SearchBackend(args.index, args.milvus_uri, args.milvus_token, args.milvus_dense)
    backend.check()
    rank, _ = resolve_shard(args.shard)
    with out_dir_lock(args.out) if rank == 0 else contextlib.nullcontext():    # a second eval on --out fails now
        model = BGEM3(args.model, device=args.device, dtype=args.dtype)
        run_eval(args.task, model, args.modes, args.langs, args.out, args.weights, args.max_length,
                 args.batch_size, args.shard, args.limit_queries, args.cache, limit_docs=args.limit_docs,
                 backend=backend)
    return 0


def _cmd_encode(args) -> int:
    from .evaluation.corpus_cache import model_reps, resumable_encode
    from .evaluation.encoding_store import encodings_to_npz, npz_path
    from .model.bgem3 import BGEM3
    texts = read_texts(args.input)
    if args.out.is_dir() or npz_path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder: name the .npz file to write")
    out = npz_path(args.out)
    writable_dir(out.parent, "the folder of --out")
    work = out.with_name(out.name + ".partial")                  # committed chunks of this run (resumable)
    with file_lock(out.with_name(f".{out.name}.lock"), f"--out {out}", wait=False):
        remove_stale_temps(out.parent)                             # a killed earlier run's half-written .npz
        model = BGEM3(args.model, device=args.device, dtype=args.dtype)
        reps = ["dense"] + ["sparse"] * args.sparse + ["colbert"] * args.colbert
        missing = sorted(set(reps) - set(model_reps(model)))
        if missing:
            raise ValueError(f"model {model.source!r} is dense-only: it has no {'/'.join(missing)} head")
        enc = resumable_encode(model, texts, work, kind=args.kind, reps=reps, max_length=args.max_length,
                               batch_size=args.batch_size, chunk_texts=args.chunk_texts)
        path = encodings_to_npz(enc, out, line_numbers=np.arange(1, len(texts) + 1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"[encode] {len(texts)} texts (input lines 1..{len(texts)}) -> {path}")
    return 0


def _cmd_train(args) -> int:
    """Run the recipe named by ``args``; prints where the model went and the held-out scores."""
    import shutil

    from .training.recipe import M3SmallRecipe, default_out, run_m3_small

    r = M3SmallRecipe(use_self_distill=not args.no_self_distill)
    for field_name, value in (("seed", args.seed), ("steps", args.steps), ("train_layers", args.train_layers),
                              ("passage_tokens", args.passage_tokens)):
        if value is not None:
            setattr(r, field_name, value)
    out = Path(args.out) if args.out else default_out(r.use_self_distill)
    if args.fresh:
        shutil.rmtree(out / "train_state", ignore_errors=True)
    summary = run_m3_small(r, out, base=args.base)
    print(json.dumps({k: summary[k] for k in ("out", "seconds", "examples", "final_losses_mean_last20",
                                              "heldout_before", "heldout_after")}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return {"eval": _cmd_eval, "encode": _cmd_encode, "train": _cmd_train, "info": _cmd_info}[args.command](args)
    except (ValueError, FileNotFoundError, TypeError, TimeoutError, LockedError, MilvusIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
