"""Seq2SeqLanguageModel: any Hugging Face encoder-decoder LM (T5, FlanT5, BART) behind LanguageModel's interface.

BLIP-2's prefix-LM loss: the encoder reads the prefix (visual tokens and prompt text), the decoder is
trained with teacher forcing on the target. A batch holds

    input_ids, attention_mask [B, T]   the encoder side, image placeholders included
    labels [B, S]                      the target ids, IGNORE_INDEX (-100) where padded
    decoder_input_ids [B, S]           optional; by default the labels shifted right behind the
                                       decoder start token, as HF's T5 does
    decoder_attention_mask [B, S]      optional; right padding needs none (the decoder is causal)

Labels are aligned with the decoder positions (no shift in the loss), as in Hugging Face.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from ..data.templates import IGNORE_INDEX
from .llm import head_loss, set_activation_checkpointing, target_loss
from .output import LossOutput


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: labels [B, S] -> [start, y1, ..., y(S-1)], IGNORE_INDEX as padding."""
    shifted = labels.new_full(labels.shape, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class Seq2SeqLanguageModel(nn.Module):
    """Wraps a HF encoder-decoder LM; `embed` gives the encoder's input embeddings, where visual
    tokens are spliced, and the loss is on the decoder's targets."""

    is_encoder_decoder = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> Seq2SeqLanguageModel:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
        return cls(model)

    @property
    def config(self):
        return self.model.config

    def set_activation_checkpointing(self, enabled: bool) -> None:
        set_activation_checkpointing(self.model, enabled)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encoder input ids [B, T] -> [B, T, D]."""
        return self.model.get_input_embeddings()(input_ids)

    def decoder_input_ids(self, batch: dict) -> torch.Tensor:
        """The batch's `decoder_input_ids`, else its labels shifted right."""
        ids = batch.get("decoder_input_ids")
        if ids is not None:
            return ids
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"an encoder-decoder language model needs the decoder side of the batch: 'labels' "
                             f"[B, S] (the target ids, -100 on padding) or 'decoder_input_ids' [B, S]; the batch "
                             f"has only {sorted(batch)}")
        start = self.config.decoder_start_token_id
        if start is None or self.config.pad_token_id is None:
            raise ValueError(f"{type(self.model).__name__}'s config lacks decoder_start_token_id or pad_token_id, "
                             f"which derive decoder_input_ids from labels; give decoder_input_ids instead")
        return shift_right(labels, start, self.config.pad_token_id)

    def logits_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           decoder_input_ids: torch.Tensor | None = None,
                           decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder embeddings [B, T, D] and decoder ids [B, S] -> decoder logits [B, S, V]."""
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder language model scores decoder_input_ids [B, S] (the target shifted "
                             "right behind the decoder start token); none were given")
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask).logits

    def loss_from_embeds(self, inputs_embeds: torch.Tensor, batch: dict) -> LossOutput:
        """Prefix-LM loss: cross-entropy summed over the decoder targets (`labels` != IGNORE_INDEX)."""
        if batch.get("labels") is None:
            raise ValueError(f"an encoder-decoder language model's loss needs 'labels' [B, S]: the decoder's target "
                             f"ids, -100 on padding; the batch has only {sorted(batch)}")
        labels = batch["labels"]
        decoder_ids = self.decoder_input_ids(batch)
        if decoder_ids.shape != labels.shape:
            raise ValueError(f"decoder_input_ids {tuple(decoder_ids.shape)} and labels {tuple(labels.shape)} must "
                             f"have the same shape: label j is the target at decoder position j")
        selected = labels != IGNORE_INDEX
        if isinstance(self.model, T5ForConditionalGeneration):
            # T5 (FlanT5) runs here up to its head, so that the head and the loss go chunk by chunk
            # (no [N, V] logits) through `head_loss`.
            hidden = self._t5_head_input(inputs_embeds, batch.get("attention_mask"), decoder_ids,
                                         batch.get("decoder_attention_mask"))  # [B, S, D]
            return head_loss(hidden[selected], labels[selected], self.model.get_output_embeddings())
        # Other families run whole, head included: each treats the decoder's output in its own way
        # (BART adds a logit bias), which only its own forward knows.
        logits = self.logits_from_embeds(inputs_embeds, batch.get("attention_mask"), decoder_ids,
                                         batch.get("decoder_attention_mask"))  # [B, S, V]
        return target_loss(logits[selected], labels[selected])

    def _t5_head_input(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                       decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """T5ForConditionalGeneration.forward up to its LM head: the decoder's output [B, S, D], rescaled as T5
        does before the head. No KV cache: the loss has no use for one."""
        model = self.model
        encoded = model.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        decoded = model.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                encoder_hidden_states=encoded, encoder_attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
        return decoded * model.model_dim ** -0.5 if model.config.scale_decoder_outputs else decoded

    def forward(self, batch: dict) -> LossOutput:
        embeds = batch.get("inputs_embeds")
        return self.loss_from_embeds(self.embed(batch["input_ids"]) if embeds is None else embeds, batch)
