"""A Milvus Lite gRPC server on this machine (``python -m milvus_lite server``), for tests, benchmarks and a
single-machine service: the same client code then talks to it at ``http://127.0.0.1:<port>`` as to a cluster.

>>> port = free_port(); 1024 < port < 65536
True
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lite_server(data_dir: str | Path, log_path: str | Path, host: str = "127.0.0.1",
                      port: int | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str, float]:
    """Start the server on ``data_dir`` (created if missing), its output in ``log_path`` (a file: a pipe nobody
    reads could fill up and stall it). Returns once the port accepts connections:
    ``(process, "http://host:port", seconds it took)``; RuntimeError naming the log if it dies or stays silent."""
    port = port or free_port()
    log_path = Path(log_path)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:              # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                                 "--host", host, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < timeout:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return proc, f"http://{host}:{port}", time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"milvus_lite server exited ({proc.returncode}): "
                                   f"{log_path.read_text()[-2000:]}") from None
            time.sleep(0.1)
    stop_lite_server(proc)
    raise RuntimeError(f"milvus_lite server did not accept connections within {timeout:.0f} s (log: {log_path})")


def stop_lite_server(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """Terminate the server (kill it if it does not exit within ``timeout`` s)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
