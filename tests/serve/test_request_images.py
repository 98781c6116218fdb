"""Reading request images: data URLs, files only under the allowed root, remote only when enabled, and
size limits before and after decoding."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bridgevlm.serve.config import ServeConfig
from bridgevlm.serve.images import ImageRefused, read_image


def _png(size=(12, 8), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _data(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _refused(url, cfg, status=400, match=""):
    with pytest.raises(ImageRefused, match=match) as error:
        read_image(url, "messages[0].content[1]", cfg)
    assert error.value.status == status
    assert str(error.value).startswith("messages[0].content[1]: ")
    return error.value


def test_data_urls():
    image = read_image(_data(_png()), "m", ServeConfig())
    assert image.mode == "RGB" and image.size == (12, 8) and image.getpixel((0, 0)) == (255, 0, 0)
    _refused("data:image/png,abc", ServeConfig(), match="base64")
    _refused("data:image/png;base64,%%%", ServeConfig(), match="not valid base64")
    error = _refused(_data(b"GIF89a but not really an image" * 3), ServeConfig(), match="not an image")
    assert "R0lG" not in str(error)  # never echoes the payload
    _refused(_data(_png()), ServeConfig(max_image_bytes=64), status=413, match="larger than 64 bytes")
    _refused(_data(_png((300, 300))), ServeConfig(max_image_pixels=200 * 200), status=413, match="300x300 pixels")


def test_local_files_only_under_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(_png())
    (outside / "b.png").write_bytes(_png(colour="blue"))
    (root / "link.png").symlink_to(outside / "b.png")
    cfg = ServeConfig(local_image_root=str(root))
    for url in ("sub/a.png", str(root / "sub" / "a.png"), f"file://{root}/sub/a.png"):
        assert read_image(url, "m", cfg).getpixel((0, 0)) == (255, 0, 0)
    for url in (str(outside / "b.png"), "../outside/b.png", "sub/../../outside/b.png", "link.png",
                f"file://{outside}/b.png"):
        _refused(url, cfg, status=403, match="outside the allowed image directory")
    _refused("sub/missing.png", cfg, match="no such image file")
    _refused("sub/a.png", ServeConfig(), status=403, match="--image-root")


def test_remote_and_other_schemes():
    _refused("https://example.com/cat.png", ServeConfig(), match="--allow-remote-images")
    _refused("ftp://example.com/cat.png", ServeConfig(local_image_root="/"), match="unsupported image URL scheme")
    _refused("http://127.0.0.1:9/none.png", ServeConfig(allow_remote_images=True, remote_timeout_s=2),
             match="could not fetch")
