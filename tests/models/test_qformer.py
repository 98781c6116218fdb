"""Q-Former: parity with HF BLIP-2 / InstructBLIP, the three BLIP-2 masks, key-table errors, the
connector registry, and initialisation from BERT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from bridgevlm.config import from_dict
from bridgevlm.convert.keys import ConversionError
from bridgevlm.convert.qformer_keys import load_bert_weights, load_hf_qformer_state_dict, qformer_config_from_hf
from bridgevlm.models.connectors import ConnectorConfig, build_connector
from bridgevlm.models.connectors.qformer import (QFormer, QFormerConfig, QFormerConnector,
                                                 bidirectional_attention_mask, multimodal_causal_attention_mask,
                                                 unimodal_attention_mask)

HF_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                encoder_hidden_size=24, cross_attention_frequency=2, vocab_size=50, max_position_embeddings=16)
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, num_query_tokens=4, vocab_size=50,
            max_position_embeddings=16, dropout=0.0)
NUM_QUERIES, LLM_HIDDEN = 6, 20
pytestmark = pytest.mark.usefixtures("single_thread")


def _jitter(module: torch.nn.Module) -> None:
    """Perturb every weight, so LayerNorms and biases are not their identity initialisation."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def _hf_state(hf_qformer) -> dict[str, torch.Tensor]:
    """The Q-Former part of a HF *ForConditionalGeneration state dict, plus stand-ins for the other parts."""
    return {"query_tokens": torch.randn(1, NUM_QUERIES, 32),
            **{f"qformer.{key}": value for key, value in hf_qformer.state_dict().items()},
            "language_projection.weight": torch.randn(LLM_HIDDEN, 32),
            "language_projection.bias": torch.randn(LLM_HIDDEN),
            "vision_model.post_layernorm.weight": torch.ones(24), "language_model.lm_head.weight": torch.ones(3, 4)}


def _hf_model(cls, config_cls):
    torch.manual_seed(0)
    hf = cls(config_cls(**HF_SIZES)).eval()
    _jitter(hf)
    return hf


@pytest.fixture(scope="module")
def blip2():
    return _hf_model(transformers.Blip2QFormerModel, transformers.Blip2QFormerConfig)


@pytest.fixture(scope="module")
def instructblip():
    return _hf_model(transformers.InstructBlipQFormerModel, transformers.InstructBlipQFormerConfig)


def _ours(hf, state) -> QFormerConnector:
    connector = QFormerConnector(QFormer(qformer_config_from_hf(hf.config, NUM_QUERIES)), LLM_HIDDEN).eval()
    load_hf_qformer_state_dict(connector, state)
    return connector


@torch.no_grad()
def test_blip2_qformer_matches_transformers(blip2):
    state = _hf_state(blip2)
    ours = _ours(blip2, state)
    assert ours.qformer.config.text_input is False and ours.qformer.layers[1].cross_attn is None
    features = torch.randn(2, 7, 24)
    queries = state["query_tokens"].expand(2, -1, -1)
    expected = blip2(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
    assert torch.allclose(ours.qformer(features).queries, expected, atol=1e-5)
    projected = F.linear(expected, state["language_projection.weight"], state["language_projection.bias"])
    assert ours(features).shape == (2, NUM_QUERIES, LLM_HIDDEN)
    assert torch.allclose(ours(features), projected, atol=1e-5)
    bare = QFormer(qformer_config_from_hf(blip2.config, NUM_QUERIES)).eval()
    load_hf_qformer_state_dict(bare, state)  # the projection is not needed without the connector
    assert torch.allclose(bare(features).queries, expected, atol=1e-5)


@torch.no_grad()
def test_instructblip_instruction_aware_qformer_matches_transformers(instructblip):
    state = _hf_state(instructblip)
    ours = _ours(instructblip, state)
    features = torch.randn(2, 7, 24)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    queries = state["query_tokens"].expand(2, -1, -1)
    hf_mask = torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.long), mask], 1)  # HF: queries are always real
    expected = instructblip(input_ids=ids, attention_mask=hf_mask,
                            query_embeds=queries, encoder_hidden_states=features).last_hidden_state
    out = ours.qformer(features, ids, bidirectional_attention_mask(NUM_QUERIES, mask))
    assert torch.allclose(out.queries, expected[:, :NUM_QUERIES], atol=1e-5)
    real = mask.bool()
    assert torch.allclose(out.text[real], expected[:, NUM_QUERIES:][real], atol=1e-5)
    projection = state["language_projection.weight"], state["language_projection.bias"]
    projected = F.linear(expected[:, :NUM_QUERIES], *projection)
    assert torch.allclose(ours(features, ids, mask), projected, atol=1e-5)
    assert not torch.allclose(ours(features), projected, atol=1e-3)  # the instruction does change the queries
    # A text-only pass (no queries, no cross-attention), as BLIP-2's text encoder for ITC.
    text_only = instructblip(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours.qformer(input_ids=ids, attention_mask=mask).text[real], text_only[real], atol=1e-5)


