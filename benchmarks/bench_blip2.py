"""BLIP-2 (the Q-Former connector): a stage-2 training step and greedy generation, bridgevlm vs
`transformers`' Blip2ForConditionalGeneration with identical weights.

The reference is a tiny BLIP-2 with an OPT language model, random weights from seed 0, fp32: ViT
224 px / patch 14 / 256-d / 4 layers (257 feature tokens, CLS included); Q-Former 256-d, 4 layers,
cross-attention every second layer, 32 queries; OPT 256-d, 4 layers, FFN 1024, OPT's 50272-token
vocabulary (tied head). It is saved once and bridgevlm's model is `import_blip2` of that directory.

Stage-2 training (BLIP-2's generative stage): the vision tower and OPT are frozen; the query tokens,
Q-Former and language projection train with AdamW; both models are in train mode (dropout on), as
both training loops leave them. Batches of 8 samples, each 32 query tokens and
128 text tokens (BOS + 127 supervised caption tokens). The reference does what a user of
Blip2ForConditionalGeneration does: `model(pixel_values, input_ids, attention_mask, labels).loss`,
backward, step, with the pixels preprocessed up front (no decoding in its timed loop). bridgevlm runs
`VisionLanguageModel.forward(batch)` -> LossOutput (LM head and loss at labelled positions only),
two ways: from pixels (the frozen tower runs every step, as in the reference), and from the tower's
features read from bridgevlm's FeatureCache, the BLIP-2 recipes' `cache_vision_features: true` path
(the tower ran once, when the cache was filled; that time is printed apart).

Generation: greedy 64 new tokens from left-padded prompts (32 query tokens, BOS, a 4-20-token
question) at batch 1 and 8: `bridgevlm.infer.generate` on `model.embed(ids, pixels)` vs
`Blip2ForConditionalGeneration.generate`, on a copy whose final LayerNorm is scaled 20x (decisive
logits: greedy choices are not decided by float rounding).

Checks before any timing: equal logits, equal step-0 loss (from pixels and from the cache), equal
greedy tokens. Ratios are bridgevlm / reference on rates, so above 1 means bridgevlm is faster.
Threads: BENCH_THREADS (2 unless set, as every benchmark here).

    BENCH_THREADS=1 python benchmarks/bench_blip2.py [--steps 12] [--repeats 5] [--skip generate]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import photos  # noqa: E402
from common import check, figure, interleaved, machine, our_step, reference_step, setup  # noqa: E402

from bridgevlm.convert.blip2 import import_blip2  # noqa: E402
from bridgevlm.data.feature_cache import FeatureCache  # noqa: E402
from bridgevlm.data.images import ImageProcessor, load_image  # noqa: E402
from bridgevlm.data.templates import IGNORE_INDEX  # noqa: E402
from bridgevlm.infer.generate import GenerationConfig, generate, left_pad  # noqa: E402
from bridgevlm.models.assemble import LoadedVlm  # noqa: E402

VOCAB = 50272  # OPT's
IMAGE_TOKEN_ID = VOCAB - 1  # HF BLIP-2 embeds every input id, so the placeholder must lie inside the vocabulary
PAD, BOS = 1, 2  # OPT's
IMAGE_SIZE, PATCH = 224, 14
QUERIES = 32
TEXT_TOKENS = 128


def reference_config() -> Blip2Config:
    """ViT 224/14, 256-d, 4 layers; Q-Former 256-d, 4 layers, 32 queries; OPT 256-d, 4 layers."""
    return Blip2Config(
        vision_config=Blip2VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=256,
                                        intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        qformer_config=Blip2QFormerConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=1024, cross_attention_frequency=2, encoder_hidden_size=256),
        text_config=OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                              num_attention_heads=4, word_embed_proj_dim=256, max_position_embeddings=512,
                              pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS),
        num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN_ID)


@dataclass
class Pair:
    reference: Blip2ForConditionalGeneration
    ours: LoadedVlm


def build_pair(directory: Path, seed: int = 0, logit_scale: float = 1.0) -> Pair:
    """The reference with seeded random weights, saved, and bridgevlm's import of it. HF initialises
    the query tokens to zero (every query alike): they get BERT's N(0, 0.02) instead. `logit_scale`
    multiplies OPT's final LayerNorm (the head is tied to the embeddings, so it is scaled there)."""
    torch.manual_seed(seed)
    reference = Blip2ForConditionalGeneration(reference_config()).eval()
    with torch.no_grad():
        reference.query_tokens.normal_(std=0.02)
        final_norm = reference.language_model.model.decoder.final_layer_norm
        final_norm.weight.mul_(logit_scale)
        final_norm.bias.mul_(logit_scale)
    reference.save_pretrained(directory)
    ImageProcessor(size=IMAGE_SIZE).save_pretrained(directory)
    ours = import_blip2(directory)
    ours.model.eval()
    return Pair(reference, ours)


