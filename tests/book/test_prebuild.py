"""book/prebuild.py's pool: trainings before the chapters that load their checkpoints, the others beside them."""
import sys
import time
from pathlib import Path

import pytest
from nbformat.v4 import new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "book"))
import prebuild  # noqa: E402

LOG: Path


def _fake_execute(path):
    name = Path(path).name[:2]
    (LOG / f"start-{name}").write_text(str(time.time()))
    time.sleep(0.3)
    (LOG / f"end-{name}").write_text(str(time.time()))
    return path, new_notebook(), 0.3, None, ""


def _fake_train(checkpoint):
    # Long beside the chapters' 0.3 s: the two base-only chapters run one after the other in the second slot, and
    # at 0.6 s (exactly their sum) a loaded machine's process start-up made the second one start after it ended.
    (LOG / f"start-{checkpoint}").write_text(str(time.time()))
    time.sleep(2.0)
    (LOG / f"end-{checkpoint}").write_text(str(time.time()))
    return checkpoint, None, 2.0, "boom" if checkpoint == FAIL else None, ""


FAIL = None


class _Cache:
    def match_cache_notebook(self, nb):
        raise KeyError("not cached")

    def cache_notebook_bundle(self, *a, **k):
        pass


@pytest.fixture
def pool(tmp_path, monkeypatch):
    global LOG
    LOG = tmp_path
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path / "home"))          # no trained checkpoint exists
    chapters = [tmp_path / f"{c}_x.md" for c in ("06", "09", "04", "02")]
    monkeypatch.setattr(prebuild, "notebooks", lambda: chapters)
    monkeypatch.setattr(prebuild, "read", lambda p: p)
    monkeypatch.setattr(prebuild, "get_cache", lambda _: _Cache())
    monkeypatch.setattr(prebuild, "execute", _fake_execute)
    monkeypatch.setattr(prebuild, "train", _fake_train)
    return lambda: {f.name: float(f.read_text()) for f in tmp_path.glob("*-*")}


def test_chapters_wait_for_their_checkpoints_and_others_run_beside_the_training(pool):
    prebuild.main(["--jobs", "2"])
    t = pool()
    assert t["start-09"] < t["end-m3-small"] and t["start-02"] < t["end-m3-small"]    # base-only chapters beside it
    assert t["start-m3-small-nosd"] >= t["end-m3-small"]                              # builds on M3-small
    assert t["start-04"] >= t["end-m3-small"]
    assert t["start-06"] >= t["end-m3-small-nosd"]


def test_a_failed_training_leaves_out_only_what_needs_it(pool, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FAIL", "m3-small-nosd")
    prebuild.main(["--jobs", "2"])
    t = pool()
    assert "start-06" not in t and {"end-04", "end-09", "end-02"} <= set(t)


def test_an_executed_chapter_is_found_by_the_lookup_sphinx_makes(tmp_path):
    """What prebuild caches must match myst-nb's lookup of the unexecuted file (jupyter-cache hashes cell
    metadata too: the recorded cell timing once made every chapter run a second time in the Sphinx build)."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    page = tmp_path / "99_tiny.md"
    page.write_text("---\njupytext:\n  text_representation:\n    format_name: myst\nkernelspec:\n  display_name: "
                    "Python 3\n  language: python\n  name: python3\n---\n# Tiny\n\n```{code-cell} ipython3\n"
                    "x = 6 * 7\nx\n```\n")
    path, nb, seconds, error, slowest = prebuild.execute(str(page))
    assert error is None and slowest.startswith("line ") and nb.cells[1].outputs
    cache = get_cache(str(tmp_path / "cache"))
    cache.cache_notebook_bundle(CacheBundleIn(nb, path), check_validity=False, overwrite=True)
    cache.match_cache_notebook(prebuild.read(page))          # raises KeyError on a miss
