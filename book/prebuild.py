"""Execute the book's notebooks into Jupyter Book's cache, several at once: book/prebuild.py [--jobs N].

Jupyter Book 1 (myst-nb, ``execute_notebooks: cache``) runs one notebook after the other. On this
two-core machine a chapter keeps about one core busy on average (Python around the kernels, trec_eval,
Milvus Lite), so ``book/build.sh`` first runs this script: every notebook whose code is not yet in
``_build/.jupyter_cache`` is executed here, ``--jobs`` at a time (in the order of ``ORDER``), exactly as
myst-nb would execute it (same reader, working directory and timeout; errors fail), and stored in the cache
under the same hash. The Sphinx build that follows then finds every notebook executed and only renders.

Checkpoints the book trains (``TRAINED``: M3-small, and chapter 6's ablation, which reuses M3-small's cached
hidden states) are trained in a slot of the same pool when they are missing, while the chapters that do not
load them (``BASE_ONLY``: the base encoder and random checkpoints only) run in the other slot; a chapter waits
for the checkpoints it loads (``needs``), and a training for the one it builds on.

Chapters that share an encoding cache entry take turns through its file lock (the first encodes, the
other reads), so running them side by side never encodes a corpus twice. A failed notebook is reported
and left out of the cache: the Sphinx build then executes it again and fails with its traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution
from myst_nb.core.read import read_myst_markdown_notebook
from myst_parser.config.main import MdParserConfig

ROOT = Path(__file__).resolve().parent.parent
# The queue (full-build minutes, measured: 6 ~8, 9 ~6, 10 ~5, 8 ~4, 4 ~3, 3 ~2, 5 ~2, 1, 7 and 2 ~1). Chapter 6
# goes first so that it encodes the TyDi corpora for M3-small and its ablation in one encoder pass
# (model.shared_encoder) before another chapter encodes them for M3-small alone: the other slot meanwhile runs
# the chapters that do not encode TyDi (9: real weights on XQuAD; 7, 2, 1), then the long ones.
ORDER = ["06", "09", "11", "07", "02", "01", "10", "08", "12", "04", "03", "05"]
# Checkpoints trained here when missing (in a slot of the pool, beside chapters that do not need them), as
# name -> (arguments of `python -m bgem3_lib train`, the checkpoint that training builds on). `make m3-small`
# trains both too, for use outside the book. M3-small's heads training is mostly single-threaded Python, so a
# chapter beside it uses the other core.
TRAINED = {"m3-small": (["--recipe", "m3-small"], None),
           "m3-small-nosd": (["--recipe", "m3-small", "--no-self-distill"], "m3-small")}
# Chapters that load no trained checkpoint (m3-small-base and random checkpoints only); chapter 6 also loads the
# ablation.
BASE_ONLY = {"01", "02", "09"}


def needs(chapter: str) -> set[str]:
    """The trained checkpoints a chapter (``"06"``) loads.

    >>> sorted(needs("06")), sorted(needs("09")), sorted(needs("04"))
    (['m3-small', 'm3-small-nosd'], [], ['m3-small'])
    """
    return set() if chapter in BASE_ONLY else {"m3-small"} | ({"m3-small-nosd"} if chapter == "06" else set())


def models_dir() -> Path:
    """Where trained checkpoints live: ``$BGEM3_HOME/models`` (``~/.cache/bgem3/models``), as in the Makefile."""
    return Path(os.environ.get("BGEM3_HOME") or Path.home() / ".cache" / "bgem3") / "models"


def notebooks() -> list[Path]:
    """The notebooks of _toc.yml (MyST files under notebooks/), in book order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [ROOT / f"{f}.md" for f in files if f.startswith("notebooks/")]


def read(path: Path):
    """The notebook myst-nb builds from ``path`` (cells, tags and kernelspec: what the cache hashes)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    md = MdParserConfig(enable_extensions=set(config["parse"]["myst_enable_extensions"]))
    return read_myst_markdown_notebook(path.read_text(), md, add_source_map=True, path=path)


def execute(path: str) -> tuple[str, object, float, str | None, str]:
    """Run one notebook (in a worker process) -> (path, executed notebook, seconds, traceback or None, its
    slowest cells)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]
    nb = read(Path(path))
    result = single_nb_execution(nb, cwd=str(Path(path).parent), timeout=config["timeout"],
                                 allow_errors=config["allow_errors"], meta_override=True, record_timing=True)
    slowest = slowest_cells(nb)
    for cell in nb.cells:               # jupyter-cache hashes cell metadata: the timing must not reach the cache,
        cell.metadata.pop("execution", None)     # or myst-nb's lookup misses and Sphinx runs the chapter again
    return path, nb, result.time, None if result.err is None else result.exc_string, slowest


