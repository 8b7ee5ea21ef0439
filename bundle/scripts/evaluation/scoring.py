"""Score predictions against a dataset and write ``metrics.json`` (``configs/evaluate.json``).

A prediction source is any object with ``predict(record: NucleusRecord) -> (inst_map, type_map | None)``
returning int arrays (H, W) (0 = background); :class:`PredictionDir` reads saved predictions. Each predicted
instance takes the majority class of its pixels (:func:`scripts.evaluation.metrics.instance_classes`).

Figures are those of :func:`scripts.evaluation.scores.summarize_scores`; undefined values are ``null`` in the JSON.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Protocol

import numpy as np
import scipy.io
from monai.apps.utils import get_logger
from skimage.transform import resize

from scripts.evaluation.handlers import NucleusMetric
from scripts.data.readers.common import as_label_map, read_label_map
from scripts.data.records import DatasetItem, NucleusRecord
from scripts.io.atomic import atomic_open

logger = get_logger("scripts.evaluation.scoring")

METRICS_FILE = "metrics.json"

__all__ = [
    "PredictionSource",
    "PredictionDir",
    "read_prediction_mat",
    "list_dataset",
    "score_dataset",
    "ScoredSample",
    "Scores",
    "write_metrics",
    "log_summary",
    "evaluate",
]


class PredictionSource(Protocol):
    """Anything that predicts the instance map and optional class map of a record."""

    def predict(self, record: NucleusRecord) -> tuple[np.ndarray, np.ndarray | None]: ...


# ----------------------------------------------------------------------------------------------- saved predictions
def read_prediction_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Instance and class maps int32 (H, W) from a HoVer-Net output ``.mat``.

    ``inst_map`` is required. The class map is ``type_map`` if present, else built from ``inst_type`` (N, 1):
    the class of instance ``inst_uid[k]`` (or of id k + 1 without ``inst_uid``) is ``inst_type[k]``; ids with no
    listed class get class 0. Without either, the class map is ``None``.
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=["inst_map", "type_map", "inst_type", "inst_uid"])
    except Exception as error:  # scipy raises many types (ValueError, NotImplementedError for v7.3, ...)
        raise ValueError(f"{path}: unreadable .mat file ({type(error).__name__}: {error})") from error
    if "inst_map" not in mat:
        raise ValueError(f"{path}: no 'inst_map' variable (found {sorted(k for k in mat if not k.startswith('__'))})")
    inst_map = as_label_map(mat["inst_map"], path, "inst_map")
    if "type_map" in mat:
        return inst_map, as_label_map(mat["type_map"], path, "type_map")
    if "inst_type" not in mat:
        return inst_map, None
    classes = np.asarray(mat["inst_type"]).ravel()
    uids = np.asarray(mat["inst_uid"]).ravel() if "inst_uid" in mat else np.arange(1, classes.size + 1)
    if uids.size != classes.size:
        raise ValueError(f"{path}: inst_uid lists {uids.size} ids but inst_type {classes.size} classes")
    if classes.size == 0:
        return inst_map, np.zeros_like(inst_map)
    lookup = np.zeros(max(int(inst_map.max(initial=0)), int(uids.max())) + 1, np.int32)
    lookup[uids.astype(np.int64)] = classes.astype(np.int32)
    lookup[0] = 0
    return inst_map, lookup[inst_map]


class PredictionDir:
    """Saved predictions in a folder, matched to records by stem (the record name).

    One of, per stem:

    * ``<stem>_inst.tif`` (+ optional ``<stem>_type.tif``): this bundle's inference output (tifffile);
    * ``<stem>.mat``: HoVer-Net output (see :func:`read_prediction_mat`);
    * ``<stem>.npy``: an instance map (H, W), no classes.

    A missing prediction, or more than one format for a stem, is an error naming the files.
    """

    def __init__(self, pred_dir: str | Path) -> None:
        if not str(pred_dir):
            raise ValueError("pred_dir is not set (pass --pred_dir <folder of predictions>)")
        self.pred_dir = Path(pred_dir)
        if not self.pred_dir.is_dir():
            raise FileNotFoundError(f"prediction folder not found: {self.pred_dir}")

    def candidates(self, stem: str) -> list[Path]:
        """The accepted instance-map files for ``stem``, in the order tif, mat, npy."""
        return [self.pred_dir / f"{stem}{suffix}" for suffix in ("_inst.tif", ".mat", ".npy")]

    def predict(self, record: NucleusRecord) -> tuple[np.ndarray, np.ndarray | None]:
        found = [p for p in self.candidates(record.name) if p.is_file()]
        if not found:
            names = ", ".join(p.name for p in self.candidates(record.name))
            raise FileNotFoundError(
                f"no prediction for image {record.name!r} ({record.source}): expected one of {names} in {self.pred_dir}"
            )
        if len(found) > 1:
            raise ValueError(f"ambiguous prediction for image {record.name!r}: {', '.join(map(str, found))}; keep one")
        path = found[0]
        inst_map, type_map = self._read(path)
        for what, array in (("instance map", inst_map), ("class map", type_map)):
            if array is not None and array.shape != record.inst_map.shape:
                raise ValueError(
                    f"{path}: predicted {what} shape {array.shape} differs from the image {record.inst_map.shape}"
                )
        return inst_map, type_map

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        if path.suffix == ".mat":
            return read_prediction_mat(path)
        if path.suffix == ".npy":
            return read_label_map(path, "predicted instance map"), None
        type_path = path.with_name(path.name[: -len("_inst.tif")] + "_type.tif")
        type_map = read_label_map(type_path, "predicted class map") if type_path.is_file() else None
        return read_label_map(path, "predicted instance map"), type_map


# ----------------------------------------------------------------------------------------------- scoring
def list_dataset(
    dataset_dir: str | Path | Sequence[str | Path],
    dataset_format: str = "auto",
    subset: str = "all",
    val_fraction: float = 0.2,
    seed: int = 0,
    scale: float = 1.0,
    images: str | Sequence[str] | None = None,
) -> list[DatasetItem]:
    """The items of a dataset (``scripts.data.readers.list_items``); errors name the parameter when unset or empty.

    Args:
        dataset_dir: a dataset folder or a list of folders.
        subset: ``all``, or ``val`` / ``train``: the images a training with the same ``val_fraction`` and ``seed``
            held out / trained on (``scripts.data.datasets.train_val_items``, each folder split on its own).
        scale: resample images and labels by this factor (0.5: 40x data seen as 20x); images bilinear with
            anti-aliasing, label maps nearest-neighbour.
        images: keep only the items whose name (file stem) matches one of these shell patterns
            (``fnmatch``, e.g. ``"TCGA-CH-*"``), after the subset split; a pattern that matches nothing is an error.
    """
    from scripts.data.datasets import train_val_items
    from scripts.data.readers import list_items

    if not str(dataset_dir) or (not isinstance(dataset_dir, (str, Path)) and not dataset_dir):
        raise ValueError("dataset_dir is not set (pass --dataset_dir <dataset folder>)")
    if subset not in ("all", "train", "val"):
        raise ValueError(f"subset must be 'all', 'train' or 'val', got {subset!r}")
    if subset == "all":
        items = list_items(dataset_dir, dataset_format)
    else:
        train, val = train_val_items(dataset_dir, dataset_format, None, val_fraction, seed)
        items = val if subset == "val" else train
    if not items:
        raise ValueError(f"no images found in dataset_dir {dataset_dir} (format {dataset_format})")
    if images is not None:
        items = _matching_items(items, [images] if isinstance(images, str) else list(images))
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if scale != 1.0:
        items = [dataclasses.replace(it, loader=functools.partial(_rescaled, it.loader, scale)) for it in items]
    return items


def _matching_items(items: list[DatasetItem], patterns: list[str]) -> list[DatasetItem]:
    """The items whose name matches one of the shell ``patterns``; raises naming a pattern that matches none."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(it.name, pattern) for it in items):
            raise ValueError(f"images: pattern {pattern!r} matches none of the {len(items)} images "
                             f"(e.g. {', '.join(it.name for it in items[:3])})")
    return [it for it in items if any(fnmatch.fnmatchcase(it.name, pattern) for pattern in patterns)]


