"""The generation engine behind the server: one thread that owns the model and serves every request
through continuous batching.

Requests wait in a bounded queue. Between decoding steps the engine admits waiting requests while the
running batch has free slots: each prompt is read alone (its prefill), picks its first token, and its KV
cache joins the batch (infer/running_batch.py); every step then appends one token to every running row,
and a row leaves as soon as it ends (EOS, a stop string, its token budget, its deadline, or its client
going away), freeing its slot for the next waiting request. A greedy reply is therefore the reply the
request gets alone, whatever else is running; a sampled one with a `seed` too, since every row draws
from its own generator.

A model whose decoding state cannot be joined (an encoder-decoder LLM, a sliding-window KV cache) is
served one request at a time through the same queue.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from PIL import Image

from ..data.templates import ConversationTemplate, get_template
from ..infer.generate import GenerationConfig, next_tokens, open_decoder, sampling_generator
from ..infer.pipeline import embed_prompts, prompt_ids
from ..infer.reply_text import ReplyText
from ..infer.running_batch import can_join, has_room, join, keep, with_room
from ..models.assemble import LoadedVlm

log = logging.getLogger("bridgevlm.serve")
ROOM_CHUNK = 64  # cache columns a batch is laid out with beyond what it holds


class EngineBusy(RuntimeError):
    """The queue of waiting requests is full."""


class RequestTimeout(RuntimeError):
    """A request did not finish within its time limit."""


class PromptError(ValueError):
    """A request the model cannot answer as asked (its prompt, images or length); the message says why."""


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class Listener(Protocol):
    """Receives a request's progress, on the engine's thread."""

    def piece(self, text: str) -> None: ...

    def done(self, completion: Completion) -> None: ...

    def failed(self, error: Exception) -> None: ...


@dataclass
class Request:
    """One reply to generate: a conversation ending with a user turn, its images in tag order."""

    messages: list[dict]
    images: list[Image.Image]
    cfg: GenerationConfig
    listener: Listener
    system: str | None = None  # replaces the template's system prompt
    timeout_s: float | None = None
    id: int = field(default_factory=itertools.count().__next__)
    prompt_tokens: int = 0
    cancelled: bool = False
    deadline: float = float("inf")

    def cancel(self) -> None:
        """Stop working on this request (its client went away); nothing more is reported."""
        self.cancelled = True


@dataclass
class _Row:
    """A running request: its reply so far and the token to feed at the next step."""

    request: Request
    reply: ReplyText
    generator: torch.Generator | None
    pending: int = 0
    generated: int = 0


def _context_limit(loaded: LoadedVlm) -> int | None:
    config = loaded.model.llm.model.config
    return None if config.is_encoder_decoder else getattr(config, "max_position_embeddings", None)


class GenerationEngine:
    """`engine.check(request)` validates a request (raising PromptError); `engine.submit(request)`
    queues it (raising EngineBusy when the queue is full); progress reaches its listener."""

    def __init__(self, loaded: LoadedVlm, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.loaded = loaded
        self.template = get_template(loaded.config.template, loaded.tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_limit = _context_limit(loaded)
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._decoder = None
        self._wake = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self._stopping = False
        self.peak_batch = 0  # the most rows decoded together so far
        self._thread: threading.Thread | None = None
        loaded.model.eval()
        self.batches = self._joinable()
        if not self.batches:
            log.warning("this model's decoding state cannot be batched; requests are served one at a time")

    # ---------------------------------------------------------------- the caller's side
    @property
    def capacity(self) -> int:
        return self.max_batch if self.batches else 1

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), "max_batch": self.capacity,
                "max_queue": self.max_queue, "peak_batch": self.peak_batch}

    def template_for(self, request: Request) -> ConversationTemplate:
        if request.system is None:
            return self.template
        if not isinstance(self.template, ConversationTemplate):
            raise PromptError("this model's conversation format (the tokenizer's chat template) takes no system message")
        return replace(self.template, system=request.system)

    def check(self, request: Request) -> None:
        """Raise PromptError if the request cannot be answered; sets its prompt length."""
        request.cfg.check()
        if request.cfg.num_beams > 1:
            raise PromptError("beam search is not served; use greedy decoding or sampling")
        try:
            with self._tokenizer_lock:
                ids = prompt_ids(self.loaded, self.template_for(request), request.messages)
        except (ValueError, KeyError) as error:
            raise PromptError(str(error)) from None
        tags = self.loaded.placeholder.images_in(ids)
        if tags != len(request.images):
            raise PromptError(f"the messages hold {tags} image tag(s) but {len(request.images)} image(s)")
        request.prompt_tokens = len(ids)
        wanted = len(ids) + request.cfg.max_new_tokens
        if self.context_limit is not None and wanted > self.context_limit:
            raise PromptError(f"this model's maximum context length is {self.context_limit} tokens; the request "
                              f"needs {wanted} ({len(ids)} in the messages, images included, and "
                              f"{request.cfg.max_new_tokens} to generate): shorten the messages or max_tokens")

    def submit(self, request: Request) -> Request:
        if request.timeout_s is not None:
            request.deadline = time.monotonic() + request.timeout_s
        with self._wake:
            if self._stopping:
                raise EngineBusy("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._waiting)} requests are waiting (the most it "
                                 f"queues); retry shortly")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def start(self) -> GenerationEngine:
        self._thread = threading.Thread(target=self._run, name="bridgevlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ---------------------------------------------------------------- the engine thread
    def _joinable(self) -> bool:
        """Whether prefills can share a batch: read a one-token prompt and look at the decoding state."""
        model = self.loaded.model
        ids = torch.tensor([[self.loaded.tokenizer.eos_token_id]], device=next(model.parameters()).device)
        with torch.no_grad():
            embeds, context = model.prepare(ids, None)
            decoder = open_decoder(model.llm.model, embeds, torch.ones_like(ids), context=context)
        return can_join(decoder)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._rows) + len(admitted) < self.capacity:
                    admitted.append(self._waiting.popleft())
            for request in admitted:
                self._admit(request)
            if self._rows:
                self._step()
        for request in list(self._waiting) + [row.request for row in self._rows]:
            request.listener.failed(EngineBusy("the server is shutting down"))

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            return
        if time.monotonic() > request.deadline:
            request.listener.failed(RequestTimeout(f"the request waited longer than its {request.timeout_s:g} s limit"))
            return
        loaded = self.loaded
        try:
            with self._tokenizer_lock:
                prompts = embed_prompts(loaded, self.template_for(request), [request.messages], [request.images])
            decoder = open_decoder(loaded.model.llm.model, prompts.embeds, prompts.attention_mask,
                                   context=prompts.context)
        except Exception as error:  # reported to this request's client; the engine goes on
            log.exception("request %s failed while reading its prompt", request.id)
            request.listener.failed(error)
            return
        request.prompt_tokens = prompts.lengths[0]
        row = _Row(request, ReplyText(loaded.tokenizer, request.cfg.stop),
                   sampling_generator(request.cfg, prompts.embeds.device))
        if self._advance(row, int(next_tokens(decoder.logits, request.cfg, row.generator)[0])):
            return
        self._rows.append(row)
        joining = [decoder] if self._decoder is None else [self._decoder, decoder]
        self._decoder = join(joining, self._room()) if self.batches else decoder
        self.peak_batch = max(self.peak_batch, len(self._rows))

    def _room(self) -> int:
        """Free cache columns to lay a batch out with: enough for every row to finish, up to a chunk (a
        buffer much longer than needed costs attention over its masked columns at every step)."""
        left = max(row.request.cfg.max_new_tokens - row.generated for row in self._rows)
        return max(1, min(left, ROOM_CHUNK))

    def _step(self) -> None:
        ids = torch.tensor([row.pending for row in self._rows], device=self._decoder.mask.device)
        try:
            if self.batches and not has_room(self._decoder):
                self._decoder = with_room(self._decoder, self._room())
            if any(row.request.cfg.do_sample for row in self._rows):
                logits = self._decoder.step(ids)
                tokens = [int(next_tokens(logits[i:i + 1], row.request.cfg, row.generator)[0])
                          for i, row in enumerate(self._rows)]
            else:  # every row greedy: the argmax without the logits (infer/greedy_head.py)
                tokens = self._decoder.step_greedy(ids).tolist()
        except Exception as error:
            log.exception("a decoding step failed; failing its %d request(s)", len(self._rows))
            for row in self._rows:
                row.request.listener.failed(error)
            self._rows, self._decoder = [], None
            return
        going_on = [index for index, row in enumerate(self._rows) if not self._advance(row, tokens[index])]
        if len(going_on) < len(self._rows):
            self._rows = [self._rows[index] for index in going_on]
            self._decoder = keep(self._decoder, going_on, self._room()) if going_on else None

    def _advance(self, row: _Row, token: int) -> bool:
        """Report the row's next token; True when the row is finished."""
        request, reply = row.request, row.reply
        if request.cancelled:
            return True
        if time.monotonic() > request.deadline:
            request.listener.failed(RequestTimeout(f"the request ran longer than its {request.timeout_s:g} s limit"))
            return True
        finish = None
        if token == self.loaded.tokenizer.eos_token_id:
            finish = "stop"
        else:
            row.generated += 1
            with self._tokenizer_lock:
                piece = reply.push(token)
            if piece:
                request.listener.piece(piece)
            if reply.stopped:
                finish = "stop"
            elif row.generated >= request.cfg.max_new_tokens:
                finish = "length"
        if finish is None:
            row.pending = token
            return False
        rest = reply.finish()
        if rest:
            request.listener.piece(rest)
        request.listener.done(Completion(reply.shown, finish, request.prompt_tokens, row.generated))
        return True

