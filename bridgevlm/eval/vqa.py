"""Visual question answering on a Shapes world's per-family evaluation files, held-in and held-out."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.images import load_image
from ..data.templates import IMAGE_TAG, get_template
from ..infer.generate import GenerationConfig
from ..infer.pipeline import answer
from ..models.assemble import LoadedVlm
from .candidates import rank_answers
from .metrics import exact_match, mean
from .text_qa import prompt_messages


def evaluate_vqa_on_world(loaded: LoadedVlm, world_dir: str | Path, split: str = "test",
                          limit_per_family: int | None = None, blind: bool = False,
                          generation: GenerationConfig | None = None, rank_candidates: bool = False,
                          template: str | None = None) -> dict:
    """Greedy answers to every family's questions about the split's images.

    Returns {'held_in': {family: acc}, 'held_out': {...}, 'held_in_mean', 'held_out_mean'}. `blind`
    asks the same questions without the image: what the language model guesses from text alone.
    `rank_candidates` answers the families whose items list candidates (classification, multiple
    choice, yes/no) by the most likely candidate instead of generating (InstructBLIP's protocol).
    `generation` defaults to greedy decoding of at most 12 tokens; `template` (None: the model's) is
    the prompt format, e.g. `blip2_vqa` for BLIP-2's zero-shot "Question: {} Answer:".
    """
    world_dir = Path(world_dir)
    world = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    result: dict = {"held_in": {}, "held_out": {}}
    cfg = generation or GenerationConfig(max_new_tokens=12)
    prompt_format = get_template(template or loaded.config.template, loaded.tokenizer)
    for family, info in world["families"].items():
        items = json.loads((world_dir / "eval" / split / f"{family}.json").read_text(encoding="utf-8"))
        items = items[:limit_per_family] if limit_per_family else items
        if not items:
            continue
        prompts = [prompt_messages("" if blind else IMAGE_TAG, item) for item in items]
        images = [[] if blind else [load_image(world_dir / "images" / item["image"], sample=item["id"])]
                  for item in items]
        if rank_candidates and all(item.get("candidates") for item in items):
            predictions = rank_answers(loaded, prompts, images, [item["candidates"] for item in items],
                                       template=prompt_format)
        else:
            predictions = answer(loaded, prompts, images, cfg, template=prompt_format)
        group = "held_out" if info["held_out"] else "held_in"
        result[group][family] = mean(exact_match(p, item["answer"]) for p, item in zip(predictions, items))
    for group in ("held_in", "held_out"):
        result[f"{group}_mean"] = mean(result[group].values()) if result[group] else float("nan")
    return result
