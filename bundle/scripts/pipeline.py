"""PromptNucSeg's automatic pipeline (paper Fig. 1b) as one network: prompter → segmentor → instance map.

Images of any size are processed in square tiles of the segmentor's input size with overlap. A nucleus belongs
to the tile whose *core* (the tile minus half the overlap on each inner side) holds its prompt point, and is
decoded in that tile, so it always has at least ``tile_overlap / 2`` px of context around its point: nuclei cut
by a core border are segmented whole. Overlapping masks are resolved by predicted IoU (higher wins) over the
whole image, independent of tile order.

Coordinates: points are (x, y) = (col, row) in pixels of the input image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scripts.prompt_sampling import knn_negative_prompts
from scripts.prompter_post import decode_prompts, point_nms


@dataclass(frozen=True)
class Tile:
    """A square window of the image and its core, in px: window [y0, y0+size) x [x0, x0+size), core likewise."""

    x0: int
    y0: int
    size: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int

    def core_holds(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which (x, y) points fall in this tile's core (half-open on the right/bottom)."""
        x, y = points[:, 0], points[:, 1]
        return (x >= self.core_x0) & (x < self.core_x1) & (y >= self.core_y0) & (y < self.core_y1)


def tile_grid(height: int, width: int, size: int, overlap: int) -> list[Tile]:
    """Tiles of ``size`` px with ``overlap`` px between neighbours covering an (H, W) image.

    The cores partition the image: every pixel belongs to exactly one core. An image smaller than ``size`` is one
    tile (the caller pads it).
    """
    if not 0 <= overlap < size:
        raise ValueError(f"tile_overlap must be in [0, tile_size), got {overlap} with tile_size {size}")
    xs = _starts(width, size, size - overlap)
    ys = _starts(height, size, size - overlap)
    x_cuts = _core_cuts(xs, size, width)
    y_cuts = _core_cuts(ys, size, height)
    return [
        Tile(x0, y0, size, x_cuts[i], y_cuts[j], x_cuts[i + 1], y_cuts[j + 1])
        for j, y0 in enumerate(ys)
        for i, x0 in enumerate(xs)
    ]


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride)) + [length - size]
    return sorted(set(starts))


