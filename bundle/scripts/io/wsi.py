"""Whole-slide helpers: open a pyramidal TIFF/SVS, pick a level, find the tissue, and tile it lazily.

Slides are opened with MONAI's ``monai.data.WSIReader``; ``backend="tifffile"`` (the default, installable from
PyPI) works everywhere, ``"openslide"`` and ``"cucim"`` when their packages are installed. With the tifffile
backend the tiles are decoded here from the TIFF tiles/strips they overlap (``TiffPage.decode``), because MONAI's
tifffile reader decodes the *whole level* for every patch; memory stays at a few tiles whatever the slide size.
Level geometry comes from ``tifffile``'s pyramid model (``series[0].levels``), the pages MONAI reads pixels from.

Coordinates: arrays are indexed (row, col); positions are (x, y) = (col, row) in pixels. ``x0, y0`` are level-0
pixels, ``x, y`` pixels of the level being read; ``downsample`` is level-0 pixels per level pixel.
"""

from __future__ import annotations

from monai.apps.utils import get_logger
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import tifffile
from monai.data import WSIReader
from monai.utils import OptionalImportError
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects
from skimage.transform import downscale_local_mean

from scripts.io.atomic import atomic_path

logger = get_logger("scripts.io.wsi")

BACKENDS = ("tifffile", "openslide", "cucim")
BACKGROUND = 255  # fill value (white) for pixels outside the slide or in empty TIFF tiles
_UM_PER_UNIT = {"INCH": 25400.0, "CENTIMETER": 1e4, "MILLIMETER": 1e3, "MICROMETER": 1.0}


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: size in pixels, level-0 pixels per level pixel, microns per pixel (None if unknown)."""

    level: int
    width: int
    height: int
    downsample_x: float
    downsample_y: float
    mpp_x: float | None
    mpp_y: float | None

    @property
    def downsample(self) -> float:
        """Mean of the x and y downsample factors."""
        return (self.downsample_x + self.downsample_y) / 2


@dataclass
class Slide:
    """An open slide: the MONAI reader, the backend's handle (``wsi``) and its levels. Close it (or use ``with``)."""

    path: Path
    backend: str
    reader: WSIReader
    wsi: Any
    levels: list[LevelInfo]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 (mpp_x, mpp_y) in microns per pixel, None when the file does not say."""
        lv = self.levels[0]
        return None if lv.mpp_x is None else (lv.mpp_x, lv.mpp_y)

    def close(self) -> None:
        close = getattr(self.wsi, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- opening
def _make_reader(backend: str) -> WSIReader:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}")
    try:
        return WSIReader(backend=backend, channel_dim=-1)
    except (OptionalImportError, ImportError) as e:
        hint = {
            "cucim": "cuCIM is not installed (it needs a CUDA GPU: `pip install cucim-cu12`)",
            "openslide": "OpenSlide is not installed (`pip install openslide-python openslide-bin`)",
        }.get(backend, str(e))
        raise ImportError(f"backend={backend!r}: {hint}; backend='tifffile' works without it") from e


def _tiff_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) from SVS description, OME metadata or resolution tags; None if absent/unitless."""
    page = tif.series[0].levels[0].keyframe
    if tif.is_svs:
        mpp = tifffile.svs_description_metadata(page.description).get("MPP")
        if mpp:
            return float(mpp), float(mpp)
    if tif.is_ome:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
        if "PhysicalSizeX" in pixels and "PhysicalSizeY" in pixels:
            units = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
            ux = units.get(pixels.get("PhysicalSizeXUnit", "µm"))
            uy = units.get(pixels.get("PhysicalSizeYUnit", "µm"))
            if ux and uy:
                return float(pixels["PhysicalSizeX"]) * ux, float(pixels["PhysicalSizeY"]) * uy
    tags = page.tags
    if "XResolution" in tags and "YResolution" in tags and "ResolutionUnit" in tags:
        unit = _UM_PER_UNIT.get(tifffile.RESUNIT(tags["ResolutionUnit"].value).name)
        (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
        if unit and xn and yn:
            return unit * xd / xn, unit * yd / yn
    return None


PLAUSIBLE_MPP = (0.05, 10.0)  # µm/px: resolution metadata outside this range is not a microscope's


def image_mpp(path: str | Path) -> float | None:
    """An image file's µm/px from its TIFF metadata (SVS, OME, resolution tags: the mean of x and y), None for
    other files, files without it and implausible values (a 72 dpi default: logged)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff", ".svs"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            mpp = _tiff_mpp(tif)
    except Exception as error:  # the image reader reports an unreadable file with its own message
        logger.debug("%s: no TIFF metadata (%s)", path, error)
        return None
    if mpp is None:
        return None
    value = (mpp[0] + mpp[1]) / 2
    if not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
        logger.info("%s: its resolution metadata (%.4g um/px) is not a microscope's; ignored", path, value)
        return None
    return value


def _tiff_levels(tif: tifffile.TiffFile) -> list[LevelInfo]:
    mpp = _tiff_mpp(tif)
    pages = [lv.keyframe for lv in tif.series[0].levels]
    h0, w0 = pages[0].imagelength, pages[0].imagewidth
    out = []
    for i, p in enumerate(pages):
        dx, dy = w0 / p.imagewidth, h0 / p.imagelength
        mx, my = (None, None) if mpp is None else (mpp[0] * dx, mpp[1] * dy)
        out.append(LevelInfo(i, p.imagewidth, p.imagelength, dx, dy, mx, my))
    return out


def _monai_levels(reader: WSIReader, wsi: Any) -> list[LevelInfo]:
    try:
        mpp_y, mpp_x = reader.get_mpp(wsi, 0)
    except (ValueError, KeyError):
        mpp_y = mpp_x = None
    h0, w0 = reader.get_size(wsi, 0)
    out = []
    for i in range(reader.get_level_count(wsi)):
        h, w = reader.get_size(wsi, i)
        dx, dy = w0 / w, h0 / h
        mx, my = (None, None) if mpp_x is None else (mpp_x * dx, mpp_y * dy)
        out.append(LevelInfo(i, int(w), int(h), dx, dy, mx, my))
    return out


def open_slide(path: str | Path, backend: str = "tifffile") -> Slide:
    """Open a whole-slide image (pyramidal TIFF/SVS with tifffile; any OpenSlide/cuCIM format with those)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"slide not found: {path}")
    reader = _make_reader(backend)
    wsi = reader.read(str(path))
    if backend == "tifffile":
        page = wsi.series[0].levels[0].keyframe
        if page.dtype != np.uint8 or page.samplesperpixel < 3:
            wsi.close()
            raise ValueError(f"{path}: expected an RGB(A) uint8 slide, got {page.dtype} x {page.samplesperpixel}")
        levels = _tiff_levels(wsi)
    else:
        levels = _monai_levels(reader, wsi)
    return Slide(path=path, backend=backend, reader=reader, wsi=wsi, levels=levels)


