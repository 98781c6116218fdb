"""LanguageModel: any Hugging Face causal LM behind one small interface."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..data.templates import IGNORE_INDEX
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


class LanguageModel(nn.Module):
    """Wraps a HF causal LM; `forward(batch)` computes the loss at supervised positions only.

    The LM head (vocabulary-sized) is applied only where a label exists: with answer-only
    supervision that is a few percent of positions, and the head is often the largest matmul.
    """

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
        """Recompute each decoder layer's activations in the backward pass (memory for time); the KV
        cache is off while enabled, as the two do not mix."""
        if enabled:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()
        self.model.config.use_cache = not enabled

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


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> LossOutput:
    """Next-token cross-entropy summed over supervised positions. hidden [B, T, D], labels [B, T]."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX  # [B, T-1]
    logits = lm_head(hidden[:, :-1][selected]).float()  # [N, V]
    chosen = targets[selected]
    loss_sum = F.cross_entropy(logits, chosen, reduction="sum")
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == chosen).float().mean().item() if len(chosen) else 0.0
    return LossOutput(loss_sum=loss_sum, num_targets=selected.sum(), logs={"token_accuracy": accuracy})
