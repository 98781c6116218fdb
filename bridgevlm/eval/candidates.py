"""Answering classification and multiple-choice questions by ranking candidate answers.

Each candidate is scored by the log-likelihood of its tokens after the prompt, and the best one
wins (InstructBLIP's protocol for closed-set tasks). All (question, candidate) pairs are scored in
batches; rows are right-padded, so every real token keeps the positions and attention it would
have alone and the scores do not depend on the batch size.

An encoder-decoder model (FlanT5) reads the prompt with its encoder and scores a candidate on the
decoder side: the candidate's tokens are the decoder's targets, behind its start token.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..data.instructions import current_instruction, pad_instructions
from ..data.prefix_lm import encoder_prompt, tokenize_source, tokenize_target
from ..data.templates import get_template, tokenize_conversation

NORMALISATIONS = ("sum", "mean")


@dataclass
class CandidateQuestion:
    """One question: its prompt (images as placeholders; the encoder's input for an encoder-decoder
    model), candidate continuations (decoder targets), and the prompt's images [I, 3, H, W] for a
    vision-language model (None for text), with one Q-Former instruction per image for a connector
    that reads them (InstructBLIP). `vision_features` [I, N, Dv], the vision tower's output for those
    images, may stand in for `pixel_values`, so the tower runs once per question, not per candidate."""

    prompt_ids: list[int]
    candidate_ids: list[list[int]]
    pixel_values: torch.Tensor | None = None
    instruction_ids: list[list[int]] | None = None
    vision_features: torch.Tensor | None = None


@dataclass
class RankedCandidates:
    """Per question: the chosen candidate's index and every candidate's scores."""

    best: list[int]
    sum_logprobs: list[list[float]]
    mean_logprobs: list[list[float]]
    num_tokens: list[list[int]]


def tokenize_candidates(tokenizer, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                        add_eos: bool = False) -> list[CandidateQuestion]:
    """Prompts with the tokenizer's special tokens; candidates without, each followed by EOS when
    `add_eos` (so a candidate that is only a prefix of a longer answer is not favoured)."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    questions = []
    for prompt, options in zip(prompts, candidates):
        encoded = [tokenizer.encode(option, add_special_tokens=False) for option in options]
        if add_eos:
            encoded = [ids + [tokenizer.eos_token_id] for ids in encoded]
        questions.append(CandidateQuestion(tokenizer.encode(prompt), encoded))
    return questions


def _check(questions: Sequence[CandidateQuestion]) -> None:
    for q, question in enumerate(questions):
        if not question.prompt_ids:
            raise ValueError(f"question {q} has an empty prompt; the first candidate token needs a context")
        if not question.candidate_ids:
            raise ValueError(f"question {q} has no candidate answers to rank")
        for c, ids in enumerate(question.candidate_ids):
            if not ids:
                raise ValueError(f"candidate {c} of question {q} has no tokens")


def is_encoder_decoder(model: nn.Module) -> bool:
    """A VisionLanguageModel over an encoder-decoder LLM, or a plain HF encoder-decoder LM."""
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "is_encoder_decoder"):
        return bool(llm.is_encoder_decoder)
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _decoder_start(model: nn.Module) -> int:
    config = model.llm.config if hasattr(model, "llm") else model.config
    if config.decoder_start_token_id is None:
        raise ValueError(f"{type(model).__name__}'s encoder-decoder config has no decoder_start_token_id, the token "
                         f"before a candidate's first")
    return config.decoder_start_token_id


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            images: dict, instructions: dict, decoder: dict) -> torch.Tensor:
    """[B, T, V] (decoder positions [B, S, V] with `decoder` inputs) from a VisionLanguageModel (`.logits`)
    or a plain HF LM. `images`: pixel_values or vision_features, or nothing."""
    if hasattr(model, "logits") and callable(model.logits):
        return model.logits(input_ids, attention_mask, **images, **instructions, **decoder)
    if images:
        raise ValueError(f"images were given but {type(model).__name__} is a text-only model")
    return model(input_ids=input_ids, attention_mask=attention_mask, **decoder).logits


