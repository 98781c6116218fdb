"""Draw a scene graph as an RGB image. A pure function of the scene and the image size."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scene import Scene, SceneObject

RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 60, 185),
    "orange": (245, 135, 20),
}
BACKGROUND = (236, 236, 232)
TEXT_RGB = (25, 25, 25)
# Radius as a fraction of a grid cell's side.
RADIUS = {"small": 0.2, "large": 0.4}
JITTER = 0.06  # max centre offset, fraction of a cell
SHADE = 18  # max per-channel colour jitter


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_scene(scene: Scene, image_size: int = 96) -> Image.Image:
    """Render objects on a 3×3 grid with small, seeded jitter of position, size and shade."""
    rng = np.random.default_rng(scene.render_seed)
    shift = rng.integers(-4, 5)
    background = tuple(int(c + shift) for c in BACKGROUND)
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for obj in scene.objects:
        cx, cy = _cell_centre(obj.row, obj.col, cell, rng)
        radius = RADIUS[obj.size] * cell * (1 + rng.uniform(-0.06, 0.06))
        colour = tuple(int(np.clip(c + rng.integers(-SHADE, SHADE + 1), 0, 255)) for c in RGB[obj.colour])
        _draw_shape(draw, obj, cx, cy, radius, colour)
    if scene.text:
        cx, cy = _cell_centre(scene.text.row, scene.text.col, cell, rng)
        font = _font(max(8, round(cell * 0.42)))
        draw.text((cx, cy), scene.text.value, fill=TEXT_RGB, font=font, anchor="mm")
    return image


def _cell_centre(row: int, col: int, cell: float, rng: np.random.Generator) -> tuple[float, float]:
    jitter = JITTER * cell
    return (col + 0.5) * cell + rng.uniform(-jitter, jitter), (row + 0.5) * cell + rng.uniform(-jitter, jitter)


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * k / sides), cy + radius * math.sin(rotation + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, cx: float, cy: float, radius: float, colour) -> None:
    if obj.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif obj.shape == "square":
        half = radius * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif obj.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + radius * 0.15, radius, 3, -math.pi / 2), fill=colour)
    elif obj.shape == "diamond":
        draw.polygon(_regular_polygon(cx, cy, radius, 4, 0.0), fill=colour)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, radius * 1.1), fill=colour)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
