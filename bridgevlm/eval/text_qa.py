"""Text question answering: the language model answers from a scene's text description.

This measures what a pretrained LLM brings to the bridge: it must already know every task family,
held-out ones included, before it ever sees an image.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.shapes.scene import Scene
from ..data.shapes.world import SCENE_TEXTS
from ..data.templates import ConversationTemplate, tokenize_conversation
from ..infer.generate import left_pad
from ..models.llm import LanguageModel
from .metrics import exact_match, mean


def prompt_messages(context_text: str, item: dict) -> list[dict]:
    """The item's question (after any earlier dialogue turns), opened by `context_text`."""
    turns = list(item.get("context", [])) + [{"from": "human", "value": item["question"]}]
    if context_text:  # an empty context (a blind question) adds no separating line
        turns[0] = {"from": "human", "value": f"{context_text}\n{turns[0]['value']}"}
    return turns


@torch.no_grad()
def greedy_answers(model, tokenizer, template: ConversationTemplate, prompts: list[list[dict]],
                   max_new_tokens: int = 12, batch_size: int = 64) -> list[str]:
    """Greedy answers for text prompts, batched with left padding; prompts of similar length share a
    batch, so little padding is computed."""
    hf_model = model.model if isinstance(model, LanguageModel) else model
    hf_model.eval()
    device = next(hf_model.parameters()).device
    encoded = [tokenize_conversation(tokenizer, template, p, add_generation_prompt=True).input_ids for p in prompts]
    answers: list[str] = [""] * len(prompts)
    for rows in length_batches([len(ids) for ids in encoded], batch_size):
        ids, mask = left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
        width = ids.shape[1]
        out = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(rows, out.cpu()):
            answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
    return answers


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` in batches of at most `batch_size`, longest first, each batch of similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def scene_descriptions(world_dir: str | Path, split: str, scene_text: str = "detailed") -> dict[str, str]:
    """Scene id -> its text in the form `scene_text` names ("detailed": the world's own caption)."""
    if scene_text not in SCENE_TEXTS:
        raise ValueError(f"unknown scene_text {scene_text!r}; valid: {', '.join(SCENE_TEXTS)}")
    records = json.loads((Path(world_dir) / "scenes" / f"{split}.json").read_text(encoding="utf-8"))
    return {r["id"]: SCENE_TEXTS[scene_text](Scene.from_json(r)) for r in records}


def evaluate_text_qa(model, tokenizer, template: ConversationTemplate, world_dir: str | Path, split: str = "test",
                     families: list[str] | None = None, limit_per_family: int | None = None,
                     scene_text: str = "detailed") -> dict:
    """Accuracy per family ({'text_qa.<family>': acc, 'text_qa_accuracy': mean over families}),
    each question opened by its scene's text in the form `scene_text` names."""
    world_dir = Path(world_dir)
    scenes = scene_descriptions(world_dir, split, scene_text)
    families = families or json.loads((world_dir / "world.json").read_text(encoding="utf-8"))["families"].keys()
    results = {}
    for family in families:
        items = json.loads((world_dir / "eval" / split / f"{family}.json").read_text(encoding="utf-8"))
        items = items[:limit_per_family] if limit_per_family else items
        if not items:  # a tiny world may have no question of this family
            continue
        prompts = [prompt_messages(scenes[it["scene_id"]], it) for it in items]
        predictions = greedy_answers(model, tokenizer, template, prompts)
        results[f"text_qa.{family}"] = mean(exact_match(p, it["answer"]) for p, it in zip(predictions, items))
    results["text_qa_accuracy"] = mean(v for k, v in results.items())
    return results
