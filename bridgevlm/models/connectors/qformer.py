"""The BLIP-2 Q-Former: learned queries that read the vision features through cross-attention.

A BERT-style post-LN encoder over one sequence `[queries (Q); text (T)]`. Queries and text share
the self-attention; cross-attention to the vision features sits in every
`cross_attention_frequency`-th layer (0, 2, 4, ...) and reads with the query positions only; the
feed-forward is separate for query and text positions. Which position sees which is set by the
self-attention mask, so the three BLIP-2 stage-1 losses differ only in the mask they pass (see
`unimodal_attention_mask`, `bidirectional_attention_mask`, `multimodal_causal_attention_mask`).
`QFormerConnector` is the input-level bridge: query outputs -> Linear -> LLM tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LM_HEADS = ("none", "tied", "untied")


@dataclass
class QFormerConfig:
    """BERT-base sizes and BLIP-2's 32 queries by default."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # cross-attention in layers 0, f, 2f, ...
    vision_width: int | None = None  # width of the vision features; None: the vision tower's (set by the connector)
    text_input: bool = True  # own text embeddings and text feed-forward (stage 1, InstructBLIP instructions)
    vocab_size: int = 30523  # BERT's 30522 + the [DEC] token BLIP-2 adds for generation
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    lm_head: str = "none"  # none | tied (decoder = word embeddings, as BERT) | untied: for stage-1 generation
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # on hidden states and attention probabilities, as BERT
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qformer.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_frequency < 1 or self.num_query_tokens < 1:
            raise ValueError("qformer.cross_attention_frequency and num_query_tokens must be >= 1")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"unknown qformer.lm_head {self.lm_head!r}; valid: {', '.join(LM_HEADS)}")
        if self.lm_head != "none" and not self.text_input:
            raise ValueError("qformer.lm_head needs text_input: true (it predicts text tokens)")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


class QFormerAttention(nn.Module):
    """Post-LN attention block: x [B, L, H] -> LayerNorm(x + out(attend(x, context))) [B, L, H]."""

    def __init__(self, hidden: int, heads: int, context_width: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """context [B, S, Dc]; bias: additive [B, 1, L, S] (0 = may attend, very negative = may not) or None."""
        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, *, H] -> [B, heads, *, H / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(context)),
                                                  heads(self.value(context)), attn_mask=bias,
                                                  dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).flatten(2)  # [B, L, H]
        return self.norm(x + F.dropout(self.out(attended), self.dropout, self.training))


