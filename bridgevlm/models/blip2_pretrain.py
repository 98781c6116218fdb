"""BLIP-2 stage 1: teach a Q-Former to read a frozen vision tower with three objectives.

- ITC (image-text contrastive), unimodal: queries and text are encoded apart; the similarity of
  an image and a text is the best match over the projected query outputs with the text's [CLS].
- ITM (image-text matching), bidirectional: a 2-way head on every query output, averaged, tells
  matched pairs from hard negatives drawn in proportion to softmax(ITC similarity).
- ITG (image-grounded text generation), multimodal causal: the text, starting with [DEC]
  instead of [CLS], is predicted token by token while seeing every query.

Under DDP the contrastive candidates and the hard-negative pool are the global batch, so two
ranks with b samples each compute the same ITC loss and gradients as one process with 2b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from .connectors.qformer import QFormer, QFormerOutput, bidirectional_attention_mask, multimodal_causal_attention_mask
from .output import LossOutput

OBJECTIVES = ("itc", "itm", "itg")


@dataclass
class Blip2PretrainConfig:
    itc: bool = True
    itm: bool = True
    itg: bool = True
    embed_dim: int = 256  # width of the contrastive embeddings
    max_text_length: int = 32  # longer texts are cut, as BLIP-2's tokenizer call does
    temperature: float = 0.07  # learnable; kept inside [min_temperature, max_temperature] as BLIP-2 does
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    label_smoothing: float = 0.1  # on the ITC and ITG cross-entropies, as BLIP-2's code
    dec_token_id: int = 30522  # [DEC], the token BLIP-2 adds after BERT's 30522; replaces [CLS] for ITG
    # The first token of every text is its summary token ([CLS] from a BERT tokenizer, BOS from
    # this project's); when set, texts are checked to start with it.
    cls_token_id: int | None = None

    def __post_init__(self):
        if not any(getattr(self, name) for name in OBJECTIVES):
            raise ValueError("blip2 pretraining needs at least one objective; set one of itc, itm, itg to true")
        if not 0 < self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError(f"temperature {self.temperature} must lie in [min_temperature {self.min_temperature}, "
                             f"max_temperature {self.max_temperature}] with min_temperature > 0")
        if self.embed_dim < 1 or self.max_text_length < 2:
            raise ValueError("embed_dim must be >= 1 and max_text_length >= 2 ([CLS] and one token)")

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in OBJECTIVES if getattr(self, name))


def query_text_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """image_embeds [I, Q, E], text_embeds [T, E] -> [I, T]: the best-matching query per pair."""
    return torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(-1)


def sample_hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None,
                          positives: torch.Tensor | None = None) -> torch.Tensor:
    """One negative column per row of `similarity` [R, C], drawn with probability softmax(row)
    over the columns that are not positives -> [R] long; -1 where a row has no such column (a
    batch of one, or every candidate identical to the positive). -inf entries are never drawn.

    positives [R, C] bool; None: column i is row i's positive.
    Gumbel-max: argmax(s + g), g ~ Gumbel(0, 1), is distributed as softmax(s). Positives score
    -inf and the noise is kept finite, so a positive cannot win while any candidate remains.
    """
    scores = similarity.detach().float()
    if not (scores < float("inf")).all():
        raise ValueError("hard-negative similarities contain NaN or +inf")
    rows, columns = scores.shape
    if positives is None:
        positives = torch.eye(rows, columns, dtype=torch.bool, device=scores.device)
    candidates = ~positives.to(scores.device, torch.bool) & (scores > float("-inf"))
    device = generator.device if generator is not None else scores.device
    uniform = torch.rand(scores.shape, generator=generator, device=device).to(scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))  # finite
    choice = torch.where(candidates, scores + gumbel, float("-inf")).argmax(dim=1)
    return torch.where(candidates.any(dim=1), choice, -1)


def identical_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """[len(rows), B] bool: text `rows` vs every text of the batch, equal up to padding."""
    keyed = input_ids.masked_fill(attention_mask == 0, -1)
    return (keyed[rows, None, :] == keyed[None, :, :]).all(dim=-1)


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


class _GatherWithGradient(torch.autograd.Function):
    """all_gather of equal-shaped tensors -> [world, ...]. Backward sums over ranks the gradient
    every rank's loss sends to this rank's part, so per-rank losses add up to the single-process
    gradient. (All-reduce then slice: gloo has no reduce-scatter.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad[tdist.get_rank()]


def gather_across_ranks(tensor: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, int]:
    """Every rank's `tensor` [b, ...] concatenated in rank order -> ([sum of b, ...], the offset of
    this rank's rows). Ranks may differ in b and in later sizes (smaller ones are zero-padded).
    differentiable: the gradient reaches every rank's rows (see _GatherWithGradient)."""
    if not _distributed():
        return tensor, 0
    world = tdist.get_world_size()
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    tdist.all_gather(shapes, shape)
    largest = torch.stack(shapes).amax(dim=0).tolist()
    padding = [p for dim in reversed(range(tensor.dim())) for p in (0, largest[dim] - tensor.shape[dim])]
    padded = F.pad(tensor, padding)
    if differentiable:
        parts = _GatherWithGradient.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        tdist.all_gather(parts, padded)
    sizes = [int(s[0]) for s in shapes]
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[:tdist.get_rank()])


