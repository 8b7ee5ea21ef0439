"""Instance maps to MONAI Label's pathology annotation JSON: one polygon per nucleus, never merged by class.

MONAI Label's ``FindContoursd`` traces one contour set per *class* mask, so touching nuclei of one class merge
into one polygon. Here every nucleus is outlined from its own mask (``scripts.io.measurements.instance_polygons``)
and becomes one element of the annotation::

    {"location": [x, y], "size": [w, h],
     "elements": [{"label": "Epithelial", "contours": [[[x, y], ...]], "id": 1, "score": 0.93, "iou": 0.88}, ...],
     "labels": {"Epithelial": [0, 200, 0], ...}}

which is what ``monailabel.utils.others.pathology`` turns into ASAP XML / DSA JSON. Contour vertices are level-0
slide pixels in the pixel-*corner* convention of QuPath, ASAP and DSA (pixel (col, row) covers [x, x + 1] x
[y, y + 1]): the outline runs along the pixel edges of the mask, so its vertices are integers and the polygon
lies inside the requested region [x, x + w] x [y, y + h].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scripts.io.measurements import instance_polygons


def _ring(polygon) -> list[list[float]]:
    """Exterior ring without the closing vertex; integers where the vertex is on the pixel grid."""
    coords = np.asarray(polygon.exterior.coords)[:-1]
    if np.all(coords == np.round(coords)):
        return coords.astype(np.int64).tolist()
    return np.round(coords, 2).tolist()


def annotation_from_instances(inst_map: np.ndarray, classes: np.ndarray, scores: np.ndarray, ious: np.ndarray,
                              location: tuple[int, int], class_names: dict[int, str],
                              colors: dict[str, list[int]], simplify_tolerance: float = 0.5) -> dict[str, Any]:
    """One element per nucleus id 1..M of ``inst_map`` (row i of ``classes``/``scores``/``ious`` = id i + 1).

    Args:
        inst_map: (H, W) int ids of the region. location: (x, y) level-0 px of the region's top-left pixel.
        class_names: class id -> label name (ids without a name are labelled "class <id>").
        colors: label name -> [r, g, b].
        simplify_tolerance: Douglas-Peucker tolerance in px (0.5 keeps the outline within half a pixel).
    """
    height, width = inst_map.shape
    # pixel centres of this module are at integer coordinates; +0.5 moves the outline to pixel corners
    offset = (float(location[0]) + 0.5, float(location[1]) + 0.5)
    polygons = instance_polygons(inst_map.astype(np.int32), offset_xy=offset, simplify_tolerance=simplify_tolerance)
    elements = []
    used: dict[str, list[int]] = {}
    for nid in sorted(polygons):
        cls = int(classes[nid - 1])
        name = class_names.get(cls, f"class {cls}")
        used[name] = colors.get(name, [128, 128, 128])
        elements.append({
            "label": name,
            "contours": [_ring(polygons[nid])],
            "id": int(nid),
            "score": round(float(scores[nid - 1]), 4),
            "iou": round(float(ious[nid - 1]), 4),
        })
    return {
        "location": [int(location[0]), int(location[1])],
        "size": [int(width), int(height)],
        "elements": elements,
        "labels": used,
    }
