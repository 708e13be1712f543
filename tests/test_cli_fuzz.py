"""Fuzz the CLI's input reader (issue 12): bgem3_lib.cli.read_texts / input_lines on arbitrary files.

Texts with every kind of character (controls such as \\x0c \\x1c-\\x1f \\x85, U+2028/9, \\r, zero-width
and other format characters, lone surrogates, very long lines), written as ``.txt`` (``\\n`` or
``\\r\\n`` endings) or ``.jsonl`` (``json.dumps`` with and without ``ensure_ascii``), and raw bytes.
Property: a ValueError whose message is ``<file>:<line>: ...`` (invalid UTF-8 also gives the byte
offset), or one text per line / record equal to what was written (a ``.txt`` line loses one
trailing ``\\r``; a ``.jsonl`` record reads as ``f"{title} {text}".strip()``).

Which texts the reader must refuse is the model's rule (``check_texts``: :func:`is_blank`, lone
surrogates): texts of zero-width / control / format characters only, and lone surrogates from
``\\udXXX`` escapes, are refused with their line, as the model would refuse them (tests at the end).
"""
from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bgem3_lib.cli import input_lines, read_texts
from bgem3_lib.model.tokenization import check_texts

FUZZ = settings(max_examples=200, deadline=None)

_DIR = Path(tempfile.mkdtemp(prefix="cli-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)

# characters a line-based reader can trip over (all but \n, which ends a line)
_TRICKY = ("\x00\x01\t\x0b\x0c\r\x1c\x1d\x1e\x1f \x7f\x85\xa0\u00ad\u061c\u1680\u180e\u2000\u200a\u200b\u200c"
           "\u200d\u200e\u2028\u2029\u202f\u205f\u2060\u2066\u3000\ufeff\ufffe\U000e0001")
_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n") | st.sampled_from(_TRICKY)
_line = st.one_of(
    st.text(_char, max_size=20),
    st.text(st.sampled_from(_TRICKY + " \t"), max_size=6),                    # blank-looking lines
    st.builds(lambda t, n: t * n, st.text(_char, min_size=1, max_size=4), st.integers(2_000, 30_000)),
)
_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_any_text = st.text(st.characters() | st.sampled_from(_TRICKY + "\n"), max_size=20) | \
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), _surrogate, st.text(max_size=5))


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _model_refuses(text: str) -> bool:
    try:
        check_texts([text])
    except ValueError:
        return True
    return False


def _known_gap(text: str) -> bool:
    """Refused by the model but (today) accepted by read_texts: blank without being whitespace
    (zero-width, control or format characters only), or holding a lone surrogate."""
    return _model_refuses(text) and (text.strip() != "" or _has_surrogate(text))


def _file(name: str, data: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data)
    return path


def _join(lines: list[str], crlf: bool, trailing: bool) -> tuple[str, list[str]]:
    """File content for ``lines`` and each line as a reader must return it (one trailing \\r dropped)."""
    if not trailing and lines and lines[-1] == "":
        lines, trailing = lines[:-1], True             # "a\\n" + "" is just "a\\n": the "" line is not there
    sep = "\r\n" if crlf else "\n"
    content = sep.join(lines) + (sep if trailing and lines else "")
    expected = []
    for i, line in enumerate(lines):
        raw = line + ("\r" if crlf and (i < len(lines) - 1 or trailing) else "")
        expected.append(raw[:-1] if raw.endswith("\r") else raw)
    return content, expected


def _check_read(path: Path, expected: list[str], strict: bool = False) -> list[str] | None:
    """read_texts(path) against the texts the file holds. A refusal must name the file and the line of
    a text the model refuses, with no text the reader must refuse before it; otherwise the texts come
    back unchanged and none of them is one the reader must refuse. ``strict``: the reader must refuse
    exactly what the model refuses (no known gap)."""
    must_refuse = [_model_refuses(t) and (strict or not _known_gap(t)) for t in expected]
    try:
        got = read_texts(path)
    except ValueError as e:
        msg = str(e)
        if not expected:
            assert msg == f"{path}: no texts"
            return None
        m = re.match(rf"{re.escape(str(path))}:(\d+): ", msg)
        assert m, f"message does not name file and line: {msg!r}"
        n = int(m.group(1))
        assert 1 <= n <= len(expected) and _model_refuses(expected[n - 1]), (n, msg)
        assert not any(must_refuse[: n - 1]), f"line {must_refuse.index(True) + 1} should have been refused first"
        return None
    assert got == expected
    assert not any(must_refuse), f"line {must_refuse.index(True) + 1} should have been refused"
    return got


# ------------------------------------------------------------------------------------ .txt

