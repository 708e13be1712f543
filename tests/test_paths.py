"""bgem3_lib.paths: where the data folder is found."""
from __future__ import annotations

from bgem3_lib import paths


def _layout(tmp_path, url: str | None):
    """tmp/a/orig (the origin), tmp/a/shared/data, and tmp/b/clone with an origin remote ``url``."""
    (tmp_path / "a" / "orig").mkdir(parents=True)
    (tmp_path / "a" / "shared" / "data").mkdir(parents=True)
    clone = tmp_path / "b" / "clone"
    (clone / ".git").mkdir(parents=True)
    remote = f'[remote "origin"]\n\turl = {url}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n' if url else ""
    (clone / ".git" / "config").write_text('[core]\n\tbare = false\n' + remote)
    return clone


def test_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEM3_DATA", str(tmp_path / "elsewhere"))
    assert paths.data_dir() == tmp_path / "elsewhere"


def test_local_clone_reads_the_data_beside_its_origin(tmp_path, monkeypatch):
    monkeypatch.delenv("BGEM3_DATA", raising=False)
    monkeypatch.setattr(paths, "_PROJECT_ROOT", _layout(tmp_path, str(tmp_path / "a" / "orig")))
    assert paths.data_dir() == tmp_path / "a" / "shared" / "data"


def test_data_beside_the_checkout_wins_over_the_origin(tmp_path, monkeypatch):
    monkeypatch.delenv("BGEM3_DATA", raising=False)
    clone = _layout(tmp_path, str(tmp_path / "a" / "orig"))
    (tmp_path / "b" / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(paths, "_PROJECT_ROOT", clone)
    assert paths.data_dir() == tmp_path / "b" / "shared" / "data"


def test_no_origin_or_remote_origin_gives_the_default_path(tmp_path, monkeypatch):
    monkeypatch.delenv("BGEM3_DATA", raising=False)
    for url in (None, "https://example.org/bgem3.git"):
        clone = _layout(tmp_path / str(bool(url)), url)
        monkeypatch.setattr(paths, "_PROJECT_ROOT", clone)
        assert paths.data_dir() == clone.parent / "shared" / "data"


# ---------------------------------------------------------------- locks, temporaries, result sets

def _holder_process(lock, seconds=30):
    """Another process that holds ``lock`` (``file_lock``) until killed; returns once it holds it."""
    import subprocess
    import sys
    code = (f"import time; from bgem3_lib.paths import file_lock\n"
            f"with file_lock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=paths.project_root())
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_lock_held_elsewhere_fails_fast_or_waits(tmp_path):
    import threading
    import time
    lock = tmp_path / ".lock"
    p = _holder_process(lock)
    try:
        try:
            with paths.file_lock(lock, "the folder X", wait=False):
                raise AssertionError("acquired a lock another process holds")
        except paths.LockedError as e:
            assert "the folder X is in use by another process" in str(e) and f":{p.pid}" in str(e)
        threading.Timer(1.0, p.kill).start()                 # the holder dies: the kernel drops its lock
        start = time.monotonic()
        with paths.file_lock(lock, "the folder X"):          # waits, then gets it
            assert time.monotonic() - start > 0.5
    finally:
        p.kill()
        p.wait()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host_tag = paths.temp_tag().rsplit("-", 1)[0]
    stale = tmp_path / f".x.{host_tag}-{dead}"
    mine = tmp_path / f".y.{paths.temp_tag()}"
    other_host = tmp_path / f".z.tmp-elsewhere-{dead}"
    untagged = tmp_path / ".dense.npy.abc123.tmp"
    for f in (stale, mine, other_host, untagged):
        f.write_text("half")
    assert paths.remove_stale_temps(tmp_path) == [stale]
    assert mine.exists() and other_host.exists() and untagged.exists()
    assert paths.remove_stale_temps(tmp_path, untagged=True) == [untagged]


def test_a_result_set_switches_as_one_and_a_failed_publish_keeps_the_old_set(tmp_path, monkeypatch):
    import builtins
    paths.publish_set(tmp_path, {"results.csv": "a,1\n", "results.json": "[1]", "notes.txt": "one"})
    assert (tmp_path / "results.csv").read_text() == "a,1\n"
    real_open, opened = builtins.open, []

    def disk_full_on_the_second_file(file, *a, **k):
        if str(file).endswith("results.json") and ".versions" in str(file):
            opened.append(file)
            raise OSError(28, "No space left on device")
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", disk_full_on_the_second_file)
    try:
        paths.publish_set(tmp_path, {"results.csv": "b,2\n", "results.json": "[2]", "notes.txt": "two"})
        raise AssertionError("the failed publish did not raise")
    except OSError:
        pass
    monkeypatch.undo()
    assert opened
    got = {n: (tmp_path / n).read_text() for n in ("results.csv", "results.json", "notes.txt")}
    assert got == {"results.csv": "a,1\n", "results.json": "[1]", "notes.txt": "one"}       # old set, whole
    assert [p.name for p in (tmp_path / ".versions").iterdir() if ".tmp-" in p.name] == []    # nothing half left
    paths.publish_set(tmp_path, {"results.csv": "c,3\n", "results.json": "[3]", "notes.txt": "three"})
    got = {n: (tmp_path / n).read_text() for n in ("results.csv", "results.json", "notes.txt")}
    assert got == {"results.csv": "c,3\n", "results.json": "[3]", "notes.txt": "three"}
    assert all((tmp_path / n).is_symlink() for n in got)                # each name goes through one pointer
    assert len([p for p in (tmp_path / ".versions").iterdir() if not p.name.startswith(".")]) == 2  # current + 1
