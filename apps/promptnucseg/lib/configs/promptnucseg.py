"""Task config: the model file and the options of the two infer tasks and the trainer, from ``--conf``.

``--conf <key> <value>`` options (all optional):

=====================  ======================================  ===============================================
key                    default                                 meaning
=====================  ======================================  ===============================================
model_path             ``<repo>/bundle/models/model.pt``       the model file (``scripts.pipeline.model_file`` format)
device                 cuda if available, else cpu             where the pipeline runs
max_region_area        16777216 (4096 x 4096)                  largest region (px) one request may ask for
nms_radius, min_area,  the pipeline's (``scripts.pipeline.      the pipeline's options, any field of
prompter_tta, ...      options.PipelineOptions``)              ``PipelineOptions`` (``prompter_tta true``: prompts
                                                               from the prompter's 8 flips and quarter-turns;
                                                               booleans take true/false/yes/no/1/0 only)
exclude_radius         12                                      px: prompter points this close to a click are
                                                               the clicked nucleus, not a negative neighbour
min_click_probability  0.5                                     nuclear probability a click needs
min_click_iou          0.0                                     predicted IoU a click's mask needs (0: off)
click_context          128                                     px around the clicks when no size is given
simplify_tolerance     0.5                                     px, polygon simplification
slide_backend          tifffile                                reader of .svs/.tif/.ndpi slides
train_max_epochs       5                                       epochs of a fine-tuning run
train_dir              ``<app>/model/train``                   fine-tuning dataset, checkpoints and stats
=====================  ======================================  ===============================================
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lib import APP_DIR, DEFAULT_MODEL_PATH
from lib.infers import PromptNucSegClickInfer, PromptNucSegInfer
from lib.model import ModelStore
from lib.trainers import PromptNucSegTrain
from monailabel.interfaces.config import TaskConfig
from scripts.pipeline.options import PipelineOptions, option_names

logger = logging.getLogger(__name__)


def _conf(conf: dict, key: str, default: Any, kind: type) -> Any:
    value = conf.get(key)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError as error:
        raise ValueError(f"--conf {key} {value!r}: expected a {kind.__name__}") from error


def pipeline_options(conf: dict) -> PipelineOptions:
    """The pipeline's options from ``--conf`` (any field of :class:`PipelineOptions`; its defaults otherwise)."""
    given = {key: conf[key] for key in option_names() if conf.get(key) not in (None, "")}
    try:
        return PipelineOptions(**given)
    except ValueError as error:
        raise ValueError(f"--conf {error}") from error


class PromptNucSegConfig(TaskConfig):
    """Builds ``promptnucseg`` + ``promptnucseg_click`` (one shared model) and the ``promptnucseg`` trainer."""

    def init(self, name: str, model_dir: str, conf: dict, planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.path = Path(os.path.abspath(conf.get("model_path") or DEFAULT_MODEL_PATH))
        self.store = ModelStore(self.path, pipeline_options(conf))
        if not self.path.is_file():
            logger.error("PromptNucSeg: %s", self.store.missing_message())
        self.device = conf.get("device") or None
        self.max_region_area = _conf(conf, "max_region_area", 4096 * 4096, int)
        self.common = {
            "simplify_tolerance": _conf(conf, "simplify_tolerance", 0.5, float),
            "slide_backend": conf.get("slide_backend") or "tifffile",
            "device": self.device,
        }
        self.click = {
            "exclude_radius": _conf(conf, "exclude_radius", 12.0, float),
            "min_probability": _conf(conf, "min_click_probability", 0.5, float),
            "min_iou": _conf(conf, "min_click_iou", 0.0, float),
            "click_context": _conf(conf, "click_context", 128, int),
        }
        self.train_epochs = _conf(conf, "train_max_epochs", 5, int)
        self.work_dir = Path(os.path.abspath(conf.get("train_dir") or Path(model_dir or APP_DIR / "model") / "train"))

    def infer(self) -> dict[str, Any]:
        return {
            self.name: PromptNucSegInfer(self.store, self.max_region_area, **self.common),
            f"{self.name}_click": PromptNucSegClickInfer(self.store, self.max_region_area, **self.click, **self.common),
        }

    def trainer(self) -> PromptNucSegTrain:
        return PromptNucSegTrain(self.store, self.work_dir, max_epochs=self.train_epochs)
