"""book/check_book.py: the pure parts (which URLs count as local, which pages must show what).

The browser run itself is `make book-check`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("check_book", Path(__file__).resolve().parents[2] / "book" /
                                               "check_book.py")
check_book = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_book)


@pytest.mark.parametrize("url, local", [
    ("http://127.0.0.1:8000/_static/vendor/mathjax/tex-chtml.js", True),
    ("data:image/png;base64,AAAA", True),
    ("blob:http://127.0.0.1:8000/1234", True),
    ("about:blank", True),
    ("https://cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager@1.0.15/dist/embed.js", False),
    ("http://localhost.example.org/x.js", False),
    ("https://127.0.0.1.nip.io/x.js", False),
    ("ws://10.0.0.1:9000/socket", False),
])
def test_is_local(url, local):
    assert check_book.is_local(url) is local


def test_expectations(tmp_path):
    html, src = tmp_path / "html", tmp_path / "src"
    for rel in ("index.html", "book/intro.html", "notebooks/a.html", "notebooks/b.html", "_static/x.html"):
        (html / rel).parent.mkdir(parents=True, exist_ok=True)
        (html / rel).write_text("<html></html>")
    (src / "notebooks").mkdir(parents=True)
    (src / "notebooks" / "a.md").write_text("```{code-cell} ipython3\nimport ipywidgets\n```\n")
    (src / "notebooks" / "b.md").write_text("```{code-cell} ipython3\nprint(1)\n```\n")
    (html / "notebooks" / "c.html").write_text("<html></html>")
    (src / "notebooks" / "c.md").write_text("```{code-cell} ipython3\nimport ipywidgets\n"
                                            "if os.environ.get('BGEM3_BOOK_BUILD'):\n"
                                            "    display(HTML(weight_explorer_html(p, 'x')))\n```\n")
    pages = check_book.expectations(html, src)
    assert set(pages) == {"index.html", "book/intro.html", "notebooks/a.html", "notebooks/b.html",
                          "notebooks/c.html"}
    assert pages["notebooks/a.html"] == {"notebook": True, "widgets": True, "explorers": 0}
    assert pages["notebooks/b.html"] == {"notebook": True, "widgets": False, "explorers": 0}
    assert pages["book/intro.html"] == {"notebook": False, "widgets": False, "explorers": 0}
    # a chapter that shows a static explorer in the book: no widget state expected, one explorer
    assert pages["notebooks/c.html"] == {"notebook": True, "widgets": False, "explorers": 1}
