"""Per-nucleus measurements and outline polygons from an instance map.

Coordinates: arrays are indexed (row, col); every point returned here is (x, y) = (col, row) in pixels, with
``offset_xy`` added (the level-0 position of the tile's top-left pixel for whole slides).

Pixel convention (centroids and polygons alike): the pixel at (row r, col c) is the unit square centred on
(x=c, y=r), i.e. it spans [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]. A polygon outline therefore runs along the
pixel edges at half-integer coordinates, and before simplification its area is the pixel count. Viewers that put
integer coordinates on pixel *corners* (QuPath, OpenSeadragon) need +0.5 in x and y: see
``scripts.io.writers.write_geojson``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon
from skimage.color import rgb2hed
from skimage.measure import find_contours, regionprops, regionprops_table

from scripts.data.records import load_class_table

# Columns of the table, in the order the CSV writer uses.
TABLE_COLUMNS = (
    "id",
    "centroid_x",
    "centroid_y",
    "class",
    "class_name",
    "class_score",
    "pred_iou",
    "area",
    "perimeter",
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "hematoxylin_mean",
)

UNCLASSIFIED = 0  # class id of a nucleus the classes dict does not mention; its class_name is None


def _check_inst_map(inst_map: np.ndarray) -> np.ndarray:
    if inst_map.ndim != 2 or not np.issubdtype(inst_map.dtype, np.integer):
        raise ValueError(f"inst_map must be a 2-D integer array (H, W), got {inst_map.dtype} {inst_map.shape}")
    if inst_map.size and inst_map.min() < 0:
        raise ValueError("inst_map must be >= 0 (0 = background)")
    return inst_map.astype(np.int32, copy=False)


def hematoxylin_channel(image: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (H, W) float64 of an RGB uint8 image (H, W, 3), by ``skimage.color.rgb2hed``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return rgb2hed(image)[..., 0]


def nucleus_table(
    inst_map: np.ndarray,
    image: np.ndarray | None = None,
    classes: dict[int, int] | None = None,
    class_scores: dict[int, float] | None = None,
    iou_preds: dict[int, float] | None = None,
    offset_xy: tuple[float, float] = (0, 0),
    class_table: dict[int, dict] | None = None,
) -> list[dict[str, Any]]:
    """One row per nucleus of ``inst_map``, sorted by id, with the keys of ``TABLE_COLUMNS``.

    Args:
        inst_map: int (H, W), 0 = background; ids need not be contiguous.
        image: RGB uint8 (H, W, 3) for ``hematoxylin_mean`` (mean rgb2hed channel 0 over the nucleus); None -> NaN.
        classes: nucleus id -> class id of the class table; ids missing -> class 0 (``UNCLASSIFIED``), name None.
        class_scores: nucleus id -> classification score; missing -> NaN.
        iou_preds: nucleus id -> mask IoU predicted by the segmentor; missing -> NaN.
        offset_xy: (x, y) in pixels added to the centroids (level-0 position of the tile for whole slides).
        class_table: ``{class_id: {"name", "color"}}``; defaults to ``load_class_table()``. An empty table (a model
            trained without classes) leaves every nucleus unclassified; otherwise a class it lacks is an error.

    Returns:
        rows with ``centroid_x`` = col + offset_x and ``centroid_y`` = row + offset_y (pixel centres at integer
        coordinates), ``area`` in pixels, ``perimeter`` in pixels (skimage 4-connected estimate), ``area_um2`` and
        ``perimeter_um`` NaN (:func:`with_microns` fills them when the resolution is known), ``eccentricity``
        and ``solidity`` in [0, 1].
    """
    inst_map = _check_inst_map(inst_map)
    if image is not None and image.shape[:2] != inst_map.shape:
        raise ValueError(f"image shape {image.shape[:2]} does not match inst_map {inst_map.shape}")
    class_table = load_class_table() if class_table is None else class_table
    classes, class_scores, iou_preds = classes or {}, class_scores or {}, iou_preds or {}

    props = ["label", "centroid", "area", "perimeter", "eccentricity", "solidity"]
    intensity = None if image is None else hematoxylin_channel(image)
    if intensity is not None:
        props.append("intensity_mean")
    t = regionprops_table(inst_map, intensity_image=intensity, properties=props)
    n = len(t["label"])
    hema = t["intensity_mean"] if intensity is not None else np.full(n, np.nan)

    rows = []
    for i in range(n):
        nid = int(t["label"][i])
        cls = int(classes.get(nid, UNCLASSIFIED)) if class_table else UNCLASSIFIED
        if cls != UNCLASSIFIED and cls not in class_table:
            raise ValueError(f"nucleus {nid}: class {cls} is not in the class table (ids {sorted(class_table)})")
        rows.append(
            {
                "id": nid,
                "centroid_x": float(t["centroid-1"][i]) + float(offset_xy[0]),
                "centroid_y": float(t["centroid-0"][i]) + float(offset_xy[1]),
                "class": cls,
                "class_name": class_table[cls]["name"] if cls != UNCLASSIFIED else None,
                "class_score": float(class_scores.get(nid, math.nan)),
                "pred_iou": float(iou_preds.get(nid, math.nan)),
                "area": int(t["area"][i]),
                "perimeter": float(t["perimeter"][i]),
                "area_um2": math.nan,
                "perimeter_um": math.nan,
                "eccentricity": float(t["eccentricity"][i]),
                "solidity": float(t["solidity"][i]),
                "hematoxylin_mean": float(hema[i]),
            }
        )
    return rows


def with_microns(table: list[dict[str, Any]], mpp: float | None) -> list[dict[str, Any]]:
    """Fill ``area_um2`` and ``perimeter_um`` of the rows (in place) from their px values at ``mpp`` µm/px of the
    pixels they are measured in; unknown ``mpp`` (None) leaves them NaN."""
    if mpp is not None:
        for row in table:
            row["area_um2"] = row["area"] * mpp * mpp
            row["perimeter_um"] = row["perimeter"] * mpp
    return table


def _largest_polygon(geom: shapely.Geometry) -> Polygon | None:
    """The largest-area Polygon in ``geom`` (Polygon, MultiPolygon or GeometryCollection); None if it has none."""
    polys = [p for part in shapely.get_parts(geom) for p in shapely.get_parts(part) if isinstance(p, Polygon)]
    polys = [p for p in polys if not p.is_empty]
    return max(polys, key=lambda p: p.area) if polys else None


def _staircase(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(x, y) ring along the pixel edges from a contour of a 2x pixel-repeated mask (in original pixel units).

    Every contour vertex lies on a pixel edge: x or y is a half-integer (never both), the other a quarter.
    Marching squares cuts each corner between a vertex on a vertical edge and one on a horizontal edge; the
    pixel corner (x of the first, y of the second) is put back, so the ring encloses exactly the pixels.
    """
    on_vertical = np.mod(cols * 2, 2) == 1  # exact: contour coordinates are multiples of 1/4
    xy = np.column_stack((cols, rows))
    nxt = np.roll(np.arange(len(xy)), -1)
    turn = on_vertical != on_vertical[nxt]
    corners = np.where(on_vertical[:, None], np.column_stack((cols, rows[nxt])), np.column_stack((cols[nxt], rows)))
    out = np.empty((len(xy) + turn.sum(), 2))
    pos = np.arange(len(xy)) + np.concatenate(([0], np.cumsum(turn)[:-1]))  # where each vertex lands
    out[pos] = xy
    out[pos[turn] + 1] = corners[turn]
    return np.roll(out, -np.lexsort((out[:, 1], out[:, 0]))[0], axis=0)  # start at a corner (kept by simplify)


