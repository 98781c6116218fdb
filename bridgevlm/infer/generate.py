"""Generation over any HF causal or encoder-decoder LM from input embeddings: greedy, sampling and
beam search, with a KV cache, EOS and stop strings, and left-padded batches whose outputs equal
one-at-a-time runs.

Starting from embeddings (not ids) is what lets the same loop serve a text-only LLM and a
vision-language model whose prompt holds spliced visual tokens. An encoder-decoder LM (FlanT5) reads
the prompt embeddings with its encoder, once; the decoding loops see only a decoder that steps
token by token, the same for both kinds (`open_decoder`). New tokens enter by id.

A vision-language model whose connector acts inside the LLM (partial LoRA, gated cross-attention)
passes the prompt's `context` (models/connectors/in_llm.py): it is installed around every model call,
as `context.decoding()` once the prompt is read (each new token is text that follows the row's last
image), and follows the rows as beams repeat and reorder (`context.select(rows)`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.modeling_outputs import BaseModelOutput

from .greedy_head import MIN_ROWS, greedy_head
from .layout import use_cpu_decoding_layout


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # nucleus sampling; 1.0 = no filter
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / (generated length ** length_penalty)
    stop: list[str] = field(default_factory=list)  # strings that end a reply (not included in the text)
    seed: int | None = None  # sampling seed; None draws from torch's global generator

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set do_sample=false or num_beams=1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=false for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per row: generated ids, without the EOS and anything after it
    texts: list[str] | None = None  # per row, cut before any stop string (when a tokenizer was given)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids [B, T] padded on the left, and their attention mask."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the positions it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Decoder:
    """One prompt batch and its KV cache; `step(ids)` appends one token per row.

    With `max_length` (greedy and sampling), the cache is preallocated for the whole generation
    and written in place: no per-step copy of a growing cache. Beam search reorders its cache, so
    it keeps a dynamic one. Model calls run under inference mode (no autograd bookkeeping at all);
    it is entered per call, never across a caller's code.
    """

    def __init__(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1,
                 max_length: int | None = None, context=None):
        self.model = model
        if not model.training:  # a model used for inference on a CPU gets the faster decoding layout
            use_cpu_decoding_layout(model)
        width = inputs_embeds.shape[1]
        with torch.inference_mode():
            if max_length is not None and repeat == 1:
                self.cache = StaticCache(config=model.config, max_cache_len=max_length)
            else:
                self.cache = DynamicCache(config=model.config)
            self.mask = attention_mask.long()
            with _applying(context):
                out = model(inputs_embeds=inputs_embeds, attention_mask=self.mask,
                            position_ids=position_ids_for(self.mask), past_key_values=self.cache, use_cache=True,
                            cache_position=torch.arange(width, device=inputs_embeds.device), logits_to_keep=1)
        self.context = None if context is None else context.decoding()
        self.logits = out.logits[:, -1].float()  # [B, V]
        self.next_position = self.mask.sum(-1, keepdim=True)  # [B, 1]
        self.written = width  # cache slots filled
        if repeat > 1:  # beams share their prompt's prefill
            with torch.inference_mode():
                self.cache.batch_repeat_interleave(repeat)
            self.mask = self.mask.repeat_interleave(repeat, 0)
            self.logits = self.logits.repeat_interleave(repeat, 0)
            self.next_position = self.next_position.repeat_interleave(repeat, 0)
            if self.context is not None:
                rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device).repeat_interleave(repeat)
                self.context = self.context.select(rows)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> next-token logits [B, V]."""
        self.logits = self._forward(self.model, ids).logits[:, -1].float()
        return self.logits

    def step_greedy(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> every row's greedy next token [B]: `step(ids).argmax(-1)`, without the fp32 logits
        where the head is large and the rows several (infer/greedy_head.py). `logits` is then not kept."""
        head = greedy_head(self.model) if ids.shape[0] >= MIN_ROWS else None
        if head is None:
            return self.step(ids).argmax(-1)
        hidden = self._forward(self.model.base_model, ids).last_hidden_state[:, -1]
        self.logits = None
        with torch.inference_mode():
            return head.argmax(hidden)

    def _forward(self, module, ids: torch.Tensor):
        """Feed one new token per row to `module` (the LM, or its base model) through the cache."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with torch.inference_mode(), _applying(self.context):
            out = module(input_ids=ids[:, None], attention_mask=self.mask, position_ids=self.next_position,
                         past_key_values=self.cache, use_cache=True,
                         cache_position=torch.tensor([self.written], device=ids.device))
        self.written += 1
        self.next_position = self.next_position + 1
        return out

    def reorder(self, rows: torch.Tensor) -> None:
        with torch.inference_mode():
            self.cache.reorder_cache(rows)
        self.mask = self.mask[rows]
        self.next_position = self.next_position[rows]
        if self.context is not None:
            self.context = self.context.select(rows)


class _Seq2SeqDecoder:
    """`_Decoder`'s interface for an encoder-decoder LM: the encoder reads the prompt once, the
    decoder starts from its start token and appends one token per step to its own KV cache (the
    cross-attention keys and values are computed at the first step and kept). Beams share their
    prompt's encoding and first step."""

    def __init__(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1,
                 max_length: int | None = None):
        self.model = model
        if not model.training:
            use_cpu_decoding_layout(model)
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        start = model.config.decoder_start_token_id if start is None else start
        if start is None:
            raise ValueError(f"{type(model).__name__} has no decoder_start_token_id (in its config or generation "
                             f"config), the token its decoder starts from")
        self.mask = attention_mask.long()
        # The self-attention cache grows with the (short) reply: a dynamic one, whose reordering beams need too.
        self.cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        with torch.inference_mode():
            self.encoded = model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=self.mask).last_hidden_state
        self.step(torch.full((inputs_embeds.shape[0],), start, dtype=torch.long, device=inputs_embeds.device))
        if repeat > 1:
            with torch.inference_mode():
                self.cache.batch_repeat_interleave(repeat)
            self.encoded = self.encoded.repeat_interleave(repeat, 0)
            self.mask = self.mask.repeat_interleave(repeat, 0)
            self.logits = self.logits.repeat_interleave(repeat, 0)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> next-token logits [B, V]."""
        with torch.inference_mode():
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded), attention_mask=self.mask,
                             decoder_input_ids=ids[:, None], past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()
        return self.logits

    def step_greedy(self, ids: torch.Tensor) -> torch.Tensor:
        return self.step(ids).argmax(-1)

    def reorder(self, rows: torch.Tensor) -> None:
        with torch.inference_mode():
            self.cache.reorder_cache(rows)
        self.encoded = self.encoded[rows]
        self.mask = self.mask[rows]


def open_decoder(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, repeat: int = 1,
                  max_length: int | None = None, context=None):
    """The decoding state for `model`'s kind: a causal LM or an encoder-decoder one."""
    if getattr(model.config, "is_encoder_decoder", False):
        if context is not None:
            raise ValueError("a context is read by a connector inside a causal LM; an encoder-decoder LM has none")
        return _Seq2SeqDecoder(model, inputs_embeds, attention_mask, repeat=repeat, max_length=max_length)
    return _Decoder(model, inputs_embeds, attention_mask, repeat=repeat, max_length=max_length, context=context)