def slide_levels(slide: Slide) -> list[LevelInfo]:
    """Levels of ``slide``, level 0 (full resolution) first: size (width, height), downsample, mpp."""
    return list(slide.levels)


def choose_level(slide: Slide, mpp: float | None = None, level: int | None = None, rtol: float = 0.1) -> int:
    """The level to segment at: ``level`` if given, else for ``mpp`` (microns per pixel) the coarsest level whose
    mpp is <= mpp * (1 + rtol); level 0 (with a warning) if the slide is coarser than asked; 0 if neither is given.

    Raises ValueError when both are given, when ``level`` does not exist, or when ``mpp`` is asked but the file
    carries no resolution (pass ``level`` then).
    """
    if mpp is not None and level is not None:
        raise ValueError("choose_level: give `mpp` or `level`, not both")
    if level is not None:
        if not 0 <= level < len(slide.levels):
            raise ValueError(f"{slide.path}: level={level} does not exist (levels 0..{len(slide.levels) - 1})")
        return level
    if mpp is None:
        return 0
    if slide.mpp is None:
        raise ValueError(f"{slide.path}: mpp={mpp} requested but the file has no resolution metadata; pass `level`")
    fine_enough = [lv.level for lv in slide.levels if max(lv.mpp_x, lv.mpp_y) <= mpp * (1 + rtol)]
    if not fine_enough:
        logger.warning("%s: level 0 is %.3f um/px, coarser than the %.3f um/px asked", slide.path, slide.mpp[0], mpp)
        return 0
    return max(fine_enough)


