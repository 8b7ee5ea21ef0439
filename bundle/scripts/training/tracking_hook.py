"""The ``train#handlers`` hook of a training stage: :class:`StageTrackingHook` turns the ``MLFlowHandler`` that
MONAI's ``--tracking`` puts in ``train#handlers`` into a :class:`scripts.training.tracking_run.StageRun` of the stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from scripts.training.checkpoints import checkpointer_of
from scripts.training.distributed import get_world_size, is_rank_zero
from scripts.training.tracking import merged
from scripts.training.tracking_run import StageRun

__all__ = ["StageTrackingHook"]


class StageTrackingHook:
    """The ``train#handlers`` hook, attached to one stage's trainer.

    Each ``MLFlowHandler`` in ``handlers`` (put there by ``--tracking``) becomes a :class:`StageRun` for this
    stage with its settings, on rank 0 only, given the stage's
    :class:`scripts.training.checkpoints.TrainingCheckpointer` (attached before this hook) for its ``best.pt``
    artifact and its resume; any other handler is attached as it is. With no handlers
    (no ``--tracking``) it does nothing. In a multi-process training the hook runs on rank 0 only
    (:attr:`rank_zero_only`, read by :func:`scripts.training.distributed.rank_zero_handlers`).

    Args:
        handlers: the instantiated ``train#handlers`` list.
        stage: the stage name (``prompter`` or ``segmentor``).
        params, tags: the stage's MLflow parameters and tags: a dict, or a list of dicts merged in order
            (shared ones first, e.g. ``["@mlflow#params", {...stage values...}]``).
        evaluator: the stage's validation engine (validation metrics, best value, overlay).
        class_table: ``{class_id: {"name", "color"}}`` colouring the overlay; ``None``: the bundle's.
    """

    rank_zero_only = True

    def __init__(self, handlers: Sequence[Any] | None, stage: str, params: Mapping | Sequence[Mapping] | None = None,
                 tags: Mapping | Sequence[Mapping] | None = None, evaluator: Engine | None = None,
                 class_table: Mapping[int, Mapping] | None = None) -> None:
        self.handlers = list(handlers or [])
        self.stage = stage
        self.params = merged(params)
        self.tags = merged(tags)
        self.evaluator = evaluator
        self.class_table = class_table
        self.runs: list[StageRun] = []

    def attach(self, engine: Engine) -> None:
        for handler in self.handlers:
            if not isinstance(handler, MLFlowHandler):
                handler.attach(engine)
                continue
            if not is_rank_zero():
                continue
            params = {**self.params, "world_size": get_world_size()}
            run = StageRun.from_handler(handler, self.stage, params=params, tags=self.tags, evaluator=self.evaluator,
                                        class_table=self.class_table, checkpointer=checkpointer_of(engine))
            run.attach(engine)
            self.runs.append(run)
