"""A stage's training data: one conversation file, or a mixture of several (InstructBLIP).

A mixture draws dataset d with probability ∝ weight_d·√S_d (data/mixing.py); each source may open
every user turn with a fixed prefix, which is how the `[Task:Dataset]` multitask baseline is made
from the same files as instruction tuning.

A causal LLM trains on tokenised conversations; an encoder-decoder one (FlanT5) on prefix-LM samples
(data/prefix_lm_dataset.py) built from the same files.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from ..data.conversations import ConversationDataset, ImageSource, record_images
from ..data.prefix_lm_dataset import PrefixLmDataset
from ..data.formats import read_conversations
from ..data.mixing import DatasetMix, MixtureSampler
from ..data.task_prefix import prefix_user_turns
from ..train.distributed import DistContext


@dataclass
class DataSource:
    """One dataset of a stage's mixture."""

    name: str = ""
    path: str = ""  # LLaVA-format conversations (JSON list or JSONL)
    image_folder: str | None = None  # None: the stage's image_folder
    weight: float = 1.0  # multiplies √size in the mixture's sampling probability
    prefix: str = ""  # opens every user turn, e.g. "[VQA:VQAv2]" (InstructBLIP's multitask baseline)


@dataclass
class StageData:
    path: str = ""  # LLaVA-format conversations (JSON list or JSONL)
    image_folder: str = ""  # `image` paths are relative to it
    # Several datasets instead of `path`, drawn with probability ∝ weight·√size (InstructBLIP's mixing)
    sources: list[DataSource] = field(default_factory=list)
    mix_seed: int = 0
    samples_per_epoch: int | None = None  # draws per epoch from a mixture; None: the sources' total size
    template: str | None = None  # None: the model's template (stage 1 of LLaVA uses `plain`)
    max_length: int = 2048  # longer samples lose trailing exchanges (a first exchange that does not fit is an error)
    pretokenize: bool = True


@dataclass
class SourceRecords:
    source: DataSource  # with its image folder resolved
    records: list[dict]  # prefixed as the source asks

    def image_paths(self) -> list[str]:
        folder = Path(self.source.image_folder)
        return [str(folder / p) for record in self.records for p in record_images(record)]


def read_sources(data: StageData, stage_name: str) -> list[SourceRecords]:
    """The stage's datasets, read and checked: `path` alone, or every entry of `sources`."""
    if data.sources and data.path:
        raise ValueError(f"stage {stage_name!r}: data.path and data.sources are both set; give one "
                         f"(a single file as path, or a mixture as sources)")
    if not data.sources and not data.path:
        raise ValueError(f"stage {stage_name!r}: no data; set data.path or data.sources")
    sources = data.sources or [DataSource(name=Path(data.path).stem, path=data.path)]
    names = [s.name for s in sources]
    for index, source in enumerate(sources):
        if not source.name or not source.path:
            raise ValueError(f"stage {stage_name!r}: data.sources[{index}] needs a name and a path")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"stage {stage_name!r}: data.sources repeat the name(s) {', '.join(repeated)}; "
                         f"names must be unique (they key the mixture's weights)")
    resolved = [replace(s, image_folder=data.image_folder if s.image_folder is None else s.image_folder)
                for s in sources]
    return [SourceRecords(s, prefix_user_turns(read_conversations(s.path), s.prefix)) for s in resolved]


@dataclass
class StageDataset:
    dataset: Dataset
    sampler: MixtureSampler | None  # None: the training loop's default sampler over `dataset`
    report: dict  # supervision share, overall and per source


class EpochConcatDataset(ConcatDataset):
    """A ConcatDataset that passes `set_epoch` on to its parts (prefix-LM caption splits depend on it)."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


def build_stage_dataset(data: StageData, sources: list[SourceRecords], tokenizer, template, processor,
                        placeholder, feature_cache, instructions, dist: DistContext, encoder_decoder: bool = False,
                        seed: int = 0) -> StageDataset:
    """Tokenised datasets, one per source; several are concatenated and drawn by a MixtureSampler.
    `encoder_decoder`: prefix-LM samples, whose random caption splits are drawn from `seed`."""
    def part(source: SourceRecords) -> Dataset:
        images = ImageSource(Path(source.source.image_folder), processor, placeholder, feature_cache)
        if encoder_decoder:
            return PrefixLmDataset(source.records, tokenizer, template, data.max_length, source=source.source.path,
                                   seed=seed, pretokenize=data.pretokenize, images=images, instructions=instructions)
        return ConversationDataset(source.records, tokenizer, template, data.max_length, source=source.source.path,
                                   pretokenize=data.pretokenize, instructions=instructions, images=images)

    parts = [part(s) for s in sources]
    reports = {s.source.name: part.supervision_report() for s, part in zip(sources, parts)}
    tokens = sum(r["tokens"] for r in reports.values())
    supervised = sum(r["supervised_tokens"] for r in reports.values())
    report = {"samples": sum(r["samples"] for r in reports.values()), "tokens": tokens,
              "supervised_tokens": supervised, "supervised_share": supervised / max(tokens, 1)}
    if not data.sources:
        return StageDataset(parts[0], None, report)
    mix = DatasetMix(weights={s.source.name: s.source.weight for s in sources}, seed=data.mix_seed,
                     samples_per_epoch=data.samples_per_epoch)
    sampler = MixtureSampler({name: r["samples"] for name, r in reports.items()}, mix, dist.rank, dist.world_size)
    report["sources"] = {name: {**r, "probability": float(p)}
                         for (name, r), p in zip(reports.items(), sampler.probabilities)}
    return StageDataset(EpochConcatDataset(parts), sampler, report)
