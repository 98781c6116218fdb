import json

import pytest
import yaml
from PIL import Image

from bridgevlm.quickstart import QuickstartOptions, load_backbone_recipe, run_quickstart

pytestmark = pytest.mark.usefixtures("single_thread")

CLIP_KEYS = ("zeroshot_accuracy", "recall_at_1")
LM_KEYS = ("perplexity", "text_qa_accuracy")


@pytest.fixture(scope="module")
def quickstart(tiny_backbones, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    recipes = {"llava": tiny.quickstart_recipes(tmp_path_factory.mktemp("recipes"), steps=3)["llava"]}
    data = run_quickstart(QuickstartOptions(out=out, backbones=tiny_backbones, recipes=recipes, progress=False))
    return out, data, recipes


def test_report_json(quickstart, tiny_backbones, tiny):
    out, data, llava = quickstart
    report = json.loads((out / "report.json").read_text())
    assert report == data
    for key in CLIP_KEYS:
        assert 0.0 <= report["metrics"]["clip"][key] <= 1.0
    assert 0.0 <= report["metrics"]["lm"]["text_qa_accuracy"] <= 1.0
    assert report["metrics"]["lm"]["perplexity"] > 1.0
    assert {"world", "evaluate backbones", "total"} <= set(report["timings_s"])
    assert all(seconds >= 0 for seconds in report["timings_s"].values())
    # the world is rebuilt from the manifest: the one the backbones were made on
    assert report["world"] == json.loads((tiny_backbones / "world" / "world.json").read_text())["splits"]
    assert (out / "world" / "scenes" / "test.json").read_bytes() == \
        (tiny_backbones / "world" / "scenes" / "test.json").read_bytes()


def test_report_md_mentions_the_metrics_and_figures(quickstart):
    out, data, llava = quickstart
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# bridgevlm quickstart")
    clip, lm = data["metrics"]["clip"], data["metrics"]["lm"]
    for label, value in (("zero-shot accuracy (colour+shape)", clip["zeroshot_accuracy"]),
                         ("image->text Recall@1", clip["recall_at_1"]),
                         ("**mean**", lm["text_qa_accuracy"]), ("answer perplexity", lm["perplexity"])):
        assert f"| {label} | {value:.3f} |" in markdown, label
    assert "pytest tiny backbones" in markdown  # the manifest's command
    assert "## Wall time" in markdown
    for name in ("clip", "lm"):
        assert f"(figures/{name}_loss.png)" in markdown


def test_loss_figures_are_pngs(quickstart):
    out, _, _ = quickstart
    for name in ("clip", "lm"):
        path = out / "figures" / f"{name}_loss.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_rerun_reuses_the_world(quickstart, tiny_backbones):
    out, data, recipes = quickstart
    world = (out / "world" / "world.json").stat().st_mtime_ns
    again = run_quickstart(QuickstartOptions(out=out, backbones=tiny_backbones, recipes=recipes, progress=False))
    assert (out / "world" / "world.json").stat().st_mtime_ns == world
    assert again["metrics"] == data["metrics"]


def test_llava_half(quickstart, tiny_backbones):
    out, data, _ = quickstart
    llava = data["metrics"]["llava"]
    world = json.loads((out / "world" / "world.json").read_text())
    for group in ("held_in", "held_out"):
        assert {f"{group}.{f}" for f in world[group]} <= set(llava)
        for prefix in ("", "blind."):
            assert 0.0 <= llava[f"{prefix}{group}_mean"] <= 1.0
    assert (out / "llava/02_instruct/model/vlm.yaml").is_file()
    config = yaml.safe_load((out / "llava/config.yaml").read_text())
    assert config["model"]["llm"] == str(tiny_backbones / "lm") and config["world"] == str(out / "world")
    assert "llava (train + evaluate)" in data["timings_s"]
    markdown = (out / "report.md").read_text()
    assert "## LLaVA" in markdown and f"| **held-in mean** |  | {llava['held_in_mean']:.3f} |" in markdown
    assert "(figures/llava_accuracy.png)" in markdown
    curve = data["llava_curve"]["held-in"]
    # each stage evaluates at step 2 and at its last step (3)
    assert len(curve["minutes"]) == 4 and curve["minutes"] == sorted(curve["minutes"])


def test_the_qformer_bridges_share_stage_1_and_run_their_studies(tiny_backbones, tiny, tmp_path):
    recipes = tiny.quickstart_recipes(tmp_path)
    out = tmp_path / "qs"
    data = run_quickstart(QuickstartOptions(out=out, backbones=tiny_backbones, recipes=recipes, studies=True,
                                            bridges=("crome", "qformer", "partial_lora"), progress=False))
    retrieval = data["metrics"]["blip2_stage1"]
    for method in ("itc", "itm"):
        assert 0.0 <= retrieval[f"{method}_recall_at_1"] <= retrieval[f"{method}_recall_at_5"] <= 1.0
    for name in ("instructblip", "crome", "partial_lora"):
        metrics = data["metrics"][name]
        for prefix in ("", "blind."):
            assert 0.0 <= metrics[f"{prefix}held_in_mean"] <= 1.0 and 0.0 <= metrics[f"{prefix}held_out_mean"] <= 1.0
    assert "llava" not in data["metrics"]
    for name in ("instructblip", "crome"):  # both from the one stage 1, made once
        config = yaml.safe_load((out / f"{name}/config.yaml").read_text())
        assert config["model"]["connector"]["init"] == str(out / "blip2_stage1")
        assert config["model"]["llm"] == str(tiny_backbones / "lm")
    assert yaml.safe_load((out / "blip2_stage1/config.yaml").read_text())["tokenizer"] == str(tiny_backbones / "tokenizer")
    markdown = (out / "report.md").read_text()
    assert markdown.count("## BLIP-2 stage 1") == 1 and "## InstructBLIP" in markdown and "## CROME" in markdown
    assert f"| image->text R@1 | {retrieval['itc_recall_at_1']:.3f} | {retrieval['itm_recall_at_1']:.3f} |" in markdown
    assert {"blip2 stage 1 (train + evaluate)", "instructblip (train + evaluate)", "crome (train + evaluate)",
            "partial_lora (train + evaluate)"} <= set(data["timings_s"])
    # the bridges run in a fixed order, whatever order they were asked for
    assert markdown.index("## InstructBLIP\n") < markdown.index("## CROME\n") < markdown.index("## Partial LoRA")

    # InstructBLIP's studies: each ablation variant trains only its instruct stage, from InstructBLIP's generative model
    for name in ("multitask_plain", "multitask_prefix"):
        config = yaml.safe_load((out / f"ablation_{name}/config.yaml").read_text())
        assert [s["name"] for s in config["stages"]] == ["instruct"]
        assert config["stages"][0]["init"] == str(out / "instructblip/01_generative/model")
        assert 0.0 <= data["metrics"][name]["held_out_mean"] <= 1.0
    prefixes = {s["prefix"] for s in yaml.safe_load((out / "ablation_multitask_prefix/config.yaml").read_text())
                ["stages"][0]["data"]["sources"]}
    assert prefixes == {"[colour:Shapes]", "[shape:Shapes]", "[count:Shapes]", "[position:Shapes]",
                        "[existence:Shapes]", "[reading:Shapes]", "[dialogue:Shapes]"}
    skipped = yaml.safe_load((out / "instructblip_no_stage1/config.yaml").read_text())
    assert skipped["model"]["connector"]["init_weights"] is False and len(skipped["stages"]) == 2
    assert "## InstructBLIP studies" in markdown
    plain = data["metrics"]["multitask_plain"]
    assert f"| multitask plain | {plain['held_out.comparison']:.3f} |" in markdown

    # CROME's study: the whole bridge fine-tuned in stage (c) from the same instruction-tuned model
    whole = yaml.safe_load((out / "crome_bridge_finetune/config.yaml").read_text())
    assert [s["name"] for s in whole["stages"]] == ["task"]
    assert whole["stages"][0]["init"] == str(out / "crome/03_instruct/model")
    adapter_only = json.loads((out / "crome/04_task/summary.json").read_text())["trainable_parameters"]
    whole_bridge = json.loads((out / "crome_bridge_finetune/01_task/summary.json").read_text())["trainable_parameters"]
    assert adapter_only == 5 * 32 * 4 < whole_bridge  # 5·d·m: d = 32 (the tiny LM), m = 4
    family = yaml.safe_load(recipes["crome"].read_text())["stages"][3]["data"]["path"].split("/")[-2]
    instructed = data["metrics"]["crome_instructed"]
    assert "## CROME task fine-tuning" in markdown
    for label, flat, parameters in (("instruction-tuned, no task fine-tuning", instructed, 0),
                                    ("task fine-tuning: the adapter alone", data["metrics"]["crome"], adapter_only),
                                    ("task fine-tuning: the whole bridge", data["metrics"]["crome_bridge_finetune"],
                                     whole_bridge)):
        assert (f"| {label} | " in markdown and f" | {parameters:,} | {flat[f'held_in.{family}']:.3f} | "
                f"{flat['held_in_mean']:.3f} | {flat['held_out_mean']:.3f} |" in markdown), label

    # the comparison: one row per bridge, with what each stage trains
    assert "## Bridges compared" in markdown
    for title, name in (("InstructBLIP", "instructblip"), ("CROME", "crome"), ("Partial LoRA", "partial_lora")):
        flat = data["metrics"][name]
        assert f"| {title} | {flat['held_in_mean']:.3f} | {flat['blind.held_in_mean']:.3f} |" in markdown, title
    assert f"task {adapter_only}" in markdown  # CROME's last stage, in its stage list
    log = [json.loads(line) for line in (out / "blip2_stage1/metrics.jsonl").read_text().splitlines()]
    minutes = sum(record["seconds"] for record in log if "loss" in record) / 60
    assert f"BLIP-2 stage 1 ({minutes:.1f} training minutes, made once and shared)" in markdown


def test_an_unknown_bridge_or_recipe_name_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown bridge.*clip.*valid: llava, qformer, crome, partial_lora, flamingo"):
        QuickstartOptions(out=tmp_path, bridges=("clip",))
    with pytest.raises(ValueError, match="unknown recipe name.*lava.*valid: llava, blip2_stage1"):
        QuickstartOptions(out=tmp_path, recipes={"lava": tmp_path / "x.yaml"})


def test_missing_backbones_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        run_quickstart(QuickstartOptions(out=tmp_path / "out", backbones=tmp_path / "none", progress=False))


def _recipe_file(tmp_path, tiny, steps):
    path = tmp_path / "backbones.yaml"
    path.write_text(yaml.safe_dump({"task": "backbones", **tiny.backbone_dict(steps)}))
    return path


@pytest.mark.parametrize("budget,steps", [(1.0, 4), (0.5, 4), (0.01, 4), (3.0, 2)])
def test_budget_scales_every_stage(tmp_path, tiny, budget, steps):
    recipe = load_backbone_recipe(_recipe_file(tmp_path, tiny, steps), budget)
    expected = max(1, round(steps * budget))
    assert recipe.clip.train.max_steps == recipe.lm.train.max_steps == expected
    assert recipe.world.scenes == tiny.world_config["scenes"]


def test_from_scratch(tmp_path, tiny):
    recipe = _recipe_file(tmp_path, tiny, steps=2)
    out = tmp_path / "qs"
    data = run_quickstart(QuickstartOptions(out=out, from_scratch=True, recipe=recipe, budget=1.5, bridges=(),
                                            progress=False))
    manifest = json.loads((out / "backbones" / "manifest.json").read_text())
    assert manifest["steps"] == {"clip": 3, "lm": 3}  # 2 steps x budget 1.5
    assert "--from-scratch" in manifest["command"] and "--budget 1.5" in manifest["command"]
    assert manifest["world"]["scenes"] == tiny.world_config["scenes"]
    assert (out / "backbones" / "tokenizer" / "tokenizer.json").is_file()
    for name in ("clip", "lm"):
        assert (out / "backbones" / name / "config.json").is_file()
    assert (out / "world" / "world.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report == data
    assert "backbones (from scratch)" in report["timings_s"]
    for key in CLIP_KEYS:
        assert 0.0 <= report["metrics"]["clip"][key] <= 1.0
    assert report["metrics"]["lm"]["perplexity"] > 1.0
    assert (out / "figures" / "clip_loss.png").is_file() and (out / "figures" / "lm_loss.png").is_file()
    assert "--from-scratch" in (out / "report.md").read_text()
