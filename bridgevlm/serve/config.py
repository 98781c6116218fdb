"""What a server allows and how hard it works: `bridgevlm serve` options, one dataclass."""
from __future__ import annotations

from dataclasses import dataclass

MIB = 2 ** 20


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only unless asked: the API has no authentication
    port: int = 8000
    model_name: str | None = None  # the id clients send as `model`; None: the model directory's name
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting for a slot before new ones get 503
    request_timeout_s: float = 300.0  # queueing and generation together
    max_body_bytes: int = 20 * MIB
    max_image_bytes: int = 10 * MIB  # one image, encoded
    max_image_pixels: int = 4096 * 4096  # one image, decoded (a small file can decode to a huge bitmap)
    max_images: int = 8  # per request
    local_image_root: str | None = None  # file paths as image URLs are read only under this directory
    allow_remote_images: bool = False  # fetch http(s) image URLs
    remote_timeout_s: float = 10.0
    default_max_tokens: int = 256
    max_choices: int = 8  # the most `n` a request may ask for

    def check(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images",
                     "default_max_tokens", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve option {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.request_timeout_s <= 0:
            raise ValueError("serve options max_queue must be >= 0 and request_timeout_s > 0")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
