"""Tiled vs untiled: the pipeline's tiling (cores, context, IoU-ranked stitching) against an untiled reference.

The untiled reference: the prompter run on the whole image in one pass (``prompter_tile_size=None``), and every
nucleus decoded in a segmentor window centred on its own prompt point (maximum context on all sides; moved inside
the image at its borders), with its K nearest other prompts as negatives (those outside its window as padding, as
in the pipeline), masks painted by predicted IoU over the whole image and relabelled as the pipeline does.

On a synthetic 1024 x 1024 image with ~700 nuclei, many cut by the core borders of the tile grid:

- with a translation-equivariant stand-in segmentor whose masks reach up to overlap / 2 = 32 px from their point,
  tiled = untiled exactly (tiles of 128 and 256 px): cores, cut nuclei, negatives and stitching lose nothing; masks
  reaching 40 px are cut by the windows (PQ < 0.99), as the context guarantee says;
- with the model trained on synthetic data (segmentor at 128 px: tiles of 128 px, 64 px overlap), PQ(untiled,
  tiled) is about 0.64 with the same prompts and 0.63 with the prompter tiled too, under the 0.99 bar (xfail below).
  What breaks is not the tiling: the mask of a prompt changes when its window moves by a few px, whatever the
  distance to the window's border (median IoU 0.83 between the masks of the same prompt in the centred window and
  in its tile); windows moved by 4, 8, 16, 32 px give PQ 0.64, 0.63, 0.69, 0.73 against the centred reference, at
  random by up to 32 px 0.62; and against the ground truth the tiled map scores PQ 0.43, the reference 0.38, the
  moved reference 0.45. The tiled prompter (256 px tiles) reproduces ~95 % of the untiled prompts within 0.5 px.
  (Measured with the fixture's recipe of 2026-11-25; an earlier recipe gave the same picture, tiled 0.61.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu
from torch import nn

from scripts.export import load_model
from scripts.inference import image_tensor
from scripts.metrics import panoptic_quality
from scripts.pipeline import PromptNucSeg, _outside_as_padding, negative_prompts, tile_grid
from scripts.synthetic import make_synthetic_record

SIZE = 1024
PQ_BAR = 0.99


def window_origin(centre: torch.Tensor, size: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (x0, y0) px of the ``size`` window centred on ``centre`` (x, y) px, moved inside the image."""
    x0, y0 = (int(round(v - size / 2)) for v in centre.tolist())
    return min(max(x0, 0), max(width - size, 0)), min(max(y0, 0), max(height - size, 0))


@torch.no_grad()
def untiled_reference(network: PromptNucSeg, image: torch.Tensor, points: torch.Tensor,
                      offsets: torch.Tensor | None = None) -> np.ndarray:
    """Instance map (H, W) int32 with every prompt (N, 2) (x, y) px decoded in a window centred on it (or on it
    + ``offsets`` (N, 2) px: the same with the windows moved)."""
    size = network.tile_size
    height, width = image.shape[-2:]
    coords, labels = negative_prompts(points, None, network.num_neg)
    best = torch.full((height, width), -torch.inf)
    owner = torch.zeros((height, width), dtype=torch.int64)
    ious = torch.zeros(len(points))
    for i in range(len(points)):
        centre = points[i] if offsets is None else points[i] + offsets[i]
        x0, y0 = window_origin(centre, size, height, width)
        crop = image[:, y0 : y0 + size, x0 : x0 + size]
        h, w = crop.shape[-2:]
        local = coords[i : i + 1] - torch.tensor([x0, y0], dtype=torch.float32)
        local_labels = _outside_as_padding(local, labels[i : i + 1], w, h)
        embedding = network.segmentor.encode(crop[None])[0]
        logits, iou = network.segmentor.decode(embedding, local, local_labels, input_size=(h, w))
        ious[i] = iou[0]
        score = torch.where(logits[0] > 0, iou[0], torch.tensor(-torch.inf))
        region_best, region_owner = best[y0 : y0 + h, x0 : x0 + w], owner[y0 : y0 + h, x0 : x0 + w]
        wins = score > region_best
        region_best[wins] = score[wins]
        region_owner[wins] = i + 1
    areas = np.bincount(owner.numpy().ravel(), minlength=len(points) + 1)[1:]
    kept = np.flatnonzero(areas >= max(network.min_area, 1))
    relabel = np.zeros(len(points) + 1, np.int32)
    relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
    return relabel[owner.numpy()]


