"""BLIP-2 stage 1 on a tiny world: train, evaluate retrieval, save, reload, resume; the recipe files."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, CLIPVisionConfig, CLIPVisionModel

from bridgevlm.config import ConfigError, from_dict, load_config, to_dict
from bridgevlm.data.captions import caption_pairs
from bridgevlm.data.images import ImageProcessor, load_image
from bridgevlm.eval.qformer_retrieval import caption_retrieval
from bridgevlm.models.vision import VisionTower
from bridgevlm.models.blip2_stage1 import (load_stage1_config, load_stage1_pretrainer, load_stage1_qformer,
                                           load_text_tokenizer)
from bridgevlm.recipes.blip2 import Blip2Stage1Recipe, build_pretrainer, run_blip2_stage1
from bridgevlm.recipes.registry import load_recipe, run_recipe_file

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
STEPS = 4  # one caption file of 48 images at batch 16: 3 steps an epoch, so the run enters a second epoch
TINY_QFORMER = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "num_query_tokens": 4,
                "max_position_embeddings": 64, "lm_head": "tied"}


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory):
    """A 2-layer CLIP vision tower on 32 px images (2x2 patches + CLS = 5 feature tokens)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("blip2_tower")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(out)
    return out


def tiny_recipe(world, tokenizer, tower, **train) -> Blip2Stage1Recipe:
    return from_dict(Blip2Stage1Recipe, {
        "world": str(world), "captions": ["captions/train.json"], "tokenizer": str(tokenizer),
        "vision": {"path": str(tower), "feature_layer": -2, "select": "full"},
        "qformer": TINY_QFORMER, "objectives": {"embed_dim": 16, "max_text_length": 64},
        "eval": {"split": "val", "retrieval": {"rerank_top_k": 4}},
        "train": {"batch_size": 16, "max_steps": STEPS, "log_every": 1, "optim": {"lr": 1e-3}, **train}})


@pytest.fixture(scope="module")
def stage1_run(shapes_world, world_tokenizer_dir, tiny_tower, tmp_path_factory):
    """The tiny run, counting the images that go through the vision tower."""
    recipe = tiny_recipe(shapes_world, world_tokenizer_dir, tiny_tower)
    run_dir = tmp_path_factory.mktemp("blip2_run")
    with pytest.MonkeyPatch.context() as patch:
        encoded = count_tower_images(patch)
        result = run_blip2_stage1(recipe, run_dir, progress=False)
    return recipe, run_dir, result, encoded


