"""MONAI Label app serving the PromptNucSeg bundle: automatic and click-based nucleus segmentation for pathology.

Start (from the repository root)::

    monailabel start_server --app apps/promptnucseg --studies <images folder> --host 127.0.0.1 --port 8000 \
        [--conf model_path bundle/models/model.pt]

Models: ``promptnucseg`` (every nucleus of a region), ``promptnucseg_click`` (the nucleus under each click).
Trainer: ``promptnucseg`` (fine-tune on the saved labels). See ``docs/monailabel.md``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import lib  # noqa: F401  (puts the bundle on sys.path)
from lib.configs import PromptNucSegConfig
from lib.errors import RequestError
from lib.server import install_error_handlers
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class PromptNucSegApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_dir = os.path.join(app_dir, "model")
        self.task = PromptNucSegConfig()
        self.task.init("promptnucseg", self.model_dir, conf, None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="PromptNucSeg - Pathology",
            description="Nucleus instance segmentation and classification (point prompter + Segment Anything)",
        )
        install_error_handlers()

    def init_infers(self) -> dict[str, InferTask]:
        return self.task.infer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {self.task.name: self.task.trainer()}

    def infer(self, request: dict, datastore=None) -> dict[str, Any]:
        """Check the model and image before MONAI Label's own ``infer`` (which answers 500 for both)."""
        model = request.get("model")
        if model not in self._infers:
            raise RequestError(f"unknown model {model!r}; this server has {sorted(self._infers)}", status_code=404)
        image = request.get("image")
        if image is None or isinstance(image, str):
            if not image:
                raise RequestError("no image: pass ?image=<image id> (or upload a file)")
            if not os.path.exists(image) and not (datastore or self.datastore()).get_image_uri(image):
                raise RequestError(f"image {image!r} not found in the datastore ({self.studies})", status_code=404)
        return super().infer(request, datastore)

    def infer_wsi(self, request: dict, datastore=None) -> dict[str, Any]:
        """One task for the whole requested region: the pipeline tiles it itself, with overlapping context and
        seams resolved by predicted IoU, so MONAI Label's ``tile_size`` split (which cuts nuclei at tile borders)
        is not used. ``output`` (asap / dsa / json) picks the file written."""
        task = self._infers.get(request.get("model"))
        if task is None:
            raise RequestError(f"unknown model {request.get('model')!r}; this server has {sorted(self._infers)}",
                               status_code=404)
        merged = copy.deepcopy(task.config())
        merged.update(request)
        return self.infer(merged, datastore)
