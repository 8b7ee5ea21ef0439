"""The input scale: by how much to resample an image so that its nuclei look like the model's training data.

``input_scale auto`` (the default) decides per image or slide, in this order:

1. the image's resolution from its metadata (TIFF resolution tags, a slide's mpp): scale = mpp / training mpp
   (the model file's ``training_mpp``, 0.25 µm/px for the default 40x model), then checked against the nuclei;
   a disagreement is a warning naming the file;
2. otherwise the nuclei of a first pass at scale 1: when their median area is far from the training data's
   (the model file's ``nucleus_area``, px² at training resolution), the candidate scale (2 for small nuclei,
   0.5 for large ones) is tried on a sample of the nuclei found (their prompts decoded again on the resampled
   image) and taken when the segmentor's predicted IoU is higher there by more than a margin (mean over the
   sample). Nucleus size alone cannot tell a 20x image of large nuclei from a 40x image of small ones (at 40x,
   image medians run from 100 to 830 px² in the training data); the segmentor's own confidence at both scales
   can, given enough nuclei: an image with few (a sparse tile) follows the evidence of the images segmented
   before it in the same run (:class:`RunEvidence`, kept by the network).

A tile's check costs about as much as its segmentation (its sample is most of its nuclei, re-encoded at twice the
size), so in a run of tiles the check settles: once the last checked tiles each reached the run's verdict on their
own evidence, a tile (at most ``follow_nuclei`` nuclei) follows the run without a check, and every
``check_every``-th such tile is still checked (a tile that disagrees unsettles the run). Images with more nuclei
always check themselves.

A given number wins. The choice (scale, source, the image's µm/px when known) goes with the outputs.
Measurements: docs/benchmarks/scale.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TRAINING_MPP = 0.25  # µm/px of the default model's training data (40x), for model files that do not say
# px², the reference nucleus area at 40x, likewise: between the training sets' medians (MoNuSeg 454, its 17 extra
# images 240, CoNSeP 193); ScaleRule's bounds are calibrated against it (docs/benchmarks/scale.md)
NUCLEUS_AREA = 300.0


@dataclass(frozen=True)
class ScaleRule:
    """When the nuclei ask for another scale (areas in px² at the scale tried, against the training median).

    Attributes:
        small, large: a first pass whose median nucleus area is under ``small`` x the training median tries
            scale 2, over ``large`` x it tries 0.5.
        min_nuclei: with fewer nuclei an image cannot tell: it follows the run's evidence (or stays).
        sample: nuclei whose prompts are decoded again at the candidate scale (spread over all found: one nucleus's
            gain varies by about 0.085, so the mean of 256 is known to about 0.005, a tenth of ``margin``).
        own_nuclei: an image with at least this many sampled nuclei decides alone: the candidate's predicted IoU
            must beat the current scale's by more than ``margin`` (mean of the paired differences), or by more
            than ``tiny_margin`` when its nuclei are under ``tiny`` x the training median (that small is rare at
            40x: MoNuSeg's image medians run from 94 to 832 px²).
        run_nuclei, run_margin: an image with fewer follows the evidence of its run (every image checked so far,
            itself included, each weighted by its sampled nuclei) once that holds ``run_nuclei``: the candidate
            wins when the run's mean gain exceeds ``run_margin``; before that it decides alone.
        mpp_tolerance: a metadata scale within this ratio of 1 is taken as 1 (0.25 vs 0.2527 µm/px).
        follow_nuclei, settle_images, check_every: an image with at most ``follow_nuclei`` nuclei follows the run
            without its own check once the last ``settle_images`` checked images each reached the run's verdict
            on their own evidence; every ``check_every``-th image that could follow is checked all the same.
    """

    small: float = 1.2
    large: float = 3.0
    min_nuclei: int = 3
    sample: int = 256
    own_nuclei: int = 16
    margin: float = 0.045
    tiny: float = 0.6
    tiny_margin: float = 0.0
    run_nuclei: int = 32
    run_margin: float = 0.03
    mpp_tolerance: float = 1.15
    follow_nuclei: int = 64
    settle_images: int = 4
    check_every: int = 4

    def own_verdict(self, gain: float, area: float, nucleus_area: float) -> bool:
        """Whether a mean IoU ``gain`` at the candidate scale is enough, alone, for nuclei of median ``area`` px²."""
        return gain > (self.tiny_margin if area < self.tiny * nucleus_area else self.margin)


class RunEvidence:
    """The scale checks of a run, per candidate scale: the paired IoU gains (sum of gain x nuclei, nuclei), how
    many checked images in a row reached the run's verdict on their own evidence, and how many images followed the
    run since its last check."""

    def __init__(self) -> None:
        self.totals: dict[float, list[float]] = {}
        self.agreeing: dict[float, int] = {}
        self.followed: dict[float, int] = {}

    def add(self, candidate: float, gain: float, nuclei: int, own_verdict: bool | None = None,
            rule: ScaleRule = ScaleRule()) -> None:
        """One image's check: its mean ``gain`` over ``nuclei`` sampled nuclei and its ``own_verdict``
        (:meth:`ScaleRule.own_verdict`; None: not counted towards settling)."""
        total = self.totals.setdefault(candidate, [0.0, 0])
        total[0] += gain * nuclei
        total[1] += nuclei
        self.followed[candidate] = 0
        run = self.verdict(candidate, rule)
        agrees = own_verdict is not None and run is not None and own_verdict == run
        self.agreeing[candidate] = self.agreeing.get(candidate, 0) + 1 if agrees else 0

    def verdict(self, candidate: float, rule: ScaleRule) -> bool | None:
        """Whether the run's evidence takes ``candidate`` (None: not enough evidence yet)."""
        gain_sum, nuclei = self.totals.get(candidate, (0.0, 0))
        return None if nuclei < rule.run_nuclei else gain_sum / nuclei > rule.run_margin

    def follow(self, candidate: float, nuclei: int, rule: ScaleRule) -> bool | None:
        """The run's verdict for an image of ``nuclei`` nuclei to take without a check of its own, or None: check
        it (the run has not settled, the image is not a tile, or a spot check is due). Counts the followers."""
        run = self.verdict(candidate, rule)
        settled = run is not None and self.agreeing.get(candidate, 0) >= rule.settle_images
        if nuclei > rule.follow_nuclei or not settled or self.followed.get(candidate, 0) >= rule.check_every - 1:
            return None
        self.followed[candidate] = self.followed.get(candidate, 0) + 1
        return run


@dataclass(frozen=True)
class ScaleChoice:
    """The scale an image was segmented at.

    Attributes:
        scale: the resampling factor applied (2.0: a 20x image enlarged for a 40x model).
        source: ``given`` (a number), ``metadata`` (the image's mpp), ``nuclei`` (the automatic check: its own, or
            a settled run's for a tile) or ``default`` (``auto`` found no reason to resample).
        mpp: the input image's µm/px when known (its metadata; or the training mpp / scale when given or found).
        note: why (for the log).
    """

    scale: float
    source: str
    mpp: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"input_scale": round(self.scale, 4), "scale_source": self.source,
                "mpp": None if self.mpp is None else round(self.mpp, 5)}


