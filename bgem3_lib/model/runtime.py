"""The one place that picks MindSpore's device and execution mode.

``set_device("CPU" | "GPU" | "Ascend", device_id=None)``; ``BGEM3_DEVICE`` overrides the default
device, and under MindSpore's ``msrun`` launcher each worker takes its accelerator from the
``DEVICE_ID`` variable the launcher sets (so 8 workers use 8 devices, not device 0 eight times).

>>> resolve_device_id("Ascend", None, {"DEVICE_ID": "3"})
3
>>> resolve_device_id("CPU", None, {"DEVICE_ID": "3"}) is None
True
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mindspore as ms

DEVICES = ("CPU", "GPU", "Ascend")


def canonical_device(device: str | None) -> str:
    device = device or os.environ.get("BGEM3_DEVICE", "CPU")
    canonical = {d.lower(): d for d in DEVICES}.get(str(device).lower())
    if canonical is None:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    return canonical


def resolve_device_id(device: str, device_id: int | None, env: Mapping[str, str]) -> int | None:
    """An explicit id wins; otherwise an accelerator takes ``DEVICE_ID`` (msrun); CPU takes none."""
    if device_id is not None or device == "CPU":
        return device_id
    raw = env.get("DEVICE_ID")
    if raw in (None, ""):
        return None
    if not str(raw).isdigit():
        raise ValueError(f"DEVICE_ID must be a non-negative integer, got {raw!r}")
    return int(raw)


def set_device(device: str | None = None, device_id: int | None = None) -> str:
    """Select the device. MindSpore refuses ``set_device`` once any kernel has run in the process, even
    for the device already in use; that case is accepted, another device then is a clear error."""
    canonical = canonical_device(device)
    device_id = resolve_device_id(canonical, device_id, os.environ)
    try:
        ms.set_device(canonical, device_id) if device_id is not None else ms.set_device(canonical)
    except RuntimeError as exc:
        current = ms.get_context("device_target"), ms.get_context("device_id")
        if current[0] != canonical or device_id not in (None, current[1]):
            raise RuntimeError(f"this process already runs MindSpore on {current[0]} (device {current[1]}); "
                               f"{canonical} (device {device_id}) must be chosen before the first "
                               "computation: start a new process") from exc
    if canonical == "CPU":
        cpu_synchronous()
    return canonical


def cpu_synchronous(env: Mapping[str, str] = os.environ) -> bool:
    """On CPU, run MindSpore's ops in the calling thread (``mindspore.runtime.launch_blocking``) unless
    ``BGEM3_CPU_ASYNC=1``; returns whether it is on.

    Why: with asynchronous dispatch a second thread queues and launches the ops, and while an op runs it
    waits on the queue, yielding in a loop. On a 2-core machine that thread takes CPU time from the
    OpenMP threads of the op itself: 8 x 512 tokens through M3-small took 0.78-1.10 s per call (two
    clusters) with it and 0.75-0.81 s without. There is no device to overlap with on a CPU, so nothing is
    lost; ``training.trainer.make_deterministic`` calls it for training on CPU. Process-wide and one-way
    (MindSpore has no call to switch it back)."""
    global _launch_blocking
    if env.get("BGEM3_CPU_ASYNC") == "1":
        return False
    ms.runtime.launch_blocking()
    _launch_blocking = True
    return True


_launch_blocking = False        # cpu_synchronous has run: ops launch in the calling thread
# MindSpore's runtime pool (threads named ActorThread_<i>, made at the first op) waits for work by yielding in a loop.
SPINNING_THREADS = ("ActorThread_",)


def named_threads(prefixes: tuple[str, ...], tasks: Path = Path("/proc/self/task")) -> list[int]:
    """Ids of this process's threads whose name starts with one of ``prefixes`` ([] where /proc is not there)."""
    found = []
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return []
    for task in entries:
        try:
            if (task / "comm").read_text().startswith(prefixes):
                found.append(int(task.name))
        except (OSError, ValueError):       # the thread ended meanwhile
            continue
    return found


def can_restore_policy() -> bool:
    """Whether this process may move a thread back from ``SCHED_IDLE`` to the normal policy at nice 0: root, or
    ``RLIMIT_NICE`` >= 20 (sched(7)); a plain user on Linux's defaults may not."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    import resource
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _set_policy(tids: list[int], policy: int) -> list[int]:
    done = []
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done.append(tid)
        except (ProcessLookupError, PermissionError):
            continue
    return done


@contextmanager
def spinning_threads_idle(enabled: bool = True) -> Iterator[list[int]]:
    """Inside the block, MindSpore's runtime threads that wait by spinning (``SPINNING_THREADS``) run under
    ``SCHED_IDLE``, on a core only when nothing else wants one; after it, under the normal policy again. Yields
    the thread ids it moved ([] when it did nothing).

    Why: with ops launched in the calling thread (:func:`cpu_synchronous`) that pool has nothing to run while the
    encoder does, yet it takes a core whenever the scheduler offers one. On 2 cores an M3-small 8 x 128 encode
    lost 3-6 ms of CPU a call to it, and about one call in seven ran 30-60% long, its OpenMP threads waiting
    for a core. A no-op unless :func:`cpu_synchronous` is on, and where the move could not be undone
    (:func:`can_restore_policy`), so the pool is never left at the idle policy for work that needs it."""
    tids = []
    if enabled and _launch_blocking and can_restore_policy():
        tids = _set_policy(named_threads(SPINNING_THREADS), os.SCHED_IDLE)
    try:
        yield tids
    finally:
        _set_policy(tids, os.SCHED_OTHER)       # nothing when nothing was moved