class QFormerFeedForward(nn.Module):
    """Post-LN BERT feed-forward: x -> LayerNorm(x + down(gelu(up(x))))."""

    def __init__(self, hidden: int, intermediate: int, eps: float, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(self.down(F.gelu(self.up(x))), self.dropout, self.training))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross_attention: bool):
        super().__init__()
        args = (cfg.layer_norm_eps, cfg.dropout)
        self.self_attn = QFormerAttention(cfg.hidden_size, cfg.num_heads, cfg.hidden_size, *args)
        self.cross_attn = (QFormerAttention(cfg.hidden_size, cfg.num_heads, cfg.vision_width, *args)
                           if cross_attention else None)
        self.query_ffn = QFormerFeedForward(cfg.hidden_size, cfg.intermediate_size, *args)
        self.text_ffn = QFormerFeedForward(cfg.hidden_size, cfg.intermediate_size, *args) if cfg.text_input else None

    def forward(self, hidden: torch.Tensor, num_queries: int, self_bias: torch.Tensor | None,
                vision: torch.Tensor | None, vision_bias: torch.Tensor | None) -> torch.Tensor:
        hidden = self.self_attn(hidden, hidden, self_bias)  # [B, Q + T, H]
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, vision, vision_bias)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormerEmbeddings(nn.Module):
    """[queries (Q); word + position embeddings of the text (T)] -> LayerNorm -> [B, Q + T, H].

    Text positions count from 0 whether or not queries come first. Without text input only the
    LayerNorm remains (HF BLIP-2's `qformer.layernorm`)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.text_input:
            self.words = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            if not hasattr(self, "words"):
                raise ValueError("this Q-Former has no text input (qformer.text_input: false)")
            if input_ids.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"{input_ids.shape[1]} text tokens exceed the Q-Former's "
                                 f"{self.positions.num_embeddings} positions")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.words(input_ids) + self.positions(positions))
        return F.dropout(self.norm(torch.cat(parts, dim=1)), self.dropout, self.training)


class QFormerLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder (+ bias) -> logits [B, T, V]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # Tied: the word embeddings are passed in, so the shared matrix has a single name in the state dict.
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if cfg.lm_head == "untied" else None
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(F.gelu(self.dense(hidden)))
        weight = self.decoder.weight if self.decoder is not None else word_embeddings
        return F.linear(hidden, weight, self.bias)


@dataclass
class QFormerOutput:
    queries: torch.Tensor | None  # [B, Q, H], None for a text-only pass
    text: torch.Tensor | None  # [B, T, H], None without text


class QFormer(nn.Module):
    """vision features [B, N, Dv] (+ text ids [B, T]) -> query outputs [B, Q, H] (+ text outputs [B, T, H])."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.vision_width is None:
            raise ValueError("QFormerConfig.vision_width is unset; give the width of the vision features")
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.embeddings = QFormerEmbeddings(cfg)
        self.layers = nn.ModuleList(QFormerLayer(cfg, cfg.has_cross_attention(i)) for i in range(cfg.num_layers))
        self.lm_head = QFormerLMHead(cfg) if cfg.lm_head != "none" else None
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_bert(cls, path: str | Path, cfg: QFormerConfig) -> QFormer:
        """A Q-Former initialised as BLIP-2 does from a local BERT directory (BertModel or
        BertForMaskedLM, safetensors): embeddings, self-attention, and both feed-forward branches
        from BERT's feed-forward; queries and cross-attention stay random. `cfg` must match BERT's
        sizes (a larger vocabulary keeps its extra rows random, as [DEC])."""
        from ...convert.qformer_keys import load_bert_weights  # convert/ imports models/, not the reverse

        qformer = cls(cfg)
        load_bert_weights(qformer, path)
        return qformer

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, vision_features: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None) -> QFormerOutput:
        """vision_features [B, N, Dv]: with them the learned queries come first; without, a text-only pass.
        input_ids [B, T]: optional text after the queries.
        attention_mask over the L = Q + T positions: [B, L] key padding (1 = real token), or a full
        [B, L, L] / [B, 1, L, L] mask (1 = the row may attend to the column), e.g. one of the BLIP-2
        masks below; None lets every position see every other.
        vision_mask [B, N]: 1 = a real vision token; None: all are."""
        if vision_features is None and input_ids is None:
            raise ValueError("the Q-Former needs vision features, text, or both")
        queries = None
        if vision_features is not None:
            queries = self.query_tokens.expand(vision_features.shape[0], -1, -1)
            vision_features = vision_features.to(self.query_tokens.dtype)
        hidden = self.embeddings(queries, input_ids)  # [B, L, H]
        num_queries = 0 if queries is None else self.num_queries
        self_bias = _attention_bias(attention_mask, hidden.shape[1], hidden.dtype)
        vision_bias = None
        if vision_mask is not None and vision_features is not None:
            vision_bias = _attention_bias(vision_mask, vision_features.shape[1], hidden.dtype)  # [B, 1, 1, N]
        for layer in self.layers:
            hidden = layer(hidden, num_queries, self_bias, vision_features, vision_bias)
        return QFormerOutput(hidden[:, :num_queries] if num_queries else None,
                             hidden[:, num_queries:] if input_ids is not None else None)

    def lm_logits(self, text_states: torch.Tensor) -> torch.Tensor:
        """Text outputs [B, T, H] -> vocabulary logits [B, T, V] (stage-1 image-grounded generation)."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no LM head (qformer.lm_head: none)")
        return self.lm_head(text_states, self.embeddings.words.weight)


def _attention_bias(mask: torch.Tensor | None, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A 0/1 or boolean mask ([B, S] over keys, [B, L, S] or [B, 1, L, S]) -> additive [B, 1, L|1, S]."""
    if mask is None:
        return None
    if mask.dim() == 2:
        allowed = mask[:, None, None, :]
    elif mask.dim() == 3:
        allowed = mask[:, None]
    elif mask.dim() == 4 and mask.shape[1] == 1:
        allowed = mask
    else:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}; expected [B, L], [B, L, L] or [B, 1, L, L]")
    if allowed.shape[-1] != length or (mask.dim() > 2 and allowed.shape[-2] != length):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit a sequence of {length} positions")
    # A large finite negative rather than -inf: a fully masked row (all-padding text) stays finite.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~allowed.bool(), torch.finfo(dtype).min)