def scale_from_mpp(mpp: float, training_mpp: float, rule: ScaleRule = ScaleRule()) -> float:
    """The resampling factor that brings an image of ``mpp`` µm/px to ``training_mpp`` (1 within tolerance)."""
    scale = mpp / training_mpp
    return 1.0 if max(scale, 1 / scale) <= rule.mpp_tolerance else scale


def median_area(inst_map: torch.Tensor) -> tuple[float, int]:
    """(median area in px², number) of the instances of an (H, W) instance map (0 = background)."""
    areas = torch.bincount(inst_map.reshape(-1).long())[1:]
    areas = areas[areas > 0]
    return (float(areas.float().median()) if len(areas) else 0.0), int(len(areas))


def candidate_scale(area: float, count: int, nucleus_area: float, rule: ScaleRule = ScaleRule()) -> float | None:
    """The scale worth trying after a first pass with ``count`` nuclei of median ``area`` px² (None: none)."""
    if count < rule.min_nuclei:
        return None
    if area < rule.small * nucleus_area:
        return 2.0
    if area > rule.large * nucleus_area:
        return 0.5
    return None


def sample_rows(count: int, size: int) -> torch.Tensor:
    """``size`` row indices spread evenly over ``count`` rows (all when fewer)."""
    if count <= size:
        return torch.arange(count)
    return torch.linspace(0, count - 1, size).round().long()


def resample(image: torch.Tensor, scale: float) -> torch.Tensor:
    """(3, H, W) image resampled by ``scale`` (bilinear, antialiased when shrinking)."""
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


def scaled_points(points: torch.Tensor, scale: float) -> torch.Tensor:
    """(x, y) px points of an image in the image resampled by ``scale`` (pixel centres: x' + 0.5 = (x + 0.5) s)."""
    return (points.float() + 0.5) * scale - 0.5


def log_ratio(a: float, b: float) -> float:
    """|log2(a / b)|: how many octaves apart two scales are."""
    return abs(math.log2(a / b))


def mean_or_nan(values: np.ndarray | torch.Tensor) -> float:
    values = torch.as_tensor(values, dtype=torch.float32)
    return float(values.mean()) if len(values) else float("nan")
