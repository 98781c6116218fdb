"""Conversation templates, and token ids + labels built by tokenising segments.

LLaVA derives its label masks by length arithmetic over a re-tokenised prompt, which silently
zeroes the loss when the tokenizer merges across a boundary. Here the token sequence *is* the
concatenation of separately tokenised segments, each marked supervised or not, so labels can never
disagree with the ids. Training and generation render prompts with the same segments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
USER_ROLES = ("human", "user")  # how a user turn's `from` is spelt: LLaVA's and the chat-message form
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


_TAG = re.compile(rf"\s*{re.escape(IMAGE_TAG)}\s*")


def without_image_tags(text: str) -> str:
    """'<image>\\nWhat colour is it?' -> 'What colour is it?' (a tag and the space around it go)."""
    return _TAG.sub(" ", text).strip()


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training sample; the message names the sample."""


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool
    eos: bool = False  # append the tokenizer's end-of-sequence id after the text (supervised with it)


@dataclass(frozen=True)
class ConversationTemplate:
    """A role-prefixed chat format such as vicuna_v1:

        {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

    `plain` keeps only the image of the first user turn and supervises the reply (LLaVA's
    feature-alignment format).
    """

    name: str
    system: str = ""
    system_sep: str = " "
    user: str = "USER: "
    assistant: str = "ASSISTANT:"
    user_sep: str = " "
    answer_prefix: str = " "
    plain: bool = False
    add_bos: bool = True  # start with the tokenizer's BOS id (a chat template renders its own)
    # Move a user turn's images ahead of its text, as BLIP-2's zero-shot prompts do
    # ("<image>Question: {} Answer:"), wherever the data puts the tags.
    image_first: bool = False

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """Render messages ({'from': 'human'|'gpt', 'value'}) as segments. With
        `add_generation_prompt`, the last message must be a user turn and the result ends where
        the assistant's reply begins."""
        turns = _normalise(messages)
        if self.plain:
            return self._plain_segments(turns, add_generation_prompt)
        segments: list[Segment] = []
        prefix = self.system + self.system_sep if self.system else ""
        for role, text in turns:
            if role == "human":
                images = ""
                if self.image_first:
                    images, text = IMAGE_TAG * text.count(IMAGE_TAG), without_image_tags(text)
                segments.append(Segment(images + prefix + self.user + text + self.user_sep + self.assistant, False))
                prefix = ""
            else:
                segments.append(Segment(self.answer_prefix + text, True, eos=True))
        if add_generation_prompt and (not turns or turns[-1][0] != "human"):
            raise ConversationError("a generation prompt needs the conversation to end with a user turn")
        return segments

    def _plain_segments(self, turns, add_generation_prompt: bool) -> list[Segment]:
        # Only the image placeholder of the user turn survives: the reply is learnt from the image alone.
        segments: list[Segment] = []
        for role, text in turns:
            if role == "human":
                segments.append(Segment(IMAGE_TAG if IMAGE_TAG in text else "", False))
            else:
                segments.append(Segment(text, True, eos=True))
        return segments


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate("vicuna_v1", system=VICUNA_SYSTEM),
    # vicuna_v1's turn format without the system sentence: small models need not spend tokens on it.
    "vicuna_v1_nosys": ConversationTemplate("vicuna_v1_nosys"),
    "plain": ConversationTemplate("plain", plain=True),
    # BLIP-2's zero-shot VQA prompts: "Question: {} Answer:" (OPT) and "Question: {} Short answer:"
    # (FlanT5, and InstructBLIP's short-answer prompt), the image's query tokens first.
    "blip2_vqa": ConversationTemplate("blip2_vqa", user="Question: ", assistant="Answer:", image_first=True),
    "blip2_vqa_short": ConversationTemplate("blip2_vqa_short", user="Question: ", assistant="Short answer:",
                                            image_first=True),
    # InstructBLIP's training format: the queries, then the instruction exactly as the data words it
    # (its templates carry the task), then the answer.
    "blip2_instruction": ConversationTemplate("blip2_instruction", user="", assistant="", user_sep="",
                                              image_first=True),
}


CHAT_TEMPLATE = "chat_template"  # the name that selects the tokenizer's own chat template


