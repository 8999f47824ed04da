"""Streaming detokenization (``janus.engine.detokenize``): text deltas from tokens as they come, whole
characters only, that concatenate to exactly the whole decode."""

from __future__ import annotations

import numpy as np
import pytest

from janus.engine.detokenize import IncrementalText

pytestmark = pytest.mark.timeout(120)


class Bytes:
    """A byte-level tokenizer: each token one byte."""

    @staticmethod
    def decode(tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_half_characters_are_held_back():
    text = IncrementalText(Bytes())
    deltas = [text.add(b) for b in "né ✓".encode()]
    assert deltas == ["n", "", "é", " ", "", "", "✓"] and "".join(deltas) == "né ✓"


def test_several_tokens_at_once_and_an_answer_that_stops_inside_a_character():
    check = "✓".encode()  # three bytes
    text = IncrementalText(Bytes())
    assert text.add(*b"ab", check[0]) == ""  # a hand-over that ends inside a character waits whole
    assert text.add(check[1], check[2]) == "ab✓"
    assert text.add(*b" x", check[0]) == ""
    # no token follows: the answer ends in what its whole decode ends in
    assert text.finish() == Bytes.decode([*b" x", check[0]])
    assert text.finish() == ""  # nothing is sent twice


def test_deltas_concatenate_to_the_whole_decode_with_the_shipped_tokenizer():
    """Windowed decoding (each token decodes the text since the previous delta plus its context) gives
    exactly the answer's whole decode, for the tokenizers the models ship, spaces and specials included."""
    from janus.models import VLChatProcessor
    from pipeline.model_ref import resolve_model_ref

    tokenizer = VLChatProcessor.from_pretrained(resolve_model_ref("shapes")).tokenizer
    rng = np.random.default_rng(0)
    words = tokenizer.encode(" a red circle on the left, blue background. é ✓", add_special_tokens=False)
    for trial in range(20):
        if trial % 2:
            ids = rng.integers(0, len(tokenizer), 60).tolist()  # anything, specials and byte pieces too
        else:
            ids = words * 3
        text = IncrementalText(tokenizer)
        deltas = [text.add(t) for t in ids] + [text.finish()]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), (trial, deltas)
