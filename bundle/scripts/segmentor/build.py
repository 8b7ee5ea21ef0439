"""Segmentor variants and their construction, as ``segment_anything.build_sam``: a registry of specs, one build
function, and the adaptation of an official SAM checkpoint to the token grid.

Variants: the official ``vit_b`` / ``vit_l`` / ``vit_h``, a small CPU-trainable ``vit_tiny`` and the convolutional
``conv_small``. An official checkpoint is adapted on load: the absolute position embedding (1, 64, 64, C) is
resized bicubically to the token grid and the relative-position tables are resized linearly (global-attention
blocks: 2*64-1 -> 2*grid-1; window blocks keep 2*14-1 unless the window changes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from scripts.parse import as_bool
from scripts.segmentor.classifier import CLASS_HEAD_KEYS, ClassifyingMaskDecoder
from scripts.segmentor.conv_encoder import ConvImageEncoder
from scripts.segmentor.net import Segmentor


@dataclass(frozen=True)
class SegmentorSpec:
    """Architecture of one variant; every field can be overridden in :func:`build_segmentor`.

    Attributes:
        embed_dim, depth, num_heads: ViT width, number of blocks, attention heads.
        global_attn_indexes: blocks with global attention; the others attend within ``window_size`` windows
            (the token grid is padded to a multiple of the window).
        window_size: window of the windowed-attention blocks, in tokens.
        patch_size: pixels per token side; token grid = image_size / patch_size.
        mlp_ratio: ViT MLP width / embed_dim.
        prompt_dim: channels of the image embedding and prompt tokens (SAM: 256).
        decoder_depth, decoder_mlp_dim, decoder_heads: the mask decoder's two-way transformer.
        encoder: ``"vit"`` (segment-anything's ``ImageEncoderViT``) or ``"conv"``
            (:class:`scripts.segmentor.conv_encoder.ConvImageEncoder`, same embedding shape; the ViT fields are unused and
            ``patch_size`` (16, 8 or 4) is the encoder's output stride).
        conv_backbone: the CNN of the ``"conv"`` encoder (a key of ``scripts.backbones.BACKBONES``).
        decoder_window: side in px of the embedding window the mask decoder sees around each prompt (a multiple of
            ``patch_size``, at most the input size); 0 = the whole input (SAM). A window smaller than the input
            decouples the token resolution from the decoder's cost: 8 px tokens with a 128 px window give the
            decoder the same 16x16 tokens as 16 px tokens on a 256 px tile, and masks at 2 px instead of 4 px.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    encoder: str = "vit"
    conv_backbone: str = "resnet_small"
    decoder_window: int = 0


SEGMENTOR_VARIANTS: dict[str, SegmentorSpec] = {
    "vit_tiny": SegmentorSpec(embed_dim=192, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8),
    "conv_small": SegmentorSpec(embed_dim=0, depth=0, num_heads=0, global_attn_indexes=(), encoder="conv"),
    "vit_b": SegmentorSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SegmentorSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SegmentorSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def build_segmentor(
    variant: str = "vit_tiny",
    image_size: int = 256,
    checkpoint: str | Path | None = None,
    freeze_prompt_encoder: bool = True,
    freeze_image_encoder: bool = False,
    freeze_mask_decoder: bool = False,
    num_classes: int = 0,
    **overrides: Any,
) -> Segmentor:
    """Build a segmentor variant, optionally from an official SAM checkpoint (adapted to ``image_size``).

    Args:
        variant: a key of :data:`SEGMENTOR_VARIANTS` (``vit_tiny``, ``vit_b``, ``vit_l``, ``vit_h``).
        image_size: input side in pixels (256 for PanNuke tiles / 256 px windows); must be a multiple of patch_size.
        checkpoint: an official SAM ``.pth`` state dict (e.g. ``sam_vit_b_01ec64.pth``); None: random init
            (ViTDet-style truncated-normal init of the image encoder, for training from scratch).
        freeze_prompt_encoder, freeze_image_encoder, freeze_mask_decoder: set ``requires_grad=False``.
        num_classes: C > 0 gives the mask decoder a [cls] token and a C + 1 logit head (the segmentor as classifier,
            paper Table 8: :class:`scripts.segmentor.classifier.ClassifyingMaskDecoder`); 0: SAM's decoder.
        **overrides: any :class:`SegmentorSpec` field (e.g. ``patch_size=8``, ``window_size=16``).

    Raises:
        KeyError: unknown variant. TypeError: unknown override. FileNotFoundError: missing checkpoint.
        ValueError: a checkpoint whose keys or shapes do not fit after resizing (the keys are listed).
    """
    frozen = {name: as_bool(value, name) for name, value in (("freeze_prompt_encoder", freeze_prompt_encoder),
              ("freeze_image_encoder", freeze_image_encoder), ("freeze_mask_decoder", freeze_mask_decoder))}
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"segmentor checkpoint not found: {checkpoint}")
    if variant not in SEGMENTOR_VARIANTS:
        raise KeyError(f"unknown segmentor variant {variant!r}; known: {sorted(SEGMENTOR_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(SegmentorSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown segmentor override(s) {unknown}; valid: {sorted(fields)}")
    if "global_attn_indexes" in overrides:
        overrides["global_attn_indexes"] = tuple(overrides["global_attn_indexes"])
    spec = dataclasses.replace(SEGMENTOR_VARIANTS[variant], **overrides)
    if image_size % spec.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {spec.patch_size}")
    window = spec.decoder_window or image_size
    if window % spec.patch_size or not 0 < window <= image_size:
        raise ValueError(
            f"decoder_window {spec.decoder_window} must be a multiple of patch_size {spec.patch_size} and at most "
            f"image_size {image_size} (0: the whole input)"
        )
    grid = window // spec.patch_size

    image_encoder = _build_image_encoder(spec, image_size)
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(window, window),
        mask_in_chans=16,
    )
    decoder_args = dict(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads,
        ),
        transformer_dim=spec.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    num_classes = int(num_classes)
    mask_decoder = ClassifyingMaskDecoder(num_classes=num_classes, **decoder_args) if num_classes else MaskDecoder(
        **decoder_args)
    config = {"variant": variant, "image_size": image_size, "num_classes": num_classes, **dataclasses.asdict(spec)}
    config["global_attn_indexes"] = list(spec.global_attn_indexes)
    model = Segmentor(image_encoder, prompt_encoder, mask_decoder, image_size, config)
    if checkpoint is not None:
        load_sam_checkpoint(model, checkpoint)
    elif spec.encoder == "vit":
        _init_image_encoder(model.image_encoder)
    for name, module in (("prompt_encoder", model.prompt_encoder), ("image_encoder", model.image_encoder),
                         ("mask_decoder", model.mask_decoder)):
        module.requires_grad_(not frozen[f"freeze_{name}"])
    return model


def _build_image_encoder(spec: SegmentorSpec, image_size: int) -> nn.Module:
    """segment-anything's ViT image encoder, or the convolutional encoder giving the same embedding."""
    if spec.encoder == "conv":
        if image_size % 32:
            raise ValueError(f"image_size {image_size} must be a multiple of 32 for the conv encoder")
        return ConvImageEncoder(backbone=spec.conv_backbone, out_chans=spec.prompt_dim, stride=spec.patch_size)
    if spec.encoder != "vit":
        raise ValueError(f"encoder must be 'vit' or 'conv', got {spec.encoder!r}")
    return ImageEncoderViT(
        img_size=image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        out_chans=spec.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
    )


def _init_image_encoder(encoder: ImageEncoderViT) -> None:
    """ViTDet-style init for training from scratch (SAM's encoder has none: it is always loaded from MAE/SAM)."""
    for m in encoder.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if encoder.pos_embed is not None:
        nn.init.trunc_normal_(encoder.pos_embed, std=0.02)


def resize_abs_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H0, W0, C) absolute position embedding -> (1, h, w, C), bicubic (align_corners=False)."""
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L0, C) relative-position table -> (length, C), linear (as ``segment_anything``'s ``get_rel_pos``)."""
    x = F.interpolate(rel_pos.float().T[None], size=length, mode="linear", align_corners=False)
    return x[0].T.to(rel_pos.dtype).contiguous()


