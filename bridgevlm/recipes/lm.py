"""Pretraining the embedded language model on scenes-as-text conversations.

A real user downloads a pretrained LLM; the embedded default has to make one that plays that role:
it must know the language of every task family (held-out ones included) and answer from a scene
given as text, before any image is involved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..config import save_config, to_dict
from ..data.formats import read_conversations
from ..data.shapes.scene import MAX_OBJECTS
from ..data.shapes.world import scene_keys, text_conversations
from ..data.templates import IGNORE_INDEX, get_template, tokenize_conversation
from ..data.conversations import ConversationDataset, PadCollator
from ..eval.text_qa import evaluate_text_qa, length_batches, prompt_messages, scene_descriptions
from ..io import write_json
from ..models.llm import LanguageModel, TinyLlamaConfig, build_tiny_llama, grow_layers
from ..train.distributed import barrier, init_distributed
from ..train.loop import TrainConfig, seed_everything, train_stage


@dataclass
class LmPhase:
    """One phase of a language-model curriculum: a corpus and a step count; every field left None
    keeps the recipe's own value. Each phase continues from the weights the previous one ended with."""
    name: str
    max_steps: int
    scene_text: Literal["detailed", "compact", "minimal"] | None = None
    phrasing: Literal["varied", "canonical"] | None = None
    families: list[str] | None = None  # question families of this phase's corpus (None: all)
    family_weights: dict[str, float] | None = None  # a family's share of the questions, times this (default 1)
    max_objects: int | None = None  # objects per scene at most (None: the world's full range)
    turns_per_scene: int | None = None
    corpus_scenes: int | None = None
    describe_probability: float | None = None
    supervise_all: bool | None = None
    batch_size: int | None = None
    lr: float | None = None
    grow_layers: int = 0  # decoder layers appended (function-preserving) before this phase trains


@dataclass
class LmRecipe:
    world: str = ""  # world whose val/test scenes are kept out of the corpus and used for evaluation
    tokenizer: str = ""
    pretrained: str | None = None  # a causal-LM directory to continue from; None builds `model`
    model: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)
    # Decoder layers appended to the loaded model before training, initialised so that it computes
    # what it did (see grow_layers): depth for a trained LM without starting over. In a curriculum
    # they are added once, before the first phase.
    grow_layers: int = 0
    template: str = "vicuna_v1_nosys"
    corpus: str | None = None  # a LLaVA-format conversation file; None generates the Shapes text corpus
    corpus_scenes: int = 60000
    corpus_seed: int = 0
    turns_per_scene: int = 12
    describe_probability: float = 0.35  # share of conversations that also ask for the scene's description
    describe_first: bool = False  # ask for it before the questions rather than after
    # A curriculum stage's corpus: "compact" scene text and "canonical" phrasing make in-context
    # look-ups short-range and the question form fixed, which is where a tiny LM first learns them;
    # a later run (`pretrained:` this one) continues on the detailed, varied corpus.
    scene_text: Literal["detailed", "compact", "minimal"] = "detailed"
    phrasing: Literal["varied", "canonical"] = "varied"
    families: list[str] | None = None  # question families of the corpus (None: all)
    # Multiplies a family's share of the questions (default 1 each): more of the families learnt last.
    family_weights: dict[str, float] = field(default_factory=dict)
    max_objects: int = MAX_OBJECTS
    # Language-model loss on every token (prompts included), not only on replies: predicting the
    # objects a question mentions trains the same look-up circuits that answering needs.
    supervise_all: bool = True
    max_length: int = 512
    pretokenize: bool = True  # tokenise the corpus up front, so no data workers compete with training
    eval_split: str = "val"
    eval_limit_per_family: int = 100
    train: TrainConfig = field(default_factory=TrainConfig)
    # Phases run in order, each from the weights the previous one ended with (the first from
    # `pretrained` or a fresh `model`); empty: one run on the corpus above.
    curriculum: list[LmPhase] = field(default_factory=list)


