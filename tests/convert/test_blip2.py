"""HF BLIP-2 / InstructBLIP import: logit parity and identical greedy generations, prompts built the bridgevlm way,
with decoder-only (OPT, Llama) and encoder-decoder (T5, FlanT5) language models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                          InstructBlipVisionConfig, LlamaConfig, OPTConfig, T5Config)

from bridgevlm.convert.blip2 import import_blip2, import_instructblip
from bridgevlm.convert.keys import ConversionError
from bridgevlm.data.prefix_lm import PrefixLmCollator, qa_text, tokenize_prefix_lm
from bridgevlm.data.templates import get_template, tokenize_conversation
from bridgevlm.infer.generate import GenerationConfig, generate, left_pad
from bridgevlm.models.assemble import export_vlm, load_vlm
from bridgevlm.models.seq2seq_llm import Seq2SeqLanguageModel, shift_right

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_QUERIES = 4
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               cross_attention_frequency=2, max_position_embeddings=64)
QUESTIONS = ["What colour is the circle?", "How many squares are there? Is there a yellow diamond?"]


ANSWERS = ["a red one", "two squares and no diamond"]


def _text_config(kind: str, tokenizer):
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if kind in ("t5", "flan-t5"):  # T5: tied and rescaled embeddings, ReLU; FlanT5: untied, gated GELU
        flan = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False) if kind == "flan-t5" else {}
        return T5Config(d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                        decoder_start_token_id=tokenizer.pad_token_id, **flan, **special)
    if kind == "opt":  # tied embeddings, learned positions
        return OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=48, max_position_embeddings=128, **special)
    return LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False, **special)


def _save(hf, tokenizer, out, qformer_tokenizer=None):
    torch.manual_seed(1)
    with torch.no_grad():
        # Random weights, so no LayerNorm, bias or query token keeps its trivial initialisation. The LLM's
        # word embeddings stay small: large tied ones make every token predict itself, a dull generation test.
        for name, param in hf.named_parameters():
            if "embed_tokens" not in name:
                param.add_(torch.randn_like(param) * 0.1)
            if name.startswith("language_model.") and hf.language_model.config.is_encoder_decoder:
                param.add_(torch.randn_like(param) * 0.2)  # tiny T5s repeat one token unless shaken harder
            if name.endswith("language_model.shared.weight"):
                param.mul_(0.02)  # T5 initialises its (tied) word embeddings with std 1, not Llama's 0.02
        lm = hf.language_model
        if lm.config.is_encoder_decoder:
            final_norm = lm.decoder.final_layer_norm
        else:
            final_norm = lm.model.norm if hasattr(lm.model, "norm") else lm.model.decoder.final_layer_norm
        final_norm.weight.mul_(20)  # decisive logits: greedy choices are not decided by rounding
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if qformer_tokenizer is not None:
        qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    return out


def _blip2(tokenizer, tmp_path_factory, kind: str):
    torch.manual_seed(0)
    config = Blip2Config(vision_config=Blip2VisionConfig(**VISION),
                         qformer_config=Blip2QFormerConfig(**QFORMER, vocab_size=60),
                         text_config=_text_config(kind, tokenizer), num_query_tokens=NUM_QUERIES,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    return _save(Blip2ForConditionalGeneration(config), tokenizer, tmp_path_factory.mktemp(f"blip2_{kind}"))


@pytest.fixture(scope="module", params=["opt", "llama"])
def blip2_dir(request, tokenizer, tmp_path_factory):
    return _blip2(tokenizer, tmp_path_factory, request.param)


@pytest.fixture(scope="module", params=["t5", "flan-t5"])
def blip2_t5_dir(request, tokenizer, tmp_path_factory):
    return _blip2(tokenizer, tmp_path_factory, request.param)


def _instructblip(tokenizer, tmp_path_factory, kind: str):
    torch.manual_seed(0)
    # The session tokenizer stands in for the Q-Former's BERT tokenizer: any tokenizer with a matching vocabulary.
    config = InstructBlipConfig(vision_config=InstructBlipVisionConfig(**VISION),
                                qformer_config=InstructBlipQFormerConfig(**QFORMER, vocab_size=len(tokenizer),
                                                                         pad_token_id=tokenizer.pad_token_id),
                                text_config=_text_config(kind, tokenizer), num_query_tokens=NUM_QUERIES,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    return _save(InstructBlipForConditionalGeneration(config), tokenizer,
                 tmp_path_factory.mktemp(f"instructblip_{kind}"), qformer_tokenizer=tokenizer)


@pytest.fixture(scope="module")
def instructblip_dir(tokenizer, tmp_path_factory):
    return _instructblip(tokenizer, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def instructblip_t5_dir(tokenizer, tmp_path_factory):
    return _instructblip(tokenizer, tmp_path_factory, "flan-t5")


def _prompts(loaded):
    """Two prompts of different lengths, each with one image, tokenised by bridgevlm's template code and
    left-padded; HF takes the very same ids (the placeholder convention is shared)."""
    template = get_template("vicuna_v1_nosys")
    rows = [tokenize_conversation(loaded.tokenizer, template, [{"from": "human", "value": f"<image>\n{q}"}],
                                  add_generation_prompt=True, image_placeholder=loaded.placeholder).input_ids
            for q in QUESTIONS]
    ids, mask = left_pad(rows, loaded.tokenizer.pad_token_id)
    assert (ids == loaded.model.image_token_id).sum(1).tolist() == [NUM_QUERIES, NUM_QUERIES]
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    torch.manual_seed(2)
    return ids, mask, torch.randn(2, 3, 32, 32)


def _greedy_hf(hf, tokenizer, new_tokens, **inputs):
    tokens = hf.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    return tokens[:, -new_tokens:].tolist()  # transformers returns the prompt ids first


def _greedy_ours(model, embeds, mask, new_tokens):
    return generate(model.llm.model, embeds, mask, GenerationConfig(max_new_tokens=new_tokens), eos_token_id=None).tokens


@torch.no_grad()
def test_blip2_import_matches_transformers(blip2_dir, tokenizer):
    loaded = import_blip2(blip2_dir)
    model = loaded.model.eval()
    assert loaded.placeholder.count == NUM_QUERIES and loaded.qformer_tokenizer is None
    assert model.vision.num_tokens == 17  # 4x4 patches and the CLS token, all read by the Q-Former
    ids, mask, pixels = _prompts(loaded)
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    reference = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    ours = model.logits(ids, mask, pixels)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5
    hf_tokens = _greedy_hf(hf, tokenizer, 6, pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert _greedy_ours(model, model.embed(ids, pixels), mask, 6) == hf_tokens
    assert len({token for row in hf_tokens for token in row}) > 2  # not one token repeated


@torch.no_grad()
def test_instructblip_import_matches_transformers_with_instructions(instructblip_dir, tokenizer):
    loaded = import_instructblip(instructblip_dir)
    model = loaded.model.eval()
    assert loaded.qformer_tokenizer is not None
    ids, mask, pixels = _prompts(loaded)
    # The instruction goes to the Q-Former too, right-padded, as InstructBlipProcessor does.
    instructions = loaded.qformer_tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    q_ids, q_mask = instructions["input_ids"], instructions["attention_mask"]
    assert q_mask[0].sum() < q_mask[1].sum()
    hf = InstructBlipForConditionalGeneration.from_pretrained(instructblip_dir).eval()
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, qformer_input_ids=q_ids,
                  qformer_attention_mask=q_mask)
    reference = hf(**inputs).logits
    ours = model.logits(ids, mask, pixels, q_ids, q_mask)
    assert (ours - reference).abs().max().item() <= 1e-5
    # the instruction matters: the same images with the instructions swapped give other logits
    swapped = model.logits(ids, mask, pixels, q_ids.flip(0), q_mask.flip(0))
    assert (swapped - reference).abs().max().item() > 1e-3
    # ... and reaches the model through a training batch's keys too: the loss is HF's logits' loss
    labels = ids.masked_fill((mask == 0) | (ids == model.image_token_id), -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
             "qformer_input_ids": q_ids, "qformer_attention_mask": q_mask}
    supervised = labels[:, 1:] != -100
    expected = F.cross_entropy(reference[:, :-1][supervised], labels[:, 1:][supervised], reduction="sum")
    assert abs(model(batch).loss_sum.item() - expected.item()) <= 1e-4 * expected.item()
    hf_tokens = _greedy_hf(hf, tokenizer, 6, **inputs)
    assert _greedy_ours(model, model.embed(ids, pixels, qformer_input_ids=q_ids, qformer_attention_mask=q_mask),
                        mask, 6) == hf_tokens
    assert len({token for row in hf_tokens for token in row}) > 2


@torch.no_grad()
def test_imported_blip2_exports_as_a_bridgevlm_directory(blip2_dir, tmp_path):
    loaded = import_blip2(blip2_dir)
    ids, mask, pixels = _prompts(loaded)
    before = loaded.model.eval().logits(ids, mask, pixels)
    export_vlm(loaded, tmp_path / "native")
    again = load_vlm(tmp_path / "native")
    assert again.model.vision.post_norm and again.model.vision.select == "full"
    assert (again.model.eval().logits(ids, mask, pixels) - before).abs().max().item() <= 1e-5


@torch.no_grad()
def test_instructions_need_a_connector_that_reads_them(blip2_dir):
    loaded = import_blip2(blip2_dir)
    ids, _, pixels = _prompts(loaded)
    model = loaded.model.eval()
    with pytest.raises(ValueError, match="does not read instructions"):
        model.embed(ids, pixels, qformer_input_ids=torch.ones(2, 3, dtype=torch.long))


def test_instruction_count_must_match_the_images(instructblip_dir):
    loaded = import_instructblip(instructblip_dir)
    ids, _, pixels = _prompts(loaded)
    with pytest.raises(ValueError, match=r"1 instruction\(s\) \(qformer_input_ids\) for 2 image\(s\)"):
        loaded.model.embed(ids, pixels, qformer_input_ids=torch.ones(1, 3, dtype=torch.long))


def test_bad_directories_and_wrong_families_are_named(tmp_path, instructblip_dir):
    with pytest.raises(ConversionError, match="not a Hugging Face BLIP-2 directory"):
        import_blip2(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a Hugging Face InstructBLIP directory"):
        import_instructblip(tmp_path / "empty")
    with pytest.raises(ConversionError, match="'instructblip' checkpoint, not BLIP-2.*use import_instructblip"):
        import_blip2(instructblip_dir)


def test_a_checkpoint_missing_a_weight_is_refused(blip2_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(blip2_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="lacks or misshapes 1 weight.*crossattention.attention.key.weight"):
        import_blip2(broken)


def test_a_checkpoint_without_image_token_index_uses_the_tokenizers_image_token(blip2_dir, tmp_path, tokenizer):
    # transformers' default (None) leaves HF itself unable to place the image; bridgevlm falls back to <image>.
    old = tmp_path / "old"
    shutil.copytree(blip2_dir, old)
    config = json.loads((old / "config.json").read_text())
    config["image_token_index"] = None
    (old / "config.json").write_text(json.dumps(config))
    loaded = import_blip2(old)
    assert loaded.model.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == loaded.config.image_token_id


@torch.no_grad()
def test_load_and_convert_dispatch_on_the_model_type(blip2_dir, instructblip_dir, tmp_path):
    from bridgevlm.cli import main
    from bridgevlm.loading import load

    ids, mask, pixels = _prompts(import_blip2(blip2_dir))
    expected = import_blip2(blip2_dir).model.eval().logits(ids, mask, pixels)
    assert (load(blip2_dir).model.eval().logits(ids, mask, pixels) - expected).abs().max().item() == 0
    assert load(instructblip_dir).qformer_tokenizer is not None  # the InstructBLIP importer ran
    assert main(["convert", str(blip2_dir), "--out", str(tmp_path / "converted")]) == 0
    converted = load(tmp_path / "converted").model.eval()
    assert (converted.logits(ids, mask, pixels) - expected).abs().max().item() <= 1e-5
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="a 'bert' model; .*'llava', 'blip-2', 'instructblip'"):
        load(tmp_path / "bert")


# --------------------------------------------------------------------------------------------
# Encoder-decoder language models (T5, FlanT5): the prefix goes to the encoder, the target to the decoder.
# --------------------------------------------------------------------------------------------

def _prefix_lm_batch(loaded):
    """Two VQA samples in FlanT5's prompt format, tokenised by bridgevlm's prefix-LM helpers: encoder ids
    (right-padded) with the image placeholders, and the answers as labels (-100 on padding)."""
    samples = [vars(tokenize_prefix_lm(loaded.tokenizer, qa_text(
        [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}], "Question: {} Short answer:"),
        loaded.placeholder)) for q, a in zip(QUESTIONS, ANSWERS)]
    batch = PrefixLmCollator(loaded.tokenizer.pad_token_id)(samples)
    assert (batch["input_ids"] == loaded.model.image_token_id).sum(1).tolist() == [NUM_QUERIES, NUM_QUERIES]
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # both sides are padded
    torch.manual_seed(2)
    batch["pixel_values"] = torch.randn(2, 3, 32, 32)
    return batch


def _check_seq2seq_parity(loaded, hf, tokenizer, batch, **instructions):
    """Logits and the prefix-LM loss equal HF's on the same ids; greedy generations are HF's."""
    model = loaded.model.eval()
    assert isinstance(model.llm, Seq2SeqLanguageModel)
    ids, mask, pixels, labels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
    reference = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **instructions)
    decoder_ids = shift_right(labels, model.llm.config.decoder_start_token_id, tokenizer.pad_token_id)
    ours = model.logits(ids, mask, pixels, decoder_input_ids=decoder_ids, **instructions)
    assert ours.shape == reference.logits.shape == (*labels.shape, len(tokenizer))
    assert (ours - reference.logits).abs().max().item() <= 1e-5
    out = model({**batch, **instructions})
    assert int(out.num_targets) == int((labels != -100).sum())
    assert out.loss_sum.item() / int(out.num_targets) == pytest.approx(reference.loss.item(), rel=1e-5)
    # generation: the encoder reads left-padded prompts; HF returns the decoder start token first
    prompts, prompt_mask = left_pad([row[keep.bool()].tolist() for row, keep in zip(ids, mask)],
                                    tokenizer.pad_token_id)
    hf_tokens = hf.generate(pixel_values=pixels, input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id, **instructions)
    assert hf_tokens[:, 0].tolist() == [model.llm.config.decoder_start_token_id] * 2
    embeds = model.embed(prompts, pixels, **instructions)
    assert _greedy_ours(model, embeds, prompt_mask, 6) == hf_tokens[:, 1:].tolist()
    assert len({token for row in hf_tokens[:, 1:].tolist() for token in row}) > 2  # not one token repeated


@torch.no_grad()
def test_blip2_t5_import_matches_transformers(blip2_t5_dir, tokenizer):
    loaded = import_blip2(blip2_t5_dir)
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_t5_dir).eval()
    _check_seq2seq_parity(loaded, hf, tokenizer, _prefix_lm_batch(loaded))


@torch.no_grad()
def test_instructblip_t5_import_matches_transformers_with_instructions(instructblip_t5_dir, tokenizer):
    loaded = import_instructblip(instructblip_t5_dir)
    hf = InstructBlipForConditionalGeneration.from_pretrained(instructblip_t5_dir).eval()
    instructions = loaded.qformer_tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    _check_seq2seq_parity(loaded, hf, tokenizer, _prefix_lm_batch(loaded),
                          qformer_input_ids=instructions["input_ids"],
                          qformer_attention_mask=instructions["attention_mask"])


@torch.no_grad()
def test_imported_blip2_t5_exports_and_beam_searches_as_transformers(blip2_t5_dir, tmp_path, tokenizer):
    loaded = import_blip2(blip2_t5_dir)
    batch = _prefix_lm_batch(loaded)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    decoder_ids = shift_right(batch["labels"], loaded.model.llm.config.decoder_start_token_id, tokenizer.pad_token_id)
    before = loaded.model.eval().logits(ids, mask, pixels, decoder_input_ids=decoder_ids)
    export_vlm(loaded, tmp_path / "native")
    again = load_vlm(tmp_path / "native")  # the exported llm/ is a T5: build_vlm picks the seq2seq wrapper
    assert isinstance(again.model.llm, Seq2SeqLanguageModel)
    assert (again.model.eval().logits(ids, mask, pixels, decoder_input_ids=decoder_ids) - before).abs().max() <= 1e-5
    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_t5_dir).eval()
    reference = hf.generate(pixel_values=pixels[:1], input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=8,
                            num_beams=3, length_penalty=0.5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[0, 1:].tolist()
    if tokenizer.eos_token_id in reference:
        reference = reference[:reference.index(tokenizer.eos_token_id)]
    model = again.model.eval()
    ours = generate(model.llm.model, model.embed(ids[:1], pixels[:1]), mask[:1],
                    GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.5), tokenizer.eos_token_id)
    assert ours.tokens[0] == reference and len(reference) > 1
