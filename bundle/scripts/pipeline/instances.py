"""Turn one mask per prompt into an instance map: overlaps go to the higher predicted IoU, tiny fragments dropped."""

from __future__ import annotations

import numpy as np
import torch


def masks_to_instances(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    min_area: int = 0,
    mask_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint prompt masks into one instance map, the best score winning every contested pixel.

    Args:
        mask_logits: (N, H, W) mask logits, one per prompt, at image resolution.
        scores: (N,) ranking score of each mask (the predicted IoU): higher wins overlaps.
        min_area: instances with fewer pixels left after overlap resolution are dropped (px).
        mask_threshold: logit threshold of a mask pixel (0 = probability 0.5).

    Returns:
        ``inst_map`` (H, W) int32 with 0 = background and ``prompt_of_id`` (M,) int64: instance id ``i + 1``
        comes from prompt ``prompt_of_id[i]`` (ids are contiguous 1..M; dropped prompts have no id).
    """
    n, height, width = mask_logits.shape
    if n == 0:
        return np.zeros((height, width), np.int32), np.zeros(0, np.int64)
    foreground = mask_logits > mask_threshold  # (N, H, W)
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(scores.detach().float().cpu(), stable=True)] = torch.arange(n)
    ranked = torch.where(foreground.cpu(), rank.view(n, 1, 1) + 1, torch.zeros((), dtype=torch.int64))
    top_rank, owner = ranked.max(dim=0)  # (H, W): the best-ranked mask covering each pixel
    owner = torch.where(top_rank > 0, owner + 1, torch.zeros_like(owner)).numpy()  # prompt index + 1
    areas = np.bincount(owner.ravel(), minlength=n + 1)[1:]
    kept = np.flatnonzero((areas > 0) & (areas >= max(min_area, 1)))
    relabel = np.zeros(n + 1, np.int32)
    relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
    return relabel[owner], kept.astype(np.int64)
