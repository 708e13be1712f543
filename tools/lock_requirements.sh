#!/usr/bin/env bash
# Regenerate requirements.txt (the lock that `make` installs) from requirements.in (edited by hand):
# every package, transitive ones included, pinned ==.
#
# Usage: tools/lock_requirements.sh [--from-venv] [pip-compile options, e.g. --upgrade-package NAME]
#   (no option)  versions already pinned in requirements.txt are kept unless requirements.in asks for
#                others (pip-compile's rule), so the lock only moves where requirements.in moved;
#   --from-venv  prefer the versions installed in .venv (its `pip freeze`) instead: locks what was
#                tested there (how the first lock was made).
# Then `make test` reinstalls .venv from the new lock (its stamp depends on requirements.txt).
#
# pip-compile (pip-tools, pinned below) runs in a throwaway venv, $LOCKVENV (default /tmp/lockvenv),
# never in .venv, with the same Python as .venv (python3, 3.11 here): the lock is for that Python.
# It reads pip's own configuration, so torch==2.13.0 resolves to the CPU build 2.13.0+cpu from the
# machine's local wheel directory (find-links). The script refuses a lock holding a CUDA package
# (nvidia-*, triton, cuda-*) or a torch that is not +cpu: PyPI's linux torch pulls in GBs of those.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_TOOLS_VERSION=7.6.2
PIP_VERSION=26.3
LOCKVENV=${LOCKVENV:-/tmp/lockvenv}
PYTHON=${PYTHON:-python3}

from_venv=0
if [[ "${1:-}" == --from-venv ]]; then from_venv=1; shift; fi

if ! "$LOCKVENV/bin/pip-compile" --version 2>/dev/null | grep -q "version $PIP_TOOLS_VERSION\$"; then
  echo "lock_requirements: installing pip-tools $PIP_TOOLS_VERSION into $LOCKVENV" >&2
  "$PYTHON" -m venv --clear "$LOCKVENV"
  "$LOCKVENV/bin/python" -m pip install -q "pip==$PIP_VERSION" "pip-tools==$PIP_TOOLS_VERSION"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out="$tmp/requirements.txt"
# pip-compile prefers the pins it finds in its output file: seed that file.
if (( from_venv )); then
  [[ -x .venv/bin/python ]] || { echo "lock_requirements: no .venv (run make venv first)" >&2; exit 1; }
  .venv/bin/python -m pip freeze --all --exclude-editable \
    | grep -v -i -E '^(#|-e |pip==|bgem3[-_]lib)' > "$out"
elif [[ -f requirements.txt ]]; then
  cp requirements.txt "$out"
fi

"$LOCKVENV/bin/pip-compile" --quiet --no-header --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file "$out" "$@" requirements.in

if grep -i -E '^(nvidia-|triton|cuda-)' "$out"; then
  echo "lock_requirements: the resolver brought in the CUDA packages above (torch not the local CPU build?);" \
       "requirements.txt left unchanged" >&2
  exit 1
fi
grep -q -E '^torch==[^ ]+\+cpu' "$out" || {
  echo "lock_requirements: torch is not pinned to a +cpu build; requirements.txt left unchanged" >&2
  exit 1
}

pyver=$("$LOCKVENV/bin/python" -c 'import platform; print(platform.python_version().rsplit(".", 1)[0], "on", platform.system().lower(), platform.machine())')
{
  echo "# GENERATED, do not edit: the lock of requirements.in (edit that file instead), every package"
  echo "# pinned ==, resolved by pip-compile $PIP_TOOLS_VERSION for Python $pyver. \`make\` installs this file."
  echo "# Regenerate with:  tools/lock_requirements.sh"
  echo "# torch==2.13.0+cpu is the CPU build, installed from the machine's local wheel directory (pip find-links)."
  cat "$out"
} > requirements.txt
echo "lock_requirements: requirements.txt has $(grep -c -E '^[A-Za-z0-9]' requirements.txt) pinned packages" >&2