# --- stage-2 training --------------------------------------------------------------------------

def caption_batch(batch_size: int, seed: int) -> dict:
    """[32 placeholders, BOS, 127 caption tokens] per sample, the caption supervised (random ids:
    only lengths and supervision matter for speed). No padding: every sample is 160 tokens."""
    rng = np.random.default_rng(seed)
    ids = torch.tensor(np.concatenate([np.full((batch_size, QUERIES), IMAGE_TOKEN_ID), np.full((batch_size, 1), BOS),
                                       rng.integers(3, IMAGE_TOKEN_ID, (batch_size, TEXT_TOKENS - 1))], axis=1))
    labels = ids.clone()
    labels[:, :QUERIES + 1] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def write_images(directory: Path, count: int) -> list[str]:
    """Photo-like 224x224 PNGs (lossless, so the cached features and the reference's pixels agree)."""
    paths = []
    for i, image in enumerate(photos(count, seed=5)):
        paths.append(str(directory / f"{i:04d}.png"))
        image.crop((0, 0, IMAGE_SIZE, IMAGE_SIZE)).save(paths[-1])
    return paths


def train_qformer_only(model, trainable_prefixes: tuple[str, ...]) -> torch.optim.Optimizer:
    """BLIP-2 stage 2: only parameters under `trainable_prefixes` train; train mode (dropout on) everywhere."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(trainable_prefixes)
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def from_cache(batch: dict, cache: FeatureCache) -> dict:
    """The batch as the recipe's collate makes it with `cache_vision_features: true`: the frozen
    tower's features [I, N, Dv], read from the cache, instead of pixels."""
    return {**{k: v for k, v in batch.items() if k != "pixel_values"},
            "vision_features": torch.stack([cache.get(p) for p in batch["images"]])}


def cycling(step: Callable[[dict], object], batches: list[dict]) -> Callable[[], object]:
    """A callable that runs `step` on the next batch of `batches`, round and round."""
    order = itertools.cycle(batches)
    return lambda: step(next(order))


