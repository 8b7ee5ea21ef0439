"""``input_scale auto``: the scale of an image from its resolution metadata or its nuclei (scripts.pipeline.scale).

The rule is tested on a stub pipeline whose nuclei and predicted IoUs are set by the test; the shipped model decides
on real held-out images at 40x and 20x (the dataset test at the end).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.pipeline.options import PipelineOptions
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.scale import NUCLEUS_AREA, ScaleRule, candidate_scale, median_area, scale_from_mpp


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (" AUTO ", "auto"), (2, 2.0), ("0.5", 0.5)])
def test_input_scale_takes_auto_or_a_number(value, expected):
    assert PipelineOptions(input_scale=value).input_scale == expected
    assert PipelineOptions().input_scale == "auto"  # the default


@pytest.mark.parametrize("value", ["false", "False", 0, "0", "autoo", "", None, True, 20])
def test_input_scale_refuses_anything_else_naming_it(value):
    with pytest.raises(ValueError, match="input_scale"):
        PipelineOptions(input_scale=value)


def test_scale_from_mpp_and_candidates():
    assert scale_from_mpp(0.5, 0.25) == 2.0
    assert scale_from_mpp(0.2527, 0.25) == 1.0  # within tolerance: no resampling
    assert scale_from_mpp(0.125, 0.25) == 0.5
    rule = ScaleRule()
    assert candidate_scale(0.5 * NUCLEUS_AREA, 40, NUCLEUS_AREA, rule) == 2.0
    assert candidate_scale(2.0 * NUCLEUS_AREA, 40, NUCLEUS_AREA, rule) is None
    assert candidate_scale(5.0 * NUCLEUS_AREA, 40, NUCLEUS_AREA, rule) == 0.5
    assert candidate_scale(0.5 * NUCLEUS_AREA, rule.min_nuclei - 1, NUCLEUS_AREA, rule) is None  # too few to tell
    inst = torch.zeros(20, 20, dtype=torch.int32)
    inst[:2, :2], inst[5:10, 5:10], inst[12:15, 12:15] = 1, 3, 4  # areas 4, 25, 9 (id 2 absent)
    assert median_area(inst) == (9.0, 3)


class StubPipeline(PromptNucSeg):
    """Finds a grid of square nuclei of ``side`` px (at the resolution it runs at); the predicted IoU of a prompt
    decoded at scale s (the size it runs at over the input's) is ``iou_at[s]``."""

    def __init__(self, side: int, iou_at: dict[float, float], size: int, **options):
        super().__init__(nn.Identity(), nn.Identity(), **options)
        self.side, self.iou_at, self.size, self.runs, self.checked = side, iou_at, size, [], []

    def forward(self, image, *args, **kwargs):
        self.size = image.shape[-2]  # the scale of a run is its size over the input's
        return super().forward(image, *args, **kwargs)

    def _run(self, image, prompts):
        height, width = image.shape[-2:]
        self.runs.append((height, width))
        inst = torch.zeros(height, width, dtype=torch.int32)
        points, step, side = [], 2 * self.side, self.side
        for y in range(0, height - side + 1, step):
            for x in range(0, width - side + 1, step):
                points.append([x + side / 2, y + side / 2])
                inst[y : y + side, x : x + side] = len(points)
        n = len(points)
        scale = height / self.size
        return {"inst_map": inst, "type_map": inst.clamp(max=1), "points": torch.tensor(points).reshape(-1, 2),
                "classes": torch.ones(n, dtype=torch.long), "scores": torch.ones(n),
                "ious": torch.full((n,), self.iou_at[round(scale, 2)])}

    def _ious_at(self, image, points, rows, scale):
        self.checked.append(scale)
        return torch.full((len(rows),), self.iou_at[round(scale, 2)])


def test_auto_takes_the_candidate_scale_only_when_the_segmentor_is_surer_there():
    small = int((0.4 * NUCLEUS_AREA) ** 0.5)  # nuclei of a 20x image for a 40x model
    surer = StubPipeline(small, {1.0: 0.60, 2.0: 0.70}, 200)
    out = surer(torch.rand(3, 200, 200) * 255)
    assert surer.checked == [2.0] and surer.runs == [(200, 200), (400, 400)]
    assert (out["scale"].scale, out["scale"].source, out["scale"].mpp) == (2.0, "nuclei", 0.125)
    assert out["inst_map"].shape == (200, 200)
    smallish = int((0.8 * NUCLEUS_AREA) ** 0.5)  # small for 40x, not rare
    unsure = StubPipeline(smallish, {1.0: 0.60, 2.0: 0.615}, 200)  # within the margin: stays
    out = unsure(torch.rand(3, 200, 200) * 255)
    assert unsure.checked == [2.0] and unsure.runs == [(200, 200)]
    assert (out["scale"].scale, out["scale"].source) == (1.0, "default")
    tiny = StubPipeline(small, {1.0: 0.60, 2.0: 0.605}, 200)  # nuclei rare at 40x: any gain at 2 decides
    assert tiny(torch.rand(3, 200, 200) * 255)["scale"].scale == 2.0
    worse = StubPipeline(small, {1.0: 0.60, 2.0: 0.59}, 200)
    assert worse(torch.rand(3, 200, 200) * 255)["scale"].scale == 1.0
    usual = StubPipeline(int((1.5 * NUCLEUS_AREA) ** 0.5), {1.0: 0.6, 2.0: 0.9}, 200)  # nuclei as in training
    assert usual(torch.rand(3, 200, 200) * 255)["scale"].scale == 1.0 and usual.checked == []  # nothing tried
    large = StubPipeline(int((4 * NUCLEUS_AREA) ** 0.5), {1.0: 0.6, 0.5: 0.7}, 400)  # an 80x image
    out = large(torch.rand(3, 400, 400) * 255)
    assert large.checked == [0.5] and out["scale"].scale == 0.5 and large.runs[-1] == (200, 200)


class NoisyGainStub(StubPipeline):
    """A stub whose nuclei gain ``gains[i]`` in predicted IoU when decoded again at the candidate scale."""

    def __init__(self, gains: torch.Tensor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gains, self.sampled = gains, []

    def _ious_at(self, image, points, rows, scale):
        self.sampled.append(rows)
        return super()._ious_at(image, points, rows, scale) + self.gains[rows]


def test_a_dense_image_decides_on_the_mean_gain_of_many_nuclei():
    """One nucleus's gain varies by about 0.085 on real images: a dense image's verdict must rest on enough of its
    nuclei (spread over all of them) that it is the verdict of their true mean, for any draw of the gains."""
    rule = ScaleRule()
    smallish = int((0.8 * NUCLEUS_AREA) ** 0.5)  # small for 40x, not rare: the margin applies
    size = 25 * 2 * smallish  # a 25 x 25 grid: 625 nuclei
    verdicts = []
    for seed in range(20):
        gains = torch.normal(rule.margin + 0.015, 0.085, (625,), generator=torch.Generator().manual_seed(seed))
        gains += rule.margin + 0.015 - gains.mean()  # their mean: 0.015 above the margin
        stub = NoisyGainStub(gains, smallish, {1.0: 0.6, 2.0: 0.6}, size)
        verdicts.append(stub(torch.rand(3, size, size) * 255)["scale"].scale)
        rows = stub.sampled[0]
        assert len(rows) == rule.sample and rows[0] == 0 and rows[-1] == 624  # spread over every nucleus
    assert verdicts == [2.0] * 20


def test_an_image_with_few_nuclei_follows_its_run():
    """Sparse tiles cannot tell alone: they follow the evidence of the images of the run checked before them."""
    small = int((0.8 * NUCLEUS_AREA) ** 0.5)
    run = StubPipeline(small, {1.0: 0.60, 2.0: 0.64}, 100)  # gain 0.04: under an image's own margin
    dense, sparse = torch.rand(3, 200, 200) * 255, torch.rand(3, 100, 100) * 255
    assert run(sparse)["scale"].scale == 1.0  # no evidence yet: alone (9 nuclei), gain under the margin
    assert run(dense)["scale"].scale == 1.0  # 36 nuclei: decides alone
    out = run(sparse)  # the run now holds 45 nuclei at a mean gain of 0.04 > run_margin
    assert (out["scale"].scale, out["scale"].source) == (2.0, "nuclei")
    few = StubPipeline(int((8 * NUCLEUS_AREA) ** 0.5), {1.0: 0.6, 2.0: 0.7}, 100)  # 1 nucleus, nothing to follow
    assert few(torch.rand(3, 100, 100) * 255)["scale"].scale == 1.0 and few.checked == []
    few.run_evidence.add(2.0, 0.08, 100)  # a run of 20x tiles
    assert few(torch.rand(3, 100, 100) * 255)["scale"].scale == 2.0


def test_a_run_of_tiles_settles_and_spot_checks():
    """Once the last checked tiles each reached the run's verdict alone, a tile follows the run without its own
    check, except every ``check_every``-th; a tile that disagrees unsettles the run; a large image always checks."""
    rule = ScaleRule()
    small = int((0.4 * NUCLEUS_AREA) ** 0.5)  # 20x tiles: clearly surer at scale 2
    run = StubPipeline(small, {1.0: 0.60, 2.0: 0.70}, 100)
    tile = torch.rand(3, 100, 100) * 255  # 36 nuclei: a tile (at most follow_nuclei)
    scales = [run(tile)["scale"].scale for _ in range(20)]
    assert scales == [2.0] * 20
    checks = len(run.checked)
    # settled after settle_images agreeing checks; then one check in every check_every tiles
    assert checks == rule.settle_images + (20 - rule.settle_images) // rule.check_every, run.checked
    assert run.checked == [2.0] * checks
    big = torch.rand(3, 200, 200) * 255  # 100 nuclei: more than follow_nuclei, checks itself
    before = len(run.checked)
    run(big)
    run(big)
    assert len(run.checked) == before + 2
    # the source changes: the next tiles' own checks say 40x (gain -0.05); the first spot check unsettles the run
    run.iou_at = {1.0: 0.60, 2.0: 0.55}
    for _ in range(rule.check_every):
        run(tile)
    assert run.run_evidence.agreeing[2.0] == 0
    before = len(run.checked)
    run(tile)
    assert len(run.checked) == before + 1  # checked again until it settles anew


def test_run_evidence_follows_only_a_settled_verdict():
    from scripts.pipeline.scale import RunEvidence

    rule, evidence = ScaleRule(), RunEvidence()
    assert evidence.follow(2.0, 30, rule) is None  # no evidence
    for _ in range(rule.settle_images):
        evidence.add(2.0, -0.1, rule.run_nuclei, False, rule)
    assert evidence.follow(2.0, 30, rule) is False and evidence.follow(0.5, 30, rule) is None  # per candidate
    assert evidence.follow(2.0, rule.follow_nuclei + 1, rule) is None  # not a tile
    for _ in range(rule.check_every - 2):
        assert evidence.follow(2.0, 30, rule) is False
    assert evidence.follow(2.0, 30, rule) is None  # a spot check is due
    evidence.add(2.0, 0.9, 16, True, rule)  # it disagrees with the run (still "stay" on the whole)
    assert evidence.verdict(2.0, rule) is False and evidence.follow(2.0, 30, rule) is None


def test_a_given_scale_wins_and_metadata_comes_before_the_nuclei():
    small = int((0.4 * NUCLEUS_AREA) ** 0.5)
    given = StubPipeline(small, {1.0: 0.6, 2.0: 0.9}, 100, input_scale=1)
    out = given(torch.rand(3, 100, 100) * 255)
    assert given.checked == [] and (out["scale"].scale, out["scale"].source) == (1.0, "given")
    metadata = StubPipeline(small // 2, {1.0: 0.6, 2.0: 0.7, 4.0: 0.6}, 100)
    out = metadata(torch.rand(3, 100, 100) * 255, mpp=0.5)  # a 20x image that says so
    choice = out["scale"]
    assert (choice.scale, choice.source, choice.mpp, choice.note) == (2.0, "metadata", 0.5, "")
    assert metadata.runs[0] == (200, 200)
    wrong = StubPipeline(small, {1.0: 0.6, 2.0: 0.7}, 100)  # says 40x, nuclei say 20x: metadata kept, noted
    choice = wrong(torch.rand(3, 100, 100) * 255, mpp=0.25)["scale"]
    assert (choice.scale, choice.source) == (1.0, "metadata") and "metadata" in choice.note
    assert wrong.checked == [2.0]


@pytest.mark.slow
def test_shipped_model_finds_the_scale_of_held_out_images(shared_data):
    """The shipped model on held-out MoNuSeg images: at 40x it stays at 1, at 20x (resampled) it takes 2, with
    nearly the PQ of the image told its scale."""
    from scripts.evaluation.metrics import panoptic_quality
    from scripts.evaluation.scoring import list_dataset
    from scripts.inference import image_tensor
    from scripts.pipeline.model_file import load_model

    from conftest import BUNDLE_ROOT

    network = load_model(str(BUNDLE_ROOT / "models" / "model.pt"))
    name = "TCGA-21-5786-01Z-00-DX1"  # in the default validation split
    at40 = list_dataset(str(shared_data / "monuseg_train"), subset="val", images=name)[0].load()
    crop = at40.image[:512, :512]
    assert network(image_tensor(crop))["scale"].scale == 1.0
    at20 = list_dataset(str(shared_data / "monuseg_train"), subset="val", images=name, scale=0.5)[0].load()
    auto = network(image_tensor(at20.image))
    assert (auto["scale"].scale, auto["scale"].source) == (2.0, "nuclei")
    told = network(image_tensor(at20.image), input_scale=2)
    assert panoptic_quality(at20.inst_map, auto["inst_map"].numpy()).pq == pytest.approx(
        panoptic_quality(at20.inst_map, told["inst_map"].numpy()).pq, abs=1e-6)
