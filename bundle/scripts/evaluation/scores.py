"""All metrics of one image (:func:`score_image`) and their dataset figures (:func:`summarize_scores`): PQ, DQ, SQ,
AJI, AJI+, per-class PQ, mPQ / bPQ, detection and classification F1. Conventions as :mod:`scripts.evaluation.metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from scripts.evaluation.detection import DetectionCounts, detection_counts
from scripts.evaluation.metrics import (
    InstanceOverlap,
    _centroids_from_index,
    _check_same_shape,
    _classes_from_index,
    _index_labels,
    _overlap_from_index,
    aji_from_overlap,
    aji_plus_from_overlap,
    class_panoptic_quality,
    panoptic_quality_from_overlap,
)


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
