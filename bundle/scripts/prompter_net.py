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

Feature geometry: every backbone states where its feature cells sit. Cell k of a stride-s map is centred on
input pixel ``s * k + offset_s``. Patchify backbones (ConvNeXt, ``resnet_small``) have offset (s - 1) / 2, the
``align_corners=False`` convention of ``F.grid_sample``; torchvision ResNets (odd kernels, stride 2) have offset 0.
Point sampling and the auxiliary upsampling both use this one mapping (:func:`sample_at_points`), so the
auxiliary map is aligned with the input pixel for pixel.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the [0, 255] scale
IMAGENET_STD = (58.395, 57.12, 57.375)
BACKBONE_STRIDES = (4, 8, 16, 32)
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


# ----------------------------------------------------------------------------------------------------------
# Backbones: modules returning [C2, C3, C4, C5] with attributes `out_channels` and `cell_offsets`.
# ----------------------------------------------------------------------------------------------------------


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict with ``torch.load(weights_only=True)``; never downloads.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``; a leading ``"module."``
    (DataParallel) is stripped. Raises ``FileNotFoundError`` naming the file when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``: every module key must be present; only classifier keys may be extra."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the backbone; missing {missing[:5]}, unexpected {unexpected[:5]}")


class SmallResNet(nn.Module):
    """A small random-init ResNet for CPU training: torchvision ``BasicBlock`` stages, patchify downsampling.

    Stem: 3x3 conv (stride 1) then a 4x4 stride-4 conv; each later stage starts with a 2x2 stride-2 conv. These
    even, non-overlapping downsamplers keep cell k of stride s centred on pixel s*k + (s-1)/2.

    Args:
        widths: channels of the four stages (strides 4, 8, 16, 32).
        depths: ``BasicBlock``s per stage.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (1, 1, 2, 1)) -> None:
        super().__init__()
        stem_width = max(widths[0] // 2, 8)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, widths[0], 4, stride=4, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [nn.Conv2d(widths[i - 1], width, 2, stride=2, bias=False), nn.BatchNorm2d(width)]
            layers += [BasicBlock(width, width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(widths)
        self.cell_offsets = tuple((s - 1) / 2 for s in BACKBONE_STRIDES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, c_i, H / s_i, W / s_i) for s_i in 4, 8, 16, 32]; H, W multiples of 32."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TorchvisionResNet(nn.Module):
    """torchvision ResNet-18/34/50 trunk (no pooling/classifier). Cell k of stride s is centred on pixel s*k.

    ``pretrained`` is a torchvision ImageNet state dict (its ``fc.*`` keys are ignored).
    """

    def __init__(self, name: str = "resnet18", pretrained: str | Path | None = None) -> None:
        super().__init__()
        import torchvision

        body = getattr(torchvision.models, name)(weights=None)
        body.fc = nn.Identity()
        if pretrained is not None:
            load_backbone_state(body, load_weights_file(pretrained), str(pretrained))
        self.body = body
        expansion = 4 if name in ("resnet50", "resnet101", "resnet152") else 1
        self.out_channels = tuple(w * expansion for w in (64, 128, 256, 512))
        self.cell_offsets = (0.0, 0.0, 0.0, 0.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [C2, C3, C4, C5] at strides 4, 8, 16, 32."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        features = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            features.append(x)
        return features


class TimmConvNeXt(nn.Module):
    """A timm ConvNeXt with ``features_only=True`` (all four stages; patchify, offsets (s-1)/2).

    ``pretrained`` is a local timm or original (facebookresearch) ConvNeXt classification state dict, read with
    ``torch.load(weights_only=True)`` and loaded strictly (only classifier keys may be left over); nothing
    is downloaded.
    """

    def __init__(self, name: str = "convnext_small", pretrained: str | Path | None = None) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), pretrained=False)
        if pretrained is not None:
            self.body.load_state_dict(self._pretrained_features(name, pretrained))
        self.out_channels = tuple(self.body.feature_info.channels())
        self.cell_offsets = tuple((s - 1) / 2 for s in BACKBONE_STRIDES)

    @staticmethod
    def _pretrained_features(name: str, pretrained: str | Path) -> dict[str, torch.Tensor]:
        """Strictly load the weights file into the full timm model, then take its features-only state dict."""
        import timm
        from timm.models import FeatureListNet

        full = timm.create_model(name, pretrained=False, num_classes=0)
        state = load_weights_file(pretrained)
        filter_fn = getattr(sys.modules[type(full).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:  # converts original (facebookresearch) checkpoints to timm names
            state = filter_fn(state, full)
        load_backbone_state(full, state, str(pretrained))
        return FeatureListNet(full, out_indices=(0, 1, 2, 3), flatten_sequential=True).state_dict()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [C2, C3, C4, C5] at strides 4, 8, 16, 32."""
        return list(self.body(x))


