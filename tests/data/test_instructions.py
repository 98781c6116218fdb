"""Q-Former instructions: which text goes with each image, its tokens, and how a batch carries them."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

from bridgevlm.data.conversations import ConversationDataset, ImageSource, PadCollator
from bridgevlm.data.images import ImageProcessor
from bridgevlm.data.instructions import (InstructionTokenizer, current_instruction, image_instructions,
                                         without_image_tags)
from bridgevlm.data.templates import ImagePlaceholder, get_template

COLOUR = "What colour is the circle?"
COUNT = "How many squares are there?"


def test_an_instruction_is_its_turn_without_the_image_tag():
    assert without_image_tags(f"<image>\n{COLOUR}") == COLOUR
    assert without_image_tags(f"{COLOUR}\n<image>") == COLOUR
    assert without_image_tags("Compare <image> and <image>.") == "Compare and ."
    assert without_image_tags("<image>") == ""
    messages = [{"from": "human", "value": f"<image>\n{COLOUR}"}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": f"{COUNT} <image>"}, {"from": "gpt", "value": "2"},
                {"from": "human", "value": "Sure?"}]
    assert image_instructions(messages) == [COLOUR, COUNT]  # training: the turn holding each tag
    assert current_instruction(messages) == "Sure?"  # inference: the turn being answered
    assert current_instruction([{"role": "user", "content": f"<image>\n{COLOUR}"}]) == COLOUR


def test_instruction_tokens_are_start_text_end_and_keep_their_beginning(tokenizer):
    words = tokenizer(COLOUR, add_special_tokens=False)["input_ids"]
    encoder = InstructionTokenizer(tokenizer, max_length=32)
    assert encoder.encode(COLOUR) == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    assert InstructionTokenizer(tokenizer, max_length=5).encode(COLOUR) == [
        tokenizer.bos_token_id, *words[:3], tokenizer.eos_token_id]
    assert encoder.encode("") == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="room for the start and end tokens"):
        InstructionTokenizer(tokenizer, max_length=1)


def test_a_bert_tokenizer_gives_what_hf_instructblip_feeds_its_qformer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "colour", "is", "the", "circle", "?"]
    bert = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    encoder = InstructionTokenizer(bert, max_length=16)
    assert encoder.encode(COLOUR) == bert(COLOUR)["input_ids"] == [2, 4, 5, 6, 7, 8, 9, 3]
    assert InstructionTokenizer(bert, max_length=4).encode(COLOUR) == [2, 4, 5, 3]


@pytest.fixture
def image_records(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    records = [
        {"id": "one", "image": "a.png", "conversations": [
            {"from": "human", "value": f"<image>\n{COLOUR}"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "large"}]},
        {"id": "two", "image": ["b.png", "a.png"], "conversations": [
            {"from": "human", "value": f"<image>\n{COUNT}"}, {"from": "gpt", "value": "2"},
            {"from": "human", "value": "<image>\nIs there a circle?"}, {"from": "gpt", "value": "yes"}]},
    ]
    return tmp_path, records


def _dataset(tokenizer, folder, records, instructions=None, pretokenize=False):
    placeholder = ImagePlaceholder(tokenizer.convert_tokens_to_ids("<image>"), 2)
    return ConversationDataset(records, tokenizer, get_template("vicuna_v1_nosys"), 128, pretokenize=pretokenize,
                               images=ImageSource(folder, ImageProcessor(size=4), placeholder), instructions=instructions)


@pytest.mark.parametrize("pretokenize", [False, True])
def test_each_image_gets_its_turns_instruction_in_reading_order(tokenizer, image_records, pretokenize):
    folder, records = image_records
    encoder = InstructionTokenizer(tokenizer, max_length=7)
    data = _dataset(tokenizer, folder, records, encoder, pretokenize)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokens(text):  # the hand-made expectation: start, the first 5 text tokens, end
        return [bos, *tokenizer(text, add_special_tokens=False)["input_ids"][:5], eos]

    assert len(tokenizer(COLOUR, add_special_tokens=False)["input_ids"]) > 5  # so it is cut

    assert data[0]["instruction_ids"] == [tokens(COLOUR)]
    assert data[1]["instruction_ids"] == [tokens(COUNT), tokens("Is there a circle?")]
    assert tokenizer.decode(data[1]["instruction_ids"][1], skip_special_tokens=True) == "Is there a circle?"
    batch = PadCollator(tokenizer.pad_token_id, ImageProcessor(size=4), instruction_pad_token_id=99)([data[0], data[1]])
    # one row per image, in the order of pixel_values, right-padded, at most max_length wide
    assert batch["pixel_values"].shape[0] == batch["qformer_input_ids"].shape[0] == 3
    expected = [tokens(COLOUR), tokens(COUNT), tokens("Is there a circle?")]
    width = max(map(len, expected))
    assert batch["qformer_input_ids"].shape[1] == width <= 7
    assert batch["qformer_input_ids"].tolist() == [row + [99] * (width - len(row)) for row in expected]
    assert batch["qformer_attention_mask"].tolist() == [[1] * len(row) + [0] * (width - len(row)) for row in expected]
    # the pixels follow the same order: sample one's image, then sample two's b.png and a.png
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_no_instructions_without_a_connector_that_reads_them(tokenizer, image_records):
    folder, records = image_records
    data = _dataset(tokenizer, folder, records)
    assert "instruction_ids" not in data[0]
    batch = PadCollator(tokenizer.pad_token_id, ImageProcessor(size=4))([data[0], data[1]])
    assert "pixel_values" in batch and not any(key.startswith("qformer_") for key in batch)
    text_only = [{"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]}]
    sample = _dataset(tokenizer, folder, text_only, InstructionTokenizer(tokenizer, 8))[0]
    assert "instruction_ids" not in sample  # a sample without an image has nothing to instruct
