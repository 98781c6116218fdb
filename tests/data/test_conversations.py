import numpy as np
import pytest
import torch

from bridgevlm.data.captions import ImageCaptionCollator, encode_text, pad_texts
from bridgevlm.data.images import ImageProcessor
from bridgevlm.data.templates import IGNORE_INDEX, ConversationError, get_template
from bridgevlm.data.conversations import ConversationDataset, PadCollator


def test_pad_collator():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PadCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = PadCollator(pad_token_id=9)(samples)
    assert batch["input_ids"][1].tolist() == [8, 9, 9]


def test_conversation_dataset_names_the_failing_sample(tokenizer):
    records = [
        {"id": "good", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "lonely", "conversations": [{"from": "human", "value": "q"}]},
    ]
    data = ConversationDataset(records, tokenizer, get_template("vicuna_v1_nosys"), max_length=64, source="x.json")
    assert len(data) == 2
    sample = data[0]
    assert len(sample["input_ids"]) == len(sample["labels"]) and IGNORE_INDEX in sample["labels"]
    with pytest.raises(ConversationError, match=r"x\.json: sample 1 \(id 'lonely'\)"):
        data[1]


def test_encode_text_keeps_eos_last_when_truncating(tokenizer):
    ids = encode_text(tokenizer, "a large red circle at the top left", max_length=5)
    assert len(ids) == 5
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    full = tokenizer("a large red circle at the top left", add_special_tokens=False)["input_ids"]
    assert ids[1:-1] == full[:3]


def test_pad_texts_and_caption_collator():
    ids, mask = pad_texts([[1, 4, 3], [1, 3]], pad_id=0)
    assert ids.tolist() == [[1, 4, 3], [1, 3, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    processor = ImageProcessor(size=2)
    samples = [{"pixels": torch.full((3, 2, 2), 255, dtype=torch.uint8), "text_ids": [1, 3]},
               {"pixels": torch.zeros((3, 2, 2), dtype=torch.uint8), "text_ids": [1, 5, 3]}]
    batch = ImageCaptionCollator(processor, pad_token_id=0)(samples)
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["pixel_values"][0, 0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-5)
    assert batch["input_ids"].tolist() == [[1, 3, 0], [1, 5, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_pretokenized_dataset_equals_lazy_and_names_bad_samples(tokenizer):
    template = get_template("vicuna_v1")
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Is there a square?"}, {"from": "gpt", "value": "no"},
                                      {"from": "human", "value": "What colour is the circle?"}, {"from": "gpt", "value": "blue"}]},
    ]
    lazy = ConversationDataset(records, tokenizer, template, 512)
    eager = ConversationDataset(records, tokenizer, template, 512, pretokenize=True)
    for i in range(2):
        assert {k: list(v) for k, v in eager[i].items()} == lazy[i]
        assert eager[i]["input_ids"].dtype == np.int32
    bad = records + [{"id": "c", "conversations": [{"from": "gpt", "value": "hello"}]}]
    with pytest.raises(ConversationError, match=r"data\.json: sample 2 \(id 'c'\)"):
        ConversationDataset(bad, tokenizer, template, 512, source="data.json", pretokenize=True)


def test_collator_adds_hard_negatives_and_marks_missing_ones():
    processor = ImageProcessor(size=4)
    pixels = torch.zeros(3, 4, 4, dtype=torch.uint8)
    samples = [{"pixels": pixels, "text_ids": [1, 5, 3], "negative_ids": [1, 6, 3]},
               {"pixels": pixels, "text_ids": [1, 7, 8, 3], "negative_ids": None}]
    batch = ImageCaptionCollator(processor, pad_token_id=0)(samples)
    assert batch["negative_present"].tolist() == [True, False]
    # the missing negative is a placeholder (its own caption), masked out by negative_present
    assert batch["negative_input_ids"].tolist() == [[1, 6, 3, 0], [1, 7, 8, 3]]
    assert batch["negative_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    plain = ImageCaptionCollator(processor, pad_token_id=0)([{"pixels": pixels, "text_ids": [1, 3]}])
    assert "negative_input_ids" not in plain


def test_lengths_and_modalities_for_length_grouping(tokenizer):
    template = get_template("vicuna_v1")
    records = [
        {"id": "short", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "What colour is the large circle at the top?"},
                                         {"from": "gpt", "value": "It is red, and it is drawn at the top left."}]},
    ]
    eager = ConversationDataset(records, tokenizer, template, 512, pretokenize=True)
    assert eager.lengths() == [len(eager[0]["input_ids"]), len(eager[1]["input_ids"])]
    lazy = ConversationDataset(records, tokenizer, template, 512)
    estimate = lazy.lengths()
    assert estimate[0] < estimate[1]  # estimated from characters: the order is what matters
    assert lazy.modalities() == [0, 0]