def _ring_area(ring: np.ndarray) -> float:
    """Unsigned shoelace area of an (N, 2) ring."""
    a, b = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(a, np.roll(b, -1)) - np.dot(b, np.roll(a, -1))))


def _valid_polygon(ring_xy: np.ndarray) -> Polygon | None:
    """A valid Polygon from an (N, 2) (x, y) ring, repairing self-intersections; largest part if split."""
    if len(ring_xy) < 3:
        return None
    poly = Polygon(ring_xy)
    if not poly.is_valid:
        poly = _largest_polygon(shapely.make_valid(poly))
        poly = None if poly is None else shapely.normalize(poly)  # ring starts at its lowest-left corner again
    return poly if poly is not None and poly.area > 0 else None


def instance_polygons(
    inst_map: np.ndarray, offset_xy: tuple[float, float] = (0, 0), simplify_tolerance: float = 0.5
) -> dict[int, Polygon]:
    """One valid shapely Polygon per nucleus id: the outline of its mask in (x, y) = (col, row) + offset_xy pixels.

    The outline follows the pixel edges of the mask (pixel-centre convention of this module: a pixel spans
    +-0.5 around its (col, row)), so before simplification the polygon area equals the pixel count. It is
    traced with ``skimage.measure.find_contours`` (level 0.5, foreground 8-connected) on the mask upsampled 2x
    by pixel repetition in a padded crop, with the corners marching squares cuts put back. Holes are filled
    (outer ring only); a mask split in several parts keeps its largest part; self-intersections (pixels that
    touch by a corner) are repaired with ``shapely.make_valid``, keeping the largest part. ``simplify_tolerance``
    (pixels; 0 only drops collinear vertices) is the Douglas-Peucker tolerance, topology preserved.
    """
    inst_map = _check_inst_map(inst_map)
    ox, oy = float(offset_xy[0]), float(offset_xy[1])
    polygons: dict[int, Polygon] = {}
    for region in regionprops(inst_map):
        r0, c0, _, _ = region.bbox
        up = np.pad(region.image.repeat(2, axis=0).repeat(2, axis=1), 1).astype(np.uint8)  # this id only
        # outer ring = the contour enclosing the largest area (the others are holes or smaller parts)
        contours = find_contours(up, 0.5, fully_connected="high")  # closed: the crop is padded
        contour = max(contours, key=_ring_area) if contours else None
        poly = None
        if contour is not None:
            # upsampled (row, col) u -> original pixel coordinate (u - 1) / 2 - 0.25
            rows = (contour[:-1, 0] - 1) / 2 - 0.25 + r0
            cols = (contour[:-1, 1] - 1) / 2 - 0.25 + c0
            poly = _valid_polygon(_staircase(rows, cols) + (ox, oy))
        if poly is None:
            raise RuntimeError(f"nucleus {region.label}: no outline found for a mask of {region.area} px")
        polygons[int(region.label)] = poly
    return _simplify(polygons, simplify_tolerance)


def _simplify(polygons: dict[int, Polygon], tolerance: float) -> dict[int, Polygon]:
    """Douglas-Peucker on all polygons at once; topology-preserving redo where the fast one turns invalid."""
    if not polygons:
        return polygons
    original = np.array(list(polygons.values()), dtype=object)
    simple = shapely.simplify(original, max(tolerance, 0.0), preserve_topology=False)  # 0: drops collinear points
    bad = ~shapely.is_valid(simple) | (shapely.area(simple) <= 0) | (shapely.get_type_id(simple) != 3)
    if bad.any():
        redo = shapely.simplify(original[bad], max(tolerance, 0.0), preserve_topology=True)
        simple[bad] = np.where(shapely.is_valid(redo) & (shapely.area(redo) > 0), redo, original[bad])
    return dict(zip(polygons, simple))
