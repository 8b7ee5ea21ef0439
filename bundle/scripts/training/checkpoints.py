"""Atomic checkpoints, best-model tracking and resume for the training engines.

``last.pt`` (everything needed to resume: network, optimizer, scheduler, trainer counters, best metric) is
rewritten atomically after every epoch, the previous one kept as ``last.prev.pt`` (rotated before the new one is
written); ``best.pt`` (network weights and the metric) when the validation key metric improves. A killed training
loses at most the epoch in progress; a damaged ``last.pt`` (a full disk, a copy cut short) is named in a warning,
set aside as ``last.damaged.pt`` and the training resumes from ``last.prev.pt``. The file-level helpers (atomic save,
safe load, the weights inside a checkpoint) are in :mod:`scripts.io.atomic` and :mod:`scripts.io.checkpoints`.
"""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.apps.utils import get_logger
from monai.networks.utils import copy_model_state

from scripts.io.atomic import atomic_torch_save
from scripts.io.checkpoints import DamagedCheckpointError, load_checkpoint, state_dict_in
from scripts.parse import as_bool

logger = get_logger("scripts.training.checkpoints")

LAST_NAME = "last.pt"
PREV_NAME = "last.prev.pt"
DAMAGED_NAME = "last.damaged.pt"
BEST_NAME = "best.pt"

_ATTACHED: "weakref.WeakKeyDictionary[Engine, TrainingCheckpointer]" = weakref.WeakKeyDictionary()


def checkpointer_of(engine: Engine) -> "TrainingCheckpointer | None":
    """The :class:`TrainingCheckpointer` attached to ``engine`` (the stage's checkpoint folder, what it resumed
    from), or None; read by the MLflow run of the stage (:mod:`scripts.training.tracking_run`)."""
    return _ATTACHED.get(engine)


def warm_start(model: torch.nn.Module, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
    """Initialise ``model`` in place from a checkpoint of the same kind of network wherever names and shapes agree
    (MONAI's ``copy_model_state``): fine-tuning from an earlier run, or a stride-8 segmentor from a stride-16 one (its
    backbone, neck, prompt encoder and mask decoder carry over; the finer stages' projections start fresh). The
    checkpoint is a state dict or holds one under one of :data:`scripts.io.checkpoints.STATE_KEYS` (``best.pt`` /
    ``last.pt`` of :class:`TrainingCheckpointer` do). None: the model unchanged.

    Raises:
        FileNotFoundError: missing file. ValueError: nothing at all could be copied (another kind of network).
    """
    if checkpoint is None:
        return model
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"init_checkpoint not found: {checkpoint}")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state_dict_in(payload, f"init_checkpoint {checkpoint}")
    _, copied, skipped = copy_model_state(model, state, inplace=True)
    if not copied:
        raise ValueError(f"init_checkpoint {checkpoint}: no parameter matches the names and shapes of "
                         f"{model.__class__.__name__}")
    logger.info(f"warm start of {model.__class__.__name__} from {checkpoint}: {len(copied)} tensors copied, "
                f"{len(skipped)} kept fresh" + (f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})"
                                                 if skipped else ""))
    return model


