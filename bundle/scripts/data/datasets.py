"""Datasets for training and validation: split, load, crop and collate nucleus records as MONAI dictionaries.

Dictionary keys (channel-first, the MONAI convention):
    ``image`` (3, H, W) float32 in [0, 255]; ``inst`` (1, H, W) int32 instance ids, 0 = background;
    ``type`` (1, H, W) int32 class ids, 0 = background (all zeros for untyped data); ``name``; ``tissue``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import MapTransform
from PIL import Image

from scripts.data.readers import dataset_folders, list_items
from scripts.data.readers.common import check_unique_names
from scripts.data.records import DatasetItem

IMAGE_KEYS = ("image", "inst", "type")


def split_items(
    items: Sequence[DatasetItem], val_fraction: float = 0.1, seed: int = 0, min_val: int = 1
) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """Split dataset items into (train, validation) deterministically by ``seed``.

    Items that share a source image (e.g. the 16 CoNSeP tiles of one image, named ``<image>_<k>``) stay on the
    same side so validation figures are not inflated by neighbouring tiles.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[DatasetItem]] = {}
    for item in items:
        groups.setdefault(_group_of(item.name), []).append(item)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val_groups = max(min_val, int(round(len(keys) * val_fraction)))
    if n_val_groups >= len(keys):
        raise ValueError(f"cannot split {len(items)} item(s) in {len(keys)} group(s) into train and validation")
    val_keys = set(keys[:n_val_groups])
    train = [it for k in keys if k not in val_keys for it in groups[k]]
    val = [it for k in keys if k in val_keys for it in groups[k]]
    return sorted(train, key=lambda it: it.name), sorted(val, key=lambda it: it.name)


TILE_NAME = re.compile(r"^(.+_\d+)_\d{3}$")


def _group_of(name: str) -> str:
    """The source image of a tile name ``<image>_<k>_<tile>``: ``train_10_003`` → ``train_10``.

    Any other name (``synthetic_003``, ``TCGA-...``) is its own group.
    """
    match = TILE_NAME.match(name)
    return match.group(1) if match else name


