"""The pieces that plug PromptNucSeg's two networks into MONAI's engines.

MONAI's ``SupervisedTrainer`` runs ``loss(network(inputs, *args), targets)``; the classes here say what the
inputs, targets and extra arguments of each stage are (``prepare_batch``), wrap the loss so its terms are
logged, clip gradients, and give the evaluators their prompt-driven iteration (``iteration_update``).
"""

from __future__ import annotations

from monai.apps.utils import get_logger
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.utils import apply_to_tensor, convert_tensor
from monai.engines import IterationEvents
from monai.inferers import Inferer

from scripts.pipeline.instances import masks_to_instances
from scripts.pipeline.options import PRECISIONS, arithmetic_dtype, as_choice
from scripts.segmentor.classifier import classes_from_logits
from scripts.segmentor.net import crop_windows

logger = get_logger("scripts.training.engine")


class PrompterBatch:
    """``prepare_batch`` of the prompter: inputs = image (B, 3, H, W); targets = points (x, y px), classes, fg mask.

    Classes of the targets are 0-based foreground class indices (type id - 1; untyped data: all 0).
    """

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, dict]:
        device = device or "cpu"
        image = batchdata["image"].as_tensor() if hasattr(batchdata["image"], "as_tensor") else batchdata["image"]
        inst = torch.as_tensor(batchdata["inst"])
        targets = {
            "points": [p.float() for p in convert_tensor(list(batchdata["points"]), device, non_blocking)],
            "classes": [c.long() for c in convert_tensor(list(batchdata["point_classes"]), device, non_blocking)],
            "fg": (inst > 0).float().to(device=device, non_blocking=non_blocking),
        }
        return image.float().to(device=device, non_blocking=non_blocking), targets


class SegmentorBatch:
    """``prepare_batch`` of the segmentor: inputs = image; args = prompt coords (x, y px) and labels; targets =
    masks (and, when the batch has them, the prompts' classes 0..C-1, -1 unknown: ``prompt_classes``)."""

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, dict, tuple, dict]:
        device = device or "cpu"
        image = torch.as_tensor(batchdata["image"]).float().to(device=device, non_blocking=non_blocking)
        coords = torch.as_tensor(batchdata["prompt_coords"]).float().to(device)
        labels = torch.as_tensor(batchdata["prompt_labels"]).long().to(device)
        valid = torch.as_tensor(batchdata["prompt_valid"]).bool().to(device)
        targets = {"masks": torch.as_tensor(batchdata["prompt_masks"]).float().to(device), "valid": valid}
        if "prompt_classes" in batchdata:
            targets["classes"] = torch.as_tensor(batchdata["prompt_classes"]).long().to(device)
        return image, targets, (coords, labels, valid), {}


class PrecisionInferer(Inferer):
    """The trainers' forward pass in the arithmetic of the ``precision`` option (``float32``, ``bfloat16``, ``auto``:
    :func:`~scripts.pipeline.options.arithmetic_dtype`): in bfloat16 the network runs under ``torch.autocast`` (the
    weights, their gradients and the optimiser stay float32) and its floating outputs come back as float32, so the
    loss is computed in float32. MONAI's own ``amp`` flag autocasts on CUDA only, with a float16 loss scaler that
    bfloat16 does not need."""

    def __init__(self, precision: str = "float32") -> None:
        super().__init__()
        self.precision = as_choice(precision, "precision", PRECISIONS)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        dtype = arithmetic_dtype(self.precision, inputs.device)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = network(inputs, *args, **kwargs)
        if dtype != torch.bfloat16:
            return pred
        return apply_to_tensor(pred, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t)


class LossWithTerms:
    """Call a loss returning a dict of terms; hand the engine the total (``loss``) and keep the terms for logging.

    Subclasses say how the engine's ``(pred, targets)`` map onto the loss's arguments.
    :class:`LossTermsHandler` averages ``last_terms`` over an epoch into ``engine.state.metrics``
    (``loss_<term>``), where ``StatsHandler`` and ``MLFlowHandler`` pick them up.
    """

    def __init__(self, loss: Callable[..., dict]) -> None:
        self.loss = loss
        self.last_terms: dict[str, float] = {}

    def terms(self, pred: Any, targets: Any) -> dict[str, torch.Tensor]:
        return self.loss(pred, targets)

    def __call__(self, pred: Any, targets: Any) -> torch.Tensor:
        terms = self.terms(pred, targets)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return terms["loss"]


