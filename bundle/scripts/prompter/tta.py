"""Test-time augmentation of the prompter: its prompts on the 8 flips and quarter-turns of a tile, pooled.

Each view is the tile turned ``k % 4`` quarter-turns (``torch.rot90`` over (H, W)), then mirrored left-right when
``k >= 4``. The prompter runs on every view and its outputs are decoded into prompts as usual
(:func:`scripts.prompter.decode.decode_prompts`); the points are mapped back to the tile and pooled: visiting the
points by decreasing score, a point gathers the nearest point of every other view within ``radius`` px, and the
group is one nucleus when at least ``min_views`` views found it. Its point is the group's mean, its class the one
with the largest summed score in the group, its score the summed score divided by the number of views (a nucleus
found in fewer views scores lower). The official code offers flip/rotation TTA for its Kumar/CPM-17 inference.

Averaging the prompter's per-anchor outputs instead does not work: which anchor answers for a nucleus changes
between views, so the averaged probabilities are split over neighbouring anchors (measured: detection recall
0.60 -> 0.49 on held-out CoNSeP tiles).

Points are (x, y) px, integer = pixel centre.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from scripts.prompter.decode import decode_prompts

VIEWS = tuple(range(8))


def dihedral_view(images: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0-7) of (..., H, W) images: ``k % 4`` quarter-turns, then a left-right mirror if ``k >= 4``."""
    view = torch.rot90(images, k % 4, dims=(-2, -1))
    return view.flip(-1) if k >= 4 else view


def undo_view_points(points: torch.Tensor, k: int, height: int, width: int) -> torch.Tensor:
    """(N, 2) (x, y) px in view ``k`` of an (height, width) image -> (x, y) px in the image itself."""
    turns = k % 4
    x, y = points[:, 0], points[:, 1]
    if k >= 4:
        x = (width if turns % 2 == 0 else height) - 1 - x
    for turn in range(turns, 0, -1):  # from view ``turn`` back to view ``turn - 1`` (at most 3 steps)
        width_before = width if (turn - 1) % 2 == 0 else height
        x, y = width_before - 1 - y, x
    return torch.stack([x, y], dim=-1)


@torch.no_grad()
def prompts_tta(prompter: nn.Module, image: torch.Tensor, views: tuple[int, ...] = VIEWS, radius: float = 6.0,
                min_views: int = 4, **decode_options) -> dict[str, torch.Tensor]:
    """Prompts of one image from the prompter's ``views`` of it, pooled (see the module docstring).

    Args:
        prompter: a :class:`scripts.prompter.net.Prompter`.
        image: (1, 3, H, W) RGB float in [0, 255], on the prompter's device.
        views: view ids 0-7 (:func:`dihedral_view`).
        radius: pooling radius in px.
        min_views: views that must find a nucleus (1 <= min_views <= len(views)).
        decode_options: keyword arguments of :func:`scripts.prompter.decode.decode_prompts` (thresholds, mask
            filter, NMS radius), applied to every view.

    Returns:
        ``{"points": (K, 2) float (x, y) px, "classes": (K,) int64 in 1..C, "scores": (K,) float}``, by decreasing
        score, on the CPU.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"prompts_tta takes one (1, 3, H, W) image, got shape {tuple(image.shape)}")
    if not 1 <= min_views <= len(views):
        raise ValueError(f"min_views must be in 1..{len(views)} (the number of views), got {min_views}")
    height, width = image.shape[-2:]
    points, classes, scores, view_ids = [], [], [], []
    # the views of one shape, (H, W) or (W, H), run as one batch
    for shape_views in (tuple(k for k in views if k % 2 == 0), tuple(k for k in views if k % 2 == 1)):
        if not shape_views:
            continue
        batch = torch.cat([dihedral_view(image, k) for k in shape_views])
        decoded = decode_prompts(prompter(batch), image_size=tuple(batch.shape[-2:]), **decode_options)
        for k, found in zip(shape_views, decoded):
            points.append(undo_view_points(found["points"].float().cpu(), k, height, width))
            classes.append(found["classes"].cpu())
            scores.append(found["scores"].float().cpu())
            view_ids.append(torch.full((len(found["points"]),), k, dtype=torch.long))
    return pool_view_points(torch.cat(points), torch.cat(classes), torch.cat(scores), torch.cat(view_ids),
                            len(views), radius, min_views)


def pool_view_points(points: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, view_ids: torch.Tensor,
                     num_views: int, radius: float, min_views: int) -> dict[str, torch.Tensor]:
    """Pool (N, 2) (x, y) px points found in ``num_views`` views into nuclei (see the module docstring); the
    nuclei by decreasing pooled score."""
    order = np.argsort(-scores.numpy(), kind="stable")
    xy, cls, score, view = points.numpy()[order], classes.numpy()[order], scores.numpy()[order], view_ids.numpy()[order]
    neighbours = cKDTree(xy).query_ball_point(xy, r=radius, return_sorted=True) if len(xy) else []
    used = np.zeros(len(xy), dtype=bool)
    pooled_points, pooled_classes, pooled_scores = [], [], []
    for i in range(len(xy)):  # loops over candidate points, not pixels
        if used[i]:
            continue
        group = _nearest_per_view(i, np.asarray(neighbours[i], dtype=np.int64), xy, view, used)
        used[group] = True
        if len(group) < min_views:
            continue
        class_scores = np.bincount(cls[group], weights=score[group])
        pooled_points.append(xy[group].mean(0))
        pooled_classes.append(int(class_scores.argmax()))
        pooled_scores.append(float(score[group].sum()) / num_views)
    by_score = np.argsort(-np.asarray(pooled_scores, dtype=np.float32), kind="stable")
    return {
        "points": torch.as_tensor(np.asarray(pooled_points, dtype=np.float32).reshape(-1, 2)[by_score]),
        "classes": torch.as_tensor(np.asarray(pooled_classes, dtype=np.int64)[by_score]),
        "scores": torch.as_tensor(np.asarray(pooled_scores, dtype=np.float32)[by_score]),
    }


def _nearest_per_view(seed: int, candidates: np.ndarray, xy: np.ndarray, view: np.ndarray, used: np.ndarray
                      ) -> np.ndarray:
    """``seed`` and, of every other view, its unused candidate nearest to the seed point."""
    candidates = candidates[~used[candidates] & (view[candidates] != view[seed])]
    distance = np.linalg.norm(xy[candidates] - xy[seed], axis=1)
    candidates = candidates[np.lexsort((distance, view[candidates]))]  # by view, nearest first
    first_of_view = np.r_[True, view[candidates][1:] != view[candidates][:-1]] if len(candidates) else np.zeros(0, bool)
    return np.r_[seed, candidates[first_of_view]].astype(np.int64)
