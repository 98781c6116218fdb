import json

import pytest
import yaml

from bridgevlm import __version__
from bridgevlm.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def _help(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_the_commands_and_examples(capsys):
    text = _help(capsys, [])
    for command in ("quickstart", "world", "train", "eval", "chat", "export", "convert"):
        assert command in text
    assert "examples:" in text and "bridgevlm train configs/shapes/clip.yaml" in text


@pytest.mark.parametrize("command,options", [
    ("world", ["--out", "--seed", "--scenes", "--image-size", "--text-probability"]),
    ("train", ["recipe", "overrides", "--out", "--no-progress"]),
    ("eval", ["{clip,lm,vlm}", "model", "--world", "--split", "--template", "--limit", "--blind", "--rank-candidates",
              "--num-beams", "--length-penalty", "--max-new-tokens"]),
    ("chat", ["model", "--image", "--max-new-tokens", "--temperature", "--top-p", "--num-beams", "/reset"]),
    ("export", ["model", "--out", "--format", "LoRA"]),
    ("convert", ["source", "--out", "Llava"]),
    ("quickstart", ["--out", "--from-scratch", "--budget", "--backbones", "--recipe", "--bridge", "qformer", "crome",
                    "partial_lora", "flamingo", "all", "none", "--bridge-recipe", "NAME=PATH", "crome_bridge_finetune",
                    "--studies", "--no-progress"]),
])
def test_subcommand_help_mentions_its_options(capsys, command, options):
    text = _help(capsys, [command])
    assert text.startswith(f"usage: bridgevlm {command}")
    for option in options:
        assert option in text, option


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"bridgevlm {__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_world_writes_world_json(tmp_path, capsys):
    assert main(["world", "--out", str(tmp_path / "w"), "--scenes", "30", "--seed", "3", "--image-size", "48"]) == 0
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert sum(world["splits"].values()) == 30
    assert world["config"]["seed"] == 3 and world["config"]["image_size"] == 48
    assert (tmp_path / "w" / "images" / "train").is_dir()
    assert str(tmp_path / "w") in capsys.readouterr().out


def test_train_with_unknown_key_names_file_and_field(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("task: clip\nworld: w\ntrain:\n  max_stepz: 3\n")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bridgevlm train: error:")
    assert str(recipe) in err and "train.max_stepz" in err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_train_override_typo(tmp_path, capsys):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("task: clip\nworld: w\n")
    assert main(["train", str(recipe), "train.lrr=1", "--out", str(tmp_path / "run")]) == 2
    assert "command line override 'train.lrr=1'" in capsys.readouterr().err


def test_train_runs_a_tiny_recipe(tmp_path, capsys, shapes_world, world_tokenizer_dir, tiny):
    from bridgevlm.config import to_dict

    recipe = tmp_path / "clip.yaml"
    recipe.write_text(yaml.safe_dump({"task": "clip", **to_dict(tiny.clip("unset", "unset"))}))
    run = tmp_path / "run"
    argv = ["train", str(recipe), f"world={shapes_world}", f"tokenizer={world_tokenizer_dir}",
            "train.max_steps=2", "--out", str(run), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run / "metrics.json").read_text())
    assert 0 <= printed["zeroshot_accuracy"] <= 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]  # the override reached the run
    assert (run / "model" / "config.json").is_file()


def test_eval_lm_prints_metrics(tiny_backbones, capsys):
    world = tiny_backbones / "world"
    assert main(["eval", "lm", str(tiny_backbones / "lm"), "--world", str(world), "--split", "val"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["perplexity"] > 1 and 0 <= metrics["text_qa_accuracy"] <= 1
    assert "text_qa.dialogue" in metrics


def test_eval_clip_prints_metrics(tiny_backbones, capsys):
    assert main(["eval", "clip", str(tiny_backbones / "clip"), "--world", str(tiny_backbones / "world")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["zeroshot_accuracy"] <= 1 and 0 <= metrics["recall_at_1"] <= 1


def test_eval_with_a_missing_world_is_a_clear_error(tiny_backbones, tmp_path, capsys):
    missing = tmp_path / "no_world"
    assert main(["eval", "lm", str(tiny_backbones / "lm"), "--world", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "bridgevlm eval: error:" in err and str(missing) in err
    assert "Traceback" not in err


def test_quickstart_with_given_backbones(tiny_backbones, tiny, tmp_path):
    out = tmp_path / "qs"
    recipes = tiny.quickstart_recipes(tmp_path)
    assert main(["quickstart", "--out", str(out), "--backbones", str(tiny_backbones),
                 "--bridge-recipe", f"llava={recipes['llava']}", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"clip", "lm", "llava"}
    assert main(["quickstart", "--out", str(tmp_path / "qs2"), "--backbones", str(tiny_backbones), "--bridge", "none",
                 "--no-progress"]) == 0
    assert set(json.loads((tmp_path / "qs2/report.json").read_text())["metrics"]) == {"clip", "lm"}
    assert str(tiny_backbones) in (out / "report.md").read_text()


def test_quickstart_with_two_bridges_and_their_recipes(tiny_backbones, tiny, tmp_path):
    recipes = tiny.quickstart_recipes(tmp_path)
    out = tmp_path / "qs"
    chosen = [f"{name}={recipes[name]}" for name in ("blip2_stage1", "instructblip", "flamingo")]
    assert main(["quickstart", "--out", str(out), "--backbones", str(tiny_backbones), "--bridge", "flamingo,qformer",
                 *(arg for item in chosen for arg in ("--bridge-recipe", item)), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"clip", "lm", "blip2_stage1", "instructblip", "flamingo"}
    assert "## Bridges compared" in (out / "report.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--bridge", "llava,clip"], "unknown bridge clip; choose from llava, qformer, crome, partial_lora, flamingo"),
    (["--bridge-recipe", "llava"], "expected NAME=PATH"),
    (["--bridge-recipe", "lava=x.yaml"], "unknown recipe name 'lava'; choose from llava, blip2_stage1"),
])
def test_quickstart_bad_bridge_options_are_named(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["quickstart", "--out", str(tmp_path / "qs"), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_cli_spells_the_quickstart_names_as_the_quickstart_does():
    from bridgevlm.cli import QUICKSTART_BRIDGES, QUICKSTART_RECIPES
    from bridgevlm.quickstart import BRIDGES, RECIPES

    assert QUICKSTART_BRIDGES == tuple(BRIDGES) and QUICKSTART_RECIPES == tuple(RECIPES)


def test_eval_with_missing_model_dir_is_a_clear_error(tmp_path, capsys, shapes_world):
    code = main(["eval", "lm", str(tmp_path / "no_such_model"), "--world", str(shapes_world)])
    assert code == 2
    err = capsys.readouterr().err
    assert "model directory not found" in err and "no_such_model" in err


def test_train_overrides_may_follow_options(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: clip\nworld: w\ntokenizer: t\n")
    # The override typo must reach the config system (and be reported there), wherever it stands.
    code = main(["train", str(recipe), "--out", str(tmp_path / "run"), "train.lrr=1"])
    assert code == 2
    assert "train.lrr=1" in capsys.readouterr().err
