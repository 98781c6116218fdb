"""A disk cache of a frozen vision tower's selected features, one row per distinct image.

While the tower is frozen (LLaVA's stage 1, BLIP-2's and InstructBLIP's Q-Former stages, CROME's
adapter stage), every epoch would decode, preprocess and encode the same images again. The cache
does it once: rows live in one memory-mapped float32 file, indexed by the image file's content
hash, under a directory named by a fingerprint of the tower (config, feature layer, selection,
weights) and of the image preprocessing. Changing the weights or the preprocessing changes the
fingerprint, so stale features are never read; an edited image gets a new content hash.

Layout of `<root>/<fingerprint>/`: `features.f32` (rows of [tokens, dim] float32, appended),
`index.json` (content hash -> row, replaced atomically after the rows it names are written) and
`meta.json` (shape and what the fingerprint covers). Rows past the index (an interrupted fill) are
overwritten by the next fill.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import write_json
from ..models.vision import VisionTower
from .images import ImageProcessor, load_image

FEATURES, INDEX, META = "features.f32", "index.json", "meta.json"


def content_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tower_fingerprint(tower: VisionTower, processor: ImageProcessor) -> str:
    """Hash of everything that determines a feature: the tower's config, layer, selection and
    weights, and the preprocessing settings."""
    digest = hashlib.sha256()
    digest.update(tower.vision_config.to_json_string(use_diff=False).encode())
    digest.update(json.dumps([tower.feature_layer, tower.select, dataclasses.asdict(processor)]).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Cached features of one tower + preprocessing; `fill` computes what is missing, `get` reads."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._index: dict[str, int] | None = None
        self._keys: dict[str, str] = {}  # image path -> content hash, remembered from fill()
        self._rows: np.memmap | None = None

    @classmethod
    def for_tower(cls, root: str | Path, tower: VisionTower, processor: ImageProcessor) -> FeatureCache:
        return cls(Path(root) / tower_fingerprint(tower, processor))

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            path = self.directory / INDEX
            self._index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return self._index

    def _shape(self) -> tuple[int, int]:
        meta = json.loads((self.directory / META).read_text(encoding="utf-8"))
        return meta["tokens"], meta["dim"]

    @torch.no_grad()
    def fill(self, paths: Sequence[str | Path], tower: VisionTower, processor: ImageProcessor,
             batch_size: int = 32, progress: bool = True) -> int:
        """Encode every image in `paths` not cached yet; returns how many were encoded."""
        keys = {str(p): content_hash(p) if Path(p).is_file() else None for p in paths}
        missing = [p for p, key in keys.items() if key is None]
        if missing:
            load_image(missing[0])  # raises the usual error naming the file
        self._keys.update(keys)
        todo: dict[str, str] = {}  # one path per content hash not cached yet
        queued: set[str] = set()
        for path, key in keys.items():
            if key not in self.index and key not in queued:
                todo[path] = key
                queued.add(key)
        if not todo:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        index = dict(self.index)
        was_training = tower.training
        tower.eval()
        device = next(tower.parameters()).device
        items = list(todo.items())
        with open(self.directory / FEATURES, "r+b" if (self.directory / FEATURES).exists() else "wb") as out:
            row = len(index)
            for start in tqdm(range(0, len(items), batch_size), desc="caching vision features", unit="batch",
                              disable=not progress):
                chunk = items[start:start + batch_size]
                pixels = processor.batch([load_image(p) for p, _ in chunk])
                features = tower(pixels.to(device)).float().cpu().numpy()  # [B, N, D]
                if start == 0:
                    write_json(self.directory / META, {"tokens": features.shape[1], "dim": features.shape[2],
                                                       "dtype": "float32"})
                out.seek(row * features[0].nbytes)
                out.write(np.ascontiguousarray(features).tobytes())
                for _, key in chunk:
                    index[key] = row
                    row += 1
            out.truncate(row * features[0].nbytes)
            out.flush()
            os.fsync(out.fileno())
        tower.train(was_training)
        write_json(self.directory / INDEX, index)  # last: the rows it names are on disk
        self._index, self._rows = index, None
        return len(todo)

    def get(self, path: str | Path) -> torch.Tensor:
        """Features [tokens, dim] of an image cached by `fill`."""
        key = self._keys.get(str(path))
        if key is None:  # a process that did not fill the cache hashes each file once
            key = self._keys[str(path)] = content_hash(path)
        row = self.index.get(key)
        if row is None:
            raise KeyError(f"{path} is not in the feature cache {self.directory}; fill the cache with it first")
        if self._rows is None or row >= self._rows.shape[0]:
            tokens, dim = self._shape()
            self._rows = np.memmap(self.directory / FEATURES, dtype=np.float32, mode="r",
                                   shape=(len(self.index), tokens, dim))
        return torch.from_numpy(np.array(self._rows[row]))