def _core_cuts(starts: list[int], size: int, length: int) -> list[int]:
    """Core boundaries: midway through each overlap between consecutive windows, 0 and ``length`` at the ends."""
    cuts = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        cuts.append((b + a + size) // 2)
    cuts.append(length)
    return cuts


class PromptNucSeg(nn.Module):
    """Prompter + segmentor: an RGB image in, instance map, class map and a per-nucleus table out.

    Args:
        prompter: a :class:`scripts.prompter_net.Prompter`.
        segmentor: a :class:`scripts.segmentor_net.Segmentor` (its ``image_size`` is the tile size).
        num_neg: K, nearest other prompts used as negative prompts of each prompt (paper: 1).
        mask_filter: mask-aided prompt filtering (keep prompts where the auxiliary map > 0.5).
        nms_radius: point NMS radius in px.
        score_threshold: optional minimum class score of a prompt.
        min_area: instances with fewer pixels (after overlap resolution) are dropped.
        tile_overlap: overlap between neighbouring tiles in px (context = half of it at least).
        prompter_tile_size: tile size of the prompter in px; None runs it on the whole image at once.
        chunk_size: prompts per mask-decoder call (bounds memory; all prompts of a tile are batched).
    """

    def __init__(
        self,
        prompter: nn.Module,
        segmentor: nn.Module,
        num_neg: int = 1,
        mask_filter: bool = True,
        nms_radius: float = 12,
        score_threshold: float | None = None,
        min_area: int = 10,
        tile_overlap: int = 64,
        prompter_tile_size: int | None = 1024,
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        self.prompter = prompter
        self.segmentor = segmentor
        self.num_neg = num_neg
        self.mask_filter = mask_filter
        self.nms_radius = nms_radius
        self.score_threshold = score_threshold
        self.min_area = min_area
        self.tile_overlap = tile_overlap
        self.prompter_tile_size = prompter_tile_size
        self.chunk_size = chunk_size

    @property
    def tile_size(self) -> int:
        return int(self.segmentor.image_size)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, prompts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Segment every nucleus of one image.

        Args:
            image: (3, H, W) or (1, 3, H, W) float RGB in [0, 255].
            prompts: optional given prompts ``{points (N, 2) (x, y) px, classes (N,), scores (N,)}`` (e.g. the
                ground truth, or a user's clicks); by default the prompter finds them.

        Returns:
            ``inst_map`` (H, W) int32 (0 = background, ids 1..M), ``type_map`` (H, W) int32 (0 = background),
            ``points`` (M, 2) float (x, y) px, ``classes`` (M,) int64, ``scores`` (M,) class scores,
            ``ious`` (M,) predicted IoU; row i describes instance id i + 1.
        """
        image = self._check_image(image)
        if prompts is None:
            prompts = self.find_prompts(image)
        inst_map, prompt_of_id, ious = self.segment(image, prompts["points"])
        classes = prompts["classes"][prompt_of_id].long()
        lut = torch.zeros(len(prompt_of_id) + 1, dtype=torch.int32)
        lut[1:] = classes.to(torch.int32)
        inst = torch.from_numpy(inst_map)
        return {
            "inst_map": inst,
            "type_map": lut[inst.long()],
            "points": prompts["points"][prompt_of_id].float(),
            "classes": classes,
            "scores": prompts["scores"][prompt_of_id].float(),
            "ious": ious,
        }

    @staticmethod
    def _check_image(image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"PromptNucSeg takes one image at a time, got a batch of {image.shape[0]}")
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"image is empty: shape {tuple(image.shape)}")
        return image.float()

    def find_prompts(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point prompts of the whole image: prompter per tile (core points kept), then global point NMS."""
        height, width = image.shape[-2:]
        size = self.prompter_tile_size or max(height, width)
        overlap = min(self.tile_overlap, size // 2) if size < max(height, width) else 0
        found = []
        for tile in tile_grid(height, width, size, overlap):
            crop = image[:, tile.y0 : tile.y0 + size, tile.x0 : tile.x0 + size]
            outputs = self.prompter(crop[None].to(self._device(self.prompter)))
            pred = decode_prompts(outputs, image_size=tuple(crop.shape[-2:]), score_threshold=self.score_threshold,
                                  mask_filter=self.mask_filter, nms_radius=self.nms_radius)[0]
            points = pred["points"].cpu() + torch.tensor([tile.x0, tile.y0], dtype=torch.float32)
            keep = tile.core_holds(points)
            found.append({"points": points[keep], "classes": pred["classes"].cpu()[keep],
                          "scores": pred["scores"].cpu()[keep]})
        prompts = {k: torch.cat([f[k] for f in found]) for k in ("points", "classes", "scores")}
        if self.nms_radius:
            keep = point_nms(prompts["points"], prompts["scores"], self.nms_radius)
            prompts = {k: v[keep] for k, v in prompts.items()}
        return prompts

    def segment(self, image: torch.Tensor, points: torch.Tensor, extra_negatives: torch.Tensor | None = None
                ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Instance map from point prompts: per tile one encoder pass and batched decoding of its core prompts.

        Args:
            image: (3, H, W) float RGB in [0, 255].
            points: (N, 2) (x, y) px prompts; each one's K nearest others are its negative prompts.
            extra_negatives: optional (M, 2) (x, y) px points that may serve as negatives (nearest-K together
                with ``points``) but get no mask themselves (e.g. background clicks, neighbours found by the
                prompter around a user's clicks).

        Returns:
            ``inst_map`` (H, W) int32, ``prompt_of_id`` (M,) prompt index of instance id i + 1, ``ious`` (M,).
        """
        height, width = image.shape[-2:]
        size = self.tile_size
        coords, labels = negative_prompts(points, extra_negatives, self.num_neg)
        best_score = torch.full((height, width), -torch.inf)
        owner = torch.zeros((height, width), dtype=torch.int64)  # prompt index + 1
        iou_pred = torch.zeros(len(points))
        device = self._device(self.segmentor)
        for tile in tile_grid(height, width, size, min(self.tile_overlap, size // 2)):
            mine = torch.nonzero(tile.core_holds(points)).flatten()
            if mine.numel() == 0:
                continue
            crop = image[:, tile.y0 : tile.y0 + size, tile.x0 : tile.x0 + size]
            crop_h, crop_w = crop.shape[-2:]
            tile_coords = coords[mine] - torch.tensor([tile.x0, tile.y0], dtype=torch.float32)
            tile_labels = _outside_as_padding(tile_coords, labels[mine], crop_w, crop_h)
            embedding = self.segmentor.encode(_pad_to(crop, size)[None].to(device))[0]
            for start in range(0, mine.numel(), self.chunk_size):
                part = slice(start, start + self.chunk_size)
                logits, ious = self.segmentor.decode(embedding, tile_coords[part].to(device),
                                                     tile_labels[part].to(device), input_size=(crop_h, crop_w))
                self._paint(logits.cpu(), ious.cpu(), mine[part], tile, best_score, owner)
                iou_pred[mine[part]] = ious.cpu().float()
        return self._relabel(owner.numpy(), iou_pred)

    @staticmethod
    def _paint(logits: torch.Tensor, ious: torch.Tensor, prompt_idx: torch.Tensor, tile: Tile,
               best_score: torch.Tensor, owner: torch.Tensor) -> None:
        """Give each pixel of the masks to the prompt with the highest predicted IoU seen so far (vectorised)."""
        h, w = logits.shape[-2:]
        scores = torch.where(logits > 0, ious.view(-1, 1, 1).float(), torch.tensor(-torch.inf))
        top, arg = scores.max(dim=0)  # (h, w)
        region_score = best_score[tile.y0 : tile.y0 + h, tile.x0 : tile.x0 + w]
        region_owner = owner[tile.y0 : tile.y0 + h, tile.x0 : tile.x0 + w]
        wins = top > region_score
        region_score[wins] = top[wins]
        region_owner[wins] = prompt_idx[arg[wins]] + 1

    def _relabel(self, owner: np.ndarray, iou_pred: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Contiguous ids 1..M, dropping instances under ``min_area`` px."""
        areas = np.bincount(owner.ravel(), minlength=len(iou_pred) + 1)[1:]
        kept = np.flatnonzero(areas >= max(self.min_area, 1))
        relabel = np.zeros(len(iou_pred) + 1, np.int32)
        relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
        prompt_of_id = torch.from_numpy(kept.astype(np.int64))
        return relabel[owner], prompt_of_id, iou_pred[prompt_of_id]

    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        return next(module.parameters()).device


def negative_prompts(points: torch.Tensor, extra: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the N points as a positive prompt with its k nearest among ``points`` ∪ ``extra`` as negatives.

    Returns coords (N, 1+k, 2) (x, y) px and labels (N, 1+k) (1 positive, 0 negative, -1 padding).
    """
    n = len(points)
    pool = points.reshape(-1, 2).float()
    if extra is not None and len(extra):
        pool = torch.cat([pool, extra.reshape(-1, 2).float()])
    coords, labels = knn_negative_prompts(pool.numpy(), k)
    return torch.from_numpy(coords[:n]), torch.from_numpy(labels[:n])


def _pad_to(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a (3, h, w) crop right/bottom to (3, size, size) with white (glass)."""
    h, w = crop.shape[-2:]
    if (h, w) == (size, size):
        return crop
    return torch.nn.functional.pad(crop, (0, size - w, 0, size - h), value=255.0)


def _outside_as_padding(coords: torch.Tensor, labels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Negative prompts outside the tile become padding (-1): the segmentor only sees points in its window."""
    x, y = coords[..., 0], coords[..., 1]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    return torch.where(outside & (labels == 0), torch.full_like(labels, -1), labels)
