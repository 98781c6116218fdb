"""Conversation data (LLaVA JSON records, with or without images): tokenised samples and their collation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .feature_cache import FeatureCache
from .images import ImageProcessor, load_image
from .instructions import InstructionTokenizer, image_instructions, pad_instructions
from .templates import (
    IGNORE_INDEX,
    IMAGE_TAG,
    ConversationError,
    ConversationTemplate,
    ImagePlaceholder,
    split_image_tags,
    tokenize_conversation,
)


@dataclass
class ImageSource:
    """Where a dataset's images come from and how they enter the token sequence."""

    folder: Path  # record["image"] paths are relative to it (absolute paths are used as they are)
    processor: ImageProcessor
    placeholder: ImagePlaceholder
    features: FeatureCache | None = None  # a filled cache of the frozen tower's features: read instead of pixels


def record_images(record: dict) -> list[str]:
    """The image paths of a record: LLaVA's `image` is a string, some datasets use a list."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def check_image_tags(records: Sequence[dict], images: ImageSource | None, error) -> None:
    """Every record's `<image>` tags must match its images one to one. `error(index, message)` makes
    the exception, naming the sample."""
    for index, record in enumerate(records):
        tags = sum(m.get("value", "").count(IMAGE_TAG) for m in record.get("conversations", []))
        count = len(record_images(record))
        if count and images is None:
            raise error(index, f"has {count} image(s) but this dataset was built without an image folder")
        if images is not None and tags != count:
            hint = ("add an '<image>\\n' tag to the first user turn" if count > tags else
                    "remove the tag or give the sample an 'image'")
            raise error(index, f"has {tags} {IMAGE_TAG} tag(s) but {count} image(s); {hint}")


def image_fields(record: dict, index: int, messages: Sequence[dict], images: ImageSource,
                 instructions: InstructionTokenizer | None, source: str) -> dict:
    """A sample's `sample_id` and the images whose tags `messages` (the record's conversation, or its
    beginning) hold, which are the record's first ones: uint8 `pixels` [n, 3, H, W], or `features`
    [n, N, Dv] from the feature cache, and with `instructions`, per image the Q-Former tokens of the
    turn holding its tag (`instruction_ids`)."""
    fields = {"sample_id": record.get("id", index)}
    paths = record_images(record)[:sum(m.get("value", "").count(IMAGE_TAG) for m in messages)]
    if paths and instructions is not None:  # one per image: tags and images match one to one
        fields["instruction_ids"] = [instructions.encode(text) for text in image_instructions(messages)]
    if paths and images.features is not None:
        fields["features"] = torch.stack([images.features.get(images.folder / p) for p in paths])
    elif paths:
        name = f"{index} (id {record.get('id', '?')!r}) of {source}"
        fields["pixels"] = torch.stack([images.processor.to_uint8(load_image(images.folder / p, sample=name))
                                        for p in paths])
    return fields


class ConversationDataset(Dataset):
    """Tokenised conversations, and their images (uint8 [n, 3, H, W]) when `images` is given.

    Only assistant replies are supervised unless `supervise_all` (plain language-model training on
    every token). Lazily by default (instant start-up; worker processes share the work). `pretokenize=True`
    tokenises every distinct text piece in one batched call up front, so the training loop needs no
    worker processes competing with it for the CPU. Images are always read lazily.

    Every record's `<image>` tags must match its images one to one: a tag without an image or an
    image without a tag fails at construction, naming the sample.

    With `instructions` (a connector that reads them, as InstructBLIP's Q-Former), a sample with
    images also carries `instruction_ids`: per image, in reading order, the Q-Former tokens of the
    turn holding its tag, without the tag (data/instructions.py).
    """

    def __init__(self, records: Sequence[dict], tokenizer, template: ConversationTemplate, max_length: int,
                 source: str = "<records>", pretokenize: bool = False, supervise_all: bool = False,
                 images: ImageSource | None = None, instructions: InstructionTokenizer | None = None):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.max_length, self.source, self.supervise_all = max_length, source, supervise_all
        self.images, self.instructions = images, instructions
        check_image_tags(records, images, self._error)
        self.samples: list[dict] | None = None
        if pretokenize:
            texts = sorted({piece for i in range(len(records)) for seg in self._segments(i) if seg.text
                            for piece in self._pieces(seg.text) if piece})
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            table = dict(zip(texts, ids))
            # int32 arrays, not lists of Python ints: a tenth of the memory for large corpora.
            self.samples = [{k: np.asarray(v, dtype=np.int32) for k, v in self._tokenize(i, table.__getitem__).items()}
                            for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Tokens per sample (exact when pretokenised, else estimated from the characters and the
        image placeholders): what length-grouped batching sorts by."""
        if self.samples is not None:
            return [len(s["input_ids"]) for s in self.samples]
        per_image = self.images.placeholder.count if self.images else 0
        return [sum(len(m.get("value", "")) for m in r.get("conversations", [])) // 4
                + per_image * len(record_images(r)) for r in self.records]

    def modalities(self) -> list[int]:
        """1 for samples with images, 0 for text-only ones (batches are grouped by modality too)."""
        return [int(bool(record_images(r))) for r in self.records]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index] if self.samples is not None else self._tokenize(index)
        if self.images is None:
            return sample
        record = self.records[index]
        return dict(sample, **image_fields(record, index, record["conversations"], self.images, self.instructions,
                                           self.source))

    def _pieces(self, text: str) -> list[str]:
        return [p for p in split_image_tags(text) if p] if self.images else [text]

    def _segments(self, index: int):
        try:
            return self.template.segments(self.records[index]["conversations"])
        except ConversationError as error:
            raise self._error(index, error) from None

    def _error(self, index: int, error: Exception | str) -> ConversationError:
        return ConversationError(f"{self.source}: sample {index} (id {self.records[index].get('id', '?')!r}): {error}")

    def _tokenize(self, index: int, encode=None) -> dict:
        record = self.records[index]
        try:
            sample = tokenize_conversation(self.tokenizer, self.template, record["conversations"], self.max_length,
                                           encode=encode,
                                           image_placeholder=self.images.placeholder if self.images else None)
        except ConversationError as error:
            raise self._error(index, error) from None
        if self.images is not None and sample.num_images != len(record_images(record)):
            raise self._error(index, f"the {self.template.name!r} template keeps {sample.num_images} of "
                                     f"{len(record_images(record))} image tag(s)")
        if self.supervise_all:  # language-model pretraining on every token, prompts included
            return {"input_ids": sample.input_ids, "labels": list(sample.input_ids)}
        return {"input_ids": sample.input_ids, "labels": sample.labels}

    def supervision_report(self) -> dict:
        """Share of supervised tokens over the dataset; fails loudly on any sample with none."""
        tokens = supervised = 0
        for index in range(len(self)):
            sample = self.samples[index] if self.samples is not None else self._tokenize(index)
            labels = np.asarray(sample["labels"])
            count = int((labels[1:] != IGNORE_INDEX).sum())  # the first token is never a target
            if count == 0:
                raise self._error(index, "has no supervised token after tokenisation; the loss would be zero")
            tokens += len(labels)
            supervised += count
        return {"samples": len(self), "tokens": tokens, "supervised_tokens": supervised,
                "supervised_share": supervised / max(tokens, 1)}


