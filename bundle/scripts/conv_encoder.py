"""A convolutional image encoder that gives SAM's mask decoder the embedding it expects.

SAM's decoder takes a (B, 256, H/16, W/16) image embedding. A ViT trained from scratch on a 2-core CPU learns
nucleus shape slowly (``shared/notes/cpu-training-findings.md``); a small CNN reaches a usable embedding in a few
hundred steps. This encoder runs one of the prompter's backbones (:data:`scripts.prompter_net.BACKBONES`) and fuses
its four stages at stride 16, the finest (stride 4) by a 4x4 space-to-depth projection so that sub-token detail
(nucleus boundaries at 4 px) is kept in the channels; the neck is SAM's (1x1 conv, LayerNorm, 3x3 conv, LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from scripts.prompter_net import build_backbone


class ConvImageEncoder(nn.Module):
    """CNN image encoder: (B, 3, H, W) normalised RGB → (B, out_chans, H/16, W/16); H, W multiples of 32.

    Args:
        backbone: a key of :data:`scripts.prompter_net.BACKBONES` (random init unless ``pretrained``).
        pretrained: optional local weights file of the backbone.
        fuse_chans: channels of each stage's projection before the neck.
        out_chans: embedding channels (SAM: 256).
    """

    def __init__(self, backbone: str = "resnet_small", pretrained: str | None = None, fuse_chans: int = 128,
                 out_chans: int = 256) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained)
        c2, c3, c4, c5 = self.backbone.out_channels
        self.proj = nn.ModuleList([
            nn.Conv2d(c2, fuse_chans, kernel_size=4, stride=4),  # stride 4 → 16, space-to-depth
            nn.Conv2d(c3, fuse_chans, kernel_size=2, stride=2),  # stride 8 → 16
            nn.Conv2d(c4, fuse_chans, kernel_size=1),  # stride 16
            nn.Conv2d(c5, fuse_chans, kernel_size=1),  # stride 32, upsampled to 16
        ])
        self.neck = nn.Sequential(
            nn.Conv2d(fuse_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, out_chans, H/16, W/16)."""
        c2, c3, c4, c5 = self.backbone(x)
        size = c4.shape[-2:]
        fused = self.proj[0](c2) + self.proj[1](c3) + self.proj[2](c4)
        fused = fused + F.interpolate(self.proj[3](c5), size=size, mode="bilinear", align_corners=False)
        return self.neck(F.gelu(fused))
