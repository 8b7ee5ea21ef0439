"""Whole-slide helpers on small pyramidal TIFFs written by the test: levels, mpp, tissue mask, lazy tiles."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tifffile
from skimage.transform import downscale_local_mean

import scripts.io.wsi as wsi
from scripts.io.wsi import (
    choose_level,
    level_upsampling,
    iter_tiles,
    open_slide,
    read_region,
    read_thumbnail,
    slide_levels,
    tissue_mask,
    write_pyramidal_tiff,
)

H, W = 768, 1280
TISSUE = (slice(256, 640), slice(384, 1024))  # rows, cols of the tissue block (level 0)


def _halve(image: np.ndarray) -> np.ndarray:
    return np.round(image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, 3).mean((1, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    """White glass with scanner noise and one H&E-coloured tissue block."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(242, 3, (H, W, 3)), 0, 255).astype(np.uint8)
    low, high = np.array([150, 60, 150]), np.array([230, 140, 210])  # pink/purple per channel
    image[TISSUE] = rng.integers(low, high, (384, 640, 3)).astype(np.uint8)
    return image


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, slide_image):
    return write_pyramidal_tiff(tmp_path_factory.mktemp("wsi") / "slide.tif", slide_image, levels=3, tile=128, mpp=0.25)


def test_levels_mpp_and_monai_reads(slide_path, slide_image):
    with open_slide(slide_path) as slide:
        levels = slide_levels(slide)
        assert [(lv.width, lv.height) for lv in levels] == [(W, H), (W // 2, H // 2), (W // 4, H // 4)]
        assert [lv.downsample for lv in levels] == [1.0, 2.0, 4.0]
        assert [lv.mpp_x for lv in levels] == pytest.approx([0.25, 0.5, 1.0])
        assert slide.mpp == pytest.approx((0.25, 0.25))
        # MONAI's tifffile WSIReader sees the same pyramid: location is level-0 (row, col), size (h, w) at the level
        reader, handle = slide.reader, slide.wsi
        assert reader.get_level_count(handle) == 3 and reader.get_mpp(handle, 1) == pytest.approx((0.5, 0.5))
        full, _ = reader.get_data(handle, level=0)
        assert np.array_equal(full, slide_image)
        patch, _ = reader.get_data(handle, location=(256, 384), size=(64, 96), level=1)
        level1 = _halve(slide_image)
        assert np.array_equal(patch, level1[128:192, 192:288])
        assert np.array_equal(read_region(slide, 384, 256, 96, 64, level=1), patch)


def test_choose_level(slide_path, tmp_path):
    with open_slide(slide_path) as slide:
        assert choose_level(slide) == 0
        assert [choose_level(slide, mpp=m) for m in (0.25, 0.3, 0.5, 0.55, 1.0, 4.0)] == [0, 0, 1, 1, 2, 2]
        assert choose_level(slide, mpp=0.1) == 0  # coarser slide than asked: level 0, with a warning
        assert level_upsampling(slide, 0, 0.1) == pytest.approx(2.5)  # ... and its tiles enlarged 2.5x
        assert [level_upsampling(slide, lv, m) for lv, m in ((0, 0.25), (0, 0.5), (1, 0.5), (0, None))] == [1, 1, 1, 1]
        assert level_upsampling(slide, 1, 0.25) == pytest.approx(2.0)
        assert choose_level(slide, level=2) == 2
        with pytest.raises(ValueError, match="level=3"):
            choose_level(slide, level=3)
        with pytest.raises(ValueError, match="not both"):
            choose_level(slide, mpp=0.5, level=1)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8), photometric="rgb")  # no resolution unit
    with open_slide(plain) as slide:
        assert slide.mpp is None and choose_level(slide, level=0) == 0
        with pytest.raises(ValueError, match="no resolution"):
            choose_level(slide, mpp=0.5)