def train_val_items(
    dataset_dir: str | Sequence[str],
    dataset_format: str = "auto",
    val_dir: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """Training and validation items: ``val_dir`` when given, else a split of ``dataset_dir``.

    ``dataset_dir`` may be a list of folders (all of ``dataset_format``, or ``auto`` to detect each); each
    folder is split on its own by ``val_fraction``, so every source has images in validation.
    """
    per_dir = [list_items(folder, dataset_format) for folder in dataset_folders(dataset_dir)]
    items = [it for folder_items in per_dir for it in folder_items]
    if not items:
        raise ValueError(f"no images found in dataset_dir={dataset_dir!r}")
    check_unique_names(items)
    if val_dir:
        return items, list_items(val_dir, dataset_format)
    splits = [split_items(folder_items, val_fraction=val_fraction, seed=seed) for folder_items in per_dir]
    return [it for train, _ in splits for it in train], [it for _, val in splits for it in val]


def image_size(item: DatasetItem) -> tuple[int, int]:
    """(height, width) in pixels of an item's image, from the file header when PIL can read it, else by loading."""
    try:
        with Image.open(item.source) as image:
            width, height = image.size
        return int(height), int(width)
    except (OSError, ValueError):
        return tuple(item.load().image.shape[:2])  # type: ignore[return-value]


def repeat_by_area(items: Sequence[DatasetItem], patch_size: int) -> list[DatasetItem]:
    """Each item ``max(1, round(H * W / patch_size²))`` times, so that a 1000 px image gives as many random
    training crops per epoch as the 256 px tiles covering it (otherwise large images are under-sampled).

    A repeated item's record is read once and kept in memory (the loader returns the same record; the
    loading transform copies its arrays).
    """
    repeated = []
    for item in items:
        height, width = image_size(item)
        repeats = max(1, round(height * width / float(patch_size) ** 2))
        if repeats > 1:  # read a large image once, not once per crop (a MoNuSeg XML takes ~0.35 s to rasterise)
            item = dataclasses.replace(item, loader=functools.cache(item.loader))
        repeated += [item] * repeats
    return repeated


def as_dicts(items: Sequence[DatasetItem]) -> list[dict]:
    """Wrap items for a MONAI ``Dataset`` whose first transform is :class:`LoadNucleusItemd`."""
    return [{"item": it, "name": it.name} for it in items]


class LoadNucleusItemd(MapTransform):
    """Load a :class:`DatasetItem` into channel-first arrays (see the module docstring for the keys)."""

    def __init__(self, keys: str = "item", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        record = d.pop(self.keys[0]).load()
        d["image"] = np.ascontiguousarray(record.image.transpose(2, 0, 1), dtype=np.float32)
        d["inst"] = record.inst_map.astype(np.int32)[None]
        type_map = record.type_map if record.type_map is not None else np.zeros_like(record.inst_map)
        d["type"] = type_map.astype(np.int32)[None]
        d["name"] = record.name
        d["tissue"] = record.tissue or ""
        return d


class PadToMultipled(MapTransform):
    """Pad right/bottom so height and width are at least ``min_size`` and multiples of ``multiple`` (px)."""

    def __init__(self, keys: Sequence[str] = IMAGE_KEYS, multiple: int = 16, min_size: int = 0) -> None:
        super().__init__(keys)
        self.multiple = multiple
        self.min_size = min_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            h, w = d[key].shape[-2:]
            th = max(self.min_size, -(-h // self.multiple) * self.multiple)
            tw = max(self.min_size, -(-w // self.multiple) * self.multiple)
            if (th, tw) != (h, w):
                pad = [(0, 0)] * (d[key].ndim - 2) + [(0, th - h), (0, tw - w)]
                fill = 255.0 if key == "image" else 0  # white glass, as a slide's background
                d[key] = np.pad(np.asarray(d[key]), pad, constant_values=fill)
        return d


def grid_crop_items(items: Sequence[DatasetItem], patch_size: int) -> list[dict]:
    """Dictionaries for a deterministic validation set of ``patch_size`` crops covering every image.

    Images are read once here to know their size. Each dict holds ``item`` and ``crop`` = (y0, x0) in px.
    """
    crops = []
    for item in items:
        height, width = item.load().image.shape[:2]
        for y0 in range(0, max(1, height - patch_size // 4), patch_size):
            for x0 in range(0, max(1, width - patch_size // 4), patch_size):
                crops.append({"item": item, "name": f"{item.name}@{x0}_{y0}", "crop": (y0, x0)})
    return crops


class CropBoxd(MapTransform):
    """Crop ``patch_size`` px at the dict's ``crop`` = (y0, x0) (row, col) origin; padding is left to the next step."""

    def __init__(self, keys: Sequence[str] = IMAGE_KEYS, patch_size: int = 256) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.patch_size = patch_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if "crop" not in d:
            return d
        y0, x0 = d.pop("crop")
        for key in self.key_iterator(d):
            d[key] = d[key][..., y0 : y0 + self.patch_size, x0 : x0 + self.patch_size]
        return d


class ListCollate:
    """``list_data_collate`` for fixed-size keys; keys of variable length per image (points) are kept as lists."""

    def __init__(self, list_keys: Sequence[str] = ("points", "point_classes")) -> None:
        self.list_keys = tuple(list_keys)

    def __call__(self, batch: Sequence[dict]) -> dict:
        lists = {k: [torch.as_tensor(np.asarray(b[k])) for b in batch] for k in self.list_keys if k in batch[0]}
        rest = [{k: v for k, v in b.items() if k not in lists} for b in batch]
        collated = list_data_collate(rest)
        collated.update(lists)
        return collated


def make_dataset(data: Sequence[dict], transform: Any) -> Dataset:
    """A plain MONAI ``Dataset`` (records are loaded lazily, so building it costs nothing)."""
    return Dataset(data=list(data), transform=transform)
