"""Helpers shared by the in-LLM connector tests (Partial LoRA, Flamingo): token ids with image
placeholders, random pixels and images, and the bare LLM to compare against."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

IMAGE = object()  # stands for one image's placeholders in `token_ids`


def token_ids(loaded, *pieces) -> list[int]:
    """Text pieces tokenised without special tokens, IMAGE pieces as one image's placeholders."""
    ids = []
    for piece in pieces:
        if piece is IMAGE:
            ids += [loaded.model.image_token_id] * loaded.model.num_image_tokens
        else:
            ids += loaded.tokenizer(piece, add_special_tokens=False).input_ids
    return ids


def random_pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def base_llm(parts) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(parts["llm"]).eval()
