"""Helpers shared by the in-LLM connector tests (Partial LoRA, Flamingo): token ids with image
placeholders, random pixels and images, and the bare LLM to compare against."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from bridgevlm.infer.generate import left_pad

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


def connector_grads_plain_and_checkpointed(loaded) -> tuple[dict, dict]:
    """The connector's gradients on a two-row image batch, without and with activation checkpointing
    (which recomputes each layer's forward during backward, where the in-LLM context must hold again)."""
    model = loaded.model.train()
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is it? red"), token_ids(loaded, "hi", IMAGE, "ok")], 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids, "pixel_values": random_pixels(2)}

    def grads():
        model.zero_grad()
        model(batch).loss_sum.backward()
        return {n: p.grad.clone() for n, p in model.connector.named_parameters() if p.grad is not None}

    plain = grads()
    model.llm.set_activation_checkpointing(True)
    checkpointed = grads()
    model.llm.set_activation_checkpointing(False)
    return plain, checkpointed
