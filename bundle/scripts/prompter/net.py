"""The PromptNucSeg prompter (paper §3.3): refine and classify a grid of anchor points.

Pipeline (shapes for an input of H x W, λ = ``anchor_step``, D = ``fpn_channels``)::

    image (B, 3, H, W) in [0, 255] -> ImageNet normalisation -> zero pad right/bottom to (Hp, Wp)
    backbone -> C2..C5 (strides 4, 8, 16, 32) -> FPN -> P2..P5 (B, D, Hp/s, Wp/s)
    anchors a (A, 2), A = ceil(H/λ) * ceil(W/λ), at ((j + 0.5)λ, (i + 0.5)λ), row-major
    step 1: f(P2, a) -> MLP -> first offset o;  a' = a + o
    step 2: concat_l f(P_l, a') for l in ``levels`` -> 3x3 conv over the (ceil(H/λ), ceil(W/λ)) anchor grid
            -> MLP -> δ (px), MLP -> C+1 logits (last = background);  refined point = a' + δ
    auxiliary nuclear-region head on P2: Conv-BN-ReLU-Conv -> 1 logit per cell, resampled to every input pixel.

Coordinates: points are (x, y) = (col, row) in pixels, and an integer point is the *centre* of that pixel
(the convention of ``segment_anything``'s prompt encoder, which adds 0.5 itself). The continuous extent of
pixel (x, y) is [x - 0.5, x + 0.5) x [y - 0.5, y + 0.5).

Feature geometry: every backbone (:mod:`scripts.backbones`) states where its feature cells sit; point sampling
and the auxiliary upsampling both use this one mapping (:func:`sample_at_points`), so the auxiliary map is
aligned with the input pixel for pixel.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from scripts.backbones import BACKBONE_STRIDES, build_backbone

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the [0, 255] scale
IMAGENET_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------


def make_anchors(height: int, width: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """Anchor points (A, 2) as (x, y) px at ((j + 0.5) * step, (i + 0.5) * step), row-major over
    i < ceil(height / step), j < ceil(width / step)."""
    rows, cols = math.ceil(height / step), math.ceil(width / step)
    ys = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * step
    xs = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * step
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def nearest_pixels(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, 2) int64 (x, y) = (col, row) of the pixel nearest each (x, y) px point, clamped into an image of
    ``size`` (H, W)."""
    height, width = size
    cols = torch.floor(points[:, 0] + 0.5).long().clamp(0, width - 1)
    rows = torch.floor(points[:, 1] + 0.5).long().clamp(0, height - 1)
    return torch.stack([cols, rows], dim=1)


