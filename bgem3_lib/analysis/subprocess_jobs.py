"""The analysis wing's Python subprocesses: a module of the library run as ``python -m`` in a fresh interpreter,
so that PyTorch, MindNLP (which replaces ``torch`` by its MindSpore shim for the whole process) and MindSpore
each get a process of their own, and the parent imports none of them.

* :func:`_run` - ``python <args>`` with the repository on ``PYTHONPATH``, ``OMP_NUM_THREADS`` (default 2) and
  tqdm silenced; a non-zero exit raises a RuntimeError with the end of the subprocess's stderr;
* :func:`cached_job` - a ``python -m`` job whose outputs (named arrays + JSON) are cached under a key of
  everything they depend on: it runs only when they are missing.

Used by :mod:`~bgem3_lib.analysis.reference_runs`, :mod:`~bgem3_lib.analysis.real_weight_runs` and
:mod:`~bgem3_lib.analysis.int8_engines`.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(args: list[str], what: str, timeout: float) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_subprocess_env(),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def cached_job(folder: str | Path, name: str, ident, job: dict, command: list[str], what: str, timeout: float,
               cache: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """The outputs of ``python -m <command...> JOB.json ARRAYS.npz META.json``, run in a subprocess only when
    they are not cached: (the arrays of ``ARRAYS.npz`` by name, ``META.json`` parsed).

    Cached as ``folder/<name>-<key>.npz`` / ``.json``; ``key``: 24 hex digits of the sha256 of ``ident`` as JSON
    (everything the outputs depend on). The job runs when either file is missing or ``cache`` is False; ``job``
    (JSON) reaches it as ``folder/<name>-<key>.<pid>.job.json``, deleted afterwards. The subprocess writes both
    outputs (atomically); ``what`` names it in the RuntimeError raised when it fails.

    >>> import tempfile
    >>> key = hashlib.sha256(json.dumps(["v1"]).encode()).hexdigest()[:24]       # the key of ident ["v1"]
    >>> with tempfile.TemporaryDirectory() as d:                                 # cached: no subprocess runs
    ...     np.savez(Path(d) / f"demo-{key}.npz", dense=np.zeros((2, 3)))
    ...     _ = (Path(d) / f"demo-{key}.json").write_text('{"seconds": 1.5}')
    ...     arrays, meta = cached_job(d, "demo", ["v1"], {}, ["no.such.module"], "the demo run", 60)
    >>> arrays["dense"].shape, meta
    ((2, 3), {'seconds': 1.5})
    """
    folder = Path(folder)
    key = hashlib.sha256(json.dumps(ident, ensure_ascii=False).encode()).hexdigest()[:24]
    arrays, meta = folder / f"{name}-{key}.npz", folder / f"{name}-{key}.json"
    if not (cache and arrays.is_file() and meta.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        job_file = folder / f"{name}-{key}.{os.getpid()}.job.json"
        job_file.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        try:
            _run(["-m", *command, str(job_file), str(arrays), str(meta)], what, timeout)
        finally:
            job_file.unlink(missing_ok=True)
    with np.load(arrays) as data:
        return {k: data[k] for k in data.files}, json.loads(meta.read_text())