def _rescaled(loader: Callable[[], NucleusRecord], scale: float) -> NucleusRecord:
    """The record of ``loader`` resampled by ``scale`` (see :func:`list_dataset`)."""
    record = loader()
    shape = tuple(max(1, round(n * scale)) for n in record.inst_map.shape)
    image = resize(record.image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    labels = {
        key: None if value is None
        else resize(value, shape, order=0, anti_aliasing=False, preserve_range=True).astype(value.dtype)
        for key, value in (("inst_map", record.inst_map), ("type_map", record.type_map))
    }
    return dataclasses.replace(record, image=np.clip(np.rint(image), 0, 255).astype(np.uint8), **labels)


class ScoredSample(NamedTuple):
    """One scored image kept with its prediction: the record and the predicted int maps (H, W)."""

    record: NucleusRecord
    inst_map: np.ndarray
    type_map: np.ndarray | None


class Scores(dict):
    """The metrics dictionary :func:`evaluate` computed, with ``path`` (the ``metrics.json`` it wrote) and
    ``samples`` (the first scored images with their predictions, :class:`ScoredSample`, for overlays)."""

    def __init__(self, metrics: Mapping, path: Path | None = None, samples: Sequence[ScoredSample] = ()) -> None:
        super().__init__(metrics)
        self.path = path
        self.samples = list(samples)


def score_dataset(
    items: Iterable[DatasetItem | NucleusRecord],
    predictions: PredictionSource,
    class_names: Mapping[int, str] | None,
    det_radius: float = 12.0,
    match_iou: float = 0.5,
) -> dict:
    """Score ``predictions`` on every item and return the metrics dictionary.

    Args:
        items: dataset items (loaded one at a time) or records.
        predictions: the prediction source.
        class_names: class id -> name for typed scoring (every record then needs a class map), or ``None``.
        det_radius: centroid pairing radius in pixels.
        match_iou: PQ pairing threshold.
    """
    return _score(items, predictions, class_names, det_radius, match_iou)[0]


def _score(
    items: Iterable[DatasetItem | NucleusRecord],
    predictions: PredictionSource,
    class_names: Mapping[int, str] | None,
    det_radius: float,
    match_iou: float,
    n_samples: int = 0,
) -> tuple[dict, list[ScoredSample]]:
    """:func:`score_dataset`, also returning the first ``n_samples`` records with their predictions."""
    metric = NucleusMetric(class_names, det_radius, match_iou)
    untyped: list[str] = []
    samples: list[ScoredSample] = []
    for item in items:
        record = item.load() if isinstance(item, DatasetItem) else item
        if class_names and record.type_map is None:
            raise ValueError(f"{record.source or record.name}: the dataset has classes but this image has no class map")
        inst_map, type_map = predictions.predict(record)
        if class_names and type_map is None:
            untyped.append(record.name)
        tissue = record.tissue if record.tissue is not None else getattr(item, "tissue", None)
        metric.update(record.inst_map, inst_map, record.type_map, type_map, name=record.name, tissue=tissue)
        if len(samples) < n_samples:
            kept_types = None if type_map is None else np.asarray(type_map)
            samples.append(ScoredSample(record, np.asarray(inst_map), kept_types))
    if len(metric) == 0:
        raise ValueError("no images to score")
    if untyped:
        logger.warning(
            f"{len(untyped)} predictions have no class map (e.g. {untyped[0]}): their nuclei count as unclassified"
        )
    return metric.aggregate(), samples


def _json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_metrics(metrics: Mapping, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/metrics.json`` atomically (:func:`scripts.io.atomic.atomic_open`); returns its path."""
    path = Path(output_dir) / METRICS_FILE
    with atomic_open(path, "w", suffix=".tmp") as f:
        json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def log_summary(metrics: Mapping) -> None:
    """Log the dataset figures in a few lines."""
    logger.info(f"scored {metrics['n_images']} images: {metrics['n_true']} true nuclei, {metrics['n_pred']} predicted")
    logger.info(" ".join(f"{k}={_fmt(metrics[k])}" for k in ("pq", "dq", "sq", "aji", "aji_plus")))
    logger.info(" ".join(f"{k}={_fmt(metrics[k])}" for k in ("precision_det", "recall_det", "f1_det")))
    if "mpq" in metrics:
        logger.info(f"bpq={_fmt(metrics['bpq'])} mpq={_fmt(metrics['mpq'])}")
        for name, pq in metrics["pq_per_class"].items():
            logger.info(f"  {name}: pq={_fmt(pq)} f1={_fmt(metrics['f1_per_class'][name])}")


def evaluate(
    items: Iterable[DatasetItem | NucleusRecord],
    predictions: PredictionSource,
    class_names: Mapping[int, str] | None,
    output_dir: str | Path,
    det_radius: float = 12.0,
    match_iou: float = 0.5,
    n_samples: int = 0,
) -> Scores:
    """Score, write ``metrics.json`` in ``output_dir``, log a summary; returns the metrics (:class:`Scores`: a dict
    that also holds the ``metrics.json`` path and the first ``n_samples`` records with their predictions, so that
    :func:`scripts.training.evaluation_tracking.log_evaluation` logs overlays without predicting again)."""
    metrics, samples = _score(items, predictions, class_names, det_radius, match_iou, n_samples)
    path = write_metrics(metrics, output_dir)
    log_summary(metrics)
    logger.info(f"wrote {path}")
    return Scores(metrics, path, samples)
