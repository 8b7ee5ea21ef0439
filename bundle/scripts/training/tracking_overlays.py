"""Overlays logged to MLflow, drawn in memory (:func:`scripts.io.writers.overlay_image`): truth | prediction of a
validation output, and a scored image's prediction.

Coordinates: arrays are indexed (row, col); points are (x, y) = (col, row) in pixels. Images are RGB uint8
(H, W, 3). A class table is ``{class_id: {"name", "color": [r, g, b]}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from scripts.io.writers import overlay_image

__all__ = ["points_to_discs", "sample_overlay", "record_overlay", "bundle_class_table"]

PANEL_GAP = 4
"""White columns (pixels) between the truth and the prediction panels."""


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _rgb_uint8(image: Any) -> np.ndarray:
    """(3, H, W) float [0, 255] (or (H, W, 3)) -> RGB uint8 (H, W, 3)."""
    arr = _as_numpy(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 0, -1)
    return np.clip(np.round(arr.astype(np.float64)), 0, 255).astype(np.uint8)


def _label_2d(x: Any) -> np.ndarray:
    arr = _as_numpy(x)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr.astype(np.int32)


def points_to_discs(points_xy: Any, shape: tuple[int, int], radius: int = 3) -> np.ndarray:
    """An instance map (H, W) int32 with a disc of ``radius`` px, id k + 1, around each point (x, y) px."""
    pts = np.round(_as_numpy(points_xy).reshape(-1, 2)).astype(np.int64)
    out = np.zeros(shape, np.int32)
    if len(pts) == 0:
        return out
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = dy**2 + dx**2 <= radius**2
    rows = pts[:, 1:2] + dy[inside][None]
    cols = pts[:, 0:1] + dx[inside][None]
    ids = np.broadcast_to(np.arange(1, len(pts) + 1)[:, None], rows.shape)
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    out[rows[keep], cols[keep]] = ids[keep]
    return out


def _overlay(image: np.ndarray, inst: np.ndarray, classes: Any, class_table: Mapping) -> np.ndarray:
    """:func:`scripts.io.writers.overlay_image`; when a class is outside ``class_table`` all are drawn unclassified."""
    if isinstance(classes, Mapping):
        known = all(int(c) in class_table or int(c) == 0 for c in classes.values())
    elif classes is not None:
        known = set(np.unique(classes).tolist()) <= {0, *class_table}
    else:
        known = True
    return overlay_image(image, inst, classes if known else None, class_table)


def sample_overlay(image: Any, output: Mapping, class_table: Mapping) -> np.ndarray | None:
    """Side-by-side overlay of one evaluator output, RGB uint8 (H, 2 W + 4, 3): truth (left), prediction (right).

    ``image`` is (3, H, W) float in [0, 255] or (H, W, 3). Segmentor outputs give instance outlines (``inst``,
    ``pred_inst``), prompter outputs discs around the points (``points``/``classes``, ``pred_points``/
    ``pred_classes``, (x, y) px). ``None`` for any other output, or one whose maps do not match the image.
    """
    rgb = _rgb_uint8(image)
    panels = []
    for prefix in ("", "pred_"):
        if f"{prefix}inst" in output and "pred_inst" in output:
            inst = _label_2d(output[f"{prefix}inst"])
            types = output.get(f"{prefix}type")
            classes = None if types is None else _label_2d(types)
        elif f"{prefix}points" in output and "pred_points" in output:
            inst = points_to_discs(output[f"{prefix}points"], rgb.shape[:2])
            point_classes = output.get(f"{prefix}classes")
            classes = None if point_classes is None else {
                k + 1: int(c) for k, c in enumerate(_as_numpy(point_classes).ravel())
            }
        else:
            return None
        if inst.shape != rgb.shape[:2]:
            return None
        panels.append(_overlay(rgb, inst, classes, class_table))
    gap = np.full((rgb.shape[0], PANEL_GAP, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


def record_overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None,
                   class_table: Mapping) -> np.ndarray:
    """A scored image (RGB uint8 (H, W, 3)) with its predicted nuclei outlined in their class colours (same shape)."""
    return _overlay(np.asarray(image), np.asarray(inst_map), None if type_map is None else np.asarray(type_map),
                    class_table)


def bundle_class_table() -> dict:
    """The bundle's class table (``configs/metadata.json``); ``{}`` when it cannot be read."""
    from scripts.data.records import load_class_table

    try:
        return load_class_table()
    except (OSError, KeyError, ValueError):
        return {}
