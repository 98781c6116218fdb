"""Instructions for an instruction-aware Q-Former (InstructBLIP): which text goes with each image, and
how it is tokenised with the Q-Former's own tokenizer.

Training: an image's instruction is the turn that carries its `<image>` tag, without the tag.
Inference: every image of a prompt gets the user turn being answered, so in a chat the Q-Former
extracts what the current question needs. InstructBLIP trains and evaluates single-turn prompts,
where the two rules pick the same text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .captions import pad_texts
from .templates import IMAGE_TAG, USER_ROLES, without_image_tags


def _text(message: dict) -> str:
    return message.get("value", message.get("content", ""))


def _is_user(message: dict) -> bool:
    return message.get("from", message.get("role")) in USER_ROLES


def image_instructions(messages: Sequence[dict]) -> list[str]:
    """One instruction per `<image>` tag, in reading order: the text of the turn carrying the tag."""
    return [without_image_tags(_text(m)) for m in messages for _ in range(_text(m).count(IMAGE_TAG))]


def current_instruction(messages: Sequence[dict]) -> str:
    """The last user turn, without image tags: the question a reply is being generated for."""
    users = [m for m in messages if _is_user(m)]
    if not users:
        raise ValueError("a prompt needs a user turn to take the Q-Former's instruction from")
    return without_image_tags(_text(users[-1]))


@dataclass
class InstructionTokenizer:
    """Text -> Q-Former input ids: start token, text, end token, as stage 1 tokenised captions.

    The start and end tokens are the tokenizer's BOS/EOS, or BERT's [CLS]/[SEP] where it has no
    BOS/EOS (what `qformer_tokenizer(text)` gives for HF InstructBLIP's BERT tokenizer). Longer
    instructions keep their first `max_length - 2` text tokens, between the start and end tokens
    (as a tokenizer call with truncation=True, LAVIS's, does): the request opening an instruction
    is kept, a long tail is cut."""

    tokenizer: object
    max_length: int

    def __post_init__(self):
        tok = self.tokenizer
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else getattr(tok, "cls_token_id", None)
        self.end_id = tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)
        if self.start_id is None or self.end_id is None:
            raise ValueError("the Q-Former's tokenizer has neither BOS/EOS nor [CLS]/[SEP] tokens to open and close "
                             "an instruction")
        if self.max_length < 2:
            raise ValueError(f"instruction_max_length is {self.max_length}; it must leave room for the start and "
                             f"end tokens (>= 2)")

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad  # padded positions are masked out either way

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length - 2]
        return [self.start_id, *ids, self.end_id]


def pad_instructions(instructions: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One id list per image -> `qformer_input_ids`, `qformer_attention_mask` [I, Tq], right-padded."""
    ids, mask = pad_texts(instructions, pad_token_id)
    return {"qformer_input_ids": ids, "qformer_attention_mask": mask}
