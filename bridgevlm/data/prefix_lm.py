"""Prefix-LM samples for an encoder-decoder LLM (BLIP-2 with FlanT5): a source text for the encoder,
where the images go too, and a target text for the decoder.

- Captions: the caption is cut at a random word boundary; the words before the cut follow the
  image into the encoder, the rest is the target (BLIP-2's prefix-LM loss). The cut may fall before
  the first word, which is plain captioning from the image alone.
- Questions (VQA, instructions): the question, in an optional prompt format such as FlanT5's
  "Question: {} Short answer:", goes to the encoder and the answer is the target.

Images come first in the source (as BLIP-2 prepends its query tokens), whatever turn held their
tags. The randomness comes from an explicit `random.Random`, so a data pipeline can seed it per
sample and epoch and get the same split again.

A conversation template decides which: `plain` (caption data) splits captions, any other renders
questions in its turn format ("USER: {} ASSISTANT:", "Question: {} Short answer:"). Inference builds
the encoder prompt with the same functions (`encoder_prompt`, `tokenize_source`), so a prompt equals
the source of the training sample that would answer it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .conversations import PadCollator
from .instructions import without_image_tags
from .templates import (
    IGNORE_INDEX,
    IMAGE_TAG,
    USER_ROLES,
    ConversationError,
    ConversationTemplate,
    ImagePlaceholder,
    split_image_tags,
)


@dataclass(frozen=True)
class PrefixLmText:
    source: str  # the encoder's text, `<image>` tags first
    target: str  # the decoder's


def _roles(messages: Sequence[dict]) -> list[tuple[bool, str]]:
    """(is_user, text) per message."""
    return [(m.get("from", m.get("role")) in USER_ROLES, m.get("value", m.get("content", ""))) for m in messages]


def _turns(messages: Sequence[dict]) -> list[tuple[bool, str]]:
    """(is_user, text) per message; the conversation must end with a reply, the target."""
    turns = _roles(messages)
    if not turns or turns[-1][0]:
        raise ConversationError("a prefix-LM sample needs the conversation to end with a reply: its target")
    return turns


def _image_tags(turns: list[tuple[bool, str]]) -> str:
    return IMAGE_TAG * sum(text.count(IMAGE_TAG) for _, text in turns)


def caption_text(messages: Sequence[dict], rng: random.Random, min_target_words: int = 1) -> PrefixLmText:
    """A caption record (user turn with the image, reply = caption) -> image + caption prefix, and
    the caption's suffix. The cut is uniform over the word boundaries that leave at least
    `min_target_words` words in the target; the user turn's prompt text is dropped (as the `plain`
    template does), only its image tags are kept."""
    turns = _turns(messages)
    words = turns[-1][1].split()
    if min_target_words < 1 or len(words) < min_target_words:
        raise ConversationError(f"a caption of {len(words)} word(s) cannot keep min_target_words "
                                f"{min_target_words} (>= 1) in the target")
    cut = rng.randint(0, len(words) - min_target_words)
    return PrefixLmText(_image_tags(turns) + " ".join(words[:cut]), " ".join(words[cut:]))


def _asking(messages: Sequence[dict]) -> list[tuple[bool, str]]:
    """(is_user, text) per message; the conversation must end with the user turn being answered."""
    turns = _roles(messages)
    if not turns or not turns[-1][0]:
        raise ConversationError("an encoder prompt needs the conversation to end with the user turn being answered")
    return turns


def qa_source(messages: Sequence[dict], prompt: str = "{}", history: int | None = None) -> str:
    """The encoder text for a conversation that ends with the user turn being answered: its images,
    the earlier exchanges (each `prompt.format(question) reply`, one per line; only the last `history`
    of them when given), then the question as `prompt.format(question)`."""
    if "{}" not in prompt:
        raise ValueError(f"prompt {prompt!r} needs a {{}} where the question goes")
    turns = _asking(messages)
    lines, line = [], ""
    for is_user, text in turns[:-1]:
        if is_user:
            line = prompt.format(without_image_tags(text))
        else:
            lines.append(f"{line} {text}")
            line = ""
    kept = lines if history is None else lines[max(len(lines) - history, 0):]
    return _image_tags(turns) + "\n".join(kept + [prompt.format(without_image_tags(turns[-1][1]))])


def qa_text(messages: Sequence[dict], prompt: str = "{}", history: int | None = None) -> PrefixLmText:
    """A question-answer conversation -> image + the user turns (each as `prompt.format(text)`, earlier
    replies after their questions, one exchange per line; see `qa_source`), and the last reply."""
    turns = _turns(messages)
    return PrefixLmText(qa_source(messages[:-1], prompt, history), turns[-1][1])


def question_format(template) -> str:
    """A template's turn format as a question prompt for `qa_text`: "USER: {} ASSISTANT:" for vicuna_v1,
    "Question: {} Short answer:" for blip2_vqa_short. The system sentence is left out: BLIP-2's and
    InstructBLIP's encoder prompts have none, and an encoder need not be told it is an assistant."""
    if not isinstance(template, ConversationTemplate):
        raise ConversationError(f"the {template.name!r} format renders decoder-only chat prompts; an encoder-decoder "
                                f"LLM needs a turn format such as vicuna_v1_nosys or blip2_vqa_short")
    before, after = template.user, template.user_sep + template.assistant
    return before.replace("{", "{{").replace("}", "}}") + "{}" + after.replace("{", "{{").replace("}", "}}")


