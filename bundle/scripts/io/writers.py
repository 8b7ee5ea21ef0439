"""Output files for one image (``<stem>``) in an output folder: label maps, GeoJSON, CSV and an overlay PNG.

Every file is written atomically (:mod:`scripts.io.atomic`): to a temporary file in the same folder, then
``os.replace``d, so a reader never sees a half-written file (a failed streaming writer leaves no file at all).
:func:`overlay_image` draws the overlay in memory (for MLflow, or any caller that does not want a file).

Coordinates: arrays are indexed (row, col); every stored point is (x, y) = (col, row) in pixels. Tables are the
rows of ``scripts.io.measurements.nucleus_table`` (pixel centres at integer coordinates).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

import numpy as np
import tifffile
from PIL import Image
from shapely.geometry import Polygon
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from scripts.io.atomic import atomic_open, atomic_path
from scripts.io.measurements import TABLE_COLUMNS, UNCLASSIFIED

# Measurements stored on each GeoJSON feature (table column -> QuPath measurement name).
GEOJSON_MEASUREMENTS = {
    "id": "Nucleus id",
    "class_score": "Class score",
    "pred_iou": "Predicted IoU",
    "area": "Area px^2",
    "perimeter": "Perimeter px",
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "hematoxylin_mean": "Hematoxylin OD mean",
}
UNCLASSIFIED_COLOR = (255, 255, 0)  # overlay colour of nuclei without a class
OVERLAY_PNG_LEVEL = 1  # zlib level of the overlay PNG: 4x faster to write than PIL's default 6, files ~4 % larger


# ----------------------------------------------------------------------------------------------- label maps
def write_label_maps(
    output_dir: str | Path, stem: str, inst_map: np.ndarray, type_map: np.ndarray | None = None
) -> dict[str, Path]:
    """Write ``<stem>_inst.tif`` (int32 instance ids) and, if given, ``<stem>_type.tif`` (uint8 class ids).

    zlib-compressed single-page TIFFs (``tifffile.imread`` reads them back). Returns ``{"inst": path, "type": path}``.
    """
    output_dir = Path(output_dir)
    if inst_map.ndim != 2 or not np.issubdtype(inst_map.dtype, np.integer):
        raise ValueError(f"{stem}: inst_map must be a 2-D integer array, got {inst_map.dtype} {inst_map.shape}")
    if inst_map.size and (inst_map.min() < 0 or inst_map.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{stem}: instance ids must fit int32 and be >= 0")
    if type_map is not None:  # checked before anything is written
        if type_map.shape != inst_map.shape:
            raise ValueError(f"{stem}: type_map shape {type_map.shape} does not match inst_map {inst_map.shape}")
        if type_map.size and (type_map.min() < 0 or type_map.max() > 255):
            raise ValueError(f"{stem}: class ids must be in 0..255 to be stored as uint8")
    written = {"inst": _write_tif(output_dir / f"{stem}_inst.tif", inst_map.astype(np.int32, copy=False))}
    if type_map is not None:
        written["type"] = _write_tif(output_dir / f"{stem}_type.tif", type_map.astype(np.uint8, copy=False))
    return written


def _write_tif(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, compression="zlib", photometric="minisblack")
    return path


# ----------------------------------------------------------------------------------------------- GeoJSON
def _number(value: Any) -> float | int | None:
    """A JSON-safe number: NaN/inf become None (JSON has no NaN)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def nucleus_feature(
    polygon: Polygon, row: Mapping[str, Any], class_table: Mapping[int, Mapping], shift: float = 0.5, decimals: int = 2
) -> dict:
    """One QuPath detection feature: Polygon geometry (closed ring, (x, y) + ``shift`` pixels), class, measurements.

    Unclassified nuclei (class 0) get no ``classification`` (QuPath shows them as unclassified). Measurements
    that are NaN (no image, no score) are left out, since QuPath reads measurements as name -> number.
    """
    ring = np.asarray(polygon.exterior.coords, dtype=np.float64) + shift
    coords = np.round(ring, decimals).tolist()
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    measurements = {name: _number(row[key]) for key, name in GEOJSON_MEASUREMENTS.items() if key in row}
    properties: dict[str, Any] = {
        "objectType": "detection",
        "measurements": {k: v for k, v in measurements.items() if v is not None},
    }
    cls = int(row.get("class", UNCLASSIFIED))
    if cls != UNCLASSIFIED:
        if cls not in class_table:
            raise ValueError(f"nucleus {row['id']}: class {cls} is not in the class table")
        entry = class_table[cls]
        properties["classification"] = {"name": entry["name"], "color": [int(c) for c in entry["color"]]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": properties}


def feature_json(polygon: Polygon, row: Mapping[str, Any], class_table: Mapping[int, Mapping], shift: float = 0.5,
                 decimals: int = 2) -> str:
    """:func:`nucleus_feature` as one line of compact JSON."""
    return json.dumps(nucleus_feature(polygon, row, class_table, shift, decimals), separators=(",", ":"))


class GeoJSONWriter:
    """Streaming GeoJSON FeatureCollection writer (features go to disk as they come; constant memory).

    Use as a context manager; the file appears (atomically) when the block exits without error::

        with GeoJSONWriter(path, class_table) as w:
            for tile in tiles:
                w.add(polygons, table)

    ``shift`` (pixels, default 0.5) is added to x and y: this module's pixel centres sit at integer coordinates,
    QuPath's pixel corners do, so +0.5 puts outlines exactly on the pixels in QuPath. ``properties`` (optional)
    go into the collection's ``properties`` member (the scale the image was segmented at; readers ignore it).
    """

    def __init__(self, path: str | Path, class_table: Mapping[int, Mapping], shift: float = 0.5, decimals: int = 2,
                 properties: Mapping[str, Any] | None = None):
        self.path, self.class_table, self.shift, self.decimals = Path(path), class_table, shift, decimals
        self.properties = dict(properties or {})
        self.count = 0
        self._ctx = None
        self._f: IO | None = None

    def __enter__(self) -> "GeoJSONWriter":
        self._ctx = atomic_open(self.path, "w", encoding="utf-8")
        self._f = self._ctx.__enter__()
        head = {"type": "FeatureCollection", **({"properties": self.properties} if self.properties else {})}
        self._f.write(json.dumps(head)[:-1] + ', "features": [')
        return self

    def add_feature(self, polygon: Polygon, row: Mapping[str, Any]) -> None:
        """Append one nucleus (its polygon and its table row)."""
        self.add_json(feature_json(polygon, row, self.class_table, self.shift, self.decimals))

    def add_json(self, feature: str) -> None:
        """Append one feature already encoded by :func:`feature_json` (a resumed slide's recorded nuclei)."""
        if self._f is None:
            raise RuntimeError(f"{self.path}: GeoJSONWriter used outside its `with` block")
        self._f.write(("\n" if self.count == 0 else ",\n") + feature)
        self.count += 1

    def add(self, polygons: Mapping[int, Polygon], table: Iterable[Mapping[str, Any]]) -> None:
        """Append every row of ``table`` with ``polygons[row["id"]]``; a row without a polygon is an error."""
        for row in table:
            if row["id"] not in polygons:
                raise KeyError(f"{self.path}: nucleus {row['id']} has no polygon")
            self.add_feature(polygons[row["id"]], row)

    def __exit__(self, *exc: Any) -> bool | None:
        if exc[0] is None:
            self._f.write("\n]}\n")
        self._f = None
        return self._ctx.__exit__(*exc)


def write_geojson(
    path: str | Path,
    polygons: Mapping[int, Polygon],
    table: Iterable[Mapping[str, Any]],
    class_table: Mapping[int, Mapping],
    shift: float = 0.5,
    properties: Mapping[str, Any] | None = None,
) -> Path:
    """Write a QuPath-importable FeatureCollection: one detection Polygon per row of ``table`` (see GeoJSONWriter)."""
    with GeoJSONWriter(path, class_table, shift=shift, properties=properties) as writer:
        writer.add(polygons, table)
    return Path(path)


# ----------------------------------------------------------------------------------------------- CSV
def csv_cell(value: Any) -> Any:
    """A table value as a CSV cell: None and NaN become empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


class CSVWriter:
    """Streaming CSV writer, one row per nucleus with ``TABLE_COLUMNS``; None/NaN are written as empty cells.

    Use as a context manager; the file appears (atomically) when the block exits without error.
    """

    def __init__(self, path: str | Path, columns: tuple[str, ...] = TABLE_COLUMNS):
        self.path, self.columns = Path(path), columns
        self.count = 0
        self._ctx = None
        self._writer: csv.DictWriter | None = None

    def __enter__(self) -> "CSVWriter":
        self._ctx = atomic_open(self.path, "w", newline="", encoding="utf-8")
        f = self._ctx.__enter__()
        self._writer = csv.DictWriter(f, fieldnames=list(self.columns), extrasaction="ignore")
        self._writer.writeheader()
        return self

    def add(self, table: Iterable[Mapping[str, Any]]) -> None:
        """Append rows (missing columns are an error)."""
        if self._writer is None:
            raise RuntimeError(f"{self.path}: CSVWriter used outside its `with` block")
        for row in table:
            missing = [c for c in self.columns if c not in row]
            if missing:
                raise KeyError(f"{self.path}: row {row.get('id')} lacks columns {missing}")
            self._writer.writerow({c: csv_cell(row[c]) for c in self.columns})
            self.count += 1

    def __exit__(self, *exc: Any) -> bool | None:
        self._writer = None
        return self._ctx.__exit__(*exc)


def write_csv(path: str | Path, table: Iterable[Mapping[str, Any]]) -> Path:
    """Write one row per nucleus: ``TABLE_COLUMNS`` (id, centroid_x, centroid_y in pixels, class, ...)."""
    with CSVWriter(path) as writer:
        writer.add(table)
    return Path(path)


# ----------------------------------------------------------------------------------------------- overlay
def _class_colors(class_table: Mapping[int, Mapping], unclassified: tuple[int, int, int]) -> np.ndarray:
    """(max_class + 1, 3) uint8 colour look-up table; row 0 and unknown ids get ``unclassified``."""
    n = max(class_table, default=0) + 1
    lut = np.tile(np.asarray(unclassified, np.uint8), (n, 1))
    for cid, entry in class_table.items():
        lut[cid] = entry["color"]
    return lut


def _pixel_classes(inst_map: np.ndarray, classes: np.ndarray | Mapping[int, int]) -> np.ndarray:
    """Class id per pixel (H, W) from a type map (returned as is) or a nucleus id -> class dict."""
    if isinstance(classes, np.ndarray):
        if classes.shape != inst_map.shape:
            raise ValueError(f"type_map shape {classes.shape} does not match inst_map {inst_map.shape}")
        return classes
    ids = np.array(sorted(classes), dtype=np.int64)
    values = np.array([classes[i] for i in ids], dtype=np.int64)
    pos = np.clip(np.searchsorted(ids, inst_map), 0, max(len(ids) - 1, 0))
    found = (ids[pos] == inst_map) if len(ids) else np.zeros(inst_map.shape, bool)
    return np.where(found, values[pos] if len(ids) else 0, UNCLASSIFIED)


def _thumbnail(image: np.ndarray, inst_map: np.ndarray, classes: np.ndarray, max_size: int | None):
    """Downscale so that the longer side is <= max_size: image anti-aliased, label maps by nearest neighbour."""
    h, w = inst_map.shape
    if max_size is None or max(h, w) <= max_size:
        return image, inst_map, classes
    scale = max_size / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = ((np.arange(out_h) + 0.5) * h / out_h).astype(np.intp)
    cols = ((np.arange(out_w) + 0.5) * w / out_w).astype(np.intp)
    small = resize(image, (out_h, out_w), order=1, anti_aliasing=True, preserve_range=True)
    return np.round(small).astype(np.uint8), inst_map[np.ix_(rows, cols)], classes[np.ix_(rows, cols)]


def overlay_image(
    image: np.ndarray,
    inst_map: np.ndarray,
    classes: np.ndarray | Mapping[int, int] | None,
    class_table: Mapping[int, Mapping],
    max_size: int | None = None,
    unclassified_color: tuple[int, int, int] = UNCLASSIFIED_COLOR,
) -> np.ndarray:
    """``image`` with each nucleus outline (inner boundary pixels) drawn in its class colour: RGB uint8 (H, W, 3),
    drawn in memory.

    Args:
        image: RGB uint8 (H, W, 3).
        inst_map: int (H, W), 0 = background.
        classes: a type map (H, W) of class ids, or nucleus id -> class id, or None (all ``unclassified_color``).
        class_table: ``{class_id: {"name", "color": [r, g, b]}}``; empty (a model trained without classes): every
            outline ``unclassified_color``.
        max_size: if set, the longer side of the result in pixels (image and labels are downscaled first; a
            thumbnail for slides).

    Raises:
        ValueError: a wrong image type or shape, or a class id missing from a non-empty ``class_table``.
    """
    if not class_table:
        classes = None
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if inst_map.shape != image.shape[:2]:
        raise ValueError(f"inst_map shape {inst_map.shape} does not match image {image.shape[:2]}")
    pixel_classes = _pixel_classes(inst_map, {} if classes is None else classes)
    image, inst_map, pixel_classes = _thumbnail(image, inst_map, pixel_classes, max_size)
    lut = _class_colors(class_table, unclassified_color)
    boundary = find_boundaries(inst_map, mode="inner") & (inst_map > 0)
    cls = pixel_classes[boundary].astype(np.int64)
    unknown = np.setdiff1d(np.unique(cls), [UNCLASSIFIED, *class_table])
    if unknown.size:
        raise ValueError(f"class ids {unknown.tolist()} are not in the class table (ids {sorted(class_table)})")
    out = image.copy()
    out[boundary] = lut[cls]
    return out


def write_overlay(
    path: str | Path,
    image: np.ndarray,
    inst_map: np.ndarray,
    classes: np.ndarray | Mapping[int, int] | None,
    class_table: Mapping[int, Mapping],
    max_size: int | None = None,
    unclassified_color: tuple[int, int, int] = UNCLASSIFIED_COLOR,
) -> Path:
    """PNG of :func:`overlay_image` (same arguments) at ``path``; errors name ``path``."""
    try:
        out = overlay_image(image, inst_map, classes, class_table, max_size, unclassified_color)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(out).save(tmp, format="PNG", compress_level=OVERLAY_PNG_LEVEL)
    return Path(path)
