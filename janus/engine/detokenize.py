"""Streaming detokenization: text deltas from tokens as they are decoded, whole characters only.

A byte-level BPE token may end in the middle of a UTF-8 character, and whether a token's text starts
with a space depends on the token before it, so the text of a stream cannot be the tokens' texts one
by one. Torch-free: it needs only the tokenizer's ``decode``.
"""

from __future__ import annotations

from typing import Any, Protocol


class Decoder(Protocol):
    def decode(self, tokens: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalText:
    """Text deltas from tokens as they come: whole characters only, and the deltas (with ``finish()``)
    concatenate to exactly the whole decode.

    A call decodes a short window, not the whole answer: the new tokens plus those of the text sent
    before them (the context that decides a leading space), so the 1000th token costs what the
    first did."""

    def __init__(self, tokenizer: Decoder | Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # windows start here: the tokens of the text sent before the last one
        self.read = 0  # the tokens before this are sent

    def add(self, *tokens: int) -> str:
        """The text that ``tokens`` complete ('' while a character is still cut)."""
        self.tokens.extend(tokens)
        before, after = self._window()
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before) :]

    def finish(self) -> str:
        """The text not sent yet, once no token follows: an answer that stops inside a character ends
        in what its whole decode ends in (replacement characters)."""
        before, after = self._window()
        self.prefix = self.read = len(self.tokens)
        return after[len(before) :] if after.startswith(before) else ""

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (
            decode(self.tokens[self.prefix : self.read], skip_special_tokens=True),
            decode(self.tokens[self.prefix :], skip_special_tokens=True),
        )
