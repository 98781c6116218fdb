"""Shared fixtures: a small byte-level BPE tokenizer trained once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from bridgevlm.data.templates import VICUNA_SYSTEM
from bridgevlm.models.tokenizer import train_tokenizer

CORPUS = [
    VICUNA_SYSTEM,
    "USER: <image>\nWhat colour is the circle? ASSISTANT: red",
    "USER: How many squares are there? ASSISTANT: 2",
    "There are 3 objects. A large red circle at the top left. A small blue square at the middle center.",
    "A small green triangle at the bottom right. The word cat is written at the top center.",
    "Is there a yellow diamond? yes no. Where is the purple star? orange objects.",
    "a photo of a {}. hello world, the quick brown fox jumps over the lazy dog.",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread; with the cores shared with other jobs, OpenMP's
    spin-waiting across two threads can make a millisecond step take most of a second."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# A tiny Shapes world and tiny backbones, shared by the recipe, eval, quickstart and CLI tests.
# --------------------------------------------------------------------------------------------

# Seed 2 gives 60-scene worlds whose val and test splits both hold a single-object scene (so
# eval/<split>/classify.json exists) and a scene with rendered text (so every QA family has items).
TINY_WORLD = {"seed": 2, "scenes": 60}
TINY_CLIP = {"image_size": 96, "patch_size": 32, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
             "text_hidden": 32, "text_layers": 1, "text_heads": 2, "projection_dim": 16}
TINY_LLAMA = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_positions": 512}
TINY_TRAIN = {"batch_size": 8, "max_steps": 3, "log_every": 1}
TINY_LM_DATA = {"corpus_scenes": 50, "turns_per_scene": 3, "eval_limit_per_family": 3}


def tiny_backbone_dict(steps: int = 3) -> dict:
    """The fields of a BackboneRecipe (as a YAML file would hold them) for seconds-long backbones."""
    train = {**TINY_TRAIN, "max_steps": steps}
    return {"world": dict(TINY_WORLD), "tokenizer_vocab_size": 400, "tokenizer_corpus_scenes": 50,
            "clip": {"model": dict(TINY_CLIP), "train": dict(train)},
            "lm": {"model": dict(TINY_LLAMA), **TINY_LM_DATA, "train": dict(train)}}


class _Tiny:
    """Factories for tiny recipes: tiny.clip(world, tokenizer), tiny.lm(...), tiny.backbones()."""

    world_config = TINY_WORLD
    backbone_dict = staticmethod(tiny_backbone_dict)

    @staticmethod
    def clip(world, tokenizer, **train):
        from bridgevlm.config import from_dict
        from bridgevlm.recipes.clip import ClipRecipe

        return from_dict(ClipRecipe, {"world": str(world), "tokenizer": str(tokenizer), "model": dict(TINY_CLIP),
                                      "train": {**TINY_TRAIN, **train}})

    @staticmethod
    def lm(world, tokenizer, **train):
        from bridgevlm.config import from_dict
        from bridgevlm.recipes.lm import LmRecipe

        return from_dict(LmRecipe, {"world": str(world), "tokenizer": str(tokenizer), "model": dict(TINY_LLAMA),
                                    **TINY_LM_DATA, "train": {**TINY_TRAIN, **train}})

    @staticmethod
    def quickstart_recipes(directory, steps: int = 2) -> dict:
        """The quickstart's recipes (bridgevlm.quickstart.RECIPES) with tiny bridges and seconds-long stages,
        written into `directory` (variants that extend another extend the tiny copy). Returns {name: path}."""
        import yaml

        from bridgevlm.quickstart import RECIPES

        tiny_connector = {"partial_lora": {"rank": 4, "alpha": 4.0},
                          "gated_xattn": {"num_latents": 4, "resampler_layers": 1, "resampler_heads": 2,
                                          "resampler_head_dim": 8, "heads": 2, "head_dim": 8},
                          "adapter": {"bottleneck": 4}}
        paths = {}
        for name, source in RECIPES.items():
            recipe = yaml.safe_load(source.read_text())
            if name == "blip2_stage1":
                recipe["qformer"].update(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                         num_query_tokens=4)
                recipe["objectives"].update(embed_dim=16)
                recipe["eval"]["retrieval"].update(rerank_top_k=4)
                recipe["train"].update(batch_size=8, max_steps=steps, eval_every=steps, save_every=steps, log_every=1)
            elif "extends" in recipe:  # a variant: only what differs, over its base's tiny copy
                recipe["extends"] = Path(recipe["extends"]).name
            else:
                for key, value in tiny_connector.items():
                    if key in recipe["model"]["connector"]:
                        recipe["model"]["connector"][key].update(value)
                for stage in recipe["stages"]:
                    stage["train"].update(batch_size=4, max_steps=steps, eval_every=2, log_every=1)
                    stage["data"].pop("samples_per_epoch", None)
                recipe["eval"].update(limit_per_family=2, progress_limit_per_family=1)
            paths[name] = directory / source.name
            paths[name].write_text(yaml.safe_dump(recipe))
        return paths

    @staticmethod
    def backbones(steps: int = 3):
        from bridgevlm.config import from_dict
        from bridgevlm.recipes.backbones import BackboneRecipe

        return from_dict(BackboneRecipe, tiny_backbone_dict(steps))


@pytest.fixture(scope="session")
def tiny():
    return _Tiny()


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """A 60-scene Shapes world (read-only for tests)."""
    from bridgevlm.data.shapes.world import WorldConfig, build_world

    return build_world(tmp_path_factory.mktemp("shapes") / "world", WorldConfig(**TINY_WORLD), progress=False)


@pytest.fixture(scope="session")
def world_tokenizer_dir(shapes_world, tmp_path_factory):
    """A tokenizer (Hugging Face directory) trained on the tiny world's caption and instruction texts."""
    from bridgevlm.data.formats import read_conversations

    texts = [message["value"]
             for name in ("captions/train.json", "captions_short/train.json", "instruct/train.json")
             for record in read_conversations(shapes_world / name) for message in record["conversations"]]
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts + ["a photo of a picture of an image with a drawing of"], vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """A backbones directory (tokenizer, clip, lm, manifest.json, history.json) made by
    `make_backbones` with 3 training steps per model on a 60-scene world."""
    import torch

    from bridgevlm.recipes.backbones import make_backbones

    out = tmp_path_factory.mktemp("backbones")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_backbones(_Tiny.backbones(), out, progress=False, command="pytest tiny backbones")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def vlm_parts(tokenizer, tmp_path_factory):
    """Saved pretrained parts of a tiny VLM: `vision/` (a CLIP vision tower, 32 px, 4x4 patches of 8)
    and `llm/` (a Llama with the session tokenizer). Returns a dict for VlmConfig."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from bridgevlm.models.llm import TinyLlamaConfig, build_tiny_llama

    out = tmp_path_factory.mktemp("vlm_parts")
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=2))
    vision.save_pretrained(out / "vision")
    llm = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer)
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return {"vision": {"path": str(out / "vision")}, "llm": str(out / "llm"), "connector": {"kind": "mlp2x_gelu"}}


@pytest.fixture(scope="session")
def saved_vlm(vlm_parts, tmp_path_factory):
    """A saved tiny VLM (`vlm_parts`, mlp2x_gelu) with decisive logits, and three one-colour images:
    (model directory, [red.png, blue.png, green.png])."""
    import torch
    from PIL import Image

    from bridgevlm.config import from_dict
    from bridgevlm.models.assemble import VlmConfig, build_vlm, save_vlm

    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, vlm_parts))
    with torch.no_grad():  # decisive logits: a random tiny LM is otherwise nearly uniform
        loaded.model.llm.model.lm_head.weight.mul_(30)
        loaded.model.connector.layers[2].weight.mul_(30)
    out = tmp_path_factory.mktemp("vlm") / "model"
    save_vlm(loaded, out)
    images = []
    for colour in ("red", "blue", "green"):
        images.append(out.parent / f"{colour}.png")
        Image.new("RGB", (50, 40), colour).save(images[-1])
    return out, images


@pytest.fixture(scope="session")
def opt_parts(vlm_parts, tokenizer, tmp_path_factory):
    """`vlm_parts` with a tiny OPT (learned positions, biased Linears, an FFN that flattens its input) in
    place of the Llama."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out = tmp_path_factory.mktemp("opt_parts")
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {**vlm_parts, "llm": str(out)}


