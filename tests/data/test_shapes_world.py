import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from bridgevlm.data.shapes import HELD_IN, HELD_OUT, WorldConfig, build_world, text_conversations
from bridgevlm.data.shapes.families import FAMILIES
from bridgevlm.data.shapes.scene import COLOURS, COLUMNS, ROWS, SHAPES, SIZES, Scene, SceneObject, SceneText
from bridgevlm.data.shapes.world import load_world_description, scene_keys, split_sizes

CFG = WorldConfig(seed=11, scenes=60, image_size=48, turns_per_image=3)
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), CFG, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def _load(world, *parts):
    return json.loads(world.joinpath(*parts).read_text(encoding="utf-8"))


def test_same_config_same_bytes_other_seed_other_bytes(world, tmp_path):
    again = _tree(build_world(tmp_path / "again", CFG, progress=False))
    first = _tree(world)
    assert len(first) > 60  # 60 images plus the JSON files
    assert again.keys() == first.keys()
    for name, data in first.items():
        assert again[name] == data, name
    other = _tree(build_world(tmp_path / "other", WorldConfig(**{**vars(CFG), "seed": 12}), progress=False))
    common = first.keys() & other.keys()
    changed = [name for name in common if other[name] != first[name]]
    assert "scenes/train.json" in changed and "instruct/train.json" in changed
    images = [name for name in common if name.endswith(".png")]
    assert len([n for n in images if n in changed]) > 0.9 * len(images)


def test_splits_have_configured_sizes_and_are_disjoint(world):
    # val and test are 10% of 60 scenes each: round(6.0) = 6, leaving 48 for training
    assert split_sizes(CFG) == {"train": 48, "val": 6, "test": 6}
    keys = {}
    for split in SPLITS:
        scenes = [Scene.from_json(r) for r in _load(world, "scenes", f"{split}.json")]
        assert len(scenes) == split_sizes(CFG)[split]
        assert {s.split for s in scenes} == {split}
        keys[split] = [s.key() for s in scenes]
        assert len(set(keys[split])) == len(keys[split])
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])
    assert scene_keys(world) == set(keys["val"]) | set(keys["test"])
    description = load_world_description(world)
    assert description["splits"] == {"train": 48, "val": 6, "test": 6}


def test_world_json_describes_families(world):
    description = load_world_description(world)
    held_in, held_out = description["held_in"], description["held_out"]
    assert not set(held_in) & set(held_out)
    assert set(held_in) | set(held_out) == set(description["families"]) == set(FAMILIES)
    assert len(description["families"]) == 10
    assert tuple(held_in) == HELD_IN and tuple(held_out) == HELD_OUT
    for name, family in description["families"].items():
        assert len(family["templates"]) >= 10, name
        assert len(set(family["templates"])) == len(family["templates"]), name
        assert family["held_out"] == (name in held_out)
    assert description["config"]["seed"] == CFG.seed
    assert len(description["classes"]) == len(COLOURS) * len(SHAPES)


def test_world_difficulty(world):
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(SIZES) == 2
    assert len(ROWS) == 3 and len(COLUMNS) == 3
    counts = set()
    for split in SPLITS:
        for record in _load(world, "scenes", f"{split}.json"):
            scene = Scene.from_json(record)
            assert 1 <= len(scene.objects) <= 4
            counts.add(len(scene.objects))
            cells = [(o.row, o.col) for o in scene.objects] + ([(scene.text.row, scene.text.col)] if scene.text else [])
            assert len(set(cells)) == len(cells)  # one thing per cell
            for obj in scene.objects:
                assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES
                assert 0 <= obj.row < 3 and 0 <= obj.col < 3
            assert list(scene.objects) == sorted(scene.objects, key=lambda o: (o.row, o.col))
    assert counts == {1, 2, 3, 4}  # 60 scenes are enough to see every count


