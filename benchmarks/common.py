"""What every benchmark shares: the reference model built both ways, the data, timing and printing.

The reference is `transformers`' LlavaForConditionalGeneration; bridgevlm's model is imported from
the same saved directory (`import_llava`), so both hold identical weights and compute the same
function. Each figure is measured in one process with the two sides interleaved, so machine noise
hits both alike, and printed as one line ending in the ratio bridgevlm / reference.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from bridgevlm.convert.llava import import_llava
from bridgevlm.data.images import ImageProcessor
from bridgevlm.data.shapes.families import HELD_IN
from bridgevlm.data.shapes.scene import sample_scene
from bridgevlm.data.shapes.world import conversation
from bridgevlm.data.templates import IGNORE_INDEX, ImagePlaceholder, get_template, tokenize_conversation
from bridgevlm.models.assemble import LoadedVlm

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TOKENIZER = ROOT / "bridgevlm" / "assets" / "backbones" / "tokenizer"
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
VOCAB = 32000
IMAGE_TOKEN_ID = VOCAB - 1  # the last id is the image placeholder (HF Llava embeds every input id)
IMAGE_SIZE, PATCH = 224, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 256: the "default" strategy drops CLS


def setup(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def reference_config() -> LlavaConfig:
    """The issue's tiny-but-realistic LLaVA: CLIP 224 px / patch 14 / 256-d / 4 layers; Llama 512-d,
    6 layers, 8 heads, FFN 1376, 32000-token vocabulary."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=256,
                                       intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE_TOKEN_ID, image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")


@dataclass
class Pair:
    reference: LlavaForConditionalGeneration
    ours: LoadedVlm
    directory: Path


def build_pair(seed: int = 0, directory: str | Path | None = None, head_scale: float = 1.0) -> Pair:
    """The reference model with seeded random weights, saved, and bridgevlm's import of it.
    `head_scale` multiplies the LM head (larger logits make greedy choices robust to rounding)."""
    torch.manual_seed(seed)
    reference = LlavaForConditionalGeneration(reference_config()).eval()
    with torch.no_grad():
        reference.lm_head.weight.mul_(head_scale)
    directory = Path(directory or tempfile.mkdtemp(prefix="bridgevlm_bench_"))
    reference.save_pretrained(directory)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(directory)
    ImageProcessor(size=IMAGE_SIZE).save_pretrained(directory)
    ours = import_llava(directory)
    ours.model.eval()  # as the reference: dropout off (training benchmarks switch both to train mode)
    return Pair(reference, ours, directory)


# --- data --------------------------------------------------------------------------------------

def shapes_samples(count: int, seed: int = 0, turns: tuple[int, int] = (1, 6)) -> list[dict]:
    """Stage-2 samples from the Shapes world: multi-turn conversations about one image, tokenised
    with the shipped tokenizer and vicuna_v1 (ids fall inside the 32000-token vocabulary)."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    template = get_template("vicuna_v1")
    placeholder = ImagePlaceholder(IMAGE_TOKEN_ID, IMAGE_TOKENS)
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < count:
        scene = sample_scene(rng, f"bench_{len(samples)}", "train", 0.35)
        n_turns = int(rng.integers(turns[0], turns[1] + 1))
        messages = conversation(scene, rng, HELD_IN, n_turns, "<image>")
        tokens = tokenize_conversation(tokenizer, template, messages, image_placeholder=placeholder)
        samples.append({"input_ids": list(tokens.input_ids), "labels": list(tokens.labels), "images": 1})
    return samples


def llava_like_samples(count: int, seed: int = 0, max_length: int = 1024) -> list[dict]:
    """Samples whose lengths follow a LLaVA-665k-like mix: 1-6 exchanges of short questions
    (log-normal, median 16 tokens) and longer answers (median 48, heavy tail); 10% text-only.
    Token ids are random: only lengths and supervision matter for speed."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        has_image = rng.random() >= 0.1
        ids = [1] + ([IMAGE_TOKEN_ID] * IMAGE_TOKENS if has_image else [])
        labels = [IGNORE_INDEX] * len(ids)
        for _ in range(int(rng.integers(1, 7))):
            q = int(np.clip(rng.lognormal(np.log(16), 0.6), 3, 200))
            a = int(np.clip(rng.lognormal(np.log(48), 0.9), 1, 400))
            if len(ids) + q + a + 1 > max_length:
                break
            ids += rng.integers(3, IMAGE_TOKEN_ID, q).tolist()
            labels += [IGNORE_INDEX] * q
            answer = rng.integers(3, IMAGE_TOKEN_ID, a).tolist() + [2]
            ids += answer
            labels += answer
        samples.append({"input_ids": ids, "labels": labels, "images": int(has_image)})
    return samples


def pad_samples(samples: list[dict]) -> dict:
    """Right-padded input_ids / labels / attention_mask [B, T], as a training collator makes them."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def supervised_tokens(samples: list[dict]) -> int:
    """Targets a causal LM trains on: labelled positions after the first."""
    return sum(sum(1 for label in s["labels"][1:] if label != IGNORE_INDEX) for s in samples)


# --- timing and printing -------------------------------------------------------------------------

def interleaved(reference: Callable[[], object], ours: Callable[[], object], repeats: int = 3,
                warmup: int = 1) -> tuple[float, float]:
    """Median seconds of each callable, run alternately so drifts in machine speed hit both alike."""
    for _ in range(warmup):
        reference()
        ours()
    ref_times, our_times = [], []
    for _ in range(repeats):
        for fn, times in ((reference, ref_times), (ours, our_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ref_times), statistics.median(our_times)


def figure(name: str, reference: float, ours: float, unit: str, higher_is_better: bool = True) -> dict:
    """Print one line `name: reference X unit, bridgevlm Y unit, ratio R` and return it as a record.
    The ratio is always bridgevlm / reference: above 1 is better for rates, below 1 for costs."""
    ratio = ours / reference
    better = "higher" if higher_is_better else "lower"
    print(f"{name}: reference {reference:.4g} {unit}, bridgevlm {ours:.4g} {unit} "
          f"({better} is better), ratio {ratio:.2f}", flush=True)
    return {"name": name, "reference": reference, "ours": ours, "unit": unit, "ratio": ratio}


def check(name: str, ok: bool, detail: str) -> dict:
    print(f"check {name}: {'PASS' if ok else 'FAIL'} ({detail})", flush=True)
    return {"check": name, "ok": bool(ok), "detail": detail}


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s at this thread count: the denominator of model-FLOP utilisation."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {THREADS} threads, "
            f"torch {torch.__version__}, {platform.platform()}")


def reference_step(model, optimizer, batch: dict) -> float:
    """One training step as a user of a transformers model takes it: `labels` passed, `.loss` back."""
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values") if k in batch}).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def our_step(model, optimizer, batch: dict) -> float:
    """One training step on bridgevlm's path: the summed loss over supervised tokens, averaged."""
    out = model(batch)
    loss = out.loss_sum / out.num_targets
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
