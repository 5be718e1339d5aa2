"""IncrementalDetokenizer with a real byte-level BPE: UTF-8 safety, stop strings, hold-back."""

import pytest

from jaxserve.engine import SamplingParams
from jaxserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "hello world, 日本語のテキスト 😀🎉 naïve café",
    "привет мир 🚀🚀 rockets",
    "emoji😀😃 mixed with 東京 and brûlée",
]


def _stream(tokenizer, ids, params, prompt=(1, 2)):
    """Feed ids one at a time; returns (visible texts after each token, detokenizer, stop)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), params)
    texts, stop = [], None
    for i, t in enumerate(ids):
        stop = detok.add_token(t)
        finished = stop is not None or i == len(ids) - 1
        if finished and stop is None:
            stop = detok.flush()
        texts.append(detok.visible_text(finished))
        if stop is not None:
            break
    return texts, detok, stop


def test_tokenizer_splits_multibyte_chars(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    assert "\ufffd" in tokenizer.decode(ids[:1])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode_and_never_emits_broken_chars(tokenizer, text):
    ids = tokenizer.encode(text)
    texts, detok, _ = _stream(tokenizer, ids, SamplingParams())
    assert texts[-1] == tokenizer.decode(ids) == text
    for prev, cur in zip(texts, texts[1:]):
        assert cur.startswith(prev)
    assert all("\ufffd" not in t for t in texts)


def test_dangling_bytes_are_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ab 😀")[:-1]  # cut inside the emoji
    texts, _, _ = _stream(tokenizer, ids, SamplingParams())
    assert texts[-1] == tokenizer.decode(ids)
    assert "\ufffd" not in texts[-2]


def test_skip_special_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("hello") + [eos] + tokenizer.encode(" world")
    texts, _, _ = _stream(tokenizer, ids, SamplingParams())
    assert texts[-1] == "hello world"
    texts, _, _ = _stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert texts[-1] == "hello<eos> world"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_and_never_leaks(tokenizer, include):
    text = "the quick brown fox jumps over the lazy dog. stop here please!"
    ids = tokenizer.encode(text)
    params = SamplingParams(stop=["stop here", "zebra"], include_stop_str_in_output=include)
    texts, _, stop = _stream(tokenizer, ids, params)
    assert stop == "stop here"
    expected = "the quick brown fox jumps over the lazy dog. " + ("stop here" if include else "")
    assert texts[-1] == expected
    for t in texts:  # every cumulative text is a prefix of the final one
        assert expected.startswith(t)


def test_stop_string_spanning_tokens_and_multibyte(tokenizer):
    text = "emoji time 😀😃🎉 and more"
    ids = tokenizer.encode(text)
    texts, _, stop = _stream(tokenizer, ids, SamplingParams(stop=["😃🎉"]))
    assert stop == "😃🎉" and texts[-1] == "emoji time 😀"
    assert all("emoji time 😀".startswith(t) for t in texts)


def test_hold_back_releases_text_that_is_not_a_stop(tokenizer):
    ids = tokenizer.encode("the end. The end.")
    texts, _, stop = _stream(tokenizer, ids, SamplingParams(stop=["The end!"]))
    assert stop is None and texts[-1] == "the end. The end."
    # while running, a suffix that may begin "The end!" was held back
    assert any(len(t) < len(tokenizer.decode(ids[:i + 1])) for i, t in enumerate(texts[:-1]))


def test_stop_strings_ignored_before_min_tokens(tokenizer):
    ids = tokenizer.encode("stop here stop here")
    params = SamplingParams(stop=["stop"], min_tokens=len(tokenizer.encode("stop here")) + 1)
    texts, _, stop = _stream(tokenizer, ids, params)
    assert stop == "stop" and texts[-1] == "stop here "


def _token_ending_in_partial_char(tokenizer) -> tuple[int, str]:
    """A vocab token decoding to ASCII letters followed by an incomplete UTF-8 character."""
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if len(s) >= 3 and s.endswith("\ufffd") and s[:-1].isascii() and s[:-1].isalpha():
            return i, s[:-1]
    raise AssertionError("tokenizer has no letters+partial-character token")


@pytest.mark.parametrize("min_tokens", [0, 3])
def test_stop_string_in_text_flushed_at_the_end_is_found(tokenizer, min_tokens):
    """Text held back for an incomplete character and flushed when the sequence ends is
    searched for stop strings too (issue 9, item 12)."""
    tid, letters = _token_ending_in_partial_char(tokenizer)
    ids = tokenizer.encode("hello ") + [tid]
    texts, detok, stop = _stream(tokenizer, ids, SamplingParams(stop=[letters],
                                                                min_tokens=min_tokens))
    assert stop == letters and detok.stopped
    assert texts[-1] == "hello "
