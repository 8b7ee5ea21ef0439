"""What a pathology infer request asks for: a region of the image (``location``, ``size``) and clicks.

MONAI Label's pathology clients (QuPath, DSA) send ``location`` = [x, y], the level-0 pixel of the region's
top-left corner, and ``size`` = [w, h] in level-0 pixels; [0, 0] (or no ``size``) means the whole image from
``location``. Clicks (``foreground`` / ``background``) are [x, y] level-0 pixels of the slide, not of the region.
Regions reaching past the right/bottom edge are clipped to the image; a region starting outside it, a click
outside the image or outside the region, and a region larger than ``max_region_area`` pixels are refused.

Coordinates: (x, y) = (col, row) in level-0 pixels; arrays are (row, col).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lib.errors import RequestError
from scripts.data.readers.common import read_image
from scripts.io.wsi import open_slide, read_region

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi")  # tiled/striped TIFF: read by window with tifffile
OPENSLIDE_SUFFIXES = (".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")


@dataclass(frozen=True)
class Region:
    """A window of the image in level-0 pixels: columns [x, x + width), rows [y, y + height)."""

    x: int
    y: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: which (x, y) points fall on a pixel of the region (integer coordinates = pixel centres, as
        QuPath's truncated click coordinates are)."""
        px = np.floor(np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5).astype(np.int64)
        return ((px[:, 0] >= self.x) & (px[:, 0] < self.x + self.width)
                & (px[:, 1] >= self.y) & (px[:, 1] < self.y + self.height))


def _number(value, what: str) -> float:
    """A finite JSON number as float; a RequestError naming ``what`` otherwise (also for integers too large for a
    float, which ``np.isfinite`` cannot even take)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(f"{what} must be a finite number, got {str(value)[:40]}")
    return number


def parse_pair(value, name: str, default: tuple[int, int]) -> tuple[int, int]:
    """``[a, b]`` of non-negative integers (``None`` -> default); a RequestError naming ``name`` otherwise."""
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestError(f"'{name}' must be a list of 2 integers [x, y] / [w, h], got {value!r}")
    pair = []
    for v in value:
        number = _number(v, f"'{name}' entries")
        if number != int(number) or number < 0:
            raise RequestError(f"'{name}' must hold non-negative integers, got {value!r}")
        pair.append(int(number))
    return pair[0], pair[1]


def parse_points(value, name: str) -> np.ndarray:
    """Clicks ``[[x, y], ...]`` (a third entry, e.g. a slice index, is ignored) as float (N, 2)."""
    if value is None:
        return np.zeros((0, 2))
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"'{name}' must be a list of [x, y] points, got {value!r}")
    points = []
    for point in value:
        if not isinstance(point, (list, tuple)) or len(point) not in (2, 3):
            raise RequestError(f"'{name}' must be a list of [x, y] points, got the entry {point!r}")
        points.append([_number(point[0], f"'{name}' coordinates"), _number(point[1], f"'{name}' coordinates")])
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


class ImageSource:
    """Size and level-0 pixels of an image file: a whole slide (read by window) or a plain image (read whole)."""

    def __init__(self, path: str | Path, slide_backend: str = "tifffile") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RequestError(f"image file not found: {self.path}", status_code=404)
        suffix = self.path.suffix.lower()
        self._slide = None
        try:
            if suffix in TIFF_SUFFIXES or suffix in OPENSLIDE_SUFFIXES:
                backend = "openslide" if suffix in OPENSLIDE_SUFFIXES else slide_backend
                self._slide = open_slide(self.path, backend=backend)
                self.width, self.height = self._slide.levels[0].width, self._slide.levels[0].height
            else:
                with Image.open(self.path) as pil:  # reads the header only
                    self.width, self.height = pil.size
        except (OSError, ValueError, ImportError) as error:
            raise RequestError(f"cannot read image {self.path.name}: {error}", status_code=400) from error

    def read(self, region: Region) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``region`` (inside the image)."""
        if self._slide is not None:
            return read_region(self._slide, region.x, region.y, region.width, region.height, level=0)
        try:
            image = read_image(self.path)
        except (OSError, ValueError) as error:
            raise RequestError(f"cannot read image {self.path.name}: {error}", status_code=400) from error
        return np.array(image[region.y : region.y + region.height, region.x : region.x + region.width])  # own copy

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()


def resolve_region(request: dict, width: int, height: int, max_area: int,
                   around: np.ndarray | None = None, context: int = 128) -> Region:
    """The region a request asks for, clipped to the (width, height) image.

    ``location`` defaults to [0, 0]; ``size`` [0, 0] (or none) means the rest of the image, or, when ``around``
    points are given (clicks), their bounding box grown by ``context`` px on every side.
    """
    level = request.get("level", 0)
    if level not in (0, None):
        raise RequestError(f"only level 0 is supported ('level' = {level!r}); send level-0 location/size")
    x, y = parse_pair(request.get("location"), "location", (0, 0))
    w, h = parse_pair(request.get("size"), "size", (0, 0))
    if (w == 0) != (h == 0):
        raise RequestError(f"'size' must be positive [w, h], or [0, 0] for the whole image; got {[w, h]}")
    if x >= width or y >= height:
        raise RequestError(f"'location' {[x, y]} is outside the image ({width} x {height} px)")
    if w == 0 and around is not None and len(around):
        x0, y0 = np.floor(around.min(axis=0)).astype(int) - context
        x1, y1 = np.floor(around.max(axis=0)).astype(int) + context + 1
        x, y = max(int(x0), x), max(int(y0), y)
        w, h = int(x1) - x, int(y1) - y
    elif w == 0:
        w, h = width - x, height - y
    region = Region(x, y, min(w, width - x), min(h, height - y))
    if region.area > max_area:
        raise RequestError(
            f"region {region.width} x {region.height} px ({region.area} px) exceeds the server's max_region_area "
            f"of {max_area} px: select a smaller rectangle (or start the server with --conf max_region_area <px>)"
        )
    return region


def check_clicks(points: np.ndarray, name: str, width: int, height: int, region: Region | None = None) -> None:
    """Every click on a pixel of the image (and of ``region``), else a RequestError naming the first bad one."""
    inside_image = Region(0, 0, width, height).contains(points)
    if not inside_image.all():
        bad = points[~inside_image][0].tolist()
        raise RequestError(f"'{name}' click {bad} is outside the image ({width} x {height} px)")
    if region is None:
        return
    inside = region.contains(points)
    if not inside.all():
        bad = points[~inside][0].tolist()
        raise RequestError(f"'{name}' click {bad} is outside the requested region (location {[region.x, region.y]}, "
                           f"size {[region.width, region.height]})")
