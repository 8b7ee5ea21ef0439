"""Masks to an instance map: overlaps go to the higher predicted IoU, each instance one connected region, small
instances are dropped."""

import numpy as np
import torch

from scripts.pipeline.instances import masks_to_instances


def _logits(masks: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks).astype(np.float32) * 20 - 10)


def test_overlap_goes_to_higher_score_and_ids_are_contiguous():
    a = np.zeros((8, 8), bool)
    a[1:5, 1:5] = True
    b = np.zeros((8, 8), bool)
    b[3:7, 3:7] = True
    inst, prompt_of_id = masks_to_instances(_logits([a, b]), torch.tensor([0.2, 0.9]))
    assert set(np.unique(inst)) == {0, 1, 2}
    b_id = 1 + list(prompt_of_id).index(1)
    assert (inst[3:7, 3:7] == b_id).all()  # b wins its whole square, including the overlap
    a_id = 1 + list(prompt_of_id).index(0)
    assert (inst == a_id).sum() == 16 - 4


def test_min_area_drops_fragments_and_empty_masks():
    big = np.zeros((10, 10), bool)
    big[0:6, 0:6] = True
    small = np.zeros((10, 10), bool)
    small[5:7, 5:7] = True  # 4 px, one of them under `big` which scores higher
    empty = np.zeros((10, 10), bool)
    inst, prompt_of_id = masks_to_instances(_logits([big, small, empty]), torch.tensor([0.9, 0.5, 0.99]), min_area=4)
    assert prompt_of_id.tolist() == [0]
    assert inst.max() == 1 and (inst == 1).sum() == 36


def test_no_prompts_gives_empty_map():
    inst, prompt_of_id = masks_to_instances(torch.zeros((0, 5, 7)), torch.zeros(0))
    assert inst.shape == (5, 7) and inst.max() == 0 and prompt_of_id.size == 0


def test_keep_one_region_gives_cut_off_pieces_to_the_neighbour_they_touch():
    from scripts.pipeline.instances import keep_one_region

    inst = np.array([[1, 1, 0, 2, 2],
                     [1, 2, 2, 2, 1],   # a piece of 1 inside 2's territory: goes to 2
                     [0, 0, 0, 0, 1],
                     [3, 3, 0, 0, 0],
                     [0, 1, 0, 5, 5]])  # a piece of 1 touching 3 goes to 3; 5 stays whole
    fixed = keep_one_region(inst)
    assert fixed.tolist() == [[1, 1, 0, 2, 2], [1, 2, 2, 2, 2], [0, 0, 0, 0, 2], [3, 3, 0, 0, 0], [0, 3, 0, 5, 5]]
    island = np.zeros((5, 5), np.int32)
    island[0, 0:3], island[4, 4] = 7, 7  # a piece touching nobody becomes background
    assert keep_one_region(island)[4, 4] == 0 and (keep_one_region(island)[0, 0:3] == 7).all()


def test_overlapping_masks_give_one_connected_region_per_instance():
    """Random overlapping discs and rings, resolved by predicted IoU: every id is one 4-connected region, every
    instance keeps its id, and no pixel changes except those of cut-off pieces."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    masks = []
    for _ in range(40):
        cy, cx, r = rng.uniform(0, 96), rng.uniform(0, 96), rng.uniform(4, 14)
        d = np.hypot(yy - cy, xx - cx)
        masks.append(np.where(rng.random() < 0.3, (d < r) & (d > r - 3), d < r))  # rings cut easily
    logits = torch.from_numpy(np.stack(masks)).float() * 2 - 1
    inst, kept = masks_to_instances(logits, torch.from_numpy(rng.random(40)).float())
    ids = np.unique(inst[inst > 0])
    assert ids.tolist() == list(range(1, len(kept) + 1))
    for i in ids:
        assert ndimage.label(inst == i)[1] == 1, f"instance {i} is in pieces"