def _spec_may_attend(kind: str, num_queries: int, row: int, col: int, col_is_real: bool) -> bool:
    """SPEC.md's wording, position by position: queries first, then text; padding is never attended to."""
    if not col_is_real:
        return False
    row_query, col_query = row < num_queries, col < num_queries
    if kind == "unimodal":  # queries and text cannot see each other
        return row_query == col_query
    if kind == "bidirectional":  # all see all
        return True
    return col_query if row_query else (col_query or col <= row)  # text sees queries and preceding text


def test_blip2_masks_follow_the_spec_including_padding():
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    builders = {"unimodal": unimodal_attention_mask, "bidirectional": bidirectional_attention_mask,
                "causal": multimodal_causal_attention_mask}
    for kind, build in builders.items():
        mask = build(3, text_mask)
        assert mask.shape == (2, 7, 7) and mask.dtype == torch.bool
        for b in range(2):
            real = [True] * 3 + text_mask[b].bool().tolist()
            expected = [[_spec_may_attend(kind, 3, i, j, real[j]) for j in range(7)] for i in range(7)]
            assert mask[b].tolist() == expected, (kind, b)
    # Spelled out for one padded row: 2 queries, 3 text tokens of which the last is padding.
    causal = multimodal_causal_attention_mask(2, torch.tensor([[1, 1, 0]]))[0].int().tolist()
    assert causal == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    unimodal = unimodal_attention_mask(2, torch.tensor([[1, 1, 0]]))[0].int().tolist()
    assert unimodal == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]


@torch.no_grad()
def test_masks_act_as_blip2_intends_in_the_qformer():
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(**TINY, vision_width=24)).eval()
    features, ids = torch.randn(2, 5, 24), torch.randint(1, 50, (2, 4))
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    alone_queries = qformer(features).queries
    alone_text = qformer(input_ids=ids, attention_mask=text_mask).text
    uni = qformer(features, ids, unimodal_attention_mask(4, text_mask))
    assert torch.allclose(uni.queries, alone_queries, atol=1e-5)  # ITC: two separate encoders in one pass
    assert torch.allclose(uni.text[text_mask.bool()], alone_text[text_mask.bool()], atol=1e-5)
    causal = qformer(features, ids, multimodal_causal_attention_mask(4, text_mask))
    changed = ids.clone()
    changed[:, 2:] = (changed[:, 2:] + 1) % 50
    causal_changed = qformer(features, changed, multimodal_causal_attention_mask(4, text_mask))
    assert torch.allclose(causal.queries, alone_queries, atol=1e-5)
    assert torch.allclose(causal.text[:, :2], causal_changed.text[:, :2], atol=1e-5)  # no peeking ahead
    assert not torch.allclose(causal.text[:, :2], alone_text[:, :2], atol=1e-3)  # but text does see the image
    bi = qformer(features, ids, bidirectional_attention_mask(4, text_mask))
    padded = ids.clone()
    padded[1, 3] = 7 if ids[1, 3] != 7 else 8
    bi_padded = qformer(features, padded, bidirectional_attention_mask(4, text_mask))
    assert torch.allclose(bi.queries, bi_padded.queries, atol=1e-6)  # padding is invisible
    assert not torch.allclose(bi.queries, alone_queries, atol=1e-3)
    vision_mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)  # masked vision tokens are as good as absent
    assert torch.allclose(qformer(features, vision_mask=vision_mask).queries, qformer(features[:, :3]).queries,
                          atol=1e-5)


