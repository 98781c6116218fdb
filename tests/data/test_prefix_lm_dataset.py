"""PrefixLmDataset: caption splits drawn from (seed, epoch, index), one sample per reply with the earlier
exchanges in the encoder, images and Q-Former instructions as ConversationDataset gives them."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from bridgevlm.data.conversations import ConversationDataset, ImageSource
from bridgevlm.data.images import ImageProcessor
from bridgevlm.data.instructions import InstructionTokenizer
from bridgevlm.data.prefix_lm import (PrefixLmCollator, caption_text, encoder_prompt, qa_text,
                                      question_format, tokenize_prefix_lm, tokenize_source)
from bridgevlm.data.prefix_lm_dataset import PrefixLmDataset
from bridgevlm.data.templates import ConversationError, ImagePlaceholder, get_template
from bridgevlm.recipes.stage_data import EpochConcatDataset

CAPTIONS = [{"id": f"c{i}", "conversations": [
    {"from": "human", "value": "Describe the image."},
    {"from": "gpt", "value": f"There are {i} objects. A large red circle at the top left and a small blue square."}]}
    for i in range(8)]
DIALOGUE = [{"id": "d0", "conversations": [
    {"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "2"},
    {"from": "human", "value": "Is there a yellow diamond?"}, {"from": "gpt", "value": "no"}]}]


def _ids(data):
    return [{k: list(map(int, v)) for k, v in data[i].items()} for i in range(len(data))]


def test_caption_splits_depend_on_seed_epoch_and_index_alone(tokenizer):
    plain = get_template("plain")
    data = PrefixLmDataset(CAPTIONS, tokenizer, plain, 64, seed=5)
    again = PrefixLmDataset(CAPTIONS, tokenizer, plain, 64, seed=5)
    assert _ids(data) == _ids(again) and _ids(data) == _ids(data)  # reading twice gives the same samples
    epoch0 = _ids(data)
    data.set_epoch(1)
    epoch1 = _ids(data)
    assert epoch1 != epoch0  # a new split each epoch
    again.set_epoch(1)
    assert _ids(again) == epoch1  # a resumed run at epoch 1 sees what an uninterrupted one saw
    assert _ids(PrefixLmDataset(CAPTIONS, tokenizer, plain, 64, seed=6)) != epoch0
    for i, sample in enumerate(epoch1):  # a split of the caption: prefix + EOS to the encoder, suffix + EOS as target
        split = caption_text(CAPTIONS[i]["conversations"], random.Random(f"prefix_lm/5/1/{i}"))
        expected = tokenize_prefix_lm(tokenizer, split, None, 64, 64)
        assert sample == {"input_ids": expected.input_ids, "labels": expected.labels}
        assert not split.source.startswith("Describe")  # the caption request is dropped, as `plain` does


def test_a_mixture_passes_the_epoch_to_its_parts(tokenizer):
    parts = [PrefixLmDataset(CAPTIONS[:4], tokenizer, get_template("plain"), 64),
             PrefixLmDataset(CAPTIONS[4:], tokenizer, get_template("plain"), 64)]
    mixture = EpochConcatDataset(parts)
    mixture.set_epoch(3)
    assert [p.epoch for p in parts] == [3, 3]


def test_every_reply_is_a_sample_with_the_earlier_exchanges_in_the_encoder(tokenizer):
    template = get_template("blip2_vqa_short")
    assert question_format(template) == "Question: {} Short answer:"
    data = PrefixLmDataset(DIALOGUE, tokenizer, template, 128)
    eager = PrefixLmDataset(DIALOGUE, tokenizer, template, 128, pretokenize=True)
    messages = DIALOGUE[0]["conversations"]
    assert len(data) == 3 and _ids(data) == _ids(eager)
    for k in range(3):
        text = qa_text(messages[:2 * k + 2], "Question: {} Short answer:")
        assert _ids(data)[k] == {"input_ids": tokenize_source(tokenizer, text.source),
                                 "labels": tokenize_prefix_lm(tokenizer, text).labels}
    assert qa_text(messages, "Question: {} Short answer:").source == (
        "Question: What colour is the circle? Short answer: red\n"
        "Question: How many squares are there? Short answer: 2\n"
        "Question: Is there a yellow diamond? Short answer:")
    report = data.supervision_report()
    assert report["samples"] == 3 and 0 < report["supervised_share"] < 1


def test_a_long_history_loses_its_oldest_exchanges_first(tokenizer):
    template = get_template("blip2_vqa_short")
    messages = DIALOGUE[0]["conversations"]
    keep_one = tokenize_source(tokenizer, qa_text(messages, question_format(template), history=1).source)
    everything = tokenize_source(tokenizer, qa_text(messages, question_format(template)).source)
    assert len(keep_one) < len(everything)
    data = PrefixLmDataset(DIALOGUE, tokenizer, template, len(keep_one))
    assert list(data[2]["input_ids"]) == keep_one  # the second exchange and the question stay
    question = tokenize_source(tokenizer, qa_text(messages, question_format(template), history=0).source)
    short = PrefixLmDataset(DIALOGUE, tokenizer, template, len(question) - 2)[2]["input_ids"]
    assert list(short) == question[:len(question) - 3] + [tokenizer.eos_token_id]  # then the question's end


def test_inference_prompts_are_the_encoder_side_of_training_samples(tokenizer):
    for name in ("vicuna_v1_nosys", "blip2_vqa_short"):
        template = get_template(name)
        data = PrefixLmDataset(DIALOGUE, tokenizer, template, 128)
        messages = DIALOGUE[0]["conversations"]
        for k in range(3):
            prompt = tokenize_source(tokenizer, encoder_prompt(messages[:2 * k + 1], template))
            assert prompt == list(data[k]["input_ids"])
    # captions: the prompt is the image alone, the source of a split before the caption's first word
    asked = [{"from": "human", "value": "<image>\nDescribe it."}]
    assert encoder_prompt(asked, get_template("plain")) == "<image>"
    assert caption_text(asked + [{"from": "gpt", "value": "red"}], random.Random(0)).source == "<image>"


@pytest.fixture
def image_records(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return tmp_path, [
        {"id": "one", "image": ["b.png", "a.png"], "conversations": [
            {"from": "human", "value": "<image>\nHow many squares are there?"}, {"from": "gpt", "value": "2"},
            {"from": "human", "value": "<image>\nIs there a circle?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "cap", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red square."}]},
    ]


def test_images_and_instructions_are_those_a_conversation_dataset_gives(tokenizer, image_records):
    folder, records = image_records
    placeholder = ImagePlaceholder(tokenizer.convert_tokens_to_ids("<image>"), 2)
    images = ImageSource(folder, ImageProcessor(size=4), placeholder)
    instructions = InstructionTokenizer(tokenizer, max_length=16)
    template = get_template("vicuna_v1_nosys")
    data = PrefixLmDataset(records, tokenizer, template, 128, images=images, instructions=instructions)
    reference = ConversationDataset(records, tokenizer, template, 128, images=images, instructions=instructions)
    assert len(data) == 3 and data.modalities() == [1, 1, 1]
    first, second, caption = data[0], data[1], data[2]
    # the sample for the first reply holds the image whose tag its turns hold; the second both, in order
    assert torch.equal(first["pixels"], reference[0]["pixels"][:1])
    assert first["instruction_ids"] == reference[0]["instruction_ids"][:1]
    assert torch.equal(second["pixels"], reference[0]["pixels"])
    assert second["instruction_ids"] == reference[0]["instruction_ids"] and second["sample_id"] == "one"
    assert list(second["input_ids"][:4]) == [placeholder.token_id] * 4  # images first in the source
    assert torch.equal(caption["pixels"], reference[1]["pixels"])
    batch = PrefixLmCollator(tokenizer.pad_token_id, ImageProcessor(size=4), 0)([first, second, caption])
    assert batch["pixel_values"].shape[0] == batch["qformer_input_ids"].shape[0] == 4
    assert (batch["input_ids"] == placeholder.token_id).sum().item() == 4 * 2
    with pytest.raises(ConversationError, match=r"sample 0 \(id 'one'\): has 2 <image> tag\(s\) but 1 image"):
        PrefixLmDataset([{**records[0], "image": "a.png"}], tokenizer, template, 128, images=images)


def test_malformed_data_is_named(tokenizer):
    two_replies = [{"id": "x", "conversations": DIALOGUE[0]["conversations"][:4]}]
    with pytest.raises(ConversationError, match=r"x.json: sample 0 \(id 'x'\): has 2 replies, but a caption"):
        PrefixLmDataset(two_replies, tokenizer, get_template("plain"), 64, source="x.json")
    unanswered = [{"id": "y", "conversations": DIALOGUE[0]["conversations"][:1]}]
    with pytest.raises(ConversationError, match=r"sample 0 \(id 'y'\): has no reply"):
        PrefixLmDataset(unanswered, tokenizer, get_template("vicuna_v1_nosys"), 64)
    chat_template = SimpleNamespace(name="chat_template", plain=False)  # a tokenizer's Jinja template
    with pytest.raises(ConversationError, match="'chat_template' format renders decoder-only chat prompts"):
        PrefixLmDataset(DIALOGUE, tokenizer, chat_template, 64)