@pytest.fixture(scope="session")
def t5_parts(vlm_parts, tokenizer, tmp_path_factory):
    """`vlm_parts` with a tiny FlanT5-shaped encoder-decoder LLM (the session tokenizer; the decoder
    starts from the pad id, as T5's does) in place of the Llama."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("t5_parts")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {**vlm_parts, "llm": str(out), "image_aspect": "crop"}


@pytest.fixture(scope="session")
def stage1_run(vlm_parts, shapes_world, world_tokenizer_dir, tmp_path_factory):
    """A finished two-step `blip2_stage1` run directory whose Q-Former reads `vlm_parts`' vision tower
    (layer -2, every token) and tokenises with the world tokenizer, as a stage-2 connector starts from."""
    import torch

    from bridgevlm.config import from_dict
    from bridgevlm.recipes.blip2 import Blip2Stage1Recipe, run_blip2_stage1

    recipe = from_dict(Blip2Stage1Recipe, {
        "world": str(shapes_world), "captions": ["captions/train.json"], "tokenizer": str(world_tokenizer_dir),
        "vision": {"path": vlm_parts["vision"]["path"], "feature_layer": -2, "select": "full"},
        "qformer": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                    "num_query_tokens": 4, "max_position_embeddings": 64, "lm_head": "tied"},
        "objectives": {"embed_dim": 16, "max_text_length": 64}, "eval": {"split": ""},
        "train": {"batch_size": 8, "max_steps": 2, "log_every": 1, "optim": {"lr": 1e-3}}})
    out = tmp_path_factory.mktemp("blip2_stage1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_blip2_stage1(recipe, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def qformer_parts(vlm_parts, stage1_run):
    """`vlm_parts` with the vision features `stage1_run` read and a Q-Former connector starting from it."""
    return {**vlm_parts, "vision": {**vlm_parts["vision"], "feature_layer": -2, "select": "full"},
            "connector": {"kind": "qformer", "init": str(stage1_run)}}


class ConnectorCalls(list):
    """The instruction ids and mask [I, Tq] of each QFormerConnector call, or None for a call without."""

    def texts(self, tokenizer) -> list[list[str] | None]:
        """Each call's instructions as text, one per image."""
        return [None if call is None else [tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
                                           for row, keep in zip(*call)] for call in self]


@pytest.fixture
def connector_calls(monkeypatch):
    """Records what every QFormerConnector call receives from now on (a ConnectorCalls)."""
    import torch

    from bridgevlm.models.connectors import QFormerConnector

    calls = ConnectorCalls()
    forward = QFormerConnector.forward

    def recording(self, features, instruction_ids=None, instruction_mask=None):
        if instruction_ids is None:
            calls.append(None)
        else:
            mask = torch.ones_like(instruction_ids) if instruction_mask is None else instruction_mask
            calls.append((instruction_ids.clone(), mask.clone()))
        return forward(self, features, instruction_ids, instruction_mask)

    monkeypatch.setattr(QFormerConnector, "forward", recording)
    return calls
