"""Data-parallel training across processes (``configs/multi_gpu_train.json``) and work sharding across ranks.

Launch: ``torchrun --nproc_per_node N -m monai.bundle run training --config_file
"['configs/train.json','configs/multi_gpu_train.json']"`` (from ``bundle/``). Each process trains a
``DistributedDataParallel`` copy of the stage's network on its share of the training data
(``DistributedSampler``) and validates its share of the validation patches; the metric handlers gather the
per-image rows across ranks (``monai.metrics.Cumulative``), so every rank sees the metrics of the whole
validation set. Handlers that write (checkpoints, console statistics, MLflow) run on rank 0 only: MONAI's writer
handlers, and this bundle's handlers whose class says ``rank_zero_only = True``; such a handler may offer what the
other ranks attach instead (``other_ranks()``: the checkpointer's resume-only half, so that every rank still resumes
from ``last.pt`` and the replicas start from the same weights). This module imports no other handler module.

Rank and world size come from ``torch.distributed`` when it is initialised, else 0 and 1: the helpers work
unchanged in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.apps.utils import get_logger

logger = get_logger("scripts.training.distributed")

T = TypeVar("T")

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_rank_zero",
    "default_backend",
    "local_device",
    "init_distributed",
    "finalize",
    "wrap_ddp",
    "shard",
    "validation_sampler",
    "is_rank_zero_only",
    "rank_zero_handlers",
    "RankLogger",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """True on rank 0 or when not distributed."""
    return get_rank() == 0


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (``LOCAL_RANK`` set by torchrun, default 0), else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world_size).

    Args:
        backend: ``nccl``, ``gloo`` or ``None`` for :func:`default_backend`.

    Raises:
        RuntimeError: when the torchrun variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) are missing.
    """
    if not is_distributed():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"configs/multi_gpu_train.json needs a torchrun launch (missing environment {missing}): "
                "torchrun --nproc_per_node N -m monai.bundle run training --config_file "
                "\"['configs/train.json','configs/multi_gpu_train.json']\""
            )
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend=backend)
    rank, world = get_rank(), get_world_size()
    logger.info(f"rank {rank}/{world}: process group ready ({dist.get_backend()}, device {local_device()})")
    return rank, world


def finalize() -> None:
    """Wait for every rank, then destroy the process group (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, device: torch.device | str | None = None,
             find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` (already on ``device``); the module itself when not distributed.

    Use the wrapper for the trainer only: evaluators, checkpoints and optimizers keep the unwrapped module
    (its ``encode``/``decode`` methods and ``state_dict`` keys without ``module.``).
    """
    if not is_distributed():
        return module
    device = torch.device(device) if device is not None else next(module.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, output_device=device_ids[0] if device_ids else None,
        find_unused_parameters=find_unused_parameters,
    )


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from position ``rank`` (sizes differ by <= 1).

    The shares of all ranks are disjoint and together hold every item once (no padding). ``rank`` and
    ``world_size`` default to the process group's (0 and 1 when not distributed).

    Raises:
        ValueError: ``world_size`` < 1 or ``rank`` outside ``[0, world_size)``.
    """
    world_size = get_world_size() if world_size is None else int(world_size)
    rank = get_rank() if rank is None else int(rank)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items)[rank::world_size]


def validation_sampler(dataset: Any, name: str = "validation") -> Any:
    """A ``monai.data.DistributedSampler`` giving each rank a disjoint share of ``dataset`` (no padding, no shuffle).

    No item is repeated, so the gathered metrics are those of the whole set. Every rank must get at least one
    item: the metric gathering is a collective operation that an empty rank would never join.

    Raises:
        ValueError: fewer items than ranks.
    """
    from monai.data import DistributedSampler

    world = get_world_size()
    if len(dataset) < world:
        raise ValueError(
            f"{name} set has {len(dataset)} patches but {world} ranks: each rank needs at least one "
            "(add validation images, lower val_fraction's rounding, or use fewer processes)"
        )
    return DistributedSampler(dataset, even_divisible=False, shuffle=False)


def _monai_writer_types() -> tuple[type, ...]:
    """MONAI's handler types that write files, logs or tracking records (rank 0 only)."""
    from monai.handlers import CheckpointSaver, MLFlowHandler, StatsHandler, TensorBoardHandler

    return CheckpointSaver, MLFlowHandler, StatsHandler, TensorBoardHandler


def is_rank_zero_only(handler: Any) -> bool:
    """True for a handler that must run on rank 0 only: one of MONAI's writers, or any handler whose class says
    so with ``rank_zero_only = True`` (this bundle's checkpointer and MLflow tracking hook)."""
    return bool(getattr(handler, "rank_zero_only", False)) or isinstance(handler, _monai_writer_types())


def rank_zero_handlers(handlers: Sequence[Any] | None, name: str | None = None) -> list[Any]:
    """The engine handlers of this rank: all of them on rank 0; on other ranks, those that do not write.

    On ranks > 0 a rank-0-only handler (:func:`is_rank_zero_only`) is replaced by what its ``other_ranks()`` method
    returns when it has one (a :class:`scripts.training.checkpoints.TrainingCheckpointer` becomes its
    ``ResumeOnly``: load ``last.pt`` at start, never save), else dropped (console statistics, checkpoint savers,
    MLflow/TensorBoard handlers). With ``name``, a :class:`RankLogger` is added on every rank.
    """
    out: list[Any] = []
    dropped: list[str] = []
    for handler in handlers or []:
        if is_rank_zero() or not is_rank_zero_only(handler):
            out.append(handler)
            continue
        other_ranks = getattr(handler, "other_ranks", None)
        replacement = other_ranks() if callable(other_ranks) else None
        if replacement is None:
            dropped.append(type(handler).__name__)
        else:
            out.append(replacement)
            summary = getattr(replacement, "summary", type(replacement).__name__)
            dropped.append(f"{type(handler).__name__} ({summary})")
    if dropped and name is not None:
        logger.info(f"rank {get_rank()}/{get_world_size()}: {name} handlers left to rank 0: {', '.join(dropped)}")
    if name is not None:
        out.append(RankLogger(name))
    return out


class RankLogger:
    """Log one line per rank and epoch: ``rank r/w: <name> epoch e: i iterations, n samples`` (to stdout)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._samples = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log)

    def _reset(self, engine: Engine) -> None:
        self._samples = 0

    def _count(self, engine: Engine) -> None:
        batch = engine.state.batch
        image = batch.get("image") if isinstance(batch, dict) else None
        self._samples += int(image.shape[0]) if hasattr(image, "shape") else 1

    def _log(self, engine: Engine) -> None:
        logger.info(
            f"rank {get_rank()}/{get_world_size()}: {self.name} epoch {engine.state.epoch}: "
            f"{engine.state.epoch_length} iterations, {self._samples} samples"
        )

