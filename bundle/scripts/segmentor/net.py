"""The PromptNucSeg segmentor (paper §3.2): Segment Anything prompted by points, decoded in windows.

The model is composed of ``segment_anything.modeling``'s image encoder, prompt encoder and mask decoder (built by
:mod:`scripts.segmentor.build`). Tiles go in at their own size (256 px, not resized to 1024).

Coordinates: prompts are (x, y) = (col, row) in pixels of the input image (SAM adds 0.5 to reach the pixel centre).
Point labels: 1 positive, 0 negative, -1 padding (ignored by the prompt encoder).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Segmentor(nn.Module):
    """SAM with single-mask output for one-prompt-one-nucleus segmentation.

    Submodule names match SAM's (``image_encoder``, ``prompt_encoder``, ``mask_decoder``), so official state-dict
    keys load unchanged. Images are float RGB in [0, 255]; normalisation (SAM's pixel mean / std) happens inside.

    Args:
        image_encoder, prompt_encoder, mask_decoder: the ``segment_anything.modeling`` modules.
        image_size: side of the square input the encoder was built for, in pixels. Smaller inputs are padded
            right / bottom (as SAM does) and outputs cropped back.
        config: the variant and spec this model was built from (stored in our checkpoints).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)
        self.config = dict(config or {})
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def num_classes(self) -> int:
        """C of the mask decoder's [cls] head (the segmentor as classifier, paper Table 8); 0 without one."""
        return int(getattr(self.mask_decoder, "num_classes", 0))

    @property
    def embedding_size(self) -> tuple[int, int]:
        """Token grid (h, w) of the window the mask decoder sees (the whole input's unless ``decoder_window``)."""
        return tuple(self.prompt_encoder.image_embedding_size)

    @property
    def patch_size(self) -> int:
        """Pixels per token side (the image encoder's output stride)."""
        return int(self.prompt_encoder.input_image_size[0]) // int(self.prompt_encoder.image_embedding_size[0])

    @property
    def window_size(self) -> int:
        """Side in px of the window each prompt is decoded on (``image_size`` unless ``decoder_window``)."""
        return int(self.prompt_encoder.input_image_size[0])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, H, W) float [0, 255] and pad right / bottom to (B, 3, image_size, image_size)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h > self.image_size or w > self.image_size:
            raise ValueError(f"image {h}x{w} is larger than the segmentor's image_size {self.image_size}")
        return F.pad(self.normalise(images), (0, self.image_size - w, 0, self.image_size - h))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """SAM's pixel normalisation of float RGB in [0, 255]."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, H, W) float RGB in [0, 255], H, W <= image_size.

        Returns:
            (B, prompt_dim, h, w) with (h, w) = image_size / patch_size.
        """
        return self.image_encoder(self.preprocess(images))

    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        input_size: tuple[int, int] | None = None,
        with_classes: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One whole-image mask per prompt for one image; the mask decoder runs once on all Z prompts.

        Each prompt is decoded on its window (:func:`decode_at_points`: the whole input unless ``decoder_window``)
        and the window's logits are pasted into the image (``OUTSIDE_LOGIT`` outside a smaller window).

        Args:
            embedding: (C, h, w) or (1, C, h, w), from :meth:`encode`.
            point_coords: (Z, P, 2) float, (x, y) = (col, row) in input-image pixels.
            point_labels: (Z, P) int, 1 positive, 0 negative, -1 padding.
            input_size: (H, W) of the image before padding (default: image_size square).
            with_classes: also return the [cls] head's class logits (Z, C + 1), last = background (a segmentor
                with ``num_classes`` > 0).

        Returns:
            mask_logits (Z, H, W) and iou_pred (Z,): the single-mask output (token 0); with ``with_classes``, also
            class_logits (Z, C + 1).
        """
        if embedding.ndim == 3:
            embedding = embedding[None]
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"embedding must be (C, h, w) or (1, C, h, w), got {tuple(embedding.shape)}")
        _check_prompts(point_coords, point_labels)
        H, W = input_size or (self.image_size, self.image_size)
        if point_coords.shape[0] == 0:  # empty outputs still tied to the graph, so a batch without nuclei can back-propagate
            tie = embedding.sum() * 0.0
            empty = embedding.new_zeros((0, H, W)) + tie, embedding.new_zeros((0,)) + tie
            return empty + (embedding.new_zeros((0, self.num_classes + 1)) + tie,) if with_classes else empty
        logits, iou, offsets, *class_logits = decode_at_points(self, embedding[0], point_coords, point_labels,
                                                               with_classes=with_classes)
        return (paste_windows(logits, offsets, (H, W)), iou, *class_logits)

    def decode_windows(
        self, windows: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor, with_classes: bool = False,
        pe_offset: int = 0, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """One mask per prompt, each prompt on its own embedding window (inference on images of any size).

        SAM's mask decoder adds ``dense_prompt_embeddings`` to the image embedding repeated per prompt; a zero
        image embedding plus the windows as dense embeddings gives each prompt its own window (the decoder call
        of :meth:`decode`, :meth:`forward` and :func:`decode_at_points`).

        Args:
            windows: (Z, C, t, t) embedding windows of the encoder's grid: t = :attr:`embedding_size` (the whole
                decoding window), or fewer tokens cut from it at ``pe_offset``.
            point_coords: (Z, P, 2) float, (x, y) = (col, row) in px relative to each window's top-left.
            point_labels: (Z, P) int, 1 positive, 0 negative, -1 padding.
            with_classes: also return the [cls] head's logits (a segmentor with ``num_classes`` > 0).
            pe_offset: (row, col) token of the whole window's positional encoding where ``windows`` start: the
                windows and their points are placed ``pe_offset`` tokens inside the whole window.
            dtype: the mask decoder's arithmetic (``torch.bfloat16``: its weights cast for this call; None: its own).

        Returns:
            mask_logits (Z, t * patch_size, t * patch_size) and iou_pred (Z,); with ``with_classes``, class_logits
            (Z, C + 1) (last = background) after them.
        """
        grid, tokens = self.embedding_size[0], windows.shape[-1]
        if windows.ndim != 4 or windows.shape[-2] != tokens or not 0 <= pe_offset <= grid - tokens:
            raise ValueError(f"windows must be (Z, C, t, t) with t + pe_offset <= {grid} tokens, got "
                             f"{tuple(windows.shape)} at pe_offset {pe_offset}")
        if with_classes and not self.num_classes:
            raise ValueError("this segmentor has no [cls] token (built with num_classes 0): it does not classify")
        size = tokens * self.patch_size
        cut = slice(pe_offset, pe_offset + tokens)
        if windows.shape[0] == 0:
            tie = windows.sum() * 0.0
            empty = (windows.new_zeros((0, size, size)) + tie, windows.new_zeros((0,)) + tie)
            return empty + (windows.new_zeros((0, self.num_classes + 1)) + tie,) if with_classes else empty
        coords = point_coords.to(windows.device, torch.float32) + pe_offset * self.patch_size  # in the whole window
        sparse, dense = self.prompt_encoder(points=(coords, point_labels.to(windows.device)), boxes=None, masks=None)
        image_pe = self.prompt_encoder.get_dense_pe()[..., cut, cut]
        if type(self.mask_decoder) is MaskDecoder and not with_classes:
            low, iou, class_logits = *self.predict_mask(windows, sparse, image_pe, dtype), []
        else:  # another decoder (a [cls] head): its own forward, under autocast for another dtype
            lower = dtype not in (None, torch.float32)
            with torch.autocast(windows.device.type, dtype=dtype if lower else torch.bfloat16, enabled=lower):
                low, iou, *class_logits = self.mask_decoder(
                    image_embeddings=windows.new_zeros((1,) + tuple(windows.shape[1:])),
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense[..., cut, cut] + windows,
                    multimask_output=False,
                )
        masks = low if low.shape[-1] == size else F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        return (masks[:, 0], iou[:, 0], class_logits[0]) if with_classes else (masks[:, 0], iou[:, 0])

    def predict_mask(self, windows: torch.Tensor, sparse: torch.Tensor, image_pe: torch.Tensor,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's ``MaskDecoder.predict_masks`` for its single-mask output, each prompt on its own window: the same
        modules and arithmetic, without SAM's per-prompt copies of a zero image embedding and of the positional
        encoding (broadcast here) and making mask 0 only.

        Args:
            windows: (Z, C, t, t) image tokens of each prompt; sparse: (Z, P, C) prompt tokens;
                image_pe: (1, C, t, t) their positional encoding.
            dtype: the arithmetic (None: the windows' own); outputs are float32.

        Returns:
            low-resolution mask logits (Z, 1, 4t, 4t) and predicted IoU (Z, 1).
        """
        decoder = self.mask_decoder
        z, c, h, w = windows.shape
        dtype = dtype or windows.dtype
        # channels last, so that the transformer's (Z, t * t, C) image tokens are a view, not a copy
        src = windows.permute(0, 2, 3, 1) + self.prompt_encoder.no_mask_embed.weight.view(1, 1, 1, c)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([tokens[None].expand(z, -1, -1), sparse], dim=1).to(dtype)
        hs, src = _run_in(decoder.transformer, dtype, src.to(dtype).permute(0, 3, 1, 2), image_pe.to(dtype), tokens)
        upscaled = _run_in(decoder.output_upscaling, dtype, src.transpose(1, 2).reshape(z, c, h, w))
        hyper = _run_in(decoder.output_hypernetworks_mlps[0], dtype, hs[:, 1])
        masks = (hyper[:, None] @ upscaled.flatten(2)).view(z, 1, *upscaled.shape[-2:])
        iou = _run_in(decoder.iou_prediction_head, dtype, hs[:, 0])[:, :1]
        return masks.float(), iou.float()

    def encode_whole(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of images of any size (multiples of 32 px) in one pass; convolutional encoders only (a ViT
        encoder is built for its input size).

        Args:
            images: (B, 3, H, W) float RGB in [0, 255].

        Returns:
            (B, prompt_dim, H / patch_size, W / patch_size).
        """
        if isinstance(self.image_encoder, ImageEncoderViT):
            raise ValueError("encode_whole needs a convolutional image encoder; a ViT encoder runs on tiles of its input size")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"images must be (B, 3, H, W) with H, W multiples of 32, got {tuple(images.shape)}")
        return self.image_encoder(self.normalise(images))

    def forward(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        prompt_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Masks for Z prompts on each of B images, each on the window centred on its positive point; the encoder
        runs once per image and the decoder once per image on all its prompts.

        Args:
            images: (B, 3, H, W) float RGB in [0, 255].
            point_coords: (B, Z, P, 2) float, (x, y) = (col, row) in input pixels.
            point_labels: (B, Z, P) int, 1 positive, 0 negative, -1 padding.
            prompt_valid: optional (B, Z) bool; invalid (padding) prompts are not decoded and get logits 0 and
                iou_pred 0 (:class:`scripts.segmentor.loss.SegmentorLoss` ignores them).

        Returns:
            ``{"mask_logits": (B, Z, S, S), "iou_pred": (B, Z), "window_origins": (B, Z, 2)}``: S = window_size;
            the origins are each window's top-left (x, y) in input px (all 0 when the window is the whole input);
            with a [cls] head (``num_classes`` > 0) also ``"class_logits"`` (B, Z, C + 1), 0 for invalid prompts.
        """
        if images.shape[0] != point_coords.shape[0]:
            raise ValueError(f"batch mismatch: images {tuple(images.shape)}, point_coords {tuple(point_coords.shape)}")
        return self.decode_batch(self.encode(images), point_coords, point_labels, prompt_valid)

    def decode_batch(
        self,
        embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        prompt_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` from the image embeddings (B, C, h, w) of :meth:`encode` (or of an encoder shared with
        the prompter: :mod:`scripts.training.joint`); the other arguments and the outputs as :meth:`forward`."""
        B, Z = point_coords.shape[:2]
        if embeddings.shape[0] != B or point_labels.shape[:2] != (B, Z):
            raise ValueError(
                f"batch mismatch: embeddings {tuple(embeddings.shape)}, point_coords {tuple(point_coords.shape)}, "
                f"point_labels {tuple(point_labels.shape)}"
            )
        if prompt_valid is None:
            prompt_valid = torch.ones((B, Z), dtype=torch.bool, device=point_coords.device)
        size, with_classes = self.window_size, self.num_classes > 0
        masks, ious, origins, classes = [], [], [], []
        for b in range(B):
            keep = prompt_valid[b].to(torch.bool)
            m_v, i_v, o_v, *c_v = decode_at_points(self, embeddings[b], point_coords[b][keep], point_labels[b][keep],
                                                   with_classes=with_classes)
            masks.append(m_v.new_zeros((Z, size, size)).index_put((keep,), m_v))
            ious.append(i_v.new_zeros((Z,)).index_put((keep,), i_v))
            origins.append(o_v.new_zeros((Z, 2)).index_put((keep,), o_v))
            if with_classes:
                classes.append(c_v[0].new_zeros((Z, self.num_classes + 1)).index_put((keep,), c_v[0]))
        out = {"mask_logits": torch.stack(masks), "iou_pred": torch.stack(ious), "window_origins": torch.stack(origins)}
        if with_classes:
            out["class_logits"] = torch.stack(classes)
        return out


OUTSIDE_LOGIT = -1e4  # logit of the pixels outside a prompt's decoding window


def _run_in(module: nn.Module, dtype: torch.dtype, *args: Any) -> Any:
    """``module(*args)`` with its floating-point parameters and buffers cast to ``dtype`` for this call only."""
    state = dict(chain(module.named_parameters(), module.named_buffers()))
    if all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return module(*args)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return torch.func.functional_call(module, cast, args)


def _check_prompts(point_coords: torch.Tensor, point_labels: torch.Tensor) -> None:
    if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_labels.shape != point_coords.shape[:2]:
        raise ValueError(
            f"point_coords must be (Z, P, 2) and point_labels (Z, P); got {tuple(point_coords.shape)} and "
            f"{tuple(point_labels.shape)}"
        )


def window_origins(points: torch.Tensor, stride: int, grid: int, tokens: tuple[int, int]) -> torch.Tensor:
    """(N, 2) int64 (x, y) token index of the top-left of each point's decoding window: ``grid`` x ``grid`` tokens
    centred on the token holding the (x, y) px point, moved inside the (rows, cols) = ``tokens`` embedding."""
    token = torch.div(points.float(), stride, rounding_mode="floor").long()
    limits = torch.tensor([tokens[1] - grid, tokens[0] - grid], device=token.device)
    return torch.minimum(torch.clamp(token - grid // 2, min=0), limits)


def outside_as_padding(coords: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """Labels with the negative prompts outside the ``size`` px square window (coords (x, y) px relative to its
    top-left) turned into padding (-1): the decoder only sees points in its window."""
    x, y = coords[..., 0], coords[..., 1]
    outside = (x < 0) | (y < 0) | (x >= size) | (y >= size)
    return torch.where(outside & (labels == 0), torch.full_like(labels, -1), labels)


def window_index(origins: torch.Tensor, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices, (N, size, 1) and (N, 1, size), of ``size`` x ``size`` windows whose top-left corners
    are ``origins`` (N, 2) (x, y), in the units of the origins (tokens or px)."""
    steps = torch.arange(size, device=device)
    origins = origins.to(device)
    return (origins[:, 1, None] + steps)[:, :, None], (origins[:, 0, None] + steps)[:, None, :]


def decode_at_points(
    segmentor: nn.Module, embedding: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
    with_classes: bool = False, tokens: int | None = None, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Decode each prompt on the embedding window centred on its positive point (all prompts in one decoder call).

    ``tokens`` < the segmentor's window (``decoder_tokens``, for speed): each prompt is decoded on the central
    ``tokens`` x ``tokens`` of its window only, with that part's positional encoding, and its points placed as in
    the whole window centred on it; the decoder's cost is proportional to the tokens, and pixels outside the
    smaller window get no mask.

    Args:
        segmentor: a :class:`Segmentor` (or anything with ``embedding_size``, ``patch_size`` and
            ``decode_windows``).
        embedding: (C, h, w) image embedding of any size (at least the window's grid).
        point_coords: (Z, P, 2) (x, y) px in the embedded image; point 0 of each prompt is its positive point.
        point_labels: (Z, P) 1 positive, 0 negative, -1 padding; negatives outside the window become padding.
        with_classes: also return the [cls] head's class logits (Z, C + 1), last (a segmentor with a [cls] token).
        tokens: tokens per side of the decoded window (None, or as many as the segmentor's window has: all of it).
        dtype: the mask decoder's arithmetic (:meth:`Segmentor.decode_windows`; None: its own).

    Returns:
        mask_logits (Z, S, S) (S = decoded window px), iou_pred (Z,), and each window's top-left (x, y) px (Z, 2)
        int64.
    """
    _check_prompts(point_coords, point_labels)
    grid, stride = int(segmentor.embedding_size[0]), int(segmentor.patch_size)
    size = grid if tokens is None else min(int(tokens), grid)
    if size < 1:
        raise ValueError(f"decoder_tokens must be at least 1, got {tokens}")
    if embedding.shape[-2] < grid or embedding.shape[-1] < grid:
        raise ValueError(f"embedding {tuple(embedding.shape)} is smaller than the decoding window ({grid} tokens)")
    margin = grid // 2 - size // 2  # the decoded part's first token in the whole window centred on the prompt
    origins = window_origins(point_coords[:, 0], stride, size, tuple(embedding.shape[-2:]))
    rows, cols = window_index(origins, size, embedding.device)
    # gathered channels last (whole token vectors), seen as (Z, C, size, size); the pipeline's embeddings are
    # channels last in memory already (``PromptNucSeg.embed``), so ``contiguous`` copies nothing
    windows = embedding.permute(1, 2, 0).contiguous()[rows, cols].permute(0, 3, 1, 2)
    offsets = origins * stride
    local = point_coords - offsets[:, None, :].to(point_coords)
    # negatives outside the whole window centred alike are padding, as when decoding all of it
    labels = outside_as_padding(local + margin * stride, point_labels, grid * stride)
    options = {"pe_offset": margin} if margin else {}  # (only what differs: stand-in segmentors of the tests)
    options.update({"dtype": dtype} if dtype not in (None, torch.float32) else {})
    if with_classes:
        logits, iou, class_logits = segmentor.decode_windows(windows, local, labels, with_classes=True, **options)
        return logits, iou, offsets, class_logits
    logits, iou = segmentor.decode_windows(windows, local, labels, **options)
    return logits, iou, offsets


def crop_windows(images: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) crops of (N, H, W) ``images`` at (x, y) px top-left ``origins`` (N, 2); 0 outside the image."""
    n, height, width = images.shape
    rows, cols = window_index(origins, size, images.device)
    inside = (rows < height) & (cols < width)
    crops = images[torch.arange(n, device=images.device)[:, None, None], rows.clamp(max=height - 1),
                   cols.clamp(max=width - 1)]
    return torch.where(inside, crops, torch.zeros((), dtype=images.dtype, device=images.device))


def paste_windows(logits: torch.Tensor, origins: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) image-sized logits from (N, S, S) window logits at (x, y) px top-left ``origins`` (N, 2);
    ``OUTSIDE_LOGIT`` outside each window."""
    n, size = logits.shape[0], logits.shape[-1]
    height, width = shape
    pad_h, pad_w = max(height, int(origins[:, 1].max()) + size), max(width, int(origins[:, 0].max()) + size)
    canvas = logits.new_full((n, pad_h, pad_w), OUTSIDE_LOGIT)
    rows, cols = window_index(origins, size, logits.device)
    canvas[torch.arange(n, device=logits.device)[:, None, None], rows, cols] = logits
    return canvas[:, :height, :width]
