"""Greedy generation of 64 new tokens from image + question prompts: new tokens/s at batch 1 and 8,
bridgevlm's `generate` vs `LlavaForConditionalGeneration.generate`, identical weights.

Checks: both sides produce the same tokens, and bridgevlm's left-padded batch produces what each
prompt produces alone.

    python benchmarks/bench_generate.py [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE_SIZE, build_pair, check, figure, interleaved, machine, setup, shapes_samples  # noqa: E402

from bridgevlm.data.templates import IGNORE_INDEX  # noqa: E402
from bridgevlm.infer.generate import GenerationConfig, generate, left_pad  # noqa: E402


def prompts(count: int) -> list[list[int]]:
    """Image + first question of Shapes conversations, cut before the first reply (varied lengths)."""
    out = []
    for sample in shapes_samples(count, seed=7):
        first_label = next(i for i, x in enumerate(sample["labels"]) if x != IGNORE_INDEX)
        out.append(sample["input_ids"][:first_label])
    return out


def reference_generate(model, ids, mask, pixels, new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1)
    return out[:, ids.shape[1]:].tolist()


def our_generate(loaded, ids, mask, pixels, new_tokens: int) -> list[list[int]]:
    model = loaded.model
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
    return generate(model.llm.model, embeds, mask, GenerationConfig(max_new_tokens=new_tokens),
                    eos_token_id=None).tokens


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setup()
    print(f"machine: {machine()}", flush=True)
    pair = build_pair(head_scale=20.0)  # decisive logits: greedy choices are not decided by float rounding
    pair.reference.generation_config.pad_token_id = 0
    n = args.new_tokens
    records = []
    all_prompts = prompts(8)
    generator = torch.Generator().manual_seed(0)
    all_pixels = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    for batch_size in (8, 1):
        ids, mask = left_pad(all_prompts[:batch_size], pad_id=0)
        pixels = all_pixels[:batch_size]
        ref_tokens = reference_generate(pair.reference, ids, mask, pixels, n)
        our_tokens = our_generate(pair.ours, ids, mask, pixels, n)
        records.append(check(f"greedy tokens equal the reference (batch {batch_size})", ref_tokens == our_tokens,
                             f"{sum(a == b for a, b in zip(ref_tokens, our_tokens))}/{batch_size} rows identical"))
        if batch_size > 1:
            alone = [our_generate(pair.ours, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                  all_pixels[i:i + 1], n)[0] for i, p in enumerate(all_prompts[:batch_size])]
            records.append(check("batched outputs equal one-at-a-time outputs", alone == our_tokens,
                                 f"{sum(a == b for a, b in zip(alone, our_tokens))}/{batch_size} rows identical"))
        ref_s, our_s = interleaved(lambda: reference_generate(pair.reference, ids, mask, pixels, n),
                                   lambda: our_generate(pair.ours, ids, mask, pixels, n), repeats=args.repeats)
        records.append(figure(f"generate {n} tokens greedy, batch {batch_size}", batch_size * n / ref_s,
                              batch_size * n / our_s, "new tokens/s"))
    return records


if __name__ == "__main__":
    main()