def _pad(rows: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and their attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


class _Rows(NamedTuple):
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    decoder: dict  # decoder_input_ids [B, S] for an encoder-decoder model, else nothing
    targets: torch.Tensor  # [B, L]: the token each scored logit position predicts
    scored: torch.Tensor  # [B, L] bool: positions that predict a candidate token
    positions: slice  # the logit positions that `targets` line up with


def _causal_rows(prompts: list[list[int]], candidates: list[list[int]], pad_token_id: int) -> _Rows:
    """Prompt and candidate in one row: the logits at position t predict token t+1."""
    input_ids, attention_mask = _pad([p + c for p, c in zip(prompts, candidates)], pad_token_id)
    scored = torch.zeros((len(prompts), input_ids.shape[1] - 1), dtype=torch.bool)
    for r, (prompt, candidate) in enumerate(zip(prompts, candidates)):
        scored[r, len(prompt) - 1:len(prompt) + len(candidate) - 1] = True
    # Unscored positions target id 0: the prompt may hold ids past the vocabulary (image placeholders,
    # a gated adapter's text copy), which the logits cannot be gathered at.
    return _Rows(input_ids, attention_mask, {}, input_ids[:, 1:].masked_fill(~scored, 0), scored, slice(None, -1))


def _seq2seq_rows(prompts: list[list[int]], candidates: list[list[int]], pad_token_id: int, start: int) -> _Rows:
    """The prompt to the encoder; the candidate as the decoder's targets, its inputs shifted behind the
    start token. Right padding on the causal decoder needs no mask: real positions never see it."""
    input_ids, attention_mask = _pad(prompts, pad_token_id)
    targets, scored = _pad(candidates, pad_token_id)
    decoder_ids = torch.cat([torch.full((len(candidates), 1), start, dtype=torch.long), targets[:, :-1]], dim=1)
    return _Rows(input_ids, attention_mask, {"decoder_input_ids": decoder_ids}, targets, scored.bool(), slice(None))


@torch.no_grad()
def score_candidates(model: nn.Module, questions: Sequence[CandidateQuestion], batch_size: int = 32,
                     normalisation: str = "sum", pad_token_id: int = 0,
                     instruction_pad_token_id: int = 0) -> RankedCandidates:
    """Scores every candidate of every question and picks the best per question by `normalisation`
    ("sum": total log-likelihood; "mean": per token, which does not penalise longer answers). For an
    encoder-decoder model, each row's encoder reads its question's prompt (once per candidate: the
    rows stay independent of one another)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check(questions)
    device = next(model.parameters()).device
    start = _decoder_start(model) if is_encoder_decoder(model) else None
    pairs = [(q, c) for q, question in enumerate(questions) for c in range(len(question.candidate_ids))]
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    pairs.sort(key=lambda p: -(len(questions[p[0]].prompt_ids) + len(questions[p[0]].candidate_ids[p[1]])))
    sums = [[0.0] * len(q.candidate_ids) for q in questions]
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        prompts = [questions[q].prompt_ids for q, _ in chunk]
        candidates = [questions[q].candidate_ids[c] for q, c in chunk]
        rows = (_causal_rows(prompts, candidates, pad_token_id) if start is None else
                _seq2seq_rows(prompts, candidates, pad_token_id, start))
        images = {}
        for name in ("pixel_values", "vision_features"):
            given = [getattr(questions[q], name) for q, _ in chunk if getattr(questions[q], name) is not None]
            if given:
                images[name] = torch.cat(given).to(device)
        per_image = [ids for q, _ in chunk for ids in (questions[q].instruction_ids or [])]
        instructions = ({k: v.to(device) for k, v in pad_instructions(per_image, instruction_pad_token_id).items()}
                        if per_image else {})
        logits = _logits(model, rows.input_ids.to(device), rows.attention_mask.to(device), images,
                         instructions, {k: v.to(device) for k, v in rows.decoder.items()})[:, rows.positions].float()
        # log p(target) = logit(target) - logsumexp(logits): no second [B, T, V] tensor.
        targets = rows.targets.to(device).unsqueeze(-1)
        token_logprobs = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)  # [B, L]
        totals = torch.where(rows.scored.to(device), token_logprobs, 0.0).sum(-1).tolist()
        for (q, c), total in zip(chunk, totals):
            sums[q][c] = total
    counts = [[len(ids) for ids in q.candidate_ids] for q in questions]
    means = [[s / n for s, n in zip(row, lengths)] for row, lengths in zip(sums, counts)]
    ranking = sums if normalisation == "sum" else means
    best = [max(range(len(row)), key=row.__getitem__) for row in ranking]
    return RankedCandidates(best, sums, means, counts)


def _conversation_continuations(loaded, template, index: int, messages: list[dict],
                                options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """A causal LM's prompt, and each candidate as the template tokenises it as the reply."""
    def encode(extra):
        return tokenize_conversation(loaded.tokenizer, template, list(messages) + extra,
                                     add_generation_prompt=not extra, image_placeholder=loaded.placeholder).input_ids

    prompt = encode([])
    continuations = []
    for option in options:
        full = encode([{"from": "gpt", "value": option}])
        if full[:len(prompt)] != prompt:
            raise ValueError(f"question {index}: the template tokenises candidate {option!r} differently "
                             f"after the prompt than as a reply; cannot score it")
        continuations.append(full[len(prompt):])
    return prompt, continuations


def _prefix_lm_targets(loaded, template, messages: list[dict],
                       options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """An encoder-decoder LM's encoder prompt and each candidate as a decoder target, as training builds both."""
    prompt = tokenize_source(loaded.tokenizer, encoder_prompt(messages, template), loaded.placeholder)
    return prompt, [tokenize_target(loaded.tokenizer, option) for option in options]


def rank_answers(loaded, conversations: Sequence[list[dict]], images: Sequence[Sequence], candidates: Sequence[Sequence[str]],
                 template=None, batch_size: int = 32, normalisation: str = "sum") -> list[str]:
    """For each conversation ending with a user turn, the candidate reply a vision-language model
    (`LoadedVlm`) finds most likely. Each candidate is tokenised as training tokenises answers: as a
    reply inside the conversation template, with the template's end of turn (causal LLM), or as the
    decoder's target with EOS after the encoder prompt (encoder-decoder LLM). Either way a candidate
    that is a prefix of a longer one is not favoured."""
    if not len(conversations) == len(images) == len(candidates):
        raise ValueError(f"{len(conversations)} conversations, {len(images)} image lists and {len(candidates)} "
                         f"candidate lists; give one of each per question")
    template = template or get_template(loaded.config.template, loaded.tokenizer)
    instructions = loaded.instruction_tokenizer()
    device = next(loaded.model.parameters()).device
    questions = []
    for index, (messages, imgs, options) in enumerate(zip(conversations, images, candidates)):
        if loaded.model.llm.is_encoder_decoder:
            prompt, continuations = _prefix_lm_targets(loaded, template, messages, options)
        else:
            prompt, continuations = _conversation_continuations(loaded, template, index, messages, options)
        with torch.no_grad():  # the tower once per question; every candidate row reuses its features
            features = loaded.model.vision(loaded.processor.batch(imgs).to(device)) if imgs else None
        instruction_ids = ([instructions.encode(current_instruction(messages))] * len(imgs)
                           if instructions is not None and imgs else None)
        questions.append(CandidateQuestion(prompt, continuations, instruction_ids=instruction_ids,
                                           vision_features=features))
    ranked = score_candidates(loaded.model.eval(), questions, batch_size, normalisation, loaded.tokenizer.pad_token_id,
                              instructions.pad_token_id if instructions is not None else 0)
    return [options[best] for options, best in zip(candidates, ranked.best)]