def _small_backbone(pretrained: str | Path | None) -> nn.Module:
    net = SmallResNet()
    if pretrained is not None:
        load_backbone_state(net, load_weights_file(pretrained), str(pretrained))
    return net


BACKBONES: dict[str, Callable[[str | Path | None], nn.Module]] = {
    "resnet_small": _small_backbone,
    "resnet18": lambda p: TorchvisionResNet("resnet18", p),
    "resnet34": lambda p: TorchvisionResNet("resnet34", p),
    "resnet50": lambda p: TorchvisionResNet("resnet50", p),
    "convnext_tiny": lambda p: TimmConvNeXt("convnext_tiny", p),
    "convnext_small": lambda p: TimmConvNeXt("convnext_small", p),
    "convnext_base": lambda p: TimmConvNeXt("convnext_base", p),
}


def build_backbone(name: str, pretrained: str | Path | None = None) -> nn.Module:
    """Backbone ``name`` from :data:`BACKBONES`, random init unless ``pretrained`` names a local weights file."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[name](pretrained)


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

    def pyramid(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Padded image (B, 3, Hp, Wp) -> {level l: P_l (B, D, Hp / 2**l, Wp / 2**l)} for l = 2..5."""
        features = self.backbone(x)
        outputs = self.fpn(OrderedDict((str(level), f) for level, f in zip((2, 3, 4, 5), features)))
        return {int(k): v for k, v in outputs.items()}

    def sample_level(self, pyramid: dict[int, torch.Tensor], level: int, points: torch.Tensor) -> torch.Tensor:
        """Features (B, P, D) of P_level at points (B, P, 2) (x, y) px."""
        return sample_at_points(pyramid[level], points, 2**level, self.cell_offsets[level])

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict prompts for a batch of images.

        Args:
            image: (B, 3, H, W) RGB float in [0, 255] (any H, W; padding happens inside).

        Returns:
            dict with
              ``pred_points`` (B, A, 2): refined points (x, y) px = anchor + first offset + δ;
              ``pred_logits`` (B, A, C + 1): class logits, last = background;
              ``aux_logits`` (B, 1, H, W): nuclear-region logits, pixel-aligned with ``image``;
              ``anchors`` (A, 2): anchor points (x, y) px, row-major over (ceil(H/λ), ceil(W/λ));
              ``coarse_points`` (B, A, 2): anchor + first offset (the step-2 sampling location).
        """
        batch, _, height, width = image.shape
        pyramid = self.pyramid(self.preprocess(image))

        rows, cols = math.ceil(height / self.anchor_step), math.ceil(width / self.anchor_step)
        anchors = make_anchors(height, width, self.anchor_step, device=image.device)
        anchor_points = anchors.unsqueeze(0).expand(batch, -1, -1)

        coarse_points = anchor_points + self.coarse_offset_head(self.sample_level(pyramid, 2, anchor_points))
        features = torch.cat([self.sample_level(pyramid, level, coarse_points) for level in self.levels], dim=-1)
        features = features.transpose(1, 2).reshape(batch, -1, rows, cols)  # (B, L*D, rows, cols)
        features = F.relu(self.grid_conv(features)).flatten(2).transpose(1, 2)  # (B, A, hidden)

        pred_points = coarse_points + self.offset_head(features)
        pred_logits = self.class_head(features)
        aux_logits = resample_to_pixels(self.mask_head(pyramid[2]), 4, self.cell_offsets[2], (height, width))
        return {
            "pred_points": pred_points,
            "pred_logits": pred_logits,
            "aux_logits": aux_logits,
            "anchors": anchors,
            "coarse_points": coarse_points,
        }