def interleaved_steps(sides: dict[str, Callable[[], object]], steps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one call of each side, the sides taking turns call by call: on a machine
    shared with another job, slow spells then hit every side alike."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(steps):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def training_figures(pair: Pair, batch_size: int, num_batches: int, steps: int, work: Path) -> list[dict]:
    model, processor = pair.ours.model, pair.ours.processor
    paths = write_images(work, batch_size * num_batches)
    batches = []
    for k in range(num_batches):
        batch = caption_batch(batch_size, seed=k)
        batch["images"] = paths[k * batch_size:(k + 1) * batch_size]
        batch["pixel_values"] = processor.normalize(torch.stack([processor.to_uint8(load_image(p))
                                                                 for p in batch["images"]]))
        batches.append(batch)

    start = time.perf_counter()
    cache = FeatureCache.for_tower(work / "cache", model.vision, processor)
    cache.fill(paths, model.vision, processor, batch_size=batch_size, progress=False)
    fill_s = time.perf_counter() - start
    print(f"feature cache filled once: {len(paths)} images in {fill_s:.2f} s (not in the timed steps below)",
          flush=True)

    # Equivalence before any update, dropout off: the same loss from pixels and from the cache.
    with torch.no_grad():
        b = batches[0]
        ref_loss = pair.reference(pixel_values=b["pixel_values"], input_ids=b["input_ids"],
                                  attention_mask=b["attention_mask"], labels=b["labels"]).loss.item()
        pixel_loss, cached_loss = [(out.loss_sum / out.num_targets).item()
                                   for out in (model(b), model(from_cache(b, cache)))]
    records = [check("stage-2 loss at step 0 (from pixels / from the feature cache)",
                     max(abs(pixel_loss - ref_loss), abs(cached_loss - ref_loss)) <= 1e-5,
                     f"reference {ref_loss:.7f}, bridgevlm {pixel_loss:.7f} / {cached_loss:.7f}")]

    ref_opt = train_qformer_only(pair.reference, ("query_tokens", "qformer.", "language_projection."))
    our_opt = train_qformer_only(model, ("connector.",))
    sides = {"reference": cycling(lambda b: reference_step(pair.reference, ref_opt, b), batches),
             "pixels": cycling(lambda b: our_step(model, our_opt, b), batches),
             "cached": cycling(lambda b: our_step(model, our_opt, from_cache(b, cache)), batches)}
    seconds = interleaved_steps(sides, steps)
    ref_s = seconds["reference"]
    for side, name in (("pixels", "from pixels"), ("cached", "from cached vision features")):
        record = figure(f"BLIP-2 stage-2 step, bridgevlm {name} (batch {batch_size}, {QUERIES} query + "
                        f"{TEXT_TOKENS} text tokens)", batch_size / ref_s, batch_size / seconds[side], "samples/s")
        record.update(reference_s_per_step=ref_s, ours_s_per_step=seconds[side])
        if side == "cached":
            record["cache_fill_s"] = fill_s
        print(f"  s/step: reference {ref_s:.3f}, bridgevlm {seconds[side]:.3f}", flush=True)
        records.append(record)
    return records


# --- generation ----------------------------------------------------------------------------------

def prompts(count: int, seed: int = 7) -> list[list[int]]:
    """32 query placeholders, BOS, then a 4-20-token question (random ids), as a VQA prompt."""
    rng = np.random.default_rng(seed)
    return [[IMAGE_TOKEN_ID] * QUERIES + [BOS] + rng.integers(3, IMAGE_TOKEN_ID, int(rng.integers(4, 21))).tolist()
            for _ in range(count)]


def reference_generate(model, ids, mask, pixels, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=PAD)
    return out[:, -new_tokens:].tolist()  # transformers returns the prompt ids first


def our_generate(loaded: LoadedVlm, ids, mask, pixels, new_tokens: int) -> list[list[int]]:
    model = loaded.model
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
    return generate(model.llm.model, embeds, mask, GenerationConfig(max_new_tokens=new_tokens),
                    eos_token_id=None).tokens


def generation_figures(pair: Pair, new_tokens: int, repeats: int) -> list[dict]:
    all_prompts = prompts(8)
    pixels_all = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    records = []
    for batch_size in (8, 1):
        ids, mask = left_pad(all_prompts[:batch_size], pad_id=PAD)
        pixels = pixels_all[:batch_size]
        ref_tokens = reference_generate(pair.reference, ids, mask, pixels, new_tokens)
        our_tokens = our_generate(pair.ours, ids, mask, pixels, new_tokens)
        distinct = len({t for row in our_tokens for t in row})
        records.append(check(f"BLIP-2 greedy tokens equal the reference (batch {batch_size})",
                             ref_tokens == our_tokens and all(len(r) == new_tokens for r in our_tokens),
                             f"{sum(a == b for a, b in zip(ref_tokens, our_tokens))}/{batch_size} rows identical, "
                             f"{distinct} distinct tokens"))
        ref_s, our_s = interleaved(lambda: reference_generate(pair.reference, ids, mask, pixels, new_tokens),
                                   lambda: our_generate(pair.ours, ids, mask, pixels, new_tokens), repeats=repeats)
        records.append(figure(f"BLIP-2 generate {new_tokens} tokens greedy, batch {batch_size}",
                              batch_size * new_tokens / ref_s, batch_size * new_tokens / our_s, "new tokens/s"))
    return records


@torch.no_grad()
def check_logits(pair: Pair, copy: str) -> dict:
    """The import itself: full logits [2, 160, V] on the same ids and pixels, dropout off."""
    ids = caption_batch(2, seed=99)["input_ids"]
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    reference = pair.reference.eval()(pixel_values=pixels, input_ids=ids).logits
    ours = pair.ours.model.eval().logits(ids, None, pixels)
    difference = (reference - ours).abs().max().item()
    scale = reference.abs().max().item()
    return check(f"BLIP-2 logits equal the reference ({copy})", difference <= 1e-5 * scale,
                 f"max abs difference {difference:.2e} (largest logit {scale:.1f}) over {tuple(ours.shape)}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="training batch size (samples of 32 + 128 tokens)")
    parser.add_argument("--batches", type=int, default=4, help="distinct training batches (taken in turn)")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps of each side (median taken)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations of each side (median taken)")
    parser.add_argument("--skip", choices=("train", "generate"), action="append", default=[],
                        help="leave out a part (repeatable)")
    args = parser.parse_args(argv)
    setup()
    print(f"machine: {machine()}", flush=True)
    records = []

    with tempfile.TemporaryDirectory(prefix="bridgevlm_bench_blip2_") as work:
        work = Path(work)
        if "train" not in args.skip:
            pair = build_pair(work / "model")
            records.append(check_logits(pair, "training copy"))
            (work / "images").mkdir()
            records += training_figures(pair, args.batch, args.batches, args.steps, work / "images")
            del pair
        if "generate" not in args.skip:
            # A fresh pair: training moved the Q-Former, and decoding re-lays the LLM's weights for the CPU.
            pair = build_pair(work / "model_x20", logit_scale=20.0)
            records.append(check_logits(pair, "generation copy, final LayerNorm x20"))
            records += generation_figures(pair, args.new_tokens, args.repeats)
    return records


if __name__ == "__main__":
    main()
