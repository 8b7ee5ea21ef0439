"""The segmentor as nucleus classifier (paper §4.3, Table 8): a [cls] token in SAM's mask decoder.

The paper's variant: the prompter is trained class-agnostic, and the segmentor classifies each prompted nucleus.
A learnable [cls] token joins the mask decoder's output tokens ([IoU], [mask] x 4) and is updated with them by the
two-way transformer; an MLP head turns it into C + 1 class logits (the last = background, as the prompter's). The
classification is supervised by a multi-class focal loss added to Eq. 2 (:class:`scripts.segmentor.loss.SegmentorLoss`,
``class_weight``). Which network classifies is the training option ``classifier`` (``prompter``, the paper's
choice and the default, or ``segmentor``); a model file records it (:mod:`scripts.pipeline.model_file`).

Classes: type ids 1..C are class indices 0..C-1 (as :mod:`scripts.data.points`); -1 = unknown (an untyped nucleus
in typed data, or a padding prompt), ignored by the loss.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.mask_decoder import MLP

from scripts.data.points import instance_points

__all__ = ["CLASSIFIERS", "CLASS_HEAD_KEYS", "ClassifyingMaskDecoder", "PromptClassesd", "check_classifier",
           "classes_from_logits", "part_class_names"]

CLASSIFIERS = ("prompter", "segmentor")
CLASS_HEAD_KEYS = ("mask_decoder.cls_token.", "mask_decoder.cls_head.")
"""State-dict prefixes of the [cls] token and head: absent from SAM's official checkpoints (they start fresh)."""


def check_classifier(classifier: str) -> str:
    """``classifier`` when it is one of :data:`CLASSIFIERS`; else a ValueError naming the option."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    return classifier


def part_class_names(part: str, classifier: str, class_names: Mapping[int, str] | None) -> dict[int, str] | None:
    """The classes ``part`` (``prompter`` or ``segmentor``) is trained to tell apart: the dataset's ``class_names``
    when ``part`` is the ``classifier``, else None (class-agnostic: the prompter finds nuclei, the segmentor has no
    [cls] token)."""
    if part not in CLASSIFIERS:
        raise ValueError(f"part must be one of {CLASSIFIERS}, got {part!r}")
    return dict(class_names) if class_names and check_classifier(classifier) == part else None


class ClassifyingMaskDecoder(MaskDecoder):
    """SAM's ``MaskDecoder`` with one more output token, [cls], and an MLP head giving C + 1 class logits.

    Args:
        num_classes: C (>= 1); the head predicts C + 1 logits, the last = background.
        cls_head_depth, cls_head_hidden_dim: the head's layers and width (those of SAM's IoU head).
        **kwargs: ``MaskDecoder``'s arguments (``transformer_dim``, ``transformer``, ...).

    SAM's parameters keep their names (official checkpoints load key for key); the new ones are ``cls_token`` and
    ``cls_head`` (:data:`CLASS_HEAD_KEYS`).
    """

    def __init__(self, *, num_classes: int, cls_head_depth: int = 3, cls_head_hidden_dim: int = 256,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_token = torch.nn.Embedding(1, self.transformer_dim)
        self.cls_head = MLP(self.transformer_dim, cls_head_hidden_dim, self.num_classes + 1, cls_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``MaskDecoder.forward``, plus the class logits.

        Returns:
            masks (Z, 1 or 3, h', w'), iou_pred (Z, 1 or 3), class_logits (Z, C + 1).
        """
        masks, iou_pred, class_logits = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                           dense_prompt_embeddings)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice], class_logits

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's ``predict_masks`` with the [cls] token after the [IoU] and [mask] tokens.

        Args:
            image_embeddings: (1, C, h, w); image_pe: (1, C, h, w); sparse_prompt_embeddings: (Z, P, C);
            dense_prompt_embeddings: (Z, C, h, w).

        Returns:
            masks (Z, 4, 4h, 4w), iou_pred (Z, 4), class_logits (Z, C + 1).
        """
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.cls_token.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0) + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
        cls_token_out = hs[:, 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out), self.cls_head(cls_token_out)


def classes_from_logits(class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids and scores of nuclei from (N, C + 1) logits (last = background): the most probable foreground
    class, as an id 1..C, and its softmax probability over all C + 1 (the prompter's rule,
    :func:`scripts.prompter.decode.decode_prompts`: a prompted nucleus is never dropped as background here)."""
    scores, index = class_logits.float().softmax(-1)[:, :-1].max(-1)
    return index + 1, scores


class PromptClassesd(MapTransform):
    """The class of each training prompt of :class:`scripts.segmentor.prompts.SampleNucleusPromptsd`.

    A nucleus's class is the majority type of its pixels (:func:`scripts.data.points.instance_points`, the rule the
    prompter is trained with). Adds ``classes_key`` (Z,) int64: class index 0..C-1 of each prompt's nucleus,
    ``untyped_class`` for a nucleus without a typed pixel, -1 for padding rows (id 0); 0 for every nucleus when
    the data has no type map.

    Args:
        keys: (instance key, type key); the maps are (1, H, W) or (H, W).
        ids_key: the prompts' instance ids (``prompt_ids``).
        classes_key: the output key.
        untyped_class: class index of a nucleus none of whose pixels is typed (-1: unknown, ignored by the loss).
    """

    def __init__(self, keys: KeysCollection = ("inst", "type"), ids_key: str = "prompt_ids",
                 classes_key: str = "prompt_classes", untyped_class: int = -1) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (inst_key, type_key), got {self.keys}")
        self.ids_key = ids_key
        self.classes_key = classes_key
        self.untyped_class = int(untyped_class)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        inst_key, type_key = self.keys
        for key in (inst_key, self.ids_key):
            if key not in d:
                raise KeyError(f"PromptClassesd: {key!r} not in the data (keys {list(d)}); run it after "
                               f"SampleNucleusPromptsd")
        _, classes, ids = instance_points(d[inst_key], d.get(type_key), self.untyped_class)
        wanted = torch.as_tensor(d[self.ids_key]).cpu().numpy().astype(np.int64)
        missing = np.setdiff1d(wanted[wanted > 0], ids)
        if missing.size:
            raise ValueError(f"PromptClassesd: prompt ids {missing.tolist()} are not in {inst_key!r}")
        lookup = np.full(int(max(ids.max(initial=0), wanted.max(initial=0))) + 1, -1, np.int64)
        lookup[ids] = classes
        d[self.classes_key] = torch.from_numpy(lookup[wanted])
        return d
