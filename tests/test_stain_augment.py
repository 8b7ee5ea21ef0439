"""H&E stain augmentation: the HED round trip, the stain amounts it changes, and the MONAI transform's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.color.colorconv import hed_from_rgb

from conftest import BUNDLE_ROOT
from scripts.data.readers.common import read_image
from scripts.data.stain import RandHEStaind, jitter_stains


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    """A real H&E tile (a bundle sample tile, MoNuSeg), (3, 256, 256) float32 in [0, 255]."""
    image = read_image(BUNDLE_ROOT / "sample_data" / "images" / "TCGA-CH-5767-01Z-00-DX1_x300_y600.png")
    return np.moveaxis(image, -1, 0).astype(np.float32)


def test_no_change_is_the_identity(tile):
    same = jitter_stains(tile, np.ones(3), np.zeros(3))
    assert same.dtype == np.float32 and same.shape == tile.shape
    assert np.abs(same - tile).max() < 0.5  # the HED round trip loses under half a grey level


def stains(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) haematoxylin, eosin, DAB concentrations (optical density) of a (3, H, W) RGB image."""
    return -np.log((np.moveaxis(image, 0, -1).astype(np.float64) + 1) / 256) @ hed_from_rgb


def test_scaling_haematoxylin_scales_its_concentration(tile):
    """H x 1.2 (E, DAB kept): the result's haematoxylin is 1.2 times the tile's where nothing was clipped, its eosin
    unchanged; the image gets darker (haematoxylin absorbs in all three channels)."""
    more_h = jitter_stains(tile, np.array([1.2, 1.0, 1.0]), np.zeros(3))
    unclipped = (np.moveaxis(more_h, 0, -1) > 0).all(-1) & (np.moveaxis(more_h, 0, -1) < 255).all(-1)
    assert unclipped.mean() > 0.9
    before, after = stains(tile)[unclipped], stains(more_h)[unclipped]
    np.testing.assert_allclose(after[:, 0], 1.2 * before[:, 0], atol=1e-4)
    np.testing.assert_allclose(after[:, 1:], before[:, 1:], atol=1e-4)
    assert more_h.mean() < tile.mean() - 1


def test_transform_probability_seed_and_types(tile):
    image = MetaTensor(torch.from_numpy(tile))
    never = RandHEStaind(keys="image", prob=0.0)
    assert never({"image": image})["image"] is image
    first, second = (RandHEStaind(keys="image", prob=1.0, sigma=0.2, bias=0.02).set_random_state(seed=3)
                     for _ in range(2))
    a, b = first({"image": image})["image"], second({"image": image})["image"]
    assert isinstance(a, MetaTensor) and a.dtype == torch.float32 and a.shape == image.shape
    assert torch.equal(a, b)  # same seed, same jitter
    assert (a - image).abs().mean() > 1  # and a visible one
    assert not torch.equal(a, first({"image": image})["image"])  # the next draw differs
    with pytest.raises(ValueError, match="sigma and bias"):
        RandHEStaind(sigma=-0.1)
