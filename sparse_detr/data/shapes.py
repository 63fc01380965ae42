"""Shape masks, fills and cluttered backgrounds for the synthetic dataset (numpy + PIL, seeded)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")  # the default dataset's classes, in order

Point = tuple[float, float]


def _rotated(points: list[Point], center: Point, angle: float) -> list[tuple]:
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _regular(count: int, radius: float, start: float = -math.pi / 2) -> list[Point]:
    return [
        (radius * math.cos(start + 2 * math.pi * k / count), radius * math.sin(start + 2 * math.pi * k / count))
        for k in range(count)
    ]


def _disc(center: Point, radius: float) -> list[float]:
    cx, cy = center
    return [cx - radius, cy - radius, cx + radius, cy + radius]


# Each outline below draws one kind on ``draw`` (a 0/255 "L" canvas) inside the circle of ``radius``
# around ``center``, turned by ``angle``; its proportions come from ``rng``. The draws of the default
# kinds must stay as they are: they fix the default dataset's pixels.


def _circle(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    draw.ellipse(_disc(center, radius), fill=255)


def _ring(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    inner = radius * rng.uniform(0.45, 0.62)
    draw.ellipse(_disc(center, radius), fill=255)
    draw.ellipse(_disc(center, inner), fill=0)


def _square(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    draw.polygon(_rotated(_regular(4, radius), center, angle), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    draw.polygon(_rotated(_regular(3, radius), center, angle), fill=255)


def _star(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    outer, inner = _regular(5, radius), _regular(5, radius * rng.uniform(0.38, 0.5), -math.pi / 2 + math.pi / 5)
    points = [p for pair in zip(outer, inner) for p in pair]
    draw.polygon(_rotated(points, center, angle), fill=255)


def _cross(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    # arm half-width t, arm reach r' so that the corner (t, r') lies on the circumcircle
    t = radius * rng.uniform(0.2, 0.3)
    r = math.sqrt(radius**2 - t**2)
    arms = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r)]
    arms += [(-x, -y) for x, y in arms]
    draw.polygon(_rotated(arms, center, angle), fill=255)


def _hexagon(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    draw.polygon(_rotated(_regular(6, radius), center, angle), fill=255)


def _diamond(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    # a rhombus clearly narrower than the square (which is the rhombus of equal diagonals)
    half_width = radius * rng.uniform(0.45, 0.6)
    points = [(0.0, -radius), (half_width, 0.0), (0.0, radius), (-half_width, 0.0)]
    draw.polygon(_rotated(points, center, angle), fill=255)


def _crescent(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    # a disc with an off-centre disc cut out; at its thickest the crescent is radius - (cut - offset)
    offset = radius * rng.uniform(0.4, 0.55)
    cut = radius * rng.uniform(0.75, 0.9)
    cx, cy = center
    draw.ellipse(_disc(center, radius), fill=255)
    draw.ellipse(_disc((cx + offset * math.cos(angle), cy + offset * math.sin(angle)), cut), fill=0)


def _arrow(draw: ImageDraw.ImageDraw, center: Point, radius: float, angle: float, rng: np.random.Generator) -> None:
    # pointing along +x before rotation: tip on the circle, a wide head, a narrow shaft whose tail
    # corners lie on the circle
    head_length = radius * rng.uniform(0.7, 0.9)
    head_half = radius * rng.uniform(0.5, 0.65)
    shaft_half = radius * rng.uniform(0.15, 0.25)
    base = radius - head_length
    tail = -math.sqrt(radius**2 - shaft_half**2)
    points = [
        (radius, 0.0),
        (base, head_half),
        (base, shaft_half),
        (tail, shaft_half),
        (tail, -shaft_half),
        (base, -shaft_half),
        (base, -head_half),
    ]
    draw.polygon(_rotated(points, center, angle), fill=255)


_OUTLINES = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "hexagon": _hexagon,
    "diamond": _diamond,
    "crescent": _crescent,
    "arrow": _arrow,
}
# every kind that can be drawn: the default SHAPES, then extra silhouettes for other class sets
SHAPE_KINDS = tuple(_OUTLINES)


def shape_mask(
    kind: str, canvas: tuple[int, int], center: Point, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (H, W) mask of one ``kind`` of shape (one of ``SHAPE_KINDS``) with circumradius ``radius``
    around ``center`` (x, y); ``canvas`` is (H, W). Rotation and proportions (star depth, ring hole,
    cross arms, ...) come from ``rng``."""
    if kind not in _OUTLINES:
        raise ValueError(f"unknown shape {kind!r}; shapes: {SHAPE_KINDS}")
    height, width = canvas
    mask = Image.new("L", (width, height), 0)
    angle = float(rng.uniform(0, 2 * math.pi))
    _OUTLINES[kind](ImageDraw.Draw(mask), center, radius, angle, rng)
    return np.asarray(mask) > 0


def random_color(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """An RGB colour (3,) float in [0, 255] with random hue and the given HSV ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb) * 255.0


def background(canvas: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float clutter: a two-colour linear gradient, low-frequency blotches, thin distractor
    strokes and arcs, and pixel noise."""
    height, width = canvas
    start, end = (random_color(rng, (0.0, 0.6), (0.2, 0.95)) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = start + (end - start) * ramp[..., None]

    blotches = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    image += (np.asarray(blotches, dtype=np.float64) - 127.5) * rng.uniform(0.1, 0.3)

    strokes = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in random_color(rng, (0.0, 1.0), (0.1, 1.0)))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
        if rng.uniform() < 0.6:
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, 3)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            start_deg = rng.uniform(0, 360)
            draw.arc(box, start_deg, start_deg + rng.uniform(60, 200), fill=color, width=1)
    image = np.asarray(strokes, dtype=np.float64)
    return image + rng.normal(0, rng.uniform(3, 10), image.shape)


def fill(canvas: tuple[int, int], color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float texture around ``color``: solid, stripes, a shading gradient or speckles."""
    height, width = canvas
    style = rng.choice(["solid", "stripes", "shade", "speckle"], p=[0.4, 0.2, 0.2, 0.2])
    texture = np.broadcast_to(color, (height, width, 3)).copy()
    if style == "solid":
        return texture
    ys, xs = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if style == "stripes":
        period = rng.uniform(3, 7)
        stripe = (along % period) < period / 2
        texture[stripe] = texture[stripe] * rng.uniform(0.45, 0.7)
    elif style == "shade":
        shade = 0.65 + 0.5 * (along - along.min()) / max(float(np.ptp(along)), 1.0)
        texture *= shade[..., None]
    else:
        texture += rng.normal(0, 28, texture.shape)
    return texture
