"""Tokenization on the ``tokenizers`` library: the XLM-R sentencepiece vocabulary (250,002 pieces).

``M3Tokenizer.batch(texts, max_length)`` returns padded ``input_ids`` / ``attention_mask``
arrays ``[B, L]`` (int32), ``L`` the longest sequence in the batch. Every sequence is
``<s> pieces </s>``, truncated so the whole thing fits in ``max_length`` (a warning names
the texts that were cut).

>>> tok = M3Tokenizer.from_file(asset_path("tokenizer.json"))   # doctest: +SKIP
>>> tok.encode_ids(["Hello world"], 16)                            # doctest: +SKIP
[[0, 35378, 8999, 2]]
"""
from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from ..weights.assets import asset_path

# Characters that carry no content: separators (Zs: spaces incl. U+3000, Zl, Zp), controls (Cc: tab,
# newline, ...) and format characters (Cf: zero-width space / joiners, BOM, soft hyphen).
_BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def is_blank(text: str) -> bool:
    """True when ``text`` has no character outside spaces, separators, controls and zero-width / format
    characters: ``""``, ``"   "``, ``"\u3000"``, ``"\u200b\n"``. The tokenizer turns such a text into
    ``<s> </s>`` alone, an embedding of nothing.

    >>> [is_blank(t) for t in ["", " \\t\\n", "\u200b\ufeff", "\u3000", "x", " . "]]
    [True, True, True, True, False, False]
    """
    return all(unicodedata.category(c) in _BLANK_CATEGORIES for c in text)


def check_texts(texts, allow_blank: bool = False) -> list[str]:
    """Validate user input: a non-empty list of strings (a single string is wrapped). Each must be valid
    Unicode (no lone surrogate) and, unless ``allow_blank``, hold content (:func:`is_blank` is False):
    an empty, whitespace-only or zero-width-only text is refused with its index.

    >>> check_texts(["ok", " \u200b "])
    Traceback (most recent call last):
    ...
    ValueError: texts[1] is blank (empty, whitespace or zero-width characters only): nothing to encode
    """
    if isinstance(texts, str):
        texts = [texts]
    if texts is None:
        raise TypeError("texts must be a string or a list of strings, got None")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is an empty list: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str: {t!r:.80}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"texts[{i}] holds a lone surrogate at character {e.start} "
                             f"({t[e.start]!r}): not valid Unicode text") from None
        if not allow_blank and is_blank(t):
            raise ValueError(f"texts[{i}] is blank (empty, whitespace or zero-width characters only): "
                             "nothing to encode")
    return list(texts)


# Characters a text's head is given per kept piece before it is cut (XLM-R pieces average 2-4 characters in the
# scripts of the shared data sets; a head that still falls short is tokenized whole).
HEAD_CHARS_PER_PIECE = 6


def text_head(text: str, max_length: int) -> str:
    """The start of ``text`` that truncation to ``max_length`` pieces keeps, with room to spare: cut before the
    first ASCII space after ``HEAD_CHARS_PER_PIECE * max_length`` characters that follows a letter or digit,
    or ``text`` itself (the same object) when it is no longer than that or has no such space there.

    Such a cut loses nothing the kept pieces depend on: the normalizer maps characters one by one (no rule of
    the XLM-R charsmap reads a letter or digit together with a following space), a head ending in a letter or
    digit gains no trailing space (a space after a no-break space would: ``"a\u00a0 b"`` normalizes to
    ``"a b"``, its head ``"a\u00a0"`` to ``"a "``), and the Metaspace pre-tokenizer splits at every space, so
    the Unigram model cuts each word alone. The head's pieces are therefore the text's first pieces; when the
    head yields at least ``max_length`` ids (``<s> pieces </s>``), the truncated ids are the whole text's, and
    the tokenizer has read a fraction of a long document (``tests/model/test_tokenization.py`` checks this
    against the whole text on the shared data sets and on texts made of spaces, marks and separators).

    >>> text_head("one two three four", 2)                     # 12 characters, then the next space
    'one two three'
    >>> text_head("one two thre\u0301 four", 2)                 # not after a combining mark
    'one two thré four'
    >>> s = "short"; text_head(s, 128) is s
    True
    """
    at = HEAD_CHARS_PER_PIECE * max_length
    if len(text) <= at:
        return text
    while True:
        at = text.find(" ", at)
        if at < 0:
            return text
        if text[at - 1].isalnum():
            return text[:at]
        at += 1


class M3Tokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_id: int = 1):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id = pad_id
        self.vocab_size = tokenizer.get_vocab_size()
        self.n_special = tokenizer.num_special_tokens_to_add(False)

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "M3Tokenizer":
        path = Path(path) if path is not None else asset_path("tokenizer.json")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {exc}") from None

    def encode_ids(self, texts: Sequence[str], max_length: int, warn: bool = True) -> list[list[int]]:
        """Token ids per text, each ``<s> ... </s>`` and at most ``max_length`` long (a blank text gives
        ``<s> </s>``: refusing it is the caller's choice)."""
        texts = check_texts(texts, allow_blank=True)
        if max_length < self.n_special + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text (needs > {self.n_special})")
        heads = [text_head(t, max_length) for t in texts]
        encs = self._tok.encode_batch(heads, add_special_tokens=True)
        short = [i for i, (h, t, e) in enumerate(zip(heads, texts, encs)) if h is not t and len(e.ids) < max_length]
        if short:                   # a head that falls short of max_length: the whole text after all
            for i, e in zip(short, self._tok.encode_batch([texts[i] for i in short], add_special_tokens=True)):
                encs[i] = e
        out, cut = [], []
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [ids[-1]]   # keep the closing </s>
                cut.append(i)
            out.append(ids)
        if cut and warn:
            warnings.warn(f"{len(cut)} text(s) longer than max_length={max_length} tokens were truncated "
                          f"(indices {cut[:10]}{'...' if len(cut) > 10 else ''})", stacklevel=3)
        return out

    def pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest: ``input_ids`` [B, L] and ``attention_mask`` [B, L] int32."""
        length = max(len(x) for x in ids)
        input_ids = np.full((len(ids), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=np.int32)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return input_ids, mask

    def batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.encode_ids(texts, max_length))

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept (as ``transformers``' ``decode`` does by default)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def tokens(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=True).tokens