def test_lm_head_tied_or_untied():
    torch.manual_seed(0)
    tied = QFormer(QFormerConfig(**TINY, vision_width=24, lm_head="tied"))
    assert not any(name.startswith("lm_head.decoder") for name in tied.state_dict())
    text = tied(input_ids=torch.randint(1, 50, (2, 3))).text
    assert tied.lm_logits(text).shape == (2, 3, 50)
    untied = QFormer(QFormerConfig(**TINY, vision_width=24, lm_head="untied"))
    assert untied.lm_head.decoder.weight.data_ptr() != untied.embeddings.words.weight.data_ptr()
    with pytest.raises(ValueError, match="lm_head needs text_input"):
        QFormerConfig(text_input=False, lm_head="tied")


def test_loading_names_the_offending_key(blip2, instructblip):
    state = _hf_state(instructblip)
    unknown = {**state, "qformer.encoder.layer.0.attention.attention.rotary.weight": torch.zeros(1)}
    with pytest.raises(ConversionError,
                       match=r"no rule maps weight 'qformer\.encoder\.layer\.0\.attention\.attention\.rotary\.weight'"):
        _ours(instructblip, unknown)
    missing = {k: v for k, v in state.items() if k != "qformer.encoder.layer.2.crossattention.attention.key.weight"}
    with pytest.raises(ConversionError, match=r"missing \['qformer\.layers\.2\.cross_attn\.key\.weight'\]"):
        _ours(instructblip, missing)
    wrong = {**state, "qformer.encoder.layer.0.crossattention.attention.key.weight": torch.zeros(32, 20)}
    with pytest.raises(ConversionError,
                       match=r"qformer\.layers\.0\.cross_attn\.key\.weight has shape \(32, 20\), expected \(32, 24\)"):
        _ours(instructblip, wrong)
    # A BLIP-2 checkpoint has no text embeddings: a text-input Q-Former cannot take it silently.
    with pytest.raises(ConversionError, match=r"missing \['qformer\.embeddings\.positions\.weight'"):
        _ours(instructblip, _hf_state(blip2))


def test_qformer_connector_is_registered():
    cfg = from_dict(ConnectorConfig, {"kind": "qformer", "qformer": TINY})
    torch.manual_seed(0)
    connector = build_connector(cfg, 24, 16)
    assert isinstance(connector, QFormerConnector) and connector.num_tokens(49) == 4
    features = torch.randn(2, 49, 24)
    assert connector(features).shape == (2, 4, 16)
    ids, mask = torch.randint(1, 50, (2, 3)), torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert connector(features, ids, mask).shape == (2, 4, 16)
    connector(features).sum().backward()
    qformer = connector.qformer
    assert qformer.query_tokens.grad is not None and qformer.layers[0].cross_attn.key.weight.grad is not None
    with pytest.raises(ValueError, match="vision_width is 12 but the vision tower's features are 24"):
        build_connector(ConnectorConfig("qformer", qformer=QFormerConfig(**TINY, vision_width=12)), 24, 16)
    with pytest.raises(ValueError, match="valid: linear, mlp{N}x_gelu, qformer"):
        build_connector(ConnectorConfig("qformr"), 24, 16)


BERT_SIZES = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=16)


