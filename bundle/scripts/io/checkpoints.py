"""Checkpoint files: loading them safely and finding the network weights inside.

Written with :func:`scripts.io.atomic.atomic_torch_save` (training's ``last.pt``/``best.pt``, model files); used by
the training (resume, warm start) and the pipeline (model export) alike.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_KEYS", "DamagedCheckpointError", "load_checkpoint", "state_dict_in"]

STATE_KEYS = ("state_dict", "model", "network", "segmentor", "prompter", "net")
"""Entries under which a checkpoint may hold the network weights, in the order they are looked for."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, overwritten, not a ``torch.save`` file)."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU (tensors and plain values only: ``weights_only=True``).

    Raises:
        FileNotFoundError: naming the missing file.
        DamagedCheckpointError: naming the file that ``torch.load`` could not read (e.g. a truncated one), with
            PyTorch's reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError) as error:  # what torch.load raises on a truncated or foreign file
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0] or "no detail"
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {reason})") from error


def state_dict_in(payload: Any, source: str) -> dict[str, Any]:
    """The network weights a loaded checkpoint holds: ``payload`` itself, or its entry under the first of
    :data:`STATE_KEYS` that is a mapping; a leading ``module.`` (DataParallel / DDP) is stripped from the names.

    Raises:
        ValueError: ``payload`` is not a dict (the message starts with ``source``, e.g. the file's path).
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"{source} is not a checkpoint dict (got {type(payload).__name__})")
    state = next((payload[k] for k in STATE_KEYS if isinstance(payload.get(k), Mapping)), payload)
    return {k.removeprefix("module."): v for k, v in state.items()}
