"""The official code's inference assembly (``--pipeline#assembly official``), beside ours (:mod:`promptnucseg`).

How the authors' public code turns point prompts into an instance map (facts in the project's notes; implemented
from them, not copied):

1. the image is cut into windows of the segmentor's input size (256 px) with ``WINDOW_OVERLAP`` (64 px: stride
   192); an image no larger than one window (a PanNuke tile) is one window;
2. each window is encoded as a whole image, and every prompt whose point lies in it is decoded on that window's
   embedding (a segmentor with a smaller ``decoder_window`` decodes each prompt on the part of the window's
   embedding centred on it);
3. a mask whose bounding box comes within ``EDGE_MARGIN`` (7 px) of an *inner* window edge (one that is not the
   image border) is dropped: a neighbouring window sees that nucleus whole;
4. a prompt decoded in several windows keeps its mask with the highest predicted IoU (our reading of "duplicates
   across windows resolved by IoU");
5. global box NMS (``official_box_nms``: 0.3 for Kumar, 0.5 for CPM-17 and PanNuke), scored by predicted IoU;
6. the surviving masks are painted in ascending predicted IoU, so the best one wins each pixel.

No minimum area, no hole filling, and no single-region rule (an instance may be left in pieces by better masks).

Coordinates: points are (x, y) = (col, row) px; boxes (x0, y0, x1, y1) px of the first and last pixel
(``torchvision.ops.masks_to_boxes``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes, nms

from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.tiling import Tile, tile_grid
from scripts.segmentor.net import decode_at_points, paste_windows


class Pipeline(Protocol):
    """What the official assembly reads of :class:`scripts.pipeline.promptnucseg.PromptNucSeg` (which calls it)."""

    segmentor: nn.Module
    options: PipelineOptions

    @property
    def tile_size(self) -> int: ...

    def autocast(self, module: nn.Module) -> torch.autocast: ...

WINDOW_OVERLAP = 64  # px between neighbouring windows (at most half a window)
EDGE_MARGIN = 7  # px: masks whose box reaches this near an inner window edge are dropped


def official_segment(pipeline: Pipeline, image: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Instance map from point prompts, assembled as the official code does (module docstring).

    Args:
        pipeline: the :class:`PromptNucSeg` whose segmentor and options (``official_box_nms``, ``chunk_size``,
            ``encoder_batch``, ``decoder_tokens``, ``precision``) are used.
        image: (3, H, W) float RGB in [0, 255].
        coords, labels: (N, 1+K, 2) (x, y) px prompts (point 0 positive) and (N, 1+K) labels, as
            :func:`scripts.pipeline.promptnucseg.negative_prompts` makes them.

    Returns:
        ``inst_map`` (H, W) int32 (ids 1..M), ``prompt_of_id`` (M,) int64 ascending, ``ious`` (M,) predicted IoU.
    """
    height, width = image.shape[-2:]
    size = pipeline.tile_size
    canvas = F.pad(image.float(), (0, max(0, size - width), 0, max(0, size - height)), value=255.0)
    jobs = []  # (window, its prompts: those whose positive point lies in it)
    for tile in tile_grid(canvas.shape[-2], canvas.shape[-1], size, min(WINDOW_OVERLAP, size // 2)):
        local = coords[:, 0].float() - torch.tensor([tile.x0, tile.y0], dtype=torch.float32)
        members = torch.nonzero(((local >= 0) & (local < size)).all(1)).flatten()
        if len(members):
            jobs.append((tile, members))
    batch = pipeline.options.encoder_batch
    masks = [m for i in range(0, len(jobs), batch)
             for m in _window_masks(pipeline, canvas, jobs[i : i + batch], coords, labels, (height, width))]
    prompt, score, boxes, pixel_mask, pixel_flat = _concat(masks)
    keep = _best_per_prompt(prompt, score)
    keep = keep[nms(boxes[keep], score[keep], pipeline.options.official_box_nms)]
    return _paint_ascending(prompt, score, keep, pixel_mask, pixel_flat, (height, width))


def _window_masks(pipeline: Pipeline, canvas: torch.Tensor, jobs: list[tuple[Tile, torch.Tensor]],
                  coords: torch.Tensor, labels: torch.Tensor, shape: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Masks of the prompts of each window of ``jobs`` (windows encoded together, decoded ``chunk_size`` prompts
    at a time), clipped to the (H, W) image; those near an inner window edge or empty are dropped (see
    :func:`_edge_filtered`)."""
    segmentor, size, tokens = pipeline.segmentor, pipeline.tile_size, pipeline.options.decoder_tokens
    device = next(segmentor.parameters()).device
    crops = torch.stack([canvas[:, t.y0 : t.y0 + size, t.x0 : t.x0 + size] for t, _ in jobs])
    with pipeline.autocast(segmentor):
        embeddings = segmentor.encode(crops.to(device)).float()
    out = []
    for (tile, members), embedding in zip(jobs, embeddings):
        local = coords.float() - torch.tensor([tile.x0, tile.y0], dtype=torch.float32)  # window px
        for start in range(0, len(members), pipeline.options.chunk_size):
            part = members[start : start + pipeline.options.chunk_size]
            with pipeline.autocast(segmentor):
                logits, ious, offsets = decode_at_points(segmentor, embedding, local[part].to(device),
                                                         labels[part].to(device), tokens=tokens)
            window = paste_windows(logits.float().cpu(), offsets.cpu(), (size, size)) > 0  # (Z, size, size)
            out.append(_edge_filtered(window, ious.cpu().float(), part, tile, shape))
    return out


def _edge_filtered(window: torch.Tensor, ious: torch.Tensor, prompt: torch.Tensor, tile: Tile,
                   shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The (Z, S, S) window masks of ``tile`` (prompts ``prompt``), clipped to the (H, W) image, minus the empty
    ones and those whose box comes within ``EDGE_MARGIN`` px of an inner window edge. Returns prompt (Z',),
    score (Z',), boxes (Z', 4) image px, and the masks' pixels as (row among the Z' masks, flat image index) pairs."""
    height, width = shape
    size = window.shape[-1]
    window[:, max(0, height - tile.y0) :, :] = False
    window[:, :, max(0, width - tile.x0) :] = False
    boxes, present = masks_to_boxes(window), window.flatten(1).any(1)  # window px
    inner_low = torch.tensor([tile.x0 > 0, tile.y0 > 0])
    inner_high = torch.tensor([tile.x0 + size < width, tile.y0 + size < height])
    near_low = ((boxes[:, :2] < EDGE_MARGIN) & inner_low).any(1)
    near_high = ((boxes[:, 2:] >= size - EDGE_MARGIN) & inner_high).any(1)
    keep = present & ~near_low & ~near_high
    z, rows, cols = torch.nonzero(window[keep], as_tuple=True)
    origin = torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=torch.float32)
    return {"prompt": prompt[keep], "score": ious[keep], "boxes": boxes[keep] + origin,
            "pixel_mask": z, "pixel_flat": (rows + tile.y0) * width + cols + tile.x0}


def _concat(flat: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """One table of every window's masks: prompt, score, boxes, and the pixel pairs with global mask rows."""
    if not flat:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, torch.zeros(0), torch.zeros((0, 4)), empty, empty
    counts = torch.tensor([len(p["prompt"]) for p in flat])
    first_row = torch.cumsum(counts, 0) - counts
    pixel_mask = torch.cat([p["pixel_mask"] + row for p, row in zip(flat, first_row)])
    return (torch.cat([p["prompt"] for p in flat]), torch.cat([p["score"] for p in flat]),
            torch.cat([p["boxes"] for p in flat]), pixel_mask, torch.cat([p["pixel_flat"] for p in flat]))


def _best_per_prompt(prompt: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Row indices keeping, for each prompt decoded in several windows, its mask with the highest score."""
    order = torch.argsort(-score, stable=True)
    _, first = np.unique(prompt[order].numpy(), return_index=True)
    return order[torch.from_numpy(first)]


def _paint_ascending(prompt: torch.Tensor, score: torch.Tensor, keep: torch.Tensor, pixel_mask: torch.Tensor,
                     pixel_flat: torch.Tensor, shape: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Paint the ``keep`` masks in ascending score (the best wins each pixel), then number the instances left with
    pixels 1..M in prompt order."""
    height, width = shape
    kept = torch.zeros(len(prompt), dtype=torch.bool)
    kept[keep] = True
    on = kept[pixel_mask]
    rows, flat = pixel_mask[on], pixel_flat[on]
    order = torch.argsort(-score[rows], stable=True)  # best first: the last one painted in ascending order
    _, first = np.unique(flat[order].numpy(), return_index=True)
    winners = order[torch.from_numpy(first)]
    owner = torch.zeros(height * width, dtype=torch.int64)  # mask row + 1
    owner[flat[winners]] = rows[winners] + 1
    present = torch.unique(owner)
    present = present[present > 0] - 1
    present = present[torch.argsort(prompt[present])]
    relabel = torch.zeros(len(prompt) + 1, dtype=torch.int32)
    relabel[present + 1] = torch.arange(1, len(present) + 1, dtype=torch.int32)
    return relabel[owner].view(height, width).numpy(), prompt[present], score[present]
