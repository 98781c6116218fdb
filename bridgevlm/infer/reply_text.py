"""A reply's text as its tokens arrive: what can be shown so far, cut at the first stop string.

Decoding token by token is not decoding the whole: a multi-byte character may span tokens, and the
tail of the text may be the start of a stop string that the next token completes. So the whole reply is
decoded again at each token, and a piece is released only once it is final: never half a character,
never text that a stop string may yet swallow.
"""
from __future__ import annotations

from collections.abc import Sequence

from .generate import cut_at_stop


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class ReplyText:
    """`push(token)` returns the newly final text; `finish()` the rest once generation ends."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # the reply so far, cut at a stop string
        self.shown = ""  # the part of it released
        self.stopped = False  # a stop string ended the reply

    def push(self, token: int) -> str:
        self.tokens.append(token)
        # lstrip: templates put a space between the role marker and the reply
        self.text, self.stopped = cut_at_stop(
            self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip(), self.stop)
        if self.stopped:
            return self.finish()
        if self.text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        final = self.text[:len(self.text) - _stop_prefix_length(self.text, self.stop)]
        return self._release(final)

    def finish(self) -> str:
        """Everything not yet released (the reply is over, so nothing is held back any more)."""
        return self._release(self.text)

    def _release(self, final: str) -> str:
        if len(final) <= len(self.shown):
            return ""
        piece, self.shown = final[len(self.shown):], final
        return piece
