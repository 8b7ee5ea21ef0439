"""Detection and classification counts from points, as HoVer-Net's ``pair_coordinates`` and
``run_nuclei_type_stat``: pure numpy/scipy. Points are (x, y) = (col, row) in pixels; distances in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


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
