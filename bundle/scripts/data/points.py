"""Ground-truth prompt points: one point per nucleus, guaranteed to lie inside it.

The point of a nucleus is its centroid when the pixel nearest to the centroid belongs to the nucleus;
otherwise (C-shapes, rings, crescents, split ids) it is the nucleus pixel farthest from the nucleus's border
(Euclidean distance transform of that nucleus alone, ties broken towards the centroid). Points are
(x, y) = (col, row) px, an integer point being a pixel centre.

Classes: type ids 1..C map to class indices 0..C-1 (class index = type id - 1). A nucleus's type is the
majority over its pixels with a nonzero type; without a type map (single-class data) every class index is 0;
a nucleus none of whose pixels is typed gets ``untyped_class`` (default 0).
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage


def _as_2d_int(array, name: str) -> np.ndarray:
    """A (H, W) or (1, H, W) array/tensor as an int64 numpy (H, W) array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (1, H, W), got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _interior_point(mask: np.ndarray, centroid_rc: np.ndarray) -> np.ndarray:
    """(row, col) of the pixel of ``mask`` farthest from its border; ties go to the one nearest the centroid."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    candidates = np.argwhere(distance == distance.max())
    nearest = np.argmin(((candidates - centroid_rc) ** 2).sum(1))
    return candidates[nearest]


def instance_points(
    inst_map: np.ndarray | torch.Tensor, type_map: np.ndarray | torch.Tensor | None = None, untyped_class: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One interior point, class and id per nucleus.

    Args:
        inst_map: (H, W) or (1, H, W) ints, 0 = background, any other value one nucleus (ids need not be contiguous).
        type_map: optional (H, W) or (1, H, W) ints, 0 = untyped/background, 1..C = type.
        untyped_class: class index of a nucleus without any typed pixel (when ``type_map`` is given).

    Returns:
        points (N, 2) float32 (x, y) px, classes (N,) int64 in 0..C-1, ids (N,) int64; sorted by id.
    """
    inst = _as_2d_int(inst_map, "inst_map")
    if inst.min(initial=0) < 0:
        raise ValueError(f"inst_map has negative ids ({inst.min()})")
    types = None
    if type_map is not None:
        types = _as_2d_int(type_map, "type_map")
        if types.shape != inst.shape:
            raise ValueError(f"type_map shape {types.shape} does not match inst_map {inst.shape}")
        if types.min(initial=0) < 0:
            raise ValueError(f"type_map has negative values ({types.min()})")
    ids, labels = np.unique(inst, return_inverse=True)
    labels = labels.reshape(inst.shape)
    if ids[0] == 0:
        ids = ids[1:]
    else:  # no background pixel: labels start at 0 for the first nucleus
        labels = labels + 1
    num = len(ids)
    if num == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)

    flat = labels.ravel()
    rows, cols = np.indices(inst.shape).reshape(2, -1)
    counts = np.bincount(flat, minlength=num + 1)[1:]
    centroid = np.stack(
        [np.bincount(flat, rows, minlength=num + 1)[1:] / counts, np.bincount(flat, cols, minlength=num + 1)[1:] / counts], axis=1
    )  # (N, 2) (row, col)

    nearest = np.floor(centroid + 0.5).astype(np.int64)
    inside = labels[nearest[:, 0], nearest[:, 1]] == np.arange(1, num + 1)
    points_rc = centroid.copy()
    slices = ndimage.find_objects(labels)
    for k in np.flatnonzero(~inside):
        window = slices[k]
        origin = np.array([window[0].start, window[1].start])
        points_rc[k] = origin + _interior_point(labels[window] == k + 1, centroid[k] - origin)

    classes = np.zeros(num, np.int64)
    if types is not None:
        typed = (flat > 0) & (types.ravel() > 0)
        num_types = int(types.max()) + 1
        votes = np.bincount(flat[typed] * num_types + types.ravel()[typed], minlength=(num + 1) * num_types)
        votes = votes.reshape(num + 1, num_types)[1:]
        classes = np.where(votes.sum(1) > 0, votes.argmax(1) - 1, untyped_class).astype(np.int64)
    points = points_rc[:, ::-1].astype(np.float32)
    return np.ascontiguousarray(points), classes, ids.astype(np.int64)


class NucleusPointsd(MapTransform):
    """Add ground-truth points and classes (from :func:`instance_points`) to a MONAI dictionary.

    Run after spatial augmentation. ``keys`` = (instance key, optional type key); the maps are channel-first
    (1, H, W) tensors or arrays. Adds ``points_key`` -> float32 tensor (N, 2) (x, y) px and ``classes_key`` ->
    int64 tensor (N,) of class indices 0..C-1 (type id - 1; 0 everywhere without a type map), plus
    ``ids_key`` -> int64 tensor (N,) of instance ids when ``ids_key`` is set.
    """

    def __init__(
        self,
        keys: KeysCollection = ("inst", "type"),
        points_key: str = "points",
        classes_key: str = "point_classes",
        ids_key: str | None = None,
        untyped_class: int = 0,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 1 <= len(self.keys) <= 2:
            raise ValueError(f"keys must be (inst_key,) or (inst_key, type_key), got {self.keys}")
        self.points_key = points_key
        self.classes_key = classes_key
        self.ids_key = ids_key
        self.untyped_class = untyped_class

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        inst_key = self.keys[0]
        if inst_key not in d:
            raise KeyError(f"NucleusPointsd: instance key {inst_key!r} not in the data (keys {list(d)})")
        type_key: Sequence[Hashable] | Hashable | None = self.keys[1] if len(self.keys) > 1 else None
        type_map = d.get(type_key) if type_key is not None else None
        if type_key is not None and type_map is None and not self.allow_missing_keys:
            raise KeyError(f"NucleusPointsd: type key {type_key!r} not in the data")
        points, classes, ids = instance_points(d[inst_key], type_map, self.untyped_class)
        d[self.points_key] = torch.from_numpy(points)
        d[self.classes_key] = torch.from_numpy(classes)
        if self.ids_key is not None:
            d[self.ids_key] = torch.from_numpy(ids)
        return d
