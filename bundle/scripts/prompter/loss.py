"""Prompter training loss (paper Eq. 4-6): L = L_cls + L_reg + L_aux.

- ``L_cls``: cross-entropy over all anchors of the batch; matched anchors target their nucleus's class,
  unmatched anchors the background class (index C) with weight β (``bg_weight``), foreground classes weight 1
  (or ``class_weights``: one weight per foreground class, to up-weight rare classes; not in the paper).
  Normalised as a weighted mean, Σ w_t · CE / Σ w_t over every anchor of the batch (PyTorch's weighted
  ``cross_entropy``), i.e. divided by N + β (M - N) where the paper writes 1/M (a constant factor per image).
  A nucleus of unknown class (class -1: untyped data such as MoNuSeg mixed with typed data such as CoNSeP)
  targets "any foreground class": its anchor's term is -log(1 - p(background)), weight 1.
- ``L_reg``: γ (``reg_weight``) · Σ_matched ||â - b||² / N, squared error summed over x and y, N = number of
  ground-truth points in the batch (nuclei left unmatched when N > A still count in N); 0 when N = 0.
- ``L_aux``: ``aux_weight`` · sigmoid focal loss (γ_focal = 2, no α) between ``aux_logits`` and the binary
  foreground mask, mean over pixels (``monai.losses.FocalLoss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss
from torch import nn

from scripts.prompter.matching import AnchorMatcher


class PrompterLoss(nn.Module):
    """Eq. 4 + 6 of the paper with the auxiliary focal loss.

    Args:
        bg_weight: β, cross-entropy weight of the background class (0.4 PanNuke, 0.2 Kumar, 0.25 CPM-17).
        reg_weight: γ, weight of the point regression term.
        aux_weight: weight of the auxiliary focal loss.
        focal_gamma: focusing exponent of the focal loss.
        focal_alpha: optional α of the α-balanced focal loss (None = unbalanced, as the authors).
        match_alpha: α of the matching cost (Eq. 3), per px.
        class_weights: cross-entropy weight of each foreground class 1..C (None: all 1, the paper).
    """

    def __init__(
        self,
        bg_weight: float = 0.4,
        reg_weight: float = 5e-3,
        aux_weight: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = None,
        match_alpha: float = 0.1,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and min(self.class_weights, default=1.0) <= 0:
            raise ValueError(f"class_weights must be positive, got {class_weights}")
        self.bg_weight = bg_weight
        self.reg_weight = reg_weight
        self.aux_weight = aux_weight
        self.matcher = AnchorMatcher(alpha=match_alpha)
        self.focal = FocalLoss(include_background=True, gamma=focal_gamma, alpha=focal_alpha, use_softmax=False, reduction="mean")

    def classification_targets(self, logits: torch.Tensor, matches: list[tuple[torch.Tensor, torch.Tensor]], gt_classes: list[torch.Tensor]) -> torch.Tensor:
        """(B, A) int64 targets: the matched nucleus's class (-1: unknown class), background (C) elsewhere."""
        background = logits.shape[-1] - 1
        targets = torch.full(logits.shape[:2], background, dtype=torch.long, device=logits.device)
        for b, (anchor_idx, gt_idx) in enumerate(matches):
            targets[b, anchor_idx] = gt_classes[b].to(logits.device).long()[gt_idx]
        return targets

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted mean cross-entropy over all anchors; unknown-class targets (-1) score the foreground mass."""
        num_classes = logits.shape[-1] - 1
        class_weight = torch.ones(num_classes + 1, dtype=logits.dtype, device=logits.device)
        if self.class_weights is not None:
            if len(self.class_weights) != num_classes:
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for {num_classes} classes")
            class_weight[:num_classes] = torch.tensor(self.class_weights, dtype=logits.dtype)
        class_weight[-1] = self.bg_weight
        log_probs = F.log_softmax(logits.flatten(0, 1), dim=-1)
        targets = targets.flatten()
        unknown = targets < 0
        known_nll = -log_probs.gather(1, targets.clamp(min=0)[:, None])[:, 0]
        foreground_nll = -torch.logsumexp(log_probs[:, :num_classes], dim=-1)
        nll = torch.where(unknown, foreground_nll, known_nll)
        weight = torch.where(unknown, torch.ones_like(nll), class_weight[targets.clamp(min=0)])
        return (weight * nll).sum() / weight.sum()

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        gt_points: list[torch.Tensor],
        gt_classes: list[torch.Tensor],
        fg_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            outputs: the :class:`scripts.prompter.net.Prompter` dict (``pred_points`` (B, A, 2) (x, y) px,
                ``pred_logits`` (B, A, C + 1), ``aux_logits`` (B, 1, H, W)).
            gt_points: B tensors (N_b, 2) of nucleus points (x, y) px.
            gt_classes: B tensors (N_b,) of class indices 0..C-1.
            fg_mask: (B, 1, H, W) foreground mask (nonzero = nucleus).

        Returns:
            ``{"loss": total, "loss_cls", "loss_reg", "loss_aux", "num_matched"}`` (scalars; ``loss`` has grad).
        """
        pred_points, logits, aux = outputs["pred_points"], outputs["pred_logits"], outputs["aux_logits"]
        if fg_mask.shape != aux.shape:
            raise ValueError(f"fg_mask shape {tuple(fg_mask.shape)} does not match aux_logits {tuple(aux.shape)}")
        num_classes = logits.shape[-1] - 1
        for b, classes in enumerate(gt_classes):
            if classes.numel() and (int(classes.min()) < -1 or int(classes.max()) >= num_classes):
                raise ValueError(
                    f"gt_classes[{b}] must lie in 0..{num_classes - 1} (or -1: unknown class), got {classes.min()}..{classes.max()}"
                )
        matches = self.matcher(outputs, gt_points, gt_classes)

        targets = self.classification_targets(logits, matches, gt_classes)
        loss_cls = self.classification_loss(logits, targets)

        num_gt = sum(int(p.shape[0]) for p in gt_points)
        matched_pred = torch.cat([pred_points[b, a] for b, (a, _) in enumerate(matches)])
        matched_gt = torch.cat([gt_points[b].to(pred_points)[g] for b, (_, g) in enumerate(matches)])
        loss_reg = self.reg_weight * F.mse_loss(matched_pred, matched_gt, reduction="sum") / max(num_gt, 1)

        loss_aux = self.aux_weight * self.focal(aux, (fg_mask > 0).to(aux.dtype))
        return {
            "loss": loss_cls + loss_reg + loss_aux,
            "loss_cls": loss_cls,
            "loss_reg": loss_reg,
            "loss_aux": loss_aux,
            "num_matched": torch.tensor(float(matched_pred.shape[0]), device=logits.device),
        }