def phase_recipe(recipe: LmRecipe, phase: LmPhase, index: int, pretrained: str | None) -> LmRecipe:
    """The single-run recipe of curriculum phase `phase` (its corpus drawn with its own seed)."""
    corpus = {name: getattr(phase, name) for name in ("scene_text", "phrasing", "families", "family_weights",
                                                        "max_objects", "turns_per_scene", "corpus_scenes",
                                                        "describe_probability", "supervise_all")
              if getattr(phase, name) is not None}
    train = dataclasses.replace(recipe.train, max_steps=phase.max_steps, batch_size=phase.batch_size or recipe.train.batch_size,
                                optim=dataclasses.replace(recipe.train.optim, lr=phase.lr or recipe.train.optim.lr))
    grow = phase.grow_layers + (recipe.grow_layers if index == 0 else 0)
    return dataclasses.replace(recipe, **corpus, corpus_seed=recipe.corpus_seed + index, pretrained=pretrained,
                               grow_layers=grow, train=train, curriculum=[])


def run_lm(recipe: LmRecipe, run_dir: str | Path, progress: bool = True) -> dict:
    """Train, evaluate text QA on `eval_split`, save a `transformers`-loadable model to run_dir/model.

    A curriculum runs each phase in run_dir/phases/<name> (a finished phase is not run again;
    an interrupted one resumes from its checkpoints) and ends with the last phase's model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(to_dict(recipe), run_dir / "config.yaml")
    if recipe.curriculum:
        return _run_curriculum(recipe, run_dir, progress)
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
    template = get_template(recipe.template, tokenizer)
    seed_everything(recipe.train.seed)  # before building: initial weights depend on it
    model = LanguageModel.from_pretrained(recipe.pretrained) if recipe.pretrained else LanguageModel(
        build_tiny_llama(recipe.model, tokenizer))
    grow_layers(model.model, recipe.grow_layers)

    dist = init_distributed()
    corpus_path = Path(recipe.corpus) if recipe.corpus else run_dir / "corpus.json"
    if recipe.corpus is None and not corpus_path.is_file() and dist.is_main:
        records = text_conversations(recipe.corpus_seed, recipe.corpus_scenes, scene_keys(recipe.world),
                                     recipe.turns_per_scene, describe_probability=recipe.describe_probability,
                                     describe_first=recipe.describe_first, scene_text=recipe.scene_text,
                                     phrasing=recipe.phrasing, families=recipe.families, max_objects=recipe.max_objects,
                                     family_weights=recipe.family_weights)
        write_json(corpus_path, records)
    barrier()  # the other ranks read the corpus rank 0 wrote
    records = read_conversations(corpus_path)
    dataset = ConversationDataset(records, tokenizer, template, recipe.max_length, source=str(corpus_path),
                                  pretokenize=recipe.pretokenize, supervise_all=recipe.supervise_all)

    def evaluate(lm, step):
        return evaluate_text_qa(lm, tokenizer, template, recipe.world, recipe.eval_split,
                                limit_per_family=recipe.eval_limit_per_family, scene_text=recipe.scene_text)

    result = train_stage(model, dataset, PadCollator(tokenizer.pad_token_id), recipe.train, run_dir,
                         eval_fn=evaluate, dist=dist, config_to_save=to_dict(recipe), progress=progress)
    if not dist.is_main:  # rank 0 saves and evaluates; the others are done
        return {"metrics": {}, "steps": result.steps, "history": result.history}
    model.model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    # scored on the scene text this run trained on: a compact first phase is judged on compact text
    metrics = evaluate_lm(model, tokenizer, template, recipe.world, recipe.eval_split, scene_text=recipe.scene_text)
    write_json(run_dir / "metrics.json", metrics)
    return {"metrics": metrics, "steps": result.steps, "history": result.history}


def _run_curriculum(recipe: LmRecipe, run_dir: Path, progress: bool) -> dict:
    names = [phase.name for phase in recipe.curriculum]
    if len(set(names)) != len(names):
        raise ValueError(f"curriculum phase names must be distinct, got {names}")
    pretrained, steps, history, result = recipe.pretrained, 0, [], {}
    for index, phase in enumerate(recipe.curriculum):
        phase_dir = run_dir / "phases" / phase.name
        if (phase_dir / "metrics.json").is_file() and (phase_dir / "model").is_dir():
            result = {"metrics": json.loads((phase_dir / "metrics.json").read_text(encoding="utf-8")),
                      "steps": phase.max_steps, "history": []}
        else:
            result = run_lm(phase_recipe(recipe, phase, index, pretrained), phase_dir, progress)
        pretrained, steps, history = str(phase_dir / "model"), steps + result["steps"], history + result["history"]
    if not init_distributed().is_main:
        return {"metrics": {}, "steps": steps, "history": history}
    if (run_dir / "model").exists():
        shutil.rmtree(run_dir / "model")
    shutil.copytree(pretrained, run_dir / "model")
    write_json(run_dir / "metrics.json", result["metrics"])
    # The whole curriculum's log in one file, each line tagged with its phase (steps count per phase).
    lines = [json.dumps({"phase": phase.name, **json.loads(line)})
             for phase in recipe.curriculum
             for line in (run_dir / "phases" / phase.name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"metrics": result["metrics"], "steps": steps, "history": history}


def evaluate_lm(model: LanguageModel, tokenizer, template, world: str | Path, split: str = "test",
                limit_per_family: int | None = None, scene_text: str = "detailed") -> dict:
    """Text-QA accuracy per family and answer-token perplexity on the split's questions."""
    metrics = evaluate_text_qa(model, tokenizer, template, world, split, limit_per_family=limit_per_family,
                               scene_text=scene_text)
    metrics["perplexity"] = answer_perplexity(model, tokenizer, template, world, split, limit_per_family, scene_text=scene_text)
    return metrics


