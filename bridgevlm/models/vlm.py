"""VisionLanguageModel(vision, connector, llm): visual tokens spliced into the LLM's input embeddings.

Each image stands in the token sequence as `num_image_tokens` copies of the image placeholder id
(the tokenizer side expands one `<image>` tag into that many), so splicing is a single in-order
scatter, a text-only sample is just a row without placeholders, and the KV cache sees ordinary
positions during generation.

A connector that reads an instruction as well as the image (InstructBLIP's Q-Former, which has
`reads_instructions`) gets per-image `qformer_input_ids` / `qformer_attention_mask` [I, Tq], tokenised
with its own tokenizer; every other connector sees only the vision features.

The LLM is decoder-only (models/llm.py) or an encoder-decoder such as FlanT5 (models/seq2seq_llm.py).
Either way the visual tokens go into the embeddings of `input_ids` (for an encoder-decoder, the
encoder's input), and the LLM wrapper knows how to run itself on them: next-token loss on the
labelled positions, or BLIP-2's prefix-LM loss on the decoder's targets.

A connector with `adapt_text` (CROME's gated adapter) also reads text: each image's placeholders are
preceded by a copy of its turn's text whose ids are shifted up by `text_copy_offset` (the tokenizer
side writes it, data/templates.py's ImagePlaceholder), and `embed` puts the adapter's text-branch
output at those positions. Every other position is the LLM's own embedding, so text-only prompts,
replies and generated tokens reach the LLM exactly as they would without the bridge.

An in-LLM connector (partial LoRA, Flamingo's gated cross-attention; connectors/in_llm.py) is attached
to the LLM when the model is built: it wraps some of the LLM's modules. Those read, per forward, a
context the connector builds from the batch: which positions hold visual tokens, which image each
token follows, the images' latents. `prepare(...)` returns the embeddings and that context (None for
an input-level connector); the context is installed only around the LLM call that reads those
embeddings (`with context.applied(): ...`; `forward` and `logits` do it), and again during that
call's backward pass (checkpointed layers recompute it). Generation takes it along
(`generate(..., context=...)`): after the prompt, `context.decoding()` describes each new token (text,
following the row's last image), and `context.select(rows)` follows beams. So `embed` alone does not
carry the images to an in-LLM connector: use `prepare`.
"""
from __future__ import annotations

import torch
from torch import nn

from .connectors.in_llm import LlmContext, applied, hold_during_backward, is_in_llm
from .llm import LanguageModelProtocol
from .lora import merge_lora
from .output import LossOutput
from .vision import VisionTower


class ImageTokenError(ValueError):
    """Placeholders and images disagree; the message names the sample."""