@dataclass
class PadCollator:
    """Right-pads a batch for training; labels are padded with IGNORE_INDEX.

    With a `processor`, the samples' images are concatenated in reading order and normalised in
    one batched call as `pixel_values` [I, 3, H, W] (or, from a feature cache, concatenated as
    `vision_features` [I, N, D]); `sample_ids` lets errors name samples. Samples' `instruction_ids`
    (one per image) become `qformer_input_ids` / `qformer_attention_mask` [I, Tq] in the same order,
    right-padded with `instruction_pad_token_id`."""

    pad_token_id: int
    processor: ImageProcessor | None = None
    instruction_pad_token_id: int = 0

    def __call__(self, samples: Sequence[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n] = torch.as_tensor(sample["input_ids"])
            labels[row, :n] = torch.as_tensor(sample["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.processor is not None:
            pixels = [s["pixels"] for s in samples if "pixels" in s]
            if pixels:
                batch["pixel_values"] = self.processor.normalize(torch.cat(pixels))
            features = [s["features"] for s in samples if "features" in s]
            if features:
                batch["vision_features"] = torch.cat(features)
            batch["sample_ids"] = [s.get("sample_id", row) for row, s in enumerate(samples)]
        instructions = [ids for s in samples for ids in s.get("instruction_ids", [])]
        if instructions:
            batch.update(pad_instructions(instructions, self.instruction_pad_token_id))
        return batch
