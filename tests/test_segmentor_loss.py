"""Segmentor loss (paper Eq. 2) on hand-computed cases, its rebalancing options and the detached IoU target."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from scripts.segmentor.loss import SegmentorLoss, box_windows, mask_boxes, mask_iou


def _tiny_case(logit: float = -2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 1:3] = 1  # 2 foreground pixels of 16
    logits = torch.full((1, 1, 4, 4), logit)
    return logits, torch.full((1, 1), 0.3), target


def test_all_background_by_hand() -> None:
    logits, iou_pred, target = _tiny_case(-2.0)
    p = 1 / (1 + math.exp(2.0))
    fg = 0.25 * (1 - p) ** 2 * -math.log(p)
    bg = 0.75 * p**2 * -math.log(1 - p)
    focal = (2 * fg + 14 * bg) / 16
    dice = 1 - (2 * 2 * p + 1) / (16 * p + 2 + 1)
    iou = (0.3 - 0.0) ** 2  # nothing predicted: actual IoU 0
    out = SegmentorLoss()(logits, iou_pred, target)
    assert out["mask"].item() == pytest.approx(focal, rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert out["iou"].item() == pytest.approx(iou, rel=1e-5)
    assert out["loss"].item() == pytest.approx(20 * focal + dice + iou, rel=1e-5)
    assert out["iou_actual"].item() == 0


def test_bce_and_balanced_by_hand() -> None:
    logits, iou_pred, target = _tiny_case(-2.0)
    p = 1 / (1 + math.exp(2.0))
    fg, bg = 3 * -math.log(p), -math.log(1 - p)
    out = SegmentorLoss(mask_loss="bce", bce_pos_weight=3.0)(logits, iou_pred, target)
    assert out["mask"].item() == pytest.approx((2 * fg + 14 * bg) / 16, rel=1e-5)
    out = SegmentorLoss(mask_loss="bce", bce_pos_weight=3.0, mask_reduction="balanced")(logits, iou_pred, target)
    assert out["mask"].item() == pytest.approx(0.5 * (fg + bg), rel=1e-5)


def test_perfect_prediction_is_near_zero() -> None:
    target = torch.zeros(2, 3, 32, 32)
    target[0, 0, 4:9, 4:9] = 1
    target[0, 1, 10:20, 3:6] = 1
    target[1, 2, 25:30, 25:31] = 1
    target[1, 0, 0:3, 0:3] = 1
    target[0, 2, 12, 12] = 1
    target[1, 1, 30:, 30:] = 1
    logits = (target * 2 - 1) * 30
    iou_pred = torch.ones(2, 3)
    for kw in ({}, {"mask_loss": "bce", "bce_pos_weight": 10.0}, {"mask_reduction": "balanced", "crop_to_box": True}):
        out = SegmentorLoss(**kw)(logits, iou_pred, target)
        assert out["mask"].item() < 1e-8 and out["dice"].item() < 1e-6 and out["iou"].item() == 0
        assert out["iou_actual"].item() == 1


def test_focal_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 16, generator=g) * 3
    target = (torch.rand(3, 16, 16, generator=g) > 0.8).float()
    out = SegmentorLoss()(logits, torch.zeros(3), target)
    want = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2, reduction="mean")
    assert out["mask"].item() == pytest.approx(want.item(), rel=1e-5)


def test_crop_to_box_window_and_outside_term() -> None:
    target = torch.zeros(1, 8, 8)
    target[0, 1:3, 1:3] = 1
    np_box = mask_boxes(target)
    assert np_box.tolist() == [[1, 1, 2, 2]]
    win = box_windows(target, 1)
    assert win[0, :4, :4].all() and win.sum() == 16
    logits = torch.full((1, 8, 8), -2.0)
    p = 1 / (1 + math.exp(2.0))
    fg, bg = -math.log(p), -math.log(1 - p)
    loss = SegmentorLoss(mask_loss="bce", crop_to_box=True, box_margin=1, outside_weight=0.5)
    out = loss(logits, torch.zeros(1), target)
    assert out["mask"].item() == pytest.approx((4 * fg + 12 * bg) / 16 + 0.5 * bg, rel=1e-5)
    # with outside_weight 0 the pixel term ignores the prediction outside the window (dice still sees it)
    loss0 = SegmentorLoss(mask_loss="bce", crop_to_box=True, box_margin=1, outside_weight=0.0)
    far = logits.clone()
    far[0, 6:, 6:] = 5.0
    a, b = loss0(logits, torch.zeros(1), target), loss0(far, torch.zeros(1), target)
    assert a["mask"].item() == pytest.approx(b["mask"].item()) and b["dice"] > a["dice"]
    empty = torch.zeros(1, 8, 8)
    assert box_windows(empty, 0).all()


def test_iou_target_is_detached() -> None:
    logits, _, target = _tiny_case(0.0)
    logits = logits.clone().requires_grad_()
    logits.data[0, 0, 1, 1] = 1.0  # predicts 1 of the 2 foreground pixels: actual IoU 0.5
    iou_pred = torch.full((1, 1), 0.8, requires_grad=True)
    out = SegmentorLoss(focal_weight=0.0, dice_weight=0.0, iou_weight=1.0)(logits, iou_pred, target)
    out["loss"].backward()
    assert out["iou_actual"].item() == pytest.approx(0.5)
    assert logits.grad is None or (logits.grad == 0).all()
    assert iou_pred.grad.item() == pytest.approx(2 * (0.8 - 0.5))


def test_invalid_prompts_ignored_and_low_res_upsampled() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.zeros(1, 3, 16, 16)
    target[0, 0, 2:6, 2:6] = 1
    target[0, 1, 8:12, 9:14] = 1
    logits = torch.randn(1, 3, 16, 16, generator=g)
    iou_pred = torch.rand(1, 3, generator=g)
    valid = torch.tensor([[True, True, False]])
    loss = SegmentorLoss()
    ref = loss(logits[:, :2], iou_pred[:, :2], target[:, :2])
    garbage = logits.clone()
    garbage[0, 2] = 1e4
    out = loss(garbage, iou_pred, target, valid)
    for k in ref:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-6)
    none = loss(logits.requires_grad_(), iou_pred, target, torch.zeros(1, 3, dtype=torch.bool))
    none["loss"].backward()
    assert none["loss"].item() == 0 and (logits.grad == 0).all()
    low = torch.randn(1, 2, 4, 4, generator=g)
    out = loss(low, iou_pred[:, :2], target[:, :2])
    up = torch.nn.functional.interpolate(low, (16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["loss"], loss(up, iou_pred[:, :2], target[:, :2])["loss"])


def test_mask_iou_and_bad_options() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2], b[0, 1:3] = True, True
    torch.testing.assert_close(mask_iou(a, b), torch.tensor([1 / 3, 0.0]))
    with pytest.raises(ValueError, match="mask_loss"):
        SegmentorLoss(mask_loss="l2")
    with pytest.raises(ValueError, match="mask_reduction"):
        SegmentorLoss(mask_reduction="sum")


def test_objective_crops_each_target_to_its_decoding_window() -> None:
    """With windowed decoding the training objective scores each mask against its target cropped to the same
    window (x, y origins in px), not against the tile."""
    from scripts.training.engine import SegmentorObjective

    loss = SegmentorLoss(mask_loss="bce", mask_reduction="balanced", focal_weight=1.0)
    target = torch.zeros(1, 2, 16, 16)
    target[0, 0, 9:12, 5:8] = 1  # nucleus 0 at rows 9-11, cols 5-7
    target[0, 1, 0:3, 0:3] = 1
    origins = torch.tensor([[[4, 8], [0, 0]]])  # (B, Z, 2) (x, y) px
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, 1:4, 1:4] = 5.0  # window 0 starts at (x 4, y 8): the nucleus sits at rows 1-3, cols 1-3
    logits[0, 1, 0:3, 0:3] = 5.0
    pred = {"mask_logits": logits, "iou_pred": torch.ones(1, 2), "window_origins": origins}
    terms = SegmentorObjective(loss).terms(pred, {"masks": target, "valid": torch.ones(1, 2, dtype=torch.bool)})
    assert terms["iou_actual"].item() == 1.0 and terms["iou"].item() == 0.0
    shifted = dict(pred, window_origins=torch.tensor([[[0, 0], [0, 0]]]))
    wrong = SegmentorObjective(loss).terms(shifted, {"masks": target, "valid": torch.ones(1, 2, dtype=torch.bool)})
    assert wrong["iou_actual"].item() == 0.5  # prompt 0 now misses its nucleus
