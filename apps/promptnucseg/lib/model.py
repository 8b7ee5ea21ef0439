"""The model file behind both infer tasks: loaded on first use, reloaded when the file changes (after training)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from lib.errors import RequestError
from scripts.pipeline.model_file import load_model, model_class_table, read_model_file
from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.promptnucseg import PromptNucSeg

logger = logging.getLogger(__name__)


class ModelStore:
    """One :class:`PromptNucSeg` per device, loaded from ``path`` and reloaded when its mtime changes.

    Args:
        path: the model file (``scripts.pipeline.model_file`` format).
        options: the pipeline's options (``--conf`` values; the bundle's defaults when None).
    """

    def __init__(self, path: str | os.PathLike, options: PipelineOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or PipelineOptions()
        self._models: dict[str, tuple[PromptNucSeg, float]] = {}
        self._table: tuple[dict[int, dict], float | None] | None = None
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
                model = load_model(self.path, device, self.options)
            except (ValueError, KeyError, RuntimeError) as error:
                raise RequestError(f"model file {self.path} cannot be loaded: {error}", status_code=503) from error
            self._models[device] = (model, mtime)
            return model

    def class_table(self) -> dict[int, dict]:
        """Class id -> ``{"name", "color"}``: the table of the model file (read again when the file changes: a
        fine-tuned model may bring other classes); empty when the file is missing or unreadable."""
        mtime = self.path.stat().st_mtime if self.path.is_file() else None
        with self._lock:
            if self._table is not None and self._table[1] == mtime:
                return self._table[0]
        table: dict[int, dict] = {}
        if mtime is not None:
            try:
                table = model_class_table(read_model_file(self.path))
            except Exception as error:  # the infer call reports an unloadable file; here only the table matters
                logger.error("cannot read the class table of %s: %s", self.path, error)
        with self._lock:
            self._table = (table, mtime)
        return table

    def class_names(self) -> dict[int, str]:
        """Class id -> name, from :meth:`class_table`."""
        return {class_id: entry["name"] for class_id, entry in self.class_table().items()}

    def class_colors(self) -> dict[str, list[int]]:
        """Label name -> [r, g, b], from :meth:`class_table`."""
        return {entry["name"]: list(entry["color"]) for entry in self.class_table().values()}
