"""Tiled vs untiled: the pipeline's tiled image encoder against one pass over the whole image.

The pipeline decodes every prompt on the window of the image embedding centred on its point; the embedding is
stitched from encoder tiles (their cores, with ``tile_overlap / 2`` px of context at least). The untiled
reference runs the (convolutional) encoder on the whole image in one pass (``whole_image_encoder``); everything
else is the same. On a synthetic 1024 x 1024 image with ~700 nuclei, many cut by the tiles' core borders:

- with a translation-equivariant stand-in segmentor, tiled = untiled exactly (encoder tiles of 128 and 256 px);
- with the model trained on synthetic data (segmentor at 128 px, encoder tiles of 384 px with 192 px overlap, float32),
  PQ(untiled, tiled) >= 0.98 with the same prompts (measured 0.996 here and 0.9895 in CI, whose fixture model
  trains to other weights on another CPU; 0.990 with 128 px overlap, 0.95 with 256 px tiles and 128 px overlap:
  a CNN encoder needs its context, and the bar sits between that failure and the measured range); with the prompter on 256 px tiles as well,
  the prompts found near the prompter's tile borders differ a little (measured 0.96).

(History: until 2026-11-25 each nucleus was decoded in the tile whose core held its point; the masks of the
trained model then changed with the point's place in its window and tiled vs untiled PQ was 0.64. Decoding on a
window centred on each point removed that dependence.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu
from torch import nn

from scripts.pipeline.model_file import load_model
from scripts.inference import image_tensor
from scripts.evaluation.metrics import panoptic_quality
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.tiling import tile_grid
from scripts.data.synthetic import make_synthetic_record

SIZE = 1024
PQ_BAR = 0.98  # see the module docstring: measured 0.9895-0.996, too little context 0.95


class DarkDiskSegmentor(nn.Module):
    """A translation-equivariant stand-in for the segmentor, to test the tiling alone: the "embedding" is the image
    itself (one token per pixel); the mask of a prompt is the dark pixels (grey < ``threshold``) within ``radius``
    px of its positive point that are nearer to it than to its negative points; the predicted IoU is the mean
    darkness of that disk (continuous: no ties)."""

    def __init__(self, image_size: int, threshold: float, radius: float) -> None:
        super().__init__()
        self.image_size, self.threshold, self.radius = image_size, threshold, radius
        self.embedding_size = (image_size, image_size)
        self.patch_size = 1
        self.anchor = nn.Parameter(torch.zeros(1))  # the pipeline asks its parameters for the device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def encode_whole(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def decode_windows(self, windows, point_coords, point_labels, **options):  # options: dtype (unused)
        grey = windows.float().mean(1)  # (Z, S, S)
        size = self.image_size
        rows = torch.arange(size, dtype=torch.float32).view(1, size, 1)
        cols = torch.arange(size, dtype=torch.float32).view(1, 1, size)

        def squared_distance(points: torch.Tensor) -> torch.Tensor:  # (Z, 2) (x, y) -> (Z, S, S)
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


def untiled(network: PromptNucSeg) -> PromptNucSeg:
    """The same pipeline with the segmentor's encoder run on the whole image in one pass."""
    return PromptNucSeg(network.prompter, network.segmentor, network.options, whole_image_encoder=True)


@pytest.mark.parametrize("tile_size", [128, 256])
def test_tiling_is_exact_for_an_equivariant_segmentor(record, tile_size):
    """Nuclei cut by core borders included, and masks reaching 40 px from their point (beyond the 32 px of
    context a tile core guarantees): decoded on windows centred on their points, tiled = untiled exactly."""
    assert cut_by_core_borders(record.inst_map, tile_size, 64) >= 50
    threshold = threshold_otsu(record.image.mean(-1))
    network = PromptNucSeg(nn.Identity(), DarkDiskSegmentor(tile_size, threshold, radius=40), tile_overlap=64,
                           encoder_tile_size=tile_size, decoder_tokens=None)
    image, points = image_tensor(record.image), centroids(record.inst_map)
    tiled = network.segment(image, points)[0]
    reference = untiled(network).segment(image, points)[0]
    assert reference.max() >= 500
    np.testing.assert_array_equal(tiled, reference)


