"""Images named by a chat request: `data:` URLs, files under the allowed local root, and (only when
enabled) http(s) URLs; each checked for size before and after decoding.

Nothing here logs or echoes image bytes: errors name the message part and say what is wrong.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .config import ServeConfig


class ImageRefused(ValueError):
    """An image the server will not read; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _decode_data_url(url: str, where: str, cfg: ServeConfig) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageRefused(f"{where}: a data URL must look like data:image/png;base64,<data>")
    if len(payload) * 3 // 4 > cfg.max_image_bytes:
        raise ImageRefused(f"{where}: the image is larger than {cfg.max_image_bytes} bytes", status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused(f"{where}: the data URL's payload is not valid base64") from None


def _read_local(url: str, where: str, cfg: ServeConfig) -> bytes:
    if cfg.local_image_root is None:
        raise ImageRefused(f"{where}: local image paths are not enabled on this server (start it with "
                           f"--image-root DIR to allow files under DIR); send the image as a data: URL", status=403)
    root = Path(cfg.local_image_root).resolve()
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    path = (root / raw).resolve()  # an absolute `raw` stays absolute; symlinks and .. are resolved first
    if not path.is_relative_to(root):
        raise ImageRefused(f"{where}: {raw} is outside the allowed image directory", status=403)
    if not path.is_file():
        raise ImageRefused(f"{where}: no such image file: {raw}")
    if path.stat().st_size > cfg.max_image_bytes:
        raise ImageRefused(f"{where}: the image is larger than {cfg.max_image_bytes} bytes", status=413)
    return path.read_bytes()


def _fetch_remote(url: str, where: str, cfg: ServeConfig) -> bytes:
    if not cfg.allow_remote_images:
        raise ImageRefused(f"{where}: this server does not fetch remote image URLs (start it with "
                           f"--allow-remote-images to allow it); send the image as a data: URL")
    try:
        with urllib.request.urlopen(url, timeout=cfg.remote_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(cfg.max_image_bytes + 1)
    except OSError as error:
        raise ImageRefused(f"{where}: could not fetch the image: {error}") from None
    if len(data) > cfg.max_image_bytes:
        raise ImageRefused(f"{where}: the image is larger than {cfg.max_image_bytes} bytes", status=413)
    return data


def _decode(data: bytes, where: str, cfg: ServeConfig) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > cfg.max_image_pixels:
                raise ImageRefused(f"{where}: the image is {width}x{height} pixels, more than the "
                                   f"{cfg.max_image_pixels} this server accepts", status=413)
            image.load()
            return image.convert("RGB")
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageRefused(f"{where}: the data is not an image this server can decode") from None


def read_image(url: str, where: str, cfg: ServeConfig) -> Image.Image:
    """The image `url` names, as RGB; `where` (e.g. messages[0].content[1]) prefixes every error."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(url, where, cfg)
    elif scheme in ("http", "https"):
        data = _fetch_remote(url, where, cfg)
    elif scheme in ("", "file"):
        data = _read_local(url, where, cfg)
    else:
        raise ImageRefused(f"{where}: unsupported image URL scheme {scheme!r}; use a data: URL")
    return _decode(data, where, cfg)
