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
import numbers
import os
from typing import Any

import torch

import lib  # noqa: F401  (puts the bundle on sys.path)
from lib.configs import PromptNucSegConfig
from lib.errors import RequestError, is_plain_name, not_in_datastore, shown
from lib.server import install_error_handlers, install_request_guards, trusted_paths
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def served_image(request: dict, datastore) -> dict:
    """``request`` with an image the server may segment: the id of an image of ``datastore``, or a file of the
    current HTTP request (its upload, its session's image; see :func:`lib.server.trusted_paths`). Paths are refused
    even when they exist, with the same 404 as a missing id."""
    image = request.get("image")
    if image is None or image == "":
        raise RequestError("no image: pass ?image=<image id> (or upload a file)")
    if isinstance(image, str) and image in trusted_paths():
        return request
    uri = datastore.get_image_uri(image) if isinstance(image, str) else ""
    if not uri:
        raise not_in_datastore(image)
    if os.path.exists(image):  # an id that is also a path from the working directory: MONAI Label would read that
        return {**request, "image": uri}
    return request


def check_device(value: Any) -> None:
    """``device``: cpu, cuda, cuda:<index of a GPU here> (cuda on a machine without one runs on cpu) or a GPU name
    of /info/; a list takes its first entry, as MONAI Label does."""
    from monailabel.utils.others.generic import device_map

    device = value[0] if isinstance(value, (list, tuple)) and value else value
    if not value or (isinstance(device, str) and device in device_map()):  # empty: MONAI Label's default device
        return
    try:
        parsed = torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        parsed = None
    gpus = torch.cuda.device_count()
    if parsed is None or parsed.type not in ("cpu", "cuda") or (gpus and (parsed.index or 0) >= gpus):
        raise RequestError(f"'device' must be cpu, cuda or cuda:<index> of a GPU of this server, got {shown(value)}")


def check_monailabel_options(request: dict) -> None:
    """The request keys MONAI Label itself reads, which it would turn into a 500 (or a file written anywhere)."""
    check_device(request.get("device"))
    level = request.get("logging")
    if level is not None and (not isinstance(level, str) or level.upper() not in LOG_LEVELS):
        raise RequestError(f"'logging' must be one of {', '.join(LOG_LEVELS)}, got {shown(level)}")
    tag = request.get("label_tag")
    if tag is not None and not is_plain_name(tag):
        raise RequestError(f"'label_tag' must be a plain name (no folders), got {shown(tag)}")
    timeout = request.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0):
        raise RequestError(f"'timeout' must be a positive number of seconds, got {shown(timeout)}")


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
        install_request_guards()

    def init_infers(self) -> dict[str, InferTask]:
        return self.task.infer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {self.task.name: self.task.trainer()}

    def infer(self, request: dict, datastore=None) -> dict[str, Any]:
        """Check the model, the image (see :func:`served_image`) and MONAI Label's own options before MONAI Label's
        ``infer`` (which answers 500 for a bad model or image, and reads any path it is given)."""
        model = request.get("model")
        if model not in self._infers:
            raise RequestError(f"unknown model {model!r}; this server has {sorted(self._infers)}", status_code=404)
        datastore = datastore or self.datastore()
        request = served_image(request, datastore)
        check_monailabel_options(request)
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
