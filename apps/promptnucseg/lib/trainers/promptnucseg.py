"""``promptnucseg`` trainer: fine-tune the model file on the labels saved in the datastore.

MONAI Label runs a train request in its own subprocess; this task (1) converts the datastore's final labels
(QuPath's ASAP XML) into the bundle's ``folder`` layout (:mod:`lib.labels`), (2) runs :mod:`lib.finetune` -- the
bundle's ``configs/train.json`` started from the current model's weights -- in a subprocess from ``bundle/``,
(3) which writes the new model file atomically over ``model_path`` (previous one kept as ``<name>.prev.pt``).
The infer tasks reload the file on their next call (they watch its modification time).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lib import BUNDLE_DIR
from lib.labels import write_folder_dataset
from lib.model import ModelStore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

FINETUNE_SCRIPT = Path(__file__).resolve().parent.parent / "finetune.py"


class PromptNucSegTrain(TrainTask):
    """Fine-tune from the saved labels.

    Request options (defaults in :meth:`config`): ``max_epochs``, ``device`` (``cuda`` / ``cpu``),
    ``min_val_images`` (below it the training images are the validation images too).
    """

    def __init__(self, store: ModelStore, work_dir: str | Path, max_epochs: int = 5,
                 description: str = "Fine-tune PromptNucSeg (prompter + segmentor) on the submitted labels") -> None:
        super().__init__(description)
        self.store = store
        self.work_dir = Path(work_dir)
        self.max_epochs = max_epochs

    def config(self) -> dict[str, Any]:
        import torch

        return {"max_epochs": self.max_epochs, "device": "cuda" if torch.cuda.is_available() else "cpu",
                "min_val_images": 5}

    def stats(self) -> dict[str, Any]:
        path = self.work_dir / "stats.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        options = {**self.config(), **request}
        pairs = datastore.datalist()
        if not pairs:
            raise ValueError("no final labels in the datastore to train on (submit labels first, e.g. QuPath "
                             "'MONAI Label > Submit Label')")
        names = self.store.class_names()
        dataset_dir = self.work_dir / "dataset"
        stems = write_folder_dataset(pairs, dataset_dir, {name: cid for cid, name in names.items()})
        logger.info("training on %d labelled image(s): %s", len(stems), stems)
        cmd = [sys.executable, str(FINETUNE_SCRIPT), "--dataset_dir", str(dataset_dir),
               "--model_path", str(self.store.path), "--work_dir", str(self.work_dir),
               "--max_epochs", str(int(options["max_epochs"])), "--device", str(options["device"]),
               "--min_val_images", str(int(options["min_val_images"]))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE_DIR), os.environ.get("PYTHONPATH", "")]),
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        start = time.time()
        logger.info("running %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=BUNDLE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        tail: list[str] = []
        for line in proc.stdout:  # stream the training log into MONAI Label's train log
            logger.info(line.rstrip())
            tail = (tail + [line])[-40:]
        if proc.wait() != 0:
            raise RuntimeError(f"fine-tuning failed (exit {proc.returncode}):\n{''.join(tail)}")
        return {**self.stats(), "images": len(stems), "seconds": round(time.time() - start, 1)}
