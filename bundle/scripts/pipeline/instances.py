"""Turn one mask per prompt into an instance map: overlaps go to the higher predicted IoU, each instance one connected
region, tiny instances dropped."""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label as label_regions


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
        min_area: instances with fewer pixels left after overlap resolution (each kept as one connected region,
            :func:`keep_one_region`) are dropped (px).
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
    owner = keep_one_region(torch.where(top_rank > 0, owner + 1, torch.zeros_like(owner)).numpy())  # prompt + 1
    areas = np.bincount(owner.ravel(), minlength=n + 1)[1:]
    kept = np.flatnonzero((areas > 0) & (areas >= max(min_area, 1)))
    relabel = np.zeros(n + 1, np.int32)
    relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
    return relabel[owner], kept.astype(np.int64)


def keep_one_region(inst_map: np.ndarray) -> np.ndarray:
    """Each instance kept as one 4-connected region: its largest piece; every other piece goes to the instance whose
    largest piece it touches most (4-neighbour pixel contacts), or to background when it touches none.

    Overlap resolution can cut a mask into pieces (a neighbour with a higher predicted IoU takes its middle); a
    nucleus is one region, and the GeoJSON polygon, the CSV area and centroid must describe the same pixels.

    Args:
        inst_map: (H, W) int instance map, 0 = background. Returns: the same ids, each one connected (no id is
        lost: an instance's largest piece always stays).
    """
    inst = np.asarray(inst_map)
    pieces = label_regions(inst, background=0, connectivity=1)
    n_pieces = int(pieces.max())
    if n_pieces == 0:
        return inst
    piece_owner = np.zeros(n_pieces + 1, inst.dtype)
    piece_owner[pieces.ravel()] = inst.ravel()
    piece_area = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    order = np.lexsort((-piece_area[1:], piece_owner[1:])) + 1  # by owner, then largest first
    is_main = np.zeros(n_pieces + 1, bool)
    is_main[order[np.r_[True, piece_owner[order[1:]] != piece_owner[order[:-1]]]]] = True
    if is_main[1:].all():
        return inst
    fragment, main = _contacts(pieces, is_main, piece_owner)
    new_owner = np.where(is_main, piece_owner, 0).astype(inst.dtype)
    if fragment.size:
        pairs, counts = np.unique(np.stack([fragment, main], 1), axis=0, return_counts=True)
        best = np.lexsort((-counts, pairs[:, 0]))  # per fragment, the main piece with most contacts first
        first = best[np.r_[True, pairs[best[1:], 0] != pairs[best[:-1], 0]]]
        new_owner[pairs[first, 0]] = piece_owner[pairs[first, 1]]
    return new_owner[pieces]


def _contacts(pieces: np.ndarray, is_main: np.ndarray, piece_owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fragment piece, main piece of another instance) for every pair of 4-neighbour pixels joining them."""
    fragments, mains = [], []
    for a, b in ((pieces[:, :-1], pieces[:, 1:]), (pieces[:-1, :], pieces[1:, :])):
        for x, y in ((a, b), (b, a)):
            touch = (x > 0) & ~is_main[x] & is_main[y] & (y > 0) & (piece_owner[x] != piece_owner[y])
            fragments.append(x[touch])
            mains.append(y[touch])
    return np.concatenate(fragments), np.concatenate(mains)
