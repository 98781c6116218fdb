import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import bridgevlm.eval.text_qa as text_qa
from bridgevlm.data.shapes.families import FAMILIES
from bridgevlm.data.templates import get_template, tokenize_conversation
from bridgevlm.eval.text_qa import evaluate_text_qa, greedy_answers, length_batches, prompt_messages
from bridgevlm.models.llm import LanguageModel

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPLATE = get_template("vicuna_v1_nosys")


def test_prompt_messages_puts_the_scene_before_the_first_question():
    item = {"question": "What colour is it?", "answer": "red"}
    assert prompt_messages("A red circle.", item) == [
        {"from": "human", "value": "A red circle.\nWhat colour is it?"}]
    assert item == {"question": "What colour is it?", "answer": "red"}


def test_prompt_messages_keeps_dialogue_context():
    context = [{"from": "human", "value": "What shape is at the top?"}, {"from": "gpt", "value": "star"},
               {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "red"}]
    item = {"question": "Is it small?", "answer": "yes", "context": [dict(m) for m in context]}
    messages = prompt_messages("Scene text.", item)
    assert messages == [{"from": "human", "value": "Scene text.\nWhat shape is at the top?"}, *context[1:],
                        {"from": "human", "value": "Is it small?"}]
    assert item["context"] == context  # the item is left as it was


@pytest.fixture(scope="module")
def tokenizer(world_tokenizer_dir):
    return AutoTokenizer.from_pretrained(world_tokenizer_dir)


@pytest.fixture(scope="module")
def random_lm(tokenizer):
    # A large init spreads the logits, so greedy choices are far from ties and answers are non-empty.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LanguageModel(LlamaForCausalLM(config))


def _prompts(world, families=("colour", "dialogue", "count", "reading"), per_family=2):
    scenes = {r["id"]: r for r in json.loads((world / "scenes" / "val.json").read_text())}
    prompts = []
    for family in families:
        for item in json.loads((world / "eval" / "val" / f"{family}.json").read_text())[:per_family]:
            prompts.append(prompt_messages(scenes[item["scene_id"]]["detailed_caption"], item))
    return prompts


def test_batched_left_padded_answers_equal_one_at_a_time(random_lm, tokenizer, shapes_world):
    prompts = _prompts(shapes_world)
    lengths = {len(tokenize_conversation(tokenizer, TEMPLATE, p, add_generation_prompt=True).input_ids)
               for p in prompts}
    assert len(lengths) > 1  # a batch really needs padding
    one = greedy_answers(random_lm, tokenizer, TEMPLATE, prompts, max_new_tokens=6, batch_size=1)
    batched = greedy_answers(random_lm, tokenizer, TEMPLATE, prompts, max_new_tokens=6, batch_size=8)
    assert len(one) == len(prompts)
    assert batched == one
    assert len(set(one)) > len(one) // 2  # distinct, mostly non-empty answers: the comparison has teeth


def test_length_batches_cover_every_index_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = length_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_greedy_answer_equals_a_hand_written_greedy_loop(random_lm, tokenizer, shapes_world):
    prompt = _prompts(shapes_world, families=("count",), per_family=1)[0]
    ids = tokenize_conversation(tokenizer, TEMPLATE, prompt, add_generation_prompt=True).input_ids
    generated = []
    with torch.no_grad():
        for _ in range(6):
            logits = random_lm.model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    expected = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert greedy_answers(random_lm, tokenizer, TEMPLATE, [prompt], max_new_tokens=6) == [expected]


def _patch_answers(monkeypatch, world, split, limit, answer_for):
    """Replace greedy_answers by one that answers each item with answer_for(family, item), after
    checking the prompts it gets are the items' questions in order."""
    description = json.loads((world / "world.json").read_text())
    queue = [(family, item) for family in description["families"]
             for item in json.loads((world / "eval" / split / f"{family}.json").read_text())[:limit]]
    calls = []

    def fake(model, tokenizer, template, prompts, **kwargs):
        answers = []
        for prompt in prompts:
            family, item = queue.pop(0)
            assert prompt[-1]["from"] == "human" and prompt[-1]["value"].endswith(item["question"])
            assert len(prompt) == 1 + len(item.get("context", []))
            answers.append(answer_for(family, item))
        calls.append(len(prompts))
        return answers

    monkeypatch.setattr(text_qa, "greedy_answers", fake)
    return queue, calls


@pytest.mark.parametrize("split,limit", [("test", None), ("val", 2)])
def test_accuracy_is_one_for_true_answers(monkeypatch, shapes_world, split, limit):
    queue, calls = _patch_answers(monkeypatch, shapes_world, split, limit,
                                  lambda family, item: item["answer"].upper() + ".")  # normalised before comparing
    metrics = evaluate_text_qa(None, None, TEMPLATE, shapes_world, split, limit_per_family=limit)
    assert not queue and len(calls) == len(FAMILIES)
    assert set(metrics) == {f"text_qa.{f}" for f in FAMILIES} | {"text_qa_accuracy"}
    assert all(v == 1.0 for v in metrics.values())
    if limit:
        assert max(calls) == limit


def test_accuracy_is_zero_for_wrong_answers(monkeypatch, shapes_world):
    queue, _ = _patch_answers(monkeypatch, shapes_world, "test", None, lambda family, item: "zebra")
    metrics = evaluate_text_qa(None, None, TEMPLATE, shapes_world, "test")
    assert not queue
    assert all(v == 0.0 for v in metrics.values())


def test_accuracy_per_family_and_mean_over_families(monkeypatch, shapes_world):
    # Right on every colour item, on the first item of each other family, wrong elsewhere.
    seen = {}

    def answer(family, item):
        seen[family] = seen.get(family, 0) + 1
        return item["answer"] if family == "colour" or seen[family] == 1 else "zebra"

    _patch_answers(monkeypatch, shapes_world, "test", None, answer)
    metrics = evaluate_text_qa(None, None, TEMPLATE, shapes_world, "test")
    expected = {f"text_qa.{f}": 1.0 if f == "colour" else 1 / seen[f] for f in seen}
    assert {k: v for k, v in metrics.items() if k != "text_qa_accuracy"} == pytest.approx(expected)
    assert metrics["text_qa_accuracy"] == pytest.approx(sum(expected.values()) / len(FAMILIES))
    assert any(count > 1 for count in seen.values())


def test_families_argument_limits_the_evaluation(monkeypatch, shapes_world):
    _patch_answers(monkeypatch, shapes_world, "test", None, lambda family, item: item["answer"])
    # the fake's queue is in world.json order; colour and shape come first there
    metrics = evaluate_text_qa(None, None, TEMPLATE, shapes_world, "test", families=["colour", "shape"])
    assert metrics == {"text_qa.colour": 1.0, "text_qa.shape": 1.0, "text_qa_accuracy": 1.0}


def test_scene_descriptions_detailed_is_the_worlds_caption_and_compact_is_terse(shapes_world):
    from bridgevlm.data.shapes.scene import Scene, compact_caption
    from bridgevlm.eval.text_qa import scene_descriptions

    records = json.loads((shapes_world / "scenes" / "val.json").read_text())
    detailed = scene_descriptions(shapes_world, "val")
    compact = scene_descriptions(shapes_world, "val", "compact")
    assert detailed == {r["id"]: r["detailed_caption"] for r in records}
    assert compact == {r["id"]: compact_caption(Scene.from_json(r)) for r in records}
    assert all(len(compact[k]) < len(detailed[k]) for k in detailed)
    with pytest.raises(ValueError, match="valid: detailed, compact"):
        scene_descriptions(shapes_world, "val", "short")