class DarkDiskSegmentor(nn.Module):
    """A translation-equivariant stand-in for the segmentor, to test the tiling alone: the mask of a prompt is the
    dark pixels (grey < ``threshold``) within ``radius`` px of its positive point that are nearer to it than to
    its negative points; the predicted IoU is the mean darkness of that disk (continuous: no ties)."""

    def __init__(self, image_size: int, threshold: float, radius: float) -> None:
        super().__init__()
        self.image_size, self.threshold, self.radius = image_size, threshold, radius
        self.anchor = nn.Parameter(torch.zeros(1))  # the pipeline asks its parameters for the device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()  # the "embedding" is the (padded) crop itself

    def decode(self, embedding, point_coords, point_labels, input_size=None):
        h, w = input_size or (self.image_size, self.image_size)
        grey = embedding[..., :h, :w].float().mean(0)
        rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)

        def squared_distance(points: torch.Tensor) -> torch.Tensor:  # (Z, 2) (x, y) -> (Z, h, w)
            return (cols - points[:, 0].view(-1, 1, 1)) ** 2 + (rows - points[:, 1].view(-1, 1, 1)) ** 2

        to_positive = squared_distance(point_coords[:, 0])
        to_negative = torch.full_like(to_positive, torch.inf)
        for k in range(1, point_coords.shape[1]):
            is_negative = (point_labels[:, k] == 0).view(-1, 1, 1)
            to_negative = torch.where(is_negative, torch.minimum(to_negative, squared_distance(point_coords[:, k])),
                                      to_negative)
        disk = to_positive <= self.radius**2
        mask = disk & (grey < self.threshold) & (to_positive < to_negative)
        darkness = ((255 - grey) * disk).sum((1, 2)) / disk.sum((1, 2)).clamp(min=1) / 255
        return torch.where(mask, 1.0, -1.0), darkness


def centroids(inst_map: np.ndarray) -> torch.Tensor:
    """(N, 2) (x, y) px centroids of the instances of ``inst_map``."""
    n = int(inst_map.max()) + 1
    rows, cols = np.indices(inst_map.shape)
    area = np.bincount(inst_map.ravel(), minlength=n)
    x = np.bincount(inst_map.ravel(), cols.ravel(), minlength=n) / np.maximum(area, 1)
    y = np.bincount(inst_map.ravel(), rows.ravel(), minlength=n) / np.maximum(area, 1)
    return torch.tensor(np.stack([x, y], 1)[1:][area[1:] > 0], dtype=torch.float32)


@pytest.fixture(scope="module")
def record():
    return make_synthetic_record((SIZE, SIZE), n_nuclei=700, num_classes=3, seed=5, name="tiling")


@pytest.mark.parametrize("tile_size", [128, 256])
def test_tiling_is_exact_for_an_equivariant_segmentor_with_masks_within_the_context(record, tile_size):
    """Masks reaching up to overlap / 2 = 32 px from their point (nuclei cut by core borders included): the tiled
    pipeline gives exactly the untiled reference."""
    assert cut_by_core_borders(record.inst_map, tile_size, 64) >= 50
    threshold = threshold_otsu(record.image.mean(-1))
    network = PromptNucSeg(nn.Identity(), DarkDiskSegmentor(tile_size, threshold, radius=32), tile_overlap=64)
    image, points = image_tensor(record.image), centroids(record.inst_map)
    tiled = network.segment(image, points)[0]
    reference = untiled_reference(network, image, points)
    assert reference.max() >= 500
    np.testing.assert_array_equal(tiled, reference)
    # the comparison is not vacuous: masks reaching beyond the guaranteed context are cut by the tile windows
    network.segmentor.radius = 40
    assert panoptic_quality(untiled_reference(network, image, points), network.segment(image, points)[0]).pq < 0.99


# ---------------------------------------------------------------------------------------------------------------
# The trained model. Its segmentor is not translation-equivariant: the mask of a prompt changes when the window
# moves a few px (the tile grid puts a point anywhere from 32 to 96 px from its window's left edge, the reference
# in the centre), so the 0.99 bar is not met; the tests below say so (xfail, strict: they fail when it is met) and
# check that tiling costs nothing beyond that sensitivity.
SENSITIVITY = ("the trained test segmentor is not translation-equivariant: moving its window 4-32 px changes its "
               "masks (PQ 0.63-0.73 between two untiled references), and the tiled pipeline is as far from the "
               "untiled reference (PQ 0.64) as a reference with its windows moved at random by up to 32 px (0.62)")


