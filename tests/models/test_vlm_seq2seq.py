"""A VisionLanguageModel over an encoder-decoder LLM (T5): visual tokens in the encoder input, the
prefix-LM loss on the decoder targets, trainability, save/load/export and answering."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from bridgevlm.config import from_dict
from bridgevlm.data.prefix_lm import PrefixLmCollator, caption_text, qa_text, tokenize_prefix_lm
from bridgevlm.infer.generate import GenerationConfig, generate
from bridgevlm.infer.pipeline import answer
from bridgevlm.models.assemble import VlmConfig, build_vlm, export_vlm, load_vlm, save_vlm
from bridgevlm.models.lora import LoraSettings
from bridgevlm.models.seq2seq_llm import Seq2SeqLanguageModel
from bridgevlm.train.trainability import Trainability, apply_trainability

pytestmark = pytest.mark.usefixtures("single_thread")

RECORDS = [
    [{"from": "human", "value": "<image>\nDescribe the image."},
     {"from": "gpt", "value": "A large red circle at the top left."}],
    [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "blue"}],
]


@pytest.fixture()
def loaded(t5_parts):
    torch.manual_seed(0)
    return build_vlm(from_dict(VlmConfig, t5_parts))


def _batch(loaded):
    """A caption (split at a seeded random word) and a question, each with one image."""
    texts = [caption_text(RECORDS[0], random.Random(3)), qa_text(RECORDS[1], "Question: {} Short answer:")]
    samples = [{**vars(tokenize_prefix_lm(loaded.tokenizer, text, loaded.placeholder)),
                "pixels": loaded.processor.to_uint8(Image.new("RGB", (32, 32), colour))[None]}
               for text, colour in zip(texts, ["red", "blue"])]
    return PrefixLmCollator(loaded.tokenizer.pad_token_id, loaded.processor)(samples)


def test_visual_tokens_go_to_the_encoder_and_the_loss_to_the_decoder(loaded):
    model = loaded.model
    assert isinstance(model.llm, Seq2SeqLanguageModel)
    batch = _batch(loaded)
    is_image = batch["input_ids"] == model.image_token_id
    assert is_image.sum(1).tolist() == [model.num_image_tokens] * 2
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    visual = model.encode_images(batch["pixel_values"])
    assert torch.equal(embeds[0][is_image[0]], visual[0]) and torch.equal(embeds[1][is_image[1]], visual[1])
    out = model(batch)
    assert int(out.num_targets) == int((batch["labels"] != -100).sum())
    with torch.no_grad():
        hf = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.loss_sum.item() / int(out.num_targets) == pytest.approx(hf.loss.item(), rel=1e-5)
    logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          decoder_input_ids=model.llm.decoder_input_ids(batch))
    torch.testing.assert_close(logits, hf.logits, rtol=1e-5, atol=1e-5)


def test_a_batch_without_targets_is_refused_by_name(loaded):
    batch = _batch(loaded)
    del batch["labels"]
    with pytest.raises(ValueError, match=r"needs 'labels' \[B, S\].*has only \['attention_mask', 'input_ids', "
                                         r"'pixel_values', 'sample_ids'\]"):
        loaded.model(batch)
    with pytest.raises(ValueError, match="scores decoder_input_ids"):
        loaded.model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def test_training_the_connector_then_save_load_and_export(loaded, tmp_path):
    model = loaded.model
    apply_trainability(model, Trainability(vision="frozen", connector="full", llm="frozen"), LoraSettings())
    batch = _batch(loaded)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model(batch).loss_sum.item()
    for _ in range(3):
        optimizer.zero_grad()
        out = model(batch)
        out.loss_sum.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(batch).loss_sum.item()
    assert trained < before
    save_vlm(loaded, tmp_path / "stage")
    again = load_vlm(tmp_path / "stage")
    assert isinstance(again.model.llm, Seq2SeqLanguageModel)
    with torch.no_grad():
        assert again.model.eval()(batch).loss_sum.item() == pytest.approx(trained, rel=1e-6)
    export_vlm(again, tmp_path / "export")
    exported = load_vlm(tmp_path / "export")
    with torch.no_grad():
        assert exported.model.eval()(batch).loss_sum.item() == pytest.approx(trained, rel=1e-5)


@torch.no_grad()
def test_answering_runs_the_encoder_on_the_spliced_prompt(loaded):
    model = loaded.model.eval()
    image = Image.new("RGB", (32, 32), "red")
    cfg = GenerationConfig(max_new_tokens=5)
    replies = answer(loaded, [[{"from": "human", "value": "<image>\nWhat colour?"}]], [[image]], cfg)
    assert len(replies) == 1 and isinstance(replies[0], str)
    batch = _batch(loaded)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    ours = generate(model.llm.model, embeds, batch["attention_mask"], cfg, eos_token_id=None).tokens
    reference = model.llm.model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                         max_new_tokens=5, do_sample=False, eos_token_id=None,
                                         pad_token_id=loaded.tokenizer.pad_token_id)
    assert ours == reference[:, 1:].tolist()
