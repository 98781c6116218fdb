"""LanguageModel: any Hugging Face causal LM behind one small interface.

`LanguageModelProtocol` is what a VisionLanguageModel needs from its LLM: embed ids, and compute the
loss or the logits from input embeddings in which visual tokens were spliced. A causal LM
(this module) and an encoder-decoder one (seq2seq_llm.py) each know how to run themselves on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..data.templates import IGNORE_INDEX
from .chunked_loss import CHUNK_ROWS, is_plain_linear, linear_cross_entropy
from .output import LossOutput


@dataclass
class TinyLlamaConfig:
    """A small Llama, the embedded default LLM's architecture."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 512
    max_positions: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = True


def build_tiny_llama(cfg: TinyLlamaConfig, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def grow_layers(model: nn.Module, count: int) -> nn.Module:
    """Append `count` decoder layers to a Llama-family causal LM, in place, keeping its function.

    Each new layer gets the model's usual random init except its attention output projection and
    MLP down projection, which are zero: both residual branches then add nothing, so the grown model
    computes exactly what it did, and training opens the branches (their gradients are not zero).
    """
    if count <= 0:
        return model
    layers, config = model.base_model.layers, model.config
    reference = layers[0]
    if not (hasattr(reference, "self_attn") and hasattr(reference.self_attn, "o_proj")
            and hasattr(reference, "mlp") and hasattr(reference.mlp, "down_proj")):
        raise ValueError(f"grow_layers needs Llama-style decoder layers (self_attn.o_proj, mlp.down_proj); "
                         f"{type(model).__name__} has {type(reference).__name__}")
    parameter = next(reference.parameters())
    for _ in range(count):
        layer = type(reference)(config, layer_idx=len(layers))  # layer_idx: its slot in the KV cache
        layer.apply(model._init_weights)
        for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
            for tensor in (projection.weight, projection.bias):
                if tensor is not None:
                    nn.init.zeros_(tensor)
        layers.append(layer.to(device=parameter.device, dtype=parameter.dtype))
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full) follow the last
        config.layer_types = list(config.layer_types) + [config.layer_types[-1]] * count
    config.num_hidden_layers = len(layers)  # the forward pass and the KV cache size read it
    return model


class LanguageModelProtocol(Protocol):
    model: nn.Module  # the Hugging Face model
    is_encoder_decoder: bool

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D]: the embeddings of the (encoder) input."""

    def loss_from_embeds(self, inputs_embeds: torch.Tensor, batch: dict) -> LossOutput:
        """The training loss of `batch` with its input ids replaced by `inputs_embeds` [B, T, D]."""

    def logits_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           decoder_input_ids: torch.Tensor | None = None,
                           decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits at every position [B, T, V] (at every decoder position [B, S, V] for an
        encoder-decoder LM, which reads `decoder_input_ids` [B, S])."""

    def set_activation_checkpointing(self, enabled: bool) -> None: ...


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each layer's activations in the backward pass (memory for time); the KV cache is off
    while enabled, as the two do not mix."""
    if enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.config.use_cache = not enabled


class LanguageModel(nn.Module):
    """Wraps a HF causal LM; `forward(batch)` computes the loss at supervised positions only.

    The LM head (vocabulary-sized) is applied only where a label exists: with answer-only
    supervision that is a few percent of positions, and the head is often the largest matmul.
    """

    is_encoder_decoder = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> LanguageModel:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(model)

    @property
    def config(self):
        return self.model.config

    def set_activation_checkpointing(self, enabled: bool) -> None:
        set_activation_checkpointing(self.model, enabled)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D]"""
        return self.model.get_input_embeddings()(input_ids)

    def hidden_states(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """Last-layer hidden states [B, T, D] (before the LM head)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return out.last_hidden_state

    def forward(self, batch: dict) -> LossOutput:
        labels = batch["labels"]
        hidden = self.hidden_states(batch.get("input_ids"), batch.get("attention_mask"), batch.get("inputs_embeds"))
        return supervised_lm_loss(hidden, labels, self.model.get_output_embeddings())

    def loss_from_embeds(self, inputs_embeds: torch.Tensor, batch: dict) -> LossOutput:
        """Next-token loss on `batch["labels"]` [B, T] (aligned with the inputs, IGNORE_INDEX unsupervised)."""
        hidden = self.hidden_states(attention_mask=batch.get("attention_mask"), inputs_embeds=inputs_embeds)
        return supervised_lm_loss(hidden, batch["labels"], self.model.get_output_embeddings())

    def logits_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           decoder_input_ids: torch.Tensor | None = None,
                           decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            raise ValueError("decoder inputs were given, but this is a decoder-only language model: the text "
                             "to score belongs in input_ids")
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                       chunk_rows: int = CHUNK_ROWS) -> LossOutput:
    """Next-token cross-entropy summed over supervised positions. hidden [B, T, D], labels [B, T]."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX  # [B, T-1]
    return head_loss(hidden[:, :-1][selected], targets[selected], lm_head, chunk_rows)


def head_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module,
              chunk_rows: int = CHUNK_ROWS) -> LossOutput:
    """Cross-entropy of `lm_head(hidden)` summed over N targets, with their token accuracy.
    hidden [N, D], targets [N].

    A plain nn.Linear head goes through `linear_cross_entropy`, chunk by chunk, so that no [N, V] logits
    are made. Any other head (peft's LoRA wrapper, a quantised or hooked layer) computes its own logits:
    reading its weight directly would skip what it adds.
    """
    if not is_plain_linear(lm_head):
        return target_loss(lm_head(hidden), targets)
    loss_sum, correct = linear_cross_entropy(hidden, lm_head.weight, lm_head.bias, targets, chunk_rows)
    accuracy = correct.item() / len(targets) if len(targets) else 0.0
    num_targets = torch.tensor(len(targets), device=targets.device)
    return LossOutput(loss_sum=loss_sum, num_targets=num_targets, logs={"token_accuracy": accuracy})


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> LossOutput:
    """Cross-entropy summed over N targets, with their token accuracy. logits [N, V], targets [N]."""
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == targets).float().mean().item() if len(targets) else 0.0
    num_targets = torch.tensor(len(targets), device=targets.device)
    return LossOutput(loss_sum=loss_sum, num_targets=num_targets, logs={"token_accuracy": accuracy})
