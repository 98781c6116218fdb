"""Prefix-LM training samples (BLIP-2 / InstructBLIP with an encoder-decoder LLM such as FlanT5) from
LLaVA-format records, with the images and Q-Former instructions a ConversationDataset gives.

- `plain` template (caption data): one sample per record; the caption is split at a random word
  boundary (data/prefix_lm.py), drawn anew each epoch from (seed, epoch, index) alone, so a resumed
  run sees the splits an uninterrupted one would. `set_epoch(epoch)` picks the epoch; the training
  loop calls it before each epoch's workers start.
- Any other template (instructions, QA): one sample per reply. The sample for reply k has the earlier
  exchanges in the encoder, as context, and reply k as target. Every reply is supervised once, given
  what preceded it, as a causal LM's loss on the same conversation does, and a chat at turn k gets the
  prompt its training sample had. (Targeting only the last reply would drop five of the six answers
  of a Shapes instruction conversation.) A mixture's dataset sizes therefore count replies.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from .conversations import ImageSource, check_image_tags, image_fields
from .instructions import InstructionTokenizer
from .prefix_lm import TokenizedPrefixLm, caption_text, qa_text, question_format, tokenize_prefix_lm
from .templates import IGNORE_INDEX, IMAGE_TAG, USER_ROLES, ConversationError


def _is_user(message: dict) -> bool:
    return message.get("from", message.get("role")) in USER_ROLES


class PrefixLmDataset(Dataset):
    """Samples {input_ids (encoder: images, source text, EOS), labels (target, EOS)}, plus `pixels` or
    `features`, `instruction_ids` and `sample_id` when `images` is given, for PrefixLmCollator.

    `max_length` bounds the encoder and the decoder side each. An encoder side that does not fit loses
    its oldest exchanges first (the images and the question being answered stay), then the end of the
    question; a target keeps its beginning. `pretokenize` tokenises question-answer samples up front
    (caption splits change every epoch, so they are always tokenised when read)."""

    def __init__(self, records: Sequence[dict], tokenizer, template, max_length: int, source: str = "<records>",
                 seed: int = 0, pretokenize: bool = False, images: ImageSource | None = None,
                 instructions: InstructionTokenizer | None = None):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.max_length, self.source, self.seed = max_length, source, seed
        self.images, self.instructions = images, instructions
        self.captions = bool(getattr(template, "plain", False))
        self.prompt = None if self.captions else question_format(template)
        self.epoch = 0
        check_image_tags(records, images, self._error)
        self.index = [pair for r in range(len(records)) for pair in self._samples_of(r)]  # (record, messages kept)
        self.samples: list[dict] | None = None
        if pretokenize and not self.captions:
            self.samples = [{k: np.asarray(v, dtype=np.int32) for k, v in self._tokenize(i).items()}
                            for i in range(len(self.index))]

    def set_epoch(self, epoch: int) -> None:
        """Caption splits are drawn from (seed, epoch, index): call before reading an epoch's samples."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> list[int]:
        """Tokens per sample (both sides), estimated from the characters and the image placeholders."""
        per_image = self.images.placeholder.count if self.images else 0
        return [sum(len(m.get("value", "")) for m in messages) // 4
                + per_image * sum(m.get("value", "").count(IMAGE_TAG) for m in messages)
                for messages in map(self._messages, range(len(self)))]

    def modalities(self) -> list[int]:
        """1 for samples with images, 0 for text-only ones."""
        return [int(any(IMAGE_TAG in m.get("value", "") for m in self._messages(i))) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index] if self.samples is not None else self._tokenize(index)
        if self.images is None:
            return sample
        r, _ = self.index[index]
        return dict(sample, **image_fields(self.records[r], r, self._messages(index), self.images, self.instructions,
                                           self.source))

    def supervision_report(self) -> dict:
        """Share of decoder targets among all tokens (encoder and decoder), at epoch 0's caption splits."""
        tokens = supervised = 0
        for index in range(len(self)):
            sample = self.samples[index] if self.samples is not None else self._tokenize(index)
            count = int((np.asarray(sample["labels"]) != IGNORE_INDEX).sum())
            if count == 0:
                raise self._error(self.index[index][0], "has no target token after tokenisation; no loss to learn from")
            tokens += len(sample["input_ids"]) + len(sample["labels"])
            supervised += count
        return {"samples": len(self), "tokens": tokens, "supervised_tokens": supervised,
                "supervised_share": supervised / max(tokens, 1)}

    def _error(self, index: int, error: Exception | str) -> ConversationError:
        return ConversationError(f"{self.source}: sample {index} (id {self.records[index].get('id', '?')!r}): {error}")

    def _messages(self, index: int) -> list[dict]:
        r, end = self.index[index]
        return self.records[r]["conversations"][:end]

    def _samples_of(self, r: int) -> list[tuple[int, int]]:
        """(r, end) for each sample of record r: its conversation up to and including the target reply."""
        messages = self.records[r].get("conversations", [])
        try:
            self.template.segments(messages)  # turns alternate, starting with the user
        except ConversationError as error:
            raise self._error(r, error) from None
        replies = [end for end in range(1, len(messages) + 1) if not _is_user(messages[end - 1])]
        if not replies:
            raise self._error(r, "has no reply, so nothing would be supervised")
        if self.captions and len(replies) > 1:
            raise self._error(r, f"has {len(replies)} replies, but a caption sample (the plain template) is one "
                                 f"user turn with its image and one reply, the caption")
        return [(r, end) for end in replies]

    def _tokenize(self, index: int) -> dict:
        r, end = self.index[index]
        messages = self.records[r]["conversations"][:end]
        try:
            sample = self._caption(index, messages) if self.captions else self._qa(messages)
        except ConversationError as error:
            reply = "" if self.captions else f" (reply {sum(not _is_user(m) for m in messages)})"
            raise self._error(r, f"{error}{reply}") from None
        return {"input_ids": sample.input_ids, "labels": sample.labels}

    def _tokenized(self, text, max_source_length: int | None) -> TokenizedPrefixLm:
        placeholder = self.images.placeholder if self.images else None
        return tokenize_prefix_lm(self.tokenizer, text, placeholder, max_source_length, self.max_length)

    def _caption(self, index: int, messages: list[dict]) -> TokenizedPrefixLm:
        # A string seed is hashed with SHA-512: the same split in every process and Python version.
        rng = random.Random(f"prefix_lm/{self.seed}/{self.epoch}/{index}")
        return self._tokenized(caption_text(messages, rng), self.max_length)

    def _qa(self, messages: list[dict]) -> TokenizedPrefixLm:
        earlier = sum(not _is_user(m) for m in messages[:-1])
        for history in range(earlier, 0, -1):  # drop the oldest exchanges until the encoder side fits
            sample = self._tokenized(qa_text(messages, self.prompt, history), None)
            if len(sample.input_ids) <= self.max_length:
                return sample
        return self._tokenized(qa_text(messages, self.prompt, 0), self.max_length)
