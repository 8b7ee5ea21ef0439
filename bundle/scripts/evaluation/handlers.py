"""MONAI / ignite components around :mod:`scripts.evaluation.metrics`: cumulative metrics and engine handlers.

* :class:`NucleusMetric` — a :class:`monai.metrics.Cumulative` over images: ``update`` with one image's true and
  predicted instance maps (+ optional class maps, name, tissue), ``aggregate()`` returns the ``metrics.json``
  dictionary of :func:`scripts.evaluation.scores.summarize_scores`.
* :class:`NucleusDetectionMetric` — the same over points (x, y) with optional classes, for the prompter.
* :class:`NucleusMetricHandler` — an ``ignite.metrics.Metric`` that feeds either of them from
  ``engine.state.output`` and writes e.g. ``pq``, ``f1_det`` into ``engine.state.metrics``.

Why not ``monai.metrics.PanopticQualityMetric``: for one binary instance map its per-image PQ/SQ/RQ equal
:func:`scripts.evaluation.metrics.panoptic_quality` (up to its 1e-6 smoothing; ``tests/test_metrics.py`` cross-checks
this), but its other semantics differ from the HoVer-Net/PanNuke figures this bundle reports:
(1) classes are assigned per pixel (``(class_map == c) * inst_map``), splitting an instance whose pixels carry
several classes, where HoVer-Net/PanNuke give each instance one class; (2) its reductions pool or average the
(tp, fp, fn, iou_sum) counts over the batch (CoNIC's multi-class PQ), not PanNuke's per-image mPQ that skips
classes absent from the ground truth and averages per tissue; (3) empty images and absent classes give 0
(smoothed denominators) instead of undefined; (4) it has no AJI, AJI+ or detection F1; (5) it builds one torch
mask per instance pair (O(N x pixels) per image), slow on 1000 x 1000 tiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.data import decollate_batch
from monai.metrics import Cumulative

from scripts.evaluation.detection import DetectionCounts, detection_counts
from scripts.evaluation.scores import ImageScores, score_image, summarize_scores

__all__ = [
    "NucleusMetric",
    "NucleusDetectionMetric",
    "NucleusMetricHandler",
    "instance_output_transform",
    "point_output_transform",
]



def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _label_map(x: Any, what: str) -> np.ndarray:
    """A 2-D (H, W) integer map from an array/tensor (H, W) or with leading singleton dims, e.g. (1, H, W)."""
    arr = _to_numpy(x)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (1, H, W), got shape {arr.shape}")
    return arr


def _counts_row(counts: DetectionCounts) -> list[float]:
    return [counts.tp, counts.fp, counts.fn, *counts.type_counts.ravel().tolist()]


def _counts_from_row(row: np.ndarray, class_ids: tuple[int, ...]) -> DetectionCounts:
    tp, fp, fn = (int(v) for v in row[:3])
    return DetectionCounts(tp, fp, fn, class_ids, row[3:].astype(np.int64).reshape(len(class_ids), 5))


class NucleusMetric(Cumulative):
    """Instance segmentation, classification and detection metrics accumulated over images.

    Each ``update`` scores one image with :func:`scripts.evaluation.scores.score_image` and appends one float64 row
    (counts and per-image figures, NaN = undefined) to the cumulative buffer, so ``get_buffer()`` gathers
    across distributed ranks; image names and tissues are kept locally (rank 0 alone names its own images).

    Args:
        class_names: class id -> name; ``None``/empty scores untyped data (no bPQ, mPQ, per-class figures).
        det_radius: centroid pairing radius in pixels.
        match_iou: PQ pairing threshold (IoU > match_iou).
    """

    def __init__(
        self, class_names: Mapping[int, str] | None = None, det_radius: float = 12.0, match_iou: float = 0.5
    ) -> None:
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.det_radius = float(det_radius)
        self.match_iou = float(match_iou)
        self._names: list[str] = []
        self._tissues: list[str | None] = []
        super().__init__()

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(self.class_names)

    def reset(self) -> None:
        super().reset()
        self._names, self._tissues = [], []

    def update(
        self,
        true_inst: Any,
        pred_inst: Any,
        true_type: Any | None = None,
        pred_type: Any | None = None,
        name: str | None = None,
        tissue: str | None = None,
    ) -> ImageScores:
        """Score one image and add it. Maps are (H, W) or (1, H, W) arrays/tensors, 0 = background."""
        name = str(name) if name is not None else f"image_{len(self._names)}"
        scores = score_image(
            _label_map(true_inst, f"{name}: true instance map"),
            _label_map(pred_inst, f"{name}: predicted instance map"),
            None if true_type is None or not self.class_ids else _label_map(true_type, f"{name}: true class map"),
            None if pred_type is None or not self.class_ids else _label_map(pred_type, f"{name}: predicted class map"),
            class_ids=self.class_ids,
            det_radius=self.det_radius,
            match_iou=self.match_iou,
            name=name,
            tissue=tissue,
        )
        self.append(torch.as_tensor(self._to_row(scores), dtype=torch.float64))
        self._names.append(name)
        self._tissues.append(tissue)
        return scores

    def _to_row(self, s: ImageScores) -> list[float]:
        """Row layout: n_true, n_pred, pq, dq, sq, aji, aji_plus, class PQ (C), detection counts (3 + 5C)."""
        head = [s.n_true, s.n_pred, s.pq, s.dq, s.sq, s.aji, s.aji_plus]
        class_pq = [s.class_pq.get(c) for c in self.class_ids]
        return [_nan(v) for v in head] + [_nan(v) for v in class_pq] + _counts_row(s.detection)

    def _from_row(self, row: np.ndarray, name: str, tissue: str | None) -> ImageScores:
        n_cls = len(self.class_ids)
        head = [_none(v) for v in row[:7]]
        class_pq = {c: _none(v) for c, v in zip(self.class_ids, row[7 : 7 + n_cls])}
        return ImageScores(
            name=name,
            n_true=int(head[0]),
            n_pred=int(head[1]),
            pq=head[2],
            dq=head[3],
            sq=head[4],
            aji=head[5],
            aji_plus=head[6],
            detection=_counts_from_row(row[7 + n_cls :], self.class_ids),
            class_pq=class_pq,
            tissue=tissue,
        )

    def image_scores(self) -> list[ImageScores]:
        """Per-image scores of every image added (gathered across ranks)."""
        buffer = self.get_buffer()
        if buffer is None:
            return []
        rows = buffer.numpy()
        names, tissues = self._names, self._tissues
        if len(names) != len(rows):  # distributed: other ranks' names are not gathered
            names = [f"image_{i}" for i in range(len(rows))]
            tissues = [None] * len(rows)
        return [self._from_row(r, n, t) for r, n, t in zip(rows, names, tissues)]

    def aggregate(self) -> dict:
        """The dataset metrics dictionary (:func:`scripts.evaluation.scores.summarize_scores`)."""
        return summarize_scores(self.image_scores(), self.class_names or None)


class NucleusDetectionMetric(Cumulative):
    """Detection (and classification) metrics over points, accumulated over images.

    ``aggregate()`` returns ``n_images``, ``n_true``, ``n_pred``, ``precision_det``, ``recall_det``, ``f1_det``
    (counts pooled over images, HoVer-Net pairing) and, when ``class_names`` is given, ``f1_per_class``.

    Args:
        class_names: class id -> name, or ``None`` for untyped points.
        det_radius: pairing radius in pixels.
    """

    def __init__(self, class_names: Mapping[int, str] | None = None, det_radius: float = 12.0) -> None:
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.det_radius = float(det_radius)
        super().__init__()

    def update(
        self,
        true_xy: Any,
        pred_xy: Any,
        true_classes: Any | None = None,
        pred_classes: Any | None = None,
        name: str | None = None,
    ) -> DetectionCounts:
        """Add one image's points: (N, 2), (M, 2) as (x, y) in pixels; classes (N,), (M,) optional."""
        counts = detection_counts(
            _to_numpy(true_xy),
            _to_numpy(pred_xy),
            self.det_radius,
            None if true_classes is None else _to_numpy(true_classes),
            None if pred_classes is None else _to_numpy(pred_classes),
            tuple(self.class_names),
        )
        self.append(torch.as_tensor(_counts_row(counts), dtype=torch.float64))
        return counts

    def aggregate(self) -> dict:
        buffer = self.get_buffer()
        rows = np.zeros((0, 3 + 5 * len(self.class_names))) if buffer is None else buffer.numpy()
        total = _counts_from_row(rows.sum(axis=0), tuple(self.class_names))
        out = {
            "n_images": len(rows),
            "n_true": total.tp + total.fn,
            "n_pred": total.tp + total.fp,
            "precision_det": total.precision,
            "recall_det": total.recall,
            "f1_det": total.f1,
        }
        if self.class_names:
            out["f1_per_class"] = {name: total.f1_type(cid) for cid, name in self.class_names.items()}
        return out


