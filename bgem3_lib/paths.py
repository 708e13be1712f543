"""Where things live: the shared real-text data folder and the asset cache; how files get there (atomically).

Both are overridable by environment variables so a user can point the library at a
real ``BAAI/bge-m3`` download or a full MIRACL corpus without editing code.

>>> data_dir().name
'data'
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The repository root (the folder holding ``bgem3_lib/``)."""
    return _PROJECT_ROOT


def _origin_checkout(root: Path) -> Path | None:
    """The local repository this checkout was cloned from (``git clone /path/to/repo``), if any."""
    config = root / ".git" / "config"
    if not config.is_file():
        return None
    section = None
    for line in config.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == '[remote "origin"]' and line.startswith("url"):
            url = line.split("=", 1)[1].strip().removeprefix("file://")
            path = Path(url) if url.startswith("/") else (root / url)
            return path.resolve() if path.is_dir() else None
    return None


def data_dir() -> Path:
    """Real text, read in place: ``$BGEM3_DATA``, else ``<project>/../shared/data``; a local clone that
    has no such folder beside it (e.g. ``git clone . $(mktemp -d)``) reads the one beside its origin."""
    if os.environ.get("BGEM3_DATA"):
        return Path(os.environ["BGEM3_DATA"])
    beside = _PROJECT_ROOT.parent / "shared" / "data"
    origin = None if beside.is_dir() else _origin_checkout(_PROJECT_ROOT)
    if origin is not None and (origin.parent / "shared" / "data").is_dir():
        return origin.parent / "shared" / "data"
    return beside


def cache_dir() -> Path:
    """Asset and checkpoint cache: ``$BGEM3_HOME`` or ``~/.cache/bgem3`` (never in git)."""
    return Path(os.environ.get("BGEM3_HOME") or Path.home() / ".cache" / "bgem3")


@contextmanager
def atomic_write(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsync'd and moved into place with
    ``os.replace``, on failure removed. Readers never see half a file, and a failed write leaves the
    previous file as it was. ``suffix`` ends the temporary name (writers that insist on an extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
