"""Prefixing every user turn with a fixed text, e.g. InstructBLIP's `[Task:Dataset]` tag for the
multitask baseline it compares instruction tuning against."""
from __future__ import annotations

from collections.abc import Sequence

from .templates import IMAGE_TAG, USER_ROLES


def prefix_user_turns(records: Sequence[dict], prefix: str) -> list[dict]:
    """Copies of LLaVA conversation records with `prefix` and a space opening every human turn's
    text (after a leading `<image>` tag and its line break, which stay first). An empty prefix
    returns the records unchanged."""
    if not prefix:
        return list(records)
    return [{**record, "conversations": [_prefixed(turn, prefix) for turn in record["conversations"]]}
            for record in records]


def _prefixed(turn: dict, prefix: str) -> dict:
    if turn["from"] not in USER_ROLES:
        return turn
    value = turn["value"]
    lead = ""
    if value.startswith(IMAGE_TAG):
        lead, value = IMAGE_TAG, value[len(IMAGE_TAG):]
        if value.startswith("\n"):
            lead, value = lead + "\n", value[1:]
    return {**turn, "value": f"{lead}{prefix} {value}"}
