"""Readers for the community data formats: LLaVA conversation JSON (also its pre-training
caption form), as a JSON list or JSON lines. Every error names the file and the sample."""
from __future__ import annotations

import json
from pathlib import Path


class DataFormatError(ValueError):
    """Malformed data; the message names the file and the sample (or line)."""


def read_records(path: str | Path) -> list[dict]:
    """A JSON list of objects (`.json`) or one object per line (`.jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: malformed JSON line: {error.msg} (column {error.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(records, list):
            raise DataFormatError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: sample {index} is a {type(record).__name__}, expected an object")
    return records


def read_conversations(path: str | Path) -> list[dict]:
    """LLaVA conversation records: {'id', 'image'?, 'conversations': [{'from', 'value'}, ...]}."""
    records = read_records(path)
    for index, record in enumerate(records):
        conversation = record.get("conversations")
        where = f"{path}: sample {index} (id {record.get('id', '?')!r})"
        if not isinstance(conversation, list) or not conversation:
            raise DataFormatError(f"{where} has no 'conversations' list")
        for turn, message in enumerate(conversation):
            if not isinstance(message, dict) or "value" not in message or "from" not in message:
                raise DataFormatError(f"{where}: turn {turn} needs 'from' and 'value'")
        if "image" in record and not isinstance(record["image"], str):
            raise DataFormatError(f"{where}: 'image' must be a path string")
    return records