class BestMetric:
    """The best validation value of a key metric so far (higher is better), saved with the checkpoint."""

    def __init__(self) -> None:
        self.value = -math.inf
        self.epoch = -1

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` at ``epoch``; True when it is a new best (NaN never is)."""
        if value is None or math.isnan(value) or value <= self.value:
            return False
        self.value, self.epoch = float(value), int(epoch)
        return True

    def state_dict(self) -> dict:
        return {"value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.epoch = float(state["value"]), int(state["epoch"])


class TrainingCheckpointer:
    """Save ``last.pt`` each epoch and ``best.pt`` on a better validation metric; resume from ``last.pt``.

    Attach after the validation handler so the metric of the finished epoch is available. It writes, so in a
    multi-process training it runs on rank 0 only (:attr:`rank_zero_only`); the other ranks get its
    :meth:`other_ranks` counterpart, :class:`ResumeOnly`, so that every replica resumes from the same weights.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler...).
            The trainer's counters and the best metric are added automatically.
        network_key: the entry of ``save_dict`` stored in ``best.pt``.
        key_metric: name in ``evaluator.state.metrics`` deciding the best model (higher is better).
        evaluator: the validation engine; without it ``best.pt`` follows ``last.pt``.
        resume: load ``save_dir/last.pt`` (or, when that is damaged, ``last.prev.pt``) when the trainer starts, if
            it exists; a bool or a boolean word (``"false"``, ``"0"``...; anything else is an error naming
            ``resume``).
        extra: plain values stored in every checkpoint (e.g. the network's construction arguments).
        ema: a :class:`scripts.training.ema.WeightEMA` of the network; when it is on, ``last.pt`` also keeps the
            averaged weights (entry ``ema``, resumed with the rest) and ``best.pt`` stores them instead of the raw
            ones (the weights validation measured).
    """

    rank_zero_only = True
    """Read by :func:`scripts.training.distributed.rank_zero_handlers`: this handler writes files."""

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        network_key: str = "network",
        key_metric: str | None = None,
        evaluator: Engine | None = None,
        resume: bool | str = True,
        extra: dict | None = None,
        ema: Any = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.network_key = network_key
        self.best_network = self.save_dict.get(network_key)  # the weights best.pt stores
        if ema is not None and ema.enabled:
            self.save_dict["ema"] = self.best_network = ema.network
        self.key_metric = key_metric
        self.evaluator = evaluator
        self.resume = as_bool(resume, "resume")
        self.extra = dict(extra or {})
        self.best = BestMetric()
        self.resumed_from: Path | None = None
        """The checkpoint the training resumed from (set at ``STARTED``), None for a fresh start."""

    def other_ranks(self) -> "ResumeOnly":
        """What ranks > 0 attach instead: the loading half (resume from ``last.pt``, never save)."""
        return ResumeOnly(self)

    @property
    def last_path(self) -> Path:
        return self.save_dir / LAST_NAME

    @property
    def prev_path(self) -> Path:
        return self.save_dir / PREV_NAME

    @property
    def best_path(self) -> Path:
        return self.save_dir / BEST_NAME

    def attach(self, engine: Engine) -> None:
        _ATTACHED[engine] = self
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load_last)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _readable_last(self) -> tuple[Path, dict] | None:
        """The newest readable resume checkpoint (``last.pt``, else ``last.prev.pt``) and its content; None when
        neither exists. A damaged one is named in a warning; when ``last.prev.pt`` is used instead of a damaged
        ``last.pt``, that is renamed ``last.damaged.pt`` (so that the next save does not rotate it over the good
        ``last.prev.pt``).

        Raises:
            RuntimeError: every existing one is damaged (the message names them and what to do).
        """
        damaged: list[Path] = []
        for path in (self.last_path, self.prev_path):
            try:
                state = load_checkpoint(path)
            except FileNotFoundError:
                continue
            except DamagedCheckpointError as error:
                damaged.append(path)
                logger.warning(str(error))
                continue
            if self.last_path in damaged:
                try:
                    os.replace(self.last_path, self.save_dir / DAMAGED_NAME)
                except FileNotFoundError:  # another rank set it aside first
                    pass
                logger.warning(f"resuming from the previous checkpoint {path} instead; the damaged "
                               f"{self.last_path} is kept as {self.save_dir / DAMAGED_NAME}")
            return path, state
        if damaged:
            raise RuntimeError(f"cannot resume the training: {' and '.join(map(str, damaged))} cannot be read "
                               f"(damaged or truncated); delete them to start afresh, or set --resume false")
        return None

    def _load_last(self, engine: Engine) -> None:
        found = self._readable_last()
        if found is None:
            return
        path, state = found
        max_epochs = engine.state.max_epochs
        for key, obj in self.save_dict.items():
            if key not in state:
                raise KeyError(f"{path}: no '{key}' entry to resume from")
            obj.load_state_dict(state[key])
        self.best.load_state_dict(state["best_metric"])
        if self.evaluator is not None and self.best.epoch >= 0:  # so its "Key metric ... best value" log agrees
            self.evaluator.state.best_metric = self.best.value
            self.evaluator.state.best_metric_epoch = self.best.epoch
        engine.state.epoch = int(state["trainer"]["epoch"])
        engine.state.iteration = int(state["trainer"]["iteration"])
        engine.state.max_epochs = max_epochs
        self.resumed_from = path
        logger.info("resumed from %s at epoch %d (best %s = %.4f)", path, engine.state.epoch,
                    self.key_metric, self.best.value)
        if engine.state.epoch >= max_epochs:
            logger.info("training already reached max_epochs=%d; nothing to do", max_epochs)
            engine.terminate()

    def _save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        metric = self._current_metric(epoch)
        improved = self.best.update(metric, epoch) if metric is not None else self.key_metric is None
        if improved:
            atomic_torch_save(
                {"network": self.best_network.state_dict(), "epoch": epoch, "metric": self.best.value,
                 "key_metric": self.key_metric, **self.extra},
                self.best_path,
            )
            logger.info("epoch %d: new best %s = %s -> %s", epoch, self.key_metric, metric, self.best_path)
        state = {key: obj.state_dict() for key, obj in self.save_dict.items()}
        state["trainer"] = {"epoch": epoch, "iteration": engine.state.iteration}
        state["best_metric"] = self.best.state_dict()
        state.update(self.extra)
        self._rotate_last()
        atomic_torch_save(state, self.last_path)

    def _rotate_last(self) -> None:
        """``last.pt`` -> ``last.prev.pt`` atomically, ``last.pt`` staying in place (a hard link renamed over
        ``last.prev.pt``; where links are not supported, ``last.pt`` is renamed): at every moment a complete
        checkpoint is on disk."""
        if not self.last_path.is_file():
            return
        link = self.save_dir / f".{PREV_NAME}.link"
        link.unlink(missing_ok=True)
        try:
            os.link(self.last_path, link)
            os.replace(link, self.prev_path)
        except OSError:
            link.unlink(missing_ok=True)
            os.replace(self.last_path, self.prev_path)

    def _current_metric(self, epoch: int) -> float | None:
        if self.evaluator is None or self.key_metric is None:
            return None
        if getattr(self.evaluator.state, "epoch", None) != epoch:
            return None  # no validation this epoch
        value = self.evaluator.state.metrics.get(self.key_metric)
        return None if value is None else float(value)


class ResumeOnly:
    """The loading half of a :class:`TrainingCheckpointer`: resume from ``last.pt`` at start, never save."""

    summary = "resume only"
    """How :func:`scripts.training.distributed.rank_zero_handlers` logs the replacement."""

    def __init__(self, checkpointer: TrainingCheckpointer) -> None:
        self.checkpointer = checkpointer

    def attach(self, engine: Engine) -> None:
        if self.checkpointer.resume:
            engine.add_event_handler(Events.STARTED, self.checkpointer._load_last)