def _applying(context):
    return nullcontext() if context is None else context.applied()


def _filter_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def sampling_generator(cfg: GenerationConfig, device) -> torch.Generator | None:
    """The generator a sampled generation draws from: seeded by `cfg.seed`, else None (torch's global one)."""
    if cfg.do_sample and cfg.seed is not None:
        return torch.Generator(device=device).manual_seed(cfg.seed)
    return None


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> the next token of every row [B]: argmax, or a draw after temperature / top-k / top-p."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = _filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def stream_tokens(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig,
                  eos_token_id: int | None, context=None) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; yields the next token of every row [B] at each step, until every
    row has produced EOS or max_new_tokens. Rows that finished keep receiving EOS. `context`: see the
    module docstring."""
    cfg.check()
    generator = sampling_generator(cfg, inputs_embeds.device)
    decoder = open_decoder(model, inputs_embeds, attention_mask,
                            max_length=inputs_embeds.shape[1] + cfg.max_new_tokens, context=context)
    finished = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
    ids = next_tokens(decoder.logits, cfg, generator)
    for step in range(cfg.max_new_tokens):
        if eos_token_id is not None:
            ids = ids.masked_fill(finished, eos_token_id)
            finished |= ids == eos_token_id
        yield ids
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            return
        # greedy decoding needs only the argmax of the logits, which step_greedy finds without them
        ids = next_tokens(decoder.step(ids), cfg, generator) if cfg.do_sample else decoder.step_greedy(ids)


def _beam_search(model, inputs_embeds, attention_mask, cfg: GenerationConfig, eos_token_id,
                 context=None) -> list[list[int]]:
    """Beam search with a length penalty; returns the best hypothesis of each row (without EOS).

    A row stops once it holds num_beams finished hypotheses and no running beam can still beat the
    worst of them (the usual heuristic for a length penalty > 0)."""
    batch, beams = inputs_embeds.shape[0], cfg.num_beams
    decoder = open_decoder(model, inputs_embeds, attention_mask, repeat=beams, context=context)
    device = inputs_embeds.device
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    sequences = [[[] for _ in range(beams)] for _ in range(batch)]
    done_hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    row_done = [False] * batch
    logits = decoder.logits
    for step in range(cfg.max_new_tokens):
        length = step + 1  # generated tokens, EOS included
        logprobs = logits.log_softmax(-1).view(batch, beams, -1)
        vocab = logprobs.shape[-1]
        candidates = (scores.unsqueeze(-1) + logprobs).view(batch, -1)
        top_scores, top_index = candidates.topk(2 * beams, dim=-1)
        new_scores = torch.full_like(scores, float("-inf"))
        parents = torch.zeros(batch, beams, dtype=torch.long, device=device)
        tokens = torch.full((batch, beams), eos_token_id if eos_token_id is not None else 0,
                            dtype=torch.long, device=device)
        new_sequences = [[[] for _ in range(beams)] for _ in range(batch)]
        for row in range(batch):
            if row_done[row]:
                continue
            filled = 0
            for rank, (score, index) in enumerate(zip(top_scores[row].tolist(), top_index[row].tolist())):
                beam, token = divmod(index, vocab)
                if score == float("-inf"):
                    break
                if eos_token_id is not None and token == eos_token_id:
                    if rank < beams:  # an EOS outside the top num_beams candidates is not a contender
                        done_hyps[row].append((score / length ** cfg.length_penalty, sequences[row][beam]))
                    continue
                new_scores[row, filled] = score
                parents[row, filled] = row * beams + beam
                tokens[row, filled] = token
                new_sequences[row][filled] = sequences[row][beam] + [token]
                filled += 1
                if filled == beams:
                    break
            hyps = sorted(done_hyps[row], key=lambda h: -h[0])[:beams]
            done_hyps[row] = hyps
            if len(hyps) == beams:
                best_running = new_scores[row].max().item() / length ** cfg.length_penalty
                row_done[row] = best_running <= hyps[-1][0]
        for row in range(batch):  # finished rows keep their beams in place
            if row_done[row] and not new_sequences[row][0]:
                parents[row] = torch.arange(row * beams, (row + 1) * beams, device=device)
        scores, sequences = new_scores, new_sequences
        if all(row_done) or step == cfg.max_new_tokens - 1:
            break
        decoder.reorder(parents.view(-1))
        logits = decoder.step(tokens.view(-1))
    best = []
    for row in range(batch):
        hyps = list(done_hyps[row])
        if not row_done[row]:  # out of tokens: running beams compete with the finished ones
            hyps += [(scores[row, b].item() / cfg.max_new_tokens ** cfg.length_penalty, sequences[row][b])
                     for b in range(beams) if scores[row, b] > float("-inf")]
        best.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return best


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string it contains, and whether it contained one."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig,
             eos_token_id: int | None, tokenizer=None, context=None) -> GenerationOutput:
    """Generate from a (left-padded) batch of prompt embeddings [B, T, D] with mask [B, T].

    `model` is a HF causal LM, or an encoder-decoder one whose encoder reads the prompt. With a
    tokenizer, texts are decoded and cut at the first stop string; stop strings also end a row's
    decoding early (greedy/sampling). `context`: see the module docstring."""
    cfg.check()
    if cfg.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    if cfg.num_beams > 1:
        tokens = _beam_search(model, inputs_embeds, attention_mask, cfg, eos_token_id, context)
    else:
        tokens = [[] for _ in range(inputs_embeds.shape[0])]
        ended = [False] * len(tokens)
        for ids in stream_tokens(model, inputs_embeds, attention_mask, cfg, eos_token_id, context):
            for row, token in enumerate(ids.tolist()):
                if ended[row]:
                    continue
                if token == eos_token_id:
                    ended[row] = True
                    continue
                tokens[row].append(token)
                # Only the recent tail can complete a stop string that was not there a step ago.
                if cfg.stop and cut_at_stop(tokenizer.decode(tokens[row][-32:], skip_special_tokens=True), cfg.stop)[1]:
                    ended[row] = True
            if all(ended):
                break
    texts = None
    if tokenizer is not None:
        texts = [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), cfg.stop)[0] for t in tokens]
    return GenerationOutput(tokens=tokens, texts=texts)

