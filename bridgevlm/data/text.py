"""Text-only conversation data for language-model training: tokenised samples and their collation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .templates import IGNORE_INDEX, ConversationError, ConversationTemplate, tokenize_conversation


class ConversationDataset(Dataset):
    """Tokenised conversations.

    Only assistant replies are supervised unless `supervise_all` (plain language-model training on
    every token). Lazily by default (instant start-up; worker processes share the work). `pretokenize=True`
    tokenises every distinct segment in one batched call up front, so the training loop needs no
    worker processes competing with it for the CPU.
    """

    def __init__(self, records: Sequence[dict], tokenizer, template: ConversationTemplate, max_length: int,
                 source: str = "<records>", pretokenize: bool = False, supervise_all: bool = False):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.max_length, self.source, self.supervise_all = max_length, source, supervise_all
        self.samples: list[dict] | None = None
        if pretokenize:
            texts = sorted({seg.text for i in range(len(records)) for seg in self._segments(i) if seg.text})
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            table = dict(zip(texts, ids))
            # int32 arrays, not lists of Python ints: a tenth of the memory for large corpora.
            self.samples = [{k: np.asarray(v, dtype=np.int32) for k, v in self._tokenize(i, table.__getitem__).items()}
                            for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index] if self.samples is not None else self._tokenize(index)

    def _segments(self, index: int):
        try:
            return self.template.segments(self.records[index]["conversations"])
        except ConversationError as error:
            raise self._error(index, error) from None

    def _error(self, index: int, error: Exception) -> ConversationError:
        return ConversationError(f"{self.source}: sample {index} (id {self.records[index].get('id', '?')!r}): {error}")

    def _tokenize(self, index: int, encode=None) -> dict:
        record = self.records[index]
        try:
            sample = tokenize_conversation(self.tokenizer, self.template, record["conversations"], self.max_length,
                                           encode=encode)
        except ConversationError as error:
            raise self._error(index, error) from None
        # supervise_all: language-model pretraining on every token, prompts included.
        return {"input_ids": sample.input_ids, "labels": list(sample.input_ids) if self.supervise_all else sample.labels}


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
            ids[row, :n] = torch.as_tensor(sample["input_ids"])
            labels[row, :n] = torch.as_tensor(sample["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
