"""One model file holding both networks: export from training checkpoints, load as a :class:`PromptNucSeg`.

File layout (``torch.save`` of plain containers, loadable with ``weights_only=True``)::

    {"format": "promptnucseg/3", "storage": "float32" | "float16" | "int8",
     "class_table": {class_id: {"name": str, "color": [r, g, b]}}, "classifier": "prompter" | "segmentor",
     "training_scale": {"mpp": µm/px, "nucleus_area": px²},
     "prompter": {"config": {num_classes, backbone, levels, anchor_step, fpn_channels, mlp_hidden, class_names,
                             ...the prompter's other training hyperparameters}, "state_dict": {...}, "int8_scales": {...}},
     "segmentor": {"config": {variant, image_size, overrides, ...}, "state_dict": {...}, "int8_scales": {...}}}

The class table travels with the model: inference, the writers and the MONAI Label app name and colour the classes
from it. It is made at export from the class names the classifying network was trained with
(:func:`scripts.data.records.class_table_from_names`); an untyped model has an empty table. ``classifier`` says
which network classifies: ``segmentor`` when the segmentor has a [cls] head (paper Table 8, its config's
``num_classes`` > 0), else ``prompter``; files without the key (all before it) are ``prompter``. A model trained
with ``--stage joint`` (Table 9) is exported from its one checkpoint (:func:`export_joint_model`) into the same
layout, the shared backbone's weights in both parts.

Storage ``float16`` keeps every floating-point tensor as float16; ``int8`` additionally stores each weight matrix /
convolution kernel (2 or more dims, at least :data:`INT8_MIN_ELEMENTS` elements) as int8 with one float32 scale per
output channel (symmetric, ``weight ~= int8 * scale``, scales in ``int8_scales`` under the same key). Loading
restores float32 tensors. ``promptnucseg/1`` files (no ``storage``, no ``int8_scales``) and ``promptnucseg/2`` files
(no ``class_table``) are still read, with the bundle's class table (``configs/metadata.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scripts.data.records import class_table_from_names, load_class_table
from scripts.io.atomic import atomic_torch_save
from scripts.io.checkpoints import load_checkpoint
from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.scale import NUCLEUS_AREA, TRAINING_MPP
from scripts.prompter.net import Prompter
from scripts.segmentor.build import build_segmentor

MODEL_FORMAT = "promptnucseg/3"
READABLE_FORMATS = ("promptnucseg/1", "promptnucseg/2", MODEL_FORMAT)
STORAGES = ("float32", "float16", "int8")
INT8_MIN_ELEMENTS = 1024
PARTS = ("prompter", "segmentor")
# the training data's resolution (µm/px) and median nucleus area (px²) at it, read by ``input_scale auto``
# (scripts/pipeline/scale.py); the bundle's training data is 40x (MoNuSeg, CoNSeP; PanNuke too)
TRAINING_SCALE = {"mpp": TRAINING_MPP, "nucleus_area": NUCLEUS_AREA}


def export_model(prompter_checkpoint: str | Path, segmentor_checkpoint: str | Path, output_path: str | Path,
                 storage: str = "float32") -> Path:
    """Combine the best prompter and segmentor checkpoints of a training run into one model file.

    Args:
        prompter_checkpoint, segmentor_checkpoint: ``best.pt`` (or ``last.pt``) written by the training, or a model
            file, whose part of that name is taken (e.g. a new prompter with the shipped model's segmentor).
        output_path: the model file, e.g. ``models/model.pt`` (written atomically).
        storage: ``float32``; ``float16`` (half the size); ``int8`` (weight matrices as int8 with per-channel
            scales, the rest float16: about a quarter of the float32 size). Loaded back as float32 either way.
    """
    parts = {name: _part(path, name) for name, path in zip(PARTS, (prompter_checkpoint, segmentor_checkpoint))}
    return _write_model(parts, output_path, storage)


def _part(path: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, float32 state dict) of the part ``name`` from a training checkpoint or a model file at ``path``."""
    loaded = load_checkpoint(path)
    if isinstance(loaded, dict) and "format" in loaded:
        model = _checked_format(loaded, path)
        return model[name]["config"], part_state_dict(model, name)
    checkpoint = _training_checkpoint(path, loaded)
    return checkpoint["config"], checkpoint["network"]


def export_joint_model(checkpoint: str | Path, output_path: str | Path, storage: str = "float32") -> Path:
    """The model file of a joint training (``--stage joint``, paper Table 9) from its one checkpoint (``joint/best.pt``):
    the network's ``prompter.*`` and ``segmentor.*`` weights (the shared backbone under both) with the configs of
    both parts. Arguments as :func:`export_model`."""
    joint = _training_checkpoint(checkpoint)
    if not all(name in joint["config"] for name in PARTS):
        raise KeyError(f"{checkpoint}: not a joint training checkpoint (its config has no 'prompter' and "
                       f"'segmentor'; export a stage's checkpoints with export_model)")
    parts = {name: (joint["config"][name], {key.removeprefix(f"{name}."): value for key, value in
                                           joint["network"].items() if key.startswith(f"{name}.")}) for name in PARTS}
    return _write_model(parts, output_path, storage)


def _training_checkpoint(path: str | Path, loaded: Any = None) -> dict:
    """The training checkpoint at ``path`` (``loaded``: its contents, when already read), its keys checked."""
    checkpoint = load_checkpoint(path) if loaded is None else loaded
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "network" not in checkpoint:
        raise KeyError(f"{path}: not a training checkpoint of this bundle (needs 'network' and 'config')")
    return checkpoint


def _write_model(parts: dict[str, tuple[dict, dict]], output_path: str | Path, storage: str) -> Path:
    """Write ``{part: (config, state_dict)}`` as a model file, with the class table of the network that
    classifies."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    model = {}
    for name, (config, network) in parts.items():
        state, scales = pack_state_dict(network, storage)
        model[name] = {"config": config, "state_dict": state, "int8_scales": scales}
    classifier = "segmentor" if model["segmentor"]["config"].get("num_classes") else "prompter"
    class_table = class_table_from_names(model[classifier]["config"].get("class_names") or [])
    atomic_torch_save({"format": MODEL_FORMAT, "storage": storage, "class_table": class_table,
                       "classifier": classifier, "training_scale": TRAINING_SCALE, **model}, output_path)
    return Path(output_path)


def pack_state_dict(state: dict[str, torch.Tensor], storage: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``state`` in a model file's ``storage`` (see the module docstring): (packed tensors, int8 scales by key)."""
    packed, scales = {}, {}
    for key, value in state.items():
        if not value.is_floating_point() or storage == "float32":
            packed[key] = value
        elif storage == "int8" and value.dim() >= 2 and value.shape[0] > 1 and value.numel() >= INT8_MIN_ELEMENTS:
            rows = value.detach().float().reshape(value.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
            packed[key] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(value.shape)
            scales[key] = scale
        else:
            packed[key] = value.half()
    return packed, scales


def part_state_dict(model: dict, part: str) -> dict[str, torch.Tensor]:
    """The float32 state dict of ``part`` (``prompter`` or ``segmentor``) of a loaded model file."""
    scales = model[part].get("int8_scales") or {}
    state = {}
    for key, value in model[part]["state_dict"].items():
        if key in scales:
            state[key] = value.float() * scales[key].float().reshape(-1, *([1] * (value.dim() - 1)))
        else:
            state[key] = value.float() if value.is_floating_point() else value
    return state


def read_model_file(path: str | Path) -> dict:
    """A model file's contents (``torch.load``, ``weights_only=True``), its format checked.

    Raises:
        FileNotFoundError: naming the missing file. ValueError: a file of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (train one, or point --model_path at a model.pt)")
    try:
        model = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file at all (text, truncated, another pickle): say what was expected
        raise ValueError(f"{path}: not a PromptNucSeg model file (torch.load failed: {type(error).__name__})"
                         ) from error
    return _checked_format(model, path)


def _checked_format(model: Any, path: str | Path) -> dict:
    """``model`` (a loaded model file) when its format is one this code reads; else a ValueError naming ``path``."""
    if not isinstance(model, dict) or model.get("format") not in READABLE_FORMATS:
        found = model.get("format") if isinstance(model, dict) else type(model).__name__
        raise ValueError(f"{path}: not a PromptNucSeg model file (format {found!r}, expected one of "
                         f"{READABLE_FORMATS})")
    return model


def build_networks(model: dict) -> tuple[Prompter, torch.nn.Module]:
    """Instantiate the prompter and segmentor described by a loaded model file, with their weights."""
    p_cfg, s_cfg = model["prompter"]["config"], model["segmentor"]["config"]
    prompter = Prompter(num_classes=p_cfg["num_classes"], backbone=p_cfg["backbone"], levels=tuple(p_cfg["levels"]),
                        anchor_step=p_cfg["anchor_step"], fpn_channels=p_cfg.get("fpn_channels", 256),
                        mlp_hidden=p_cfg.get("mlp_hidden", 256))
    segmentor = build_segmentor(variant=s_cfg["variant"], image_size=s_cfg["image_size"],
                                num_classes=s_cfg.get("num_classes", 0), **dict(s_cfg.get("overrides") or {}))
    for name, net in zip(PARTS, (prompter, segmentor)):
        net.load_state_dict(part_state_dict(model, name))
    return prompter.eval(), segmentor.eval()


def model_class_table(model: dict) -> dict[int, dict]:
    """The class table of a loaded model file: its own, or the bundle's for files older than ``promptnucseg/3``."""
    if "class_table" in model:
        return {int(k): {"name": str(v["name"]), "color": [int(c) for c in v["color"]]}
                for k, v in model["class_table"].items()}
    return load_class_table()


def load_model(path: str | Path, device: str | torch.device = "cpu", options: PipelineOptions | None = None,
               **changes: Any) -> PromptNucSeg:
    """Load a model file as a ready-to-run :class:`PromptNucSeg` with the file's class table.

    Args:
        path: the model file. device: where it runs.
        options: the pipeline's options (:class:`PipelineOptions`; its defaults when None).
        **changes: options changed by name (``prompter_tta=True``).

    Raises:
        FileNotFoundError: naming the missing file. ValueError: a file of another format.
    """
    model = read_model_file(path)
    prompter, segmentor = build_networks(model)
    network = PromptNucSeg(prompter, segmentor, options, class_table=model_class_table(model),
                           classifier=model.get("classifier", "prompter"),
                           training_scale=model.get("training_scale"), **changes)
    return network.to(device).eval()
