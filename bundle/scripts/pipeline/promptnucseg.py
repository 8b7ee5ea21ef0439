"""PromptNucSeg's automatic pipeline (paper Fig. 1b) as one network: prompter → segmentor → instance map.

Images of any size: the segmentor's image encoder runs on square tiles of its input size with overlap, and the
embedding of the whole image is stitched from the tiles' *cores* (the tile minus half the overlap on each inner
side, aligned to the token grid), so every token was computed with at least ``tile_overlap / 2`` px of context.
Each prompt is then decoded on the window of that embedding centred on its point (the segmentor's decoding
window: its input size or ``decoder_window``, moved inside the image at its borders): a nucleus is always seen in the middle of its window, wherever the tile
borders fall, and the result does not depend on the tiling beyond the encoder's context (the encoder can also
run on the whole image in one pass, ``whole_image_encoder``, for convolutional encoders). The mask decoder is
batched over all prompts. Overlapping masks are resolved by predicted IoU (higher wins) over the whole image.

Coordinates: points are (x, y) = (col, row) in pixels of the input image.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from scripts.pipeline.instances import keep_one_region
from scripts.pipeline.official import official_segment
from scripts.pipeline.options import PipelineOptions, arithmetic_dtype, as_input_scale
from scripts.pipeline.scale import (NUCLEUS_AREA, TRAINING_MPP, RunEvidence, ScaleChoice, ScaleRule,
                                     candidate_scale, median_area, resample, sample_rows, scale_from_mpp,
                                     scaled_points)
from scripts.pipeline.tiling import fitted_tile_size, tile_grid
from scripts.prompter.decode import decode_prompts, point_nms
from scripts.prompter.tta import prompts_tta
from scripts.segmentor.classifier import check_classifier, classes_from_logits
from scripts.segmentor.net import decode_at_points, window_origins
from scripts.segmentor.prompts import knn_negative_prompts


ENCODER_TILE = 1536  # px, the default tile of a convolutional image encoder (encoder_tile_size None)


class PromptNucSeg(nn.Module):
    """Prompter + segmentor: an RGB image in, instance map, class map and a per-nucleus table out.

    Args:
        prompter: a :class:`scripts.prompter.net.Prompter`.
        segmentor: a :class:`scripts.segmentor.net.Segmentor` (its ``image_size`` is the tile size).
        options: how it runs (:class:`scripts.pipeline.options.PipelineOptions`; its defaults when None).
        class_table: ``{class_id: {"name", "color"}}`` of the model's classes (the model file's own table).
        classifier: which network gives each nucleus its class and class score: ``prompter`` (the paper's choice)
            or ``segmentor`` (its [cls] head, paper Table 8; the model file says which).
        training_scale: ``{"mpp": µm/px, "nucleus_area": median px²}`` of the training data (the model file's;
            :mod:`scripts.pipeline.scale`'s defaults for the default model when None).
        **changes: options to change from ``options`` by name (``prompter_tta=True``).
    """

    def __init__(self, prompter: nn.Module, segmentor: nn.Module, options: PipelineOptions | None = None,
                 class_table: Mapping[int, Mapping] | None = None, classifier: str = "prompter",
                 training_scale: Mapping[str, float] | None = None, **changes: Any) -> None:
        super().__init__()
        self.prompter = prompter
        self.segmentor = segmentor
        self.options = (options or PipelineOptions()).replace(**changes)
        self.class_table = {int(k): dict(v) for k, v in (class_table or {}).items()}
        self.classifier = check_classifier(classifier)
        scale = dict(training_scale or {})
        self.training_mpp = float(scale.get("mpp", TRAINING_MPP))
        self.nucleus_area = float(scale.get("nucleus_area", NUCLEUS_AREA))
        self.scale_rule = ScaleRule()
        self.run_evidence = RunEvidence()  # the scale checks of the images segmented so far
        self._lowered_copies: dict[int, tuple[tuple, nn.Module]] = {}  # :meth:`lowered`'s (not submodules)
        if classifier == "segmentor" and not getattr(segmentor, "num_classes", 0):
            raise ValueError("classifier 'segmentor' needs a segmentor with a [cls] head (num_classes > 0)")

    @property
    def tile_size(self) -> int:
        return int(self.segmentor.image_size)

    def fingerprint(self) -> str:
        """SHA-1 (hex) of the weights: the same model gives the same text (a slide run is resumed only by it)."""
        digest = hashlib.sha1()
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def forward(self, image: torch.Tensor, prompts: dict[str, torch.Tensor] | None = None,
                input_scale: float | str | None = None, mpp: float | None = None) -> dict[str, Any]:
        """Segment every nucleus of one image.

        Args:
            image: (3, H, W) or (1, 3, H, W) float RGB in [0, 255].
            prompts: optional given prompts ``{points (N, 2) (x, y) px, classes (N,), scores (N,)}`` (e.g. the
                ground truth, or a user's clicks); by default the prompter finds them.
            input_scale: this call's resampling factor, or ``auto`` (default: the pipeline's ``input_scale``).
            mpp: the image's µm/px from its metadata, if any (read by ``auto``; see :mod:`scripts.pipeline.scale`).

        Returns:
            ``inst_map`` (H, W) int32 (0 = background, ids 1..M), ``type_map`` (H, W) int32 (0 = background),
            ``points`` (M, 2) float (x, y) px, ``classes`` (M,) int64, ``scores`` (M,) class scores,
            ``ious`` (M,) predicted IoU; row i describes instance id i + 1; ``scale``: the
            :class:`~scripts.pipeline.scale.ScaleChoice` it ran at.
        """
        image = self._check_image(image)
        requested = self.options.input_scale if input_scale is None else as_input_scale(input_scale, "input_scale")
        if requested == "auto" and prompts is None:
            return self._auto_scale(image, mpp)
        scale = 1.0 if requested == "auto" else requested
        source = "default" if requested == "auto" else "given"
        out = self._at_scale(image, prompts, scale)
        out["scale"] = ScaleChoice(scale, source, mpp if mpp is not None else self.training_mpp / scale)
        return out

    def _at_scale(self, image: torch.Tensor, prompts: dict[str, torch.Tensor] | None, scale: float
                  ) -> dict[str, Any]:
        return self._run(image, prompts) if scale == 1.0 else self._rescaled(image, prompts, scale)

    def _auto_scale(self, image: torch.Tensor, mpp: float | None) -> dict[str, Any]:
        """:meth:`forward` with ``input_scale auto`` (rules: :mod:`scripts.pipeline.scale`)."""
        if mpp is not None:
            scale = scale_from_mpp(mpp, self.training_mpp)
            out = self._at_scale(image, None, scale)
            better = self._nuclei_scale(image, out, scale)
            note = (f"the image's {mpp:.4g} um/px gives scale {scale:.3g}, but its nuclei look right at scale "
                    f"{better:.3g}: check its resolution metadata" if better != scale else "")
            out["scale"] = ScaleChoice(scale, "metadata", mpp, note)
            return out
        out = self._run(image, None)
        scale = self._nuclei_scale(image, out, 1.0)
        if scale != 1.0:
            out = self._rescaled(image, None, scale)
            out["scale"] = ScaleChoice(scale, "nuclei", self.training_mpp / scale,
                                       f"nuclei look like scale {scale:.3g} of the training data")
        else:
            out["scale"] = ScaleChoice(1.0, "default", None)
        return out

    def _nuclei_scale(self, image: torch.Tensor, out: dict[str, Any], scale: float) -> float:
        """The scale the nuclei of ``out`` (segmented at ``scale``) ask for: ``scale``, or the candidate of
        :func:`~scripts.pipeline.scale.candidate_scale` times it when the segmentor is surer there (or when a
        settled run of tiles says so, :meth:`~scripts.pipeline.scale.RunEvidence.follow`)."""
        rule, evidence = self.scale_rule, self.run_evidence
        area, count = median_area(out["inst_map"])
        area = area * scale**2  # px² of the image at the scale it ran at
        if count < rule.min_nuclei:  # too few to tell: the run's evidence for enlarging, if any
            return scale * 2.0 if evidence.verdict(2.0, rule) else scale
        candidate = candidate_scale(area, count, self.nucleus_area, rule)
        if candidate is None:
            return scale
        follows = evidence.follow(candidate, count, rule)
        if follows is not None:
            return scale * candidate if follows else scale
        rows = sample_rows(count, rule.sample)
        here = out["ious"][rows].float()
        there = self._ious_at(image, out["points"], rows, scale * candidate)
        gain = float((there - here).mean())
        own = rule.own_verdict(gain, area, self.nucleus_area)
        evidence.add(candidate, gain, len(rows), own, rule)
        run = evidence.verdict(candidate, rule)
        alone = len(rows) >= rule.own_nuclei or run is None
        return scale * candidate if (own if alone else run) else scale

    def _ious_at(self, image: torch.Tensor, points: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Predicted IoUs (len(rows),) of the prompts ``points[rows]`` decoded on the image resampled by ``scale``
        (negatives: their nearest others among all ``points``), with the decoder's window and arithmetic of
        :meth:`segment` (``decoder_tokens``, ``precision``), so that they pair with the IoUs of the first pass."""
        resampled = resample(image, scale)
        moved = scaled_points(points, scale)
        coords, labels = negative_prompts(moved, None, self.options.num_neg)
        device = self._device(self.segmentor)
        embedding = self.embed(resampled, moved[rows]).to(device)
        _, ious, _ = decode_at_points(self.segmentor, embedding, coords[rows].to(device), labels[rows].to(device),
                                      tokens=self.options.decoder_tokens, dtype=self.dtype(self.segmentor))
        return ious.float().cpu()

    def _run(self, image: torch.Tensor, prompts: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """:meth:`forward` at the image's own resolution."""
        if prompts is None:
            prompts = self.find_prompts(image)
        if self.classifier == "segmentor":  # given prompts' classes too: the segmentor classifies every nucleus
            inst_map, prompt_of_id, ious, class_logits = self.segment(image, prompts["points"], with_classes=True)
            classes, scores = classes_from_logits(class_logits)
        else:
            inst_map, prompt_of_id, ious = self.segment(image, prompts["points"])
            classes, scores = prompts["classes"][prompt_of_id].long(), prompts["scores"][prompt_of_id].float()
        return _instance_outputs(torch.from_numpy(inst_map), prompts["points"][prompt_of_id].float(), classes, scores,
                                 ious)

    def _rescaled(self, image: torch.Tensor, prompts: dict[str, torch.Tensor] | None, scale: float
                  ) -> dict[str, torch.Tensor]:
        """:meth:`forward` on the image resampled by ``scale``, outputs mapped back to the input's pixels."""
        height, width = image.shape[-2:]
        resampled = resample(image, scale)
        if prompts is not None:
            prompts = {**prompts, "points": scaled_points(prompts["points"], scale)}
        out = self._run(resampled, prompts)
        inst = F.interpolate(out["inst_map"][None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
        inst = torch.from_numpy(keep_one_region(inst.long().numpy()))  # resampling can cut a thin neck
        present = torch.unique(inst)
        present = present[present > 0]
        relabel = torch.zeros(len(out["points"]) + 1, dtype=torch.int32)
        relabel[present] = torch.arange(1, len(present) + 1, dtype=torch.int32)
        rows = present - 1
        return _instance_outputs(relabel[inst], (out["points"][rows] + 0.5) / scale - 0.5, out["classes"][rows],
                                 out["scores"][rows], out["ious"][rows])

    @staticmethod
    def _check_image(image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"PromptNucSeg takes one image at a time, got a batch of {image.shape[0]}")
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"image is empty: shape {tuple(image.shape)}")
        return image.float()

    def find_prompts(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point prompts of the whole image: prompter per tile (core points kept), then global point NMS."""
        height, width = image.shape[-2:]
        size = self.options.prompter_tile_size or max(height, width)
        if size < max(height, width):
            size = fitted_tile_size(height, width, size, min(self.options.tile_overlap, size // 2))
        overlap = min(self.options.tile_overlap, size // 2) if size < max(height, width) else 0
        opts = self.options
        options = {"score_threshold": opts.score_threshold, "foreground_threshold": opts.foreground_threshold,
                   "mask_filter": opts.mask_filter, "nms_radius": opts.nms_radius}
        found = []
        for tile in tile_grid(height, width, size, overlap):
            crop = image[:, tile.y0 : tile.y0 + size, tile.x0 : tile.x0 + size]
            batch = crop[None].to(self._device(self.prompter))
            if self.options.prompter_tta:
                pred = prompts_tta(self.run_prompter, batch, **options)
            else:
                pred = decode_prompts(self.run_prompter(batch, region_map=False), image_size=tuple(crop.shape[-2:]),
                                      region_logits_at=self.region_logits_at, **options)[0]
            points = pred["points"].cpu() + torch.tensor([tile.x0, tile.y0], dtype=torch.float32)
            keep = tile.core_holds(points)
            found.append({"points": points[keep], "classes": pred["classes"].cpu()[keep],
                          "scores": pred["scores"].cpu()[keep]})
        prompts = {k: torch.cat([f[k] for f in found]) for k in ("points", "classes", "scores")}
        if self.options.nms_radius:
            keep = point_nms(prompts["points"], prompts["scores"], self.options.nms_radius)
            prompts = {k: v[keep] for k, v in prompts.items()}
        return prompts

    def segment(self, image: torch.Tensor, points: torch.Tensor, extra_negatives: torch.Tensor | None = None,
                with_classes: bool = False) -> tuple[np.ndarray, torch.Tensor, ...]:
        """Instance map from point prompts: the stitched image embedding, each prompt decoded on the window centred
        on it, the mask decoder batched over ``chunk_size`` prompts at a time (``assembly`` ``official``: the
        authors' windows, edge rule, box NMS and painting instead, :mod:`scripts.pipeline.official`).

        Args:
            image: (3, H, W) float RGB in [0, 255].
            points: (N, 2) (x, y) px prompts; each one's K nearest others are its negative prompts.
            extra_negatives: optional (M, 2) (x, y) px points that may serve as negatives (nearest-K together
                with ``points``) but get no mask themselves (e.g. background clicks, neighbours found by the
                prompter around a user's clicks).
            with_classes: also return the (M, C + 1) class logits of the segmentor's [cls] head (Table 8).

        Returns:
            ``inst_map`` (H, W) int32, ``prompt_of_id`` (M,) prompt index of instance id i + 1, ``ious`` (M,)
            (and the class logits (M, C + 1) with ``with_classes``).
        """
        height, width = image.shape[-2:]
        coords, labels = negative_prompts(points, extra_negatives, self.options.num_neg)
        if self.options.assembly == "official":
            if with_classes:
                raise ValueError("--pipeline#assembly official does not take the segmentor's classes (a model whose "
                                 "segmentor classifies): use assembly ours")
            return official_segment(self, image, coords, labels)
        best_score = torch.full((height * width,), -torch.inf)
        owner = torch.zeros(height * width, dtype=torch.int64)  # prompt index + 1
        iou_pred = torch.zeros(len(points))
        class_logits = torch.zeros(len(points), self.segmentor.num_classes + 1) if with_classes else None
        if len(points):
            device = self._device(self.segmentor)
            embedding = self.embed(image, points).to(device)
            for start in range(0, len(points), self.options.chunk_size):
                part = torch.arange(start, min(start + self.options.chunk_size, len(points)))
                logits, ious, offsets, *classes = decode_at_points(
                    self.segmentor, embedding, coords[part].to(device), labels[part].to(device), with_classes,
                    tokens=self.options.decoder_tokens, dtype=self.dtype(self.segmentor))
                self._paint(logits.cpu(), ious.cpu().float(), part, offsets.cpu(), (height, width), best_score, owner)
                iou_pred[part] = ious.cpu().float()
                if with_classes:
                    class_logits[part] = classes[0].cpu().float()
        inst_map, prompt_of_id, ious = self._relabel(owner.view(height, width).numpy(), iou_pred)
        if with_classes:
            return inst_map, prompt_of_id, ious, class_logits[prompt_of_id]
        return inst_map, prompt_of_id, ious

    def _token_grid(self) -> tuple[int, int]:
        """(tokens per decoding-window side, px per token) of the segmentor."""
        return int(self.segmentor.embedding_size[0]), int(self.segmentor.patch_size)

    def embed(self, image: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        """Image embedding (C, Hc / stride, Wc / stride) of the image padded with white (glass) right / bottom to
        a canvas (Hc, Wc): multiples of 32 px, at least the segmentor's input size. The tiled embedding is channels
        last in memory and in the mask decoder's dtype (:meth:`dtype`); the one-pass embedding is float32.

        Tiled (default): the encoder runs on the tiles of the canvas (batches of ``encoder_batch``) whose core
        is needed by the decoding window of one of ``points`` (all tiles when ``points`` is None) and each tile
        writes its core's tokens; tokens of unneeded tiles stay 0. ``whole_image_encoder``: one pass on the canvas.
        """
        grid, stride = self._token_grid()
        height, width = image.shape[-2:]
        multiple = max(2 * stride, 32)
        canvas_h = max(self.tile_size, -(-height // multiple) * multiple)
        canvas_w = max(self.tile_size, -(-width // multiple) * multiple)
        canvas = torch.nn.functional.pad(image.float(), (0, canvas_w - width, 0, canvas_h - height), value=255.0)
        device = self._device(self.segmentor)
        if self.options.whole_image_encoder:
            with self.autocast(self.segmentor):
                return self.segmentor.encode_whole(canvas[None].to(device))[0].float().cpu()
        tile_size = self.encoder_tile(canvas_h, canvas_w)
        overlap = self.encoder_overlap(stride, tile_size)
        tokens_h, tokens_w = canvas_h // stride, canvas_w // stride
        needed = None if points is None else _window_cover(points, stride, grid, (tokens_h, tokens_w))
        jobs = []
        for tile in tile_grid(canvas_h, canvas_w, tile_size, overlap):
            core = tuple(v // stride for v in (tile.core_y0, tile.core_y1, tile.core_x0, tile.core_x1))
            if needed is None or needed[core[0] : core[1], core[2] : core[3]].any():
                jobs.append((tile, core))
        segmentor = self.lowered(self.segmentor)
        encode = segmentor.encode if tile_size == self.tile_size else segmentor.encode_whole
        embedding = None
        stored = self.dtype(self.segmentor)  # the mask decoder's arithmetic: bfloat16 halves a large image's memory
        for start in range(0, len(jobs), self.options.encoder_batch):
            batch = jobs[start : start + self.options.encoder_batch]
            crops = torch.stack([canvas[:, t.y0 : t.y0 + tile_size, t.x0 : t.x0 + tile_size] for t, _ in batch])
            with self.autocast(self.segmentor):
                encoded = encode(_conv_layout(crops.to(device))).to(stored).cpu()
            if embedding is None:  # channels last in memory: each prompt's window is gathered as whole token
                # vectors (``decode_at_points``) without a copy of the image's embedding per chunk of prompts
                embedding = encoded.new_zeros((tokens_h, tokens_w, encoded.shape[1])).permute(2, 0, 1)
            for (tile, (y0, y1, x0, x1)), tile_embedding in zip(batch, encoded):
                ty, tx = tile.y0 // stride, tile.x0 // stride
                embedding[:, y0:y1, x0:x1] = tile_embedding[:, y0 - ty : y1 - ty, x0 - tx : x1 - tx]
        return embedding

    def run_prompter(self, batch: torch.Tensor, region_map: bool = True) -> dict[str, torch.Tensor]:
        """The prompter's outputs on a (B, 3, H, W) batch in ``precision``, as float32 (``aux_features`` in the
        prompter's arithmetic, for :meth:`region_logits_at`, without ``region_map``)."""
        with self.autocast(self.prompter):
            outputs = self.lowered(self.prompter)(_conv_layout(batch), region_map=region_map)
        return {k: v if k == "aux_features" else v.float() for k, v in outputs.items()}

    def region_logits_at(self, p2: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """:meth:`~scripts.prompter.net.Prompter.region_logits_at` in ``precision``, as float32."""
        with self.autocast(self.prompter):
            return self.lowered(self.prompter).region_logits_at(p2, points, size).float()

    def lowered(self, module: nn.Module) -> nn.Module:
        """``module`` to run under :meth:`autocast`: itself in float32; in bfloat16 a copy whose convolution and
        linear weights are stored in bfloat16, so that autocast does not cast every weight again on every call
        (its cast of the float32 weights rounds the same way: outputs bit for bit equal; docs/results/speed.md).
        The copy is kept until ``module``'s weights change (their version counters), its mode or its device."""
        dtype = self.dtype(module)
        if dtype == torch.float32:
            return module
        stamp = (dtype, self._device(module), module.training, tuple(p._version for p in module.parameters()))
        kept = self._lowered_copies.get(id(module))
        if kept is None or kept[0] != stamp:
            lowered = copy.deepcopy(module)
            for layer in lowered.modules():
                if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    layer.to(dtype)
            kept = self._lowered_copies[id(module)] = (stamp, lowered)
        return kept[1]

    def dtype(self, module: nn.Module) -> torch.dtype:
        """The arithmetic of ``module`` (on its device) under the ``precision`` option (:func:`arithmetic_dtype`)."""
        return arithmetic_dtype(self.options.precision, self._device(module))

    def autocast(self, module: nn.Module) -> torch.autocast:
        """``torch.autocast`` to :meth:`dtype` on ``module``'s device (off for float32)."""
        dtype = self.dtype(module)
        return torch.autocast(self._device(module).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def encoder_tile(self, canvas_h: int, canvas_w: int) -> int:
        """The encoder's tile size in px for a (canvas_h, canvas_w) canvas (see ``encoder_tile_size``)."""
        if isinstance(getattr(self.segmentor, "image_encoder", None), ImageEncoderViT):
            return self.tile_size
        size = self.options.encoder_tile_size or max(self.tile_size, ENCODER_TILE)
        size = min(size, max(canvas_h, canvas_w, self.tile_size))
        if size >= max(canvas_h, canvas_w):
            return size
        overlap = min(self.options.tile_overlap, size // 2)
        return max(self.tile_size, fitted_tile_size(canvas_h, canvas_w, size, overlap - overlap % 64))

    def encoder_overlap(self, stride: int, tile_size: int | None = None) -> int:
        """The encoder tiles' overlap in px: ``tile_overlap`` at most half a tile, in whole pairs of tokens (so
        that core borders fall on token borders)."""
        overlap = min(self.options.tile_overlap, (tile_size or self.tile_size) // 2)
        return overlap - overlap % (2 * stride)

    @staticmethod
    def _paint(logits: torch.Tensor, ious: torch.Tensor, prompt_idx: torch.Tensor, origins: torch.Tensor,
               shape: tuple[int, int], best_score: torch.Tensor, owner: torch.Tensor) -> None:
        """Give each pixel of the masks to the prompt with the highest predicted IoU seen so far (vectorised).

        Args:
            logits: (Z, S, S) mask logits of the windows; ious: (Z,); prompt_idx: (Z,) prompt indices.
            origins: (Z, 2) (x, y) px of each window's top-left corner in the image.
            shape: (H, W) of the image; best_score, owner: flat (H * W,) canvases updated in place.
        """
        height, width = shape
        z, rows, cols = torch.nonzero(logits > 0, as_tuple=True)
        y, x = rows + origins[z, 1], cols + origins[z, 0]
        inside = (y < height) & (x < width)
        z, flat = z[inside], (y * width + x)[inside]
        score = ious[z]
        order = torch.argsort(-score, stable=True)  # highest IoU first; equal IoUs: lower prompt index first
        _, first = np.unique(flat[order].numpy(), return_index=True)
        winners = order[torch.from_numpy(first)]
        flat, score, z = flat[winners], score[winners], z[winners]
        beats = score > best_score[flat]
        best_score[flat[beats]] = score[beats]
        owner[flat[beats]] = prompt_idx[z[beats]] + 1

    def _relabel(self, owner: np.ndarray, iou_pred: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Each instance one connected region (:func:`keep_one_region`), contiguous ids 1..M, dropping instances
        under ``min_area`` px."""
        owner = keep_one_region(owner)
        areas = np.bincount(owner.ravel(), minlength=len(iou_pred) + 1)[1:]
        kept = np.flatnonzero(areas >= max(self.options.min_area, 1))
        relabel = np.zeros(len(iou_pred) + 1, np.int32)
        relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.int32)
        prompt_of_id = torch.from_numpy(kept.astype(np.int64))
        return relabel[owner], prompt_of_id, iou_pred[prompt_of_id]

    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        return next(module.parameters()).device


CHANNELS_LAST_ON_CPU = True  # convolutions on CPU read channels-last images (oneDNN's fast layout): 1.1-1.5x


def _conv_layout(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in the memory layout the convolutional networks run fastest on (same values)."""
    if CHANNELS_LAST_ON_CPU and images.device.type == "cpu":
        return images.contiguous(memory_format=torch.channels_last)
    return images


def _instance_outputs(inst_map: torch.Tensor, points: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor,
                      ious: torch.Tensor) -> dict[str, torch.Tensor]:
    """:meth:`PromptNucSeg.forward`'s outputs from an (H, W) int32 instance map with ids 1..M and the M rows of
    per-nucleus values (row i = id i + 1); the class map follows the instances."""
    lut = torch.zeros(len(classes) + 1, dtype=torch.int32)
    lut[1:] = classes.to(torch.int32)
    return {"inst_map": inst_map, "type_map": lut[inst_map.long()], "points": points, "classes": classes,
            "scores": scores, "ious": ious}


def negative_prompts(points: torch.Tensor, extra: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the N points as a positive prompt with its k nearest among ``points`` ∪ ``extra`` as negatives.

    Returns coords (N, 1+k, 2) (x, y) px and labels (N, 1+k) (1 positive, 0 negative, -1 padding).
    """
    n = len(points)
    pool = points.reshape(-1, 2).float()
    if extra is not None and len(extra):
        pool = torch.cat([pool, extra.reshape(-1, 2).float()])
    coords, labels = knn_negative_prompts(pool.numpy(), k)
    return torch.from_numpy(coords[:n]), torch.from_numpy(labels[:n])


def _window_cover(points: torch.Tensor, stride: int, grid: int, tokens: tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool: the tokens inside at least one point's decoding window (2-D difference array)."""
    origins = window_origins(points, stride, grid, tokens).numpy()
    diff = np.zeros((tokens[0] + 1, tokens[1] + 1), np.int64)
    x0, y0 = origins[:, 0], origins[:, 1]
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0 + grid, x0), -1)
    np.add.at(diff, (y0, x0 + grid), -1)
    np.add.at(diff, (y0 + grid, x0 + grid), 1)
    return diff.cumsum(0).cumsum(1)[: tokens[0], : tokens[1]] > 0
