"""Segmentor loss, paper Eq. 2: omega * focal + dice on the predicted mask + MSE(predicted IoU, actual IoU).

Defaults are the paper's (omega 20, focal alpha 0.25, gamma 2, dice 1, IoU 1). They assume SAM's pretrained
decoder. Training from scratch, a nucleus covers ~0.3 % of a 256 px tile and the tile-averaged,
positive-down-weighted focal term makes "predict nothing" the easy optimum (measured: a small SAM trained from
scratch on CoNSeP with the paper's loss collapses to empty masks within ~20 steps). The rebalancing options:

- ``mask_loss="bce"`` with ``bce_pos_weight`` (e.g. 10);
- ``mask_reduction="balanced"``: per nucleus, the mean over its foreground pixels and the mean over background
  pixels count half each (instead of the mean over all pixels);
- ``crop_to_box=True``: the pixel term is reduced over a window around each target nucleus (its box dilated by
  ``box_margin`` px, clipped to the image) instead of the whole tile, plus ``outside_weight`` x the mean over the
  pixels outside the window (a window alone leaves far false positives free: measured, a tiny SAM then paints
  the rest of the tile).

The dice term (already normalised by the foreground) and the actual IoU always use the whole mask, so false
positives far from the nucleus are still penalised when the pixel term is cropped. Padding prompts
(``valid`` False) are ignored; every term is averaged over the valid prompts of the batch.

A segmentor that classifies (paper Table 8, :mod:`scripts.segmentor.classifier`) adds ``class_weight`` (paper 1) x a
multi-class (softmax) focal loss of its [cls] logits, averaged over the valid prompts of known class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from scripts.parse import as_bool

__all__ = ["SegmentorLoss", "mask_boxes", "box_windows", "mask_iou"]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of (N, H, W) masks as (N, 4) int64 (x0, y0, x1, y1), inclusive px; empty masks -> whole image."""
    n, h, w = masks.shape
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1)
    empty = ~rows.any(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[empty] = torch.tensor([0, 0, w - 1, h - 1], device=m.device)
    return boxes


def box_windows(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """(N, H, W) bool windows: each mask's box dilated by ``margin`` px, clipped to the image."""
    n, h, w = masks.shape
    b = mask_boxes(masks)
    ys = torch.arange(h, device=masks.device)[None, :, None]
    xs = torch.arange(w, device=masks.device)[None, None, :]
    x0, y0, x1, y1 = (b[:, i, None, None] for i in range(4))
    return (ys >= y0 - margin) & (ys <= y1 + margin) & (xs >= x0 - margin) & (xs <= x1 + margin)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (N, H, W) binary masks, (N,); 0 where both are empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def _region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean of (N, H, W) ``values`` over the (N, H, W) 0/1 ``region``, (N,); 0 for an empty region."""
    return (values * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp(min=1)


class SegmentorLoss(nn.Module):
    """omega * pixel loss + w_dice * dice + w_iou * MSE(iou_pred, IoU(logits > 0, target).detach()).

    Args:
        focal_weight: omega, weight of the pixel term (paper 20).
        dice_weight: weight of the dice term (paper 1).
        iou_weight: weight of the IoU-prediction MSE (paper 1).
        mask_loss: ``"focal"`` (paper; sigmoid focal, ``focal_alpha``, ``focal_gamma``) or ``"bce"``
            (``bce_pos_weight`` on foreground pixels).
        mask_reduction: ``"mean"`` (mean over the pixels of each mask, or of its window, then over prompts; paper)
            or ``"balanced"`` (half the foreground mean + half the background mean, per prompt).
        crop_to_box: reduce the pixel term over each target's box dilated by ``box_margin`` px (the window), and
            add ``outside_weight`` x the mean over the pixels outside it (all background), so the few pixels near
            the nucleus are not outvoted by the tile while far false positives still cost.
        dice_smooth: added to the dice numerator and denominator (1, as in SAM / DETR's dice).
        class_weight, class_gamma: weight (paper 1) and focusing parameter of the class term (with ``class_logits``).

    Forward args:
        mask_logits: (B, Z, H, W) or (N, H, W) logits; upsampled bilinearly when smaller than the target.
        iou_pred: (B, Z) or (N,).
        target: same leading shape as the logits, (..., H, W) binary masks.
        valid: optional (B, Z) or (N,) bool; False rows are ignored.
        class_logits: optional (B, Z, C + 1) or (N, C + 1) [cls] logits (last = background).
        classes: their targets, (B, Z) or (N,) class indices 0..C-1; -1 (unknown) is ignored. Required with
            ``class_logits``.

    Returns:
        ``{"loss", "mask", "dice", "iou", "iou_actual"}``: total, the three unweighted terms, and the mean actual
        IoU of the thresholded predictions (detached, for logging); with ``class_logits`` also ``"cls"``, the
        unweighted class term (weight ``class_weight``, paper 1; focal ``class_gamma`` 2).
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        mask_loss: str = "focal",
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        bce_pos_weight: float = 1.0,
        mask_reduction: str = "mean",
        crop_to_box: bool = False,
        box_margin: int = 16,
        outside_weight: float = 1.0,
        dice_smooth: float = 1.0,
        class_weight: float = 1.0,
        class_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if mask_loss not in ("focal", "bce"):
            raise ValueError(f"mask_loss must be 'focal' or 'bce', got {mask_loss!r}")
        if mask_reduction not in ("mean", "balanced"):
            raise ValueError(f"mask_reduction must be 'mean' or 'balanced', got {mask_reduction!r}")
        self.focal_weight, self.dice_weight, self.iou_weight = focal_weight, dice_weight, iou_weight
        self.mask_loss = mask_loss
        self.bce_pos_weight = float(bce_pos_weight)
        self.mask_reduction = mask_reduction
        self.crop_to_box = as_bool(crop_to_box, "crop_to_box")
        self.box_margin = int(box_margin)
        self.outside_weight = float(outside_weight)
        self.focal = FocalLoss(use_softmax=False, gamma=focal_gamma, alpha=focal_alpha, reduction="none")
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=dice_smooth, smooth_dr=dice_smooth)
        self.class_weight = float(class_weight)
        self.class_focal = FocalLoss(use_softmax=True, to_onehot_y=True, gamma=class_gamma, reduction="none")

    def _reduce(self, per_px: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Per-prompt (N,) reduction of the pixel loss over ``region`` ("mean" or "balanced")."""
        if self.mask_reduction == "mean":
            return _region_mean(per_px, region)
        return 0.5 * (_region_mean(per_px, region * target) + _region_mean(per_px, region * (1 - target)))

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Element-wise pixel loss of (N, H, W) logits and float targets, (N, H, W)."""
        if self.mask_loss == "focal":
            return self.focal(logits[:, None], target[:, None])[:, 0]
        pos_weight = torch.tensor(self.bce_pos_weight, device=logits.device, dtype=logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")

    def forward(
        self,
        mask_logits: torch.Tensor,
        iou_pred: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor | None = None,
        class_logits: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        terms = self.mask_terms(mask_logits, iou_pred, target, valid)
        if class_logits is None:
            return terms
        class_term = self.class_term(class_logits, classes, valid)
        return {**terms, "loss": terms["loss"] + self.class_weight * class_term, "cls": class_term.detach()}

    def class_term(self, class_logits: torch.Tensor, classes: torch.Tensor | None,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax focal loss of (..., C + 1) logits against class indices (...,) (-1 ignored), averaged over the
        valid prompts of known class; a zero tied to the graph when there is none."""
        if classes is None:
            raise ValueError("class_logits were given without their classes (the prompts' 'prompt_classes')")
        logits = class_logits.reshape(-1, class_logits.shape[-1])
        classes = classes.reshape(-1).to(logits.device).long()
        if classes.shape[0] != logits.shape[0]:
            raise ValueError(f"class_logits {tuple(class_logits.shape)} and classes {tuple(classes.shape)} disagree")
        if classes.numel() and int(classes.max()) >= logits.shape[-1] - 1:
            raise ValueError(f"classes must lie in 0..{logits.shape[-1] - 2} (or -1: unknown), got {int(classes.max())}")
        known = classes >= 0
        if valid is not None:
            known &= valid.reshape(-1).bool().to(known.device)
        if not known.any():
            return logits.sum() * 0.0
        return self.class_focal(logits[known], classes[known, None]).sum(-1).mean()

    def mask_terms(
        self,
        mask_logits: torch.Tensor,
        iou_pred: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Eq. 2's terms of the masks and their predicted IoU (``forward`` without the class term)."""
        h, w = target.shape[-2:]
        logits = mask_logits.reshape(-1, *mask_logits.shape[-2:])
        iou_pred = iou_pred.reshape(-1)
        target = target.reshape(-1, h, w)
        if logits.shape[0] != target.shape[0] or iou_pred.shape[0] != target.shape[0]:
            raise ValueError(
                f"mask_logits {tuple(mask_logits.shape)}, iou_pred and target {tuple(target.shape)} disagree on prompts"
            )
        if valid is not None:
            keep = valid.reshape(-1).bool()
            logits, iou_pred, target = logits[keep], iou_pred[keep], target[keep]
        if logits.shape[0] == 0:  # nothing to learn from: a zero that still back-propagates
            zero = mask_logits.sum() * 0.0 + iou_pred.sum() * 0.0
            return {"loss": zero, "mask": zero.detach(), "dice": zero.detach(), "iou": zero.detach(),
                    "iou_actual": zero.detach()}
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
        target = target.to(logits.dtype)

        per_px = self.pixel_loss(logits, target)
        if self.crop_to_box:
            window = box_windows(target, self.box_margin).to(logits.dtype)
            outside = _region_mean(per_px, 1 - window)  # background only: the window holds the whole nucleus
            mask_term = self._reduce(per_px, target, window) + self.outside_weight * outside
        else:
            mask_term = self._reduce(per_px, target, torch.ones_like(target))
        mask_term = mask_term.mean()
        dice_term = self.dice(logits[:, None], target[:, None]).mean()

        with torch.no_grad():
            iou_actual = mask_iou(logits > 0, target > 0.5)
        iou_term = F.mse_loss(iou_pred, iou_actual.to(iou_pred.dtype))

        total = self.focal_weight * mask_term + self.dice_weight * dice_term + self.iou_weight * iou_term
        return {
            "loss": total,
            "mask": mask_term.detach(),
            "dice": dice_term.detach(),
            "iou": iou_term.detach(),
            "iou_actual": iou_actual.mean(),
        }