class PrompterObjective(LossWithTerms):
    """:class:`scripts.prompter.loss.PrompterLoss` on the targets of :class:`PrompterBatch`."""

    def terms(self, pred: dict, targets: dict) -> dict[str, torch.Tensor]:
        return self.loss(pred, targets["points"], targets["classes"], targets["fg"])


class SegmentorObjective(LossWithTerms):
    """:class:`scripts.segmentor.loss.SegmentorLoss` on the targets of :class:`SegmentorBatch`, each target mask
    cropped to its prompt's decoding window (``pred["window_origins"]``, when the segmentor gives them); the class
    term when the segmentor classifies (``pred["class_logits"]``)."""

    def terms(self, pred: dict, targets: dict) -> dict[str, torch.Tensor]:
        masks = targets["masks"]
        logits = pred["mask_logits"]
        if "window_origins" in pred:
            batch, prompts = masks.shape[:2]
            crops = crop_windows(masks.flatten(0, 1), pred["window_origins"].flatten(0, 1), logits.shape[-1])
            masks = crops.view(batch, prompts, *crops.shape[-2:])
        if "class_logits" in pred:
            return self.loss(logits, pred["iou_pred"], masks, targets["valid"], class_logits=pred["class_logits"],
                             classes=targets.get("classes"))
        return self.loss(logits, pred["iou_pred"], masks, targets["valid"])


class LossTermsHandler:
    """Epoch means of the loss terms of a :class:`LossWithTerms` as ``engine.state.metrics['loss_<term>']``."""

    def __init__(self, loss: LossWithTerms) -> None:
        self.loss = loss
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for key, value in self.loss.last_terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def _publish(self, engine: Engine) -> None:
        for key, value in self._sums.items():
            name = key if key.startswith("loss") else f"loss_{key}"
            engine.state.metrics[name] = value / max(self._count, 1)


