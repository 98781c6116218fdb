"""Image preprocessing: 640x480 RGB images to normalised 224x224 tensors, images/s of bridgevlm's
ImageProcessor vs `transformers`' CLIPImageProcessor (the PIL path, as there is no torchvision),
with the largest difference between their outputs.

    python benchmarks/bench_preprocess.py [--images 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE_SIZE, check, figure, interleaved, machine, setup  # noqa: E402

from bridgevlm.data.images import ImageProcessor  # noqa: E402


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like test images: smooth colour gradients with noise and a few solid shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    images = []
    for _ in range(count):
        base = np.stack([(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        for _ in range(5):
            r0, c0 = rng.integers(0, 400), rng.integers(0, 560)
            base[r0:r0 + 80, c0:c0 + 80] = rng.uniform(0, 255, 3)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy, "RGB"))
    return images


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    setup()
    print(f"machine: {machine()}", flush=True)
    images = photos(args.images)
    reference = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ours = ImageProcessor(size=IMAGE_SIZE)

    def run_reference():
        return reference(images=images, return_tensors="pt")["pixel_values"]

    def run_ours():
        return ours.normalize(torch.stack([ours.to_uint8(image) for image in images]))

    difference = (run_reference() - run_ours()).abs().max().item()
    records = [check("preprocessing matches CLIPImageProcessor within 0.02", difference <= 0.02,
                     f"max abs difference {difference:.2e}")]
    ref_s, our_s = interleaved(run_reference, run_ours, repeats=args.repeats)
    records.append(figure(f"preprocess 640x480 -> {IMAGE_SIZE}x{IMAGE_SIZE}", len(images) / ref_s,
                          len(images) / our_s, "images/s"))
    return records


if __name__ == "__main__":
    main()
