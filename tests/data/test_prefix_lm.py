"""Prefix-LM samples: caption splits, question/answer splits, tokenisation and collation."""
from __future__ import annotations

import random

import pytest
import torch

from bridgevlm.data.prefix_lm import PrefixLmCollator, PrefixLmText, caption_text, qa_text, tokenize_prefix_lm
from bridgevlm.data.templates import ConversationError, ImagePlaceholder

CAPTION = [{"from": "human", "value": "<image>\nDescribe the image."},
           {"from": "gpt", "value": "A large red circle at the top left."}]
QA = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
PLACEHOLDER = ImagePlaceholder(token_id=399, count=3)


def test_caption_split_is_seeded_and_covers_every_cut():
    words = CAPTION[1]["value"].split()
    splits = [caption_text(CAPTION, random.Random(seed)) for seed in range(200)]
    assert splits[:20] == [caption_text(CAPTION, random.Random(seed)) for seed in range(20)]  # same seed, same split
    for split in splits:
        assert split.source.startswith("<image>") and "Describe" not in split.source  # the prompt is dropped
        prefix = split.source[len("<image>"):]
        assert f"{prefix} {split.target}".strip() == " ".join(words) and split.target
    cuts = {len(s.source[len("<image>"):].split()) for s in splits}
    assert cuts == set(range(len(words)))  # from no prefix (plain captioning) to all words but one


def test_caption_split_keeps_min_target_words():
    rng = random.Random(0)
    assert all(len(caption_text(CAPTION, rng, min_target_words=3).target.split()) >= 3 for _ in range(50))
    with pytest.raises(ConversationError, match="caption of 8 word.*min_target_words 9"):
        caption_text(CAPTION, rng, min_target_words=9)


def test_qa_split_puts_the_question_in_the_source():
    assert qa_text(QA) == PrefixLmText("<image>What colour is the circle?", "red")
    prompted = qa_text(QA, "Question: {} Short answer:")
    assert prompted == PrefixLmText("<image>Question: What colour is the circle? Short answer:", "red")
    history = QA + [{"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "blue"}]
    expected = PrefixLmText("<image>Q: What colour is the circle? A: red\nQ: And the square? A:", "blue")
    assert qa_text(history, "Q: {} A:") == expected
    with pytest.raises(ConversationError, match="end with a reply"):
        qa_text(QA[:1])
    with pytest.raises(ValueError, match="needs a {}"):
        qa_text(QA, "Question:")


def test_tokenize_puts_images_in_the_source_and_ends_both_sides_with_eos(tokenizer):
    eos = tokenizer.eos_token_id
    sample = tokenize_prefix_lm(tokenizer, qa_text(QA), PLACEHOLDER)
    question = tokenizer("What colour is the circle?", add_special_tokens=False)["input_ids"]
    assert sample.input_ids == [399] * 3 + question + [eos] and sample.num_images == 1
    assert sample.labels == tokenizer("red", add_special_tokens=False)["input_ids"] + [eos]
    short = tokenize_prefix_lm(tokenizer, qa_text(QA), PLACEHOLDER, max_source_length=5, max_target_length=1)
    assert short.input_ids == [399] * 3 + question[:1] + [eos] and short.labels == [eos]
    with pytest.raises(ConversationError, match="3 image token.*max_source_length 3"):
        tokenize_prefix_lm(tokenizer, qa_text(QA), PLACEHOLDER, max_source_length=3)


def test_collator_pads_the_encoder_and_the_targets_apart(tokenizer):
    samples = [vars(tokenize_prefix_lm(tokenizer, text, PLACEHOLDER))
               for text in (qa_text(QA), caption_text(CAPTION, random.Random(1)))]
    batch = PrefixLmCollator(tokenizer.pad_token_id)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    targets = [len(s["labels"]) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["labels"].shape == (2, max(targets))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"] != -100).sum(1).tolist() == targets
    for row, sample in enumerate(samples):
        assert batch["labels"][row, :targets[row]].tolist() == sample["labels"]
        assert batch["input_ids"][row, :lengths[row]].tolist() == sample["input_ids"]
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id)
