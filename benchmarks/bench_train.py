"""Stage-2 training (connector + LLM trained, vision frozen): supervised tokens/s, bridgevlm vs
`transformers`' Llava with identical weights, on the same samples; plus the peak memory of a
training step (each side alone in a fresh process) and model-FLOP utilisation.

The reference trains as a user of `LlavaForConditionalGeneration` does: shuffled batches padded to
their longest sample, `labels` passed to the model. bridgevlm runs its own training path:
`VisionLanguageModel.forward` (LM head and loss only where labels exist) on length-grouped batches.

    python benchmarks/bench_train.py [--samples 48] [--batch 8]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (IMAGE_SIZE, IMAGE_TOKENS, build_pair, check, figure, interleaved, llava_like_samples,  # noqa: E402
                    machine, matmul_peak_flops, our_step, pad_samples, reference_config, reference_step, setup,
                    shapes_samples, supervised_tokens)

from bridgevlm.data.templates import IGNORE_INDEX  # noqa: E402
from bridgevlm.train.sampler import LengthGrouping, ResumableSampler  # noqa: E402


def pad_batch(samples: list[dict], seed: int) -> dict:
    """Right-padded ids/labels/mask and one random image per image-bearing sample."""
    batch = pad_samples(samples)
    images = sum(s["images"] for s in samples)
    generator = torch.Generator().manual_seed(seed)
    if images:
        batch["pixel_values"] = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return batch


def batches(samples: list[dict], batch_size: int, grouped: bool, seed: int = 0) -> list[dict]:
    grouping = None
    if grouped:
        grouping = LengthGrouping([len(s["input_ids"]) for s in samples], [s["images"] for s in samples], batch_size)
    order = ResumableSampler(len(samples), seed=seed, grouping=grouping).indices()
    return [pad_batch([samples[i] for i in order[k:k + batch_size]], seed + k) for k in range(0, len(order), batch_size)]


def freeze_vision_train_rest(model, vision_name: str) -> torch.optim.Optimizer:
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(vision_name)
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def training_flops(samples: list[dict]) -> float:
    """Model FLOPs of one pass over `samples` (padding excluded), PaLM-style, per sample of T tokens:
    LLM layers 6*N_llm*T + 6*L*d*T^2 (causal attention, forward and backward); LM head 6*d*V per
    supervised token; connector 6*N_conn per image token; frozen vision forward only,
    2*N_vis*P + 2*L_v*d_v*P^2 per image (P = patches + CLS). Embedding look-ups are free."""
    cfg = reference_config()
    t, v = cfg.text_config, cfg.vision_config
    n_llm = t.num_hidden_layers * (4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size)
    n_conn = v.hidden_size * t.hidden_size + t.hidden_size ** 2
    n_vis = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    patches = IMAGE_TOKENS + 1
    total = 0.0
    for s in samples:
        tokens = len(s["input_ids"])
        total += 6 * n_llm * tokens + 6 * t.num_hidden_layers * t.hidden_size * tokens ** 2
        total += 6 * t.hidden_size * t.vocab_size * sum(1 for x in s["labels"][1:] if x != IGNORE_INDEX)
        total += s["images"] * (6 * n_conn * IMAGE_TOKENS + 2 * n_vis * patches
                                + 2 * v.num_hidden_layers * v.hidden_size * patches ** 2)
    return total


def epoch_figures(pair, name: str, samples: list[dict], batch_size: int, peak: float) -> list[dict]:
    ref_opt = freeze_vision_train_rest(pair.reference, "model.vision_tower.")
    our_model = pair.ours.model
    our_opt = freeze_vision_train_rest(our_model, "vision.")
    ref_batches = batches(samples, batch_size, grouped=False)
    our_batches = batches(samples, batch_size, grouped=True)
    ref_s, our_s = interleaved(lambda: [reference_step(pair.reference, ref_opt, b) for b in ref_batches],
                               lambda: [our_step(our_model, our_opt, b) for b in our_batches], repeats=1, warmup=0)
    targets = supervised_tokens(samples)
    records = [figure(f"train stage-2 {name} (batch {batch_size}, {len(samples)} samples)",
                      targets / ref_s, targets / our_s, "supervised tokens/s")]
    flops = training_flops(samples)
    records.append(figure(f"train stage-2 {name} model FLOP/s as a fraction of the matmul peak "
                          f"({peak / 1e9:.0f} GFLOP/s)", flops / ref_s / peak, flops / our_s / peak, "of peak"))
    return records


# --- peak memory: each side alone in a fresh process -------------------------------------------

def _resident_peak_reset() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)


def _resident_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory_child(side: str, directory: str, batch_size: int) -> None:
    """Peak RSS over three training steps of batch `batch_size` (256 image + 128 text tokens each)."""
    setup()
    if side == "reference":
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        optimizer, step = freeze_vision_train_rest(model, "model.vision_tower."), reference_step
    else:
        from bridgevlm.convert.llava import import_llava
        model = import_llava(directory).model
        optimizer, step = freeze_vision_train_rest(model, "vision."), our_step
    samples = [{"input_ids": [1] + [reference_config().image_token_id] * IMAGE_TOKENS + list(range(3, 131)),
                "labels": [IGNORE_INDEX] * (1 + IMAGE_TOKENS + 64) + list(range(67, 131)), "images": 1}] * batch_size
    batch = pad_batch(samples, 0)
    _resident_peak_reset()
    for _ in range(3):
        step(model, optimizer, batch)
    print(json.dumps({"peak_rss": _resident_peak_bytes()}))


def peak_memory(directory: Path, batch_size: int) -> dict:
    peaks = {}
    for side in ("reference", "ours"):
        out = subprocess.run([sys.executable, __file__, "--peak-memory-child", side, "--dir", str(directory),
                              "--batch", str(batch_size)], capture_output=True, text=True, check=True)
        peaks[side] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
    return figure(f"train step peak RSS (batch {batch_size}, 256 image + 128 text tokens)",
                  peaks["reference"] / 2 ** 30, peaks["ours"] / 2 ** 30, "GiB", higher_is_better=False)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48, help="samples per data set (one epoch each side)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--peak-memory-child", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child, args.dir, args.batch)
        return []
    setup()
    print(f"machine: {machine()}", flush=True)
    pair = build_pair()
    records = []

    # Equivalence: the same loss on the same batch before any update.
    batch = batches(shapes_samples(args.batch, seed=99), args.batch, grouped=False)[0]
    with torch.no_grad():
        ref_loss = pair.reference(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}).loss
        out = pair.ours.model(batch)
    ours = (out.loss_sum / out.num_targets).item()
    records.append(check("train loss at step 0", abs(ours - ref_loss.item()) <= 1e-5,
                         f"reference {ref_loss.item():.7f}, bridgevlm {ours:.7f}"))

    peak = matmul_peak_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (2048^3 fp32)", flush=True)
    records += epoch_figures(pair, "Shapes world", shapes_samples(args.samples, seed=1), args.batch, peak)
    records += epoch_figures(pair, "LLaVA-like lengths", llava_like_samples(args.samples, seed=1), args.batch, peak)
    directory = pair.directory
    del pair
    gc.collect()
    records.append(peak_memory(directory, args.batch))
    return records


if __name__ == "__main__":
    main()
