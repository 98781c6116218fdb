"""Stage 1 (only the connector trains; vision tower and LLM frozen): seconds per epoch over image
files, bridgevlm with its vision-feature cache vs `transformers`' Llava, identical weights.

The reference epoch does what a Llava training script does every epoch: open each JPEG, run
CLIPImageProcessor, encode with the tower, train. bridgevlm's first epoch fills the cache (decode,
preprocess and encode each image once) and trains; every later epoch reads the features from the
memory-mapped cache. Check: a training step from the cache gives the reference's loss.

    python benchmarks/bench_stage1.py [--samples 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import photos  # noqa: E402
from common import (IMAGE_SIZE, IMAGE_TOKEN_ID, IMAGE_TOKENS, build_pair, check, figure, machine,  # noqa: E402
                    pad_samples, setup)

from bridgevlm.data.feature_cache import FeatureCache  # noqa: E402
from bridgevlm.data.images import load_image  # noqa: E402
from bridgevlm.data.templates import IGNORE_INDEX  # noqa: E402


def caption_samples(paths: list[str], seed: int = 0) -> list[dict]:
    """LLaVA-pretrain-like samples: the image, then a short caption (median 14 tokens), supervised."""
    rng = np.random.default_rng(seed)
    samples = []
    for path in paths:
        caption = rng.integers(3, IMAGE_TOKEN_ID, int(np.clip(rng.lognormal(np.log(14), 0.5), 4, 64))).tolist() + [2]
        ids = [1] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + caption
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (1 + IMAGE_TOKENS) + caption, "image": path})
    return samples


def only_connector(model, connector_prefix: str) -> torch.optim.Optimizer:
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(connector_prefix)
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def reference_epoch(model, optimizer, processor, samples, batch_size) -> float:
    losses = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = pad_samples(chunk)
        batch["pixel_values"] = processor(images=[load_image(s["image"]) for s in chunk], return_tensors="pt")["pixel_values"]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses[0]


def our_epoch(model, optimizer, cache, samples, batch_size) -> float:
    losses = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = pad_samples(chunk)
        batch["vision_features"] = torch.stack([cache.get(s["image"]) for s in chunk])
        out = model(batch)
        loss = out.loss_sum / out.num_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses[0]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    setup()
    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bridgevlm_bench_stage1_"))
    paths = []
    for i, image in enumerate(photos(args.samples, seed=3)):
        paths.append(str(work / f"{i:04d}.jpg"))
        image.save(paths[-1], quality=90)
    samples = caption_samples(paths)
    pair = build_pair()
    ours = pair.ours
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ref_opt = only_connector(pair.reference, "model.multi_modal_projector.")
    our_opt = only_connector(ours.model, "connector.")

    start = time.perf_counter()
    cache = FeatureCache.for_tower(work / "cache", ours.model.vision, ours.processor)
    cache.fill(paths, ours.model.vision, ours.processor, batch_size=args.batch, progress=False)
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    ref_first = reference_epoch(pair.reference, ref_opt, processor, samples, args.batch)
    ref_epoch_1 = time.perf_counter() - start
    start = time.perf_counter()
    our_first = our_epoch(ours.model, our_opt, cache, samples, args.batch)
    our_epoch_1 = fill_s + time.perf_counter() - start
    records = [check("stage-1 loss at step 0 (cached features vs reference pixels)", abs(our_first - ref_first) <= 2e-4,
                     f"reference {ref_first:.6f}, bridgevlm {our_first:.6f} (torch vs PIL resize: within 0.02 per pixel)")]
    ref_times, our_times = [], []
    for _ in range(2):  # later epochs, interleaved
        start = time.perf_counter()
        reference_epoch(pair.reference, ref_opt, processor, samples, args.batch)
        ref_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        our_epoch(ours.model, our_opt, cache, samples, args.batch)
        our_times.append(time.perf_counter() - start)
    records.append(figure(f"stage-1 first epoch ({args.samples} images, cache filled)", ref_epoch_1, our_epoch_1,
                          "s", higher_is_better=False))
    ref_later, our_later = min(ref_times), min(our_times)
    records.append(figure(f"stage-1 later epochs ({args.samples} images)", args.samples / ref_later,
                          args.samples / our_later, "samples/s"))
    return records


if __name__ == "__main__":
    main()
