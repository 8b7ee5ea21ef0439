"""The automatic pipeline: tile geometry, prompts → instances, tiled vs untiled agreement."""

import numpy as np
import pytest
import torch

from scripts.pipeline.promptnucseg import PromptNucSeg, negative_prompts
from scripts.pipeline.tiling import tile_grid


@pytest.mark.parametrize("height,width,size,overlap", [(1024, 1024, 256, 64), (300, 700, 256, 64), (100, 90, 256, 64),
                                                       (1000, 1000, 256, 32)])
def test_tile_cores_partition_the_image(height, width, size, overlap):
    tiles = tile_grid(height, width, size, overlap)
    count = np.zeros((height, width), np.int32)
    for t in tiles:
        assert t.x0 <= t.core_x0 < t.core_x1 <= min(t.x0 + size, width)
        assert t.y0 <= t.core_y0 < t.core_y1 <= min(t.y0 + size, height)
        count[t.core_y0:t.core_y1, t.core_x0:t.core_x1] += 1
        # context: an inner core edge is at least overlap/2 px from the window edge
        if t.core_x0 > 0:
            assert t.core_x0 - t.x0 >= overlap // 2
        if t.core_x1 < width:
            assert t.x0 + size - t.core_x1 >= overlap // 2
    assert (count == 1).all()


def test_tile_grid_rejects_bad_overlap():
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_grid(512, 512, 256, 256)


def test_negative_prompts_use_extra_pool_but_only_points_get_rows():
    points = torch.tensor([[10.0, 10.0], [50.0, 50.0]])
    extra = torch.tensor([[12.0, 10.0]])
    coords, labels = negative_prompts(points, extra, 1)
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, 0], [1, 0]]
    assert coords[0, 1].tolist() == [12.0, 10.0]  # the extra point is the nearest negative of the first
    coords, labels = negative_prompts(points[:1], None, 2)
    assert labels.tolist() == [[1, -1, -1]]


def test_window_origins_centre_each_point_and_stay_inside():
    from scripts.pipeline.promptnucseg import _window_cover, window_origins

    points = torch.tensor([[5.0, 5.0], [200.0, 130.0], [630.0, 10.0]])  # (x, y) px
    origins = window_origins(points, stride=16, grid=16, tokens=(20, 40))  # 320 x 640 px embedding
    assert origins.tolist() == [[0, 0], [4, 0], [24, 0]]  # x: 12 - 8 = 4; y clamped to 0; x clamped to 40 - 16
    origins = window_origins(torch.tensor([[200.0, 200.0]]), 16, 16, (40, 40))
    assert origins.tolist() == [[4, 4]]  # the point's token (12, 12) is the window's centre token (4 + 8)
    cover = _window_cover(points, 16, 16, (20, 40))
    assert cover.shape == (20, 40) and cover[:16, :16].all() and cover[:16, 24:].all() and not cover[16:].any()
    assert cover.sum() == 16 * (16 + 4 + 16)  # windows at x tokens 0-15, 4-19 (overlap), 24-39


def test_segment_with_a_decoding_window_smaller_than_the_tile():
    """8 px tokens and a 64 px decoding window on 128 px encoder tiles of a 300 x 200 px image: each prompt's mask
    is pasted at its window, centred on its point (moved inside the image at the borders)."""
    from torch import nn

    from scripts.segmentor.build import build_segmentor

    torch.manual_seed(0)
    segmentor = build_segmentor("conv_small", image_size=128, patch_size=8, decoder_window=64, prompt_dim=32,
                                decoder_mlp_dim=64, decoder_heads=2).eval()
    real_decode = segmentor.decode_windows

    def whole_window(windows, coords, labels, **options):  # the real decoder runs; its window all foreground
        logits, ious = real_decode(windows, coords, labels, **options)
        return torch.ones_like(logits), ious

    segmentor.decode_windows = whole_window
    image = torch.rand(3, 200, 300) * 255
    points = torch.tensor([[10.0, 10.0], [150.0, 100.0], [290.0, 190.0], [60.0, 180.0]])  # (x, y) px
    network = PromptNucSeg(nn.Identity(), segmentor, tile_overlap=64, encoder_tile_size=128, min_area=1)
    inst_map, prompt_of_id, _ = network.segment(image, points)
    assert inst_map.shape == (200, 300) and len(prompt_of_id) == 4
    rows, cols = np.indices(inst_map.shape)
    for instance_id, prompt in enumerate(prompt_of_id.tolist(), start=1):
        inside = inst_map == instance_id
        x, y = points[prompt].tolist()
        # the window: 8 tokens of 8 px centred on the point's token, moved inside the (canvas) embedding
        assert (np.abs(cols[inside] + 0.5 - x) <= 64).all() and (np.abs(rows[inside] + 0.5 - y) <= 64).all()