def level_upsampling(slide: Slide, level: int, mpp: float | None, rtol: float = 0.1) -> float:
    """How much to enlarge ``level`` to reach ``mpp`` µm/px: its mpp / ``mpp`` when it is coarser than
    ``mpp * (1 + rtol)`` (e.g. 2.0 for a 20x slide, 0.5 µm/px, segmented by a 40x model, 0.25 µm/px), else 1."""
    if mpp is None or slide.levels[level].mpp_x is None:
        return 1.0
    info = slide.levels[level]
    level_mpp = (info.mpp_x + info.mpp_y) / 2
    return level_mpp / mpp if level_mpp > mpp * (1 + rtol) else 1.0


# ----------------------------------------------------------------------------------------------- reading
def _tiff_window(page: tifffile.TiffPage, lock: threading.Lock, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [y, y+h) x [x, x+w) (inside the page) of an RGB(A) page, decoding only the tiles/strips overlapping."""
    if page.planarconfig != 1 or page.imagedepth != 1:
        raise NotImplementedError(f"{page.parent.filehandle.path}: planar/volumetric TIFF pages are not supported")
    if page.is_tiled:
        th, tw = page.tilelength, page.tilewidth
    else:  # strips: full-width segments of RowsPerStrip rows
        th, tw = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
    n_across = math.ceil(page.imagewidth / tw)
    out = np.full((h, w, 3), BACKGROUND, np.uint8)
    fh = page.parent.filehandle
    for ty in range(y // th, math.ceil((y + h) / th)):
        for tx in range(x // tw, math.ceil((x + w) / tw)):
            index = ty * n_across + tx
            if not page.databytecounts[index]:
                continue  # empty segment: background
            with lock:
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
            seg, indices, shape = page.decode(data, index, jpegtables=page.jpegtables)
            sy, sx = indices[2], indices[3]
            seg = seg[0, : shape[1], : shape[2], :3]
            ya, yb = max(y, sy), min(y + h, sy + seg.shape[0])
            xa, xb = max(x, sx), min(x + w, sx + seg.shape[1])
            out[ya - y : yb - y, xa - x : xb - x] = seg[ya - sy : yb - sy, xa - sx : xb - sx]
    return out


def read_level_region(slide: Slide, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width, 3) of ``level`` at level pixel (x, y); parts outside the slide are white."""
    lv = slide.levels[level]
    out = np.full((height, width, 3), BACKGROUND, np.uint8)
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + width, lv.width), min(y + height, lv.height)
    if xb <= xa or yb <= ya:
        return out
    if slide.backend == "tifffile":
        page = slide.wsi.series[0].levels[level].keyframe
        patch = _tiff_window(page, slide._lock, xa, ya, xb - xa, yb - ya)
    else:
        loc = (round(ya * lv.downsample_y), round(xa * lv.downsample_x))  # MONAI: level-0 (row, col)
        with slide._lock:
            patch, _ = slide.reader.get_data(slide.wsi, location=loc, size=(yb - ya, xb - xa), level=level)
        patch = np.asarray(patch)[..., :3]
    out[ya - y : yb - y, xa - x : xb - x] = patch
    return out


def read_region(slide: Slide, x0: int, y0: int, width: int, height: int, level: int = 0) -> np.ndarray:
    """RGB uint8 (height, width, 3) of ``level`` whose top-left is level-0 pixel (x0, y0) (OpenSlide convention)."""
    lv = slide.levels[level]
    return read_level_region(slide, level, round(x0 / lv.downsample_x), round(y0 / lv.downsample_y), width, height)


