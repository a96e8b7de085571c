"""The `synthetic` source: one coloured shape on a plain background, captioned by a fixed template.

Every sample is a pure function of (seed, index): its choices come from sha256, so samples can be
made one at a time, in any order, identically on every machine, and `synthetic_samples=4000`
starts with the same 2000 samples as `synthetic_samples=2000`. The caption states everything that
is drawn (shape, colour, 3x3 position, background), so a model can drive its loss close to zero.
There are only 2,592 distinct samples, so larger sets repeat them: the split groups samples by what
is drawn, and a repeat always lands on the side of its first copy.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from PIL import Image, ImageDraw

from theworld_core.config import DataConfig
from theworld_core.data.types import Source, SourceRecord

GENERATOR_VERSION = 1
"""Bump whenever a change here alters any image or caption: it is part of the fingerprint."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
"""Names of the 3x3 grid cells, indexed [row][column]."""

_MARGIN = 0.15
"""Share of a cell left free on each side of the shape, so shapes never touch neighbouring cells."""


@dataclass(frozen=True)
class ShapeSpec:
    """Everything drawn in one synthetic image."""

    shape: str
    colour: str
    background: str
    row: int
    column: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.column]

    @property
    def content_key(self) -> str:
        """Split group: equal exactly when two samples have the same pixels and caption (the
        generator has 4 x 9 x 8 x 9 = 2,592 of them, so a few thousand samples repeat many)."""
        return f"synthetic:{self.shape}:{self.colour}:{self.background}:{self.row}:{self.column}"

    @property
    def caption(self) -> str:
        shape = f"{_article(self.colour)} {self.colour} {self.shape}"
        return f"{shape} at the {self.position} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_spec(seed: int, index: int) -> ShapeSpec:
    """The choices of sample `index`, taken from a hash (stable across Python/numpy versions)."""
    digest = hashlib.sha256(f"theworld-synthetic-v{GENERATOR_VERSION}:{seed}:{index}".encode()).digest()
    colours = list(COLOURS)
    colour = colours[digest[1] % len(colours)]
    backgrounds = [name for name in colours if name != colour]
    return ShapeSpec(
        shape=SHAPES[digest[0] % len(SHAPES)],
        colour=colour,
        background=backgrounds[digest[2] % len(backgrounds)],
        row=digest[3] % 3,
        column=digest[4] % 3,
    )


def cell_box(row: int, column: int, size: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom; right/bottom exclusive) of a grid cell."""
    return (column * size // 3, row * size // 3, (column + 1) * size // 3, (row + 1) * size // 3)


def render_shape(spec: ShapeSpec, size: int) -> Image.Image:
    """Draw the sample (no anti-aliasing: every pixel is exactly the shape or background colour)."""
    image = Image.new("RGB", (size, size), COLOURS[spec.background])
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = cell_box(spec.row, spec.column, size)
    margin_x, margin_y = (right - left) * _MARGIN, (bottom - top) * _MARGIN
    x0, y0, x1, y1 = left + margin_x, top + margin_y, right - 1 - margin_x, bottom - 1 - margin_y
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif spec.shape == "cross":
        third_x, third_y = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + third_x, y0, x1 - third_x, y1), fill=fill)
        draw.rectangle((x0, y0 + third_y, x1, y1 - third_y), fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {spec.shape!r}")
    return image


def render_png(spec: ShapeSpec, size: int) -> bytes:
    """The sample's image as PNG bytes (lossless, so pixel checks and hashes are exact)."""
    buffer = io.BytesIO()
    render_shape(spec, size).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def synthetic_id(seed: int, index: int) -> str:
    return f"synthetic-{seed}-{index}"


def _records(seed: int, count: int, size: int) -> Iterator[SourceRecord]:
    for index in range(count):
        spec = shape_spec(seed, index)
        sample_id = synthetic_id(seed, index)
        yield SourceRecord(
            id=sample_id,
            group=spec.content_key,  # by content: a repeated shape never straddles train and eval
            text=spec.caption,
            prompt=None,
            load=partial(render_png, spec, size),  # rendered only when the image is needed
        )


def synthetic_source(cfg: DataConfig) -> Source:
    """`cfg.synthetic_samples` generated samples of `cfg.synthetic_image_size` px, by `cfg.seed`."""
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "samples": cfg.synthetic_samples,
        "image_size": cfg.synthetic_image_size,
    }
    return Source(
        kind="synthetic",
        description=(
            f"synthetic shapes (seed {cfg.seed}, {cfg.synthetic_samples} samples, {cfg.synthetic_image_size} px)"
        ),
        records=partial(_records, cfg.seed, cfg.synthetic_samples, cfg.synthetic_image_size),
        static_fingerprint=params,
    )
