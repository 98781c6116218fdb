"""Answering with a VLM: batched == alone, streamed chat == generate, the terminal chat, the CLI round trip,
and a Q-Former that reads the question being answered."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

import bridgevlm
from bridgevlm.cli import main
from bridgevlm.config import from_dict
from bridgevlm.data.conversations import ImageSource
from bridgevlm.data.prefix_lm_dataset import PrefixLmDataset
from bridgevlm.infer.generate import GenerationConfig
from bridgevlm.data.templates import get_template
from bridgevlm.infer.pipeline import Chat, answer, prepare_prompts
from bridgevlm.infer.terminal import run_terminal_chat
from bridgevlm.models.assemble import VlmConfig, build_vlm


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _questions(images):
    return ([[{"from": "human", "value": "<image>\nWhat colour is it?"}],
             [{"from": "human", "value": "Say something."}],
             [{"from": "human", "value": "<image>\nAnd the shape?"}, {"from": "gpt", "value": "a circle"},
              {"from": "human", "value": "Sure?"}]],
            [[Image.open(images[0])], [], [Image.open(images[1])]])


def test_batched_answers_equal_one_at_a_time_and_images_matter(saved_vlm):
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    conversations, pictures = _questions(images)
    cfg = GenerationConfig(max_new_tokens=8)
    batched = answer(loaded, conversations, pictures, cfg)
    alone = [answer(loaded, [c], [p], cfg)[0] for c, p in zip(conversations, pictures)]
    assert batched == alone and all(batched)
    red, green = (loaded.processor(Image.open(images[i]))[None] for i in (0, 2))
    ids = torch.tensor([[loaded.tokenizer.bos_token_id] + [loaded.model.image_token_id] * 16 + [5, 6]])
    with torch.no_grad():  # the prediction depends on the picture
        assert not torch.allclose(loaded.model.logits(ids, None, red)[0, -1], loaded.model.logits(ids, None, green)[0, -1])
    with pytest.raises(ValueError, match="1 <image> tag"):
        answer(loaded, conversations[:1], [[]], cfg)


def test_streamed_chat_equals_generation_and_keeps_history(saved_vlm):
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    cfg = GenerationConfig(max_new_tokens=8)
    chat = Chat(loaded, Image.open(images[0]), cfg)
    pieces = list(chat.stream("What colour is it?"))
    assert "".join(pieces).strip() == answer(loaded, *[[c] for c in _first(images)], cfg)[0]
    second = chat.ask("Sure?")
    assert len(chat.messages) == 4 and chat.messages[3]["value"] == second.strip()
    assert loaded.chat(Image.open(images[0]), "What colour is it?", max_new_tokens=8) == "".join(pieces).strip()


def _first(images):
    conversations, pictures = _questions(images)
    return conversations[0], pictures[0]


def test_terminal_chat_commands(saved_vlm):
    path, images = saved_vlm
    stdin = io.StringIO(f"What colour?\n/image {images[1]}\n/image nowhere.png\n/reset\n/bogus\nHi\n/quit\nnever read\n")
    stdout = io.StringIO()
    run_terminal_chat(bridgevlm.load(path), images[0], GenerationConfig(max_new_tokens=4), stdin, stdout)
    text = stdout.getvalue()
    assert text.count("model> ") == 2
    assert "new conversation" in text and "image not found: nowhere.png" in text and "unknown command '/bogus'" in text


def test_cli_export_convert_eval(saved_vlm, shapes_world, tmp_path, capsys):
    path, images = saved_vlm
    assert main(["export", str(path), "--out", str(tmp_path / "hf"), "--format", "llava"]) == 0
    assert json.loads((tmp_path / "hf/config.json").read_text())["model_type"] == "llava"
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    cfg = GenerationConfig(max_new_tokens=6)
    conversations, pictures = _questions(images)
    reference = answer(bridgevlm.load(path), conversations, pictures, cfg)
    assert answer(bridgevlm.load(tmp_path / "hf"), conversations, pictures, cfg) == reference
    assert answer(bridgevlm.load(tmp_path / "back"), conversations, pictures, cfg) == reference
    capsys.readouterr()
    assert main(["eval", "vlm", str(path), "--world", str(shapes_world), "--limit", "1", "--blind"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"held_in_mean", "held_out_mean"} <= set(metrics["vqa"]) and "blind" in metrics
    assert main(["eval", "vlm", str(path), "--world", str(shapes_world), "--limit", "2", "--rank-candidates",
                 "--template", "blip2_vqa", "--num-beams", "3", "--length-penalty", "-1", "--max-new-tokens", "4"]) == 0
    ranked = json.loads(capsys.readouterr().out)["vqa"]
    assert all(ranked["held_out"][f] in (0.0, 0.5, 1.0) for f in ("multiple_choice", "spatial", "comparison"))
    assert main(["chat", str(tmp_path / "missing")]) == 2


def test_a_qformer_that_reads_instructions_gets_the_user_turn_being_answered(qformer_parts, shapes_world,
                                                                              connector_calls, single_thread):
    loaded = build_vlm(from_dict(VlmConfig, qformer_parts))
    torch.manual_seed(0)
    with torch.no_grad():  # decisive logits (a random tiny LM is nearly uniform), and a Q-Former whose
        loaded.model.llm.model.lm_head.weight.mul_(30)  # queries heed the text, as a trained one's do
        loaded.model.connector.language_projection.weight.mul_(30)
        for param in loaded.model.connector.qformer.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    image = Image.open(shapes_world / "images/test/test_000000.png")
    chat = Chat(loaded, image, GenerationConfig(max_new_tokens=2))
    chat.ask("What colour is the circle?")
    chat.ask("How many squares are there?")
    assert connector_calls.texts(loaded.qformer_tokenizer) == [["What colour is the circle?"],
                                                               ["How many squares are there?"]]
    # batched prompts: each image gets its own conversation's question, padded; the answers equal lone ones
    conversations = [[{"from": "human", "value": "<image>\nIs there a yellow diamond?"}],
                     [{"from": "human", "value": "Say something."}],
                     [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "a star"},
                      {"from": "human", "value": "And its colour?"}]]
    pictures = [[image], [], [Image.open(shapes_world / "images/test/test_000001.png")]]
    cfg = GenerationConfig(max_new_tokens=4)
    batched = answer(loaded, conversations, pictures, cfg)
    assert connector_calls.texts(loaded.qformer_tokenizer)[-1] == ["Is there a yellow diamond?", "And its colour?"]
    assert batched == [answer(loaded, [c], [p], cfg)[0] for c, p in zip(conversations, pictures)]
    # the same prompt with another instruction: other visual tokens, other next-token logits
    batch = prepare_prompts(loaded, get_template(loaded.config.template), conversations[:1], pictures[:1])
    other = torch.tensor([loaded.instruction_tokenizer().encode("What colour is the circle?")])
    model = loaded.model.eval()
    is_image = batch["input_ids"][0] == model.image_token_id
    with torch.no_grad():
        embeds = {name: model.embed(batch["input_ids"], batch["pixel_values"], qformer_input_ids=ids)
                  for name, ids in (("asked", batch["qformer_input_ids"]), ("other", other))}
        logits = {name: model.llm.model(inputs_embeds=e, attention_mask=batch["attention_mask"]).logits[0, -1]
                  for name, e in embeds.items()}
    visual_change = (embeds["asked"] - embeds["other"])[0, is_image].norm() / embeds["asked"][0, is_image].norm()
    assert visual_change > 0.1 and not torch.allclose(logits["asked"], logits["other"])


def test_an_encoder_decoder_prompt_is_the_encoder_side_of_its_training_sample(t5_parts, tmp_path):
    """What a T5 VLM reads to answer turn k (answer, Chat) is what the encoder read in the training sample
    for reply k; a caption prompt (`plain`) is the image alone, a split before the caption's first word."""
    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, {**t5_parts, "template": "blip2_vqa_short"}))
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    image = Image.open(tmp_path / "red.png")
    messages = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "2"}]
    source = ImageSource(tmp_path, loaded.processor, loaded.placeholder)
    template = get_template("blip2_vqa_short")
    training = PrefixLmDataset([{"id": "r", "image": "red.png", "conversations": messages}], loaded.tokenizer,
                               template, 128, images=source)
    for k in range(2):
        batch = prepare_prompts(loaded, template, [messages[:2 * k + 1]], [[image]])
        assert batch["input_ids"][0].tolist() == list(training[k]["input_ids"])
        assert torch.equal(batch["pixel_values"], loaded.processor.normalize(training[k]["pixels"]))
    chat = Chat(loaded, image, GenerationConfig(max_new_tokens=3), template)
    chat.ask("What colour is the circle?")
    assert isinstance(chat.ask("How many squares are there?"), str) and len(chat.messages) == 4

    caption = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."}]
    captions = PrefixLmDataset([{"id": "c", "image": "red.png", "conversations": caption}], loaded.tokenizer,
                               get_template("plain"), 128, images=source)
    sources = []
    for epoch in range(20):
        captions.set_epoch(epoch)
        sources.append(list(captions[0]["input_ids"]))
    prompt = prepare_prompts(loaded, get_template("plain"), [caption[:1]], [[image]])["input_ids"][0].tolist()
    assert prompt in sources and prompt == [loaded.placeholder.token_id] * loaded.placeholder.count + [
        loaded.tokenizer.eos_token_id]
