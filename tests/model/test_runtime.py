import os
import subprocess
import sys
from pathlib import Path

import pytest

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
