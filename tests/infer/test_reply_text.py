"""Releasing a reply's text token by token: never half a character, never text a stop string may swallow."""
from __future__ import annotations

from bridgevlm.infer.reply_text import ReplyText


class ByteTokenizer:
    """One token per UTF-8 byte, decoded as a HF tokenizer does (invalid bytes as U+FFFD)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(text: str, stop=()):
    reply = ReplyText(ByteTokenizer(), stop)
    pieces = []
    for byte in text.encode():
        pieces.append(reply.push(byte))
        if reply.stopped:
            break
    return reply, pieces, pieces + [reply.finish()]


def test_pieces_add_up_and_wait_for_whole_characters():
    reply, pieces, everything = _feed(" héllo wörld")
    assert "".join(everything) == "héllo wörld" == reply.shown  # the leading space goes
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[2] == "" and pieces[3] == "é"  # the first byte of é waits for the second


def test_a_stop_string_ends_the_reply_and_its_start_is_held_back():
    reply, pieces, everything = _feed("yes</s>ignored", stop=["</s>"])
    assert reply.stopped and "".join(everything) == "yes"
    assert pieces[:4] == ["y", "e", "s", ""]  # "<" could start the stop string: held back
    reply, _, everything = _feed("a<b", stop=["</s>"])
    assert not reply.stopped and "".join(everything) == "a<b"  # released once it cannot be a stop string
    _, pieces, everything = _feed("ab<", stop=["</s>"])
    assert "".join(pieces) == "ab" and "".join(everything) == "ab<"  # the end of the reply releases the rest
