"""Where things live: the shared real-text data folder and the asset cache.

Both are overridable by environment variables so a user can point the library at a
real ``BAAI/bge-m3`` download or a full MIRACL corpus without editing code.

>>> data_dir().name
'data'
"""
from __future__ import annotations

import os
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The repository root (the folder holding ``bgem3_lib/``)."""
    return _PROJECT_ROOT


def data_dir() -> Path:
    """Real text, read in place: ``$BGEM3_DATA`` or ``<project>/../shared/data``."""
    return Path(os.environ.get("BGEM3_DATA") or _PROJECT_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """Asset and checkpoint cache: ``$BGEM3_HOME`` or ``~/.cache/bgem3`` (never in git)."""
    return Path(os.environ.get("BGEM3_HOME") or Path.home() / ".cache" / "bgem3")