class QFormerPretrainer(nn.Module):
    """BLIP-2 stage 1: forward(batch) -> LossOutput with the sum of the enabled losses.

    batch: `pixel_values` [B, 3, H, W] for the vision tower, or its cached output
    `vision_features` [B, N, Dv]; `input_ids`, `attention_mask` [B, T] (right-padded, starting
    with [CLS]); optional `image_ids` [B] marking samples of the same image, which are then never
    each other's hard negatives (identical captions never are).

    Parameters live under `vision.` (frozen, always in eval mode), `qformer.`, `vision_proj.`,
    `text_proj.`, `itm_head.` and `temperature`.
    """

    def __init__(self, vision: nn.Module | None, qformer: QFormer, cfg: Blip2PretrainConfig | None = None):
        super().__init__()
        cfg = cfg or Blip2PretrainConfig()
        qcfg = qformer.config
        if not qcfg.text_input:
            raise ValueError("blip2 pretraining reads text with the Q-Former; build it with text_input: true")
        if cfg.itg and qformer.lm_head is None:
            raise ValueError("the itg objective needs a Q-Former LM head; set qformer.lm_head to tied or untied")
        if not 0 <= cfg.dec_token_id < qcfg.vocab_size:
            raise ValueError(f"dec_token_id {cfg.dec_token_id} is outside the Q-Former's vocabulary of "
                             f"{qcfg.vocab_size}; add the [DEC] token to the vocabulary")
        if cfg.max_text_length > qcfg.max_position_embeddings:
            raise ValueError(f"max_text_length {cfg.max_text_length} exceeds the Q-Former's "
                             f"{qcfg.max_position_embeddings} positions")
        width = getattr(vision, "hidden_size", qcfg.vision_width)
        if width != qcfg.vision_width:
            raise ValueError(f"the vision tower's features are {width} wide but qformer.vision_width is "
                             f"{qcfg.vision_width}")
        self.config = cfg
        self.vision = vision
        if vision is not None:
            vision.requires_grad_(False)
            vision.eval()
        self.qformer = qformer
        self.vision_proj = nn.Linear(qcfg.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.temperature = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self._freeze_unreached()

    def _freeze_unreached(self) -> None:
        """Freeze what no enabled objective sends a gradient to: DDP (find_unused_parameters off)
        fails on a trainable parameter without one, and an optimiser would only decay it."""
        cfg, last = self.config, self.qformer.layers[-1]
        unreached = []
        if not cfg.itc:  # ITM only samples its negatives from the (detached) ITC similarities
            unreached += [self.vision_proj, self.text_proj, self.temperature]
        if not cfg.itm:
            unreached.append(self.itm_head)
        if not cfg.itg and self.qformer.lm_head is not None:
            unreached.append(self.qformer.lm_head)  # a tied decoder is the word embeddings: not in here
        if not (cfg.itc or cfg.itg):  # ITM reads only the query outputs: nothing reads the last text states
            unreached.append(last.text_ffn)
        if not (cfg.itc or cfg.itm):  # ITG reads the queries only through attention in earlier layers
            unreached += [part for part in (last.cross_attn, last.query_ffn) if part is not None]
        for part in unreached:
            part.requires_grad_(False)

    def train(self, mode: bool = True) -> QFormerPretrainer:
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()  # frozen: no dropout, no statistics updates
        return self

    # -- inputs -------------------------------------------------------------------------------

    def vision_features(self, batch: dict) -> torch.Tensor:
        """The batch's `vision_features` [B, N, Dv], else the frozen tower's output for `pixel_values`."""
        features = batch.get("vision_features")
        if features is None:
            if self.vision is None or "pixel_values" not in batch:
                raise ValueError("the batch needs vision_features, or pixel_values and a pretrainer with "
                                 "a vision tower")
            with torch.no_grad():
                features = self.vision(batch["pixel_values"])
        if features.shape[-1] != self.qformer.config.vision_width:
            raise ValueError(f"vision features are {features.shape[-1]} wide; the Q-Former reads "
                             f"{self.qformer.config.vision_width}")
        return features

    def prepare_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut to max_text_length and check that every text starts with a real [CLS]."""
        input_ids = input_ids[:, :self.config.max_text_length]
        attention_mask = attention_mask[:, :self.config.max_text_length]
        empty = (attention_mask[:, 0] == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"text {empty[0]} of the batch starts with padding; texts must be right-padded "
                             "and non-empty")
        cls = self.config.cls_token_id
        if cls is not None and (input_ids[:, 0] != cls).any():
            row = int((input_ids[:, 0] != cls).nonzero()[0])
            raise ValueError(f"text {row} of the batch starts with token {int(input_ids[row, 0])}, not [CLS] "
                             f"({cls}); tokenise with the special tokens added")
        return input_ids, attention_mask

    # -- the three views ----------------------------------------------------------------------

    def encode_image(self, vision_features: torch.Tensor) -> torch.Tensor:
        """[B, N, Dv] -> L2-normalised query embeddings [B, Q, E] (queries alone: the unimodal view)."""
        return self._embed_queries(self.qformer(vision_features).queries)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> L2-normalised [CLS] embedding [B, E] (text alone: the unimodal view)."""
        text = self.qformer(input_ids=input_ids, attention_mask=attention_mask).text  # [B, T, H]
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def match_logits(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-text pairs -> ITM logits [B, 2] (index 1 = match), averaged over the query outputs."""
        mask = bidirectional_attention_mask(self.qformer.num_queries, attention_mask)
        queries = self.qformer(vision_features, input_ids, mask).queries  # [B, Q, H]
        return self.itm_head(queries).mean(dim=1)

    def caption_logits(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded next-token logits [B, T, V]; position i predicts token i + 1."""
        return self.qformer.lm_logits(self._generation_pass(vision_features, input_ids, attention_mask).text)

    def _embed_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(queries), dim=-1)

    def _generation_pass(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> QFormerOutput:
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.dec_token_id
        mask = multimodal_causal_attention_mask(self.qformer.num_queries, attention_mask)
        return self.qformer(vision_features, decoder_ids, mask)

    # -- losses -------------------------------------------------------------------------------

    def forward(self, batch: dict) -> LossOutput:
        cfg = self.config
        with torch.no_grad():
            self.temperature.clamp_(cfg.min_temperature, cfg.max_temperature)
        features = self.vision_features(batch)
        input_ids, attention_mask = self.prepare_text(batch["input_ids"], batch["attention_mask"])
        losses: dict[str, torch.Tensor] = {}
        queries = None
        if cfg.itg:
            generated = self._generation_pass(features, input_ids, attention_mask)
            # Queries see only queries here, as in the ITC view: BLIP-2 shares them the same way.
            queries = generated.queries
            losses["itg"] = self._itg_loss(self.qformer.lm_logits(generated.text), input_ids, attention_mask)
        if cfg.itc or cfg.itm:
            if queries is None:
                queries = self.qformer(features).queries
            image_embeds = self._embed_queries(queries)
            text_embeds = self.encode_text(input_ids, attention_mask)
            image_to_text, text_to_image, targets = self._contrastive_logits(image_embeds, text_embeds)
            if cfg.itc:
                losses["itc"] = (F.cross_entropy(image_to_text, targets, label_smoothing=cfg.label_smoothing)
                                 + F.cross_entropy(text_to_image, targets, label_smoothing=cfg.label_smoothing)) / 2
            if cfg.itm:
                losses["itm"] = self._itm_loss(features, input_ids, attention_mask, image_to_text.detach(),
                                               text_to_image.detach(), batch.get("image_ids"))
        count = len(input_ids)
        logs = {f"loss_{name}": losses[name].item() for name in OBJECTIVES if name in losses}
        logs["temperature"] = self.temperature.item()
        # Each loss is a mean over the batch; as a sum over samples it fits the loop's target weighting.
        return LossOutput(loss_sum=sum(losses.values()) * count, num_targets=torch.tensor(count), logs=logs)

    def _contrastive_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor):
        """This rank's images [b, Q, E] and texts [b, E] against every rank's -> image->text and
        text->image logits [b, G] and the targets [b] (each sample's own column in the global batch)."""
        all_images, offset = gather_across_ranks(image_embeds, differentiable=True)
        all_texts, _ = gather_across_ranks(text_embeds, differentiable=True)
        image_to_text = query_text_similarity(image_embeds, all_texts) / self.temperature
        text_to_image = query_text_similarity(all_images, text_embeds).t() / self.temperature
        targets = torch.arange(len(text_embeds), device=text_embeds.device) + offset
        return image_to_text, text_to_image, targets

    def _itm_loss(self, features, input_ids, attention_mask, image_to_text, text_to_image, image_ids) -> torch.Tensor:
        """Each sample's matched pair, its image with a hard-negative text and its text with a
        hard-negative image, drawn from the global batch; cross-entropy over all these pairs."""
        all_features, offset = gather_across_ranks(features, differentiable=False)  # frozen: no gradient
        all_ids, _ = gather_across_ranks(input_ids, differentiable=False)
        all_mask, _ = gather_across_ranks(attention_mask, differentiable=False)
        local = slice(offset, offset + len(input_ids))
        # Identical captions (and samples of one image) describe each other's images: not negatives.
        positives = identical_texts(all_ids, all_mask, local)  # [b, G]
        if image_ids is not None:
            all_image_ids, _ = gather_across_ranks(image_ids, differentiable=False)
            positives |= image_ids[:, None] == all_image_ids[None, :]
        negative_texts = sample_hard_negatives(image_to_text, positives=positives)  # [b]
        negative_images = sample_hard_negatives(text_to_image, positives=positives)  # [b]
        has_text, has_image = negative_texts >= 0, negative_images >= 0
        features, input_ids, attention_mask = all_features[local], all_ids[local], all_mask[local]
        pair_features = torch.cat([features, all_features[negative_images[has_image]], features[has_text]])
        pair_ids = torch.cat([input_ids, input_ids[has_image], all_ids[negative_texts[has_text]]])
        pair_mask = torch.cat([attention_mask, attention_mask[has_image], all_mask[negative_texts[has_text]]])
        labels = torch.zeros(len(pair_ids), dtype=torch.long, device=pair_ids.device)
        labels[:len(input_ids)] = 1
        return F.cross_entropy(self.match_logits(pair_features, pair_ids, pair_mask), labels)

    def _itg_loss(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """logits [B, T, V]: position i predicts text token i + 1; padding is not a target."""
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        if not (targets != -100).any():  # one-token texts: nothing to predict, and a mean over nothing is NaN
            return logits.sum() * 0.0
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                               label_smoothing=self.config.label_smoothing)