class TokenizerChatTemplate:
    """A conversation format driven by a tokenizer's Jinja chat template.

    Segments are the differences between renders of successive prefixes of the conversation: the
    text an assistant turn adds (its reply and end-of-turn marker) is supervised, everything else
    is not. This needs each render to extend the previous one, which is checked.
    """

    plain = False
    add_bos = False  # the chat template writes any BOS itself

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError(f"the tokenizer has no chat template; pick one of {', '.join(TEMPLATES)} "
                                    f"or set tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.name = CHAT_TEMPLATE

    def _render(self, turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        messages = [{"role": "user" if role == "human" else "assistant", "content": text} for role, text in turns]
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Segment]:
        turns = _normalise(messages)
        if add_generation_prompt and (not turns or turns[-1][0] != "human"):
            raise ConversationError("a generation prompt needs the conversation to end with a user turn")
        segments: list[Segment] = []
        done = ""
        for index, (role, _) in enumerate(turns):
            # A user turn is rendered with the assistant's opening so the reply's segment holds only the reply.
            text = self._render(turns[:index + 1], add_generation_prompt=role == "human")
            if role == "human" and index == len(turns) - 1 and not add_generation_prompt:
                text = self._render(turns[:index + 1], add_generation_prompt=False)
            if not text.startswith(done):
                raise ConversationError(f"the tokenizer's chat template does not render turn {index} as an "
                                        f"extension of the turns before it, so labels cannot be built by segments")
            segments.append(Segment(text[len(done):], supervised=role == "gpt"))
            done = text
        return segments


def get_template(name: str, tokenizer=None):
    """A template by name; `chat_template` uses `tokenizer`'s own chat template."""
    if name == CHAT_TEMPLATE:
        if tokenizer is None:
            raise ConversationError("the chat_template format needs the tokenizer")
        return TokenizerChatTemplate(tokenizer)
    if name not in TEMPLATES:
        valid = ", ".join([*TEMPLATES, CHAT_TEMPLATE])
        raise KeyError(f"unknown conversation template {name!r}; valid: {valid}")
    return TEMPLATES[name]


def _normalise(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """Accept LLaVA ({'from','value'}) and OpenAI ({'role','content'}) message dicts; check alternation."""
    roles = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
    turns = []
    for index, message in enumerate(messages):
        role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if role not in roles or not isinstance(text, str):
            raise ConversationError(f"message {index} needs 'from' in human/gpt and a string 'value', got {message!r}")
        role = roles[role]
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ConversationError(f"message {index} is from {role!r} but turns must alternate human, gpt, ... starting with human")
        turns.append((role, text))
    return turns


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated_turns: int = 0
    num_images: int = 0  # images the placeholders stand for (0 without an ImagePlaceholder)


@dataclass(frozen=True)
class ImagePlaceholder:
    """How an image appears in the token sequence: `count` copies of `token_id`, one per visual token
    the model splices in. The id need not be in the vocabulary (the model never embeds it).

    With `text_copy_offset` (CROME's gated adapter, whose LLM input is concat(text, adapted text,
    adapted image)), each image is preceded by a copy of the text of the turn that holds it, every id
    shifted up by the offset: the model embeds those positions through the adapter's text branch."""

    token_id: int
    count: int
    text_copy_offset: int | None = None

    def expand(self, pieces: Sequence[Sequence[int] | None]) -> list[int]:
        """A turn's text pieces (ids) with None where an image goes -> the turn's ids, each image as
        its tokens (after the copy of the turn's text, with `text_copy_offset`)."""
        copy = []
        if self.text_copy_offset is not None:
            copy = [i + self.text_copy_offset for piece in pieces if piece is not None for i in piece]
        ids: list[int] = []
        for piece in pieces:
            ids += copy + [self.token_id] * self.count if piece is None else list(piece)
        return ids

    def images_in(self, ids: list[int]) -> int:
        """How many images a sequence of ids holds placeholders for."""
        return ids.count(self.token_id) // self.count


def tokenize_conversation(
    tokenizer,
    template: ConversationTemplate,
    messages: Sequence[dict],
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    encode=None,
    image_placeholder: ImagePlaceholder | None = None,
) -> TokenizedConversation:
    """Token ids and labels (IGNORE_INDEX where unsupervised) from separately tokenised segments.

    Truncation policy: whole trailing (question, answer) exchanges are dropped until the sequence
    fits `max_length`; if not even the first exchange fits, ConversationError is raised, so no sample
    is ever silently left without supervised tokens. `encode` (text -> ids) replaces the
    per-segment tokenizer call, e.g. with a lookup into segments tokenised in one batch.
    With `image_placeholder`, every `<image>` tag becomes that many copies of its token id
    (unsupervised), wherever the tokenizer would have put it; without, the tag is ordinary text.
    """
    segments = template.segments(messages, add_generation_prompt)
    encode = encode or (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and template.add_bos else []
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    exchange_ends = []  # length after each complete (question, answer) exchange
    for segment in segments:
        piece = _encode_with_images(segment.text, encode, image_placeholder)
        if segment.eos:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if segment.supervised else [IGNORE_INDEX] * len(piece)
        if segment.supervised:
            exchange_ends.append(len(ids))
    if not add_generation_prompt and not exchange_ends:
        raise ConversationError("conversation has no assistant turn, so nothing would be supervised")
    truncated = 0
    if max_length is not None and len(ids) > max_length:
        if add_generation_prompt:
            raise ConversationError(f"prompt has {len(ids)} tokens, more than max_length {max_length}")
        fitting = [end for end in exchange_ends if end <= max_length]
        if not fitting:
            raise ConversationError(
                f"first exchange alone has {exchange_ends[0]} tokens, more than max_length {max_length}")
        truncated = len(exchange_ends) - len(fitting)
        ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]
    num_images = image_placeholder.images_in(ids) if image_placeholder else 0
    return TokenizedConversation(ids, labels, truncated, num_images)


def split_image_tags(text: str) -> list[str | None]:
    """'a<image>b' -> ['a', None, 'b']: text pieces, None where an image goes; empty pieces dropped."""
    pieces: list[str | None] = []
    for index, part in enumerate(text.split(IMAGE_TAG)):
        if index:
            pieces.append(None)
        if part:
            pieces.append(part)
    return pieces


def _encode_with_images(text: str, encode, placeholder: ImagePlaceholder | None) -> list[int]:
    if not text:
        return []
    if placeholder is None:
        return list(encode(text))
    return placeholder.expand([None if piece is None else encode(piece) for piece in split_image_tags(text)])
