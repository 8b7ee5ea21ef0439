"""Nucleus instance metrics over label maps, with the definitions of HoVer-Net's and PanNuke's metric code.

Pure numpy/scipy functions; no torch. Conventions:

* Label maps are integer arrays (H, W) indexed (row, col); 0 is background, every other value is one
  nucleus. Ids need not be contiguous (``[0, 2, 7, 40]`` is fine); negative ids are an error.
* Points are (x, y) = (col, row) in pixels. Distances are in pixels.
* Areas and intersections are pixel counts.
* Undefined values are ``None`` (null in JSON) and are skipped by every mean.

Empty cases (PQ, DQ, SQ, AJI, AJI+ of one image):

* ground truth and prediction both empty: all undefined (``None``);
* exactly one of them empty: PQ = DQ = AJI = AJI+ = 0 and SQ undefined (no true positive).
  More generally SQ is undefined whenever TP = 0.

Pairwise intersections come from one vectorised pass over the pixels (a sparse contingency table of
(true id, pred id) pairs): no per-pixel loops and no per-pair mask loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

AJI_EPS = 1.0e-6  # HoVer-Net's smoothing of the IoU used to choose AJI / AJI+ pairs (changes tie-breaking only)

__all__ = [
    "InstanceOverlap",
    "PanopticQuality",
    "instance_overlap",
    "panoptic_quality",
    "panoptic_quality_from_overlap",
    "aggregated_jaccard_index",
    "aggregated_jaccard_index_plus",
    "aji_from_overlap",
    "aji_plus_from_overlap",
    "instance_classes",
    "instance_centroids",
    "class_panoptic_quality",
]


# ----------------------------------------------------------------------------------------------- label indexing
def _index_labels(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted nonzero ids (N,) and a flat index map: 0 for background, k + 1 for pixels of ``ids[k]``."""
    flat = np.asarray(label).ravel()
    if flat.dtype.kind not in "iub":
        if flat.size and not np.all(np.mod(flat, 1) == 0):
            raise ValueError(f"instance map must hold integer ids, got dtype {flat.dtype} with fractional values")
    flat = flat.astype(np.int64, copy=False)
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0:
        raise ValueError(f"instance ids must be >= 0, got {lo}")
    if hi < max(1 << 20, 4 * flat.size):  # dense lookup table: O(pixels)
        present = np.bincount(flat, minlength=hi + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(hi + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), lut[flat]
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return ids[1:].astype(np.int64), inverse.astype(np.int64)
    return ids.astype(np.int64), inverse.astype(np.int64) + 1


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{what}: shapes differ, {np.shape(a)} vs {np.shape(b)}")


# ----------------------------------------------------------------------------------------------- overlap table
@dataclass(frozen=True)
class InstanceOverlap:
    """Pairwise pixel overlap of the true and predicted instances of one image.

    Attributes:
        true_ids: sorted nonzero true ids (N,).
        pred_ids: sorted nonzero predicted ids (M,).
        true_area: pixels per true instance (N,).
        pred_area: pixels per predicted instance (M,).
        inter: intersection in pixels (N, M), float64.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """Union in pixels (N, M): |T| + |P| - |T n P|."""
        return self.true_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """Exact IoU (N, M); 0 for pairs that do not intersect."""
        union = self.union
        return np.divide(self.inter, union, out=np.zeros_like(self.inter), where=union > 0)

    def select(self, true_keep: np.ndarray, pred_keep: np.ndarray) -> "InstanceOverlap":
        """The sub-table of the instances where the boolean masks ``true_keep`` (N,), ``pred_keep`` (M,) hold."""
        return InstanceOverlap(
            self.true_ids[true_keep],
            self.pred_ids[pred_keep],
            self.true_area[true_keep],
            self.pred_area[pred_keep],
            self.inter[np.ix_(true_keep, pred_keep)],
        )


def _overlap_from_index(
    t_idx: np.ndarray, n_true: int, p_idx: np.ndarray, n_pred: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Areas (N,), (M,) and intersections (N, M) from flat index maps (0 = background, k + 1 = instance k)."""
    true_area = np.bincount(t_idx, minlength=n_true + 1)[1:].astype(np.float64)
    pred_area = np.bincount(p_idx, minlength=n_pred + 1)[1:].astype(np.float64)
    inter = np.zeros((n_true, n_pred), np.float64)
    both = (t_idx > 0) & (p_idx > 0)
    if n_true and n_pred and both.any():
        keys, counts = np.unique((t_idx[both] - 1) * n_pred + (p_idx[both] - 1), return_counts=True)
        inter[keys // n_pred, keys % n_pred] = counts
    return true_area, pred_area, inter


def instance_overlap(true_inst: np.ndarray, pred_inst: np.ndarray) -> InstanceOverlap:
    """Pairwise overlap table of two instance maps (H, W) of the same shape (ids need not be contiguous)."""
    _check_same_shape(true_inst, pred_inst, "instance_overlap")
    true_ids, t_idx = _index_labels(true_inst)
    pred_ids, p_idx = _index_labels(pred_inst)
    return InstanceOverlap(true_ids, pred_ids, *_overlap_from_index(t_idx, true_ids.size, p_idx, pred_ids.size))


# ----------------------------------------------------------------------------------------------- panoptic quality
@dataclass(frozen=True)
class PanopticQuality:
    """PQ = DQ x SQ of one image (Kirillov et al.; HoVer-Net ``get_fast_pq``).

    DQ = TP / (TP + FP/2 + FN/2); SQ = (sum of matched IoU) / TP; PQ = DQ * SQ.
    ``None`` where undefined: all three when both maps are empty, SQ when TP = 0 (PQ is then 0).
    """

    pq: float | None
    dq: float | None
    sq: float | None
    tp: int
    fp: int
    fn: int
    iou_sum: float


def panoptic_quality_from_overlap(overlap: InstanceOverlap, match_iou: float = 0.5) -> PanopticQuality:
    """PQ, DQ, SQ from an overlap table (see :func:`panoptic_quality`)."""
    if match_iou < 0:
        raise ValueError(f"match_iou must be >= 0, got {match_iou}")
    n_true, n_pred = overlap.inter.shape
    iou = overlap.iou
    if match_iou >= 0.5:  # IoU > 0.5 pairs are unique: each instance overlaps at most one other by more than half
        rows, cols = np.nonzero(iou > match_iou)
    elif n_true and n_pred:  # maximal unique pairing, as HoVer-Net for thresholds below 0.5
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > match_iou
        rows, cols = rows[keep], cols[keep]
    else:
        rows = cols = np.zeros(0, np.int64)
    tp = int(rows.size)
    fp, fn = n_pred - tp, n_true - tp
    iou_sum = float(iou[rows, cols].sum())
    if tp + fp + fn == 0:
        return PanopticQuality(None, None, None, 0, 0, 0, 0.0)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else None
    return PanopticQuality(dq * sq if tp else 0.0, dq, sq, tp, fp, fn, iou_sum)


def panoptic_quality(true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5) -> PanopticQuality:
    """Panoptic quality of one image, as HoVer-Net's ``get_fast_pq``.

    A true and a predicted instance are a pair (a TP) when IoU > ``match_iou`` (strictly). For
    ``match_iou >= 0.5`` such pairs are unique without any assignment; below 0.5 the pairs are the Hungarian
    (maximum total IoU) assignment restricted to IoU > ``match_iou``. Unpaired predictions are FP, unpaired
    truths FN. SQ divides by TP exactly (HoVer-Net adds 1e-6 to TP; the difference is < 1e-6 relative).

    Args:
        true_inst, pred_inst: instance maps (H, W), 0 = background, ids need not be contiguous.
        match_iou: IoU threshold for a pair.
    """
    return panoptic_quality_from_overlap(instance_overlap(true_inst, pred_inst), match_iou)


# ----------------------------------------------------------------------------------------------- AJI / AJI+
def _aji_from_pairs(overlap: InstanceOverlap, rows: np.ndarray, cols: np.ndarray) -> float:
    """sum |T n P| over pairs / (sum |T u P| over pairs + area of unpaired truths + area of unpaired predictions)."""
    inter = overlap.inter[rows, cols].sum()
    union = overlap.union[rows, cols].sum()
    unpaired_true = np.ones(overlap.true_area.size, bool)
    unpaired_true[rows] = False
    unpaired_pred = np.ones(overlap.pred_area.size, bool)
    unpaired_pred[cols] = False
    union += overlap.true_area[unpaired_true].sum() + overlap.pred_area[unpaired_pred].sum()
    return float(inter / union)


def _aji_iou(overlap: InstanceOverlap) -> np.ndarray:
    """HoVer-Net's pairing score |T n P| / (|T u P| + 1e-6), 0 where there is no intersection."""
    return np.where(overlap.inter > 0, overlap.inter / (overlap.union + AJI_EPS), 0.0)


def aji_from_overlap(overlap: InstanceOverlap) -> float | None:
    """AJI from an overlap table (see :func:`aggregated_jaccard_index`)."""
    n_true, n_pred = overlap.inter.shape
    if n_true == 0 and n_pred == 0:
        return None
    if n_true == 0 or n_pred == 0:
        return 0.0
    score = _aji_iou(overlap)
    best = np.argmax(score, axis=1)  # first (lowest id) on ties, as HoVer-Net with contiguous ids
    rows = np.flatnonzero(score[np.arange(n_true), best] > 0)
    return _aji_from_pairs(overlap, rows, best[rows])


def aji_plus_from_overlap(overlap: InstanceOverlap) -> float | None:
    """AJI+ from an overlap table (see :func:`aggregated_jaccard_index_plus`)."""
    n_true, n_pred = overlap.inter.shape
    if n_true == 0 and n_pred == 0:
        return None
    if n_true == 0 or n_pred == 0:
        return 0.0
    score = _aji_iou(overlap)
    rows, cols = linear_sum_assignment(-score)
    keep = score[rows, cols] > 0
    return _aji_from_pairs(overlap, rows[keep], cols[keep])


def aggregated_jaccard_index(true_inst: np.ndarray, pred_inst: np.ndarray) -> float | None:
    """Aggregated Jaccard Index of one image, as HoVer-Net's ``get_fast_aji`` (the MoNuSeg AJI).

    Every true instance T takes the prediction P of maximum IoU (smoothed by 1e-6 in the denominator, as
    HoVer-Net) if that IoU is > 0; a prediction may be taken by several truths. AJI = sum |T n P| over these
    pairs / (sum |T u P| over them + areas of truths without a pair + areas of predictions taken by none).
    ``None`` when both maps are empty, 0 when exactly one is.
    """
    return aji_from_overlap(instance_overlap(true_inst, pred_inst))


def aggregated_jaccard_index_plus(true_inst: np.ndarray, pred_inst: np.ndarray) -> float | None:
    """AJI+ of one image, as HoVer-Net's ``get_fast_aji_plus``.

    As :func:`aggregated_jaccard_index` but the pairs are one-to-one: the Hungarian assignment
    (``scipy.optimize.linear_sum_assignment``) maximising the total smoothed IoU, keeping pairs with IoU > 0.
    ``None`` when both maps are empty, 0 when exactly one is.
    """
    return aji_plus_from_overlap(instance_overlap(true_inst, pred_inst))


# ----------------------------------------------------------------------------------------------- instance attributes
def _classes_from_index(idx: np.ndarray, n_inst: int, type_map: np.ndarray) -> np.ndarray:
    types = np.asarray(type_map).ravel().astype(np.int64)
    if types.size and types.min() < 0:
        raise ValueError(f"class ids must be >= 0, got {types.min()}")
    if n_inst == 0:
        return np.zeros(0, np.int64)
    n_cls = int(types.max()) + 1 if types.size else 1
    fg = (idx > 0) & (types > 0)
    votes = np.bincount((idx[fg] - 1) * n_cls + types[fg], minlength=n_inst * n_cls).reshape(n_inst, n_cls)
    classes = votes.argmax(axis=1)  # smallest class id on ties
    classes[votes.max(axis=1) == 0] = 0
    return classes


def instance_classes(inst_map: np.ndarray, type_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class of every instance: the majority nonzero class of its pixels (smallest id on ties; 0 if none).

    As HoVer-Net's post-processing, background-class pixels inside an instance do not vote unless the
    instance has no classed pixel at all.

    Returns:
        (ids (N,), classes (N,)) with ids the sorted nonzero instance ids.
    """
    _check_same_shape(inst_map, type_map, "instance_classes")
    ids, idx = _index_labels(inst_map)
    return ids, _classes_from_index(idx, ids.size, type_map)


def _centroids_from_index(idx: np.ndarray, n_inst: int, shape: tuple[int, ...]) -> np.ndarray:
    if n_inst == 0:
        return np.zeros((0, 2), np.float64)
    height, width = shape
    rows = np.repeat(np.arange(height, dtype=np.float64), width)
    cols = np.tile(np.arange(width, dtype=np.float64), height)
    count = np.bincount(idx, minlength=n_inst + 1)[1:]
    x = np.bincount(idx, weights=cols, minlength=n_inst + 1)[1:] / count
    y = np.bincount(idx, weights=rows, minlength=n_inst + 1)[1:] / count
    return np.stack([x, y], axis=1)


def instance_centroids(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of every instance: the mean pixel position (as image moments m10/m00, m01/m00).

    Returns:
        (ids (N,), xy (N, 2)) with xy = (x, y) = (col, row) in pixels, float64.
    """
    ids, idx = _index_labels(inst_map)
    return ids, _centroids_from_index(idx, ids.size, np.shape(inst_map))


# ----------------------------------------------------------------------------------------------- per-class PQ
def class_panoptic_quality(
    overlap: InstanceOverlap,
    true_classes: np.ndarray,
    pred_classes: np.ndarray,
    class_ids: Iterable[int],
    match_iou: float = 0.5,
) -> dict[int, float | None]:
    """PQ of every class in one image, with PanNuke semantics.

    For class c the maps are restricted to the true and predicted instances of class c (instance classes as
    :func:`instance_classes`), and PQ is computed between them. PQ of class c is ``None`` (skipped) when the
    ground truth has no instance of class c, even if the prediction has some (PanNuke ``run.py``).

    Args:
        overlap: the overlap table of all instances of the image.
        true_classes, pred_classes: class per row / column of ``overlap`` (N,), (M,).
        class_ids: the classes to score.
    """
    out: dict[int, float | None] = {}
    for c in class_ids:
        true_keep = np.asarray(true_classes) == c
        if not true_keep.any():
            out[int(c)] = None
            continue
        sub = overlap.select(true_keep, np.asarray(pred_classes) == c)
        out[int(c)] = panoptic_quality_from_overlap(sub, match_iou).pq
    return out
