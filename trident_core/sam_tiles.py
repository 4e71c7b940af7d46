"""How SAM covers an image: rows x cols tiles of the image with its sides rounded up to 16, each encoded on its
own (1x2 is the reference's Cityscapes mode). One object owns the cuts, the rounding and which tile a pixel falls
in, for the encoder, the aggregation's feature canvas and the affinity inspector alike."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .image import image_digest, round_up_to
from .models import SamEncoding, SamModel
from .models.sam import PATCH
from .residency import trim_heap

Box = tuple[int, int, int, int]  # y1, y2, x1, x2 (end exclusive)
MAX_TILES = 8
AUTO_TILE_SIDE = 1024


def parse_tiles(spec: str | tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """"1x1", "1x2", "RxC" or "auto": tiles about as wide as high and about AUTO_TILE_SIDE pixels (SAM's input
    size), so wide and very large images keep a fine SAM grid."""
    if isinstance(spec, tuple):
        rows, cols = spec
    elif spec.strip().lower() == "auto":
        h, w = image_size
        rows, cols = max(1, round(h / w)), max(1, round(w / h))
        scale = max(1, round(max(h / rows, w / cols) / AUTO_TILE_SIDE))
        rows, cols = min(MAX_TILES, rows * scale), min(MAX_TILES, cols * scale)
        rows, cols = min(rows, math.ceil(h / PATCH)), min(cols, math.ceil(w / PATCH))  # (a tile: 16 pixels or more)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"SAM tiles must be 'auto' or ROWSxCOLS like '1x2', not {spec!r}")
        rows, cols = int(m.group(1)), int(m.group(2))
    if not (1 <= rows <= MAX_TILES and 1 <= cols <= MAX_TILES):
        raise ValueError(f"SAM tiles {rows}x{cols}: each of rows and cols must be 1..{MAX_TILES}")
    return rows, cols


def cuts(length: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive spans covering 0..length, as even as whole numbers allow."""
    return [(i * length // parts, (i + 1) * length // parts) for i in range(parts)]


@dataclass(frozen=True)
class SamTiling:
    """rows x cols tiles over an image of `image_size` (H, W), row-major."""

    rows: int
    cols: int
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.padded_size
        if h // self.rows < PATCH or w // self.cols < PATCH:
            raise ValueError(f"SAM tiles {self.rows}x{self.cols} are too many for an image {self.image_size[0]} "
                             f"pixels high and {self.image_size[1]} wide: each tile needs {PATCH} pixels or more "
                             "each way; use fewer tiles (1x1 or auto)")

    @classmethod
    def of(cls, spec: str | tuple[int, int], image_size: tuple[int, int]) -> SamTiling:
        """The tiling a spec ("1x2", "auto", (rows, cols)) gives an image of `image_size`."""
        return cls(*parse_tiles(spec, image_size), tuple(image_size))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def padded_size(self) -> tuple[int, int]:
        """The SAM branch's image size: each side rounded up to a multiple of 16."""
        return tuple(math.ceil(s / PATCH) * PATCH for s in self.image_size)

    def boxes(self, size: tuple[int, int] | None = None) -> list[Box]:
        """Each tile's box on a canvas of `size` (default: the padded image), row-major."""
        h, w = size or self.padded_size
        return [(y1, y2, x1, x2) for y1, y2 in cuts(h, self.rows) for x1, x2 in cuts(w, self.cols)]

    def locate(self, x: int, y: int) -> tuple[int, float, float]:
        """The tile under pixel (x, y) of the image (its centre), and where in that tile as fractions (fy, fx)."""
        h, w = self.image_size
        h16, w16 = self.padded_size
        px, py = (x + 0.5) * w16 / w, (y + 0.5) * h16 / h
        ycuts, xcuts = cuts(h16, self.rows), cuts(w16, self.cols)
        r = next(i for i, (a, b) in enumerate(ycuts) if a <= py < b or i == self.rows - 1)
        c = next(i for i, (a, b) in enumerate(xcuts) if a <= px < b or i == self.cols - 1)
        (y1, y2), (x1, x2) = ycuts[r], xcuts[c]
        return r * self.cols + c, (py - y1) / (y2 - y1), (px - x1) / (x2 - x1)


@dataclass(frozen=True, eq=False)
class SamTileEncodings:
    """SAM's encoding of every tile of an image (row-major): made once, passed explicitly to the aggregation,
    the refinement and the affinity inspector, never changed."""

    tiling: SamTiling
    encodings: tuple[SamEncoding, ...] = field(repr=False)
    image_digest: str = ""  # of the image tiled (`image.image_digest`)

    @property
    def whole(self) -> SamEncoding | None:
        """The encoding of the whole image when it is one tile (the refinement's mask decoder needs that)."""
        return self.encodings[0] if self.tiling.shape == (1, 1) else None

    def check(self, sam: SamModel, image_size: tuple[int, int], what: str) -> None:
        """Refuse encodings of another image size or made by another SAM."""
        if tuple(self.tiling.image_size) != tuple(image_size):
            h, w = self.tiling.image_size
            raise ValueError(f"the {what} is of a {w}x{h} image, not of the {image_size[1]}x{image_size[0]} image "
                             "given here: connect the image that was segmented")
        for enc in self.encodings:
            sam.check_encoding(enc, what)


def encode_tiles(sam: SamModel, image: np.ndarray, tiling: SamTiling) -> SamTileEncodings:
    """SAM encodings of the image's sides rounded up to 16, split into the tiling's tiles."""
    return encode_frame_tiles(sam, [image], tiling)[0]


def encode_frame_tiles(sam: SamModel, images: Sequence[np.ndarray], tiling: SamTiling,
                       digests: Sequence[str] | None = None,
                       after_block: Callable[[nn.Module], object] | None = None) -> list[SamTileEncodings]:
    """`encode_tiles` of several frames of one size: each tile of every frame in one forward of SAM's encoder.
    `digests`: the frames' `image_digest`s where the caller has them (hashing a frame took 1.5 ms on a GPU host).
    `after_block(block)` (`residency.releaser()`): each encoder block's weight pages given back as soon as it has
    run (a later tile maps them again from the page cache), with the freed heap between tiles, so the encoder's
    peak holds one block's weights, not the whole encoder's (CPU: 70 to 240 MB less at city_scapes' 1x2 tiles;
    the values are the same)."""
    digests = digests or [image_digest(image) for image in images]
    padded = [round_up_to(image, PATCH) for image in images]
    whole = tiling.shape == (1, 1) and all(p is image for p, image in zip(padded, images))  # a tile is its frame
    per_tile = []
    for i, (y1, y2, x1, x2) in enumerate(tiling.boxes()):
        if i and after_block is not None:
            trim_heap()  # (the last tile's freed activations)
        per_tile.append(sam.encode_many([np.ascontiguousarray(img16[y1:y2, x1:x2]) for img16 in padded],
                                        digests if whole else None, after_block))
    return [SamTileEncodings(tiling, tuple(tile[f] for tile in per_tile), digests[f]) for f in range(len(images))]
