"""Execute the book's notebooks into Jupyter Book's cache, several at once: book/prebuild.py [--jobs N].

Jupyter Book 1 (myst-nb, ``execute_notebooks: cache``) runs one notebook after the other. On this
two-core machine a chapter keeps about one core busy on average (Python around the kernels, trec_eval,
Milvus Lite), so ``book/build.sh`` first runs this script: every notebook whose code is not yet in
``_build/.jupyter_cache`` is executed here, ``--jobs`` at a time (longest first), exactly as myst-nb would
execute it (same reader, same working directory, same timeout, errors fail), and stored in the cache
under the same hash. The Sphinx build that follows then finds every notebook executed and only renders.

Chapters that share an encoding cache entry take turns through its file lock (the first encodes, the
other reads), so running them side by side never encodes a corpus twice. A failed notebook is reported
and left out of the cache: the Sphinx build then executes it again and fails with its traceback.
"""
from __future__ import annotations

import argparse
import os
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
# Minutes a chapter took in the last measured full build: only the order of the queue (longest first).
COST = {"06": 15, "10": 10, "08": 6, "04": 3, "09": 5, "03": 2, "05": 2, "01": 1, "07": 1, "02": 1}


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


def execute(path: str) -> tuple[str, object, float, str | None]:
    """Run one notebook (in a worker process) -> (path, executed notebook, seconds, traceback or None)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]
    nb = read(Path(path))
    result = single_nb_execution(nb, cwd=str(Path(path).parent), timeout=config["timeout"],
                                 allow_errors=config["allow_errors"], meta_override=True)
    return path, nb, result.time, None if result.err is None else result.exc_string


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
    todo.sort(key=lambda p: -COST.get(p.name[:2], 1))
    print(f"[prebuild] {len(todo)} notebook(s) to execute, {args.jobs} at a time: "
          + ", ".join(p.stem for p in todo), flush=True)
    failed, start = [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(execute, str(p)) for p in todo}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                path, nb, seconds, error = future.result()
                name = Path(path).stem
                if error is not None:
                    failed.append(name)
                    print(f"[prebuild] {name} FAILED after {seconds:.0f} s (the book build runs it again "
                          f"and shows the traceback):\n{error[-3000:]}", flush=True)
                    continue
                cache.cache_notebook_bundle(CacheBundleIn(nb, path, data={"execution_seconds": seconds}),
                                            check_validity=False, overwrite=True)
                print(f"[prebuild] {name} executed in {seconds:.0f} s "
                      f"({time.perf_counter() - start:.0f} s since the start)", flush=True)
    print(f"[prebuild] done in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
