"""Image loading with errors that name the file, and CLIP-style preprocessing in torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded; the message names the file and the sample."""


def load_image(path: str | Path, sample: str | None = None) -> Image.Image:
    """Open an image as RGB, or raise ImageLoadError naming the path (and sample, if given)."""
    where = f" (sample {sample})" if sample is not None else ""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}{where}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"cannot decode image {path}{where}: {error}") from None


@dataclass
class ImageProcessor:
    """Resize the shortest side (bicubic), centre-crop to a square, scale to [0, 1], normalise."""

    size: int = 96
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> [3, size, size] uint8."""
        width, height = image.size
        if (width, height) != (self.size, self.size):
            scale = self.size / min(width, height)
            image = image.resize((max(self.size, round(width * scale)), max(self.size, round(height * scale))),
                                 Image.BICUBIC)
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> normalised float [..., 3, H, W]; batched, so do it once per batch."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))
