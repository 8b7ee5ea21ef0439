"""The official code's inference assembly (``--pipeline#assembly official``, :mod:`scripts.pipeline.official`):
its options, its edge rule, box NMS and painting, windows that change nothing for a translation-equivariant
stand-in segmentor, and the bundle commands with the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from skimage.filters import threshold_otsu
from torch import nn

from conftest import BUNDLE_ROOT, run_bundle
from scripts.data.readers.common import read_image
from scripts.data.synthetic import make_synthetic_record
from scripts.inference import image_tensor
from scripts.pipeline.model_file import load_model
from scripts.pipeline.official import EDGE_MARGIN, _edge_filtered
from scripts.pipeline.options import PipelineOptions, option_names
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.tiling import Tile
from test_tiling import DarkDiskSegmentor, centroids, cut_by_core_borders

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
SAMPLE_IMAGES = BUNDLE_ROOT / "sample_data" / "images"
THREADS = ("--num_threads", str(torch.get_num_threads()))
# the stand-in segmentors decode on their whole window, in float32
PINNED = {k: v for k, v in {"decoder_tokens": None, "precision": "float32"}.items() if k in option_names()}


# ------------------------------------------------------------------------------------------------ options
def test_assembly_options_are_parsed_strictly():
    options = PipelineOptions(assembly=" Official", official_box_nms="0.3")
    assert (options.assembly, options.official_box_nms) == ("official", 0.3)
    assert (PipelineOptions().assembly, PipelineOptions().official_box_nms) == ("ours", 0.5)
    with pytest.raises(ValueError, match=r"assembly must be one of \['ours', 'official'\], got 'offical'"):
        PipelineOptions(assembly="offical")
    for bad in ("1.5", "-0.1", "half", True):
        with pytest.raises(ValueError, match="official_box_nms"):
            PipelineOptions(official_box_nms=bad)


# ------------------------------------------------------------------------------------------------ parts
def test_edge_rule_drops_masks_near_inner_window_edges_only():
    """A window at x0 = 192 of a (256, 448) image: its left edge is inner, its right, top and bottom edges are the
    image border. Masks reaching the first ``EDGE_MARGIN`` columns are dropped; at the border they stay."""
    tile = Tile(x0=192, y0=0, size=256, core_x0=224, core_y0=0, core_x1=448, core_y1=256)
    window = torch.zeros((5, 256, 256), dtype=torch.bool)
    window[0, 100:110, EDGE_MARGIN - 1 : 20] = True  # reaches column 6: dropped
    window[1, 100:110, EDGE_MARGIN : 20] = True  # starts at column 7: kept
    window[2, 0:10, 246:256] = True  # top-right corner: image border, kept
    window[4, 250:256, 100:110] = True  # bottom: image border, kept
    out = _edge_filtered(window, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.arange(10, 15), tile, (256, 448))
    assert out["prompt"].tolist() == [11, 12, 14]  # 13 is empty
    assert out["boxes"].tolist() == [[192 + EDGE_MARGIN, 100, 211, 109], [438, 0, 447, 9], [292, 250, 301, 255]]
    assert torch.allclose(out["score"], torch.tensor([0.8, 0.7, 0.5]))
    rows, cols = np.divmod(out["pixel_flat"].numpy(), 448)
    assert np.bincount(out["pixel_mask"].numpy()).tolist() == [130, 100, 60]
    assert cols[out["pixel_mask"].numpy() == 1].min() == 438 and rows.max() == 255


class SquareSegmentor(nn.Module):
    """A stand-in segmentor on one 256 px window: the mask of a prompt is the 20 x 20 px square around its positive
    point (x, y) (3 x 3 below row 200); its predicted IoU is x / 1000 (further right wins)."""

    image_size = 256
    embedding_size = (16, 16)
    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros((images.shape[0], 1, 16, 16))

    def decode_windows(self, windows, point_coords, point_labels, **_):
        x, y = point_coords[:, 0, 0].view(-1, 1, 1).floor(), point_coords[:, 0, 1].view(-1, 1, 1).floor()
        side = torch.where(y > 200, 3, 20)
        x0, y0 = x - side // 2, y - side // 2
        cols, rows = torch.arange(256).view(1, 1, -1), torch.arange(256).view(1, -1, 1)
        inside = (cols >= x0) & (cols < x0 + side) & (rows >= y0) & (rows < y0 + side)
        return torch.where(inside, 1.0, -1.0), point_coords[:, 0, 0] / 1000


def test_box_nms_painting_and_no_minimum_area():
    """Squares at x = 100 and 108 overlap with box IoU 0.41: NMS at 0.3 keeps only the better one (further
    right); at 0.5 both stay and the better one wins the overlap. A 3 x 3 px mask stays (no minimum area), which
    ours drops (``min_area`` 10)."""
    image = torch.full((3, 256, 256), 200.0)
    points = torch.tensor([[100.0, 50.0], [108.0, 50.0], [50.0, 220.0]])
    outs = {}
    for assembly, threshold in (("official", 0.3), ("official", 0.5), ("ours", 0.5)):
        network = PromptNucSeg(nn.Identity(), SquareSegmentor(), assembly=assembly, official_box_nms=threshold,
                               num_neg=0, **PINNED)
        outs[assembly, threshold] = network.segment(image, points)
    inst, prompt_of_id, ious = outs["official", 0.3]
    assert prompt_of_id.tolist() == [1, 2] and torch.allclose(ious, torch.tensor([0.108, 0.05]))
    assert np.bincount(inst.ravel()).tolist()[1:] == [400, 9]
    inst, prompt_of_id, _ = outs["official", 0.5]
    assert prompt_of_id.tolist() == [0, 1, 2]
    assert np.bincount(inst.ravel()).tolist()[1:] == [8 * 20, 400, 9]
    assert (inst[40:60, 98:118] == 2).all()
    inst, prompt_of_id, _ = outs["ours", 0.5]
    assert prompt_of_id.tolist() == [0, 1]  # the 9 px instance is under min_area
    assert np.bincount(inst.ravel()).tolist()[1:] == [8 * 20, 400]


# ------------------------------------------------------------------------------------------------ windows
class MaskScoredSegmentor(DarkDiskSegmentor):
    """:class:`DarkDiskSegmentor` whose predicted IoU is the mean darkness of its mask: a function of the mask alone,
    so a mask whole in two windows has the same score in both."""

    def decode_windows(self, windows, point_coords, point_labels, **_):
        logits, _ = super().decode_windows(windows, point_coords, point_labels)
        mask = logits > 0
        grey = windows.float().mean(1)
        return logits, ((255 - grey) * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1) / 255


@pytest.mark.slow
def test_official_windows_match_one_window_for_an_equivariant_segmentor():
    """448 px image, four 256 px windows with 64 px overlap: masks of 20 px radius at most are whole and at least
    7 px from the inner edges in some window, so the edge rule, the best mask per prompt, box NMS and the painting
    give exactly the map of one 448 px window (no negatives: a negative outside a window would change a mask)."""
    record = make_synthetic_record((448, 448), n_nuclei=150, num_classes=1, seed=7, name="windows")
    threshold = threshold_otsu(record.image.mean(-1))
    image, points = image_tensor(record.image), centroids(record.inst_map)
    assert cut_by_core_borders(record.inst_map, 256, 64) >= 10  # nuclei across the windows' core borders
    maps = {}
    for size in (256, 448):
        network = PromptNucSeg(nn.Identity(), MaskScoredSegmentor(size, threshold, radius=20), assembly="official",
                               num_neg=0, chunk_size=16, **PINNED)
        maps[size] = network.segment(image, points)
    np.testing.assert_array_equal(maps[256][0], maps[448][0])
    assert torch.equal(maps[256][1], maps[448][1]) and len(maps[256][1]) >= 90


# ------------------------------------------------------------------------------------------------ bundle commands
@pytest.mark.slow
def test_bundle_inference_with_the_official_assembly(tmp_path):
    """``run inference --pipeline#assembly official`` with the shipped model gives the in-process instance map; a
    typo in the option is named on the last line."""
    run_bundle("inference", "configs/inference.json", "--input_dir", str(SAMPLE_IMAGES), "--output_dir",
               str(tmp_path / "out"), "--pipeline#assembly", "official", "--pipeline#input_scale", "1", *THREADS,
               timeout=600)
    path = sorted(SAMPLE_IMAGES.glob("*.png"))[0]
    network = load_model(SHIPPED, "cpu", assembly="official", input_scale=1)
    expected = network(image_tensor(read_image(path)))["inst_map"].numpy()
    written = tifffile.imread(tmp_path / "out" / f"{path.stem}_inst.tif")
    assert expected.max() >= 20
    np.testing.assert_array_equal(written, expected)
    proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(SAMPLE_IMAGES), "--output_dir",
                      str(tmp_path / "typo"), "--pipeline#assembly", "offical", *THREADS, check=False, timeout=300)
    assert proc.returncode != 0
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "promptnucseg: ValueError: assembly must be one of ['ours', 'official'], got 'offical'")


@pytest.mark.slow
def test_bundle_evaluating_with_the_official_assembly(tmp_path):
    """``run evaluating --pipeline#assembly official`` on the sample tiles: scored, and within 0.03 PQ of ours
    (measured on the held-out MoNuSeg and CoNSeP images: docs/benchmarks/assembly.md)."""
    pq = {}
    for assembly in ("ours", "official"):
        out = tmp_path / assembly
        run_bundle("evaluating", "configs/evaluate.json", "--dataset_dir", str(BUNDLE_ROOT / "sample_data"),
                   "--output_dir", str(out), "--pipeline#assembly", assembly, timeout=600)
        pq[assembly] = json.loads((out / "metrics.json").read_text())["pq"]
    assert pq["ours"] > 0.4 and abs(pq["official"] - pq["ours"]) <= 0.03, pq
