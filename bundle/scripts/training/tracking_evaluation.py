"""MLflow run of an evaluation (``configs/evaluate.json``): :func:`log_evaluation` logs what the scoring computed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from monai.handlers import MLFlowHandler

from scripts.training.distributed import is_rank_zero
from scripts.training.tracking import artifact_files, numeric_metrics
from scripts.training.tracking_overlays import bundle_class_table, record_overlay
from scripts.training.tracking_run import StageRun

__all__ = ["log_evaluation"]


def log_evaluation(
    handlers: Sequence[Any] | None,
    scores: Mapping,
    params: Mapping | None = None,
    tags: Mapping | None = None,
    predictions: Any = None,
) -> list[str]:
    """Log ``scores`` as one MLflow run per ``MLFlowHandler`` in ``handlers`` (``stage=evaluation``).

    The run gets ``params``, ``tags``, every defined numeric figure of ``scores`` (``pq``, ``aji``, ``mpq``,
    ``f1_det``, ``pq_per_class/<name>``, ...: the numbers of ``metrics.json``; undefined ones, ``null`` there, are
    left out), the handler's artifacts (the executed config) and, when ``scores`` is the
    :class:`scripts.evaluation.scoring.Scores` of ``scoring.evaluate``, its ``metrics.json`` and an overlay of each
    kept sample (``overlays/<image>_overlay.png``, drawn from the predictions the scoring made). The overlay colours
    come from ``predictions.class_table`` when the prediction source has one, else from the bundle's class table.
    Without handlers (no ``--tracking``) nothing happens. Returns the ids of the runs created.
    """
    runs = [h for h in handlers or [] if isinstance(h, MLFlowHandler)]
    if not runs or not is_rank_zero():
        return []
    metrics = {k: v for k, v in numeric_metrics(scores).items() if math.isfinite(v)}
    metrics_path = getattr(scores, "path", None)
    samples = list(getattr(scores, "samples", None) or [])
    class_table = getattr(predictions, "class_table", None)
    if class_table is None and samples:
        class_table = bundle_class_table()
    run_ids = []
    for handler in runs:
        run = StageRun.from_handler(handler, "evaluation", params=params, tags=tags, overlay=False)
        run.start()
        run.log_metrics(metrics, step=0)
        if metrics_path is not None:
            run.guard("logging artifacts", run.log_files, [metrics_path], "")
        run.guard("logging artifacts", run.log_files, artifact_files(run.artifacts), "config")
        for sample in samples:
            if not run.enabled:
                break
            overlay = run.try_overlay(lambda sample=sample: record_overlay(sample.record.image, sample.inst_map,
                                                                          sample.type_map, class_table))
            if overlay is not None:
                run.guard("logging overlays", run.log_image, overlay, f"overlays/{sample.record.name}_overlay.png")
        if run.run_id:
            run_ids.append(run.run_id)
        run.close()
    return run_ids
