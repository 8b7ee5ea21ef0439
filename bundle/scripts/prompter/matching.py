"""One-to-one assignment of predicted points to ground-truth nuclei (paper Eq. 3).

The edge weight between refined anchor i and nucleus j is ``w_ij = q_i(c_j) - alpha * ||â_i - b_j||_2``; the
maximum-weight matching is the minimum-cost assignment of ``cost = -w`` (scipy ``linear_sum_assignment``).
Points are (x, y) px; classes are indices 0..C-1 (C = background column of the probabilities).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def match_cost(pred_points: torch.Tensor, pred_probs: torch.Tensor, gt_points: torch.Tensor, gt_classes: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Cost matrix (A, N): ``alpha * ||pred_points[i] - gt_points[j]||_2 - pred_probs[i, gt_classes[j]]``.

    Args:
        pred_points: (A, 2) refined points (x, y) px.
        pred_probs: (A, C + 1) class probabilities (softmax), last column = background.
        gt_points: (N, 2) nucleus points (x, y) px.
        gt_classes: (N,) class indices in 0..C-1, or -1 for a nucleus of unknown class (untyped data mixed
            with typed data), whose term is the foreground probability 1 - p(background).
        alpha: weight of the distance term (per px).
    """
    distance = torch.cdist(pred_points.double(), gt_points.double())
    probs = pred_probs.double()
    gt_classes = gt_classes.long().to(probs.device)
    class_prob = probs[:, gt_classes.clamp(min=0)]
    foreground_prob = (1.0 - probs[:, -1:]).expand_as(class_prob)  # for nuclei of unknown class (-1)
    return alpha * distance - torch.where(gt_classes[None] < 0, foreground_prob, class_prob)


def hungarian_match(
    pred_points: torch.Tensor, pred_probs: torch.Tensor, gt_points: torch.Tensor, gt_classes: torch.Tensor, alpha: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-weight bipartite matching of anchors to nuclei (Eq. 3).

    Args:
        pred_points: (A, 2) refined points (x, y) px.
        pred_probs: (A, C + 1) class probabilities, last column = background.
        gt_points: (N, 2) nucleus points (x, y) px.
        gt_classes: (N,) class indices in 0..C-1 (-1: unknown class, see :func:`match_cost`).
        alpha: weight of the distance term.

    Returns:
        ``(anchor_idx, gt_idx)``, two int64 tensors of length min(A, N) on ``pred_points.device``, sorted by
        anchor index; anchor ``anchor_idx[k]`` is matched to nucleus ``gt_idx[k]``. N = 0 gives two empty
        tensors. When N > A every anchor is matched and the N - A nuclei left out are those the optimal
        assignment leaves (the total weight over the A pairs is maximal); they get no anchor and so no loss.
    """
    device = pred_points.device
    if gt_points.shape[0] == 0 or pred_points.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    if gt_classes.numel() and (int(gt_classes.min()) < -1 or int(gt_classes.max()) >= pred_probs.shape[1] - 1):
        raise ValueError(
            f"gt_classes must lie in 0..{pred_probs.shape[1] - 2} (or -1: unknown class), got {gt_classes.min()}..{gt_classes.max()}"
        )
    cost = match_cost(pred_points, pred_probs, gt_points, gt_classes, alpha).detach().cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("matching cost has non-finite entries (NaN/inf in pred_points or pred_probs)")
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


class AnchorMatcher:
    """Batched :func:`hungarian_match` on a prompter output dict, without gradients.

    Args:
        alpha: weight of the distance term in Eq. 3 (0.1 in the paper).

    Call with ``outputs`` (``pred_points`` (B, A, 2), ``pred_logits`` (B, A, C + 1)) and per-image lists
    ``gt_points`` [(N_b, 2) (x, y) px] and ``gt_classes`` [(N_b,) in 0..C-1]; returns B pairs
    ``(anchor_idx, gt_idx)``.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha

    @torch.no_grad()
    def __call__(
        self, outputs: dict[str, torch.Tensor], gt_points: list[torch.Tensor], gt_classes: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pred_points, pred_logits = outputs["pred_points"], outputs["pred_logits"]
        if not len(gt_points) == len(gt_classes) == pred_points.shape[0]:
            raise ValueError(
                f"batch of {pred_points.shape[0]} predictions but {len(gt_points)} gt_points and {len(gt_classes)} gt_classes"
            )
        probs = pred_logits.float().softmax(-1)
        return [
            hungarian_match(pred_points[b], probs[b], gt_points[b].to(pred_points), gt_classes[b], self.alpha)
            for b in range(pred_points.shape[0])
        ]