def encoder_prompt(messages: Sequence[dict], template) -> str:
    """The encoder text for a conversation ending with a user turn, as training builds the source of
    the sample answering it: with `plain` (captions) the images alone (a split before the caption's
    first word), else the conversation in the template's question format."""
    if getattr(template, "plain", False):
        return _image_tags(_asking(messages))
    return qa_source(messages, question_format(template))


@dataclass
class TokenizedPrefixLm:
    input_ids: list[int]  # encoder: source ids, EOS
    labels: list[int]  # decoder targets: target ids, EOS
    num_images: int = 0


def _encoder(tokenizer, encode):
    return encode or (lambda piece: tokenizer(piece, add_special_tokens=False)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_source(tokenizer, source: str, image_placeholder: ImagePlaceholder | None = None,
                    max_source_length: int | None = None, encode=None) -> list[int]:
    """Encoder ids: each `<image>` tag as `image_placeholder` copies, the text, EOS (as T5's tokenizer
    ends every text). Too long a source keeps its beginning and its EOS; one whose images alone do not
    fit is an error, never an image cut in half."""
    encode, eos = _encoder(tokenizer, encode), _eos(tokenizer)
    pieces = [None if piece is None else list(encode(piece)) for piece in split_image_tags(source)]
    if image_placeholder is None and None in pieces:
        raise ConversationError("the source has an <image> tag but no image_placeholder to stand for it")
    ids = image_placeholder.expand(pieces) if image_placeholder else [i for piece in pieces for i in piece]
    images = ids.count(image_placeholder.token_id) if image_placeholder else 0
    if max_source_length is not None and len(ids) + len(eos) > max_source_length:
        ids = ids[:max(max_source_length - len(eos), 0)]
        if image_placeholder and ids.count(image_placeholder.token_id) != images:
            raise ConversationError(f"the source's {images} image token(s) do not fit max_source_length "
                                    f"{max_source_length}")
    return ids + eos


def tokenize_target(tokenizer, target: str, max_target_length: int | None = None, encode=None) -> list[int]:
    """Decoder targets: the text and EOS. No BOS: the decoder start token opens the target. Too long a
    target keeps its beginning and its EOS."""
    encode, eos = _encoder(tokenizer, encode), _eos(tokenizer)
    ids = list(encode(target)) if target else []
    if max_target_length is not None:
        ids = ids[:max(max_target_length - len(eos), 0)]
    if not ids + eos:
        raise ConversationError("the target is empty and the tokenizer has no EOS: nothing would be supervised")
    return ids + eos


def tokenize_prefix_lm(tokenizer, text: PrefixLmText, image_placeholder: ImagePlaceholder | None = None,
                       max_source_length: int | None = None, max_target_length: int | None = None,
                       encode=None) -> TokenizedPrefixLm:
    """Encoder ids (`tokenize_source`) and decoder targets (`tokenize_target`), each ending with EOS as
    T5's tokenizer, and HF's BLIP-2 processor with it, end both."""
    source = tokenize_source(tokenizer, text.source, image_placeholder, max_source_length, encode)
    target = tokenize_target(tokenizer, text.target, max_target_length, encode)
    images = image_placeholder.images_in(source) if image_placeholder else 0
    return TokenizedPrefixLm(source, target, images)


@dataclass
class PrefixLmCollator:
    """Pads prefix-LM samples ({input_ids, labels} of their own lengths, and images as for
    PadCollator): the encoder side as PadCollator does (input_ids, attention_mask [B, T], pixel_values,
    instructions), the targets as `labels` [B, S], right-padded with IGNORE_INDEX. The model shifts
    labels into decoder_input_ids."""

    pad_token_id: int
    processor: object | None = None  # an ImageProcessor
    instruction_pad_token_id: int = 0

    def __call__(self, samples: Sequence[dict]) -> dict:
        encoder = PadCollator(self.pad_token_id, self.processor, self.instruction_pad_token_id)
        # PadCollator pads labels alongside input_ids; the encoder has none, so it is given its ids as stand-ins.
        batch = encoder([{**s, "labels": s["input_ids"]} for s in samples])
        width = max(len(s["labels"]) for s in samples)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            labels[row, :len(sample["labels"])] = torch.as_tensor(sample["labels"])
        batch["labels"] = labels
        return batch