# ----------------------------------------------------------------------------------------------- engine output
def _get(sample: Mapping, key: str | None) -> Any:
    """``sample[key]`` with dotted keys for nested dictionaries (``"pred.inst_map"``); ``None`` if absent."""
    if key is None:
        return None
    value: Any = sample
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _samples(output: Any) -> list[Mapping]:
    """Per-image dictionaries from an engine output: a list of dicts (decollated) or a dict of batches."""
    if isinstance(output, Mapping):
        return list(decollate_batch(output))
    if isinstance(output, Sequence) and all(isinstance(o, Mapping) for o in output):
        return list(output)
    raise TypeError(f"engine output must be a dict of batches or a list of per-image dicts, got {type(output)}")


def _required(sample: Mapping, key: str) -> Any:
    value = _get(sample, key)
    if value is None:
        raise KeyError(f"engine output has no {key!r}; keys: {list(sample)}")
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return str(value)


def instance_output_transform(
    pred_inst_key: str = "pred_inst",
    true_inst_key: str = "inst",
    pred_type_key: str | None = "pred_type",
    true_type_key: str | None = "type",
    name_key: str | None = "name",
    tissue_key: str | None = "tissue",
) -> Callable[[Any], list[dict]]:
    """Output transform for :class:`NucleusMetricHandler` with a :class:`NucleusMetric`.

    Maps ``engine.state.output`` (list of per-image dicts, or a dict of batches) to a list of
    ``NucleusMetric.update`` keyword dictionaries. Keys may be dotted paths into nested dicts; optional keys
    (``None`` or absent in the output) are passed as ``None``. Maps are (1, H, W) or (H, W).
    """

    def transform(output: Any) -> list[dict]:
        return [
            {
                "true_inst": _required(s, true_inst_key),
                "pred_inst": _required(s, pred_inst_key),
                "true_type": _get(s, true_type_key),
                "pred_type": _get(s, pred_type_key),
                "name": _text(_get(s, name_key)),
                "tissue": _text(_get(s, tissue_key)),
            }
            for s in _samples(output)
        ]

    return transform


