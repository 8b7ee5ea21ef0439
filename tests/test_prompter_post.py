"""Prompt decoding: background removal, clipping, mask-aided filtering and greedy point NMS on hand cases."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.prompter.decode import decode_prompts, point_nms


pytestmark = pytest.mark.usefixtures("one_thread")


BIG = 10.0  # a logit that wins the softmax outright


def outputs_for(points: list[list[float]], logits: list[list[float]], aux: torch.Tensor | None = None, size=(64, 64)):
    if aux is None:
        aux = torch.full((1, 1, *size), BIG)  # everything is nucleus
    return {"pred_points": torch.tensor([points]), "pred_logits": torch.tensor([logits]), "aux_logits": aux}


def test_background_class_score_and_order():
    # C = 2: logits (class 1, class 2, background)
    out = outputs_for([[10, 10], [30, 30], [50, 50]], [[0, 0, BIG], [1.0, 2.0, 0.0], [BIG, 0, 0]])
    (result,) = decode_prompts(out, (64, 64))
    assert result["points"].tolist() == [[50, 50], [30, 30]]  # background anchor gone, sorted by score
    assert result["classes"].tolist() == [1, 2]  # type ids 1..C
    expected = math.exp(2) / (math.exp(0) + math.exp(1) + math.exp(2))
    assert result["scores"][1].item() == pytest.approx(expected)


def test_score_threshold_and_clipping():
    out = outputs_for([[-3.0, 70.0], [20.0, 20.0]], [[BIG, 0.0], [0.2, 0.0]])
    (result,) = decode_prompts(out, (64, 64))
    assert result["points"].tolist() == [[0.0, 63.0], [20.0, 20.0]]  # clipped to [0, W-1] x [0, H-1]
    (result,) = decode_prompts(out, (64, 64), score_threshold=0.9)
    assert result["points"].tolist() == [[0.0, 63.0]]


def test_foreground_threshold_counts_the_nucleus_mass_of_all_classes():
    # C = 2; anchor 0: p = (0.3, 0.3, 0.4): background is the argmax, yet 60 % nucleus; anchor 1: (0.44, 0.1, 0.46)
    uncertain_type = [math.log(0.3), math.log(0.3), math.log(0.4)]
    split = [math.log(0.44), math.log(0.1), math.log(0.46)]
    out = outputs_for([[10.0, 10.0], [40.0, 40.0]], [uncertain_type, split])
    (result,) = decode_prompts(out, (64, 64))
    assert result["points"].tolist() == []  # argmax rule: background wins both
    (result,) = decode_prompts(out, (64, 64), foreground_threshold=0.5)
    assert result["points"].tolist() == [[40.0, 40.0], [10.0, 10.0]]  # sorted by class score 0.44, 0.3
    assert result["classes"].tolist() == [1, 1]
    assert result["scores"].tolist() == [pytest.approx(0.44), pytest.approx(0.3)]
    (result,) = decode_prompts(out, (64, 64), foreground_threshold=0.58)
    assert result["points"].tolist() == [[10.0, 10.0]]  # 0.54 < 0.58 <= 0.6


def test_mask_filter_uses_nearest_pixel_of_aux_map():
    aux = torch.full((1, 1, 32, 48), -BIG)
    aux[0, 0, 5, 7] = BIG  # only pixel (x=7, y=5) is nucleus
    out = outputs_for([[7.2, 4.8], [20.0, 20.0]], [[BIG, 0.0], [BIG, 0.0]], aux, size=(32, 48))
    (result,) = decode_prompts(out, (32, 48))
    assert result["points"].tolist() == [[pytest.approx(7.2), pytest.approx(4.8)]]
    (result,) = decode_prompts(out, (32, 48), mask_filter=False)
    assert len(result["points"]) == 2
    aux[0, 0, 20, 20] = 0.0  # sigmoid = 0.5: not > 0.5
    (result,) = decode_prompts(out, (32, 48))
    assert len(result["points"]) == 1
    (result,) = decode_prompts(out, (32, 48), mask_threshold=0.4)
    assert len(result["points"]) == 2
    with pytest.raises(ValueError, match="image_size"):
        decode_prompts(out, (32, 40))


def test_greedy_nms_is_greedy_and_strict():
    # a chain 8 px apart, scores decreasing: A suppresses B, then C (16 px from A) survives
    points = torch.tensor([[0.0, 0.0], [8.0, 0.0], [16.0, 0.0], [40.0, 0.0], [52.0, 0.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.6])
    keep = point_nms(points, scores, radius=12)
    assert keep.tolist() == [0, 2, 4, 3]  # kept by decreasing score; 40 is exactly 12 px from 52: kept (strict)
    assert point_nms(points, scores, radius=12.5).tolist() == [0, 2, 4]
    assert point_nms(points, scores, radius=17).tolist() == [0, 4]
    assert point_nms(torch.zeros(0, 2), torch.zeros(0), 12).shape == (0,)


def test_decode_with_nms_and_batch():
    logits = [[BIG, 0.0], [BIG - 1, 0.0], [BIG, 0.0]]
    out = outputs_for([[10.0, 10.0], [15.0, 10.0], [40.0, 40.0]], logits)
    out = {k: torch.cat([v, v]) for k, v in out.items()}
    results = decode_prompts(out, (64, 64))
    assert len(results) == 2
    assert sorted(map(tuple, results[0]["points"].tolist())) == [(10.0, 10.0), (40.0, 40.0)]
    assert len(decode_prompts(out, (64, 64), nms_radius=None)[1]["points"]) == 3
    assert len(decode_prompts(out, (64, 64), nms_radius=4)[1]["points"]) == 3
