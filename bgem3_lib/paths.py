"""Where things live: the shared real-text data folder and the asset cache; how files get there: atomically
(:func:`atomic_write`, :func:`publish_set`), one writer at a time (:func:`file_lock`), and no temporary file
of a dead process left behind (:func:`remove_stale_temps`).

Both are overridable by environment variables so a user can point the library at a
real ``BAAI/bge-m3`` download or a full MIRACL corpus without editing code.

>>> data_dir().name
'data'
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
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
    previous file as it was. ``suffix`` ends the temporary name (writers that insist on an extension); the
    name carries :func:`temp_tag`, so a killed writer's leftover is found by :func:`remove_stale_temps`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_tag()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- one writer at a time

class LockedError(RuntimeError):
    """Another process holds the lock (``file_lock(..., wait=False)``)."""


_HELD: dict[str, list] = {}          # resolved lock path -> [fd, depth]: re-entrant within a process


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown"


@contextmanager
def file_lock(path: str | Path, what: str, wait: bool = True) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; it records ``host:pid`` of the holder).

    ``wait=False`` raises :class:`LockedError` naming ``what`` and the holder at once; ``wait=True`` blocks
    (saying once whom it waits for). The kernel drops the lock when its process dies, so a killed run never
    leaves a stale lock. Re-entrant within one process (a nested ``file_lock`` on the same path is free).

    >>> with tempfile.TemporaryDirectory() as d:
    ...     with file_lock(Path(d) / ".lock", "the demo folder"):
    ...         with file_lock(Path(d) / ".lock", "the demo folder", wait=False):   # same process: fine
    ...             print("held")
    held
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                raise LockedError(f"{what} is in use by another process ({_holder(path)}, lock {path}): "
                                  "wait for it to finish, or choose another path") from None
            print(f"[lock] {what} is in use by {_holder(path)}; waiting for it ({path})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        try:
            yield path
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- temporary files of dead processes

def temp_tag() -> str:
    """``tmp-<host>-<pid>``: names a temporary file or folder by its writer, so a later run can tell a dead
    writer's leftovers (:func:`remove_stale_temps`) from a live one's."""
    return f"tmp-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, untagged: bool = False) -> list[Path]:
    """Remove, directly inside ``folder``, temporaries left by dead processes: names containing
    ``tmp-<this host>-<pid>`` whose pid no longer runs (other hosts' are left alone) and, with
    ``untagged=True`` (the caller holds the folder's lock, so no live writer has one open), the ``.*.tmp``
    files of :func:`atomic_write`. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for entry in folder.iterdir():
        name = entry.name
        stale = False
        if f"tmp-{host}-" in name:
            pid = name.split(f"tmp-{host}-", 1)[1].split(".")[0]
            stale = pid.isdigit() and not _alive(int(pid))
        elif untagged and name.startswith(".") and name.endswith(".tmp"):
            stale = True
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------- a set of files published as one unit

def publish_set(folder: str | Path, files: Mapping[str, str | bytes], keep: int = 1) -> Path:
    """Write several files into ``folder`` so that readers see either the old set or the new one, never a mix.

    The files go to a new version folder ``folder/.versions/<stamp>/`` (each fsync'd); then one atomic
    ``os.replace`` points ``folder/.versions/current`` at it. ``folder/<name>`` is a symlink through
    ``current``, so every name switches at the same instant and a kill at any point leaves a whole set.
    Older versions beyond ``keep`` are removed. Returns the new version folder.

    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = publish_set(d, {"a.txt": "1", "b.txt": "1"})
    ...     _ = publish_set(d, {"a.txt": "2", "b.txt": "2"})
    ...     print((Path(d) / "a.txt").read_text(), (Path(d) / "b.txt").read_text(),
    ...           sorted(p.name for p in (Path(d) / ".versions").iterdir() if p.name[0] != ".")[-1])
    2 2 current
    """
    folder = Path(folder)
    versions = folder / ".versions"
    versions.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.monotonic_ns() % 10**9:09d}-{os.getpid()}"
    staging = versions / f".{stamp}.{temp_tag()}"
    staging.mkdir()
    try:
        for name, content in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"publish_set: file name {name!r} must be a plain name")
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(staging, versions / stamp)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with file_lock(versions / ".lock", f"the result set in {folder}"):    # publishers take turns
        pointer = versions / f".current.{temp_tag()}"
        pointer.unlink(missing_ok=True)
        os.symlink(stamp, pointer)
        os.replace(pointer, versions / "current")                 # the one atomic switch
        for name in files:
            link, target = folder / name, Path(".versions") / "current" / name
            if not (link.is_symlink() and Path(os.readlink(link)) == target):
                tmp = folder / f".{name}.{temp_tag()}"
                tmp.unlink(missing_ok=True)
                os.symlink(target, tmp)
                os.replace(tmp, link)                              # once per name, the first time only
        old = sorted(p for p in versions.iterdir()
                     if not p.name.startswith(".") and p.name not in ("current", stamp))
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        remove_stale_temps(versions)
        remove_stale_temps(folder)
    return versions / stamp