def point_output_transform(
    pred_points_key: str = "pred_points",
    true_points_key: str = "points",
    pred_classes_key: str | None = "pred_classes",
    true_classes_key: str | None = "classes",
    name_key: str | None = "name",
) -> Callable[[Any], list[dict]]:
    """Output transform for :class:`NucleusMetricHandler` with a :class:`NucleusDetectionMetric`.

    Points are (N, 2) as (x, y) in pixels per image; classes (N,) optional. Output as
    :func:`instance_output_transform`.
    """

    def transform(output: Any) -> list[dict]:
        return [
            {
                "true_xy": _required(s, true_points_key),
                "pred_xy": _required(s, pred_points_key),
                "true_classes": _get(s, true_classes_key),
                "pred_classes": _get(s, pred_classes_key),
                "name": _text(_get(s, name_key)),
            }
            for s in _samples(output)
        ]

    return transform


# ----------------------------------------------------------------------------------------------- ignite handler
class NucleusMetricHandler(Metric):
    """Ignite metric that fills a :class:`NucleusMetric` (or :class:`NucleusDetectionMetric`) each iteration.

    At epoch end ``engine.state.metrics[name]`` gets ``metric_name`` of the aggregate (a float, NaN when
    undefined, so it can be a MONAI key metric), and each of ``extra_metrics`` is written under its own key
    (``pq``, ``f1_det``, ``aji``, ...; a dictionary such as ``f1_per_class`` becomes one scalar per entry,
    ``f1_per_class/<class name>``). With ``save_details`` the
    per-image list goes to ``engine.state.metric_details[name]``.

    It subclasses ``ignite.metrics.Metric`` rather than ``monai.handlers.IgniteMetricHandler`` because the
    latter calls ``metric_fn(y_pred, y)`` with exactly two tensors, while these metrics also take class maps,
    names and tissues, and return a dictionary.

    Args:
        metric: the accumulator; default a :class:`NucleusMetric` with ``class_names`` and ``det_radius``.
        metric_name: key of the aggregate written under the attached name.
        extra_metrics: further keys of the aggregate to write under their own names.
        output_transform: ``engine.state.output`` -> list of ``metric.update`` keyword dicts; default
            :func:`instance_output_transform` (or :func:`point_output_transform` for a detection metric).
        class_names, det_radius: used only when ``metric`` is not given.
        save_details: store the per-image figures in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        metric: NucleusMetric | NucleusDetectionMetric | None = None,
        metric_name: str = "pq",
        extra_metrics: Sequence[str] = (),
        output_transform: Callable[[Any], list[dict]] | None = None,
        class_names: Mapping[int, str] | None = None,
        det_radius: float = 12.0,
        save_details: bool = False,
    ) -> None:
        self.metric = metric if metric is not None else NucleusMetric(class_names, det_radius)
        if output_transform is None:
            is_points = isinstance(self.metric, NucleusDetectionMetric)
            output_transform = point_output_transform() if is_points else instance_output_transform()
        self.metric_name = metric_name
        self.extra_metrics = tuple(extra_metrics)
        self.save_details = save_details
        self.results: dict = {}
        super().__init__(output_transform=output_transform, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self.metric.reset()
        self.results = {}

    @reinit__is_reduced
    def update(self, output: Sequence[Mapping]) -> None:
        for item in output:
            self.metric.update(**item)

    def compute(self) -> float:
        self.results = self.metric.aggregate()
        if self.metric_name not in self.results:
            raise KeyError(f"metric_name {self.metric_name!r} not in {sorted(self.results)}")
        return _nan(self.results[self.metric_name])

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        for key in self.extra_metrics:
            if key not in self.results:
                warnings.warn(f"extra metric {key!r} not in the aggregate (keys {sorted(self.results)})")
                continue
            value = self.results[key]
            if isinstance(value, dict):  # per-class figures: one scalar each, e.g. "f1_per_class/Epithelial"
                for sub_key, sub_value in value.items():
                    engine.state.metrics[f"{key}/{sub_key}"] = _nan(sub_value)
            else:
                engine.state.metrics[key] = _nan(value)
        if self.save_details:
            details = getattr(engine.state, "metric_details", None)
            if details is None:
                details = {}
                engine.state.metric_details = details
            details[name] = self.results.get("per_image")
