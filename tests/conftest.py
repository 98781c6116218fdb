"""Shared fixtures: a small byte-level BPE tokenizer trained once per session."""
from __future__ import annotations

import pytest

from bridgevlm.data.templates import VICUNA_SYSTEM
from bridgevlm.models.tokenizer import train_tokenizer

CORPUS = [
    VICUNA_SYSTEM,
    "USER: <image>\nWhat colour is the circle? ASSISTANT: red",
    "USER: How many squares are there? ASSISTANT: 2",
    "There are 3 objects. A large red circle at the top left. A small blue square at the middle center.",
    "A small green triangle at the bottom right. The word cat is written at the top center.",
    "Is there a yellow diamond? yes no. Where is the purple star? orange objects.",
    "a photo of a {}. hello world, the quick brown fox jumps over the lazy dog.",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread; with the cores shared with other jobs, OpenMP's
    spin-waiting across two threads can make a millisecond step take most of a second."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
