"""Flamingo: a Perceiver resampler turns each image into a few latents, and GATED XATTN-DENSE blocks
inserted between the frozen LLM's layers let the text read them.

Each block computes y = y + tanh(α_xattn)·CrossAttn(q=y, kv=visual), then y = y + tanh(α_dense)·FFW(y),
with both α scalars initialised to 0, so at the start the model is the frozen LLM exactly. A text token
reads only the latents of the most recent image at or before it; before the first image it reads
nothing (its cross-attention output is zero, while the dense FFW applies to every token, as in Flamingo).

In the token sequence an image is one marker token (`num_tokens` is 1), Flamingo's `<image>` tag: its
embedding is a learned connector parameter (`marker`), which starts as the mean of the LLM's input
embeddings so the frozen LLM first reads it as an ordinary token. The markers tell each token which
image it follows; the images themselves reach the LLM only through the cross-attention.

`attach(llm)` replaces every N-th entry of the LLM's decoder layer list (layers N-1, 2N-1, ..., as
OpenFlamingo's `cross_attn_every_n_layers`) by a `GatedLayer` that runs the block, then the original
layer with the same arguments, returning what it returns (KV cache included). The blocks belong to the
connector (`connector.blocks.<layer>.*`), so they train and save with it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .in_llm import ContextSlot, context_mismatch, refer, require_decoder_only
from .perceiver import PerceiverResampler, feed_forward, multihead_attention


@dataclass
class GatedXattnConfig:
    # Flamingo's sizes by default (64 latents; OpenFlamingo: 6 resampler layers, a block every 4th layer);
    # a Shapes recipe sets small ones.
    num_latents: int = 64
    resampler_layers: int = 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    every: int = 4  # a gated block before every N-th LLM layer
    heads: int = 8  # the blocks' cross-attention
    head_dim: int = 64
    ff_mult: int = 4  # FFW width = ff_mult x width (resampler and blocks)
    layers: str | None = None  # the LLM's decoder layer list (e.g. model.layers); None: found by its length

    def __post_init__(self):
        for name in ("num_latents", "resampler_layers", "resampler_heads", "resampler_head_dim", "every", "heads",
                     "head_dim", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"connector.gated_xattn.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ImageLatents:
    """The gated cross-attention context of a batch [B, T]."""

    slot: ContextSlot
    image_slot: torch.Tensor  # [B, T] which of its row's images each position reads (the latest); -1: none yet
    media: torch.Tensor | None  # [B, Imax, L, Dv] each row's image latents in order; None: no images

    def applied(self):
        return self.slot.holding(self)

    def decoding(self) -> ImageLatents:
        # A generated token follows every image of its prompt: it reads the row's last one.
        return replace(self, image_slot=self.image_slot[:, -1:])

    def select(self, rows: torch.Tensor) -> ImageLatents:
        return replace(self, image_slot=self.image_slot[rows], media=None if self.media is None else self.media[rows])

    @classmethod
    def join(cls, contexts: list[ImageLatents]) -> ImageLatents:
        """The rows of these contexts (equally wide) in one batch; a row reads only its own images, so rows
        with fewer images are padded with unread zero latents."""
        image_slot = torch.cat([c.image_slot for c in contexts])
        present = [c.media for c in contexts if c.media is not None]
        if not present:
            return replace(contexts[0], image_slot=image_slot, media=None)
        most = max(m.shape[1] for m in present)
        _, _, latents, dim = present[0].shape
        media = []
        for c in contexts:
            rows = c.image_slot.shape[0]
            m = c.media if c.media is not None else present[0].new_zeros(rows, 0, latents, dim)
            media.append(torch.cat([m, m.new_zeros(rows, most - m.shape[1], latents, dim)], dim=1))
        return replace(contexts[0], image_slot=image_slot, media=torch.cat(media))


class MaskedCrossAttention(nn.Module):
    """y [B, T, D] reads, at each position, the latents of the image `image_slot` [B, T] names in its row
    (media [B, Imax, L, Dv]) -> [B, T, D]; zero where the slot is -1."""

    def __init__(self, dim: int, visual_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(visual_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, y: torch.Tensor, media: torch.Tensor, image_slot: torch.Tensor) -> torch.Tensor:
        images, latents = media.shape[1], media.shape[2]
        k, v = self.to_kv(media.flatten(1, 2).to(self.to_kv.weight.dtype)).chunk(2, dim=-1)  # [B, Imax*L, inner]
        key_image = torch.arange(images, device=y.device).repeat_interleave(latents)  # [Imax*L]
        has_image = (image_slot >= 0)[..., None]  # [B, T, 1]
        # A token before any image may attend anywhere (its output is dropped): with no key at all it would be NaN.
        allowed = (image_slot[..., None] == key_image) | ~has_image  # [B, T, Imax*L]
        out = self.to_out(multihead_attention(self.to_q(self.norm(y)), k, v, self.heads, allowed))
        return torch.where(has_image, out, torch.zeros((), dtype=out.dtype, device=out.device))


class GatedXattnDense(nn.Module):
    """y [B, T, D] -> y + tanh(α_xattn)·CrossAttn(y, visual), then + tanh(α_dense)·FFW(y)."""

    def __init__(self, dim: int, visual_dim: int, cfg: GatedXattnConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, visual_dim, cfg.heads, cfg.head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # α_xattn
        self.ff = feed_forward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))  # α_dense

    def forward(self, y: torch.Tensor, context: ImageLatents | None) -> torch.Tensor:
        if context is not None:
            if context.image_slot.shape != y.shape[:-1]:
                raise context_mismatch("gated cross-attention", context.image_slot.shape, y.shape[:-1])
            if context.media is not None:
                y = y + (self.attn_gate.tanh() * self.attn(y, context.media, context.image_slot)).to(y.dtype)
        return y + (self.ff_gate.tanh() * self.ff(y)).to(y.dtype)


class GatedLayer(nn.Module):
    """A decoder layer of the LLM preceded by its gated block; called, and answering, exactly as the layer."""

    def __init__(self, layer: nn.Module, block: GatedXattnDense, slot: ContextSlot):
        super().__init__()
        self.layer = layer
        refer(self, "block", block)
        self.slot = slot

    def forward(self, *args, **kwargs):
        if args:
            args = (self.block(args[0], self.slot.current), *args[1:])
        else:
            kwargs["hidden_states"] = self.block(kwargs["hidden_states"], self.slot.current)
        return self.layer(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)  # HF reads per-layer attributes (attention_type, ...)


class GatedXattnConnector(nn.Module):
    """features [I, N, Dv] -> one marker token per image [I, 1, D_llm]; the latents reach the LLM through
    the gated blocks, reading the context `context(is_image, features)` builds."""

    def __init__(self, cfg: GatedXattnConfig, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.config = cfg
        self.marker = nn.Parameter(torch.zeros(llm_hidden))  # Flamingo's <image> embedding; set by attach
        self.resampler = PerceiverResampler(vision_hidden, cfg.num_latents, cfg.resampler_layers,
                                            cfg.resampler_heads, cfg.resampler_head_dim, cfg.ff_mult)
        self.blocks = nn.ModuleDict()  # LLM layer index -> the block run before that layer; filled by attach
        self.slot = ContextSlot()
        self.dims = (llm_hidden, vision_hidden)
        self._wrapped: list[tuple[nn.ModuleList, int, nn.Module]] = []  # (layer list, index, original) to detach

    def num_tokens(self, num_vision_tokens: int) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.marker.expand(features.shape[0], 1, -1)

    def context(self, is_image: torch.Tensor, features: torch.Tensor | None = None) -> ImageLatents:
        """is_image [B, T] (one marker per image), features [I, N, Dv] in reading order."""
        image_slot = is_image.long().cumsum(1) - 1  # [B, T]
        if features is None or features.shape[0] == 0:
            return ImageLatents(self.slot, image_slot, None)
        latents = self.resampler(features)  # [I, L, Dv]
        counts = is_image.sum(1)  # [B]
        rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)  # [I]
        within = torch.arange(len(rows), device=counts.device) - (counts.cumsum(0) - counts)[rows]
        media = latents.new_zeros(len(counts), int(counts.max()), *latents.shape[1:])
        return ImageLatents(self.slot, image_slot, media.index_put((rows, within), latents))

    def attach(self, llm: nn.Module) -> None:
        require_decoder_only(llm, "gated_xattn")
        if self._wrapped:
            return
        cfg, fresh = self.config, not self.blocks
        layers = decoder_layers(llm, cfg.layers)
        if cfg.every > len(layers):
            raise ValueError(f"connector.gated_xattn.every is {cfg.every} but {type(llm).__name__} has "
                             f"{len(layers)} layers: no gated block would be inserted")
        weight = llm.get_input_embeddings().weight
        for index in range(cfg.every - 1, len(layers), cfg.every):
            key = str(index)
            if key not in self.blocks:
                self.blocks[key] = GatedXattnDense(*self.dims, cfg).to(device=weight.device, dtype=weight.dtype)
            original = layers[index]
            layers[index] = GatedLayer(original, self.blocks[key], self.slot)
            self._wrapped.append((layers, index, original))
        if fresh:
            with torch.no_grad():
                self.marker.copy_(weight.mean(0))

    def detach(self, llm: nn.Module) -> None:
        for layers, index, original in self._wrapped:
            layers[index] = original
        self._wrapped = []


def decoder_layers(llm: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The LLM's list of decoder layers: the module at `path`, else its only ModuleList as long as
    its config's num_hidden_layers."""
    if path is not None:
        try:
            layers = llm.get_submodule(path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"connector.gated_xattn.layers {path!r} is not a module list of {type(llm).__name__}")
        return layers
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    count = getattr(config, "num_hidden_layers", None)
    found = [name for name, m in llm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"cannot tell which module list of {type(llm).__name__} holds its {count} decoder layers "
                         f"(candidates: {found or 'none'}); name it in connector.gated_xattn.layers")
    return llm.get_submodule(found[0])
