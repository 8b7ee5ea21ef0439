"""Backbones of both networks: the prompter's feature pyramid and the segmentor's convolutional image encoder.

Each backbone returns [C2, C3, C4, C5] (strides 4, 8, 16, 32) and states ``out_channels`` and ``cell_offsets``:
cell k of a stride-s map is centred on input pixel ``s * k + offset_s``. Patchify backbones (ConvNeXt,
``resnet_small``) have offset (s - 1) / 2, torchvision ResNets (odd kernels, stride 2) offset 0. Weights are
random unless a local file is given (never downloaded): a bare state dict, or one under ``state_dict`` / ``model``
(timm's and torchvision's files load as they are).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

BACKBONE_STRIDES = (4, 8, 16, 32)
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict with ``torch.load(weights_only=True)`` (``.safetensors``: ``safetensors``, the
    format of timm's weights on the Hugging Face hub); never downloads.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``; a leading ``"module."``
    (DataParallel) is stripped. Raises ``FileNotFoundError`` naming the file when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k.removeprefix("module."): v for k, v in load_file(path).items()}
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
