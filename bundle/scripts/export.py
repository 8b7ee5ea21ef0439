"""One model file holding both networks: export from training checkpoints, load as a :class:`PromptNucSeg`.

File layout (``torch.save`` of plain containers, loadable with ``weights_only=True``)::

    {"format": "promptnucseg/1",
     "prompter": {"config": {num_classes, backbone, levels, anchor_step, fpn_channels, mlp_hidden, class_names},
                  "state_dict": {...}},
     "segmentor": {"config": {variant, image_size, overrides}, "state_dict": {...}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scripts.checkpoints import atomic_torch_save, load_checkpoint
from scripts.pipeline import PromptNucSeg
from scripts.prompter_net import Prompter
from scripts.segmentor_net import build_segmentor

MODEL_FORMAT = "promptnucseg/1"


def export_model(prompter_checkpoint: str | Path, segmentor_checkpoint: str | Path, output_path: str | Path,
                 half: bool = False) -> Path:
    """Combine the best prompter and segmentor checkpoints of a training run into one model file.

    Args:
        prompter_checkpoint, segmentor_checkpoint: ``best.pt`` (or ``last.pt``) written by the training.
        output_path: the model file, e.g. ``models/model.pt`` (written atomically).
        half: store floating-point weights as float16 (half the size; loaded back as float32).
    """
    parts = {}
    for name, path in (("prompter", prompter_checkpoint), ("segmentor", segmentor_checkpoint)):
        checkpoint = load_checkpoint(path)
        if "config" not in checkpoint or "network" not in checkpoint:
            raise KeyError(f"{path}: not a training checkpoint of this bundle (needs 'network' and 'config')")
        state = checkpoint["network"]
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        parts[name] = {"config": checkpoint["config"], "state_dict": state}
    atomic_torch_save({"format": MODEL_FORMAT, **parts}, output_path)
    return Path(output_path)


def build_networks(model: dict) -> tuple[Prompter, torch.nn.Module]:
    """Instantiate the prompter and segmentor described by a loaded model file, with their weights."""
    p_cfg, s_cfg = model["prompter"]["config"], model["segmentor"]["config"]
    prompter = Prompter(num_classes=p_cfg["num_classes"], backbone=p_cfg["backbone"], levels=tuple(p_cfg["levels"]),
                        anchor_step=p_cfg["anchor_step"], fpn_channels=p_cfg.get("fpn_channels", 256),
                        mlp_hidden=p_cfg.get("mlp_hidden", 256))
    segmentor = build_segmentor(variant=s_cfg["variant"], image_size=s_cfg["image_size"], **dict(s_cfg.get("overrides") or {}))
    for name, net in (("prompter", prompter), ("segmentor", segmentor)):
        state = {k: v.float() if v.is_floating_point() else v for k, v in model[name]["state_dict"].items()}
        net.load_state_dict(state)
    return prompter.eval(), segmentor.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", **pipeline_kwargs: Any) -> PromptNucSeg:
    """Load a model file as a ready-to-run :class:`PromptNucSeg` (``pipeline_kwargs``: its inference options).

    Raises:
        FileNotFoundError: naming the missing file. ValueError: a file of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (train one, or point --model_path at a model.pt)")
    model = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a PromptNucSeg model file (expected format {MODEL_FORMAT!r})")
    prompter, segmentor = build_networks(model)
    return PromptNucSeg(prompter, segmentor, **pipeline_kwargs).to(device).eval()


def model_class_names(path: str | Path) -> list[str]:
    """Class names stored with the prompter (index i = class id i + 1)."""
    model = torch.load(path, map_location="cpu", weights_only=True)
    return list(model["prompter"]["config"].get("class_names") or [])
