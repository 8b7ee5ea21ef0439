"""Turn prompter outputs into point prompts: classify, clip, mask-filter and suppress duplicates.

Points are (x, y) px (integer = pixel centre); returned classes are type ids 1..C (class index + 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from scripts.parse import as_bool
from scripts.prompter.net import nearest_pixels


def point_nms(points: torch.Tensor, scores: torch.Tensor, radius: float) -> torch.Tensor:
    """Greedy point non-maximum suppression.

    Visits points by decreasing score; each kept point suppresses every lower-scored point closer than
    ``radius`` px (strictly). Class-agnostic.

    Args:
        points: (K, 2) (x, y) px.
        scores: (K,).
        radius: suppression radius in px.

    Returns:
        int64 indices of the kept points, by decreasing score.
    """
    if points.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    order = torch.argsort(scores, descending=True, stable=True)
    close = (torch.cdist(points[order].double(), points[order].double()) < radius).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):  # loops over candidate points, not pixels
        if not suppressed[i]:
            keep.append(i)
            suppressed |= close[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def sample_mask_probability(aux_logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """sigmoid(aux) at the pixel nearest each point: aux_logits (1, H, W) or (H, W), points (K, 2) (x, y) px
    inside the image -> (K,)."""
    aux = aux_logits.reshape(aux_logits.shape[-2:])
    cols, rows = nearest_pixels(points, tuple(aux.shape)).unbind(1)
    return aux[rows, cols].sigmoid()


@torch.no_grad()
def decode_prompts(
    outputs: dict[str, torch.Tensor],
    image_size: tuple[int, int],
    score_threshold: float | None = None,
    foreground_threshold: float | None = None,
    mask_filter: bool = True,
    mask_threshold: float = 0.5,
    nms_radius: float | None = 12,
    region_logits_at: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Point prompts per image from a :class:`scripts.prompter.net.Prompter` output dict.

    Per anchor: softmax over the C + 1 logits; the anchor is a nucleus when the argmax is not background
    (index C; the official code's rule) or, with ``foreground_threshold`` set, when the summed probability of the
    C nucleus classes is at least that (nucleus vs background first, then the type: with several classes the
    nucleus mass is shared among them and the argmax rule misses nuclei of uncertain type). Its class is the most
    probable nucleus class and its score that class's probability. Then, in order: optional
    ``score >= score_threshold``; points clipped to the image ([0, W - 1] x [0, H - 1]); mask-aided filtering
    keeps points where sigmoid(aux_logits) at the nearest pixel > ``mask_threshold`` (paper §3.3; off with
    ``mask_filter=False``); greedy point NMS within ``nms_radius`` px (off with None or 0).

    Args:
        outputs: ``pred_points`` (B, A, 2) (x, y) px, ``pred_logits`` (B, A, C + 1), ``aux_logits`` (B, 1, H, W)
            (or ``aux_features``, P2, with ``region_logits_at``).
        image_size: (H, W) of the input image in px.
        region_logits_at: :meth:`~scripts.prompter.net.Prompter.region_logits_at` (or a wrapper) to evaluate the
            nuclear-region head at the candidate points only, from ``aux_features``, instead of a whole map.

    Returns:
        B dicts ``{"points": (K, 2) float (x, y) px, "classes": (K,) int64 in 1..C, "scores": (K,) float}``,
        sorted by decreasing score.
    """
    height, width = image_size
    pred_points, logits = outputs["pred_points"], outputs["pred_logits"]
    aux = outputs.get("aux_logits")
    mask_filter = as_bool(mask_filter, "mask_filter")
    at_points = aux is None and region_logits_at is not None and "aux_features" in outputs
    if mask_filter and not at_points:
        if aux is None:
            raise KeyError("decode_prompts: mask_filter=True needs outputs['aux_logits'] (or 'aux_features' and "
                           "region_logits_at)")
        if tuple(aux.shape[-2:]) != (height, width):
            raise ValueError(f"aux_logits size {tuple(aux.shape[-2:])} does not match image_size {(height, width)}")
    probs = logits.float().softmax(-1)
    background = probs.shape[-1] - 1
    upper = torch.tensor([width - 1, height - 1], dtype=pred_points.dtype, device=pred_points.device)

    results = []
    for b in range(pred_points.shape[0]):
        scores, classes = probs[b, :, :background].max(-1)
        if foreground_threshold is None:
            keep = probs[b].argmax(-1) != background
        else:
            keep = 1.0 - probs[b, :, background] >= foreground_threshold
        if score_threshold is not None:
            keep &= scores >= score_threshold
        points = torch.minimum(pred_points[b][keep].clamp(min=0), upper)
        scores, classes = scores[keep], classes[keep]
        if mask_filter:
            if at_points:
                region = region_logits_at(outputs["aux_features"][b : b + 1], points, image_size).float().sigmoid()
            else:
                region = sample_mask_probability(aux[b], points)
            inside = region > mask_threshold
            points, scores, classes = points[inside], scores[inside], classes[inside]
        if nms_radius:
            order = point_nms(points, scores, nms_radius)
        else:
            order = torch.argsort(scores, descending=True, stable=True)
        results.append({"points": points[order], "classes": classes[order] + 1, "scores": scores[order]})
    return results
