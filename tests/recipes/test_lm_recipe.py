import dataclasses
import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import bridgevlm.data.shapes.world as world_module
from bridgevlm.data.shapes.families import FAMILIES
from bridgevlm.data.shapes.scene import Scene, detailed_caption
from bridgevlm.data.shapes.world import scene_keys
from bridgevlm.data.templates import get_template, tokenize_conversation
from bridgevlm.eval.text_qa import prompt_messages
from bridgevlm.models.llm import LanguageModel
from bridgevlm.recipes.lm import LmPhase, answer_perplexity, run_lm

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3
INJECT_AT = (0, 2)  # sample_scene calls that are made to return a val/test scene's content


def _held_out_scenes(world):
    return [Scene.from_json(r) for split in ("val", "test")
            for r in json.loads((world / "scenes" / f"{split}.json").read_text())]


@pytest.fixture(scope="module")
def lm_run(shapes_world, world_tokenizer_dir, tiny, tmp_path_factory):
    """run_lm, with the corpus generator made to draw val/test scenes, to see them kept out."""
    held_out = _held_out_scenes(shapes_world)
    original = world_module.sample_scene
    sampled = []  # every scene the corpus generator drew, injected ones included

    def sample_scene(rng, scene_id, split, text_probability, *args):
        scene = original(rng, scene_id, split, text_probability, *args)
        if len(sampled) in INJECT_AT:
            twin = held_out[len(sampled)]
            scene = dataclasses.replace(twin, id=scene.id, split=split)
        sampled.append(scene)
        return scene

    recipe = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=STEPS)
    run_dir = tmp_path_factory.mktemp("lm_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(world_module, "sample_scene", sample_scene)
        result = run_lm(recipe, run_dir, progress=False)
    return recipe, run_dir, result, sampled


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_model_dir_loads_with_plain_transformers(lm_run):
    recipe, run_dir, _, _ = lm_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.hidden_size == recipe.model.hidden_size
    assert model.config.num_hidden_layers == recipe.model.num_layers
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer("a red circle")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_metrics(lm_run):
    _, run_dir, result, _ = lm_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == result["metrics"]
    per_family = {k: v for k, v in metrics.items() if k.startswith("text_qa.")}
    assert set(per_family) == {f"text_qa.{family}" for family in FAMILIES}
    assert len(per_family) == 10
    assert all(0.0 <= v <= 1.0 for v in per_family.values())
    assert metrics["text_qa_accuracy"] == pytest.approx(sum(per_family.values()) / len(per_family))
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1.0
    assert result["steps"] == STEPS
    assert [line["step"] for line in _lines(run_dir) if "loss" in line] == list(range(1, STEPS + 1))


def test_corpus_keeps_val_and_test_scenes_out(lm_run, shapes_world):
    recipe, run_dir, _, sampled = lm_run
    held_out = _held_out_scenes(shapes_world)
    excluded = scene_keys(shapes_world)
    assert {s.key() for s in held_out} == excluded
    # the generator did draw held-out scenes (the injected ones), so exclusion had work to do
    assert sum(s.key() in excluded for s in sampled) >= len(INJECT_AT)

    corpus = json.loads((run_dir / "corpus.json").read_text())
    assert len(corpus) == recipe.corpus_scenes
    kept = {s.id: s for s in sampled if s.key() not in excluded}  # the id of a skipped draw is reused
    assert [r["id"] for r in corpus] == list(kept)
    for record in corpus:
        scene = kept[record["id"]]
        assert scene.key() not in excluded
        assert record["conversations"][0]["value"].startswith(detailed_caption(scene) + "\n")
    # and by text: no conversation opens with a val/test scene's description
    held_out_texts = {detailed_caption(s) + "\n" for s in held_out}
    for record in corpus:
        first = record["conversations"][0]["value"]
        assert not any(first.startswith(text) for text in held_out_texts), record["id"]


def test_rerun_resumes_without_redoing_steps(lm_run, tiny, shapes_world, world_tokenizer_dir):
    recipe, run_dir, _, _ = lm_run
    corpus = (run_dir / "corpus.json").read_bytes()
    before = _lines(run_dir)
    again = run_lm(recipe, run_dir, progress=False)
    assert again["steps"] == STEPS
    assert not [h for h in again["history"] if "loss" in h]
    assert _lines(run_dir) == before
    assert (run_dir / "corpus.json").read_bytes() == corpus

    longer = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=STEPS + 2)
    extended = run_lm(longer, run_dir, progress=False)
    assert extended["steps"] == STEPS + 2
    assert [h["step"] for h in extended["history"] if "loss" in h] == [STEPS + 1, STEPS + 2]
    assert [line["step"] for line in _lines(run_dir) if "loss" in line] == list(range(1, STEPS + 3))


