"""Tests for bridgevlm.config: typed YAML configs with command-line overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from bridgevlm.config import (
    ConfigError,
    from_dict,
    load_config,
    load_layered_yaml,
    load_yaml,
    merge,
    parse_overrides,
    save_config,
    to_dict,
)


# Config classes live at module level: get_type_hints cannot resolve names local to a function.
@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclass
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 8
    steps: int = 100
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: Optional[int] = None


@dataclass
class ModelConfig:
    name: str  # required
    layers: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    freeze: bool = True
    meta: Any = None


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[OptimConfig] = field(default_factory=list)


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- from_dict -------------------------------------------------------------------------------


def test_from_dict_builds_nested_types():
    cfg = from_dict(Config, {
        "model": {"name": "tiny", "layers": [3, 4], "extra": {"scale": 2}, "checkpoint": "ckpt/a.pt",
                  "meta": {"anything": [1]}},
        "train": {"lr": 0.1, "optim": {"name": "sgd", "betas": [0.5, 0.6]}, "log_every": 10},
        "stages": [{"name": "sgd"}, {}],
    })
    assert cfg.model == ModelConfig(name="tiny", layers=[3, 4], extra={"scale": 2.0},
                                    checkpoint=Path("ckpt/a.pt"), meta={"anything": [1]})
    assert isinstance(cfg.model.extra["scale"], float)
    assert cfg.train.optim == OptimConfig(name="sgd", betas=(0.5, 0.6))
    assert cfg.train.log_every == 10 and cfg.train.steps == 100  # untouched field keeps its default
    assert cfg.stages == [OptimConfig(name="sgd"), OptimConfig()]


def test_missing_required_field():
    with pytest.raises(ConfigError, match=r"src: missing required field 'model.name'"):
        from_dict(Config, {"model": {}}, source="src")


def test_unknown_field_at_depth_two_names_path_and_source():
    with pytest.raises(ConfigError) as exc:
        from_dict(Config, {"model": {"name": "m"}, "train": {"lrr": 1}}, source="configs/x.yaml")
    msg = str(exc.value)
    assert msg.startswith("configs/x.yaml: unknown field 'train.lrr'; valid fields of train: lr, batch_size,")
    assert "did you mean 'lr'?" in msg
    assert exc.value.field == "train.lrr" and exc.value.source == "configs/x.yaml"


def test_unknown_field_inside_list_element():
    with pytest.raises(ConfigError, match=r"unknown field 'stages\[1\]\.nam'"):
        from_dict(Config, {"model": {"name": "m"}, "stages": [{}, {"nam": "sgd"}]})


def test_wrong_type_message():
    with pytest.raises(ConfigError) as exc:
        from_dict(Config, {"model": {"name": "m"}, "train": {"lr": "abc"}}, source="configs/x.yaml")
    assert str(exc.value) == "configs/x.yaml: field 'train.lr' expects float, got 'abc' (str)"


def test_int_accepted_for_float_and_float_string_parsed():
    cfg = from_dict(TrainConfig, {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    # PyYAML (YAML 1.1) reads `1e-4` without a dot as the *string* "1e-4".
    assert from_dict(TrainConfig, {"lr": "1e-4"}).lr == pytest.approx(1e-4)


@pytest.mark.parametrize("data, expected", [
    ({"batch_size": True}, "field 'batch_size' expects int, got True (bool)"),
    ({"lr": False}, "field 'lr' expects float, got False (bool)"),
    ({"batch_size": "8"}, "field 'batch_size' expects int, got '8' (str)"),
    ({"batch_size": 8.0}, "field 'batch_size' expects int, got 8.0 (float)"),
    ({"log_every": "x"}, "field 'log_every' expects int, got 'x' (str)"),
])
def test_scalar_type_errors(data, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        from_dict(TrainConfig, data)


def test_string_field_rejects_yaml_coerced_values_with_hint():
    # YAML reads `name: no` as False; the message says how to keep it a string.
    with pytest.raises(ConfigError, match=r"expects str, got False \(bool\); quote the value"):
        from_dict(ModelConfig, {"name": False})


def test_literal_lists_options():
    with pytest.raises(ConfigError, match=r"field 'name' must be one of 'adamw', 'sgd', got 'adam' \(str\)"):
        from_dict(OptimConfig, {"name": "adam"})


def test_container_errors_name_the_element():
    with pytest.raises(ConfigError, match=r"field 'layers\[1\]' expects int, got 'x'"):
        from_dict(ModelConfig, {"name": "m", "layers": [1, "x"]})
    with pytest.raises(ConfigError, match=r"field 'extra.scale' expects float, got 'big'"):
        from_dict(ModelConfig, {"name": "m", "extra": {"scale": "big"}})
    with pytest.raises(ConfigError, match=r"field 'layers' expects list\[int\], got 3 \(int\)"):
        from_dict(ModelConfig, {"name": "m", "layers": 3})


def test_non_mapping_for_dataclass():
    with pytest.raises(ConfigError, match=r"field 'train' expects a mapping of TrainConfig fields, got 3"):
        from_dict(Config, {"model": {"name": "m"}, "train": 3})
    with pytest.raises(ConfigError, match=r"config must be a mapping of Config fields, got \[\] \(list\)"):
        from_dict(Config, [])


# ---- overrides and merging -------------------------------------------------------------------


def test_parse_overrides():
    assert parse_overrides(["train.lr=1e-4", "model.name=foo", "a.b=[1,2]", "a.c=", "x=y=z"]) == {
        "train": {"lr": "1e-4"}, "model": {"name": "foo"}, "a": {"b": [1, 2], "c": None}, "x": "y=z",
    }
    # Later items win; free text that is not valid YAML stays a string.
    assert parse_overrides(["a=1", "a=2", "p=@home: a: b"]) == {"a": 2, "p": "@home: a: b"}


@pytest.mark.parametrize("item", ["train.lr", "=1", "train..lr=1", "a=[1,2"])
def test_parse_overrides_malformed(item):
    with pytest.raises(ConfigError, match=f"command line override '{item}'".replace("[", r"\[")):
        parse_overrides([item])


def test_merge_is_deep_and_pure():
    base = {"a": {"x": 1, "y": [1]}, "b": 1}
    out = merge(base, {"a": {"y": [2]}, "c": 3})
    assert out == {"a": {"x": 1, "y": [2]}, "b": 1, "c": 3}
    assert base == {"a": {"x": 1, "y": [1]}, "b": 1}
    out["a"]["x"] = 9
    assert base["a"]["x"] == 1


# ---- files -----------------------------------------------------------------------------------


def test_load_config_override_beats_file_and_base(tmp_path):
    path = write(tmp_path, "model:\n  name: tiny\ntrain:\n  lr: 0.1\n  steps: 5\n")
    cfg = load_config(Config, path, ["train.lr=1e-4", "model.layers=[7]"],
                      base={"train": {"batch_size": 2, "steps": 1}})
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.steps == 5  # file beats base
    assert cfg.train.batch_size == 2  # base fills what the file does not set
    assert cfg.model.layers == [7]


def test_override_typo_attributed_to_command_line(tmp_path):
    path = write(tmp_path, "model:\n  name: tiny\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Config, path, ["train.steps=3", "train.lrr=1"])
    assert str(exc.value).startswith("command line override 'train.lrr=1': unknown field 'train.lrr';")
    with pytest.raises(ConfigError, match=r"^command line override 'train.steps=x': field 'train.steps' expects int"):
        load_config(Config, path, ["train.steps=x"])


def test_file_error_attributed_to_file_despite_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: tiny\ntrain:\n  lrr: 0.1\n")
    # The override also touches `train`, but it did not supply `lrr`.
    with pytest.raises(ConfigError, match=f"^{path}: unknown field 'train.lrr'"):
        load_config(Config, path, ["train.lr=0.5"])


def test_override_can_supply_required_field_missing_from_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n")
    assert load_config(Config, path, ["model.name=cli"]).model.name == "cli"
    with pytest.raises(ConfigError, match=f"^{path}: missing required field 'model.name'"):
        load_config(Config, path, ["model.layers=[1]"])


def test_round_trip(tmp_path):
    cfg = Config(model=ModelConfig(name="m", layers=[5], extra={"a": 0.5}, checkpoint=Path("c/x.pt")),
                 train=TrainConfig(lr=1e-4, optim=OptimConfig(betas=(0.8, 0.9))),
                 stages=[OptimConfig("sgd")])
    plain = to_dict(cfg)
    assert plain["model"]["checkpoint"] == "c/x.pt" and plain["train"]["optim"]["betas"] == [0.8, 0.9]
    path = tmp_path / "out" / "cfg.yaml"
    save_config(cfg, path)
    assert load_config(Config, path) == cfg
    assert list(load_yaml(path)) == ["model", "train", "stages"]  # field order, not sorted
    assert [p.name for p in path.parent.iterdir()] == ["cfg.yaml"]  # no temp file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_save_config_replaces_existing_file(tmp_path):
    path = write(tmp_path, "old: 1\n")
    save_config({"new": Path("p")}, path)
    assert load_yaml(path) == {"new": "p"}


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model:\n  name: [unclosed\ntrain: 1\n", "bad.yaml")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+:\d+: invalid YAML"):
        load_config(Config, bad)
    top = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match=f"^{top}: the top level must be a mapping"):
        load_yaml(top)
    dup = write(tmp_path, "a: 1\nb: 2\na: 3\n", "dup.yaml")
    with pytest.raises(ConfigError, match=rf"^{dup}:3:1: invalid YAML: duplicate key 'a' \(first defined on line 1\)"):
        load_yaml(dup)
    assert load_yaml(write(tmp_path, "", "empty.yaml")) == {}


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_reach_into_lists(tmp_path):
    from bridgevlm.recipes.registry import load_recipe

    _, recipe = load_recipe(CONFIGS / "shapes/llava.yaml", ["stages.1.train.max_steps=7", "stages.0.data.template=vicuna_v1"])
    assert recipe.stages[1].train.max_steps == 7 and recipe.stages[0].data.template == "vicuna_v1"
    in_file = yaml.safe_load((CONFIGS / "shapes/llava.yaml").read_text())["stages"][0]["train"]["max_steps"]
    assert recipe.stages[0].train.max_steps == in_file != 7  # the other stage keeps the file's value
    with pytest.raises(ConfigError, match=r"'stages\.5': index out of range, 'stages' has 2 item"):
        load_recipe(CONFIGS / "shapes/llava.yaml", ["stages.5.name=x"])


@pytest.mark.parametrize("name", ["stage1_pretrain", "stage2_finetune", "stage2_lora"])
def test_llava15_recipes_carry_the_paper_settings(name):
    from bridgevlm.recipes.registry import load_recipe

    task, recipe = load_recipe(CONFIGS / f"llava15/{name}.yaml")
    assert task == "vlm" and recipe.model.connector.kind == "mlp2x_gelu" and recipe.model.vision.feature_layer == -2
    first, last = recipe.stages[0], recipe.stages[-1]
    assert first.data.template == "plain" and first.train.optim.lr == 1e-3 and first.trainable.llm == "frozen"
    if name != "stage1_pretrain":
        assert last.train.schedule.warmup_ratio == 0.03 and last.gradient_checkpointing
        assert last.trainable.llm == ("lora" if name == "stage2_lora" else "full")
        assert last.train.optim.lr == (2e-4 if name == "stage2_lora" else 2e-5)
    if name == "stage2_lora":
        assert (last.lora.rank, last.lora.alpha) == (128, 256) and last.train.optim.part_lrs == {"connector.": 2e-5}


def test_a_bad_override_inside_a_list_is_named_as_the_override():
    from bridgevlm.recipes.registry import load_recipe

    with pytest.raises(ConfigError, match=r"command line override 'stages\.0\.trainable\.conector=full'.*did you mean 'connector'"):
        load_recipe(CONFIGS / "shapes/llava.yaml", ["stages.0.trainable.conector=full"])


# --------------------------------------------------------------------------------------------
# extends: a variant file over its parent
# --------------------------------------------------------------------------------------------


def test_a_file_extends_its_parent_recursively_and_overrides_still_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name: m, layers: [1, 2, 3]}\ntrain: {lr: 0.1, batch_size: 4}\n"
                                        "stages: [{name: adamw}, {name: adamw, betas: [0.5]}]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/mid.yaml").write_text("extends: ../base.yaml\ntrain: {lr: 0.2}\nstages: {1: {name: sgd}}\n")
    (tmp_path / "leaf.yaml").write_text("extends: sub/mid.yaml\nmodel: {layers: [7]}\n")
    cfg = load_config(Config, tmp_path / "leaf.yaml", ["train.steps=5"])
    assert cfg.model.name == "m" and cfg.model.layers == [7]  # a list replaces the parent's whole
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.steps) == (0.2, 4, 5)
    assert [(s.name, s.betas) for s in cfg.stages] == [("adamw", (0.9, 0.999)), ("sgd", (0.5,))]


def test_an_extends_loop_or_a_missing_parent_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: 'extends' makes a loop: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_layered_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'extends' names .*nowhere\.yaml, which does not exist"):
        load_config(Config, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="must be the path of another config file"):
        load_layered_yaml(tmp_path / "d.yaml")
