"""The pipeline's options, stated once: :class:`PipelineOptions` (how the prompter and segmentor run on an image) and
:class:`SlideOptions` (how a whole slide is read and tiled). ``configs/inference.json``, ``configs/evaluate.json``
and the MONAI Label app build them; their defaults live here only.

Options arrive as text from the command line (``--pipeline#prompter_tta false``) and from MONAI Label's ``--conf``:
every field is converted to its type here, strictly (:mod:`scripts.parse`), and a wrong value names the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from scripts.parse import as_bool, as_number

@dataclass(frozen=True)
class PipelineOptions:
    """How :class:`scripts.pipeline.promptnucseg.PromptNucSeg` runs (lengths in px of the input image).

    Attributes:
        num_neg: K, nearest other prompts used as negative prompts of each prompt (paper Eq. 7; 1 in the paper).
        mask_filter: mask-aided prompt filtering: keep prompts where the auxiliary nuclear map > 0.5 (§3.3).
        nms_radius: point NMS radius (0: off).
        score_threshold: optional minimum class score of a prompt.
        foreground_threshold: an anchor is a nucleus when its summed nucleus-class probability reaches this;
            None: when its argmax is not background (the official rule).
        prompter_tta: prompts from the prompter's 8 flips and quarter-turns of each tile, kept when found in 4.
        min_area: instances with fewer pixels (after overlap resolution) are dropped.
        tile_overlap: overlap between neighbouring prompter and encoder tiles.
        prompter_tile_size: the prompter's largest tile; larger images are covered by the fewest tiles of at most
            this size, shrunk to share the surplus out (:func:`scripts.pipeline.tiling.fitted_tile_size`: the work
            grows with the image, not with how its size falls on the tiles). None: the whole image at once.
        chunk_size: prompts per mask-decoder call (bounds memory).
        encoder_batch: encoder tiles per encoder call.
        encoder_tile_size: the segmentor encoder's largest tile (multiple of 32; fitted likewise); None: its input
            size for a ViT, 1536 for a convolutional encoder.
        whole_image_encoder: run a convolutional encoder on the whole image in one pass instead of tiles.
        input_scale: ``auto`` (decided per image or slide from its resolution metadata or its nuclei:
            :mod:`scripts.pipeline.scale`), or resample the image by this factor first (the default model is trained
            at 40x, 0.25 µm/px: a 20x image takes 2.0); outputs are mapped back to the input's pixels.
        assembly: how masks become the instance map: ``ours`` (stitched embedding, each prompt decoded on the
            window centred on it, overlaps by predicted IoU, one region per instance, ``min_area``) or
            ``official`` (the authors' code: :mod:`scripts.pipeline.official`).
        official_box_nms: the official assembly's box-NMS IoU threshold (0.3 Kumar, 0.5 CPM-17 and PanNuke).
        decoder_tokens: tokens per side of the window each prompt is decoded on: the central part of the
            segmentor's decoding window (``decoder_window``; None, or at least its tokens: all of it); the decoder's
            time is proportional to the tokens (16 of the shipped model's 24: 64 px of its 96 px, held-out PQ
            unchanged; 12 keep the PQ of 40x images but not the scale check's: docs/benchmarks/scale.md).
        precision: ``bfloat16``: the prompter and the image encoder run under ``torch.autocast`` to bfloat16, the mask
            decoder in bfloat16 (outputs stay float32); ``float32``; ``auto``: bfloat16 on CPUs with native
            bfloat16 instructions (AVX512-BF16 or AMX), float32 elsewhere (older CPUs, GPUs).
    """

    num_neg: int = 1
    mask_filter: bool = True
    nms_radius: float = 12.0
    score_threshold: float | None = None
    foreground_threshold: float | None = None
    prompter_tta: bool = False
    min_area: int = 10
    tile_overlap: int = 128
    prompter_tile_size: int | None = 1536
    chunk_size: int = 128
    encoder_batch: int = 4
    encoder_tile_size: int | None = None
    whole_image_encoder: bool = False
    input_scale: float | str = "auto"
    assembly: str = "ours"
    official_box_nms: float = 0.5
    decoder_tokens: int | None = 16
    precision: str = "auto"

    def __post_init__(self) -> None:
        convert = {
            "num_neg": lambda v, n: as_number(v, n, int, 0),
            "mask_filter": as_bool,
            "nms_radius": lambda v, n: as_number(v, n, float, 0),
            "score_threshold": lambda v, n: as_number(v, n, float, 0, optional=True),
            "foreground_threshold": lambda v, n: as_number(v, n, float, 0, optional=True),
            "prompter_tta": as_bool,
            "min_area": lambda v, n: as_number(v, n, int, 0),
            "tile_overlap": lambda v, n: as_number(v, n, int, 0),
            "prompter_tile_size": lambda v, n: as_number(v, n, int, 32, optional=True),
            "chunk_size": lambda v, n: as_number(v, n, int, 1),
            "encoder_batch": lambda v, n: as_number(v, n, int, 1),
            "encoder_tile_size": lambda v, n: as_number(v, n, int, 32, optional=True),
            "whole_image_encoder": as_bool,
            "input_scale": as_input_scale,
            "assembly": lambda v, n: as_choice(v, n, ASSEMBLIES),
            "official_box_nms": as_fraction,
            "decoder_tokens": lambda v, n: as_number(v, n, int, 1, optional=True),
            "precision": lambda v, n: as_choice(v, n, PRECISIONS),
        }
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, convert[field.name](getattr(self, field.name), field.name))

    def replace(self, **changes: Any) -> "PipelineOptions":
        """A copy with ``changes`` (unknown names are an error naming them)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown pipeline option(s) {unknown}; known: {option_names()}")
        return dataclasses.replace(self, **changes)


def as_scale(value: Any, name: str) -> float:
    """``value`` as an image resampling factor in [0.1, 10] (the error names the option ``name``)."""
    scale = as_number(value, name, float)
    if not 0.1 <= scale <= 10:
        raise ValueError(f"{name} must be between 0.1 and 10, got {value!r}")
    return scale


ASSEMBLIES = ("ours", "official")
PRECISIONS = ("auto", "float32", "bfloat16")


def arithmetic_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The arithmetic that the ``precision`` option (one of :data:`PRECISIONS`) means on ``device``: bfloat16 when
    asked, or with ``auto`` on a CPU with native bfloat16 instructions (AVX512-BF16 or AMX); float32 otherwise."""
    precision = as_choice(precision, "precision", PRECISIONS)
    if precision == "auto":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = torch.device(device).type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def as_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (any case, surrounding blanks ignored); anything else names the option."""
    word = value.strip().lower() if isinstance(value, str) else value
    if word not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return word


def as_fraction(value: Any, name: str) -> float:
    """``value`` as a number in [0, 1] (the error names the option ``name``)."""
    number = as_number(value, name, float, 0)
    if number > 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return number


def as_input_scale(value: Any, name: str) -> float | str:
    """``auto`` (any case) or a resampling factor (:func:`as_scale`); the error names the option ``name``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return as_scale(value, name)
    except ValueError as error:
        raise ValueError(f"{error} (or 'auto')") from None


def option_names() -> list[str]:
    """The names of :class:`PipelineOptions`'s fields."""
    return [f.name for f in dataclasses.fields(PipelineOptions)]


@dataclass(frozen=True)
class SlideOptions:
    """Whole-slide settings.

    Attributes:
        mpp: µm/px to read at: the level nearest it; a slide coarser than that is read at level 0 and its tiles
            enlarged to ``mpp`` for the model (0.25 for the default 40x model). None: ``level``.
        level: the pyramid level to read when ``mpp`` is None (None: level 0).
        tile_size, tile_overlap: tiles in that level's px (an overlap of twice the segmentor's half window keeps
            every nucleus centred in its decoding window).
        min_tissue_fraction: a tile with less tissue than this (on the low-resolution tissue mask) is skipped.
        backend: slide reader (``tifffile``, ``openslide`` or ``cucim``).
        thumbnail_size: longest side of the overlay thumbnail (px).
        min_slide_side: an image whose longer side reaches this many px is processed as a slide.
    """

    mpp: float | None = None
    level: int | None = None
    tile_size: int = 2048
    tile_overlap: int = 256
    min_tissue_fraction: float = 0.05
    backend: str = "tifffile"
    thumbnail_size: int = 2048
    min_slide_side: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "mpp", as_number(self.mpp, "slide#mpp", float, 0, optional=True))
        object.__setattr__(self, "level", as_number(self.level, "slide#level", int, 0, optional=True))
        for name, minimum in (("tile_size", 64), ("tile_overlap", 0), ("thumbnail_size", 16), ("min_slide_side", 1)):
            object.__setattr__(self, name, as_number(getattr(self, name), f"slide#{name}", int, minimum))
        fraction = as_number(self.min_tissue_fraction, "slide#min_tissue_fraction", float, 0)
        object.__setattr__(self, "min_tissue_fraction", fraction)
        if self.tile_overlap >= self.tile_size:
            raise ValueError(f"slide#tile_overlap {self.tile_overlap} must be smaller than slide#tile_size "
                             f"{self.tile_size}")