def _final_answer_only(tokenizer, template, messages: list[dict]) -> dict:
    """Ids of the whole conversation, labels only on the last reply (earlier dialogue turns are context)."""
    full = tokenize_conversation(tokenizer, template, messages)
    prompt = tokenize_conversation(tokenizer, template, messages[:-1], add_generation_prompt=True)
    labels = [IGNORE_INDEX] * len(prompt.input_ids) + full.labels[len(prompt.input_ids):]
    return {"input_ids": full.input_ids, "labels": labels}


@torch.no_grad()
def answer_perplexity(model: LanguageModel, tokenizer, template, world: str | Path, split: str,
                      limit_per_family: int | None = None, batch_size: int = 64, scene_text: str = "detailed") -> float:
    """exp(mean NLL) of the reference answers (and their EOS) given scene text and question, on
    held-out scenes: the supervised tokens are exactly the ones the model was trained to produce."""
    world = Path(world)
    scenes = scene_descriptions(world, split, scene_text)
    families = json.loads((world / "world.json").read_text(encoding="utf-8"))["families"]
    records = []
    for family in families:
        items = json.loads((world / "eval" / split / f"{family}.json").read_text(encoding="utf-8"))
        for item in items[:limit_per_family] if limit_per_family else items:
            messages = prompt_messages(scenes[item["scene_id"]], item)
            records.append({"conversations": messages + [{"from": "gpt", "value": item["answer"]}]})
    samples = [_final_answer_only(tokenizer, template, r["conversations"]) for r in records]
    collate = PadCollator(tokenizer.pad_token_id)
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for rows in length_batches([len(s["input_ids"]) for s in samples], batch_size):
        batch = collate([samples[i] for i in rows])
        out = model({k: v.to(device) for k, v in batch.items()})
        total += out.loss_sum.item()
        count += int(out.num_targets)
    return math.exp(total / count)
