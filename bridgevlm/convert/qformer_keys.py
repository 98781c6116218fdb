"""Q-Former weights from Hugging Face BLIP-2 / InstructBLIP and from BERT, as declarative key tables."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..models.connectors.qformer import QFormer, QFormerConfig
from .keys import ConversionError, convert_state

_LAYER = r"^qformer\.encoder\.layer\.(\d+)\."
# HF `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` names -> QFormerConnector names.
FROM_HF = [
    (r"^query_tokens$", r"qformer.query_tokens"),
    (r"^qformer\.layernorm\.", r"qformer.embeddings.norm."),  # BLIP-2: normalises the queries
    (r"^qformer\.embeddings\.layernorm\.", r"qformer.embeddings.norm."),  # InstructBLIP: queries + text
    (r"^qformer\.embeddings\.word_embeddings\.", r"qformer.embeddings.words."),
    (r"^qformer\.embeddings\.position_embeddings\.", r"qformer.embeddings.positions."),
    (_LAYER + r"attention\.attention\.(query|key|value)\.", r"qformer.layers.\1.self_attn.\2."),
    (_LAYER + r"attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (_LAYER + r"attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (_LAYER + r"crossattention\.attention\.(query|key|value)\.", r"qformer.layers.\1.cross_attn.\2."),
    (_LAYER + r"crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out."),
    (_LAYER + r"crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
    (_LAYER + r"intermediate_query\.dense\.", r"qformer.layers.\1.query_ffn.up."),
    (_LAYER + r"output_query\.dense\.", r"qformer.layers.\1.query_ffn.down."),
    (_LAYER + r"output_query\.LayerNorm\.", r"qformer.layers.\1.query_ffn.norm."),
    (_LAYER + r"intermediate\.dense\.", r"qformer.layers.\1.text_ffn.up."),
    (_LAYER + r"output\.dense\.", r"qformer.layers.\1.text_ffn.down."),
    (_LAYER + r"output\.LayerNorm\.", r"qformer.layers.\1.text_ffn.norm."),
    (r"^language_projection\.", r"language_projection."),
]
# The other parts of a full HF checkpoint; they belong to the vision tower and the LLM, not here.
OTHER_PARTS = ("vision_model.", "language_model.")

_BERT_LAYER = r"^encoder\.layer\.(\d+)\."
# BERT names (BertModel, or BertForMaskedLM without its `bert.` prefix) -> QFormer names. Each BERT
# feed-forward initialises both branches, as in BLIP-2.
FROM_BERT = [
    (r"^embeddings\.word_embeddings\.", [r"embeddings.words."]),
    (r"^embeddings\.position_embeddings\.", [r"embeddings.positions."]),
    (r"^embeddings\.LayerNorm\.", [r"embeddings.norm."]),
    (_BERT_LAYER + r"attention\.self\.(query|key|value)\.", [r"layers.\1.self_attn.\2."]),
    (_BERT_LAYER + r"attention\.output\.dense\.", [r"layers.\1.self_attn.out."]),
    (_BERT_LAYER + r"attention\.output\.LayerNorm\.", [r"layers.\1.self_attn.norm."]),
    (_BERT_LAYER + r"intermediate\.dense\.", [r"layers.\1.query_ffn.up.", r"layers.\1.text_ffn.up."]),
    (_BERT_LAYER + r"output\.dense\.", [r"layers.\1.query_ffn.down.", r"layers.\1.text_ffn.down."]),
    (_BERT_LAYER + r"output\.LayerNorm\.", [r"layers.\1.query_ffn.norm.", r"layers.\1.text_ffn.norm."]),
    (r"^cls\.predictions\.transform\.dense\.", [r"lm_head.dense."]),
    (r"^cls\.predictions\.transform\.LayerNorm\.", [r"lm_head.norm."]),
    (r"^cls\.predictions\.bias$", [r"lm_head.bias"]),
    (r"^cls\.predictions\.decoder\.weight$", [r"lm_head.decoder.weight"]),
]
# BERT weights BLIP-2 drops: token types (the Q-Former has none), the pooler, NSP, and the decoder
# bias that HF keeps as an alias of `cls.predictions.bias`.
BERT_UNUSED = (r"^embeddings\.token_type_embeddings\.", r"^embeddings\.position_ids$", r"^pooler\.",
               r"^cls\.seq_relationship\.", r"^cls\.predictions\.decoder\.bias$")
# Parts a Q-Former may leave out (text_input: false, lm_head: none/tied); BERT's weights for them are skipped.
_OPTIONAL = (r"\.text_ffn\.", r"^embeddings\.(words|positions)\.", r"^lm_head\.")
# Vocabulary-sized tensors: a Q-Former vocabulary larger than BERT's (BLIP-2 adds [DEC]) keeps the extra rows.
_VOCAB_SIZED = ("embeddings.words.weight", "lm_head.decoder.weight", "lm_head.bias")


def qformer_config_from_hf(hf_config, num_query_tokens: int) -> QFormerConfig:
    """The QFormerConfig of a HF `Blip2QFormerConfig` or `InstructBlipQFormerConfig`."""
    if hf_config.hidden_act != "gelu":
        raise ConversionError(f"Q-Former hidden_act {hf_config.hidden_act!r} is not supported (only 'gelu')")
    instruct = hf_config.model_type == "instructblip_qformer"
    if not instruct and getattr(hf_config, "use_qformer_text_input", False):
        raise ConversionError("a BLIP-2 Q-Former with use_qformer_text_input keeps its text embeddings outside "
                              "the Q-Former (Blip2ForImageTextRetrieval); only the generation models are supported")
    return QFormerConfig(hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                         num_heads=hf_config.num_attention_heads, intermediate_size=hf_config.intermediate_size,
                         num_query_tokens=num_query_tokens,
                         cross_attention_frequency=hf_config.cross_attention_frequency,
                         vision_width=hf_config.encoder_hidden_size, text_input=instruct,
                         vocab_size=hf_config.vocab_size, max_position_embeddings=hf_config.max_position_embeddings,
                         pad_token_id=hf_config.pad_token_id, layer_norm_eps=hf_config.layer_norm_eps,
                         dropout=hf_config.hidden_dropout_prob, initializer_range=hf_config.initializer_range)


def load_hf_qformer_state_dict(target: nn.Module, hf_state: dict[str, torch.Tensor]) -> None:
    """Load the Q-Former weights of a HF BLIP-2 / InstructBLIP state dict into a QFormerConnector
    (query tokens, Q-Former, language projection) or a bare QFormer (the projection is then unused).

    Vision and language-model weights in `hf_state` are skipped; any other weight no rule maps, a
    weight the target lacks or does not get, and a shape mismatch raise ConversionError naming the key."""
    state = {key: value for key, value in hf_state.items() if not key.startswith(OTHER_PARTS)}
    if isinstance(target, QFormer):
        state = {key: value for key, value in state.items() if not key.startswith("language_projection.")}
        expected = {f"qformer.{key}": value for key, value in target.state_dict().items()}
    else:
        expected = target.state_dict()
    converted = convert_state(state, FROM_HF, expected, "load HF Q-Former")
    if isinstance(target, QFormer):
        converted = {key.removeprefix("qformer."): value for key, value in converted.items()}
    target.load_state_dict(converted, strict=True)


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a `save_pretrained` directory (`model.safetensors`, or shards with an index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(path / shard).items()}
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    raise ConversionError(f"{path}: no model.safetensors (or sharded index) to read BERT weights from")


def load_bert_weights(qformer: QFormer, path: str | Path) -> list[str]:
    """Copy a BERT checkpoint into `qformer` by FROM_BERT; returns the names it set. Query tokens and
    cross-attention keep their initialisation. Raises ConversionError naming any unknown BERT weight,
    a weight this Q-Former cannot hold (e.g. more BERT layers), or a shape mismatch."""
    bert = {key.removeprefix("bert."): value for key, value in read_safetensors_dir(path).items()}
    if "cls.predictions.transform.dense.weight" in bert and "cls.predictions.decoder.weight" not in bert:
        bert["cls.predictions.decoder.weight"] = bert["embeddings.word_embeddings.weight"]  # saved tied, once
    target = qformer.state_dict()
    copied = []
    with torch.no_grad():
        for key, tensor in bert.items():
            if any(re.match(pattern, key) for pattern in BERT_UNUSED):
                continue
            rule = next(((p, names) for p, names in FROM_BERT if re.match(p, key)), None)
            if rule is None:
                raise ConversionError(f"{path}: no rule maps BERT weight {key!r}")
            for replacement in rule[1]:
                name = re.sub(rule[0], replacement, key)
                if name not in target:
                    if any(re.search(part, name) for part in _OPTIONAL):
                        continue
                    raise ConversionError(f"{path}: BERT weight {key!r} maps to {name!r}, which this Q-Former "
                                          f"lacks (num_layers {qformer.config.num_layers})")
                _copy_into(target[name], tensor, name, key, path)
                copied.append(name)
    return copied


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, name: str, key: str, path) -> None:
    fits = param.shape == tensor.shape
    grows_vocab = (name in _VOCAB_SIZED and param.shape[1:] == tensor.shape[1:] and param.shape[0] >= tensor.shape[0])
    if not (fits or grows_vocab):
        raise ConversionError(f"{path}: BERT weight {key!r} has shape {tuple(tensor.shape)}, but {name!r} "
                              f"has {tuple(param.shape)}")
    param[:tensor.shape[0]].copy_(tensor)
