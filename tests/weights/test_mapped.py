"""bgem3_lib.weights.mapped and the mapped loading of torch checkpoints: pages are read only when used,
checked pages leave memory again, writes stay in the process, a truncated file is an error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bgem3_lib.model.encoder import _take
from bgem3_lib.weights.checkpoint_io import load_state_dict
from bgem3_lib.weights.mapped import is_mapped, map_array, release
from bgem3_lib.weights.safe_unpickle import CheckpointError

ROWS, COLS = 4096, 4096          # 64 MiB of float32: far above the noise of this process's RSS
MIB = 2**20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def big_bin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mapped") / "pytorch_model.bin"
    code = (f"import torch; g = torch.Generator().manual_seed(0); "
            f"torch.save({{'w': torch.randn({ROWS}, {COLS}, generator=g), 'b': torch.arange(7.0)}}, {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return path


def test_weights_enter_memory_only_when_read_and_leave_after_the_check(big_bin):
    base = rss()
    state = load_state_dict(big_bin)
    w = state["w"]
    assert is_mapped(w) and w.shape == (ROWS, COLS) and w.dtype == np.float32
    assert rss() - base < 8 * MIB                       # mapped, not read
    total = float(w[:, :8].sum())                       # touches every page once
    assert rss() - base > 48 * MIB
    release(w)
    assert rss() - base < 8 * MIB                       # handed back ...
    assert float(w[:, :8].sum()) == total               # ... and read again from the file, unchanged
    release(w)
    assert np.shares_memory(_take(state, "w", (ROWS, COLS)), w)   # the loader's NaN check reads it all ...
    assert rss() - base < 8 * MIB                       # ... and leaves none of it resident
    np.testing.assert_array_equal(state["b"], np.arange(7.0, dtype=np.float32))


def test_writes_stay_in_the_process(big_bin):
    before = big_bin.read_bytes()
    w = load_state_dict(big_bin)["w"]
    w[0, :] = 7.0
    assert big_bin.read_bytes() == before
    assert load_state_dict(big_bin)["w"][0, 0] != 7.0


def test_truncated_checkpoint_is_a_clear_error(big_bin, tmp_path):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(big_bin.read_bytes()[: big_bin.stat().st_size // 2])
    with pytest.raises((CheckpointError, ValueError), match="truncated|corrupt|shorter|beyond|claims"):
        load_state_dict(cut)


def test_map_array_checks_the_file_length(tmp_path):
    path = tmp_path / "w.bin"
    np.arange(4, dtype="<f4").tofile(path)
    with pytest.raises(ValueError, match="beyond the end of the file"):
        map_array(path, 8, np.float32, (3,))
    a = np.zeros(4)
    release(a)                                           # not mapped: nothing happens
    assert not is_mapped(a)


def test_safetensors_tensors_are_mapped(tmp_path):
    from bgem3_lib.weights.checkpoint_io import save_state_dict
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((256, 64)).astype(np.float32), "h": np.arange(5, dtype=np.float16),
             "e": np.zeros((0, 3), np.float32), "i": np.arange(3, dtype=np.int64)}
    save_state_dict(state, tmp_path / "m.safetensors")
    got = load_state_dict(tmp_path / "m.safetensors")
    assert is_mapped(got["w"]) and is_mapped(got["h"])
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
