"""MLflow tracking of the two training stages and of evaluation, switched on by MONAI's ``--tracking``.

How ``--tracking mlflow`` reaches our engines (details in ``docs/mlflow.md``): MONAI's
``ConfigWorkflow.patch_bundle_tracking`` appends an ``MLFlowHandler`` config to the list at ``train#handlers``
when ``train#trainer`` exists, and to ``handlers`` when ``evaluator`` exists, and adds the top-level settings
(``tracking_uri``, ``experiment_name``, ``run_name``, ``save_execute_config``) that the config does not define.
``configs/train.json`` defines ``train#trainer`` (the stage trainers) and ``train#handlers`` (an empty list:
"handlers for every stage"), and each stage's handler list ends with a :class:`StageTracking` that turns every
``MLFlowHandler`` found in ``train#handlers`` into a :class:`StageTracker` for that stage: one MLflow run per
stage. ``configs/evaluate.json`` hands its ``handlers`` list to :func:`log_evaluation` in the same way.
``--tracking configs/mlflow.json`` goes through the same ids with this bundle's own defaults.

A run logs its parameters and tags (stage, dataset, variant, session), per-iteration loss and learning rate,
per-epoch loss terms (``loss_*``) and validation metrics (``f1_det``, ``pq``, ...), the best validation value,
the executed config and an overlay of a validation image as artifacts. An unreachable tracking server, or any
MLflow failure later on, gives a warning and training goes on without tracking.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.apps.utils import get_logger
from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri

logger = get_logger("scripts.training.tracking")

DEFAULT_EXPERIMENT = "promptnucseg"
TRACKING_DB = "mlflow.db"
SESSION = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
"""Shared by every run this process starts (the two stages of ``--stage both``): tag ``session``."""

__all__ = [
    "DEFAULT_EXPERIMENT",
    "SESSION",
    "default_tracking_uri",
    "tracking_problem",
    "dataset_name",
    "numeric_metrics",
    "StageTracker",
    "StageTracking",
    "log_evaluation",
]

_PROBLEMS: dict[str, str | None] = {}
# MLflow's own HTTP defaults (7 retries, backoff factor 2) wait about 4 minutes per request to a server that has
# gone; these bound the wait to seconds. Set the variables yourself to choose otherwise.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_KEY_CHARS = re.compile(r"[^\w\-. /:]")
# MONAI writes ``save_execute_config`` as "<output_dir> + '/config_<time>.json'", an expression only when the
# output_dir value is one; with a plain ``--output_dir /path`` the handler receives the unevaluated text.
_UNEVALUATED_PATH = re.compile(r"^(?P<folder>.+) \+ '/(?P<name>[^']+)'$")


# ----------------------------------------------------------------------------------------------- settings
def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<output_dir>/mlflow.db`` (absolute), creating ``output_dir``: the default local store.

    MLflow 3 refuses the old file store; run artifacts go to ``<output_dir>/mlruns`` next to the database.
    """
    folder = Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(folder / TRACKING_DB)


def tracking_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why ``uri`` cannot take runs now, or ``None`` when it can. Answers are cached per process.

    An ``http(s)`` server must answer ``GET <uri>/health`` within ``timeout`` seconds (any HTTP answer counts:
    an authenticated server may refuse the health check but take runs); a ``sqlite`` database needs a folder it
    can be created in. Other schemes are not checked.
    """
    if uri in _PROBLEMS:
        return _PROBLEMS[uri]
    problem = None
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as error:
            problem = f"no answer from {uri} ({getattr(error, 'reason', error)})"
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is not None and str(path) not in ("", ":memory:"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                problem = f"cannot create the folder of {path} ({error})"
    _PROBLEMS[uri] = problem
    return problem


def dataset_name(dataset_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A short dataset tag: the name of the dataset folder (``"."`` resolved); ``a+b`` for a list of folders."""
    if isinstance(dataset_dir, (str, os.PathLike)):
        return Path(dataset_dir).expanduser().resolve().name
    return "+".join(dataset_name(d) for d in dataset_dir)


