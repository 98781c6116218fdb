"""The embedded backbones: a tokenizer, a tiny CLIP and a tiny LLM, all made on the Shapes world.

They play the roles a user fills with downloaded checkpoints (CLIP ViT-L/14, Vicuna). They are
made once by this recipe and shipped in `bridgevlm/assets/backbones`, with the command, seed, time
and scores recorded in its `manifest.json`; `bridgevlm quickstart --from-scratch` makes them anew.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .. import __version__
from ..config import save_config, to_dict
from ..data.images import ImageProcessor
from ..data.templates import get_template
from ..eval.clip_eval import evaluate_clip_on_world
from ..io import write_json
from ..models.contrastive import ContrastiveModel
from ..models.llm import LanguageModel
from ..data.formats import read_conversations
from ..data.shapes.world import WorldConfig, build_world, scene_keys, text_conversations
from ..models.tokenizer import train_tokenizer
from ..train.distributed import barrier, init_distributed
from .clip import ClipRecipe, run_clip
from .lm import LmRecipe, evaluate_lm, run_lm

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "backbones"
CHECK_LIMIT = 40


@dataclass
class BackboneRecipe:
    world: WorldConfig = field(default_factory=WorldConfig)
    tokenizer_vocab_size: int = 1024
    tokenizer_corpus_scenes: int = 20000
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    # A second CLIP run that continues from the first one's model (its `pretrained` is set to it), e.g.
    # with NegCLIP hard negatives on the attribute the first run learnt least; its model is the one shipped.
    clip_finetune: ClipRecipe | None = None
    lm: LmRecipe = field(default_factory=LmRecipe)


def make_backbones(recipe: BackboneRecipe, out_dir: str | Path, world_dir: str | Path | None = None,
                   progress: bool = True, command: str | None = None) -> dict:
    """World (unless given) -> tokenizer -> CLIP -> LLM, each under out_dir; returns the manifest.

    Writes out_dir/{tokenizer,clip,lm} (each loadable with plain `transformers`), the training
    runs under out_dir/runs, and out_dir/manifest.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config({"task": "backbones", **to_dict(recipe)}, out_dir / "recipe.yaml")
    timings = {}

    dist = init_distributed()
    # Steps already done by an earlier call are reused; only work done here is timed.
    start = time.time()
    world_dir = Path(world_dir) if world_dir else out_dir / "world"
    if not (world_dir / "world.json").is_file() and dist.is_main:
        build_world(world_dir, recipe.world, progress=progress)
        timings["world"] = time.time() - start

    start = time.time()
    tokenizer_dir = out_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file() and dist.is_main:
        train_tokenizer(_tokenizer_corpus(recipe, world_dir), recipe.tokenizer_vocab_size, tokenizer_dir)
        timings["tokenizer"] = time.time() - start
    barrier()  # under torchrun, the other ranks use what rank 0 wrote

    # Each stage resumes from its run directory's checkpoints, so an interrupted build loses nothing.
    results = {}
    chains = _run_chains(recipe)
    for name, chain in chains.items():
        run, steps, previous = {"clip": run_clip, "lm": run_lm}[name], 0, None
        for run_name, sub_recipe in chain:
            sub_recipe.world, sub_recipe.tokenizer = str(world_dir), str(tokenizer_dir)
            if previous is not None:  # a later run continues from the model of the one before
                sub_recipe.pretrained = str(previous / "model")
            result = run(sub_recipe, out_dir / "runs" / run_name, progress=progress)
            steps += result["steps"]
            previous = out_dir / "runs" / run_name
        results[name] = {**result, "steps": steps}
        if not dist.is_main:
            continue
        _replace_dir(previous / "model", out_dir / name)
        timings[name] = sum(_training_seconds(out_dir / "runs" / run_name) for run_name, _ in chain)

    if not dist.is_main:
        return {}
    test_metrics = evaluate_backbones(out_dir, world_dir, "test", recipe.lm.template)
    check_metrics = evaluate_backbones(out_dir, world_dir, "test", recipe.lm.template, limit_per_family=CHECK_LIMIT)
    manifest = {
        "command": command or "bridgevlm " + " ".join(sys.argv[1:]),
        "seed": {"world": recipe.world.seed, "clip": recipe.clip.train.seed, "lm": recipe.lm.train.seed,
                 "lm_corpus": recipe.lm.corpus_seed},
        "world": to_dict(recipe.world),
        "train_seconds": {k: round(v, 1) for k, v in timings.items()},
        "steps": {name: r["steps"] for name, r in results.items()},
        "lm_template": recipe.lm.template,
        "val_metrics": {name: r["metrics"] for name, r in results.items()},
        "test_metrics": test_metrics,
        # A quick re-check (first CHECK_LIMIT items per family) that tests compare the shipped files against.
        "check_metrics": check_metrics,
        "code": {"bridgevlm": __version__, "git_commit": _git_commit()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    write_json(out_dir / "manifest.json", manifest)
    history = {run_name: _read_jsonl(out_dir / "runs" / run_name / "metrics.jsonl")
               for chain in chains.values() for run_name, _ in chain}
    write_json(out_dir / "history.json", history, indent=None)
    return manifest


def _run_chains(recipe: BackboneRecipe) -> dict[str, list[tuple[str, object]]]:
    """Per backbone, its runs in order as (directory name under out_dir/runs, recipe)."""
    clip = [("clip", recipe.clip)] + ([("clip_finetune", recipe.clip_finetune)] if recipe.clip_finetune else [])
    return {"clip": clip, "lm": [("lm", recipe.lm)]}


def evaluate_backbones(backbones_dir: str | Path, world_dir: str | Path, split: str = "test",
                       template: str = "vicuna_v1_nosys", limit_per_family: int | None = None) -> dict:
    """{'clip': zero-shot + retrieval, 'lm': text QA + answer perplexity} on a world's split."""
    backbones_dir = Path(backbones_dir)
    clip = ContrastiveModel.from_pretrained(backbones_dir / "clip")
    clip_tokenizer = AutoTokenizer.from_pretrained(backbones_dir / "clip")
    processor = ImageProcessor(size=clip.clip.config.vision_config.image_size)
    lm = LanguageModel.from_pretrained(backbones_dir / "lm")
    lm_tokenizer = AutoTokenizer.from_pretrained(backbones_dir / "lm")
    return {
        "clip": evaluate_clip_on_world(clip, clip_tokenizer, processor, world_dir, split),
        "lm": evaluate_lm(lm, lm_tokenizer, get_template(template, lm_tokenizer), world_dir, split, limit_per_family),
    }


def _tokenizer_corpus(recipe: BackboneRecipe, world_dir: Path):
    """Every text the models will meet: the world's files, the LM's text conversations, the templates."""
    for name in ("captions/train.json", "captions_short/train.json", "instruct/train.json"):
        for record in read_conversations(world_dir / name):
            for message in record["conversations"]:
                yield message["value"]
    for record in text_conversations(recipe.lm.corpus_seed, recipe.tokenizer_corpus_scenes,
                                      scene_keys(world_dir), recipe.lm.turns_per_scene):
        for message in record["conversations"]:
            yield message["value"]
    yield "USER: ASSISTANT: a photo of a picture of an image with a drawing of"


def _git_commit() -> str | None:
    """The checkout's commit, when bridgevlm runs from a git checkout (provenance for the manifest)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _training_seconds(run_dir: Path) -> float:
    """Training time summed over every (possibly resumed) session of a run, evaluation excluded."""
    return sum(h.get("seconds", 0.0) for h in _read_jsonl(run_dir / "metrics.jsonl") if "loss" in h)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def load_manifest(backbones_dir: str | Path = SHIPPED) -> dict:
    path = Path(backbones_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: no backbones there. Make them with `bridgevlm quickstart --from-scratch` "
            f"or `bridgevlm train configs/shapes/backbones.yaml --out DIR`.")
    return json.loads(path.read_text(encoding="utf-8"))
