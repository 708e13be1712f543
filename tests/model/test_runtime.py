import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgem3_lib.model import runtime
from bgem3_lib.model.runtime import canonical_device, resolve_device_id

ROOT = Path(__file__).resolve().parents[2]


def test_canonical_device_names():
    assert canonical_device("ascend") == "Ascend"
    assert canonical_device("gpu") == "GPU"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        canonical_device("tpu")


def test_device_id_from_msrun_env():
    assert resolve_device_id("Ascend", None, {"DEVICE_ID": "5"}) == 5
    assert resolve_device_id("GPU", 2, {"DEVICE_ID": "5"}) == 2        # explicit wins
    assert resolve_device_id("CPU", None, {"DEVICE_ID": "5"}) is None
    assert resolve_device_id("Ascend", None, {}) is None
    with pytest.raises(ValueError, match="DEVICE_ID must be"):
        resolve_device_id("Ascend", None, {"DEVICE_ID": "x"})


def test_set_device_after_a_computation_keeps_the_same_device():
    """MindSpore refuses set_device once a kernel ran; asking again for the device in use must work
    (e.g. building a model after training in the same process), another device must say why not."""
    script = ("import numpy as np, mindspore as ms\n"
              "from bgem3_lib.model.runtime import set_device\n"
              "(ms.Tensor(np.ones(3)) + 1).asnumpy()\n"
              "print(set_device('CPU'))\n"
              "try:\n    set_device('GPU', 0)\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "CPU"
    assert lines[1].startswith("refused:") and "already runs MindSpore on CPU" in lines[1]


def _policies(tids):
    return [os.sched_getscheduler(t) for t in tids]


def _pool_once_named(seconds: float = 5.0) -> list[int]:
    """The pool's thread ids: a new thread takes its name a moment after it starts, so look until it has one."""
    import time
    end = time.monotonic() + seconds
    while not (pool := runtime.named_threads(runtime.SPINNING_THREADS)) and time.monotonic() < end:
        time.sleep(0.01)
    return pool


@pytest.mark.skipif(not runtime.can_restore_policy(), reason="this user may not move a thread back from SCHED_IDLE")
def test_spinning_threads_idle_inside_the_block_and_normal_after_it():
    import mindspore as ms
    import numpy as np
    runtime.set_device("CPU")
    (ms.Tensor(np.ones(3, np.float32)) + 1).asnumpy()           # the runtime pool exists after a first op
    pool = _pool_once_named()
    assert pool and _policies(pool) == [os.SCHED_OTHER] * len(pool)
    with runtime.spinning_threads_idle() as moved:
        assert sorted(moved) == sorted(pool) and _policies(pool) == [os.SCHED_IDLE] * len(pool)
    assert _policies(pool) == [os.SCHED_OTHER] * len(pool)
    with pytest.raises(KeyError):                                  # restored when the block raises, too
        with runtime.spinning_threads_idle():
            raise KeyError("x")
    assert _policies(pool) == [os.SCHED_OTHER] * len(pool)
    with runtime.spinning_threads_idle(enabled=False) as moved:
        assert moved == [] and _policies(pool) == [os.SCHED_OTHER] * len(pool)


def test_spinning_threads_idle_is_a_no_op_where_it_could_not_be_undone(monkeypatch):
    monkeypatch.setattr(runtime, "can_restore_policy", lambda: False)
    with runtime.spinning_threads_idle() as moved:
        assert moved == []
    monkeypatch.setattr(runtime, "can_restore_policy", lambda: True)
    monkeypatch.setattr(runtime, "_launch_blocking", False)          # ops dispatched by that pool: leave it be
    with runtime.spinning_threads_idle() as moved:
        assert moved == []


def test_named_threads_reads_proc(tmp_path):
    for tid, name in [("11", "ActorThread_0\n"), ("12", "python\n"), ("13", "ActorThread_1\n")]:
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "comm").write_text(name)
    (tmp_path / "14").mkdir()                                       # a thread that ended: no comm file
    assert sorted(runtime.named_threads(("ActorThread_",), tmp_path)) == [11, 13]
    assert runtime.named_threads(("x",), tmp_path / "missing") == []
