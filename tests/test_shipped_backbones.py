"""The backbones shipped in the repository load with plain `transformers` and score as recorded."""
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel

from bridgevlm.config import from_dict
from bridgevlm.data.shapes.world import WorldConfig, build_world
from bridgevlm.recipes.backbones import CHECK_LIMIT, SHIPPED, evaluate_backbones, load_manifest

MAX_BYTES = 20 * 1024 * 1024


def test_shipped_backbones_are_small_and_load_with_plain_transformers():
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"shipped backbones take {total / 2**20:.1f} MiB"
    manifest = load_manifest(SHIPPED)
    assert manifest["command"].startswith("bridgevlm ")
    assert {"world", "clip", "lm", "lm_corpus"} <= set(manifest["seed"])
    for name in ("clip", "lm"):
        assert manifest["train_seconds"][name] > 0 and manifest["steps"][name] > 0
    CLIPModel.from_pretrained(SHIPPED / "clip")
    AutoModelForCausalLM.from_pretrained(SHIPPED / "lm")
    for name in ("tokenizer", "clip", "lm"):
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED / name)
        assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id


def test_shipped_backbones_score_as_recorded(tmp_path, single_thread):
    manifest = load_manifest(SHIPPED)
    world = build_world(tmp_path / "world", from_dict(WorldConfig, manifest["world"], "manifest.json"),
                        progress=False, splits=("test",))
    again = evaluate_backbones(SHIPPED, world, "test", manifest["lm_template"], limit_per_family=CHECK_LIMIT)
    recorded = manifest["check_metrics"]
    for group in ("clip", "lm"):
        for key, value in recorded[group].items():
            # Same code and weights; only float reduction order may differ between CPUs.
            tolerance = 0.02 * value if key == "perplexity" else 0.03
            assert again[group][key] == pytest.approx(value, abs=tolerance), f"{group}.{key}"