def test_tissue_mask(slide_path, slide_image, tmp_path):
    with open_slide(slide_path) as slide:
        mask = tissue_mask(slide)
        # a thumbnail of level 0 read in 256-px blocks equals the box average of the whole image
        thumb = read_thumbnail(slide, level=0, max_size=W // 4, block=256)
    assert np.array_equal(thumb, np.round(downscale_local_mean(slide_image, (4, 4, 1))).astype(np.uint8))
    assert mask.shape == (H // 4, W // 4) and mask.dtype == bool
    truth = np.zeros((H, W), bool)
    truth[TISSUE] = True
    truth = truth[::4, ::4]
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95
    blank = write_pyramidal_tiff(tmp_path / "blank.tif", np.full((512, 512, 3), 240, np.uint8), levels=2, tile=128)
    with open_slide(blank) as slide:
        empty = tissue_mask(slide)
        assert not empty.any()
        assert len(iter_tiles(slide, 0, 256, 0, empty)) == 0


def test_iter_tiles_level0_cover_tissue_skip_background(slide_path, slide_image, monkeypatch):
    calls = []
    real_read = wsi.read_level_region
    monkeypatch.setattr(wsi, "read_level_region", lambda *a, **k: calls.append(a[1:]) or real_read(*a, **k))
    tile, overlap = 256, 32
    with open_slide(slide_path) as slide:
        mask = tissue_mask(slide)
        calls.clear()
        tiles = iter_tiles(slide, 0, tile, overlap, mask, min_tissue_fraction=0.05)
        n = len(tiles)
        assert calls == []  # nothing read before iteration
        covered = np.zeros((H, W), bool)
        seen = 0
        for t in tiles:
            seen += 1
            assert t.image.shape == (tile, tile, 3) and t.image.dtype == np.uint8
            assert (t.x0, t.y0) == (t.x, t.y)
            assert np.array_equal(t.image, slide_image[t.y0 : t.y0 + tile, t.x0 : t.x0 + tile])
            covered[t.y0 : t.y0 + tile, t.x0 : t.x0 + tile] = True
        all_tiles = len(iter_tiles(slide, 0, tile, overlap))
    assert seen == n == len(calls) and 0 < n < all_tiles
    assert covered[TISSUE].all()  # every tissue pixel is in a tile
    assert not covered[:200, :300].any()  # the blank top-left corner is skipped


def test_iter_tiles_level1_coordinates(slide_path, slide_image):
    level1 = _halve(slide_image)
    with open_slide(slide_path) as slide:
        tiles = iter_tiles(slide, 1, 128, 16, tissue_mask(slide))
        first = next(iter(tiles))
        for t in tiles:
            assert (t.x0, t.y0) == (2 * t.x, 2 * t.y)  # level-0 coordinates
            assert np.array_equal(t.image, level1[t.y : t.y + 128, t.x : t.x + 128])
        # the last column/row of tiles is flush with the level edge
        xs = {t.x for t in iter_tiles(slide, 1, 128, 16)}
        assert max(xs) == W // 2 - 128 and min(xs) == 0
        small = list(iter_tiles(slide, 2, 512, 0))  # level 2 (320 x 192) is smaller than a tile: padded white
        assert len(small) == 1 and (small[0].image[192:] == 255).all() and (small[0].image[:, 320:] == 255).all()
    assert first.image.shape == (128, 128, 3)


def test_backends(slide_path, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        open_slide(slide_path, backend="bioformats")
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        open_slide(tmp_path / "missing.tif")
    if importlib.util.find_spec("cucim") is None:
        with pytest.raises(ImportError, match="cuCIM is not installed"):
            open_slide(slide_path, backend="cucim")
    if importlib.util.find_spec("openslide") is not None:
        with open_slide(slide_path) as a, open_slide(slide_path, backend="openslide") as b:
            geometry = [[(lv.width, lv.height, lv.mpp_x) for lv in s.levels] for s in (a, b)]
            assert geometry[0] == geometry[1]
            regions = [read_region(s, 300, 200, 100, 80, level=1) for s in (a, b)]
            assert np.array_equal(*regions)
