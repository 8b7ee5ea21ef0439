"""Prompter test-time augmentation: the dihedral views, their inverses, the pooling of the views' points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.prompter.net import Prompter
from scripts.prompter.decode import decode_prompts
from scripts.prompter.tta import dihedral_view, pool_view_points, prompts_tta, undo_view_points


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompter() -> Prompter:
    torch.manual_seed(0)
    net = Prompter(num_classes=4, backbone="resnet_small", levels=(2, 3, 4), anchor_step=8, fpn_channels=32,
                   mlp_hidden=32).eval()
    with torch.no_grad():  # offsets and logits of a few px / units, so that views disagree as a trained net's do
        for head in (net.offset_head, net.class_head):
            head.layers[-1].weight.normal_(0, 0.5)
    return net


def image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, height, width, generator=generator) * 255


@pytest.mark.parametrize("k", range(8))
def test_views_and_their_inverses(k):
    """A marked pixel (x = 7, y = 2) of a 6 x 10 image is found back at (7, 2) from every view."""
    marked = torch.zeros(1, 6, 10)
    marked[0, 2, 7] = 1
    view = dihedral_view(marked, k)
    assert view.shape[-2:] == ((6, 10) if k % 2 == 0 else (10, 6))
    row, col = (view[0] == 1).nonzero()[0].tolist()
    assert undo_view_points(torch.tensor([[float(col), float(row)]]), k, 6, 10).tolist() == [[7.0, 2.0]]


def test_pooling_keeps_nuclei_found_in_enough_views():
    """Nucleus A is found in 5 of 8 views (view 1 twice), B in 2: with min_views 4 only A is kept."""
    a = [[10, 10], [11, 10], [10, 11], [9, 10], [10, 9], [14, 10]]
    b = [[40, 40], [41, 40]]
    points = torch.tensor(a + b, dtype=torch.float32)
    views = torch.tensor([0, 1, 2, 3, 4, 1, 0, 5])
    classes = torch.tensor([2, 2, 3, 2, 3, 1, 1, 1])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.9, 0.5, 0.95, 0.9])
    pooled = pool_view_points(points, classes, scores, views, num_views=8, radius=6.0, min_views=4)
    assert pooled["points"].tolist() == [[10.0, 10.0]]  # the mean of the 5 nearest (view 1's far point left out)
    assert pooled["classes"].tolist() == [2]  # class 2: 0.9 + 0.8 + 0.6 against class 3: 0.7 + 0.9
    assert pooled["scores"].tolist() == [pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 0.9) / 8)]
    both = pool_view_points(points, classes, scores, views, num_views=8, radius=6.0, min_views=2)
    assert both["points"].tolist() == [[10.0, 10.0], [40.5, 40.0]]  # by decreasing score: A 3.9 / 8, B 1.85 / 8
    with pytest.raises(ValueError, match="min_views"):
        prompts_tta(nn.Identity(), torch.zeros(1, 3, 8, 8), min_views=9)
DECODE = {"mask_filter": False, "nms_radius": 12}


def test_identity_view_alone_is_the_plain_prompter(prompter):
    picture = image(64, 96)
    with torch.no_grad():
        plain = decode_prompts(prompter(picture), (64, 96), **DECODE)[0]
    one = prompts_tta(prompter, picture, views=(0,), min_views=1, **DECODE)
    assert len(plain["points"]) > 3
    for key in ("points", "classes", "scores"):
        torch.testing.assert_close(one[key], plain[key])


def test_prompts_turn_with_the_image(prompter):
    """Pooled over all 8 views, the prompts of a quarter-turned image are the image's prompts turned; the
    network's own prompts are not."""
    picture = image(64, 96)
    turned = dihedral_view(picture, 1)

    def mismatch(a: dict, b: dict) -> float:
        """Largest distance (px) from a point of ``b``, mapped back from the turned view, to its nearest in ``a``."""
        back = undo_view_points(b["points"], 1, 64, 96)
        distances = torch.cdist(back, a["points"], compute_mode="donot_use_mm_for_euclid_dist")  # exact, not mm
        return float(distances.min(1).values.max())

    tta_a = prompts_tta(prompter, picture, min_views=2, **DECODE)
    tta_b = prompts_tta(prompter, turned, min_views=2, **DECODE)
    assert len(tta_a["points"]) == len(tta_b["points"]) > 3
    assert mismatch(tta_a, tta_b) < 1e-3
    torch.testing.assert_close(tta_a["scores"], tta_b["scores"])
    assert torch.equal(tta_a["classes"], tta_b["classes"])
    with torch.no_grad():
        plain_a, plain_b = (decode_prompts(prompter(x), tuple(x.shape[-2:]), **DECODE)[0] for x in (picture, turned))
    assert mismatch(plain_a, plain_b) > 0.5  # the test can tell


def test_pipeline_option_runs_the_views(prompter, monkeypatch):
    """``PromptNucSeg(prompter_tta=True)`` calls the prompter once per view shape (2 batches of 4 views), on an
    image whose sides are not multiples of the anchor step, and its points lie in the image."""
    calls = []
    original = prompter.forward
    monkeypatch.setattr(prompter, "forward", lambda x, **kw: calls.append(tuple(x.shape)) or original(x, **kw))
    prompts = PromptNucSeg(prompter, nn.Identity(), prompter_tta=True, mask_filter=False).find_prompts(
        image(100, 90)[0])
    assert calls == [(4, 3, 100, 90), (4, 3, 90, 100)]
    points = prompts["points"]
    assert len(points) > 0 and (points >= 0).all() and (points[:, 0] <= 89).all() and (points[:, 1] <= 99).all()
    calls.clear()
    PromptNucSeg(prompter, nn.Identity(), mask_filter=False).find_prompts(image(100, 90)[0])
    assert calls == [(1, 3, 100, 90)]
