"""A convolutional image encoder that gives SAM's mask decoder the embedding it expects.

SAM's decoder takes a (B, 256, H/16, W/16) image embedding. A ViT trained from scratch on a 2-core CPU learns
nucleus shape slowly (``shared/notes/cpu-training-findings.md``); a small CNN reaches a usable embedding in a few
hundred steps. This encoder runs one of the shared backbones (:data:`scripts.backbones.BACKBONES`) and fuses
its four stages at stride 16 (or 8, or 4), the finer ones by a space-to-depth projection so that sub-token detail
(nucleus boundaries at 4 px) is kept in the channels; the neck is SAM's (1x1 conv, LayerNorm, 3x3 conv, LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from scripts.backbones import build_backbone


class ConvImageEncoder(nn.Module):
    """CNN image encoder: (B, 3, H, W) normalised RGB → (B, out_chans, H/stride, W/stride); H, W multiples of 32.

    Args:
        backbone: a key of :data:`scripts.backbones.BACKBONES` (random init unless ``pretrained``).
        pretrained: optional local weights file of the backbone.
        fuse_chans: channels of each stage's projection before the neck.
        out_chans: embedding channels (SAM: 256).
        stride: pixels per embedding cell, 16 (SAM's grid), 8 (4x the tokens: masks at 2 px instead of 4 px) or 4
            (masks at 1 px; pair it with a small ``decoder_window``).
    """

    def __init__(self, backbone: str = "resnet_small", pretrained: str | None = None, fuse_chans: int = 128,
                 out_chans: int = 256, stride: int = 16) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise ValueError(f"stride must be 4, 8 or 16, got {stride}")
        self.backbone = build_backbone(backbone, pretrained)
        self.stride = stride
        # each stage (strides 4, 8, 16, 32) is brought to `stride`: space-to-depth when finer, upsampled when coarser
        self.proj = nn.ModuleList(
            nn.Conv2d(c, fuse_chans, kernel_size=max(stride // s, 1), stride=max(stride // s, 1))
            for c, s in zip(self.backbone.out_channels, (4, 8, 16, 32))
        )
        self.neck = nn.Sequential(
            nn.Conv2d(fuse_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) → (B, out_chans, H/stride, W/stride); ``features``: the backbone's four stages of ``x`` when
        already computed (the backbone shared with the prompter, :mod:`scripts.training.joint`)."""
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        fused = 0
        for proj, feature in zip(self.proj, self.backbone(x) if features is None else features):
            projected = proj(feature)
            if projected.shape[-2:] != size:
                projected = F.interpolate(projected, size=size, mode="bilinear", align_corners=False)
            fused = fused + projected
        return self.neck(F.gelu(fused))