def adapt_sam_state_dict(state_dict: Mapping[str, torch.Tensor], model: Segmentor) -> dict[str, torch.Tensor]:
    """Resize the position embedding and relative-position tables of ``state_dict`` to ``model``'s token grid.

    Only ``*pos_embed`` (bicubic) and ``*rel_pos_h`` / ``*rel_pos_w`` (linear) keys whose shapes differ are
    touched; everything else is returned as is.
    """
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        want = target.get(key)
        if want is not None and tuple(value.shape) != tuple(want.shape):
            if key.endswith("pos_embed") and value.ndim == 4:
                value = resize_abs_pos_embed(value, tuple(want.shape[1:3]))
            elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == want.shape[1]:
                value = resize_rel_pos(value, want.shape[0])
        out[key] = value
    return out


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a ValueError listing missing, unexpected and shape-mismatched keys."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(state_dict) & set(target)
        if tuple(state_dict[k].shape) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:

        def fmt(name: str, keys: list[str]) -> str:
            more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
            return f"\n  {name} ({len(keys)}): " + ", ".join(keys[:20]) + more if keys else ""

        raise ValueError(
            f"checkpoint {source} does not fit the segmentor {model.__class__.__name__}:"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("shape mismatch", mismatched)
        )


def _torch_load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentor checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sam_checkpoint(model: Segmentor, checkpoint: str | Path) -> Segmentor:
    """Load an official SAM state dict into ``model``, resizing position tables to its token grid (in place)."""
    state = _torch_load(checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {checkpoint} is not a state dict (got {type(state).__name__})")
    state = adapt_sam_state_dict(state, model)
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(CLASS_HEAD_KEYS) and k not in state}
    state = {**state, **fresh}  # a [cls] token and head start from their initialisation
    _check_state_dict(state, model, str(checkpoint))
    model.load_state_dict(state, strict=True)
    return model