def read_thumbnail(slide: Slide, level: int | None = None, max_size: int = 2048, block: int = 2048) -> np.ndarray:
    """RGB uint8 image of a whole level (default: the coarsest) shrunk by an integer factor to <= ``max_size`` px.

    Read in blocks of ~``block`` level pixels and box-averaged (``downscale_local_mean``), so a single-level
    gigapixel TIFF costs only a block of memory. Output size: ceil(level size / factor).
    """
    level = len(slide.levels) - 1 if level is None else level
    lv = slide.levels[level]
    f = max(1, math.ceil(max(lv.width, lv.height) / max_size))
    step = f * max(1, block // f)
    out = np.empty((math.ceil(lv.height / f), math.ceil(lv.width / f), 3), np.uint8)
    for y in range(0, lv.height, step):
        for x in range(0, lv.width, step):
            patch = read_level_region(slide, level, x, y, min(step, lv.width - x), min(step, lv.height - y))
            small = patch if f == 1 else downscale_local_mean(patch, (f, f, 1), cval=BACKGROUND)
            out[y // f : y // f + small.shape[0], x // f : x // f + small.shape[1]] = np.round(small)
    return out


# ----------------------------------------------------------------------------------------------- tissue
def tissue_mask_from_rgb(thumbnail: np.ndarray, min_saturation: float = 0.07, min_object_px: int = 64) -> np.ndarray:
    """Boolean tissue mask (H, W) of an RGB uint8 thumbnail: Otsu on HSV saturation (never below
    ``min_saturation``, so a blank slide gives an empty mask), then objects and holes of <= ``min_object_px``
    thumbnail pixels removed.
    """
    saturation = rgb2hsv(thumbnail)[..., 1]
    threshold = threshold_otsu(saturation) if np.ptp(saturation) > 0 else 1.0
    mask = saturation > max(threshold, min_saturation)
    mask = remove_small_objects(mask, max_size=min_object_px)
    return remove_small_holes(mask, max_size=min_object_px)


def tissue_mask(
    slide: Slide,
    level_for_mask: int | None = None,
    max_size: int = 2048,
    min_saturation: float = 0.07,
    min_object_px: int = 64,
) -> np.ndarray:
    """Boolean tissue mask (rows, cols) of a low-resolution view of the slide (``read_thumbnail`` of
    ``level_for_mask``, default the coarsest level). It covers the whole slide: mask pixel (r, c) spans level-0
    pixels scaled by (level-0 height / rows, level-0 width / cols), which is how ``iter_tiles`` reads it.
    """
    thumb = read_thumbnail(slide, level_for_mask, max_size=max_size)
    return tissue_mask_from_rgb(thumb, min_saturation=min_saturation, min_object_px=min_object_px)


# ----------------------------------------------------------------------------------------------- tiling
class Tile(NamedTuple):
    """One tile: top-left in level-0 pixels (x0, y0) and in level pixels (x, y), RGB uint8 (tile, tile, 3)."""

    x0: int
    y0: int
    x: int
    y: int
    image: np.ndarray


def _starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Tile starts covering [0, length): every ``stride``, the last one flush with the end (0 if length <= tile)."""
    if length <= tile:
        return np.array([0])
    starts = np.arange(0, length - tile + 1, stride)
    return starts if starts[-1] + tile >= length else np.append(starts, length - tile)


def _tissue_fractions(mask: np.ndarray, boxes0: np.ndarray, size0: tuple[int, int]) -> np.ndarray:
    """Fraction of tissue in each level-0 box (N, 4: x0, y0, x1, y1), from the mask's integral image."""
    rows, cols = mask.shape
    sx, sy = cols / size0[0], rows / size0[1]
    c0 = np.clip(np.floor(boxes0[:, 0] * sx).astype(int), 0, cols - 1)
    r0 = np.clip(np.floor(boxes0[:, 1] * sy).astype(int), 0, rows - 1)
    c1 = np.clip(np.maximum(np.ceil(boxes0[:, 2] * sx).astype(int), c0 + 1), 1, cols)
    r1 = np.clip(np.maximum(np.ceil(boxes0[:, 3] * sy).astype(int), r0 + 1), 1, rows)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return inside / ((r1 - r0) * (c1 - c0))


class TileIterator:
    """Lazy tiles of one level: ``len()`` is known upfront (for tqdm), each tile is read when iterated."""

    def __init__(self, slide: Slide, level: int, tile_size: int, positions: np.ndarray):
        self.slide, self.level, self.tile_size = slide, level, tile_size
        self.positions = positions  # (N, 2) level (x, y)

    def __len__(self) -> int:
        return len(self.positions)

    def without(self, done: set[tuple[int, int]]) -> "TileIterator":
        """The tiles whose level (x, y) is not in ``done`` (nothing is read for the others)."""
        keep = [tuple(p) not in done for p in self.positions.tolist()]
        return TileIterator(self.slide, self.level, self.tile_size, self.positions[np.array(keep, bool)])

    def __iter__(self) -> Iterator[Tile]:
        lv = self.slide.levels[self.level]
        for x, y in self.positions.tolist():
            image = read_level_region(self.slide, self.level, x, y, self.tile_size, self.tile_size)
            yield Tile(round(x * lv.downsample_x), round(y * lv.downsample_y), x, y, image)


def iter_tiles(
    slide: Slide,
    level: int,
    tile_size: int,
    overlap: int,
    tissue_mask: np.ndarray | None = None,
    min_tissue_fraction: float = 0.05,
) -> TileIterator:
    """Tiles of ``tile_size`` x ``tile_size`` level pixels overlapping by ``overlap``, row by row.

    The grid covers the level; the last column/row is flush with the right/bottom edge (tiles are padded with
    white only when the level is smaller than a tile). With ``tissue_mask`` (from ``tissue_mask``), only tiles
    whose footprint is at least ``min_tissue_fraction`` tissue are kept. Returns a lazy iterable of ``Tile``
    (x0, y0 level-0; x, y level; image) with ``len()``.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap={overlap} must be in [0, tile_size={tile_size})")
    lv = slide.levels[choose_level(slide, level=level)]
    xs, ys = _starts(lv.width, tile_size, tile_size - overlap), _starts(lv.height, tile_size, tile_size - overlap)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)  # row by row: (x, y)
    if tissue_mask is not None:
        if tissue_mask.ndim != 2 or tissue_mask.size == 0:
            raise ValueError(f"tissue_mask must be a non-empty 2-D array, got shape {tissue_mask.shape}")
        boxes0 = np.column_stack(
            (
                grid[:, 0] * lv.downsample_x,
                grid[:, 1] * lv.downsample_y,
                np.minimum(grid[:, 0] + tile_size, lv.width) * lv.downsample_x,
                np.minimum(grid[:, 1] + tile_size, lv.height) * lv.downsample_y,
            )
        )
        size0 = (slide.levels[0].width, slide.levels[0].height)
        grid = grid[_tissue_fractions(tissue_mask.astype(bool), boxes0, size0) >= min_tissue_fraction]
    return TileIterator(slide, level, tile_size, grid)


# ----------------------------------------------------------------------------------------------- test slides
def _halve(image: np.ndarray) -> np.ndarray:
    """2x2 box average (odd last row/column dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    levels: int = 3,
    tile: int = 256,
    mpp: float = 0.25,
    compression: str = "zlib",
) -> Path:
    """Write an RGB uint8 (H, W, 3) image as a tiled pyramidal TIFF (a test/benchmark slide).

    Level l is a 2^l box-averaged copy (floor size), stored as a top-level reduced-resolution page
    (NewSubfileType=1) with resolution tags (``mpp`` um/px at level 0, in pixels per cm), the layout both
    ``tifffile`` (``series[0].levels``) and MONAI's tifffile ``WSIReader`` (one page per level) read as a
    pyramid. ``tile`` must be a multiple of 16; ``compression``: "zlib" (lossless) or "jpeg".
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{path}: image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if tile % 16:
        raise ValueError(f"tile={tile} must be a multiple of 16 (TIFF tiles)")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
        level_image = image
        for lvl in range(levels):
            if lvl:
                level_image = _halve(level_image)
            res = 1e4 / (mpp * 2**lvl)
            tif.write(
                level_image,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if lvl else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    return Path(path)
