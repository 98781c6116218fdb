"""CROME's gated cross-modal adapter (Ebrahimi et al. 2024) over a Q-Former bridge.

The adapter is a bottleneck with a skip connection, one branch per modality:

    z = act(x·W_d) ⊙ (x·W_g)      W_d, W_g ∈ R^{d×m}, one pair per branch (text, vision)
    y = x + z·W_u                 W_u ∈ R^{m×d}, shared by the two branches

It has 5·d·m weights (no biases): 2·d·m per branch and m·d for the shared W_u.

How the LLM's input is made. The paper feeds the LLM concat(text embeddings, adapter text-branch
output, adapter vision-branch output). bridgevlm keeps the prompt in its reading order and puts the
two adapted parts where the image stands: the image's placeholders are preceded by a copy of the text
of the turn that holds it (the tokenizer side writes the copy with its ids shifted past the
vocabulary; ImagePlaceholder.text_copy_offset), and VisionLanguageModel.embed gives those positions
the text branch's output and the image positions the vision branch's output for the projected
queries. Every other token, the prompt's own text included, is the LLM's plain embedding: the text
branch is an extra view of the instruction, never a re-embedding of the vocabulary, so replies and
generated tokens are read as the LLM knows them and a text-only prompt is exactly the base LLM's.
W_u starts at zero, so an untrained adapter passes both copies through unchanged (y = x + z·W_u).
The adapter works token by token, so padding and batching cannot change a row's result. With an
encoder-decoder LLM the copy and the image go into the encoder's input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .qformer import QFormer, QFormerConnector

ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}
BRANCHES = ("text", "vision")


@dataclass
class GatedAdapterConfig:
    # The bottleneck m. The public text does not pin it down; the adapter has 5·d·m weights, so
    # m = 256 at Vicuna-7B's d = 4096 gives 5·4096·256 = 5,242,880 ≈ the paper's 5M parameters.
    bottleneck: int = 256
    activation: str = "silu"  # silu | sigmoid: the nonlinearity on x·W_d that gates x·W_g

    def __post_init__(self):
        if self.bottleneck < 1:
            raise ValueError(f"connector.adapter.bottleneck must be >= 1, got {self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown connector.adapter.activation {self.activation!r}; "
                             f"valid: {', '.join(ACTIVATIONS)}")


def adapter_parameter_count(width: int, bottleneck: int) -> int:
    """5·d·m: W_d and W_g for each of the two branches, and the shared W_u."""
    return 5 * width * bottleneck


class GatedDownProjection(nn.Module):
    """One branch's z = act(x·W_d) ⊙ (x·W_g): [*, d] -> [*, m]."""

    def __init__(self, width: int, bottleneck: int, activation: str):
        super().__init__()
        self.w_d = nn.Linear(width, bottleneck, bias=False)
        self.w_g = nn.Linear(width, bottleneck, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.w_d(x)) * self.w_g(x)


class GatedCrossModalAdapter(nn.Module):
    """x [*, d] -> x + z·W_u [*, d], z from the branch of x's modality ("text" or "vision")."""

    def __init__(self, width: int, cfg: GatedAdapterConfig):
        super().__init__()
        self.config = cfg
        self.text = GatedDownProjection(width, cfg.bottleneck, cfg.activation)
        self.vision = GatedDownProjection(width, cfg.bottleneck, cfg.activation)
        self.w_u = nn.Linear(cfg.bottleneck, width, bias=False)
        nn.init.zeros_(self.w_u.weight)  # the identity at start (see the module docstring)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        if branch not in BRANCHES:
            raise ValueError(f"unknown adapter branch {branch!r}; valid: {', '.join(BRANCHES)}")
        down = self.text if branch == "text" else self.vision
        h = x.to(self.w_u.weight.dtype)  # the adapter may run wider than bf16 embeddings
        return (h + self.w_u(down(h))).to(x.dtype)


class GatedAdapterConnector(nn.Module):
    """vision features [I, N, Dv] (+ instruction ids/mask [I, Tq]) -> visual tokens [I, Q, D_llm]:
    the Q-Former bridge's projected query outputs through the adapter's vision branch.
    `adapt_text(embeds [*, D_llm])` is the text branch, which VisionLanguageModel applies to each image's
    copy of its turn's text. Parameters: `visual.qformer.*`, `visual.language_projection.*`, `adapter.*`,
    the parts a stage can train on their own (trainable.connector_parts)."""

    # Its parts, as stages name them and parameter counts break them down (other connectors: their children).
    parts = ("visual.qformer", "visual.language_projection", "adapter")

    def __init__(self, visual: QFormerConnector, adapter: GatedCrossModalAdapter):
        super().__init__()
        self.visual = visual
        self.adapter = adapter

    @property
    def qformer(self) -> QFormer:
        """The Q-Former (what connector.init loads and what reads the instructions)."""
        return self.visual.qformer

    @property
    def reads_instructions(self) -> bool:
        return self.visual.reads_instructions

    def num_tokens(self, num_vision_tokens: int) -> int:
        return self.visual.num_tokens(num_vision_tokens)

    def forward(self, features: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapter(self.visual(features, instruction_ids, instruction_mask), "vision")  # [I, Q, D]

    def adapt_text(self, embeds: torch.Tensor) -> torch.Tensor:
        """Text embeddings [*, D] -> the text branch's output [*, D], token by token."""
        return self.adapter(embeds, "text")
