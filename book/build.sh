#!/usr/bin/env bash
# Build the book: book/build.sh quick|full  (run by `make book-quick` / `make book`).
#
# Notebooks are executed at build time and their outputs cached by code content in
# _build/.jupyter_cache. The quick build (BGEM3_QUICK=1: small subsets) runs the same code as the
# full build, so the two modes keep separate caches: switching mode parks the other mode's cache
# as _build/.jupyter_cache.<mode> and drops the Sphinx environment so every page is re-read.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: book/build.sh quick|full}
[[ "$mode" == quick || "$mode" == full ]] || { echo "mode must be quick or full, got $mode" >&2; exit 2; }
JB=${JB:-.venv/bin/jupyter-book}

book/vendor_js.sh
mkdir -p _build
last=$(cat _build/.book_mode 2>/dev/null || echo none)
if [[ "$last" != "$mode" ]]; then
  if [[ -d _build/.jupyter_cache ]]; then
    if [[ "$last" == none ]]; then rm -rf _build/.jupyter_cache
    else rm -rf "_build/.jupyter_cache.$last"; mv _build/.jupyter_cache "_build/.jupyter_cache.$last"; fi
  fi
  if [[ -d "_build/.jupyter_cache.$mode" ]]; then mv "_build/.jupyter_cache.$mode" _build/.jupyter_cache; fi
  rm -rf _build/.doctrees _build/html _build/jupyter_execute
  echo "$mode" > _build/.book_mode
fi

export BGEM3_QUICK=$([[ "$mode" == quick ]] && echo 1 || echo 0)
export TQDM_DISABLE=${TQDM_DISABLE:-1}   # no progress-bar widgets in the executed pages
export BGEM3_BOOK_BUILD=1               # chapters show their static explorers (no kernel behind the page)
# Two chapters run at once on two cores (book/prebuild.py), each with OpenMP kernels of OMP_NUM_THREADS threads:
# OpenMP's default waits spin, and a spinning thread holds the core the other chapter's thread needs. Waiting
# threads sleep instead (the TyDi evaluation of chapter 6, run as two halves side by side: 296 s spinning,
# 276 s sleeping; alone, the same within noise).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# One id per build: an evaluation two chapters both run is computed once in this build and read back by the
# second (bgem3_lib.evaluation.build_results); results of earlier builds are removed, never reused.
export BGEM3_BUILD_ID="$(date +%Y%m%d-%H%M%S)-$$"
rm -rf "${BGEM3_HOME:-$HOME/.cache/bgem3}/build_results"
start=$(date +%s)
# Execute the notebooks missing from the cache BGEM3_BOOK_JOBS at a time (default 2), then let Jupyter Book
# render: it finds them all executed (book/prebuild.py says how it matches myst-nb's cache).
.venv/bin/python book/prebuild.py
"$JB" build . -W -n --keep-going
echo "book ($mode) built in $(( $(date +%s) - start )) s: $(find _build/html -name '*.html' -not -path '*/_static/*' | wc -l) pages in _build/html"
