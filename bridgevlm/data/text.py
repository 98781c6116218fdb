"""Text-only conversation data for language-model training: tokenised samples and their collation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .templates import IGNORE_INDEX, ConversationError, ConversationTemplate, tokenize_conversation


class ConversationDataset(Dataset):
    """Conversations tokenised lazily (so start-up is instant and worker processes share the work)."""

    def __init__(self, records: Sequence[dict], tokenizer, template: ConversationTemplate, max_length: int,
                 source: str = "<records>"):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.max_length, self.source = max_length, source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            sample = tokenize_conversation(self.tokenizer, self.template, record["conversations"], self.max_length)
        except ConversationError as error:
            raise ConversationError(f"{self.source}: sample {index} (id {record.get('id', '?')!r}): {error}") from None
        return {"input_ids": sample.input_ids, "labels": sample.labels}


@dataclass
class PadCollator:
    """Right-pads a batch for training; labels are padded with IGNORE_INDEX."""

    pad_token_id: int

    def __call__(self, samples: Sequence[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n] = torch.tensor(sample["input_ids"])
            labels[row, :n] = torch.tensor(sample["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