def _key(name: str) -> str:
    """An MLflow-safe metric/param/tag key (alphanumerics, ``_ - . / : space``)."""
    return _KEY_CHARS.sub("_", str(name))[:250]


def _flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def numeric_metrics(values: Mapping, prefix: str = "") -> dict[str, float]:
    """Numeric entries of a (nested) metrics dictionary as ``{"a/b": float}``; ``None``/strings are dropped.

    Nested keys are joined with ``/`` like the engines' per-class scalars (``f1_per_class/<class>``).

    NaN (an undefined figure, e.g. SQ with no match) is kept: MLflow stores it as such.
    """
    out = {}
    for key, value in _flatten(values, prefix).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        out[_key(key)] = float(value)
    return out


def _params(values: Mapping | None) -> dict[str, str]:
    return {_key(k): str(v)[:6000] for k, v in _flatten(values or {}).items()}


def _artifact_files(paths: Iterable[Any]) -> list[Path]:
    """Existing files among ``paths`` (folders expanded), repairing MONAI's unevaluated config path."""
    files: list[Path] = []
    for raw in paths:
        if not raw:
            continue
        path = Path(str(raw))
        match = _UNEVALUATED_PATH.match(str(raw))
        if not path.exists() and match:
            path = Path(match["folder"]) / match["name"]
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
    return files


# ----------------------------------------------------------------------------------------------- overlays
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


def _overlay_png(path: Path, image: np.ndarray, inst: np.ndarray, classes: Any, class_table: Mapping) -> Path:
    """:func:`scripts.io.writers.write_overlay`; classes outside ``class_table`` are drawn unclassified."""
    from scripts.io.writers import write_overlay

    if isinstance(classes, Mapping):
        known = all(int(c) in class_table or int(c) == 0 for c in classes.values())
    elif classes is not None:
        known = set(np.unique(classes).tolist()) <= {0, *class_table}
    else:
        known = True
    return write_overlay(path, image, inst, classes if known else None, class_table)


