"""One MLflow run of one training stage (or of one evaluation): :class:`StageRun`, a MONAI ``MLFlowHandler``."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from ignite.engine import Engine, Events
from monai.apps.utils import get_logger
from monai.handlers import MLFlowHandler

from scripts.training.checkpoints import TrainingCheckpointer
from scripts.training.tracking import (
    DEFAULT_EXPERIMENT,
    HTTP_DEFAULTS,
    SESSION,
    artifact_files,
    numeric_metrics,
    params_of,
    tracking_problem,
)
from scripts.training.tracking_overlays import bundle_class_table, sample_overlay

logger = get_logger("scripts.training.tracking_run")

__all__ = ["StageRun"]


class StageRun(MLFlowHandler):
    """One MLflow run for one training stage (or one evaluation), robust to an unavailable tracking store.

    Attach to the stage's trainer, after its validation handler. At ``STARTED`` a new run is created in
    ``experiment_name`` (never an earlier unfinished run picked up by name), named ``<run_name>-<stage>``, with
    ``tags`` and ``params``; per iteration the loss (``train_loss``) and learning rate; per epoch the trainer's
    ``engine.state.metrics`` (``loss_*``) and, when ``evaluator`` ran that epoch, its metrics (``f1_det``,
    ``pq``, ...) with the epoch as step; at ``COMPLETED`` ``best_<key metric>``/``best_epoch``, the
    ``artifacts`` files (under ``config/``) and an overlay (truth | prediction) of the first image of the last
    validation (under ``overlays/``) and, with a ``checkpointer``, the stage's ``best.pt`` (under ``checkpoints/``:
    with the other stage's, :func:`scripts.pipeline.model_file.export_model` makes the model file from MLflow
    alone), then the run is finished. A run left open by a crash is marked ``FAILED`` at exit; one left ``RUNNING``
    by a killed process (no exit handler ran) is marked ``KILLED`` when the training resumes: at ``STARTED``, after
    the checkpointer resumed from its ``last.pt``, the earlier ``RUNNING`` runs of the same experiment, ``stage``
    and ``output_dir`` tag (the checkpoint folder, added by every run with a checkpointer) are set ``KILLED`` and
    the new run, tagged ``resumed_from`` (the checkpoint) and ``resumed_runs`` (their ids), continues the curves.

    Args:
        stage: ``prompter``, ``segmentor`` or ``evaluation`` (tag ``stage``, run-name suffix).
        tracking_uri: MLflow tracking URI (``MLFLOW_TRACKING_URI`` wins when set, as in MONAI).
        experiment_name, run_name: MLflow experiment and run-name prefix (default: the session time).
        params: values logged as MLflow parameters (nested dicts flattened as ``a/b``).
        tags: run tags (``stage`` and ``session`` are added).
        evaluator: the stage's validation engine.
        artifacts: files or folders logged under ``config/`` at the end (the executed config).
        overlay: log a validation overlay PNG.
        class_table: ``{class_id: {"name", "color"}}`` colouring the overlay; ``None``: the bundle's
            (``configs/metadata.json``).
        iteration_log, epoch_log, artifact_location: as ``MLFlowHandler``.
        timeout: seconds to wait for a tracking server's answer up front.
        checkpointer: the stage's :class:`scripts.training.checkpoints.TrainingCheckpointer` (attached before this
            run): ``output_dir`` tag, ``best.pt`` artifact, earlier runs of a resumed training marked ``KILLED``.

    For an ``http(s)`` URI the MLflow request retries are bounded (``scripts.training.tracking.HTTP_DEFAULTS``,
    unless the ``MLFLOW_HTTP_REQUEST_*`` variables are set), so a server that disappears mid-run costs seconds, not
    minutes. Any MLflow failure gives one warning and ends the tracking; the tracked work goes on.
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
        class_table: Mapping[int, Mapping] | None = None,
        iteration_log: bool | Callable = True,
        epoch_log: bool | Callable = True,
        artifact_location: str | None = None,
        timeout: float = 5.0,
        checkpointer: TrainingCheckpointer | None = None,
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
        self.checkpointer = checkpointer
        if checkpointer is not None:
            self.tags["output_dir"] = str(checkpointer.save_dir.expanduser().resolve())
        self.overlay = overlay
        self.class_table = class_table
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
    def from_handler(cls, handler: MLFlowHandler, stage: str, **kwargs: Any) -> "StageRun":
        """A run for ``stage`` with the settings (URI, experiment, run name, artifacts, logging) of ``handler``."""
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
    def guard(self, what: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` while tracking is on; on any error one warning naming ``what``, and tracking is off."""
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
        self.guard("starting the run", self._start_run, engine)

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
        self._log_params(params_of(params))
        logger.info(f"MLflow run {self.run_id} ({name}) in experiment {self.experiment_name!r} at {self.tracking_uri}")
        if self.checkpointer is not None and self.checkpointer.resumed_from is not None:
            self._end_killed_runs(self.checkpointer.resumed_from)

    def _end_killed_runs(self, resumed_from: Path) -> None:
        """Mark ``KILLED`` the earlier runs of this experiment, stage and ``output_dir`` still ``RUNNING`` (their
        process was killed: the training now resumes from ``resumed_from``); tag this run with them."""
        found = self.client.search_runs([self.experiment.experiment_id],
                                        filter_string=f"tags.stage = '{self.stage}' and attributes.status = 'RUNNING'",
                                        max_results=1000)
        killed = [run.info.run_id for run in found if run.info.run_id != self.run_id
                  and run.data.tags.get("output_dir") == self.tags["output_dir"]]
        for run_id in killed:
            self.client.set_terminated(run_id, "KILLED")
        self.client.set_tag(self.run_id, "resumed_from", str(resumed_from))
        if killed:
            self.client.set_tag(self.run_id, "resumed_runs", ",".join(killed))
            logger.info(f"MLflow runs {', '.join(killed)} of the killed {self.stage} training marked KILLED; "
                        f"run {self.run_id} continues from {resumed_from}")

    def close(self) -> None:
        run_id = self.run_id
        self.guard("finishing the run", super().close)
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
            self.guard("logging metrics", self._log_metrics, values, step)

    def iteration_completed(self, engine: Engine) -> None:
        self.guard("logging the iteration loss", super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        metrics = dict(engine.state.metrics)
        if self.evaluator is not None and getattr(self.evaluator.state, "epoch", None) == epoch:
            metrics.update(self.evaluator.state.metrics)
        self.log_metrics(metrics, step=epoch)

    def completed(self, engine: Engine) -> None:
        self.guard("logging the results", self._log_results)
        self.close()

    def _log_results(self) -> None:
        state = getattr(self.evaluator, "state", None)
        best_name = getattr(state, "key_metric_name", None)
        best = getattr(state, "best_metric", None)
        if best_name and best is not None and getattr(state, "best_metric_epoch", -1) > 0:
            self.log_metrics({f"best_{best_name}": best, "best_epoch": state.best_metric_epoch})
        self.log_files(artifact_files(self.artifacts), "config")
        if self.checkpointer is not None and self.checkpointer.best_path.is_file():
            self.log_files([self.checkpointer.best_path], "checkpoints")
        if self._sample is not None:
            image, output = self._sample
            name = str(output.get("name", "validation")).replace(os.sep, "_")
            table = bundle_class_table() if self.class_table is None else self.class_table
            overlay = self.try_overlay(lambda: sample_overlay(image, output, table))
            if overlay is not None:
                self.log_image(overlay, f"overlays/{self.stage}_{name}.png")

    def log_files(self, paths: Sequence[Path], artifact_path: str) -> None:
        """Log files as artifacts under ``artifact_path`` (``""``: the run's artifact root)."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log an RGB uint8 (H, W, 3) image as the artifact ``artifact_file`` (e.g. ``overlays/x.png``; MLflow
        encodes it from memory)."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def try_overlay(self, make: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """``make()``; an overlay that cannot be drawn gives a warning and ``None``."""
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