def sample_at_points(feature: torch.Tensor, points: torch.Tensor, stride: int, cell_offset: float) -> torch.Tensor:
    """Bilinearly sample ``feature`` at pixel points.

    Args:
        feature: (B, D, h, w) map whose cell k (per axis) is centred on input pixel ``stride * k + cell_offset``.
        points: (B, P, 2) as (x, y) px, integer = pixel centre.
        stride: the map's stride in input pixels.
        cell_offset: see ``feature``; (stride - 1) / 2 is the ``align_corners=False`` convention.

    Returns:
        (B, P, D). Points outside the map take the nearest border value (``padding_mode="border"``).
    """
    h, w = feature.shape[-2:]
    cells = (points - cell_offset) / stride  # continuous cell index, 0 = centre of cell 0
    size = torch.tensor([w, h], dtype=points.dtype, device=points.device)
    grid = (2 * cells + 1) / size - 1  # align_corners=False: -1 / +1 are the outer edges of the end cells
    sampled = F.grid_sample(feature, grid.unsqueeze(2).to(feature.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(-1).transpose(1, 2)


def resample_to_pixels(feature: torch.Tensor, stride: int, cell_offset: float, size: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) map -> (B, D, H, W) with one bilinear sample at every input pixel centre, ``size`` = (H, W).

    With ``cell_offset = (stride - 1) / 2`` this equals ``F.interpolate(scale_factor=stride, mode="bilinear",
    align_corners=False)`` cropped to (H, W); other offsets shift the grid accordingly.
    """
    height, width = size
    ys = torch.arange(height, device=feature.device, dtype=torch.float32)
    xs = torch.arange(width, device=feature.device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y], dim=-1).reshape(1, -1, 2).expand(feature.shape[0], -1, -1)
    sampled = sample_at_points(feature, points, stride, cell_offset)  # (B, H*W, D)
    return sampled.transpose(1, 2).reshape(feature.shape[0], feature.shape[1], height, width)


class MLP(nn.Module):
    """Linear-ReLU-...-Linear over the last dimension (as in segment_anything's mask decoder)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# The prompter
# ----------------------------------------------------------------------------------------------------------


class Prompter(nn.Module):
    """Anchor-point prompter: predicts one refined, classified point per anchor plus a nuclear-region map.

    Args:
        num_classes: C, the number of nucleus classes (the logits have C + 1 entries, the last = background).
        backbone: a key of :data:`BACKBONES` ("resnet_small", "resnet18", "resnet50", "convnext_small", ...).
        pretrained: optional local backbone weights file (never downloaded); a missing file raises
            ``FileNotFoundError``.
        levels: pyramid levels sampled in step 2, a sorted subset of (2, 3, 4, 5) that includes 2
            (P_l has stride 2**l). The FPN always runs over all four backbone stages.
        fpn_channels: D, channels of every pyramid level.
        anchor_step: λ, anchor spacing in px.
        mlp_hidden: hidden width of the offset/class MLPs and of the 3x3 anchor-grid conv.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet_small",
        pretrained: str | Path | None = None,
        levels: tuple[int, ...] = (2, 3, 4),
        fpn_channels: int = 256,
        anchor_step: int = 8,
        mlp_hidden: int = 256,
    ) -> None:
        super().__init__()
        levels = tuple(int(level) for level in levels)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if levels != tuple(sorted(set(levels))) or not set(levels) <= {2, 3, 4, 5} or 2 not in levels:
            raise ValueError(f"levels must be a sorted subset of (2, 3, 4, 5) containing 2, got {levels}")
        if anchor_step < 1:
            raise ValueError(f"anchor_step must be >= 1, got {anchor_step}")
        self.num_classes = num_classes
        self.levels = levels
        self.anchor_step = int(anchor_step)
        self.pad_multiple = math.lcm(self.anchor_step, BACKBONE_STRIDES[-1])

        self.backbone = build_backbone(backbone, pretrained)
        self.cell_offsets = dict(zip((2, 3, 4, 5), self.backbone.cell_offsets))
        self.fpn = FeaturePyramidNetwork(list(self.backbone.out_channels), fpn_channels)

        self.coarse_offset_head = MLP(fpn_channels, mlp_hidden, 2)
        self.grid_conv = nn.Conv2d(fpn_channels * len(levels), mlp_hidden, kernel_size=3, padding=1)
        self.offset_head = MLP(mlp_hidden, mlp_hidden, 2)
        self.class_head = MLP(mlp_hidden, mlp_hidden, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(fpn_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(fpn_channels, 1, 1),
        )
        # Start with points on their anchors: the last layers of both offset MLPs are zero.
        for head in (self.coarse_offset_head, self.offset_head):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 255] -> normalised, zero-padded right/bottom to multiples of lcm(λ, 32)."""
        x = (image.float() - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        pad_h = -height % self.pad_multiple
        pad_w = -width % self.pad_multiple
        return F.pad(x, (0, pad_w, 0, pad_h))

    def pyramid(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Padded image (B, 3, Hp, Wp) -> {level l: P_l (B, D, Hp / 2**l, Wp / 2**l)} for l = 2..5; ``features``:
        the backbone's [C2, C3, C4, C5] of ``x`` when already computed."""
        features = self.backbone(x) if features is None else features
        outputs = self.fpn(OrderedDict((str(level), f) for level, f in zip((2, 3, 4, 5), features)))
        return {int(k): v for k, v in outputs.items()}

    def sample_level(self, pyramid: dict[int, torch.Tensor], level: int, points: torch.Tensor) -> torch.Tensor:
        """Features (B, P, D) of P_level at points (B, P, 2) (x, y) px."""
        return sample_at_points(pyramid[level], points, 2**level, self.cell_offsets[level])

    def forward(self, image: torch.Tensor, features: list[torch.Tensor] | None = None, region_map: bool = True
                ) -> dict[str, torch.Tensor]:
        """Predict prompts for a batch of images.

        Args:
            image: (B, 3, H, W) RGB float in [0, 255] (any H, W; padding happens inside).
            features: optional backbone features [C2, C3, C4, C5] of ``self.preprocess(image)``, computed by the
                caller (an image encoder shared with the segmentor, :mod:`scripts.training.joint`).
            region_map: compute the auxiliary head over the whole map (``aux_logits``, for the loss); False gives
                P2 as ``aux_features`` instead, for :meth:`region_logits_at` at the few points inference needs.

        Returns:
            dict with
              ``pred_points`` (B, A, 2): refined points (x, y) px = anchor + first offset + δ;
              ``pred_logits`` (B, A, C + 1): class logits, last = background;
              ``aux_logits`` (B, 1, H, W): nuclear-region logits, pixel-aligned with ``image`` (or, without
              ``region_map``, ``aux_features`` (B, D, Hp / 4, Wp / 4): P2);
              ``anchors`` (A, 2): anchor points (x, y) px, row-major over (ceil(H/λ), ceil(W/λ));
              ``coarse_points`` (B, A, 2): anchor + first offset (the step-2 sampling location).
        """
        batch, _, height, width = image.shape
        pyramid = self.pyramid(self.preprocess(image), features)

        rows, cols = math.ceil(height / self.anchor_step), math.ceil(width / self.anchor_step)
        anchors = make_anchors(height, width, self.anchor_step, device=image.device)
        anchor_points = anchors.unsqueeze(0).expand(batch, -1, -1)

        coarse_points = anchor_points + self.coarse_offset_head(self.sample_level(pyramid, 2, anchor_points))
        features = torch.cat([self.sample_level(pyramid, level, coarse_points) for level in self.levels], dim=-1)
        features = features.transpose(1, 2).reshape(batch, -1, rows, cols)  # (B, L*D, rows, cols)
        features = F.relu(self.grid_conv(features)).flatten(2).transpose(1, 2)  # (B, A, hidden)

        pred_points = coarse_points + self.offset_head(features)
        pred_logits = self.class_head(features)
        outputs = {"pred_points": pred_points, "pred_logits": pred_logits, "anchors": anchors,
                   "coarse_points": coarse_points}
        if region_map:
            outputs["aux_logits"] = resample_to_pixels(self.mask_head(pyramid[2]), 4, self.cell_offsets[2],
                                                       (height, width))
        else:
            outputs["aux_features"] = pyramid[2]
        return outputs

    def region_logits_at(self, p2: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Nuclear-region logits (K,) at the pixels nearest ``points`` (K, 2) (x, y) px of an image of ``size``
        (H, W), from its P2 (1, D, h, w): the values of ``aux_logits`` there, with the auxiliary head run only on
        the P2 cells their bilinear samples read (at most 4 per point) instead of the whole map."""
        pixels = nearest_pixels(points, size).float()
        stride, offset = 4, self.cell_offsets[2]
        h, w = p2.shape[-2:]
        corner = torch.floor((pixels - offset) / stride).long()  # (K, 2) (x, y) cell left of / above each pixel
        neighbours = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=corner.device)
        cells = (corner[:, None] + neighbours).reshape(-1, 2)
        upper = torch.tensor([w - 1, h - 1], device=corner.device)
        cells = torch.unique(torch.minimum(cells.clamp(min=0), upper), dim=0)
        conv, norm, relu, to_logit = self.mask_head
        steps = torch.arange(3, device=cells.device)
        rows = (cells[:, 1, None] + steps)[:, :, None]  # (M, 3, 1) in P2 padded by 1 cell: the 3x3 neighbourhoods
        cols = (cells[:, 0, None] + steps)[:, None, :]
        patches = F.pad(p2[0], (1, 1, 1, 1))[:, rows, cols].transpose(0, 1)  # (M, D, 3, 3)
        logits = to_logit(relu(norm(F.conv2d(patches, conv.weight, conv.bias))))  # (M, 1, 1, 1)
        region = logits.new_zeros((1, 1, h, w))
        region[0, 0, cells[:, 1], cells[:, 0]] = logits.flatten()
        return sample_at_points(region, pixels[None], stride, offset)[0, :, 0]
