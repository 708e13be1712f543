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
