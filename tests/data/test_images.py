import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from bridgevlm.data.images import CLIP_MEAN, CLIP_STD, ImageLoadError, ImageProcessor, load_image


def test_missing_image_names_path_and_sample(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError) as info:
        load_image(path, sample="7")
    assert str(path) in str(info.value) and "sample 7" in str(info.value)


def test_corrupt_image_names_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)


def test_load_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (77, 77, 77)


def test_uniform_image_normalises_to_hand_computed_values():
    processor = ImageProcessor(size=8)
    pixels = processor(Image.new("RGB", (8, 8), (255, 0, 51)))
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    # (value / 255 - mean) / std per channel: 255 -> 1.0, 0 -> 0.0, 51 -> 0.2
    expected = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (0.2 - 0.40821073) / 0.27577711]
    assert expected[0] == pytest.approx(1.93035, abs=1e-4)
    for channel, value in enumerate(expected):
        assert torch.allclose(pixels[channel], torch.full((8, 8), value), atol=1e-5)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_uniform_image_of_other_size_stays_uniform():
    processor = ImageProcessor(size=16)
    pixels = processor.to_uint8(Image.new("RGB", (50, 23), (10, 200, 90)))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    for channel, value in enumerate((10, 200, 90)):
        assert (pixels[channel].int() - value).abs().max() <= 1


def _bands(width, height, horizontal):
    """Three equal bands red | green | blue, side by side (horizontal) or stacked."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, colour in enumerate(colours):
        if horizontal:
            array[:, i * width // 3:(i + 1) * width // 3] = colour
        else:
            array[i * height // 3:(i + 1) * height // 3, :] = colour
    return Image.fromarray(array)


@pytest.mark.parametrize("horizontal", [True, False])
def test_resize_shortest_side_then_centre_crop(horizontal):
    # 300x100 (or 100x300): the short side 100 -> 30, the long side 300 -> 90, and the centre crop
    # of 30 keeps exactly the middle (green) band; a left/top crop would keep red.
    image = _bands(300, 100, True) if horizontal else _bands(100, 300, False)
    pixels = ImageProcessor(size=30).to_uint8(image)
    assert pixels.shape == (3, 30, 30)
    inner = pixels[:, 3:27, 3:27] if horizontal else pixels[:, 3:27, 3:27]
    assert (inner[1].int() >= 250).all() and (inner[0].int() <= 5).all() and (inner[2].int() <= 5).all()
    # band edges fall at the crop border: the outermost columns (rows) see a little red and blue bleed at most
    mean = pixels.float().mean(dim=(1, 2))
    assert mean[1] > 200 and mean[0] < 40 and mean[2] < 40


def test_normalize_is_batched():
    processor = ImageProcessor(size=4)
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = processor.normalize(pixels)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (pixels.float() / 255 - mean) / std, rtol=0, atol=1e-5)  # fused: rounding differs


@pytest.mark.parametrize("size_wh", [(640, 480), (97, 203), (96, 96), (300, 301)])
def test_pil_resize_matches_transformers_clip_image_processor(tmp_path, size_wh):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))
    ours = ImageProcessor(size=224, resize="pil")
    ours.save_pretrained(tmp_path)
    reference = CLIPImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")["pixel_values"][0]
    assert (ours(image) - torch.from_numpy(reference)).abs().max().item() < 1e-5
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor(size=224)


@pytest.mark.parametrize("size_wh", [(640, 480), (97, 203), (300, 301)])
def test_torch_resize_stays_within_a_grey_level_of_pil(size_wh):
    # Photo-like content: smooth gradients with a hard edge (the wrap-around) and noise.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size_wh[1], 0:size_wh[0]]
    smooth = np.stack([(x * 0.7 + y * 0.3) % 256, (y * 0.9) % 256, (x * 0.2 + 40) % 256], -1)
    image = Image.fromarray(np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8))
    pil = ImageProcessor(size=224, resize="pil").to_uint8(image).int()
    fast = ImageProcessor(size=224, resize="torch").to_uint8(image).int()
    difference = (pil - fast).abs()
    assert difference.max() <= 2  # two levels only where bicubic overshoot is clamped at a hard edge
    assert (difference > 1).float().mean() < 1e-4


def test_pad_aspect_keeps_the_whole_image_on_a_mean_colour_square():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = ImageProcessor(size=20, aspect="pad").to_uint8(wide)
    mean_colour = [int(m * 255) for m in ImageProcessor().mean]
    assert pixels[:, 0, 10].tolist() == mean_colour and pixels[:, 19, 10].tolist() == mean_colour  # top/bottom bands
    assert pixels[:, 10, 0].tolist() == [255, 0, 0] and pixels[:, 10, 19].tolist() == [255, 0, 0]  # full width kept
    with pytest.raises(ValueError, match="valid: crop, pad"):
        ImageProcessor(aspect="stretch")
    with pytest.raises(ValueError, match="valid: torch, pil"):
        ImageProcessor(resize="cv2")
