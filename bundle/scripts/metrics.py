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

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

AJI_EPS = 1.0e-6  # HoVer-Net's smoothing of the IoU used to choose AJI / AJI+ pairs (changes tie-breaking only)

__all__ = [
    "InstanceOverlap",
    "PanopticQuality",
    "DetectionCounts",
    "ImageScores",
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
    "pair_coordinates",
    "detection_counts",
    "score_image",
    "mean_defined",
    "tissue_mean",
    "summarize_scores",
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


# ----------------------------------------------------------------------------------------------- detection
def pair_coordinates(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairing of two point sets, as HoVer-Net's ``pair_coordinates``.

    The Hungarian assignment minimising the total Euclidean distance over all points, then pairs farther than
    ``radius`` (pixels) are dropped (distance <= radius is kept).

    Args:
        true_xy: (N, 2) points (x, y) in pixels.
        pred_xy: (M, 2) points (x, y) in pixels.

    Returns:
        (pairing (K, 2) int64 of [true index, pred index], unpaired_true (N - K,), unpaired_pred (M - K,)).
    """
    true_xy = np.asarray(true_xy, np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    rows = cols = np.zeros(0, np.int64)
    if len(true_xy) and len(pred_xy):
        dist = cdist(true_xy, pred_xy)
        rows, cols = linear_sum_assignment(dist)
        keep = dist[rows, cols] <= radius
        rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
    unpaired_true = np.setdiff1d(np.arange(len(true_xy)), rows)
    unpaired_pred = np.setdiff1d(np.arange(len(pred_xy)), cols)
    return np.stack([rows, cols], axis=1), unpaired_true, unpaired_pred


@dataclass
class DetectionCounts:
    """Detection and classification counts, additive over images (``a + b`` pools them).

    Attributes:
        tp, fp, fn: paired points, unpaired predictions, unpaired truths.
        class_ids: the classes of the rows of ``type_counts``.
        type_counts: (C, 5) int64, per class c the counts of HoVer-Net ``run_nuclei_type_stat``:
            tp_dt (paired, true c, pred c), fp_dt (paired, true not c, pred c), fn_dt (paired, true c,
            pred not c), fp_d (unpaired prediction of class c), fn_d (unpaired truth of class c).
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    class_ids: tuple[int, ...] = ()
    type_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.int64))

    def __add__(self, other: "DetectionCounts") -> "DetectionCounts":
        if tuple(self.class_ids) != tuple(other.class_ids):
            raise ValueError(f"cannot pool detection counts over classes {self.class_ids} and {other.class_ids}")
        return DetectionCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            tuple(self.class_ids),
            self.type_counts + other.type_counts,
        )

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP); ``None`` when there are no predictions."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        """TP / (TP + FN); ``None`` when there is no ground truth."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        """2TP / (2TP + FP + FN) (HoVer-Net ``f1_d``); ``None`` when there are no points at all."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else None

    def f1_type(self, class_id: int) -> float | None:
        """F1 of class c, HoVer-Net ``_f1_type`` with w = [2, 2, 1, 1]:

        2 tp_dt / (2 tp_dt + 2 fp_dt + 2 fn_dt + fp_d + fn_d). (HoVer-Net's tn_dt term is always 0: it counts
        paired points of class c in neither truth nor prediction among pairs where one of them is c.)
        ``None`` when class c occurs in neither truth nor prediction.
        """
        tp_dt, fp_dt, fn_dt, fp_d, fn_d = self.type_counts[self.class_ids.index(class_id)]
        denom = 2 * (tp_dt + fp_dt + fn_dt) + fp_d + fn_d
        return float(2 * tp_dt / denom) if denom else None


