"""The model file behind both infer tasks: loaded on first use, reloaded when the file changes (after training)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from lib.errors import RequestError
from scripts.pipeline.model_file import load_model, model_class_names
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.data.records import load_class_table

logger = logging.getLogger(__name__)


class ModelStore:
    """One :class:`PromptNucSeg` per device, loaded from ``path`` and reloaded when its mtime changes.

    Args:
        path: the model file (``scripts.pipeline.model_file`` format).
        pipeline_kwargs: inference options of :class:`PromptNucSeg` (``nms_radius``, ``min_area``...).
    """

    def __init__(self, path: str | os.PathLike, **pipeline_kwargs) -> None:
        self.path = Path(path)
        self.pipeline_kwargs = pipeline_kwargs
        self._models: dict[str, tuple[PromptNucSeg, float]] = {}
        self._names: tuple[dict[int, str], float] | None = None
        self._lock = threading.Lock()

    def missing_message(self) -> str:
        return (f"model file not found: {self.path} (train one with POST /train/promptnucseg, or start the server "
                f"with --conf model_path <file>)")

    def get(self, device: str = "cpu") -> PromptNucSeg:
        """The pipeline on ``device``; raises :class:`RequestError` (503) naming the file when it is missing."""
        if not self.path.is_file():
            raise RequestError(self.missing_message(), status_code=503)
        mtime = self.path.stat().st_mtime
        with self._lock:
            cached = self._models.get(device)
            if cached is not None and cached[1] == mtime:
                return cached[0]
            logger.info("loading model %s on %s", self.path, device)
            try:
                model = load_model(self.path, device, **self.pipeline_kwargs)
            except (ValueError, KeyError, RuntimeError) as error:
                raise RequestError(f"model file {self.path} cannot be loaded: {error}", status_code=503) from error
            self._models[device] = (model, mtime)
            return model

    def class_names(self) -> dict[int, str]:
        """Class id -> name: the names stored with the model when it has them, else the bundle's class table.

        Read again when the file changes (a fine-tuned model may bring other classes).
        """
        mtime = self.path.stat().st_mtime if self.path.is_file() else None
        with self._lock:
            if self._names is not None and self._names[1] == mtime:
                return self._names[0]
        names: list[str] = []
        if mtime is not None:
            try:
                names = model_class_names(self.path)
            except Exception as error:  # the infer call reports an unloadable file; here only the names matter
                logger.error("cannot read class names from %s: %s", self.path, error)
        table = {k: v["name"] for k, v in load_class_table().items()}
        result = {i + 1: str(name) for i, name in enumerate(names)} if names else table
        with self._lock:
            self._names = (result, mtime)
        return result


def class_colors(names: dict[int, str]) -> dict[str, list[int]]:
    """Label name -> [r, g, b]: the bundle class table's colour for its names, grey for others."""
    table = {v["name"]: list(v["color"]) for v in load_class_table().values()}
    return {name: table.get(name, [128, 128, 128]) for name in names.values()}
