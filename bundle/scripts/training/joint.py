"""Joint training (paper §4.3, Table 9): prompter and segmentor trained together on one shared image encoder.

The paper shares the segmentor's image encoder (SAM's ViT-H) with the prompter and trains both at once. Here the
segmentor's encoder is convolutional (:class:`scripts.segmentor.conv_encoder.ConvImageEncoder`: a backbone's four
stages fused into SAM's embedding), so the closest variant shares that backbone: one CNN runs once per image, its
stages C2..C5 feed both the prompter's FPN (and from there its heads) and the segmentor's fusion and neck (and from
there the mask decoder). Each network keeps its own parts above the backbone. The loss is ``prompter_weight`` x the
prompter's Eq. 6 + ``segmentor_weight`` x the segmentor's Eq. 2, back-propagated together into the shared backbone.

The joint stage starts from copies of the stage networks (``prompter#network``, ``segmentor#network``: random, or
their ``init_checkpoint``), with the prompter's own backbone replaced by the segmentor's; their architectures and
loss settings are those of ``prompter#hparams`` and ``segmentor#hparams``. A ViT segmentor (the paper's) has a
single-scale output and no backbone to share: ``--stage joint`` then stops with an error naming the option.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines import IterationEvents
from torch import nn

from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.segmentor.conv_encoder import ConvImageEncoder
from scripts.training.engine import LossWithTerms, PrompterBatch, SegmentorBatch

__all__ = ["JointBatch", "JointEvalStep", "JointNetwork", "JointObjective", "shared_encoder_problem"]

PARTS = ("prompter", "segmentor")


def _layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def shared_encoder_problem(prompter: nn.Module, segmentor: nn.Module) -> str | None:
    """Why the segmentor's image-encoder backbone cannot serve as ``prompter``'s backbone, or None when it can (a
    convolutional encoder whose backbone has the prompter's architecture, the same pixel normalisation)."""
    encoder = getattr(segmentor, "image_encoder", None)
    if not isinstance(encoder, ConvImageEncoder):
        return (f"--stage joint shares the segmentor's convolutional image encoder with the prompter; "
                f"segmentor#hparams#sam_variant {segmentor.config.get('variant')!r} has a "
                f"{type(encoder).__name__} (use conv_small)")
    if _layout(encoder.backbone) != _layout(prompter.backbone):
        return (f"--stage joint shares the segmentor's image-encoder backbone with the prompter, but "
                f"prompter#hparams#backbone is another network than the segmentor's conv_backbone "
                f"{segmentor.config.get('conv_backbone')!r}: set --prompter#hparams#backbone "
                f"{segmentor.config.get('conv_backbone')}")
    if not (torch.equal(prompter.pixel_mean.flatten(), segmentor.pixel_mean.flatten())
            and torch.equal(prompter.pixel_std.flatten(), segmentor.pixel_std.flatten())):
        return "--stage joint: the prompter and the segmentor normalise pixels differently"
    return None


class JointNetwork(nn.Module):
    """A prompter and a segmentor on one image-encoder backbone (the segmentor's; see the module docstring).

    Args:
        prompter: a :class:`scripts.prompter.net.Prompter`; segmentor: a :class:`scripts.segmentor.net.Segmentor`
            with a convolutional image encoder. Both are copied (the stage networks stay as they are).

    ``prompter.backbone`` and ``segmentor.image_encoder.backbone`` are then the same module, so the state dict
    holds it under both names (each part's weights are complete:
    :func:`scripts.pipeline.model_file.export_joint_model`).
    When the two cannot share (:func:`shared_encoder_problem`), the copies stay apart and :meth:`forward` raises
    the reason: the joint stage is built with every training run, and only a joint training needs it to fit.
    """

    def __init__(self, prompter: nn.Module, segmentor: nn.Module) -> None:
        super().__init__()
        self.prompter = copy.deepcopy(prompter)
        self.segmentor = copy.deepcopy(segmentor)
        self.problem = shared_encoder_problem(self.prompter, self.segmentor)
        if self.problem is None:
            self.prompter.backbone = self.segmentor.image_encoder.backbone

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The trainable parameters of ``part``: ``segmentor`` (the shared backbone included) or ``prompter`` (its
        own: FPN, heads)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        segmentor = [p for p in self.segmentor.parameters() if p.requires_grad]
        if part == "segmentor":
            return segmentor
        shared = {id(p) for p in self.segmentor.parameters()}
        return [p for p in self.prompter.parameters() if p.requires_grad and id(p) not in shared]

    def param_groups(self, prompter: Mapping[str, float], segmentor: Mapping[str, float]) -> list[dict]:
        """Optimiser parameter groups: each part's :meth:`part_parameters` with its settings (``lr``,
        ``weight_decay``: the stage's hyperparameters)."""
        return [{"params": self.part_parameters(name), **dict(settings)}
                for name, settings in zip(PARTS, (prompter, segmentor))]

    def forward(self, images: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                prompt_valid: torch.Tensor | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Both networks on a batch, the shared backbone run once.

        Args:
            images: (B, 3, S, S) float RGB in [0, 255], S = the segmentor's ``image_size`` (training crops).
            point_coords, point_labels, prompt_valid: the segmentor's prompts, as
                :meth:`scripts.segmentor.net.Segmentor.forward` ((x, y) px).

        Returns:
            ``{"prompter": Prompter.forward's outputs, "segmentor": Segmentor.forward's outputs}``.
        """
        if self.problem is not None:
            raise ValueError(self.problem)
        x = self.segmentor.preprocess(images)
        if self.prompter.preprocess(images).shape != x.shape:
            raise ValueError(f"joint training takes images of the segmentor's image_size "
                             f"{self.segmentor.image_size} px (patch_size), got {tuple(images.shape[-2:])}")
        features = self.segmentor.image_encoder.backbone(x)
        embeddings = self.segmentor.image_encoder(x, features=features)
        return {"prompter": self.prompter(images, features=features),
                "segmentor": self.segmentor.decode_batch(embeddings, point_coords, point_labels, prompt_valid)}


class JointBatch:
    """``prepare_batch`` of the joint stage: inputs = image; targets = ``{"prompter": ..., "segmentor": ...}`` of
    :class:`PrompterBatch` and :class:`SegmentorBatch`; args = the segmentor's prompts."""

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, dict, tuple, dict]:
        image, prompter_targets = PrompterBatch()(batchdata, device, non_blocking)
        _, segmentor_targets, prompts, _ = SegmentorBatch()(batchdata, device, non_blocking)
        return image, {"prompter": prompter_targets, "segmentor": segmentor_targets}, prompts, {}


class JointObjective(LossWithTerms):
    """``prompter_weight`` x the prompter's loss + ``segmentor_weight`` x the segmentor's, from their objectives
    (:class:`scripts.training.engine.PrompterObjective`, :class:`scripts.training.engine.SegmentorObjective`).

    Terms: ``loss`` (the weighted sum), ``prompter`` and ``segmentor`` (each part's total, unweighted), and each
    part's own terms as ``prompter_<term>`` / ``segmentor_<term>`` (``prompter_cls``, ``segmentor_dice``, ...).
    """

    def __init__(self, prompter: LossWithTerms, segmentor: LossWithTerms, prompter_weight: float = 1.0,
                 segmentor_weight: float = 1.0) -> None:
        super().__init__(loss=self._weighted)
        self.parts = {"prompter": prompter, "segmentor": segmentor}
        self.weights = {"prompter": float(prompter_weight), "segmentor": float(segmentor_weight)}

    def _weighted(self, pred: dict, targets: dict) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, objective in self.parts.items():
            part = objective.terms(pred[name], targets[name])
            total = total + self.weights[name] * part["loss"]
            terms.update({name if key == "loss" else f"{name}_{key.removeprefix('loss_')}": value
                          for key, value in part.items()})
        return {"loss": total, **terms}


class JointEvalStep:
    """Evaluator iteration of the joint stage: the automatic pipeline (prompter, then segmentor:
    :class:`scripts.pipeline.promptnucseg.PromptNucSeg`) on each validation image, as inference runs it.

    Output: a list of per-image dicts ``{pred_inst, pred_type, inst, type, name}`` ((H, W) int32 maps), as
    :func:`scripts.evaluation.handlers.instance_output_transform` reads them. Classes come from the network that
    classifies (the segmentor when it has a [cls] head).
    """

    def __init__(self, options: PipelineOptions | None = None) -> None:
        self.options = options or PipelineOptions()

    def __call__(self, engine: Engine, batchdata: dict) -> list[dict]:
        network = engine.network
        classifier = "segmentor" if network.segmentor.num_classes else "prompter"
        pipeline = PromptNucSeg(network.prompter, network.segmentor, self.options, classifier=classifier).eval()
        images = torch.as_tensor(batchdata["image"]).float().to(engine.state.device)
        outputs = [pipeline(image) for image in images]
        engine.state.output = [
            {"pred_inst": out["inst_map"].numpy(), "pred_type": out["type_map"].numpy(), "inst": inst[0],
             "type": kind[0], "name": name}
            for out, inst, kind, name in zip(outputs, torch.as_tensor(batchdata["inst"]).cpu().numpy(),
                                             torch.as_tensor(batchdata["type"]).cpu().numpy(), batchdata["name"])
        ]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
