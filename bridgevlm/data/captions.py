"""Image-caption pairs (for contrastive training and retrieval) from LLaVA-format records or COCO captions."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .formats import DataFormatError, read_conversations
from .images import ImageProcessor, load_image


def caption_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(image path, caption) pairs from LLaVA pre-training records (the caption is the reply) or
    from a COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]},
    one pair per annotation)."""
    data = _read_json_object(path)
    if data is not None:
        return _coco_pairs(path, data)
    pairs = []
    for index, record in enumerate(read_conversations(path)):
        if "image" not in record:
            raise DataFormatError(f"{path}: sample {index} (id {record.get('id', '?')!r}) has no 'image'")
        replies = [m["value"] for m in record["conversations"] if m["from"] == "gpt"]
        if not replies:
            raise DataFormatError(f"{path}: sample {index} (id {record.get('id', '?')!r}) has no caption reply")
        pairs.append((record["image"], replies[0]))
    return pairs


class ImageCaptionDataset(Dataset):
    """Yields uint8 pixels (normalised per batch by the collator) and the tokenised caption."""

    def __init__(self, pairs: Sequence[tuple[str, str]], image_root: str | Path, tokenizer, processor: ImageProcessor,
                 max_text_length: int = 96, negatives: Callable[[str, int], str | None] | None = None):
        self.pairs, self.image_root = list(pairs), Path(image_root)
        self.tokenizer, self.processor, self.max_text_length = tokenizer, processor, max_text_length
        self.negatives = negatives  # caption, index -> a hard-negative caption or None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, caption = self.pairs[index]
        image = load_image(self.image_root / image_path, sample=str(index))
        sample = {"pixels": self.processor.to_uint8(image), "text_ids": encode_text(self.tokenizer, caption, self.max_text_length)}
        if self.negatives is not None:
            negative = self.negatives(caption, index)
            sample["negative_ids"] = encode_text(self.tokenizer, negative, self.max_text_length) if negative else None
        return sample


def encode_text(tokenizer, text: str, max_length: int) -> list[int]:
    """BOS + text + EOS, truncated to max_length with EOS kept last (CLIP pools at the EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 2]
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def pad_texts(texts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, texts))
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(texts):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@dataclass
class ImageCaptionCollator:
    processor: ImageProcessor
    pad_token_id: int

    def __call__(self, samples: Sequence[dict]) -> dict:
        ids, mask = pad_texts([s["text_ids"] for s in samples], self.pad_token_id)
        pixels = self.processor.normalize(torch.stack([s["pixels"] for s in samples]))
        batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
        if any("negative_ids" in s for s in samples):
            present = [s.get("negative_ids") is not None for s in samples]
            # A sample without a negative gets its own caption as a placeholder, masked out of the loss.
            texts = [s["negative_ids"] if ok else s["text_ids"] for s, ok in zip(samples, present)]
            batch["negative_input_ids"], batch["negative_attention_mask"] = pad_texts(texts, self.pad_token_id)
            batch["negative_present"] = torch.tensor(present)
        return batch


def _read_json_object(path: str | Path) -> dict | None:
    """The file's JSON if it is a single object (COCO style); None for a list or JSON lines (LLaVA style)."""
    path = Path(path)
    if path.suffix == ".jsonl" or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("{"):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})") from None


def _coco_pairs(path, data: dict) -> list[tuple[str, str]]:
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataFormatError(f"{path}: a JSON object must be a COCO captions file with 'images' and 'annotations' lists")
    files = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataFormatError(f"{path}: images[{index}] needs 'id' and 'file_name'")
        files[image["id"]] = image["file_name"]
    pairs = []
    for index, note in enumerate(data["annotations"]):
        if not isinstance(note, dict) or not isinstance(note.get("caption"), str):
            raise DataFormatError(f"{path}: annotations[{index}] needs a string 'caption'")
        if note.get("image_id") not in files:
            raise DataFormatError(f"{path}: annotations[{index}] refers to image_id {note.get('image_id')!r}, "
                                  "which is not in 'images'")
        pairs.append((files[note["image_id"]], note["caption"].strip()))
    return pairs
