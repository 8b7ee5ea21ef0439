"""Prompter loss (Eq. 4-6) on hand-computed cases, and a tiny overfit run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.prompter.loss import PrompterLoss


pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def focal(logit: float, target: float, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target == 1 else 1 - p
    return -((1 - p_t) ** gamma) * math.log(p_t)


def test_hand_case_single_image():
    """Two anchors, one nucleus of class 0 (C = 1). Anchor 0 is near and confident: it is matched."""
    outputs = {
        "pred_points": torch.tensor([[[10.0, 10.0], [30.0, 30.0]]], requires_grad=True),
        "pred_logits": torch.tensor([[[2.0, 0.0], [0.0, 1.0]]], requires_grad=True),
        "aux_logits": torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]]], requires_grad=True),
    }
    gt_points, gt_classes = [torch.tensor([[12.0, 10.0]])], [torch.tensor([0])]
    mask = torch.tensor([[[[1, 0], [0, 1]]]])
    loss = PrompterLoss(bg_weight=0.4, reg_weight=5e-3, aux_weight=1.0)(outputs, gt_points, gt_classes, mask)

    ce_matched = -math.log(softmax([2.0, 0.0])[0])  # target class 0
    ce_background = -math.log(softmax([0.0, 1.0])[1])  # unmatched: target background, weight 0.4
    expected_cls = (1.0 * ce_matched + 0.4 * ce_background) / (1.0 + 0.4)
    expected_reg = 5e-3 * ((10 - 12) ** 2 + 0**2) / 1
    expected_aux = (focal(0.0, 1) + focal(1.0, 0) + focal(-2.0, 0) + focal(3.0, 1)) / 4
    assert loss["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert loss["loss_reg"].item() == pytest.approx(expected_reg, rel=1e-5)
    assert loss["loss_aux"].item() == pytest.approx(expected_aux, rel=1e-5)
    assert loss["loss"].item() == pytest.approx(expected_cls + expected_reg + expected_aux, rel=1e-5)
    assert loss["num_matched"].item() == 1
    loss["loss"].backward()
    assert outputs["pred_points"].grad[0, 1].abs().sum() == 0  # unmatched points get no regression gradient
    assert outputs["pred_points"].grad[0, 0, 0].item() == pytest.approx(5e-3 * 2 * (10 - 12))


def test_hand_case_batch_with_empty_image_and_more_nuclei_than_anchors():
    """Image 0: one anchor, two nuclei (one is left unmatched but still counts in N). Image 1: no nuclei.
    The CE is a weighted mean over all anchors of the batch; the regression divides by all N = 2 points."""
    outputs = {
        "pred_points": torch.tensor([[[0.0, 0.0]], [[5.0, 5.0]]]),
        "pred_logits": torch.tensor([[[0.5, -0.5, 0.0]], [[0.0, 0.0, 1.5]]]),  # C = 2
        "aux_logits": torch.zeros(2, 1, 1, 1),
    }
    gt_points = [torch.tensor([[3.0, 4.0], [50.0, 50.0]]), torch.zeros(0, 2)]
    gt_classes = [torch.tensor([1, 0]), torch.zeros(0, dtype=torch.long)]
    mask = torch.zeros(2, 1, 1, 1)
    loss = PrompterLoss(bg_weight=0.25, reg_weight=1.0, aux_weight=0.5)(outputs, gt_points, gt_classes, mask)

    # Image 0 anchor: cost to nucleus 0 = 0.1*5 - p(1), to nucleus 1 = 0.1*70.7 - p(0): nucleus 0 wins.
    ce_0 = -math.log(softmax([0.5, -0.5, 0.0])[1])
    ce_1 = -math.log(softmax([0.0, 0.0, 1.5])[2])
    assert loss["loss_cls"].item() == pytest.approx((ce_0 + 0.25 * ce_1) / 1.25, rel=1e-5)
    assert loss["loss_reg"].item() == pytest.approx((3**2 + 4**2) / 2, rel=1e-5)
    assert loss["loss_aux"].item() == pytest.approx(0.5 * focal(0.0, 0), rel=1e-5)


def test_unknown_class_targets_any_foreground_class():
    """An untyped nucleus (class -1) in a typed batch: its anchor's term is -log(1 - p(background)), weight 1."""
    outputs = {
        "pred_points": torch.tensor([[[10.0, 10.0], [30.0, 30.0]]]),
        "pred_logits": torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]]]),  # C = 2
        "aux_logits": torch.zeros(1, 1, 1, 1),
    }
    loss = PrompterLoss(bg_weight=0.4)(outputs, [torch.tensor([[11.0, 10.0]])], [torch.tensor([-1])], torch.zeros(1, 1, 1, 1))
    p0 = softmax([1.0, 0.5, 0.0])
    ce_unknown = -math.log(p0[0] + p0[1])
    ce_background = -math.log(softmax([0.0, 0.0, 2.0])[2])
    assert loss["loss_cls"].item() == pytest.approx((ce_unknown + 0.4 * ce_background) / 1.4, rel=1e-5)
    assert loss["num_matched"].item() == 1


def test_input_errors():
    outputs = {"pred_points": torch.zeros(1, 2, 2), "pred_logits": torch.zeros(1, 2, 2), "aux_logits": torch.zeros(1, 1, 4, 4)}
    with pytest.raises(ValueError, match="fg_mask"):
        PrompterLoss()(outputs, [torch.zeros(0, 2)], [torch.zeros(0, dtype=torch.long)], torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="gt_classes"):
        PrompterLoss()(outputs, [torch.zeros(1, 2)], [torch.tensor([1])], torch.zeros(1, 1, 4, 4))


def disks_image(size: int = 64, centres=((16, 16), (40, 20), (24, 44), (48, 48)), radius: int = 5):
    """RGB image (1, 3, H, W) in [0, 255] with dark disks on a pink background, their points and mask."""
    rows, cols = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for x, y in centres:
        mask |= (cols - x) ** 2 + (rows - y) ** 2 <= radius**2
    image = np.where(mask[None], np.array([80.0, 40, 120])[:, None, None], np.array([230.0, 180, 210])[:, None, None])
    points = torch.tensor(centres, dtype=torch.float32)
    return torch.from_numpy(image).float()[None], points, torch.from_numpy(mask)[None, None].float()


@pytest.mark.slow
def test_tiny_overfit_loss_drops():
    from scripts.prompter.net import Prompter

    torch.manual_seed(0)
    net = Prompter(num_classes=1, backbone="resnet_small", fpn_channels=32, mlp_hidden=32, anchor_step=8)
    image, points, mask = disks_image()
    criterion = PrompterLoss()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        losses = criterion(net(image), [points], [torch.zeros(len(points), dtype=torch.long)], mask)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["loss_cls"] < first["loss_cls"] and last["loss_aux"] < first["loss_aux"]
    assert last["loss_reg"] < first["loss_reg"]  # the refined points moved towards the disk centres