class GradientClipping:
    """Clip the global gradient norm after every backward pass (``max_norm`` <= 0 disables it)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter] | Any, max_norm: float = 0.1) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if self.max_norm > 0:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)


class PrompterEvalStep:
    """Evaluator iteration of the prompter: decode prompts and hand predicted and true points to the metrics.

    ``engine.state.output`` is a list of per-image dicts ``{pred_points, pred_classes, pred_scores, points, classes,
    name}`` with points (x, y) px and classes 1..C (the true classes are shifted from the 0-based training
    indices), as :func:`scripts.evaluation.handlers.point_output_transform` reads them.
    """

    def __init__(self, decode: Callable[..., list[dict]]) -> None:
        self.decode = decode

    def __call__(self, engine: Engine, batchdata: dict) -> dict:
        image, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.network.eval()
        with torch.no_grad():
            outputs = engine.network(image)
        preds = self.decode(outputs, image_size=tuple(image.shape[-2:]))
        engine.state.output = [
            {"pred_points": pred["points"].cpu(), "pred_classes": pred["classes"].cpu(),
             "pred_scores": pred["scores"].cpu(), "points": points.cpu(), "classes": classes.cpu() + 1, "name": name}
            for pred, points, classes, name in zip(preds, targets["points"], targets["classes"], batchdata["name"])
        ]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class OracleSegmentorEvalStep:
    """Evaluator iteration of the segmentor prompted by the ground truth (paper Table 7, "GT" columns).

    Each true nucleus is prompted at an interior point, with its ``num_neg`` nearest other nuclei as negative
    prompts; the masks become an instance map (:func:`masks_to_instances`). A segmentor with a [cls] head (paper
    Table 8) also classifies each nucleus (:func:`classes_from_logits`), so the metric can score its classes.
    Output: a list of per-image dicts ``{pred_inst, inst, name}`` with (H, W) int32 maps, plus ``pred_type`` and
    ``type`` for a classifying segmentor on data with a type map, as
    :func:`scripts.evaluation.handlers.instance_output_transform` reads them.
    """

    def __init__(self, oracle_prompts: Callable, num_neg: int = 1, min_area: int = 0, chunk_size: int = 256) -> None:
        self.oracle_prompts = oracle_prompts
        self.num_neg = num_neg
        self.min_area = min_area
        self.chunk_size = chunk_size

    def __call__(self, engine: Engine, batchdata: dict) -> dict:
        device = engine.state.device
        images = torch.as_tensor(batchdata["image"]).float().to(device)
        true_insts = torch.as_tensor(batchdata["inst"])[:, 0].numpy()
        classify = bool(getattr(engine.network, "num_classes", 0)) and "type" in batchdata
        engine.network.eval()
        preds = []
        with torch.no_grad():
            embeddings = engine.network.encode(images)
            for embedding, true_inst in zip(embeddings, true_insts):
                coords, labels = self.oracle_prompts(true_inst, self.num_neg)[:2]
                preds.append(self._segment(engine.network, embedding, coords, labels, true_inst.shape, classify))
        engine.state.output = [
            {"pred_inst": pred_inst, "inst": true, "name": name}
            for (pred_inst, _), true, name in zip(preds, true_insts, batchdata["name"])
        ]
        if classify:
            for out, (_, pred_type), true_type in zip(engine.state.output, preds,
                                                      torch.as_tensor(batchdata["type"])[:, 0].numpy()):
                out.update(pred_type=pred_type, type=true_type)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _segment(self, network: Any, embedding: torch.Tensor, coords: Any, labels: Any, shape: tuple,
                 classify: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(instance map, class map or None), both (H, W) int32."""
        coords = torch.as_tensor(coords, dtype=torch.float32, device=embedding.device)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=embedding.device)
        logits, ious, class_logits = decode_in_chunks(network, embedding, coords, labels, self.chunk_size, classify)
        if logits is None:
            empty = np.zeros(shape, np.int32)
            return empty, empty.copy() if classify else None
        inst_map, prompt_of_id = masks_to_instances(logits, ious, min_area=self.min_area)
        if not classify:
            return inst_map, None
        lut = np.zeros(len(prompt_of_id) + 1, np.int32)
        lut[1:] = classes_from_logits(class_logits[torch.from_numpy(prompt_of_id)])[0].numpy()
        return inst_map, lut[inst_map]


def decode_in_chunks(network: Any, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                     chunk_size: int = 256, with_classes: bool = False
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the mask decoder over all prompts of one image, ``chunk_size`` prompts per call (bounded memory).

    Returns mask logits (N, H, W), predicted IoU (N,) and, ``with_classes``, the [cls] head's logits (N, C + 1)
    (else None); (None, None, None) when there is no prompt.
    """
    if coords.shape[0] == 0:
        return None, None, None
    outs = [network.decode(embedding, coords[i : i + chunk_size], labels[i : i + chunk_size], with_classes=with_classes)
            for i in range(0, coords.shape[0], chunk_size)]
    class_logits = torch.cat([o[2] for o in outs]).cpu() if with_classes else None
    return torch.cat([o[0] for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu(), class_logits


def run_stages(stage: str, trainers: dict[str, Engine | None]) -> None:
    """Run the trainers of ``stage`` in order: ``prompter``, ``segmentor``, ``both`` (prompter first) or ``joint``
    (both networks on one shared image encoder, one trainer: :mod:`scripts.training.joint`)."""
    order = {"prompter": ["prompter"], "segmentor": ["segmentor"], "both": ["prompter", "segmentor"],
             "joint": ["joint"]}
    if stage not in order:
        raise ValueError(f"stage must be one of {sorted(order)}, got {stage!r}")
    for name in order[stage]:
        trainer = trainers.get(name)
        if trainer is None:
            raise ValueError(f"no trainer configured for stage '{name}'")
        logger.info("training stage: %s", name)
        trainer.run()
