"""A stage's data: one file or a √size-balanced mixture of several, with optional task prefixes."""
from __future__ import annotations

import json
import math

import pytest

from bridgevlm.config import from_dict
from bridgevlm.recipes.stage_data import DataSource, StageData, read_sources
from bridgevlm.recipes.vlm import VlmRecipe, run_vlm

FAMILIES = ("colour", "count", "reading")


def _mixture(world, prefix=False, weights=None):
    weights = weights or {}
    return {"image_folder": str(world / "images"), "max_length": 256, "mix_seed": 3,
            "sources": [{"name": f, "path": str(world / "tasks_plain" / f / "train.json"), "weight": weights.get(f, 1.0),
                         "prefix": f"[{f}:shapes]" if prefix else ""} for f in FAMILIES]}


def test_the_world_writes_one_task_file_per_held_in_family_in_both_phrasings(shapes_world):
    world = json.loads((shapes_world / "world.json").read_text())
    for variant in ("tasks", "tasks_plain"):
        for family in world["held_in"]:
            records = json.loads((shapes_world / variant / family / "train.json").read_text())
            assert records and all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    plain = json.loads((shapes_world / "tasks_plain/colour/train.json").read_text())
    varied = json.loads((shapes_world / "tasks/colour/train.json").read_text())
    template = world["families"]["colour"]["templates"][0].split("{")[0]
    questions = lambda records: {m["value"].removeprefix("<image>\n") for r in records  # noqa: E731
                                 for m in r["conversations"] if m["from"] == "human"}
    assert all(q.startswith(template) for q in questions(plain))
    assert len({q.split(" the ")[0] for q in questions(varied)}) > 3  # varied phrasing


def test_a_mixture_draws_sources_in_proportion_to_weighted_square_root_sizes(vlm_parts, shapes_world, tmp_path,
                                                                             single_thread):
    recipe = from_dict(VlmRecipe, {"model": vlm_parts, "stages": [{
        "name": "mix", "trainable": {"connector": "full"}, "data": _mixture(shapes_world, prefix=True, weights={"count": 2.0}),
        "train": {"batch_size": 4, "max_steps": 2, "log_every": 1}}]})
    result = run_vlm(recipe, tmp_path, progress=False)
    sources = result["stages"]["mix"]["data"]["sources"]
    sizes = {f: len(json.loads((shapes_world / "tasks_plain" / f / "train.json").read_text())) for f in FAMILIES}
    raw = {f: math.sqrt(sizes[f]) * (2.0 if f == "count" else 1.0) for f in FAMILIES}
    for family in FAMILIES:
        assert sources[family]["samples"] == sizes[family]
        assert sources[family]["probability"] == pytest.approx(raw[family] / sum(raw.values()))
    assert result["stages"]["mix"]["data"]["samples"] == sum(sizes.values())
    assert result["stages"]["mix"]["steps"] == 2


def test_sources_are_prefixed_and_default_to_the_stage_image_folder(shapes_world):
    data = from_dict(StageData, _mixture(shapes_world, prefix=True))
    sources = read_sources(data, "mix")
    assert [s.source.image_folder for s in sources] == [str(shapes_world / "images")] * 3
    first = sources[0].records[0]["conversations"]
    assert first[0]["value"].startswith("<image>\n[colour:shapes] ") and first[2]["value"].startswith("[colour:shapes] ")
    assert all(p.startswith(str(shapes_world / "images")) for p in sources[0].image_paths())


@pytest.mark.parametrize("data, message", [
    ({"path": "a.json", "sources": [{"name": "a", "path": "a.json"}]}, "both set"),
    ({}, "no data"),
    ({"sources": [{"name": "a", "path": "a.json"}, {"name": "a", "path": "b.json"}]}, "repeat the name"),
    ({"sources": [{"path": "a.json"}]}, r"sources\[0\] needs a name"),
])
def test_bad_stage_data_settings_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        read_sources(from_dict(StageData, data), "mix")


def test_a_single_path_is_one_unmixed_source(shapes_world):
    (source,) = read_sources(StageData(path=str(shapes_world / "instruct/train.json"), image_folder="imgs"), "s")
    assert source.source == DataSource(name="train", path=str(shapes_world / "instruct/train.json"), image_folder="imgs")
