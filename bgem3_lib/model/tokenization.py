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
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
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