def test_curriculum_chains_phases_and_resumes(tiny, shapes_world, world_tokenizer_dir, tmp_path):
    recipe = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=99)
    recipe.curriculum = [
        LmPhase(name="lookup", max_steps=2, scene_text="compact", phrasing="canonical", families=["colour", "shape"],
                max_objects=2, turns_per_scene=1, describe_probability=0.0, batch_size=3),
        LmPhase(name="full", max_steps=3, family_weights={"reading": 2.0}),
    ]
    result = run_lm(recipe, tmp_path, progress=False)
    assert result["steps"] == 5
    assert [h["step"] for h in result["history"] if "loss" in h] == [1, 2, 1, 2, 3]

    first = json.loads((tmp_path / "phases" / "lookup" / "corpus.json").read_text())
    for record in first:
        turns = record["conversations"]
        assert len(turns) == 2  # one question per scene
        scene_text, question = turns[0]["value"].split("\n", 1)
        objects = [part for part in scene_text.rstrip(".").split(", ") if part.startswith(("small ", "large "))]
        assert 1 <= len(objects) <= 2 and "At the" not in scene_text  # compact text, two objects at most
        assert question.startswith(("What colour is", "What shape is"))
    second = json.loads((tmp_path / "phases" / "full" / "corpus.json").read_text())
    assert len(second) == recipe.corpus_scenes and second[0]["id"] == first[0]["id"]  # same ids, other draw
    assert second[0]["conversations"] != first[0]["conversations"]

    # each phase starts from the one before: the second run's config names the first one's model
    config = yaml.safe_load((tmp_path / "phases" / "full" / "config.yaml").read_text())
    assert config["pretrained"] == str(tmp_path / "phases" / "lookup" / "model")
    assert config["train"]["max_steps"] == 3 and config["corpus_seed"] == recipe.corpus_seed + 1
    assert config["family_weights"] == {"reading": 2.0}  # a phase's corpus settings reach its run
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    last = AutoModelForCausalLM.from_pretrained(tmp_path / "phases" / "full" / "model")
    for (name, a), (_, b) in zip(final.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "metrics.json").read_text()) == result["metrics"]
    logged = [(line["phase"], line["step"]) for line in _lines(tmp_path) if "loss" in line]
    assert logged == [("lookup", 1), ("lookup", 2), ("full", 1), ("full", 2), ("full", 3)]

    again = run_lm(recipe, tmp_path, progress=False)  # finished phases are not run again
    assert again["steps"] == 5 and again["history"] == []


# --------------------------------------------------------------------------------------------
# answer_perplexity against an independent computation from transformers' logits


