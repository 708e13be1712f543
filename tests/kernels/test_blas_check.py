"""kernels.blas_check: the note when OpenBLAS runs a kernel narrower than the CPU (e.g. OPENBLAS_CORETYPE=Haswell on
an AVX-512 CPU), checked on the table and on the real OpenBLAS in a fresh process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgem3_lib.kernels.blas_check import CORE_BITS, cpu_vector_bits, narrow_kernel_note

ROOT = Path(__file__).resolve().parents[2]
AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False


@pytest.mark.parametrize("core,flags,expect", [
    ("Haswell", "sse2 avx avx2 avx512f", True),       # the pinned case
    ("Cooperlake", "sse2 avx avx2 avx512f", False),   # the CPU's own
    ("SkylakeX", "sse2 avx avx2 avx512f", False),
    ("Haswell", "sse2 avx avx2", False),             # an AVX2 CPU: Haswell is its own width
    ("Nehalem", "sse2 avx avx2", True),
    ("SomeFutureCore", "sse2 avx avx2 avx512f", False),   # unknown names: no claim
    (None, "avx512f", False),
])
def test_note_only_when_the_kernel_is_narrower(core, flags, expect):
    note = narrow_kernel_note(core, flags, "X" if expect else None)
    assert (note is not None) == expect
    if expect:
        assert core in note and "OPENBLAS_CORETYPE=X" in note and f"{CORE_BITS[core.lower()]}-bit" in note


def test_cpu_vector_bits():
    assert cpu_vector_bits("avx avx2 avx512bw") == 256      # AVX-512 needs the foundation flag
    assert cpu_vector_bits("") == 128


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/cpuinfo")
def test_info_names_the_pinned_kernel_of_the_real_openblas():
    """`python -m bgem3_lib info` in a process pinned to Haswell: OpenBLAS reports that core, and the note
    appears exactly when this CPU has AVX-512."""
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell", "GLOG_v": "3"}
    out = subprocess.run([sys.executable, "-m", "bgem3_lib", "info"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if "OpenBLAS kernel: unknown" in out.stdout:
        pytest.skip("the BLAS here reports no OpenBLAS core name")
    assert "OpenBLAS kernel: Haswell (OPENBLAS_CORETYPE=Haswell)" in out.stdout
    assert ("note: OpenBLAS runs its Haswell kernel (256-bit vectors) on a CPU with 512-bit AVX-512"
            in out.stdout) == AVX512
    products = next(line for line in out.stdout.splitlines() if line.startswith("linear layers' float32 products"))
    if "AMX" not in products and "plain MindSpore" not in products:   # AMX takes them first where it exists
        assert ("this package's AVX-512 float32 kernel" in products) == AVX512
    from bgem3_lib.kernels import cpu
    attention = next(line for line in out.stdout.splitlines() if line.startswith("attention's float32 products"))
    assert ("AMX tiles" in attention) == (cpu.available() and cpu.uses_bf16x3_attention())
