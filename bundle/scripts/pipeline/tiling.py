"""Square tiles with overlap covering an image, and their cores: the cores partition the image, so every pixel,
token and prompt belongs to exactly one tile.

Coordinates: (x, y) = (col, row) in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A square window of the image and its core, in px: window [y0, y0+size) x [x0, x0+size), core likewise."""

    x0: int
    y0: int
    size: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int

    def core_holds(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which (x, y) points fall in this tile's core (half-open on the right/bottom)."""
        x, y = points[:, 0], points[:, 1]
        return (x >= self.core_x0) & (x < self.core_x1) & (y >= self.core_y0) & (y < self.core_y1)


def tile_grid(height: int, width: int, size: int, overlap: int) -> list[Tile]:
    """Tiles of ``size`` px with ``overlap`` px between neighbours covering an (H, W) image.

    The cores partition the image: every pixel belongs to exactly one core. An image smaller than ``size`` is one
    tile (the caller pads it).
    """
    if not 0 <= overlap < size:
        raise ValueError(f"tile_overlap must be in [0, tile_size), got {overlap} with tile_size {size}")
    xs = _starts(width, size, size - overlap)
    ys = _starts(height, size, size - overlap)
    x_cuts = _core_cuts(xs, size, width)
    y_cuts = _core_cuts(ys, size, height)
    return [
        Tile(x0, y0, size, x_cuts[i], y_cuts[j], x_cuts[i + 1], y_cuts[j + 1])
        for j, y0 in enumerate(ys)
        for i, x0 in enumerate(xs)
    ]


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride)) + [length - size]
    return sorted(set(starts))


def _core_cuts(starts: list[int], size: int, length: int) -> list[int]:
    """Core boundaries: midway through each overlap between consecutive windows, 0 and ``length`` at the ends."""
    cuts = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        cuts.append((b + a + size) // 2)
    cuts.append(length)
    return cuts


def fitted_tile_size(height: int, width: int, max_size: int, overlap: int, multiple: int = 32) -> int:
    """The smallest tile size (a multiple of ``multiple``, at most ``max_size``) that covers an (H, W) image with as
    few tiles per side as ``max_size`` does: tiles of ``max_size`` would overhang the image by up to a tile, the
    fitted ones share the surplus out (a 4096 px image: 3 x 3 tiles of 1472 px instead of 3 x 3 of 1536 px, or
    5 x 5 of 1024 px), so the pixels processed twice stay about the overlap's."""
    length = max(height, width)
    if length <= max_size:
        return max_size if length == max_size else -(-length // multiple) * multiple
    count = -(-(length - overlap) // (max_size - overlap))
    fitted = -(-(length + (count - 1) * overlap) // count)
    return min(max_size, -(-fitted // multiple) * multiple)
