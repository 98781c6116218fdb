"""Generate the Shapes world on disk: images, captions, instructions and evaluation files.

Layout of a world directory (every JSON file uses the community formats, so the loaders that
read it are the ones that read real LLaVA / COCO-style data):

    world.json                     seed, families (held-in / held-out), templates, splits, counts
    scenes/{split}.json            scene graphs with their short and detailed captions
    images/{split}/{id}.png
    captions/{split}.json          LLaVA pre-training form: <image> + detailed caption
    captions_short/{split}.json    the same with the short caption
    instruct/{split}.json          LLaVA conversation form, held-in families, several turns per image
    tasks/{family}/{split}.json    the same per held-in family (train and val): one dataset per task, for
                                   multi-dataset instruction tuning (InstructBLIP's mixture)
    tasks_plain/{family}/{split}.json  the same questions in the family's one fixed phrasing: "plain
                                   inputs" without instruction variety, for the multitask ablation
    eval/{split}/{family}.json     one question per scene and family: question, answer, candidates
    eval/{split}/classify.json     single-object scenes labelled with their object's colour+shape class
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ...io import write_json

from .families import FAMILIES, HELD_IN, HELD_OUT, ask
from .render import render_scene
from .scene import (MAX_OBJECTS, COLOURS, SHAPES, Scene, class_prompts, compact_caption, detailed_caption,
                    minimal_caption, names_objects_uniquely, sample_scene, short_caption)

SPLITS = ("train", "val", "test")
CAPTION_PROMPTS = (
    "Describe the image.", "What is in this picture?", "Give a short description of the image.",
    "Describe what you see.", "Summarise the picture.",
)


@dataclass
class WorldConfig:
    seed: int = 0
    scenes: int = 2000
    image_size: int = 96
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    text_probability: float = 0.35
    turns_per_image: int = 6  # questions packed into one instruction conversation
    task_files: bool = True  # also write tasks/ and tasks_plain/ (per-family instruction datasets)


def split_sizes(cfg: WorldConfig) -> dict[str, int]:
    val = max(1, round(cfg.scenes * cfg.val_fraction))
    test = max(1, round(cfg.scenes * cfg.test_fraction))
    train = cfg.scenes - val - test
    if train < 1:
        raise ValueError(f"world too small: {cfg.scenes} scenes leave no training scenes")
    return {"train": train, "val": val, "test": test}


def sample_scenes(cfg: WorldConfig) -> list[Scene]:
    """All scenes of the world, unique by content, so no split shares a scene with another."""
    rng = np.random.default_rng([cfg.seed, 0])
    seen: set = set()
    scenes = []
    for split, count in split_sizes(cfg).items():
        for index in range(count):
            for _ in range(1000):
                scene = sample_scene(rng, f"{split}_{index:06d}", split, cfg.text_probability)
                if scene.key() not in seen:
                    break
            else:
                raise ValueError(f"cannot draw {cfg.scenes} distinct scenes; ask for fewer")
            seen.add(scene.key())
            scenes.append(scene)
    return scenes


def conversation(scene: Scene, rng: np.random.Generator, families, turns: int, context: str,
                 phrasing: str = "varied", weights: np.ndarray | None = None) -> list[dict]:
    """A multi-turn conversation about one scene; `context` opens the first human turn
    ('<image>' for the vision-language model, the scene's text for the language model). Each turn's
    family is drawn uniformly, or with probabilities `weights` (one per family, summing to 1)."""
    messages: list[dict] = []
    while len(messages) < 2 * turns:
        index = rng.integers(len(families)) if weights is None else rng.choice(len(families), p=weights)
        question = ask(families[index], scene, rng, phrasing=phrasing)
        if question is None:
            continue
        for q, a in question.turns:
            messages.append({"from": "human", "value": q})
            messages.append({"from": "gpt", "value": a})
    messages[0]["value"] = f"{context}\n{messages[0]['value']}"
    return messages


def eval_items(scene: Scene, rng: np.random.Generator, image: str) -> dict[str, list[dict]]:
    """One question per family about `scene`; a dialogue yields one item per turn, with the earlier
    turns (and their true answers) as context."""
    items: dict[str, list[dict]] = {}
    for family in FAMILIES:
        question = ask(family, scene, rng)
        if question is None:
            continue
        for turn, (q, a) in enumerate(question.turns):
            context = [{"from": role, "value": text} for pq, pa in question.turns[:turn] for role, text in (("human", pq), ("gpt", pa))]
            item = {"id": f"{scene.id}_{family}_{turn}", "scene_id": scene.id, "image": image, "family": family,
                    "question": q, "answer": a}
            if question.candidates:
                item["candidates"] = list(question.candidates)
            if context:
                item["context"] = context
            items.setdefault(family, []).append(item)
    return items


SCENE_TEXTS = {"detailed": detailed_caption, "compact": compact_caption, "minimal": minimal_caption}


def text_conversations(seed: int, num_scenes: int, exclude: set, turns: int, text_probability: float = 0.35,
                       describe_probability: float = 0.2, describe_first: bool = False,
                       scene_text: str = "detailed", phrasing: str = "varied", families: Sequence[str] | None = None,
                       max_objects: int = MAX_OBJECTS, family_weights: Mapping[str, float] | None = None):
    """Scenes-as-text conversations covering *every* family, held-out ones included, for
    pretraining the embedded language model. The scene's description opens the first user turn,
    where the image will stand later; some conversations also ask for the description itself, so
    the model learns to produce captions. Scenes in `exclude` (the world's val/test keys) are
    never used, so text-QA evaluation on test scenes stays honest.

    `scene_text="compact"` describes scenes tersely ("minimal": colour and shape only, on scenes
    whose objects that names uniquely) and `phrasing="canonical"` asks each family
    in one fixed form: an easier first curriculum stage, where in-context look-ups are learnt.
    `families` restricts the questions to those families (default: all) and `max_objects` caps the
    objects per scene: fewer distractors make a first look-up easier to learn. `family_weights`
    multiplies a family's share of the questions (default 1 each): a family learnt late can be
    given more of the corpus without leaving the others out."""
    if scene_text not in SCENE_TEXTS:
        raise ValueError(f"unknown scene_text {scene_text!r}; valid: {', '.join(SCENE_TEXTS)}")
    if phrasing not in ("varied", "canonical"):
        raise ValueError(f"unknown phrasing {phrasing!r}; valid: varied, canonical")
    describe_scene = SCENE_TEXTS[scene_text]
    rng = np.random.default_rng([seed, 1])
    families = tuple(families or FAMILIES)
    unknown = [f for f in [*families, *(family_weights or {})] if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown question families {unknown}; valid: {', '.join(FAMILIES)}")
    weights = None
    if family_weights:
        outside = sorted(set(family_weights) - set(families))
        bad = {f: w for f, w in family_weights.items() if not w > 0}
        if outside or bad:
            raise ValueError(f"family_weights must be positive and name families of the corpus; got {bad or outside}")
        raw = np.array([family_weights.get(f, 1.0) for f in families])
        weights = raw / raw.sum()
    records = []
    while len(records) < num_scenes:
        scene = sample_scene(rng, f"text_{len(records):07d}", "train", text_probability, max_objects)
        if scene.key() in exclude or (scene_text == "minimal" and not names_objects_uniquely(scene)):
            continue
        messages = conversation(scene, rng, families, turns, describe_scene(scene), phrasing, weights)
        if rng.random() < describe_probability:
            prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
            describe = [{"from": "human", "value": prompt}, {"from": "gpt", "value": describe_scene(scene)}]
            if describe_first:  # right after the scene: a dense copying task that forms look-up heads early
                describe[0]["value"] = messages[0]["value"].split("\n", 1)[0] + "\n" + prompt
                messages[0]["value"] = messages[0]["value"].split("\n", 1)[1]
                messages = describe + messages
            else:
                messages += describe
        records.append({"id": scene.id, "conversations": messages})
    return records


def scene_keys(world_dir: str | Path, splits=("val", "test")) -> set:
    """Content keys of a world's scenes, to keep them out of any training corpus."""
    keys = set()
    for split in splits:
        path = Path(world_dir) / "scenes" / f"{split}.json"
        keys |= {Scene.from_json(r).key() for r in json.loads(path.read_text(encoding="utf-8"))}
    return keys


def world_description(cfg: WorldConfig, counts: dict[str, int]) -> dict:
    return {
        "name": "shapes",
        "config": vars(cfg).copy(),
        "splits": counts,
        "held_in": list(HELD_IN),
        "held_out": list(HELD_OUT),
        "classes": [f"{c} {s}" for c in COLOURS for s in SHAPES],
        "class_prompts": class_prompts(),
        "families": {
            name: {
                "description": fam.description,
                "held_out": name in HELD_OUT,
                "templates": list(fam.templates),
                **({"follow_up_templates": [list(t) for t in fam.follow_ups]} if fam.follow_ups else {}),
            }
            for name, fam in FAMILIES.items()
        },
    }


def build_world(out: str | Path, cfg: WorldConfig, progress: bool = True, splits: tuple[str, ...] = SPLITS) -> Path:
    """Write the world under `out`. Same config, same bytes.

    `splits` limits which splits are rendered and written (e.g. only "test" to evaluate); every
    split's scenes are still drawn, so a split's content never depends on which others are written.
    """
    out = Path(out)
    scenes = sample_scenes(cfg)
    by_split: dict[str, list[Scene]] = {s: [sc for sc in scenes if sc.split == s] for s in SPLITS}
    for split, split_scenes in by_split.items():
        if split not in splits:
            continue
        # One stream per split, so questions and prompts do not depend on the other splits either.
        rng = np.random.default_rng([cfg.seed, 2, SPLITS.index(split)])
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        captions, short_captions, instruct, scene_records = [], [], [], []
        evals: dict[str, list[dict]] = {name: [] for name in (*FAMILIES, "classify")} if split != "train" else {}
        for scene in tqdm(split_scenes, desc=f"world {split}", disable=not progress, leave=False):
            image = f"{split}/{scene.id}.png"
            render_scene(scene, cfg.image_size).save(out / "images" / image, optimize=False, compress_level=6)
            record = scene.to_json()
            record.update(image=image, short_caption=short_caption(scene), detailed_caption=detailed_caption(scene))
            scene_records.append(record)
            for target, caption in ((captions, detailed_caption(scene)), (short_captions, short_caption(scene))):
                prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
                target.append({"id": scene.id, "image": image, "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption}]})
            instruct.append({"id": scene.id, "image": image,
                             "conversations": conversation(scene, rng, HELD_IN, cfg.turns_per_image, "<image>")})
            if split != "train":
                for family, items in eval_items(scene, rng, image).items():
                    evals.setdefault(family, []).extend(items)
                if len(scene.objects) == 1:  # a rendered word may stand beside it; the class is the object's
                    obj = scene.objects[0]
                    evals.setdefault("classify", []).append(
                        {"id": scene.id, "image": image, "label": f"{obj.colour} {obj.shape}"})
        write_json(out / "scenes" / f"{split}.json", scene_records)
        write_json(out / "captions" / f"{split}.json", captions)
        write_json(out / "captions_short" / f"{split}.json", short_captions)
        write_json(out / "instruct" / f"{split}.json", instruct)
        if cfg.task_files and split != "test":
            write_task_files(out, split, split_scenes, cfg)
        for family, items in evals.items():
            write_json(out / "eval" / split / f"{family}.json", items)
    write_json(out / "world.json", world_description(cfg, {s: len(v) for s, v in by_split.items()}))
    return out


def write_task_files(out: Path, split: str, scenes: Sequence[Scene], cfg: WorldConfig) -> None:
    """One conversation file per held-in family, in varied and in canonical ("plain") phrasing.
    Each variant draws the same scenes' questions from its own stream, so the other files' bytes do not
    depend on whether these are written."""
    for variant, phrasing in (("tasks", "varied"), ("tasks_plain", "canonical")):
        for index, family in enumerate(HELD_IN):
            rng = np.random.default_rng([cfg.seed, 3, SPLITS.index(split), index])
            records = [{"id": f"{scene.id}_{family}", "image": f"{split}/{scene.id}.png",
                        "conversations": conversation(scene, rng, (family,), cfg.turns_per_image, "<image>",
                                                      phrasing=phrasing)}
                       for scene in scenes if ask(family, scene, np.random.default_rng(0)) is not None]
            write_json(out / variant / family / f"{split}.json", records)


def load_world_description(world_dir: str | Path) -> dict:
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {world_dir} a world made by `bridgevlm world`?")
    return json.loads(path.read_text(encoding="utf-8"))