def _random_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("batch_size", [64, 2])
def test_answer_perplexity_is_exp_mean_answer_nll(shapes_world, world_tokenizer_dir, batch_size, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    template = get_template("vicuna_v1_nosys")
    hf_model = _random_llama(tokenizer)
    # Dialogue items carry earlier turns as context: only each item's own answer is scored.
    families = ("colour", "count", "reading", "dialogue")

    # Two items each from a view of the world listing only these three families.
    world = shapes_world
    description = json.loads((world / "world.json").read_text())
    description["families"] = {f: description["families"][f] for f in families}
    small = _small_world(world, description, tmp_path / "small")
    scenes = {r["id"]: r for r in json.loads((world / "scenes" / "val.json").read_text())}

    total, count = 0.0, 0
    for family in families:
        items = json.loads((world / "eval" / "val" / f"{family}.json").read_text())[:2]
        for item in items:
            prompt = prompt_messages(scenes[item["scene_id"]]["detailed_caption"], item)
            prompt_ids = tokenize_conversation(tokenizer, template, prompt, add_generation_prompt=True).input_ids
            answer_ids = tokenizer(" " + item["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + answer_ids])
            with torch.no_grad():
                logprobs = hf_model(input_ids=ids).logits[0].double().log_softmax(-1)
            start = len(prompt_ids)
            for position, token in enumerate(answer_ids, start):
                total -= logprobs[position - 1, token].item()
                count += 1
    assert count > 8
    expected = math.exp(total / count)
    got = answer_perplexity(LanguageModel(hf_model), tokenizer, template, small, "val", limit_per_family=2,
                            batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-4)


def _small_world(world, description, root):
    """A view of `world` whose world.json lists only some families (the other files are links)."""
    root.mkdir()
    for name in ("scenes", "eval", "images"):
        (root / name).symlink_to(world / name)
    (root / "world.json").write_text(json.dumps(description))
    return root


def test_same_seed_gives_the_same_first_step_loss(shapes_world, world_tokenizer_dir, tiny, tmp_path):
    losses = []
    for name in ("first", "second"):
        recipe = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=1, log_every=1)
        run_lm(recipe, tmp_path / name, progress=False)
        assert (tmp_path / "first" / "corpus.json").read_bytes() == (tmp_path / name / "corpus.json").read_bytes()
        losses.append([line["loss"] for line in _lines(tmp_path / name) if "loss" in line][0])
    assert losses[0] == losses[1]
    other = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=1, log_every=1, seed=1)
    run_lm(other, tmp_path / "other_seed", progress=False)
    assert [line["loss"] for line in _lines(tmp_path / "other_seed") if "loss" in line][0] != losses[0]


def test_curriculum_config_errors_name_the_phase_field(tiny, shapes_world, world_tokenizer_dir, tmp_path):
    from bridgevlm.config import ConfigError, from_dict
    from bridgevlm.recipes.lm import LmRecipe

    with pytest.raises(ConfigError, match=r"curriculum\[0\]\.max_step'.*did you mean 'max_steps'"):
        from_dict(LmRecipe, {"curriculum": [{"name": "a", "max_step": 3}]}, "lm.yaml")
    recipe = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=1)
    recipe.curriculum = [LmPhase(name="same", max_steps=1), LmPhase(name="same", max_steps=1)]
    with pytest.raises(ValueError, match="phase names must be distinct"):
        run_lm(recipe, tmp_path, progress=False)
    recipe.curriculum = [LmPhase(name="odd", max_steps=1, families=["colours"])]
    with pytest.raises(ValueError, match="unknown question families \\['colours'\\]"):
        run_lm(recipe, tmp_path / "families", progress=False)


def test_grow_layers_once_for_the_recipe_and_per_phase(tiny, shapes_world, world_tokenizer_dir, tmp_path):
    recipe = tiny.lm(shapes_world, world_tokenizer_dir, max_steps=99)
    recipe.grow_layers = 1
    recipe.curriculum = [LmPhase(name="first", max_steps=1), LmPhase(name="second", max_steps=1),
                         LmPhase(name="deeper", max_steps=1, grow_layers=2)]
    run_lm(recipe, tmp_path, progress=False)
    # the recipe's layer is added before the first phase only, a phase's own before that phase
    grows = [yaml.safe_load((tmp_path / "phases" / name / "config.yaml").read_text())["grow_layers"]
             for name in ("first", "second", "deeper")]
    assert grows == [1, 0, 2]
    layers = [AutoModelForCausalLM.from_pretrained(tmp_path / "phases" / name / "model").config.num_hidden_layers
              for name in ("first", "second", "deeper")]
    base = recipe.model.num_layers
    assert layers == [base + 1, base + 1, base + 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.num_hidden_layers == base + 3