# ------------------------------------------------------------------------------------------------
# BLIP-2's stage-1 masks over [queries (Q); text (T)]: [B, Q + T, Q + T], True = row may attend to
# column. Padded text tokens (text_mask 0) are never attended to, in every mask.
# ------------------------------------------------------------------------------------------------

def _blip2_mask(num_queries: int, text_mask: torch.Tensor, queries_see_text: bool, text_sees_queries: bool,
                causal_text: bool) -> torch.Tensor:
    batch, text_len = text_mask.shape
    length = num_queries + text_len
    allowed = torch.ones(length, length, dtype=torch.bool, device=text_mask.device)
    allowed[:num_queries, num_queries:] = queries_see_text
    allowed[num_queries:, :num_queries] = text_sees_queries
    if causal_text:
        allowed[num_queries:, num_queries:] = torch.ones(text_len, text_len, dtype=torch.bool,
                                                         device=text_mask.device).tril()
    real = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device),
                      text_mask.bool()], dim=1)  # [B, L]
    return allowed[None] & real[:, None, :]


def unimodal_attention_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: queries see only queries, text sees only text (bidirectionally, as BERT). text_mask [B, T]."""
    return _blip2_mask(num_queries, text_mask, queries_see_text=False, text_sees_queries=False, causal_text=False)


def bidirectional_attention_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM (and InstructBLIP's instruction-aware queries): every position sees every real one."""
    return _blip2_mask(num_queries, text_mask, queries_see_text=True, text_sees_queries=True, causal_text=False)


def multimodal_causal_attention_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see only queries; text token i sees every query and text tokens 0..i."""
    return _blip2_mask(num_queries, text_mask, queries_see_text=False, text_sees_queries=True, causal_text=True)


class QFormerConnector(nn.Module):
    """vision features [B, N, Dv] (+ instruction ids/mask [B, T]) -> visual tokens [B, Q, D_llm].

    With an instruction, its tokens share the self-attention with the queries (InstructBLIP's
    instruction-aware features); only the Q query outputs are projected and returned."""

    def __init__(self, qformer: QFormer, llm_hidden: int):
        super().__init__()
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer.config.hidden_size, llm_hidden)

    def num_tokens(self, num_vision_tokens: int) -> int:
        return self.qformer.num_queries

    @property
    def reads_instructions(self) -> bool:
        """Whether forward accepts instruction ids (the Q-Former has its own text embeddings)."""
        return self.qformer.config.text_input

    def forward(self, features: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if instruction_ids is not None:
            if instruction_mask is None:
                instruction_mask = torch.ones_like(instruction_ids)
            mask = bidirectional_attention_mask(self.qformer.num_queries, instruction_mask)
        queries = self.qformer(features, instruction_ids, mask).queries  # [B, Q, H]
        return self.language_projection(queries)
