"""Hungarian matching of anchors to nuclei (Eq. 3) against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from scripts.prompter.matching import AnchorMatcher, hungarian_match, match_cost


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_best(cost: torch.Tensor) -> float:
    """Smallest total cost over every injective assignment of min(A, N) pairs."""
    num_a, num_n = cost.shape
    if num_a == 0 or num_n == 0:
        return 0.0
    if num_n <= num_a:
        return min(sum(cost[a, n].item() for n, a in enumerate(perm)) for perm in itertools.permutations(range(num_a), num_n))
    return min(sum(cost[a, n].item() for a, n in enumerate(perm)) for perm in itertools.permutations(range(num_n), num_a))


def random_case(generator: torch.Generator, num_a: int, num_n: int, num_classes: int = 3):
    pred_points = torch.rand(num_a, 2, generator=generator) * 40
    pred_probs = torch.rand(num_a, num_classes + 1, generator=generator).softmax(-1)
    gt_points = torch.rand(num_n, 2, generator=generator) * 40
    gt_classes = torch.randint(0, num_classes, (num_n,), generator=generator)
    return pred_points, pred_probs, gt_points, gt_classes


@pytest.mark.parametrize("num_a", range(1, 7))
@pytest.mark.parametrize("num_n", range(0, 5))
def test_matches_brute_force(num_a, num_n):
    generator = torch.Generator().manual_seed(100 * num_a + num_n)
    for _ in range(3):
        case = random_case(generator, num_a, num_n)
        anchor_idx, gt_idx = hungarian_match(*case, alpha=0.1)
        assert len(anchor_idx) == len(gt_idx) == min(num_a, num_n)
        assert anchor_idx.dtype == gt_idx.dtype == torch.long
        assert len(set(anchor_idx.tolist())) == len(anchor_idx) and len(set(gt_idx.tolist())) == len(gt_idx)
        cost = match_cost(*case, alpha=0.1)
        total = cost[anchor_idx, gt_idx].sum().item() if len(anchor_idx) else 0.0
        assert total == pytest.approx(brute_force_best(cost), abs=1e-9)


def test_cost_is_eq3_by_hand():
    pred_points = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pred_probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    gt_points = torch.tensor([[3.0, 4.0]])
    gt_classes = torch.tensor([1])
    cost = match_cost(pred_points, pred_probs, gt_points, gt_classes, alpha=0.1)
    expected = torch.tensor([[0.1 * 5 - 0.2], [0.1 * (49 + 16) ** 0.5 - 0.6]], dtype=torch.float64)
    torch.testing.assert_close(cost, expected)


def test_class_probability_can_outweigh_distance():
    """The nearer anchor believes in the wrong class: with alpha = 0.1 the farther, confident one wins;
    with a large alpha distance dominates."""
    pred_points = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    pred_probs = torch.tensor([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]])
    gt_points, gt_classes = torch.tensor([[0.5, 0.0]]), torch.tensor([0])
    assert hungarian_match(pred_points, pred_probs, gt_points, gt_classes, alpha=0.1)[0].tolist() == [1]
    assert hungarian_match(pred_points, pred_probs, gt_points, gt_classes, alpha=10.0)[0].tolist() == [0]


def test_empty_and_more_nuclei_than_anchors():
    anchor_idx, gt_idx = hungarian_match(torch.rand(4, 2), torch.rand(4, 3).softmax(-1), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert anchor_idx.shape == gt_idx.shape == (0,)
    # two anchors, three nuclei: every anchor is matched, the far nucleus is left out
    pred_points = torch.tensor([[0.0, 0.0], [20.0, 0.0]])
    probs = torch.full((2, 2), 0.5)
    gt_points = torch.tensor([[1.0, 0.0], [100.0, 0.0], [19.0, 0.0]])
    anchor_idx, gt_idx = hungarian_match(pred_points, probs, gt_points, torch.zeros(3, dtype=torch.long))
    assert anchor_idx.tolist() == [0, 1] and gt_idx.tolist() == [0, 2]


def test_bad_classes_raise():
    with pytest.raises(ValueError, match="gt_classes"):
        hungarian_match(torch.rand(3, 2), torch.rand(3, 3).softmax(-1), torch.rand(1, 2), torch.tensor([2]))


def test_anchor_matcher_batch_without_grad():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=generator, requires_grad=True)
    points = (torch.rand(2, 5, 2, generator=generator) * 30).requires_grad_()
    gt_points = [torch.rand(3, 2, generator=generator) * 30, torch.zeros(0, 2)]
    gt_classes = [torch.tensor([0, 2, 1]), torch.zeros(0, dtype=torch.long)]
    matches = AnchorMatcher(alpha=0.1)({"pred_points": points, "pred_logits": logits}, gt_points, gt_classes)
    assert len(matches) == 2 and len(matches[0][0]) == 3 and len(matches[1][0]) == 0
    expected = hungarian_match(points[0].detach(), logits[0].detach().softmax(-1), gt_points[0], gt_classes[0])
    assert matches[0][0].tolist() == expected[0].tolist() and matches[0][1].tolist() == expected[1].tolist()
    assert not matches[0][0].requires_grad
    with pytest.raises(ValueError, match="batch"):
        AnchorMatcher()({"pred_points": points, "pred_logits": logits}, gt_points[:1], gt_classes[:1])


def test_unknown_class_costs_the_foreground_probability():
    """A nucleus of unknown class (-1, untyped data mixed with typed) is matched on 1 - p(background)."""
    pred_points = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pred_probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    cost = match_cost(pred_points, pred_probs, torch.tensor([[3.0, 4.0], [10.0, 0.0]]), torch.tensor([-1, 0]), alpha=0.1)
    expected = torch.tensor(
        [[0.1 * 5 - 0.9, 0.1 * 10 - 0.7], [0.1 * (49 + 16) ** 0.5 - 0.4, 0.0 - 0.1]], dtype=torch.float64
    )
    torch.testing.assert_close(cost, expected)
    with pytest.raises(ValueError, match="unknown class"):
        hungarian_match(pred_points, pred_probs, torch.rand(1, 2), torch.tensor([-2]))
