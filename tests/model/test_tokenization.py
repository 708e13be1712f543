"""M3Tokenizer / check_texts on the real XLM-R ``tokenizer.json``, against the ``tokenizers`` library
called directly (no truncation, no padding) and against XLM-R ids known by hand."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from fixtures import long_text, multilingual_texts
from tokenizers import Tokenizer

from bgem3_lib.evaluation.offline_sets import TYDI_LANGS, XQUAD_LANGS, load_tydi, load_xquad_longdoc
from bgem3_lib.model.tokenization import M3Tokenizer, check_texts, text_head
from bgem3_lib.weights.assets import asset_path

BOS, PAD, EOS, UNK = 0, 1, 2, 3


@pytest.fixture(scope="module")
def tok() -> M3Tokenizer:
    return M3Tokenizer.from_file(asset_path("tokenizer.json"))


@pytest.fixture(scope="module")
def ref() -> Tokenizer:
    """The reference: the same file read by ``tokenizers`` itself, nothing cut, nothing padded."""
    t = Tokenizer.from_file(str(asset_path("tokenizer.json")))
    t.no_truncation()
    t.no_padding()
    return t


def test_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 250_002 and tok.pad_id == PAD and tok.n_special == 2
    assert [tok.id_to_token(i) for i in (BOS, PAD, EOS, UNK)] == ["<s>", "<pad>", "</s>", "<unk>"]


def test_known_xlmr_ids(tok):
    # XLM-RoBERTa: "Hello" = 35378, " world" = 8999 (the ids in the Hugging Face model card examples).
    assert tok.encode_ids(["Hello world"], 16) == [[BOS, 35378, 8999, EOS]]
    assert tok.tokens("Hello world") == ["<s>", "▁Hello", "▁world", "</s>"]
    assert tok.encode_ids([""], 8) == [[BOS, EOS]]            # empty text: just the frame
    assert tok.encode_ids("Hello world", 16) == [[BOS, 35378, 8999, EOS]]   # a bare string is one text


def test_ids_match_tokenizers_library_on_multilingual_texts(tok, ref):
    texts = multilingual_texts() + ["", "   ", "\u3000", "\u200b"]      # blank: <s> </s> (encode refuses them)
    ours = tok.encode_ids(texts, 10_000)
    assert len(ours) == len(texts)
    for text, ids in zip(texts, ours):
        expected = ref.encode(text, add_special_tokens=True).ids
        assert ids == expected, text
        assert ids[0] == BOS and ids[-1] == EOS and BOS not in ids[1:-1] and EOS not in ids[1:-1]
        assert ref.encode(text, add_special_tokens=False).ids == ids[1:-1]     # <s> pieces </s>


def test_truncation_keeps_frame_and_warns_with_indices(tok, ref):
    long = long_text("en", 6)
    full = ref.encode(long).ids
    assert len(full) > 600                          # longer than the file's usual 512 (no hidden cap)
    texts = ["short one", long, "another short text", long[::-1]]
    with pytest.warns(UserWarning, match=r"2 text\(s\) longer than max_length=40 .*indices \[1, 3\]"):
        out = tok.encode_ids(texts, 40)
    assert out[0] == ref.encode("short one").ids and out[2] == ref.encode("another short text").ids
    assert out[1] == full[:39] + [EOS] and len(out[1]) == 40
    rev = ref.encode(long[::-1]).ids
    assert out[3] == rev[:39] + [EOS]
    # max_length above the file's customary 512: nothing is cut at 512
    assert tok.encode_ids([long], len(full), warn=False) == [full]
    assert len(tok.encode_ids([long], 700, warn=False)[0]) == min(700, len(full))


def test_exact_fit_is_not_truncated_and_warn_false_is_silent(tok, ref):
    ids = ref.encode("Hello world").ids              # 4 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode_ids(["Hello world"], 4) == [ids]
        assert tok.encode_ids(["Hello world"], 3, warn=False) == [[BOS, 35378, EOS]]
    with pytest.warns(UserWarning, match=r"indices \[0\]"):
        assert tok.encode_ids(["Hello world"], 3) == [[BOS, 35378, EOS]]


def _truncated(ref: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The reference: each whole text tokenized, then cut to ``max_length`` ids keeping ``</s>``."""
    out = []
    for e in ref.encode_batch(texts, add_special_tokens=True):
        out.append(e.ids if len(e.ids) <= max_length else e.ids[: max_length - 1] + [EOS])
    return out


