"""Live prediction sources for ``configs/evaluate.json``: the full pipeline, or the segmentor prompted by the truth.

Both follow :class:`scripts.evaluation.scoring.PredictionSource` (``predict(record) -> (inst_map, type_map)``), so the same
scoring code ranks saved predictions of any tool, the automatic pipeline and the oracle-prompted segmentor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.inference import image_tensor, write_image_outputs
from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.data.points import instance_points
from scripts.data.records import NucleusRecord
from scripts.evaluation.scoring import PredictionDir

PROMPT_MODES = ("prompter", "oracle")


class PipelinePredictions:
    """Predict with the model: ``prompts="prompter"`` runs the automatic pipeline; ``"oracle"`` prompts the
    segmentor with one interior point per true nucleus (its K nearest as negatives), classes from the truth
    (paper Table 7, "GT" columns).

    Args:
        network: the pipeline.
        prompts: ``"prompter"`` or ``"oracle"``.
        save_dir: when set, the per-image outputs (label maps, GeoJSON, CSV, overlay) are written there.

    ``class_table`` is the network's own (its model file's).
    """

    def __init__(self, network: PromptNucSeg, prompts: str = "prompter", save_dir: str | None = None) -> None:
        if prompts not in PROMPT_MODES:
            raise ValueError(f"prompts must be one of {PROMPT_MODES}, got {prompts!r}")
        self.network = network
        self.prompts = prompts
        self.save_dir = Path(save_dir) if save_dir else None
        self.class_table = network.class_table

    def predict(self, record: NucleusRecord) -> tuple[np.ndarray, np.ndarray]:
        given = oracle_prompts(record) if self.prompts == "oracle" else None
        result = self.network(image_tensor(record.image), prompts=given)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            write_image_outputs(record.name, record.image, result, self.save_dir, self.class_table)
        return result["inst_map"].numpy(), result["type_map"].numpy()


def oracle_prompts(record: NucleusRecord) -> dict[str, torch.Tensor]:
    """One point inside every true nucleus (x, y px), its true class id (1 when untyped) and score 1."""
    points, class_index, _ = instance_points(record.inst_map, record.type_map)
    return {"points": torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2),
            "classes": torch.as_tensor(class_index, dtype=torch.int64) + 1, "scores": torch.ones(len(points))}


def make_prediction_source(pred_dir: str | None, prompts: str, model_path: str, device: Any = "cpu",
                           save_dir: str | None = None, options: PipelineOptions | None = None,
                           method: str = "promptnucseg") -> Any:
    """Saved predictions when ``pred_dir`` is given; else ``method``: ``promptnucseg``, the model loaded from
    ``model_path`` (only then) and run with ``options``, or ``watershed``, the training-free baseline
    (:mod:`scripts.evaluation.baseline`)."""
    if pred_dir:
        return PredictionDir(pred_dir)
    if method == "watershed":
        from scripts.evaluation.baseline import BaselinePredictions

        return BaselinePredictions()
    if method != "promptnucseg":
        raise ValueError(f"method must be 'promptnucseg' or 'watershed', got {method!r}")
    from scripts.pipeline.model_file import load_model

    network = load_model(model_path, device=device, options=options)
    return PipelinePredictions(network, prompts=prompts, save_dir=save_dir)