def _sample_overlay(path: Path, image: Any, output: Mapping, class_table: Mapping) -> Path | None:
    """Side-by-side overlay of one evaluator output: truth (left) and prediction (right).

    Segmentor outputs give instance outlines (``inst``, ``pred_inst``), prompter outputs discs around the points
    (``points``/``classes``, ``pred_points``/``pred_classes``). ``None`` for any other output.
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
        panels.append((inst, classes))
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        images = [np.asarray(Image.open(_overlay_png(Path(tmp) / f"{i}.png", rgb, inst, classes, class_table)))
                  for i, (inst, classes) in enumerate(panels)]
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([images[0], gap, images[1]], axis=1)).save(path, format="PNG")
    return path


def _class_table() -> dict:
    from scripts.data.records import load_class_table

    try:
        return load_class_table()
    except (OSError, KeyError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------- handlers
class StageTracker(MLFlowHandler):
    """One MLflow run for one training stage (or one evaluation), robust to an unavailable tracking store.

    Attach to the stage's trainer, after its validation handler. At ``STARTED`` a new run is created in
    ``experiment_name`` (never an earlier unfinished run picked up by name), named ``<run_name>-<stage>``, with
    ``tags`` and ``params``; per iteration the loss (``train_loss``) and learning rate; per epoch the trainer's
    ``engine.state.metrics`` (``loss_*``) and, when ``evaluator`` ran that epoch, its metrics (``f1_det``,
    ``pq``, ...) with the epoch as step; at ``COMPLETED`` ``best_<key metric>``/``best_epoch``, the
    ``artifacts`` files (under ``config/``) and an overlay (truth | prediction) of the first image of the last
    validation (under ``overlays/``), then the run is finished. A run left open by a crash is marked ``FAILED`` at exit.

    Args:
        stage: ``prompter``, ``segmentor`` or ``evaluation`` (tag ``stage``, run-name suffix).
        tracking_uri: MLflow tracking URI (``MLFLOW_TRACKING_URI`` wins when set, as in MONAI).
        experiment_name, run_name: MLflow experiment and run-name prefix (default: the session time).
        params: values logged as MLflow parameters (nested dicts flattened as ``a/b``).
        tags: run tags (``stage`` and ``session`` are added).
        evaluator: the stage's validation engine.
        artifacts: files or folders logged under ``config/`` at the end (the executed config).
        overlay: log a validation overlay PNG.
        iteration_log, epoch_log, artifact_location: as ``MLFlowHandler``.
        timeout: seconds to wait for a tracking server's answer up front.

    For an ``http(s)`` URI the MLflow request retries are bounded (:data:`HTTP_DEFAULTS`, unless the
    ``MLFLOW_HTTP_REQUEST_*`` variables are set), so a server that disappears mid-run costs seconds, not minutes.
    """

    def __init__(
        self,
        stage: str,
        tracking_uri: str | None = None,
        experiment_name: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        params: Mapping | None = None,
        tags: Mapping | None = None,
        evaluator: Engine | None = None,
        artifacts: Any = None,
        overlay: bool = True,
        iteration_log: bool | Callable = True,
        epoch_log: bool | Callable = True,
        artifact_location: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(
            tracking_uri=tracking_uri,
            iteration_log=iteration_log,
            epoch_log=epoch_log,
            output_transform=_loss_of,
            tag_name="train_loss",
            experiment_name=experiment_name,
            run_name=run_name,
            experiment_param=dict(params or {}),
            artifacts=artifacts,
            close_on_complete=True,
            artifact_location=artifact_location,
        )
        self.stage = stage
        self.tags = {**{k: str(v) for k, v in (tags or {}).items()}, "stage": stage, "session": SESSION}
        self.evaluator = evaluator
        self.overlay = overlay
        self.tracking_uri = self.client.tracking_uri
        self._sample: tuple[Any, Mapping] | None = None
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        problem = tracking_problem(self.tracking_uri, timeout)
        self.enabled = problem is None
        if problem:
            logger.warning(f"MLflow tracking of {stage} is off: {problem}; training goes on without tracking")

    @classmethod
    def from_handler(cls, handler: MLFlowHandler, stage: str, **kwargs: Any) -> "StageTracker":
        """A tracker for ``stage`` with the settings (URI, experiment, run name, artifacts, logging) of ``handler``."""
        settings = {
            "tracking_uri": handler.client.tracking_uri,
            "experiment_name": handler.experiment_name,
            "run_name": handler.run_name,
            "artifacts": [a for a in handler.artifacts if a],
            "iteration_log": handler.iteration_log,
            "epoch_log": handler.epoch_log,
            "artifact_location": handler.artifact_location,
        }
        settings.update(kwargs)
        return cls(stage=stage, **settings)

    # -- guard: a tracking failure never stops the work being tracked
    def _guard(self, what: str, fn: Callable, *args: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*args)
        except Exception as error:  # any MLflow/network/store error: warn once, stop tracking, keep training
            self.enabled = False
            atexit.unregister(self._abandon)  # the store failed: do not wait on it again at exit
            logger.warning(
                f"MLflow tracking of {self.stage} stopped: {what} failed on {self.tracking_uri} "
                f"({type(error).__name__}: {error}); training goes on without tracking"
            )
            return None

    @property
    def run_id(self) -> str | None:
        return self.cur_run.info.run_id if self.cur_run else None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        if self.iteration_log:
            event = Events.ITERATION_COMPLETED
            engine.add_event_handler(event(event_filter=self.iteration_log) if callable(self.iteration_log) else event,
                                     self.iteration_completed)
        if self.epoch_log:
            event = Events.EPOCH_COMPLETED
            engine.add_event_handler(event(event_filter=self.epoch_log) if callable(self.epoch_log) else event,
                                     self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        if self.evaluator is not None and self.overlay:
            self.evaluator.add_event_handler(Events.EPOCH_STARTED, self._forget_sample)
            self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._capture_sample)

    # -- run lifecycle
    def start(self, engine: Engine | None = None) -> None:
        self._guard("starting the run", self._start_run, engine)

    def _start_run(self, engine: Engine | None) -> None:
        if self.cur_run is not None:
            return
        self._set_experiment()
        name = f"{self.run_name or SESSION}-{self.stage}"
        self.cur_run = self.client.create_run(self.experiment.experiment_id, run_name=name, tags=self.tags)
        atexit.register(self._abandon)
        params = dict(self.experiment_param or {})
        if engine is not None:
            params.update(max_epochs=engine.state.max_epochs, epoch_length=engine.state.epoch_length)
        self._log_params(_params(params))
        logger.info(f"MLflow run {self.run_id} ({name}) in experiment {self.experiment_name!r} at {self.tracking_uri}")

    def close(self) -> None:
        run_id = self.run_id
        self._guard("finishing the run", super().close)
        if run_id is not None:
            atexit.unregister(self._abandon)

    def _abandon(self) -> None:
        """At interpreter exit: a run still open (the stage crashed) is marked FAILED."""
        if self.cur_run is None:
            return
        try:
            self.client.set_terminated(self.cur_run.info.run_id, "FAILED")
        except Exception:  # exiting anyway; nothing more to do
            pass

    # -- logging
    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (nested dicts flattened) at ``step``."""
        values = numeric_metrics(metrics)
        if values:
            self._guard("logging metrics", self._log_metrics, values, step)

    def iteration_completed(self, engine: Engine) -> None:
        self._guard("logging the iteration loss", super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        metrics = dict(engine.state.metrics)
        if self.evaluator is not None and getattr(self.evaluator.state, "epoch", None) == epoch:
            metrics.update(self.evaluator.state.metrics)
        self.log_metrics(metrics, step=epoch)

    def completed(self, engine: Engine) -> None:
        self._guard("logging the results", self._log_results)
        self.close()

    def _log_results(self) -> None:
        state = getattr(self.evaluator, "state", None)
        best_name = getattr(state, "key_metric_name", None)
        best = getattr(state, "best_metric", None)
        if best_name and best is not None and getattr(state, "best_metric_epoch", -1) > 0:
            self.log_metrics({f"best_{best_name}": best, "best_epoch": state.best_metric_epoch})
        self.log_files(_artifact_files(self.artifacts), "config")
        if self._sample is not None:
            with tempfile.TemporaryDirectory() as tmp:
                image, output = self._sample
                name = str(output.get("name", "validation")).replace(os.sep, "_")
                path = self._try_overlay(lambda: _sample_overlay(Path(tmp) / f"{self.stage}_{name}.png", image,
                                                                 output, _class_table()))
                if path is not None:
                    self.log_files([path], "overlays")

    def log_files(self, paths: Sequence[Path], artifact_path: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _try_overlay(self, make: Callable[[], Path | None]) -> Path | None:
        try:
            return make()
        except (ValueError, KeyError, TypeError, OSError) as error:
            logger.warning(f"{self.stage}: no overlay logged ({type(error).__name__}: {error})")
            return None

    def _forget_sample(self, engine: Engine) -> None:
        self._sample = None

    def _capture_sample(self, engine: Engine) -> None:
        """Keep the first image and output of the current validation epoch (references only)."""
        if self._sample is not None:
            return
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(batch, Mapping) or "image" not in batch:
            return
        first = output[0] if isinstance(output, Sequence) and output else output
        if isinstance(first, Mapping):
            self._sample = (batch["image"][0], first)


def _loss_of(output: Any) -> Any:
    """The iteration loss of a trainer output (a dict, or a list of dicts when decollated)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]
    if isinstance(output, Mapping):
        return output.get("loss")
    return output


class StageTracking:
    """The ``train#handlers`` hook, attached to one stage's trainer.

    Each ``MLFlowHandler`` in ``handlers`` (put there by ``--tracking``) becomes a :class:`StageTracker` for this
    stage with its settings, on rank 0 only; any other handler is attached as it is. With no handlers
    (no ``--tracking``) it does nothing.

    Args:
        handlers: the instantiated ``train#handlers`` list.
        stage: the stage name (``prompter`` or ``segmentor``).
        params, tags: the stage's MLflow parameters and tags: a dict, or a list of dicts merged in order
            (shared ones first, e.g. ``["@mlflow#params", {...stage values...}]``).
        evaluator: the stage's validation engine (validation metrics, best value, overlay).
    """

    def __init__(self, handlers: Sequence[Any] | None, stage: str, params: Mapping | Sequence[Mapping] | None = None,
                 tags: Mapping | Sequence[Mapping] | None = None, evaluator: Engine | None = None) -> None:
        self.handlers = list(handlers or [])
        self.stage = stage
        self.params = _merged(params)
        self.tags = _merged(tags)
        self.evaluator = evaluator
        self.trackers: list[StageTracker] = []

    def attach(self, engine: Engine) -> None:
        from scripts.training.distributed import get_world_size, is_rank_zero

        for handler in self.handlers:
            if not isinstance(handler, MLFlowHandler):
                handler.attach(engine)
                continue
            if not is_rank_zero():
                continue
            params = {**self.params, "world_size": get_world_size()}
            tracker = StageTracker.from_handler(handler, self.stage, params=params, tags=self.tags,
                                                evaluator=self.evaluator)
            tracker.attach(engine)
            self.trackers.append(tracker)


def _merged(values: Mapping | Sequence[Mapping] | None) -> dict:
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return dict(values)
    out: dict = {}
    for part in values:
        out.update(part or {})
    return out


# ----------------------------------------------------------------------------------------------- evaluation
def log_evaluation(
    handlers: Sequence[Any] | None,
    output_dir: str | os.PathLike,
    params: Mapping | None = None,
    tags: Mapping | None = None,
    items: Sequence[Any] | None = None,
    predictions: Any = None,
    n_overlays: int = 1,
) -> list[str]:
    """Log ``<output_dir>/metrics.json`` as one MLflow run per ``MLFlowHandler`` in ``handlers`` (``stage=evaluation``).

    The run gets ``params``, ``tags``, every numeric figure of ``metrics.json`` (``pq``, ``aji``, ``mpq``,
    ``f1_det``, ``pq_per_class/<name>``, ...), ``metrics.json`` and the handler's artifacts (the executed config)
    as artifacts and, when ``items`` and ``predictions`` are given, overlays of the first ``n_overlays``
    predictions (``predictions.predict(record)``). Without handlers (no ``--tracking``) nothing happens.
    Returns the ids of the runs created.
    """
    from scripts.training.distributed import is_rank_zero
    from scripts.evaluation.scoring import METRICS_FILE

    trackers = [h for h in handlers or [] if isinstance(h, MLFlowHandler)]
    if not trackers or not is_rank_zero():
        return []
    metrics_path = Path(output_dir) / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in output_dir {output_dir} to log: run the scoring first")
    metrics = json.loads(metrics_path.read_text())
    run_ids = []
    for handler in trackers:
        tracker = StageTracker.from_handler(handler, "evaluation", params=params, tags=tags, overlay=False)
        tracker.start()
        tracker.log_metrics(metrics, step=0)
        tracker._guard("logging artifacts", tracker.log_files, [metrics_path], "")
        tracker._guard("logging artifacts", tracker.log_files, _artifact_files(tracker.artifacts), "config")
        if items is not None and predictions is not None and n_overlays > 0 and tracker.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                paths = [p for p in (tracker._try_overlay(lambda item=item: _record_overlay(Path(tmp), item,
                                                                                           predictions))
                                     for item in list(items)[:n_overlays]) if p is not None]
                tracker._guard("logging overlays", tracker.log_files, paths, "overlays")
        if tracker.run_id:
            run_ids.append(tracker.run_id)
        tracker.close()
    return run_ids


def _record_overlay(folder: Path, item: Any, predictions: Any) -> Path:
    record = item.load() if hasattr(item, "load") else item
    inst, classes = predictions.predict(record)
    return _overlay_png(folder / f"{record.name}_overlay.png", record.image, np.asarray(inst),
                        None if classes is None else np.asarray(classes), _class_table())
