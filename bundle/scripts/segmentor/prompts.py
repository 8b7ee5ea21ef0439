"""Mask2Prompt: point prompts (positive + K nearest negatives) from an instance map, for training and oracle tests.

Paper §3.2 / §3.4: per image, Z nuclei are chosen at random; each gets a positive point drawn uniformly inside it.
Every nucleus of the image gets one random interior point, and the K negatives of a chosen nucleus are the points
of its K nearest other nuclei (nearest by distance between those points, as at inference time, where the K
nearest predicted prompts are the negatives).

Coordinates: instance maps are indexed (row, col); every point here is (x, y) = (col, row) in pixels.
Labels: 1 positive, 0 negative, -1 padding (SAM's "not a point").
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy.spatial import cKDTree

from scripts.data.points import instance_points

__all__ = ["knn_negative_prompts", "interior_points", "oracle_prompts", "random_interior_points", "SampleNucleusPromptsd"]


def knn_negative_prompts(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point as a positive prompt with its k nearest other points as negatives.

    Args:
        points: (N, 2) float, (x, y) px.
        k: number of negatives (>= 0).

    Returns:
        coords (N, 1+k, 2) float32 (x, y) px: [point, 1st nearest other, ..., k-th nearest other];
        labels (N, 1+k) int64: 1, then 0 for each negative, -1 (coords 0) where fewer than k others exist.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = len(points)
    coords = np.zeros((n, 1 + k, 2), np.float32)
    labels = np.full((n, 1 + k), -1, np.int64)
    if n == 0:
        return coords, labels
    coords[:, 0] = points
    labels[:, 0] = 1
    if k == 0:
        return coords, labels
    # k+1 neighbours include the point itself (or, with duplicate points, a twin at distance 0): drop self.
    _, idx = cKDTree(points).query(points, k=k + 1)
    idx = idx.reshape(n, k + 1)
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # self (at most one per row) moves to the end
    idx = np.take_along_axis(idx, order, axis=1)[:, :k]
    found = idx < n  # cKDTree marks missing neighbours with index n
    coords[:, 1:][found] = points[idx[found]]
    labels[:, 1:][found] = 0
    return coords, labels


def _as_label_map(inst_map: np.ndarray) -> np.ndarray:
    """(H, W) int64 instance map; float maps (e.g. after MONAI transforms) must hold whole numbers."""
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise ValueError(f"instance map must be (H, W), got shape {inst_map.shape}")
    if not np.issubdtype(inst_map.dtype, np.integer):
        rounded = np.rint(inst_map)
        if not np.array_equal(rounded, inst_map):
            raise ValueError("instance map holds non-integer ids (interpolated with a non-nearest mode?)")
        inst_map = rounded
    return inst_map.astype(np.int64, copy=False)


def _instance_pixels(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Foreground pixel flat indices grouped by instance: (sorted_flat_idx, ids, starts, counts)."""
    flat = inst_map.ravel()
    fg = np.flatnonzero(flat)
    order = np.argsort(flat[fg], kind="stable")
    pix = fg[order]
    ids, starts, counts = np.unique(flat[pix], return_index=True, return_counts=True)
    return pix, ids, starts, counts


