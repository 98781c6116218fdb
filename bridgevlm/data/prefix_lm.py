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
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .conversations import PadCollator
from .instructions import without_image_tags
from .templates import IGNORE_INDEX, IMAGE_TAG, ConversationError, ImagePlaceholder, split_image_tags


@dataclass(frozen=True)
class PrefixLmText:
    source: str  # the encoder's text, `<image>` tags first
    target: str  # the decoder's


def _turns(messages: Sequence[dict]) -> list[tuple[bool, str]]:
    """(is_user, text) per message; the conversation must end with a reply, the target."""
    turns = [(m.get("from", m.get("role")) in ("human", "user"), m.get("value", m.get("content", "")))
             for m in messages]
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


def qa_text(messages: Sequence[dict], prompt: str = "{}") -> PrefixLmText:
    """A question-answer conversation -> image + the user turns (each as `prompt.format(text)`, earlier
    replies after their questions, one exchange per line), and the last reply."""
    if "{}" not in prompt:
        raise ValueError(f"prompt {prompt!r} needs a {{}} where the question goes")
    turns = _turns(messages)
    lines, line = [], ""
    for is_user, text in turns[:-1]:
        if is_user:
            line = prompt.format(without_image_tags(text))
        else:
            lines.append(f"{line} {text}")
            line = ""
    return PrefixLmText(_image_tags(turns) + "\n".join(lines + [line]), turns[-1][1])


@dataclass
class TokenizedPrefixLm:
    input_ids: list[int]  # encoder: source ids, EOS
    labels: list[int]  # decoder targets: target ids, EOS
    num_images: int = 0


def tokenize_prefix_lm(tokenizer, text: PrefixLmText, image_placeholder: ImagePlaceholder | None = None,
                       max_source_length: int | None = None, max_target_length: int | None = None,
                       encode=None) -> TokenizedPrefixLm:
    """Encoder ids (each `<image>` tag as `image_placeholder` copies, the text, EOS) and decoder targets
    (the text, EOS), as T5's tokenizer, and HF's BLIP-2 processor with it, end both. No BOS: the
    decoder start token opens the target. Too long a source or target keeps its beginning and its EOS;
    a source whose images alone do not fit is an error, never an image cut in half."""
    encode = encode or (lambda piece: tokenizer(piece, add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    source = []
    for piece in split_image_tags(text.source):
        if piece is not None:
            source += encode(piece)
        elif image_placeholder is not None:
            source += [image_placeholder.token_id] * image_placeholder.count
        else:
            raise ConversationError("the source has an <image> tag but no image_placeholder to stand for it")
    target = list(encode(text.target)) if text.target else []
    images = source.count(image_placeholder.token_id) if image_placeholder else 0
    if max_source_length is not None and len(source) + len(eos) > max_source_length:
        source = source[:max(max_source_length - len(eos), 0)]
        if image_placeholder and source.count(image_placeholder.token_id) != images:
            raise ConversationError(f"the source's {images} image token(s) do not fit max_source_length "
                                    f"{max_source_length}")
    if max_target_length is not None:
        target = target[:max(max_target_length - len(eos), 0)]
    if not target + eos:
        raise ConversationError("the target is empty and the tokenizer has no EOS: nothing would be supervised")
    return TokenizedPrefixLm(source + eos, target + eos, images // image_placeholder.count if images else 0)


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