class VisionLanguageModel(nn.Module):
    """vision: pixels -> features [I, N, Dv]; connector: features -> tokens [I, M, D]; llm: a causal or
    encoder-decoder LM wrapper.

    Parameters live under the prefixes `vision.`, `connector.` and `llm.`, which is how stages say
    what trains.
    """

    def __init__(self, vision: VisionTower, connector: nn.Module, llm: LanguageModelProtocol,
                 image_token_id: int):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.lora_parts: dict = {}  # part name -> LoraSettings of the adapters it holds
        self.fully_trained: set[str] = set()  # parts whose every weight may differ from the pretrained one
        # The connector's sub-parts (e.g. "adapter") the current stage trains; empty: the whole connector.
        # A save then holds only those, on top of the model directory the stage started from.
        self.connector_parts: list[str] = []
        if is_in_llm(connector):
            connector.attach(llm.model)

    def merge_adapters(self) -> None:
        """Fold every part's LoRA adapters into its weights; those parts then count as fully trained."""
        for part in self.lora_parts:
            merge_lora(getattr(self, part))
            self.fully_trained.add(part)
        self.lora_parts = {}

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image in the input sequence."""
        return self.connector.num_tokens(self.vision.num_tokens)

    @property
    def text_copy_offset(self) -> int | None:
        """For a connector that adapts text: the shift marking the ids of an image's copy of its turn's
        text (past the vocabulary and the image placeholder id, so no real id is mistaken for one);
        None for every other connector."""
        if not hasattr(self.connector, "adapt_text"):
            return None
        return max(self.llm.model.get_input_embeddings().num_embeddings, self.image_token_id + 1)

    def encode_images(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[I, 3, H, W] (+ instruction ids/mask [I, Tq]) -> visual tokens [I, M, D_llm]."""
        return self.connect(self.vision(pixel_values), qformer_input_ids, qformer_attention_mask)

    def connect(self, features: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Vision features [I, N, Dv] (+ instruction ids/mask [I, Tq]) -> visual tokens [I, M, D_llm]."""
        if qformer_input_ids is None:
            return self.connector(features)
        if not getattr(self.connector, "reads_instructions", False):
            raise ValueError(f"qformer_input_ids were given, but this {type(self.connector).__name__} does not read "
                             f"instructions (only a Q-Former with text input, as InstructBLIP's, does)")
        if qformer_input_ids.shape[0] != features.shape[0]:
            raise ImageTokenError(f"{qformer_input_ids.shape[0]} instruction(s) (qformer_input_ids) for "
                                  f"{features.shape[0]} image(s); give one per image, in reading order")
        return self.connector(features, qformer_input_ids, qformer_attention_mask)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              sample_ids: list | None = None, vision_features: torch.Tensor | None = None,
              qformer_input_ids: torch.Tensor | None = None,
              qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] with M placeholders per image, pixel_values [I, 3, H, W] in reading
        order -> inputs_embeds [B, T, D]. `vision_features` [I, N, Dv] (the frozen tower's output,
        from a feature cache) stand in for pixel_values. `qformer_input_ids`/`qformer_attention_mask`
        [I, Tq]: one instruction per image, for a connector that reads them."""
        is_image = input_ids == self.image_token_id  # [B, T]
        images = vision_features if vision_features is not None else pixel_values
        num_images = 0 if images is None else images.shape[0]
        self._check_placeholders(is_image, num_images, sample_ids)
        embeds = self.embed_text(input_ids, is_image)
        if num_images:
            features = vision_features if vision_features is not None else self.vision(pixel_values)
            visual = self.connect(features, qformer_input_ids, qformer_attention_mask)
            visual = visual.to(embeds.dtype)  # [I, M, D]
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        return embeds

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                sample_ids: list | None = None, vision_features: torch.Tensor | None = None,
                qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LlmContext | None]:
        """`embed`'s inputs -> (inputs_embeds [B, T, D], the context an in-LLM connector reads while the
        LLM runs on them, or None for an input-level connector)."""
        if not is_in_llm(self.connector):
            return self.embed(input_ids, pixel_values, sample_ids, vision_features, qformer_input_ids,
                              qformer_attention_mask), None
        features = vision_features
        if features is None and pixel_values is not None:
            features = self.vision(pixel_values)  # once, for the spliced tokens and the context
        embeds = self.embed(input_ids, None, sample_ids, features, qformer_input_ids, qformer_attention_mask)
        return embeds, self.connector.context(input_ids == self.image_token_id, features)

    def embed_text(self, input_ids: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> the LLM's input embeddings [B, T, D]; image positions hold a stand-in to be
        overwritten, and copies of text (ids past `text_copy_offset`) the adapter's text branch."""
        # The placeholder id may lie outside the vocabulary (HF Llava's default): look up a valid id instead.
        ids = input_ids.masked_fill(is_image, 0)
        offset = self.text_copy_offset
        if offset is None:
            return self.llm.embed(ids)
        is_copy = ids >= offset
        embeds = self.llm.embed(torch.where(is_copy, ids - offset, ids))
        # Run even on no rows, so every rank's graph reaches the text branch (DDP expects each parameter).
        adapted = self.connector.adapt_text(embeds[is_copy]).to(embeds.dtype)
        return embeds.masked_scatter(is_copy.unsqueeze(-1), adapted)

    def _check_placeholders(self, is_image: torch.Tensor, num_images: int, sample_ids) -> None:
        per_row = is_image.sum(1).tolist()
        m = self.num_image_tokens
        for row, count in enumerate(per_row):
            if count % m:
                name = sample_ids[row] if sample_ids else row
                raise ImageTokenError(
                    f"sample {name!r} has {count} image placeholder tokens, not a multiple of the "
                    f"{m} tokens one image takes; was it tokenised for a different vision tower or connector?")
        if sum(per_row) != num_images * m:
            counts = ", ".join(f"{sample_ids[r] if sample_ids else r!r}: {c // m}" for r, c in enumerate(per_row))
            raise ImageTokenError(f"the batch has placeholders for {sum(per_row) // m} image(s) ({counts}) "
                                  f"but {num_images} image(s) were given")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
               qformer_attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None,
               vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits at every position [B, T, V] (for scoring and parity checks). With an
        encoder-decoder LLM, `input_ids` is the encoder's input and the logits are those of the
        decoder positions [B, S, V] given `decoder_input_ids` [B, S]. `vision_features` [I, N, Dv] (the
        tower's output) may stand in for pixel_values."""
        embeds, context = self.prepare(input_ids, pixel_values, vision_features=vision_features,
                                       qformer_input_ids=qformer_input_ids,
                                       qformer_attention_mask=qformer_attention_mask)
        with applied(context):
            return self.llm.logits_from_embeds(embeds, attention_mask, decoder_input_ids, decoder_attention_mask)

    def forward(self, batch: dict) -> LossOutput:
        """batch: input_ids, attention_mask [B, T], labels [B, T] (an encoder-decoder LLM: labels [B, S]
        on the decoder side, and optionally decoder_input_ids / decoder_attention_mask [B, S]; see
        seq2seq_llm.py); pixel_values [I, 3, H, W] or vision_features [I, N, Dv] (optional);
        qformer_input_ids, qformer_attention_mask [I, Tq] (optional, for a connector that reads
        instructions)."""
        embeds, context = self.prepare(batch["input_ids"], batch.get("pixel_values"), batch.get("sample_ids"),
                                       batch.get("vision_features"), batch.get("qformer_input_ids"),
                                       batch.get("qformer_attention_mask"))
        with applied(context):
            out = self.llm.loss_from_embeds(embeds, batch)
        hold_during_backward(context, out.loss_sum)
        return out