def slowest_cells(nb, k: int = 3) -> str:
    """``"line 524: 310 s, line 180: 95 s"``: the ``k`` code cells that took longest (nbclient's recorded
    timing; the line is where the cell starts in the MyST file), to say where a chapter's time goes.

    >>> from nbformat.v4 import new_code_cell, new_notebook
    >>> cells = [new_code_cell(metadata={"execution": {"iopub.execute_input": f"2026-12-01T12:00:0{a}Z",
    ...                                                "shell.execute_reply": f"2026-12-01T12:00:0{b}Z"}})
    ...          for a, b in ((0, 1), (1, 7), (7, 9))]
    >>> slowest_cells(new_notebook(cells=cells, metadata={"source_map": [3, 10, 20]}), k=2)
    'line 10: 6 s, line 20: 2 s'
    """
    from datetime import datetime
    lines, took = nb.metadata.get("source_map", []), []
    for i, cell in enumerate(nb.cells):
        t = cell.metadata.get("execution", {})
        if cell.cell_type == "code" and "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[key].replace("Z", "+00:00"))
                          for key in ("iopub.execute_input", "shell.execute_reply"))
            took.append(((end - start).total_seconds(), lines[i] if i < len(lines) else i))
    return ", ".join(f"line {line}: {sec:.0f} s" for sec, line in sorted(took, reverse=True)[:k])


def train(checkpoint: str) -> tuple[str, None, float, str | None, str]:
    """Train a checkpoint of ``TRAINED`` (in a worker process) -> (its name, None, seconds, error or None, "")."""
    args, start = TRAINED[checkpoint][0], time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bgem3_lib", "train", *args], cwd=ROOT)
    error = None if done.returncode == 0 else f"python -m bgem3_lib train {' '.join(args)}: exit {done.returncode}"
    return checkpoint, None, time.perf_counter() - start, error, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("BGEM3_BOOK_JOBS", "2")))
    ap.add_argument("--cache", default=str(ROOT / "_build" / ".jupyter_cache"))
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    cache = get_cache(args.cache)
    todo = []
    for path in notebooks():
        try:
            cache.match_cache_notebook(read(path))
        except KeyError:
            todo.append(path)
    todo.sort(key=lambda p: ORDER.index(p.name[:2]) if p.name[:2] in ORDER else len(ORDER))
    # Missing checkpoints that a chapter to run needs (or that another missing one builds on) are trained
    # first, each in the first free slot once the checkpoint it builds on exists; their chapters wait.
    wanted = {c for p in todo for c in needs(p.name[:2])}
    wanted |= {TRAINED[c][1] for c in wanted if TRAINED[c][1]}
    missing = {c for c in wanted if not (models_dir() / c / "config.json").is_file()}
    print(f"[prebuild] {len(todo)} notebook(s) to execute, {args.jobs} at a time: "
          + ", ".join(p.stem for p in todo)
          + (f"; first trains: {', '.join(sorted(missing))}" if missing else ""), flush=True)
    queue = [(train, c) for c in TRAINED if c in missing] + [(execute, str(p)) for p in todo]
    failed, start, running = [], time.perf_counter(), set()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        while queue or running:
            ready = [job for job in queue if (TRAINED[job[1]][1] not in missing if job[0] is train
                                              else not needs(Path(job[1]).name[:2]) & missing)]
            if not running and not ready:
                break                                               # only jobs whose training failed
            for job in ready[:args.jobs - len(running)]:
                queue.remove(job)
                running.add(pool.submit(*job))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                path, nb, seconds, error, slowest = future.result()
                name = Path(path).stem if nb is not None else f"train {path}"
                if nb is None and error is None:                    # a training: release what waits for it
                    missing.discard(path)
                if error is not None:
                    failed.append(name)
                    print(f"[prebuild] {name} FAILED after {seconds:.0f} s (the book build runs it again "
                          f"and shows the traceback):\n{error[-3000:]}", flush=True)
                    continue
                if nb is not None:
                    cache.cache_notebook_bundle(CacheBundleIn(nb, path, data={"execution_seconds": seconds}),
                                                check_validity=False, overwrite=True)
                print(f"[prebuild] {name} {'executed' if nb is not None else 'done'} in {seconds:.0f} s "
                      f"({time.perf_counter() - start:.0f} s since the start)"
                      + (f"; slowest cells: {slowest}" if slowest else ""), flush=True)
    print(f"[prebuild] done in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