@pytest.fixture(scope="module")
def network(trained_model_path) -> PromptNucSeg:
    return load_model(trained_model_path, "cpu")


@pytest.fixture(scope="module")
def maps(network, record) -> dict:
    """Untiled prompts; instance maps of the untiled reference, of the reference with every window moved at random
    by up to 32 px in x and y, of the tiled segmentation of the untiled prompts, and of the fully tiled pipeline
    (prompter on 256 px tiles too)."""
    image = image_tensor(record.image)
    whole = PromptNucSeg(network.prompter, network.segmentor, num_neg=network.num_neg,
                         tile_overlap=network.tile_overlap, prompter_tile_size=None)
    fully_tiled = PromptNucSeg(network.prompter, network.segmentor, num_neg=network.num_neg,
                               tile_overlap=network.tile_overlap, prompter_tile_size=256)
    with torch.no_grad():
        prompts = whole.find_prompts(image)
        tiled_prompts = fully_tiled.find_prompts(image)
    points = prompts["points"]
    offsets = torch.from_numpy(np.random.default_rng(0).uniform(-32, 32, (len(points), 2))).float()
    return {
        "prompts": prompts,
        "tiled_prompts": tiled_prompts,
        "reference": untiled_reference(network, image, points),
        "moved": untiled_reference(network, image, points, offsets),
        "tiled": network(image, prompts)["inst_map"].numpy(),
        "fully_tiled": fully_tiled(image)["inst_map"].numpy(),
    }


def cut_by_core_borders(inst_map: np.ndarray, size: int, overlap: int) -> int:
    """How many instances of ``inst_map`` cross a core border of the (size, overlap) tile grid."""
    cores = np.zeros(inst_map.shape, np.int32)
    for k, tile in enumerate(tile_grid(*inst_map.shape, size, overlap)):
        cores[tile.core_y0 : tile.core_y1, tile.core_x0 : tile.core_x1] = k
    fg = inst_map > 0
    ids, core_ids = inst_map[fg], cores[fg]
    pairs = np.unique(np.stack([ids, core_ids]), axis=1)
    return int((np.bincount(pairs[0]) > 1).sum())


@pytest.mark.slow
def test_the_image_has_nuclei_cut_by_tile_borders(network, record, maps):
    overlap = min(network.tile_overlap, network.tile_size // 2)
    assert network.tile_size == 128 and overlap == 64
    assert record.inst_map.max() >= 650
    assert cut_by_core_borders(record.inst_map, network.tile_size, overlap) >= 100
    assert cut_by_core_borders(maps["reference"], network.tile_size, overlap) >= 100
    assert len(maps["prompts"]["points"]) >= 400


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=SENSITIVITY)
def test_tiled_segmentation_matches_untiled_reference_with_the_same_prompts(maps):
    pq = panoptic_quality(maps["reference"], maps["tiled"])
    assert pq.pq >= PQ_BAR, pq


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=SENSITIVITY)
def test_fully_tiled_pipeline_matches_untiled_reference(maps):
    pq = panoptic_quality(maps["reference"], maps["fully_tiled"])
    assert pq.pq >= PQ_BAR, pq


@pytest.mark.slow
def test_tiling_costs_nothing_beyond_the_segmentors_translation_sensitivity(record, maps):
    """Tiled vs reference agree as well as the reference agrees with itself when its windows move (up to the
    32 px a tile puts between a point and the window centre), and score the same against the ground truth."""
    floor = panoptic_quality(maps["reference"], maps["moved"]).pq
    assert panoptic_quality(maps["reference"], maps["tiled"]).pq >= floor - 0.03
    assert panoptic_quality(maps["reference"], maps["fully_tiled"]).pq >= floor - 0.05
    truth = {k: panoptic_quality(record.inst_map, maps[k]).pq for k in ("reference", "moved", "tiled", "fully_tiled")}
    assert truth["tiled"] >= truth["reference"] - 0.02 and truth["fully_tiled"] >= truth["reference"] - 0.02, truth


@pytest.mark.slow
def test_tiled_prompter_reproduces_the_untiled_prompts(maps):
    untiled, tiled = maps["prompts"], maps["tiled_prompts"]
    distance = torch.cdist(untiled["points"], tiled["points"])
    nearest, index = distance.min(1)
    same = nearest <= 0.5
    assert same.float().mean() >= 0.9
    assert abs(len(tiled["points"]) - len(untiled["points"])) <= 0.02 * len(untiled["points"])
    assert (tiled["classes"][index[same]] == untiled["classes"][same]).float().mean() >= 0.95