def test_input_scale_resamples_the_image_and_maps_the_outputs_back():
    """input_scale 2 (a 20x image for a 40x model): the networks see the image at twice the size; the instance map
    comes back at the input's size (an instance too small to keep a pixel is dropped, ids stay contiguous), points
    are scaled back about pixel centres, and given prompts are scaled up first."""
    from torch import nn

    class Recorder(PromptNucSeg):
        def _run(self, image, prompts):
            self.seen = (tuple(image.shape[-2:]), None if prompts is None else prompts["points"].clone())
            inst = torch.zeros(image.shape[-2:], dtype=torch.int32)
            inst[0:20, 0:20] = 1  # 10 x 10 px at the input's resolution
            inst[40, 40] = 2  # one resampled pixel (even row and column): no input pixel samples it
            inst[60:80, 40:60] = 3
            return {"inst_map": inst, "type_map": inst.clamp(max=1), "points": torch.tensor([[9.5, 9.5], [41.0, 41.0],
                    [49.5, 69.5]]), "classes": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.7]),
                    "ious": torch.tensor([0.5, 0.6, 0.7])}

    network = Recorder(nn.Identity(), nn.Identity(), input_scale=2.0)
    out = network(torch.rand(3, 50, 60) * 255, {"points": torch.tensor([[4.5, 4.5]]), "classes": torch.tensor([1]),
                                               "scores": torch.tensor([1.0])})
    assert network.seen[0] == (100, 120)
    assert network.seen[1].tolist() == [[9.5, 9.5]]  # (4.5 + 0.5) * 2 - 0.5
    assert out["inst_map"].shape == (50, 60)
    assert sorted(torch.unique(out["inst_map"]).tolist()) == [0, 1, 2]
    assert int((out["inst_map"] == 1).sum()) == 100 and int((out["inst_map"] == 2).sum()) == 100
    assert out["points"].tolist() == [[4.5, 4.5], [24.5, 34.5]] and out["classes"].tolist() == [1, 3]
    assert out["type_map"][35, 25] == 3 and out["ious"].tolist() == pytest.approx([0.5, 0.7])
    with pytest.raises(ValueError, match="input_scale"):
        PromptNucSeg(nn.Identity(), nn.Identity(), input_scale=0)
    network = Recorder(nn.Identity(), nn.Identity())  # a call's own input_scale (whole slides coarser than asked)
    network(torch.rand(3, 50, 60) * 255, input_scale=2.0)
    assert network.seen == ((100, 120), None)


@pytest.mark.parametrize("length, max_size, overlap", [(4096, 1536, 128), (4096, 1024, 128), (2100, 1536, 128),
                                                       (20000, 1536, 128), (1537, 1536, 128)])
def test_fitted_tiles_cover_the_image_with_the_fewest_and_smallest_tiles(length, max_size, overlap):
    """Fitted tiles: as many per side as tiles of ``max_size`` need, no larger, and the pixels processed stay
    within the overlaps' share of the image (tiles of ``max_size`` would overhang by up to a tile)."""
    from scripts.pipeline.tiling import fitted_tile_size, tile_grid

    size = fitted_tile_size(length, length, max_size, overlap)
    assert size % 32 == 0 and size <= max_size
    fitted, full = tile_grid(length, length, size, overlap), tile_grid(length, length, max_size, overlap)
    per_side = int(len(fitted) ** 0.5)
    assert len(fitted) == len(full)  # no more tiles than max_size gives
    assert per_side * size <= length + (per_side - 1) * overlap + 32 * per_side  # no more pixels than needed
    assert fitted_tile_size(length, length, size - 32, overlap) < size or len(
        tile_grid(length, length, size - 32, overlap)) > len(fitted)  # the smallest that many tiles allow