# 5 x 5 tiles of 384 px (a size that fits 1024 px exactly, so ``fitted_tile_size`` keeps it), 96 px of context
ENCODER_TILE, OVERLAP = 384, 192
FITTED_TILE = ENCODER_TILE


@pytest.fixture(scope="module")
def network(trained_model_path) -> PromptNucSeg:
    # float32: this file tests the tiling; bfloat16 (``precision auto`` on this CPU) rounds each tile differently
    return load_model(trained_model_path, "cpu", encoder_tile_size=ENCODER_TILE, tile_overlap=OVERLAP,
                      precision="float32")


@pytest.fixture(scope="module")
def maps(network, record) -> dict:
    """Prompts of the whole image; instance maps with the encoder untiled and tiled (same prompts), and of the
    fully tiled pipeline (prompter on 256 px tiles too)."""
    image = image_tensor(record.image)
    whole = PromptNucSeg(network.prompter, network.segmentor, network.options, prompter_tile_size=None,
                         encoder_tile_size=None)
    fully_tiled = PromptNucSeg(network.prompter, network.segmentor, network.options, prompter_tile_size=256)
    with torch.no_grad():
        prompts = whole.find_prompts(image)
        tiled_prompts = fully_tiled.find_prompts(image)
    return {
        "prompts": prompts,
        "tiled_prompts": tiled_prompts,
        "reference": untiled(whole)(image, prompts)["inst_map"].numpy(),
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
    overlap = network.encoder_overlap(network.tile_size // network.segmentor.embedding_size[0], FITTED_TILE)
    assert network.tile_size == 128 and network.encoder_tile(SIZE, SIZE) == FITTED_TILE and overlap == OVERLAP
    assert record.inst_map.max() >= 650
    assert cut_by_core_borders(record.inst_map, FITTED_TILE, OVERLAP) >= 40
    # the predicted map too (a precondition of the comparison, not a quality bar: measured 39-45 as the trained
    # fixture model changes)
    assert cut_by_core_borders(maps["reference"], FITTED_TILE, OVERLAP) >= 30
    assert len(maps["prompts"]["points"]) >= 400


@pytest.mark.slow
def test_tiled_segmentation_matches_untiled_with_the_same_prompts(record, maps):
    pq = panoptic_quality(maps["reference"], maps["tiled"])
    assert pq.pq >= PQ_BAR, pq
    truth = {k: panoptic_quality(record.inst_map, maps[k]).pq for k in ("reference", "tiled")}
    assert abs(truth["tiled"] - truth["reference"]) <= 0.01, truth


@pytest.mark.slow
def test_fully_tiled_pipeline_against_untiled(record, maps):
    """With the prompter on 256 px tiles as well, the prompts near its tile borders differ a little."""
    pq = panoptic_quality(maps["reference"], maps["fully_tiled"])
    assert pq.pq >= 0.94, pq
    truth = {k: panoptic_quality(record.inst_map, maps[k]).pq for k in ("reference", "fully_tiled")}
    assert truth["fully_tiled"] >= truth["reference"] - 0.02, truth


@pytest.mark.slow
def test_tiled_prompter_reproduces_the_untiled_prompts(maps):
    untiled, tiled = maps["prompts"], maps["tiled_prompts"]
    distance = torch.cdist(untiled["points"], tiled["points"])
    nearest, index = distance.min(1)
    same = nearest <= 0.5
    assert same.float().mean() >= 0.9
    assert abs(len(tiled["points"]) - len(untiled["points"])) <= 0.02 * len(untiled["points"])
    assert (tiled["classes"][index[same]] == untiled["classes"][same]).float().mean() >= 0.95
