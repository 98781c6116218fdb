"""The OpenAI chat-completions wire format: requests in, responses, stream chunks and errors out.

A request's messages become a bridgevlm conversation: a user message's content parts, in order, with an
`<image>` tag where each image part stood; system (or developer) messages set the template's system
prompt. Fields OpenAI defines that have no meaning here (tools, logprobs, ...) are ignored, as other
OpenAI-compatible servers do.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.templates import IMAGE_TAG
from ..infer.generate import GenerationConfig
from .config import ServeConfig


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; vLLM's extension, 0 = off
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def generation(self, cfg: ServeConfig, choice: int = 0) -> GenerationConfig:
        """The generation settings of choice `choice` (a seeded request's choices draw from seed, seed+1, ...)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        greedy = self.temperature == 0
        return GenerationConfig(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or cfg.default_max_tokens,
            do_sample=not greedy, temperature=1.0 if greedy else self.temperature, top_p=self.top_p,
            top_k=self.top_k, stop=stop, seed=None if self.seed is None else self.seed + choice)


class BadRequest(ValueError):
    """A request that breaks the protocol; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one line naming the field, without echoing the input (it may hold image data)."""
    first = error.errors(include_input=False, include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    count = error.error_count()
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{param}: {first['msg']}{more}" if param else f"{first['msg']}{more}", param


def conversation(request: ChatCompletionRequest) -> tuple[list[dict], list[tuple[str, str]], str | None]:
    """-> (bridgevlm messages, [(image URL, where)] in tag order, system prompt or None)."""
    messages, images, system = [], [], None
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        parts = ([ContentPart(type="text", text=message.content)] if isinstance(message.content, str)
                 else message.content or [])
        texts = []
        for number, part in enumerate(parts):
            if part.type == "text":
                if part.text is None:
                    raise BadRequest(f"{where}.content[{number}]: a text part needs `text`", f"{where}.content")
                texts.append(part.text.replace(IMAGE_TAG, ""))  # tags come only from image parts
            else:
                if part.image_url is None:
                    raise BadRequest(f"{where}.content[{number}]: an image_url part needs `image_url.url`",
                                     f"{where}.content")
                if message.role != "user":
                    raise BadRequest(f"{where}: only user messages may hold images", f"{where}.content")
                images.append((part.image_url.url, f"{where}.content[{number}]"))
                texts.append(IMAGE_TAG)
        text = "\n".join(texts)
        if message.role in ("system", "developer"):
            if messages:
                raise BadRequest(f"{where}: a system message must come before the conversation", where)
            system = text if system is None else f"{system}\n{text}"
            continue
        messages.append({"from": "human" if message.role == "user" else "gpt", "value": text})
    if not messages or messages[-1]["from"] != "human":
        raise BadRequest("the messages must end with a user message (the one to reply to)", "messages")
    return messages, images, system


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(id_: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chunk_body(id_: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
               504: "timeout_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