def _check_llava_records(records, images_root, ids):
    assert [r["id"] for r in records] == ids
    for record in records:
        assert isinstance(record["image"], str) and (images_root / record["image"]).is_file()
        conversation = record["conversations"]
        assert len(conversation) >= 2 and len(conversation) % 2 == 0
        assert [m["from"] for m in conversation] == ["human", "gpt"] * (len(conversation) // 2)
        assert all(isinstance(m["value"], str) and m["value"] for m in conversation)
        tags = [m["value"].count("<image>") for m in conversation]
        assert tags[0] == 1 and sum(tags) == 1
        assert conversation[0]["value"].startswith("<image>\n")


def test_caption_and_instruction_files_are_llava_records(world):
    for split in SPLITS:
        scenes = _load(world, "scenes", f"{split}.json")
        ids = [s["id"] for s in scenes]
        for kind in ("captions", "captions_short", "instruct"):
            _check_llava_records(_load(world, kind, f"{split}.json"), world / "images", ids)
        by_id = {s["id"]: s for s in scenes}
        for record in _load(world, "captions", f"{split}.json"):
            assert record["conversations"][1]["value"] == by_id[record["id"]]["detailed_caption"]
        for record in _load(world, "captions_short", f"{split}.json"):
            assert record["conversations"][1]["value"] == by_id[record["id"]]["short_caption"]
        for record in _load(world, "instruct", f"{split}.json"):
            assert len(record["conversations"]) >= 2 * CFG.turns_per_image


def test_images_exist_with_configured_size(world):
    for split in SPLITS:
        for record in _load(world, "scenes", f"{split}.json"):
            with Image.open(world / "images" / record["image"]) as image:
                assert image.size == (CFG.image_size, CFG.image_size) and image.mode == "RGB"


def test_eval_files(world):
    for split in ("val", "test"):
        scene_ids = {s["id"] for s in _load(world, "scenes", f"{split}.json")}
        families = {p.stem for p in (world / "eval" / split).glob("*.json")} - {"classify"}
        assert families <= set(FAMILIES) and {"colour", "shape", "count", "existence", "dialogue"} <= families
        for family in families:
            items = _load(world, "eval", split, f"{family}.json")
            assert items
            for item in items:
                assert item["family"] == family and item["scene_id"] in scene_ids
                assert isinstance(item["question"], str) and item["question"]
                assert isinstance(item["answer"], str) and item["answer"]
                assert (world / "images" / item["image"]).is_file()
                if "candidates" in item:
                    assert item["answer"] in item["candidates"]
        for item in _load(world, "eval", split, "dialogue.json"):
            turn = int(item["id"].rsplit("_", 1)[1])
            assert len(item.get("context", [])) == 2 * turn
        by_id = {s["id"]: s for s in _load(world, "scenes", f"{split}.json")}
        classified = {item["id"] for item in _load(world, "eval", split, "classify.json")}
        assert classified == {s["id"] for s in by_id.values() if len(s["objects"]) == 1}  # every single-object scene
        for item in _load(world, "eval", split, "classify.json"):
            colour, shape = item["label"].split(" ")
            assert colour in COLOURS and shape in SHAPES
            scene = by_id[item["id"]]
            assert (scene["objects"][0]["colour"], scene["objects"][0]["shape"]) == (colour, shape)
    assert not (world / "eval" / "train").exists()


def test_class_prompts_are_the_worlds_own_captions_of_a_one_object_scene(world):
    prompts = set(load_world_description(world)["class_prompts"])
    assert len(prompts) == 2 * 9 + 2 and all(p.count("{}") == 1 for p in prompts)  # detailed per size and cell, short
    seen = 0
    for split in ("train", "val", "test"):
        for scene in _load(world, "scenes", f"{split}.json"):
            if len(scene["objects"]) != 1 or scene.get("text"):
                continue
            label = f"{scene['objects'][0]['colour']} {scene['objects'][0]['shape']}"
            for caption in (scene["short_caption"], scene["detailed_caption"]):
                assert caption.replace(label, "{}") in prompts, caption
                seen += 1
    assert seen


_POSITION = {f"{r} {c}": (i, j) for i, r in enumerate(ROWS) for j, c in enumerate(COLUMNS)}


def _key_from_description(text: str) -> tuple:
    """Rebuild a scene's content key from its detailed caption (the text the LM sees as context)."""
    objects = tuple(
        (shape, colour, size, *_POSITION[pos])
        for pos, size, colour, shape in re.findall(r"At the (\w+ \w+), a (\w+) (\w+) (\w+)\.", text)
    )
    written = re.search(r"At the (\w+ \w+), the (?:word|digit) (\w+)\.", text)
    return objects, ((written[2], *_POSITION[written[1]]) if written else None)


def test_description_parser_matches_scene_key():
    scene = Scene("s", "train", (SceneObject("circle", "red", "large", 0, 0), SceneObject("star", "blue", "small", 2, 1)),
                  SceneText("cat", 1, 1))
    from bridgevlm.data.shapes import detailed_caption
    assert _key_from_description(detailed_caption(scene)) == scene.key()


def test_text_conversations_respect_exclude():
    first = text_conversations(seed=5, num_scenes=40, exclude=set(), turns=2)
    keys = [_key_from_description(r["conversations"][0]["value"].split("\n")[0]) for r in first]
    exclude = set(keys[:15])
    assert len(exclude) >= 10
    second = text_conversations(seed=5, num_scenes=40, exclude=exclude, turns=2)
    assert len(second) == 40
    second_keys = [_key_from_description(r["conversations"][0]["value"].split("\n")[0]) for r in second]
    assert not set(second_keys) & exclude
    # deterministic, and the first record differs because its scene was excluded
    assert text_conversations(seed=5, num_scenes=40, exclude=set(), turns=2) == first
    assert second_keys[0] != keys[0]
    for record in second:
        roles = [m["from"] for m in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and len(roles) >= 4
        assert "<image>" not in json.dumps(record)


def test_writing_only_some_splits_gives_the_same_files(tmp_path):
    cfg = WorldConfig(seed=4, scenes=60)
    full = build_world(tmp_path / "full", cfg, progress=False)
    only_test = build_world(tmp_path / "test_only", cfg, progress=False, splits=("test",))
    test_files = sorted(p.relative_to(only_test) for p in only_test.rglob("*") if p.is_file())
    assert test_files and not any({"train", "val", "train.json", "val.json"} & set(p.parts) for p in test_files)
    for relative in test_files:
        assert (only_test / relative).read_bytes() == (full / relative).read_bytes(), relative


def test_compact_canonical_corpus_for_the_first_curriculum_stage():
    from bridgevlm.data.shapes.families import FAMILIES
    from bridgevlm.data.shapes.scene import COLOURS, SHAPES

    records = text_conversations(seed=3, num_scenes=30, exclude=set(), turns=4, describe_probability=0.0,
                                 scene_text="compact", phrasing="canonical")
    first_forms = {f.templates[0].split("{")[0] for f in FAMILIES.values()}
    first_forms |= {f.follow_ups[i][0] for f in FAMILIES.values() for i in range(len(f.follow_ups))}
    for record in records:
        scene, question = record["conversations"][0]["value"].split("\n", 1)
        words = scene.rstrip(".").replace(",", "").split()
        assert "At" not in words and "There" not in words  # no sentence scaffolding
        assert any(c in words for c in COLOURS) and any(s in words for s in SHAPES)
        asked = [question] + [m["value"] for m in record["conversations"][2::2]]
        for text in asked:  # every question starts as its family's first template does
            assert any(text.startswith(form) for form in first_forms if form), text
    varied = text_conversations(seed=3, num_scenes=30, exclude=set(), turns=4, describe_probability=0.0)
    assert varied[0]["conversations"][0]["value"].startswith("There ")
    with pytest.raises(ValueError, match="valid: detailed, compact"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, scene_text="terse")
    with pytest.raises(ValueError, match="valid: varied, canonical"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, phrasing="odd")


def test_corpus_restricted_to_families_and_fewer_objects():
    from bridgevlm.data.shapes.scene import MAX_OBJECTS

    records = text_conversations(seed=3, num_scenes=200, exclude=set(), turns=2, describe_probability=0.0,
                                 scene_text="compact", phrasing="canonical", families=["colour"], max_objects=2)
    counts = []
    for record in records:
        scene = record["conversations"][0]["value"].split("\n")[0]
        counts.append(sum(part.startswith(("small ", "large ")) for part in scene.rstrip(".").split(", ")))
        assert all(m["value"].split("\n")[-1].startswith("What colour is") for m in record["conversations"][::2])
    assert set(counts) == {1, 2}  # both counts drawn, never more
    full = text_conversations(seed=3, num_scenes=200, exclude=set(), turns=1, describe_probability=0.0,
                              scene_text="compact")
    assert max(sum(p.startswith(("small ", "large ")) for p in r["conversations"][0]["value"].split("\n")[0].split(", "))
               for r in full) == MAX_OBJECTS
    with pytest.raises(ValueError, match="unknown question families \\['colours'\\]"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, families=["colours"])
    with pytest.raises(ValueError, match="max_objects must be between 1 and 4"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, max_objects=5)


def test_family_weights_set_each_familys_share_of_the_questions():
    records = text_conversations(seed=5, num_scenes=300, exclude=set(), turns=4, describe_probability=0.0,
                                 scene_text="compact", phrasing="canonical", families=["colour", "count"],
                                 family_weights={"count": 3.0})
    questions = [m["value"].split("\n")[-1] for r in records for m in r["conversations"][::2]]
    colour = sum(q.startswith("What colour is") for q in questions)
    assert len(questions) == 1200 and 0 < colour < len(questions)
    share = 1 - colour / len(questions)  # 3/4 expected; 1200 draws give a standard deviation of 0.0125
    assert abs(share - 0.75) < 0.05
    unweighted = text_conversations(seed=5, num_scenes=30, exclude=set(), turns=4, describe_probability=0.0,
                                    families=["colour", "count"])
    again = text_conversations(seed=5, num_scenes=30, exclude=set(), turns=4, describe_probability=0.0,
                               families=["colour", "count"], family_weights={})
    assert unweighted == again  # no weights, the same draws as ever
    with pytest.raises(ValueError, match="family_weights must be positive and name families of the corpus"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, families=["colour"], family_weights={"count": 2})
    with pytest.raises(ValueError, match="family_weights must be positive"):
        text_conversations(seed=3, num_scenes=1, exclude=set(), turns=1, family_weights={"count": 0})


def test_minimal_text_names_each_object_by_colour_and_shape_only():
    from bridgevlm.data.shapes.scene import COLOURS, SHAPES

    records = text_conversations(seed=4, num_scenes=100, exclude=set(), turns=2, describe_probability=0.0,
                                 scene_text="minimal", phrasing="canonical", families=["colour", "shape"])
    sizes = set()
    for record in records:
        scene = record["conversations"][0]["value"].split("\n")[0]
        objects = [p.split() for p in scene.rstrip(".").split(", ") if not p.startswith(("word ", "digit "))]
        assert all(len(o) == 2 and o[0] in COLOURS and o[1] in SHAPES for o in objects), scene
        # only scenes the minimal text describes unambiguously: no shared colour, no shared shape
        assert len({c for c, _ in objects}) == len(objects) == len({s for _, s in objects}), scene
        sizes.add(len(objects))
    assert sizes == {1, 2, 3, 4}