def _tricky_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Texts made of letters and of what sits around a cut: spaces (runs of them, no-break, en, ideographic),
    newlines, tabs, combining marks, characters NFKC expands or joins (ligatures, squared words, a spacing
    diaeresis that becomes space + mark, Hangul jamo), zero-width characters, digits and punctuation."""
    rng = np.random.default_rng(seed)
    pieces = ["word", "é", "e\u0301", "\u0301", " ", "  ", "\u00a0", "\u00a0 ", "\u2002", "\u3000", "\n", "\t",
              "\ufb01", "\u337f", "\u00a8", "\u1100\u1161", "\u200b", "\u00ad", "42", ".", "東京", "ไทย", "हिन्दी",
              "\u0627\u0644", " \u0301", "\u00a8 "]
    return ["".join(rng.choice(pieces, size=int(rng.integers(50, 400)))) for _ in range(n)]


def test_heads_give_the_whole_texts_truncated_ids(tok, ref):
    """encode_ids tokenizes a long text's head (text_head) only: the ids must be those of the whole text cut to
    max_length, on every XQuAD article and paragraph, every TyDi passage and on texts built around the cuts."""
    articles = [d for lang in XQUAD_LANGS for d in load_xquad_longdoc(lang).corpus.values()]
    passages = [p for lang in TYDI_LANGS for p in load_tydi(lang).corpus.values()]
    paragraphs = [p for a in articles for p in a.split("\n\n")]
    cases = [(articles, 128), (articles, 512), (paragraphs, 16), (passages, 32), (_tricky_texts(), 8),
             (_tricky_texts(seed=1), 24)]
    headed = 0
    for texts, max_length in cases:
        heads = [text_head(t, max_length) for t in texts]
        headed += sum(h is not t for h, t in zip(heads, texts))
        assert tok.encode_ids(texts, max_length, warn=False) == _truncated(ref, texts, max_length), max_length
    assert headed > 3000                                            # the heads were taken, not the whole texts


def test_no_letter_or_digit_reads_a_following_space(ref):
    """text_head's premise, on every letter and digit of Unicode (133,547 with Python's isalnum): normalized
    before a space it is normalized alone, then the space, and it never normalizes to a trailing space."""
    norm = ref.normalizer
    chars = [chr(i) for i in range(sys.maxunicode + 1) if not 0xD800 <= i < 0xE000 and chr(i).isalnum()]
    assert len(chars) > 100_000
    bad = [c for c in chars if norm.normalize_str(c + " ") != norm.normalize_str(c) + " "
           or norm.normalize_str(c)[-1:].isspace()]
    assert bad == []
    assert norm.normalize_str("\u00a0 ") == " "                     # what is not a letter or digit may


def test_a_head_never_ends_in_a_space_that_the_text_merges_away(tok, ref):
    """Cut after a no-break space, a head would end in a piece "▁" of its own where the text has "▁b": a cut
    placed so that this piece is the last one kept (3 words of 14 characters, max_length 6, cut from 36)."""
    text = " ".join(["international"] * 3) + "\u00a0 b c d e f g"
    assert text[41] == "\u00a0" and text[42] == " " and ref.encode(text[:42]).tokens[-2:] == ["▁", "</s>"]
    assert tok.encode_ids([text], 6, warn=False) == _truncated(ref, [text], 6)
    assert ref.encode(text).tokens[4] == "▁b"


def test_a_head_that_falls_short_is_tokenized_whole(tok, ref):
    """A head whose characters give fewer than max_length ids (long words, 14 characters a piece): the whole
    text is read after all."""
    text = " ".join(["international administration"] * 40)
    head = text_head(text, 32)
    assert head is not text and len(ref.encode(head).ids) < 32 < len(ref.encode(text).ids)
    assert tok.encode_ids([text, "short"], 32, warn=False) == _truncated(ref, [text, "short"], 32)


def test_more_than_ten_cut_texts_are_elided_in_the_warning(tok):
    with pytest.warns(UserWarning, match=r"12 text\(s\).*indices \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]\.\.\."):
        tok.encode_ids(["one two three four five six"] * 12, 4)


@pytest.mark.parametrize("max_length", [-1, 0, 1, 2])
def test_max_length_without_room_for_text_raises(tok, max_length):
    with pytest.raises(ValueError, match=f"max_length={max_length} leaves no room"):
        tok.encode_ids(["x"], max_length)


def test_pad_shapes_dtypes_and_mask(tok):
    ids = [[0, 5, 6, 7, 2], [0, 9, 2], [0, 2]]
    input_ids, mask = tok.pad(ids)
    assert input_ids.shape == mask.shape == (3, 5)
    assert input_ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(input_ids, [[0, 5, 6, 7, 2], [0, 9, 2, 1, 1], [0, 2, 1, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_batch_is_encode_then_pad(tok, ref):
    texts = ["Hello world", "naïve café", "東京", "Привет мир, как дела?"]
    input_ids, mask = tok.batch(texts, 64)
    refs = [ref.encode(t).ids for t in texts]
    width = max(len(r) for r in refs)
    assert input_ids.shape == mask.shape == (4, width) and input_ids.dtype == mask.dtype == np.int32
    for row, m, r in zip(input_ids, mask, refs):
        assert row[: len(r)].tolist() == r and (row[len(r):] == PAD).all()
        assert m.tolist() == [1] * len(r) + [0] * (width - len(r))


def test_check_texts_accepts_str_list_tuple():
    assert check_texts("a") == ["a"]
    assert check_texts(["a", "b"]) == ["a", "b"]
    out = check_texts(("a", "b"))
    assert out == ["a", "b"] and isinstance(out, list)


@pytest.mark.parametrize("bad, exc, message", [
    (None, TypeError, "got None"),
    ([], ValueError, "empty list"),
    ((), ValueError, "empty list"),
    ({"a": 1}, TypeError, "got dict"),
    (42, TypeError, "got int"),
    (["ok", "fine", None], TypeError, r"texts\[2\] is NoneType"),
    (["ok", 7], TypeError, r"texts\[1\] is int, not str: 7"),
    ([b"bytes"], TypeError, r"texts\[0\] is bytes"),
])
def test_bad_inputs_name_the_problem(tok, bad, exc, message):
    with pytest.raises(exc, match=message):
        check_texts(bad)
    with pytest.raises(exc, match=message):
        tok.encode_ids(bad, 16)
    with pytest.raises(exc, match=message):
        tok.batch(bad, 16)


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        M3Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        M3Tokenizer.from_file(bad)