def detection_counts(
    true_xy: np.ndarray,
    pred_xy: np.ndarray,
    radius: float = 12.0,
    true_classes: np.ndarray | None = None,
    pred_classes: np.ndarray | None = None,
    class_ids: Sequence[int] = (),
) -> DetectionCounts:
    """Detection counts of one image from points (pairing as :func:`pair_coordinates`).

    Pooling these over images (``sum``) and taking :attr:`DetectionCounts.f1` / ``f1_type`` reproduces HoVer-Net's
    ``run_nuclei_type_stat``, except that (1) points stay float (HoVer-Net truncates centroids to int32) and
    (2) an image without points adds nothing (HoVer-Net inserts a dummy point (0, 0) of class 0).

    Args:
        true_xy, pred_xy: (N, 2), (M, 2) points (x, y) in pixels.
        radius: largest distance in pixels of a pair (HoVer-Net uses 12 px at 40x).
        true_classes, pred_classes: class per point (N,), (M,); missing ones count as class 0. A true point of
            class 0 is of unknown class (untyped images scored with typed ones): it counts for detection and its
            pair is left out of the per-class counts (an unpaired one is in no class's ``fn_d``).
        class_ids: the classes for the per-class counts (ids from 1).
    """
    true_xy = np.asarray(true_xy, np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    t_cls = np.zeros(len(true_xy), np.int64) if true_classes is None else np.asarray(true_classes, np.int64).ravel()
    p_cls = np.zeros(len(pred_xy), np.int64) if pred_classes is None else np.asarray(pred_classes, np.int64).ravel()
    if len(t_cls) != len(true_xy) or len(p_cls) != len(pred_xy):
        raise ValueError(f"classes ({len(t_cls)}, {len(p_cls)}) do not match points ({len(true_xy)}, {len(pred_xy)})")
    pairing, unpaired_true, unpaired_pred = pair_coordinates(true_xy, pred_xy, radius)
    cids = np.asarray(list(class_ids), np.int64)[None, :]
    typed_pairs = pairing[t_cls[pairing[:, 0]] > 0]  # a true point of class 0 (unknown) has no class to get right
    pt, pp = t_cls[typed_pairs[:, 0], None], p_cls[typed_pairs[:, 1], None]
    type_counts = np.stack(
        [
            ((pt == cids) & (pp == cids)).sum(0),
            ((pt != cids) & (pp == cids)).sum(0),
            ((pt == cids) & (pp != cids)).sum(0),
            (p_cls[unpaired_pred, None] == cids).sum(0),
            (t_cls[unpaired_true, None] == cids).sum(0),
        ],
        axis=1,
    ).astype(np.int64)
    class_tuple = tuple(int(c) for c in cids[0])
    return DetectionCounts(len(pairing), len(unpaired_pred), len(unpaired_true), class_tuple, type_counts)


# ----------------------------------------------------------------------------------------------- one image, all metrics
@dataclass
class ImageScores:
    """All metrics of one image.

    ``class_pq`` maps class id -> PQ of that class (``None`` when absent from the ground truth); it is empty
    for untyped data. ``bpq`` is PQ, undefined without true nuclei; ``mpq`` the mean of the defined class PQs.
    """

    name: str
    n_true: int
    n_pred: int
    pq: float | None
    dq: float | None
    sq: float | None
    aji: float | None
    aji_plus: float | None
    detection: DetectionCounts
    class_pq: dict[int, float | None] = field(default_factory=dict)
    tissue: str | None = None

    @property
    def bpq(self) -> float | None:
        """Binary PQ, PanNuke: PQ of all nuclei, undefined (``None``) when the image has no true nucleus."""
        return self.pq if self.n_true else None

    @property
    def mpq(self) -> float | None:
        """Multi-class PQ of the image, PanNuke: mean of the class PQs defined (classes present in the truth)."""
        return mean_defined(self.class_pq.values())


def score_image(
    true_inst: np.ndarray,
    pred_inst: np.ndarray,
    true_type: np.ndarray | None = None,
    pred_type: np.ndarray | None = None,
    class_ids: Sequence[int] = (),
    det_radius: float = 12.0,
    match_iou: float = 0.5,
    name: str = "",
    tissue: str | None = None,
) -> ImageScores:
    """Every metric of one image; instance classes are the pixel majority (:func:`instance_classes`).

    Args:
        true_inst, pred_inst: instance maps (H, W).
        true_type, pred_type: class maps (H, W), 0 = background; ``true_type`` is required when ``class_ids``
            is not empty; without ``pred_type`` every prediction is class 0 (so class PQ and F1 are 0).
        class_ids: classes to score (empty: untyped scoring).
        det_radius: pairing radius of the centroids in pixels.
    """
    _check_same_shape(true_inst, pred_inst, f"{name or 'image'}: true vs predicted instance map")
    class_ids = tuple(int(c) for c in class_ids)
    if class_ids and true_type is None:
        raise ValueError(f"{name or 'image'}: classes {class_ids} requested but the ground truth has no class map")
    true_ids, t_idx = _index_labels(true_inst)
    pred_ids, p_idx = _index_labels(pred_inst)
    overlap = InstanceOverlap(true_ids, pred_ids, *_overlap_from_index(t_idx, true_ids.size, p_idx, pred_ids.size))
    pq = panoptic_quality_from_overlap(overlap, match_iou)
    shape = np.shape(true_inst)
    t_cls = p_cls = None
    class_pq: dict[int, float | None] = {}
    if class_ids:
        _check_same_shape(true_inst, true_type, f"{name or 'image'}: true instance vs class map")
        t_cls = _classes_from_index(t_idx, true_ids.size, true_type)
        if pred_type is None:
            p_cls = np.zeros(pred_ids.size, np.int64)
        else:
            _check_same_shape(pred_inst, pred_type, f"{name or 'image'}: predicted instance vs class map")
            p_cls = _classes_from_index(p_idx, pred_ids.size, pred_type)
        class_pq = class_panoptic_quality(overlap, t_cls, p_cls, class_ids, match_iou)
    detection = detection_counts(
        _centroids_from_index(t_idx, true_ids.size, shape),
        _centroids_from_index(p_idx, pred_ids.size, shape),
        det_radius,
        t_cls,
        p_cls,
        class_ids,
    )
    return ImageScores(
        name=name,
        n_true=int(true_ids.size),
        n_pred=int(pred_ids.size),
        pq=pq.pq,
        dq=pq.dq,
        sq=pq.sq,
        aji=aji_from_overlap(overlap),
        aji_plus=aji_plus_from_overlap(overlap),
        detection=detection,
        class_pq=class_pq,
        tissue=tissue,
    )


# ----------------------------------------------------------------------------------------------- dataset figures
def _defined(value: float | None) -> bool:
    return value is not None and not np.isnan(value)


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not ``None``/NaN; ``None`` when there is none."""
    kept = [float(v) for v in values if _defined(v)]
    return float(np.mean(kept)) if kept else None


def tissue_mean(values: Sequence[float | None], tissues: Sequence[str | None]) -> float | None:
    """PanNuke dataset average: mean over the images of each tissue, then mean over the tissues.

    Undefined values are skipped at both levels (a tissue with no defined value is skipped). When no tissue is
    known this is the plain mean over images; when only some are known, the unknown ones form one group.
    """
    if len(values) != len(tissues):
        raise ValueError(f"{len(values)} values but {len(tissues)} tissues")
    if all(t is None for t in tissues):
        return mean_defined(values)
    groups: dict[str | None, list[float | None]] = defaultdict(list)
    for value, tissue in zip(values, tissues):
        groups[tissue].append(value)
    return mean_defined(mean_defined(group) for group in groups.values())


def summarize_scores(scores: Sequence[ImageScores], class_names: dict[int, str] | None = None) -> dict:
    """Dataset metrics from per-image scores (the ``metrics.json`` content).

    * ``pq``, ``dq``, ``sq``, ``aji``, ``aji_plus``: mean over the images where defined (HoVer-Net).
    * ``precision_det``, ``recall_det``, ``f1_det``: from the detection counts pooled over all images.
    * typed data (``class_names`` given): ``bpq`` and ``mpq`` are :func:`tissue_mean` of the per-image bPQ and
      mPQ (PanNuke); ``pq_per_class[name]`` is :func:`tissue_mean` of the per-image PQ of that class over the
      images where the class is in the ground truth (PanNuke's ``run.py`` takes the plain image mean here; the
      two agree when no tissue is known); ``f1_per_class[name]`` is the pooled HoVer-Net type F1.
    * ``per_image``: name, counts and per-image figures (plus ``mpq``, ``bpq`` when typed, ``tissue`` if known).
    """
    typed = bool(class_names)
    tissues = [s.tissue for s in scores]
    class_ids = tuple(class_names or ())
    counts = DetectionCounts(class_ids=class_ids, type_counts=np.zeros((len(class_ids), 5), np.int64))
    for s in scores:
        counts = counts + s.detection
    out: dict = {
        "n_images": len(scores),
        "n_true": int(sum(s.n_true for s in scores)),
        "n_pred": int(sum(s.n_pred for s in scores)),
    }
    for key in ("pq", "dq", "sq", "aji", "aji_plus"):
        out[key] = mean_defined(getattr(s, key) for s in scores)
    out.update(precision_det=counts.precision, recall_det=counts.recall, f1_det=counts.f1)
    if typed:
        out["bpq"] = tissue_mean([s.bpq for s in scores], tissues)
        out["mpq"] = tissue_mean([s.mpq for s in scores], tissues)
        out["pq_per_class"] = {
            name: tissue_mean([s.class_pq.get(cid) for s in scores], tissues) for cid, name in class_names.items()
        }
        out["f1_per_class"] = {name: counts.f1_type(cid) for cid, name in class_names.items()}
    out["per_image"] = [_image_entry(s, typed) for s in scores]
    return out


def _image_entry(s: ImageScores, typed: bool) -> dict:
    entry = {"name": s.name, "n_true": s.n_true, "n_pred": s.n_pred}
    entry.update(pq=s.pq, dq=s.dq, sq=s.sq, aji=s.aji, aji_plus=s.aji_plus)
    if typed:
        entry.update(mpq=s.mpq, bpq=s.bpq)
    if s.tissue is not None:
        entry["tissue"] = s.tissue
    return entry
