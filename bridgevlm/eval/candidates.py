"""Answering classification and multiple-choice questions by ranking candidate answers.

Each candidate is scored by the log-likelihood of its tokens after the prompt, and the best one
wins (InstructBLIP's protocol for closed-set tasks). All (question, candidate) pairs are scored in
batches; rows are right-padded, so every real token keeps the positions and attention it would
have alone and the scores do not depend on the batch size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.instructions import pad_instructions

NORMALISATIONS = ("sum", "mean")


@dataclass
class CandidateQuestion:
    """One question: its prompt (images as placeholders), candidate continuations, and the
    prompt's images [I, 3, H, W] for a vision-language model (None for text), with one Q-Former
    instruction per image for a connector that reads them (InstructBLIP)."""

    prompt_ids: list[int]
    candidate_ids: list[list[int]]
    pixel_values: torch.Tensor | None = None
    instruction_ids: list[list[int]] | None = None


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


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            pixel_values: torch.Tensor | None, instructions: dict) -> torch.Tensor:
    """[B, T, V] from a VisionLanguageModel (`.logits`) or a plain HF causal LM."""
    if hasattr(model, "logits") and callable(model.logits):
        return model.logits(input_ids, attention_mask, pixel_values=pixel_values, **instructions)
    if pixel_values is not None:
        raise ValueError(f"images were given but {type(model).__name__} is a text-only model")
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def score_candidates(model: nn.Module, questions: Sequence[CandidateQuestion], batch_size: int = 32,
                     normalisation: str = "sum", pad_token_id: int = 0,
                     instruction_pad_token_id: int = 0) -> RankedCandidates:
    """Scores every candidate of every question and picks the best per question by `normalisation`
    ("sum": total log-likelihood; "mean": per token, which does not penalise longer answers)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check(questions)
    device = next(model.parameters()).device
    pairs = [(q, c) for q, question in enumerate(questions) for c in range(len(question.candidate_ids))]
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    pairs.sort(key=lambda p: -(len(questions[p[0]].prompt_ids) + len(questions[p[0]].candidate_ids[p[1]])))
    sums = [[0.0] * len(q.candidate_ids) for q in questions]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [questions[q].prompt_ids + questions[q].candidate_ids[c] for q, c in chunk]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # positions predicting a candidate token
        for r, ((q, c), row) in enumerate(zip(chunk, rows)):
            input_ids[r, :len(row)] = torch.tensor(row)
            attention_mask[r, :len(row)] = 1
            scored[r, len(questions[q].prompt_ids) - 1:len(row) - 1] = True
        images = [questions[q].pixel_values for q, _ in chunk if questions[q].pixel_values is not None]
        pixel_values = torch.cat(images).to(device) if images else None
        per_image = [ids for q, _ in chunk for ids in (questions[q].instruction_ids or [])]
        instructions = ({k: v.to(device) for k, v in pad_instructions(per_image, instruction_pad_token_id).items()}
                        if per_image else {})
        logits = _logits(model, input_ids.to(device), attention_mask.to(device), pixel_values,
                         instructions)[:, :-1].float()
        targets = input_ids[:, 1:].to(device).unsqueeze(-1)
        # log p(target) = logit(target) - logsumexp(logits): no second [B, T, V] tensor.
        token_logprobs = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)  # [B, T-1]
        totals = torch.where(scored.to(device), token_logprobs, 0.0).sum(-1).tolist()
        for (q, c), total in zip(chunk, totals):
            sums[q][c] = total
    counts = [[len(ids) for ids in q.candidate_ids] for q in questions]
    means = [[s / n for s, n in zip(row, lengths)] for row, lengths in zip(sums, counts)]
    ranking = sums if normalisation == "sum" else means
    best = [max(range(len(row)), key=row.__getitem__) for row in ranking]
    return RankedCandidates(best, sums, means, counts)


def rank_answers(loaded, conversations: Sequence[list[dict]], images: Sequence[Sequence], candidates: Sequence[Sequence[str]],
                 template=None, batch_size: int = 32, normalisation: str = "sum") -> list[str]:
    """For each conversation ending with a user turn, the candidate reply a vision-language model
    (`LoadedVlm`) finds most likely. Each candidate is tokenised as a reply inside the conversation
    template, exactly as training tokenises answers, with the template's end of turn: a candidate
    that is a prefix of a longer one is not favoured."""
    from ..data.instructions import current_instruction
    from ..data.templates import get_template, tokenize_conversation

    if not len(conversations) == len(images) == len(candidates):
        raise ValueError(f"{len(conversations)} conversations, {len(images)} image lists and {len(candidates)} "
                         f"candidate lists; give one of each per question")
    template = template or get_template(loaded.config.template, loaded.tokenizer)
    instructions = loaded.instruction_tokenizer()
    questions = []
    for index, (messages, imgs, options) in enumerate(zip(conversations, images, candidates)):
        def encode(extra):
            return tokenize_conversation(loaded.tokenizer, template, list(messages) + extra,
                                         add_generation_prompt=not extra,
                                         image_placeholder=loaded.placeholder).input_ids
        prompt = encode([])
        continuations = []
        for option in options:
            full = encode([{"from": "gpt", "value": option}])
            if full[:len(prompt)] != prompt:
                raise ValueError(f"question {index}: the template tokenises candidate {option!r} differently "
                                 f"after the prompt than as a reply; cannot score it")
            continuations.append(full[len(prompt):])
        pixels = (loaded.processor.normalize(torch.stack([loaded.processor.to_uint8(i) for i in imgs]))
                  if imgs else None)
        instruction_ids = ([instructions.encode(current_instruction(messages))] * len(imgs)
                           if instructions is not None and imgs else None)
        questions.append(CandidateQuestion(prompt, continuations, pixels, instruction_ids))
    ranked = score_candidates(loaded.model.eval(), questions, batch_size, normalisation, loaded.tokenizer.pad_token_id,
                              instructions.pad_token_id if instructions is not None else 0)
    return [options[best] for options, best in zip(candidates, ranked.best)]