def random_interior_points(inst_map: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """One pixel drawn uniformly inside every instance.

    Args:
        inst_map: (H, W) int, 0 = background.
        rng: the random state.

    Returns:
        points (N, 2) float32 (x, y) px (integer pixel positions), ids (N,) sorted instance ids.
    """
    inst_map = _as_label_map(inst_map)
    pix, ids, starts, counts = _instance_pixels(inst_map)
    pick = pix[starts + np.floor(rng.random_sample(len(ids)) * counts).astype(np.int64)]
    rows, cols = np.unravel_index(pick, inst_map.shape)
    return np.stack([cols, rows], axis=1).astype(np.float32), ids


def interior_points(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth point of every instance, as the prompter is trained on
    (:func:`scripts.data.points.instance_points`: the centroid when it lies inside, else the deepest interior pixel).

    Returns:
        points (N, 2) float32 (x, y) px, ids (N,) sorted instance ids.
    """
    points, _, ids = instance_points(_as_label_map(inst_map))
    return points, ids


def oracle_prompts(inst_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth prompts (paper Table 7 "oracle"): :func:`interior_points` with their k nearest as negatives.

    Returns:
        coords (N, 1+k, 2) float32 (x, y) px, labels (N, 1+k) int64, ids (N,) instance ids.
    """
    points, ids = interior_points(inst_map)
    coords, labels = knn_negative_prompts(points, k)
    return coords, labels, ids


class SampleNucleusPromptsd(Randomizable, MapTransform):
    """Sample Z training prompts (one positive + K nearest negatives) and their target masks from an instance map.

    Outputs fixed shapes so default collation works (prefix ``out_prefix``, default ``prompt_``):

    - ``prompt_coords`` (Z, 1+K, 2) float32, (x, y) px;
    - ``prompt_labels`` (Z, 1+K) int64: 1 positive, 0 negative, -1 padding (fewer than K other nuclei);
    - ``prompt_masks`` (Z, H, W) bool: the chosen nucleus;
    - ``prompt_valid`` (Z,) bool;
    - ``prompt_ids`` (Z,) int64: the chosen instance id.

    With fewer than Z nuclei, all are used (in random order) and the remaining rows are padding: valid False,
    labels -1, coords 0, empty mask, id 0. An image without nuclei gives Z padding rows.

    Args:
        inst_key: the instance-map key (``(1, H, W)`` or ``(H, W)``, 0 = background; float maps must hold whole
            numbers).
        num_prompts: Z, nuclei per image (paper: 20 PanNuke, 25 Kumar/CPM-17).
        num_neg: K, negatives per prompt (paper's best: 1).
        out_prefix: prefix of the output keys.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        inst_key: KeysCollection = "inst",
        num_prompts: int = 20,
        num_neg: int = 1,
        out_prefix: str = "prompt_",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, inst_key, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SampleNucleusPromptsd takes one instance-map key, got {self.keys}")
        if num_prompts < 1 or num_neg < 0:
            raise ValueError(f"num_prompts must be >= 1 and num_neg >= 0, got {num_prompts}, {num_neg}")
        self.num_prompts = int(num_prompts)
        self.num_neg = int(num_neg)
        self.out_prefix = out_prefix

    def randomize(self, inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw every nucleus's point and the chosen nuclei: (points (N, 2) x,y, ids (N,), chosen (min(Z, N),))."""
        points, ids = random_interior_points(inst_map, self.R)
        chosen = self.R.permutation(len(ids))[: self.num_prompts]
        return points, ids, chosen

    def sample(self, inst_map: np.ndarray) -> dict[str, torch.Tensor]:
        """The prompt arrays for one (H, W) instance map (see the class docstring)."""
        inst_map = _as_label_map(inst_map)
        Z, K = self.num_prompts, self.num_neg
        H, W = inst_map.shape
        points, ids, chosen = self.randomize(inst_map)
        coords = np.zeros((Z, 1 + K, 2), np.float32)
        labels = np.full((Z, 1 + K), -1, np.int64)
        chosen_ids = np.zeros(Z, np.int64)
        valid = np.zeros(Z, bool)
        n = len(chosen)
        if n:
            all_coords, all_labels = knn_negative_prompts(points, K)
            coords[:n], labels[:n] = all_coords[chosen], all_labels[chosen]
            chosen_ids[:n] = ids[chosen]
            valid[:n] = True
        masks = torch.from_numpy(inst_map)[None] == torch.from_numpy(chosen_ids)[:, None, None]
        masks &= torch.from_numpy(valid)[:, None, None]
        p = self.out_prefix
        return {
            f"{p}coords": torch.from_numpy(coords),
            f"{p}labels": torch.from_numpy(labels),
            f"{p}masks": masks.reshape(Z, H, W),
            f"{p}valid": torch.from_numpy(valid),
            f"{p}ids": torch.from_numpy(chosen_ids),
        }

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            inst = d[key]
            inst = inst.detach().cpu().numpy() if isinstance(inst, torch.Tensor) else np.asarray(inst)
            if inst.ndim == 3 and inst.shape[0] == 1:
                inst = inst[0]
            if inst.ndim != 2:
                raise ValueError(f"{key!r} must be an instance map (1, H, W) or (H, W), got shape {inst.shape}")
            d.update(self.sample(inst))
        return d
