"""MLflow tracking of the two training stages and of evaluation, switched on by MONAI's ``--tracking``: settings.

How ``--tracking mlflow`` reaches our engines (details in ``docs/mlflow.md``): MONAI's
``ConfigWorkflow.patch_bundle_tracking`` appends an ``MLFlowHandler`` config to the list at ``train#handlers``
when ``train#trainer`` exists, and to ``handlers`` when ``evaluator`` exists, and adds the top-level settings
(``tracking_uri``, ``experiment_name``, ``run_name``, ``save_execute_config``) that the config does not define.
``configs/train.json`` defines ``train#trainer`` (the stage trainers) and ``train#handlers`` (an empty list:
"handlers for every stage"), and each stage's handler list ends with a
:class:`scripts.training.tracking_hook.StageTrackingHook` that turns every ``MLFlowHandler`` found in
``train#handlers`` into a :class:`scripts.training.tracking_run.StageRun` for that stage: one MLflow run per stage.
``configs/evaluate.json`` hands its ``handlers`` list and the scores to
:func:`scripts.training.tracking_evaluation.log_evaluation` in the same way. ``--tracking configs/mlflow.json`` goes
through the same ids with this bundle's own defaults.

A run logs its parameters and tags (stage, dataset, variant, session), per-iteration loss and learning rate,
per-epoch loss terms (``loss_*``) and validation metrics (``f1_det``, ``pq``, ...), the best validation value,
the executed config and an overlay of a validation image (``scripts.training.tracking_overlays``) as artifacts. An
unreachable tracking server, or any MLflow failure later on, gives a warning and training goes on without tracking.

This module holds what the others share: the store (:func:`default_tracking_uri`, :func:`tracking_problem`), the
session, tags and the conversion of values to MLflow metrics, parameters and artifact files.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from monai.utils import path_to_sqlite_uri

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
    "params_of",
    "artifact_files",
    "merged",
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


def params_of(values: Mapping | None) -> dict[str, str]:
    """MLflow parameters: every entry of a (nested) dict as ``{"a/b": str}`` (at most 6000 characters)."""
    return {_key(k): str(v)[:6000] for k, v in _flatten(values or {}).items()}


def artifact_files(paths: Iterable[Any]) -> list[Path]:
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


def merged(values: Mapping | Sequence[Mapping] | None) -> dict:
    """A dict, or a list of dicts merged in order (later entries win); ``None`` gives ``{}``."""
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return dict(values)
    out: dict = {}
    for part in values:
        out.update(part or {})
    return out