def count_tower_images(patch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches the vision tower encodes from now on."""
    encoded = []
    forward = VisionTower.forward

    def counting(self, pixel_values):
        encoded.append(len(pixel_values))
        return forward(self, pixel_values)

    patch.setattr(VisionTower, "forward", counting)
    return encoded


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_dir_holds_the_config_and_retrieval_metrics(stage1_run):
    recipe, run_dir, result, _ = stage1_run
    assert load_config(Blip2Stage1Recipe, run_dir / "config.yaml") == recipe
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == result["metrics"] and result["steps"] == STEPS
    for name in ("itc", "itm"):
        for direction in ("recall", "text_recall"):
            recalls = [metrics[f"{name}_{direction}_at_{k}"] for k in (1, 5, 10)]
            assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls), (name, direction)


def test_each_loss_is_logged_separately(stage1_run):
    _, run_dir, _, _ = stage1_run
    train_lines = [line for line in _lines(run_dir) if "loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, STEPS + 1))
    for line in train_lines:
        assert all(line[f"loss_{name}"] > 0 for name in ("itc", "itm", "itg"))
        assert line["loss"] == pytest.approx(line["loss_itc"] + line["loss_itm"] + line["loss_itg"], rel=1e-5)
    evaluated = [line for line in _lines(run_dir) if "eval/itc_recall_at_1" in line]
    assert [line["step"] for line in evaluated] == [STEPS]


def test_the_tower_encodes_each_image_once_however_many_epochs(stage1_run, shapes_world):
    recipe, _, _, encoded = stage1_run
    images = {image for name in ("captions/train.json", "captions/val.json")
              for image, _ in caption_pairs(shapes_world / name)}
    assert STEPS > 3  # the run went into a second epoch
    assert sum(encoded) == len(images)  # the cache fill, and nothing during training or evaluation


def test_the_model_dir_reloads_the_trained_qformer(stage1_run, shapes_world):
    recipe, run_dir, _, _ = stage1_run
    model = load_stage1_pretrainer(run_dir / "model").eval()
    # the checkpoint's trainable weights are the saved ones
    state = load_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    params = dict(model.named_parameters())
    assert state and all(torch.equal(params[name], tensor) for name, tensor in state.items())
    # the saved model scores what the run scored, and the bare Q-Former computes the same queries
    tokenizer = load_text_tokenizer(run_dir / "model")
    config = load_stage1_config(run_dir / "model")
    tower = VisionTower.from_pretrained(config.vision)
    pairs = caption_pairs(shapes_world / "captions/val.json")
    processor = ImageProcessor(size=tower.image_size)
    with torch.no_grad():
        features = tower(processor.normalize(torch.stack([processor.to_uint8(load_image(shapes_world / "images" / p))
                                                          for p, _ in pairs])))
    again = caption_retrieval(model, tokenizer, features, [c for _, c in pairs], config.objectives.max_text_length,
                              recipe.eval.retrieval)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert again == pytest.approx(saved, abs=1e-6)
    qformer = load_stage1_qformer(run_dir / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(qformer(features).queries, model.qformer(features).queries, rtol=0, atol=0)
    assert config.qformer.vocab_size == len(tokenizer) + 1 and config.objectives.dec_token_id == len(tokenizer)
    assert config.objectives.cls_token_id == tokenizer.bos_token_id


def test_resume_trains_only_the_new_steps_from_the_filled_cache(stage1_run, tmp_path, monkeypatch):
    recipe, run_dir, _, _ = stage1_run
    shutil.copytree(run_dir, tmp_path / "run")
    encoded = count_tower_images(monkeypatch)
    longer = copy.deepcopy(recipe)
    longer.train.max_steps = STEPS + 2
    result = run_blip2_stage1(longer, tmp_path / "run", progress=False)
    assert result["steps"] == STEPS + 2 and not encoded
    assert [line["step"] for line in result["history"] if "loss" in line] == [STEPS + 1, STEPS + 2]
    assert [line["step"] for line in _lines(tmp_path / "run") if "loss" in line] == list(range(1, STEPS + 3))
    # A finished run trains nothing more and evaluates the model it has.
    again = run_blip2_stage1(longer, tmp_path / "run", progress=False)
    assert again["steps"] == STEPS + 2 and not again["history"]
    assert again["metrics"] == pytest.approx(result["metrics"], abs=1e-6)


def test_objectives_off_in_the_yaml_are_not_logged(shapes_world, world_tokenizer_dir, tiny_tower, tmp_path):
    recipe = to_dict(tiny_recipe(shapes_world, world_tokenizer_dir, tiny_tower, max_steps=2))
    recipe["objectives"]["itg"] = False
    recipe["eval"]["split"] = ""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"task": "blip2_stage1", **recipe}))
    result = run_recipe_file(path, ["cache_vision_features=false"], tmp_path / "run", progress=False)
    train_lines = [line for line in _lines(tmp_path / "run") if "loss" in line]
    assert len(train_lines) == 2 and result["metrics"] == {}
    assert all("loss_itc" in line and "loss_itm" in line and "loss_itg" not in line for line in train_lines)
    assert not (tmp_path / "run" / "feature_cache").exists()


def test_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("task: blip2_stage1\nqformer: {num_querys: 4}\n")
    with pytest.raises(ConfigError, match=r"qformer\.num_querys.*num_query_tokens") as error:
        load_recipe(path)
    assert str(path) in str(error.value)


def test_a_partial_section_keeps_the_recipes_other_values(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("task: blip2_stage1\nqformer: {num_layers: 2}\n")
    _, recipe = load_recipe(path, ["objectives.itg=false"])
    default = Blip2Stage1Recipe()
    assert recipe.qformer.num_layers == 2 and recipe.qformer.hidden_size == default.qformer.hidden_size
    assert not recipe.objectives.itg and recipe.objectives.embed_dim == default.objectives.embed_dim


def test_the_shapes_and_paper_recipes_parse():
    task, shapes = load_recipe(REPO / "configs/shapes/blip2_stage1.yaml", ["world=w"])
    assert task == "blip2_stage1" and shapes.world == "w" and shapes.cache_vision_features
    assert shapes.objectives.enabled == ("itc", "itm", "itg")
    task, paper = load_recipe(REPO / "configs/blip2/stage1.yaml")
    assert task == "blip2_stage1" and paper.bert and paper.tokenizer is None
    assert (paper.qformer.hidden_size, paper.qformer.num_layers, paper.qformer.num_query_tokens) == (768, 12, 32)
    assert paper.qformer.cross_attention_frequency == 2 and paper.vision.feature_layer == -2
    optim, schedule = paper.train.optim, paper.train.schedule
    assert (optim.lr, optim.weight_decay, optim.betas) == (1e-4, 0.05, (0.9, 0.98))
    assert (schedule.kind, schedule.warmup_steps, paper.train.max_steps) == ("cosine", 2000, 250_000)
    assert paper.train.precision == "bf16"


def test_bert_initialises_the_qformer_with_its_own_tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    bert_dir = tmp_path / "bert"
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert_dir)
    recipe = from_dict(Blip2Stage1Recipe, {"bert": str(bert_dir), "qformer": TINY_QFORMER})
    tokenizer = load_text_tokenizer(bert_dir)  # the recipe's default when `bert` is set
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)  # [CLS] and [SEP]
    model = build_pretrainer(recipe, tokenizer, None, vision_width=32)
    bert = load_file(bert_dir / "model.safetensors")
    words_weight = model.qformer.embeddings.words.weight
    assert words_weight.shape[0] == len(words) + 1 and model.config.dec_token_id == len(words)
    torch.testing.assert_close(words_weight[:len(words)], bert["bert.embeddings.word_embeddings.weight"])

    other = BertTokenizer(vocab={w: i for i, w in enumerate(words + ["green"])})  # not BERT's vocabulary
    with pytest.raises(ValueError, match="use BERT's own tokenizer"):
        build_pretrainer(recipe, other, None, vision_width=32)


def test_a_conflicting_derived_field_is_named(world_tokenizer_dir):
    recipe = from_dict(Blip2Stage1Recipe, {"qformer": {**TINY_QFORMER, "vocab_size": 7}})
    tokenizer = load_text_tokenizer(world_tokenizer_dir)
    with pytest.raises(ValueError, match=r"qformer\.vocab_size is 7, but it follows the tokenizer"):
        build_pretrainer(recipe, tokenizer, None, vision_width=32)