@FUZZ
@given(lines=st.lists(_line, max_size=8), crlf=st.booleans(), trailing=st.booleans())
@example(lines=["one\x0cstill one", "two \u2028 too", "\x1c\x1d\x1e", "x\x85y"], crlf=True, trailing=True)
@example(lines=["a", "", "b"], crlf=False, trailing=False)
@example(lines=[""], crlf=False, trailing=True)
def test_txt_one_text_per_line(lines, crlf, trailing):
    content, expected = _join(lines, crlf, trailing)
    path = _file("texts.txt", content.encode("utf-8"))
    _check_read(path, expected)
    assert input_lines(path) == expected


@st.composite
def _text_with_bad_bytes(draw) -> bytes:
    """Valid UTF-8 lines with a few random bytes dropped in somewhere."""
    data = "\n".join(draw(st.lists(_line, max_size=4))).encode()
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=300),
    st.lists(_any_text, max_size=6).map(lambda ts: "\n".join(ts).encode("utf-8", "surrogatepass")),
    _text_with_bad_bytes(),
))
@example(data=b"ok\nfine\n\xff\xfe")
@example(data="x\n\ud800".encode("utf-8", "surrogatepass"))
def test_txt_raw_bytes(data):
    path = _file("raw.txt", data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        with pytest.raises(ValueError) as info:
            read_texts(path)
        assert str(info.value).startswith(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} ")
        return
    lines = text.split("\n")
    _, expected = _join(lines[:-1], crlf=False, trailing=True) if lines[-1] == "" else \
        _join(lines, crlf=False, trailing=False)
    _check_read(path, expected)


def test_missing_file_names_it():
    with pytest.raises(FileNotFoundError, match=re.escape(str(_DIR / "nope.txt"))):
        read_texts(_DIR / "nope.txt")


# ----------------------------------------------------------------------------------- .jsonl

_records = st.lists(st.fixed_dictionaries({"text": _any_text},
                                          optional={"title": st.none() | _any_text, "id": st.integers()}),
                    max_size=6)


def _jsonl(records, ensure_ascii: bool, crlf: bool, trailing: bool) -> tuple[bytes, list[str]]:
    lines = [json.dumps(r, ensure_ascii=ensure_ascii) for r in records]
    content, _ = _join(lines, crlf, trailing)
    texts = [f"{r.get('title') or ''} {r['text']}".strip() for r in records]
    return content.encode("utf-8", "surrogatepass"), texts


@FUZZ
@given(records=_records, ensure_ascii=st.booleans(), crlf=st.booleans(), trailing=st.booleans())
@example(records=[{"text": "a \u2028 b\nc\rd"}, {"title": "T", "text": "\x1c"}], ensure_ascii=False, crlf=True,
         trailing=False)
@example(records=[{"text": "x\ud800"}], ensure_ascii=False, crlf=False, trailing=True)
def test_jsonl_one_text_per_record(records, ensure_ascii, crlf, trailing):
    data, texts = _jsonl(records, ensure_ascii, crlf, trailing)
    path = _file("texts.jsonl", data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:                   # a raw lone surrogate (ensure_ascii=False)
        assert not ensure_ascii
        line = data.count(b"\n", 0, e.start) + 1
        with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} ")):
            read_texts(path)
        return
    _check_read(path, texts)


# ------------------------------------------- the reader refuses exactly what the model refuses


@FUZZ
@given(lines=st.lists(_line, max_size=6), records=_records, ensure_ascii=st.booleans())
@example(lines=["fine", "\u200b"], records=[], ensure_ascii=True)
@example(lines=["fine"], records=[{"text": "x\ud800"}], ensure_ascii=True)
def test_reader_refuses_what_the_model_refuses(lines, records, ensure_ascii):
    content, expected = _join(lines, crlf=False, trailing=True)
    got = _check_read(_file("strict.txt", content.encode()), expected, strict=True)
    if got is not None:
        check_texts(got)
    data, texts = _jsonl(records, ensure_ascii, crlf=False, trailing=True)
    if ensure_ascii:
        got = _check_read(_file("strict.jsonl", data), texts, strict=True)
        if got is not None:
            check_texts(got)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=6)
_row = _json | st.fixed_dictionaries({"text": _json}, optional={"title": _json})


@FUZZ
@given(rows=st.lists(_row, min_size=1, max_size=4))
@example(rows=[{"text": "ok"}, ["a list"]])
@example(rows=[{"text": None}])
def test_jsonl_rows_that_are_not_text_objects(rows):
    """Each row must be an object with a string ``text`` (and a string or null ``title``): anything else is a
    ValueError naming the line, never an AttributeError or a text like "None" or "[1, 2]"."""
    path = _file("rows.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    ok = [isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("title"), (str, type(None)))
          and not _model_refuses(f"{r.get('title') or ''} {r['text']}".strip()) for r in rows]
    if all(ok):
        assert read_texts(path) == [f"{r.get('title') or ''} {r['text']}".strip() for r in rows]
    else:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:{ok.index(False) + 1}: "):
            read_texts(path)
