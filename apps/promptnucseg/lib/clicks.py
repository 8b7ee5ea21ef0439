"""Interactive segmentation: a user's clicks as PromptNucSeg point prompts, neighbours found by the prompter as
negative prompts (the paper's adjacent-nucleus negatives, applied to annotation).

For clicks F (foreground) and B (background) on an image region:

1. one prompter pass over the region gives, at every click, the auxiliary nuclear probability (the map of the
   paper's mask-aided prompt filtering) and the class of the nearest predicted point;
2. the prompter's own prompts (``find_prompts``) farther than ``exclude_radius`` px from every foreground click
   are the *neighbours* (the ones closer are taken to be the clicked nucleus itself);
3. ``segment(image, F, extra_negatives=neighbours ∪ B)``: each foreground click is a positive prompt with its K
   nearest among the other clicks, the neighbours and the background clicks as negatives; overlaps between the
   clicks' masks go to the higher predicted IoU;
4. **acceptance rule** (a click far from any nucleus returns nothing rather than a blob): a click keeps its mask
   only if (a) the nuclear probability at the click is >= ``min_probability`` (0.5: the threshold of the
   pipeline's mask-aided filtering, so a click where the automatic pipeline would drop a prompt gets nothing),
   (b) the mask contains the clicked pixel (so it is the clicked nucleus, not a neighbour's, and two clicks on one
   nucleus give one mask), and (c) its predicted IoU is >= ``min_iou`` (checked only when ``min_iou`` > 0;
   default 0: off). Of a mask in several parts only the 8-connected part holding the click is returned.

Coordinates: (x, y) = (col, row) px of the region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.tiling import tile_grid
from scripts.prompter.decode import sample_mask_probability


@dataclass
class ClickResult:
    """Masks of the accepted clicks and why every click was kept or not.

    ``inst_map`` (H, W) int32 ids 1..M; ``click_of_id`` (M,) index of the click of id i + 1; ``classes``,
    ``scores``, ``ious`` (M,); per click: ``probability`` (N,), ``status`` (N,) one of "accepted",
    "no nucleus", "mask misses click", "low iou"; ``neighbours`` (K, 2) and ``negatives`` (K + B, 2) used.
    """

    inst_map: np.ndarray
    click_of_id: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    ious: np.ndarray
    probability: np.ndarray
    status: list[str] = field(default_factory=list)
    neighbours: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


@torch.no_grad()
def probe_clicks(model: PromptNucSeg, image: torch.Tensor, clicks: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompter outputs at the clicks: nuclear probability, class (1..C) and class score of the nearest predicted
    point, from the prompter tile (same tiling as ``find_prompts``) whose core holds the click.

    Args:
        image: (3, H, W) float RGB [0, 255]. clicks: (N, 2) (x, y) px inside the image.
    """
    height, width = image.shape[-2:]
    n = len(clicks)
    probability, classes, scores = torch.zeros(n), torch.ones(n, dtype=torch.long), torch.zeros(n)
    size = model.options.prompter_tile_size or max(height, width)
    overlap = min(model.options.tile_overlap, size // 2) if size < max(height, width) else 0
    device = next(model.prompter.parameters()).device
    for tile in tile_grid(height, width, size, overlap):
        mine = torch.nonzero(tile.core_holds(clicks)).flatten()
        if mine.numel() == 0:
            continue
        crop = image[:, tile.y0 : tile.y0 + size, tile.x0 : tile.x0 + size]
        out = model.prompter(crop[None].to(device))
        local = (clicks[mine] - torch.tensor([tile.x0, tile.y0], dtype=clicks.dtype)).float()
        probability[mine] = sample_mask_probability(out["aux_logits"][0].cpu(), local).float()
        nearest = torch.cdist(local, out["pred_points"][0].cpu().float()).argmin(dim=1)
        fg = out["pred_logits"][0].cpu().float().softmax(-1)[nearest, :-1]  # drop the background column
        scores[mine], cls = fg.max(dim=-1)
        classes[mine] = cls + 1
    return probability, classes, scores


def neighbour_prompts(prompt_points: torch.Tensor, clicks: torch.Tensor, exclude_radius: float) -> torch.Tensor:
    """The prompter's points farther than ``exclude_radius`` px from every click (the others are the clicked
    nuclei themselves)."""
    if len(prompt_points) == 0 or len(clicks) == 0:
        return prompt_points.reshape(-1, 2)
    far = torch.cdist(prompt_points.double(), clicks.double()).min(dim=1).values > exclude_radius
    return prompt_points[far]


@torch.no_grad()
def segment_clicks(model: PromptNucSeg, image: torch.Tensor, foreground: np.ndarray, background: np.ndarray,
                   exclude_radius: float = 12.0, min_probability: float = 0.5, min_iou: float = 0.0) -> ClickResult:
    """Segment the nucleus under every foreground click (see the module docstring for the steps and the rule).

    Args:
        image: (3, H, W) float RGB [0, 255]. foreground (N, 2), background (B, 2): (x, y) px of the image.
    """
    height, width = image.shape[-2:]
    fg = torch.as_tensor(foreground, dtype=torch.float32).reshape(-1, 2)
    bg = torch.as_tensor(background, dtype=torch.float32).reshape(-1, 2)
    probability, click_classes, click_scores = probe_clicks(model, image, fg)
    neighbours = neighbour_prompts(model.find_prompts(image)["points"].float(), fg, exclude_radius)
    negatives = torch.cat([neighbours, bg])
    owner, click_of_id, ious = model.segment(image, fg, extra_negatives=negatives)

    status = []
    keep_ids = []
    cols = np.clip(np.floor(foreground[:, 0] + 0.5).astype(int), 0, width - 1) if len(fg) else np.zeros(0, int)
    rows = np.clip(np.floor(foreground[:, 1] + 0.5).astype(int), 0, height - 1) if len(fg) else np.zeros(0, int)
    id_of_click = {int(c): i + 1 for i, c in enumerate(click_of_id.tolist())}
    for k in range(len(fg)):
        nid = id_of_click.get(k)
        if probability[k] < min_probability:
            status.append("no nucleus")
        elif nid is None or owner[rows[k], cols[k]] != nid:
            status.append("mask misses click")
        elif min_iou > 0 and float(ious[nid - 1]) < min_iou:
            status.append("low iou")
        else:
            status.append("accepted")
            keep_ids.append(nid)

    kept = np.asarray(keep_ids, dtype=np.int64) - 1
    clicks_kept = click_of_id.numpy()[kept]
    inst_map = np.zeros_like(owner, dtype=np.int32)
    boxes = ndimage.find_objects(owner)
    for new_id, (nid, k) in enumerate(zip(keep_ids, clicks_kept), start=1):
        rs, cs = boxes[nid - 1]
        parts, _ = ndimage.label(owner[rs, cs] == nid, structure=np.ones((3, 3), bool))  # 8-connected parts
        held = parts == parts[rows[k] - rs.start, cols[k] - cs.start]  # the nucleus: the part holding the click
        inst_map[rs, cs][held] = new_id
    return ClickResult(
        inst_map=inst_map,
        click_of_id=clicks_kept,
        classes=click_classes.numpy()[clicks_kept],
        scores=click_scores.numpy()[clicks_kept],
        ious=ious.numpy()[kept].astype(np.float64),
        probability=probability.numpy().astype(np.float64),
        status=status,
        neighbours=neighbours.numpy(),
        negatives=negatives.numpy(),
    )
