"""Answering with a loaded vision-language model: prompts with images in, text out, batched.

A Q-Former that reads instructions (InstructBLIP) gets, with every image of a prompt, the user turn
being answered (data/instructions.py), so the visual tokens are extracted for the current question.
An encoder-decoder LLM (FlanT5) reads the prompt its training samples' encoder side had
(data/prefix_lm.py); its decoder writes the reply.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..data.instructions import current_instruction, pad_instructions
from ..data.prefix_lm import encoder_prompt, tokenize_source
from ..data.templates import IMAGE_TAG, ConversationTemplate, get_template, tokenize_conversation
from ..models.assemble import LoadedVlm
from .generate import GenerationConfig, generate, left_pad, stream_tokens
from .reply_text import ReplyText


def prompt_ids(loaded: LoadedVlm, template: ConversationTemplate, messages: list[dict]) -> list[int]:
    """A conversation ending with a user turn -> the prompt's ids, image placeholders included: what
    precedes the reply (causal LLM), or the encoder's input, built as training built its source
    (encoder-decoder LLM)."""
    if loaded.model.llm.is_encoder_decoder:
        return tokenize_source(loaded.tokenizer, encoder_prompt(messages, template), loaded.placeholder)
    return tokenize_conversation(loaded.tokenizer, template, messages, add_generation_prompt=True,
                                 image_placeholder=loaded.placeholder).input_ids


def prepare_prompts(loaded: LoadedVlm, template: ConversationTemplate, conversations: Sequence[list[dict]],
                    images: Sequence[Sequence[Image.Image]]) -> dict:
    """Left-padded prompt ids, mask and pixel values for conversations that end with a user turn.
    `images[i]` are conversation i's images, in the order of its `<image>` tags. For a connector that
    reads instructions, also `qformer_input_ids` / `qformer_attention_mask` [I, Tq]: each image's
    conversation's last user turn."""
    rows = [prompt_ids(loaded, template, c) for c in conversations]
    for index, (row, imgs) in enumerate(zip(rows, images)):
        tags = loaded.placeholder.images_in(row)
        if tags != len(imgs):
            raise ValueError(f"prompt {index} has {tags} {IMAGE_TAG} tag(s) but {len(imgs)} image(s)")
    ids, mask = left_pad(rows, loaded.tokenizer.pad_token_id)
    flat = [img for imgs in images for img in imgs]
    pixels = loaded.processor.batch(flat) if flat else None
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    instructions = loaded.instruction_tokenizer() if flat else None
    if instructions is not None:
        per_image = [instructions.encode(current_instruction(conversation))
                     for conversation, imgs in zip(conversations, images) for _ in imgs]
        batch.update(pad_instructions(per_image, instructions.pad_token_id))
    return batch


@dataclass
class EmbeddedPrompts:
    """Prompts as the LLM reads them: embeddings [B, T, D] (visual tokens spliced in), mask [B, T], and
    the in-LLM connector's context (None for an input-level connector)."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    context: object | None
    lengths: list[int]  # each prompt's tokens, visual tokens included


@torch.no_grad()
def embed_prompts(loaded: LoadedVlm, template: ConversationTemplate, conversations: Sequence[list[dict]],
                  images: Sequence[Sequence[Image.Image]]) -> EmbeddedPrompts:
    """Conversations ending with a user turn (and their images) -> what generation starts from."""
    batch = prepare_prompts(loaded, template, conversations, images)
    model = loaded.model.eval()
    device = next(model.parameters()).device
    pixels = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    instructions = {key: batch[key].to(device) for key in ("qformer_input_ids", "qformer_attention_mask") if key in batch}
    embeds, context = model.prepare(batch["input_ids"].to(device), pixels, **instructions)
    mask = batch["attention_mask"].to(device)
    return EmbeddedPrompts(embeds, mask, context, mask.sum(-1).tolist())


@torch.no_grad()
def answer(loaded: LoadedVlm, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
           cfg: GenerationConfig | None = None, template: ConversationTemplate | None = None,
           batch_size: int = 32) -> list[str]:
    """Replies to each conversation (batched with left padding; equal to one-at-a-time replies)."""
    cfg = cfg or GenerationConfig()
    template = template or get_template(loaded.config.template, loaded.tokenizer)
    model = loaded.model
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = embed_prompts(loaded, template, conversations[start:start + batch_size], images[start:start + batch_size])
        out = generate(model.llm.model, prompts.embeds, prompts.attention_mask, cfg, loaded.tokenizer.eos_token_id,
                       loaded.tokenizer, context=prompts.context)
        replies += [t.strip() for t in out.texts]
    return replies


@dataclass
class Chat:
    """A multi-turn conversation about one image: `chat.ask("...")`, `chat.stream("...")`, `chat.reset()`."""

    loaded: LoadedVlm
    image: Image.Image | None = None
    cfg: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=128))
    template: ConversationTemplate | None = None
    messages: list[dict] = field(default_factory=list)

    def reset(self, image: Image.Image | None = None) -> None:
        """Forget the conversation; with an image, the next question is about it."""
        self.messages = []
        if image is not None:
            self.image = image

    def ask(self, text: str) -> str:
        return "".join(self.stream(text))

    @torch.no_grad()
    def stream(self, text: str) -> Iterator[str]:
        """Yield the reply in pieces as tokens are generated, then remember it."""
        if not self.messages and self.image is not None and IMAGE_TAG not in text:
            text = f"{IMAGE_TAG}\n{text}"
        messages = self.messages + [{"from": "human", "value": text}]
        images = [self.image] if self.image is not None and IMAGE_TAG in messages[0]["value"] else []
        loaded, template = self.loaded, self.template or get_template(self.loaded.config.template, self.loaded.tokenizer)
        prompts = embed_prompts(loaded, template, [messages], [images])
        model, tokenizer = loaded.model, loaded.tokenizer
        reply = ReplyText(tokenizer, self.cfg.stop)
        for ids in stream_tokens(model.llm.model, prompts.embeds, prompts.attention_mask, self.cfg,
                                 tokenizer.eos_token_id, context=prompts.context):
            token = int(ids[0])
            if token == tokenizer.eos_token_id:
                break
            piece = reply.push(token)
            if piece:
                yield piece
            if reply.stopped:
                break
        rest = reply.finish()
        if rest:
            yield rest
        self.messages = messages + [{"from": "gpt", "value": reply.shown.strip()}]


def chat(loaded: LoadedVlm, image: Image.Image | None, text: str, **generation) -> str:
    """One question about one image: `chat(model, Image.open(p), "What is in this picture?")`."""
    return Chat(loaded, image, GenerationConfig(**generation) if generation else GenerationConfig()).ask(text)