def _save_bert(cls, path):
    torch.manual_seed(1)
    bert = cls(transformers.BertConfig(**BERT_SIZES))
    _jitter(bert)
    bert.save_pretrained(path)
    return bert


def test_from_bert_copies_bert_and_leaves_queries_and_cross_attention(tmp_path):
    bert = _save_bert(transformers.BertModel, tmp_path / "bert")
    cfg = QFormerConfig(**{**TINY, "vocab_size": 41}, vision_width=24)  # one more token, as BLIP-2's [DEC]
    torch.manual_seed(0)
    fresh = QFormer(cfg)
    torch.manual_seed(0)
    qformer = QFormer.from_bert(tmp_path / "bert", cfg)
    words = qformer.embeddings.words.weight
    assert torch.equal(words[:40], bert.embeddings.word_embeddings.weight)
    assert torch.equal(words[40], fresh.embeddings.words.weight[40])  # [DEC] keeps its initialisation
    assert torch.equal(qformer.embeddings.norm.bias, bert.embeddings.LayerNorm.bias)
    layer, bert_layer = qformer.layers[1], bert.encoder.layer[1]
    assert torch.equal(layer.self_attn.key.weight, bert_layer.attention.self.key.weight)
    assert torch.equal(layer.self_attn.norm.weight, bert_layer.attention.output.LayerNorm.weight)
    for branch in (layer.query_ffn, layer.text_ffn):  # one BERT feed-forward, copied to both branches
        assert torch.equal(branch.up.weight, bert_layer.intermediate.dense.weight)
        assert torch.equal(branch.down.bias, bert_layer.output.dense.bias)
        assert torch.equal(branch.norm.weight, bert_layer.output.LayerNorm.weight)
    assert torch.equal(qformer.query_tokens, fresh.query_tokens)
    fresh_state = fresh.state_dict()
    cross = {k: v for k, v in qformer.state_dict().items() if ".cross_attn." in k}
    assert cross and all(torch.equal(v, fresh_state[k]) for k, v in cross.items())


def test_from_bert_masked_lm_fills_the_lm_head_and_checks_sizes(tmp_path):
    bert = _save_bert(transformers.BertForMaskedLM, tmp_path / "mlm")
    qformer = QFormer(QFormerConfig(**{**TINY, "vocab_size": 40}, vision_width=24, lm_head="untied"))
    copied = load_bert_weights(qformer, tmp_path / "mlm")
    assert "lm_head.dense.weight" in copied and not any(".cross_attn." in name for name in copied)
    assert torch.equal(qformer.lm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(qformer.lm_head.decoder.weight, bert.cls.predictions.decoder.weight)
    assert torch.equal(qformer.lm_head.bias, bert.cls.predictions.bias)
    shallow = QFormerConfig(**{**TINY, "num_layers": 1, "vocab_size": 40}, vision_width=24)
    with pytest.raises(ConversionError,
                       match=r"'encoder\.layer\.1\..*' maps to 'layers\.1\..*', which this Q-Former lacks"):
        QFormer.from_bert(tmp_path / "mlm", shallow)
    narrow = QFormerConfig(**{**TINY, "vocab_size": 39}, vision_width=24)
    with pytest.raises(ConversionError, match=r"'embeddings\.word_embeddings\.weight' has shape \(40, 32\)"):
        QFormer.from_bert(tmp_path / "mlm", narrow)


def test_vlm_with_a_qformer_connector_saves_and_loads(vlm_parts, tmp_path):
    from bridgevlm.models.assemble import VlmConfig, build_vlm, load_vlm, save_vlm

    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, {**vlm_parts, "connector": {"kind": "qformer", "qformer": TINY}}))
    model = loaded.model.eval()
    assert model.num_image_tokens == 4
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.encode_images(pixels)
    assert tokens.shape == (2, 4, 32)
    again = load_vlm(save_vlm(loaded, tmp_path / "saved")).model.eval()
    with torch.no_grad():
        assert torch.equal(again.encode_images(pixels), tokens)
