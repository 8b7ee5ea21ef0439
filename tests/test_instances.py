"""Masks to an instance map: overlaps go to the higher predicted IoU, small fragments are dropped."""

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
