"""The one record every dataset reader returns, and class tables.

A class table is ``{class_id: {"name": str, "color": [r, g, b]}}`` with ids from 1 (0 is background). A model
carries its own (:mod:`scripts.pipeline.model_file`); ``configs/metadata.json`` documents the shipped model's, which
is also the default for datasets whose files name no classes.

Coordinates: arrays are indexed (row, col); every point this bundle stores is (x, y) = (col, row) in pixels
unless a name says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np

METADATA_PATH = Path(__file__).resolve().parents[2] / "configs" / "metadata.json"


@dataclass
class NucleusRecord:
    """One image with its nucleus instance labels.

    Attributes:
        name: a unique stem for the image within its dataset (used to match predictions).
        image: RGB uint8 array (H, W, 3).
        inst_map: int32 array (H, W); 0 = background, every other value one nucleus (ids need not be contiguous).
        type_map: optional int32 array (H, W); 0 = background, 1..C = class of the nucleus at that pixel.
        tissue: optional tissue name (PanNuke), used to average metrics per tissue.
        source: the file the record was read from (for error messages).
    """

    name: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray | None = None
    tissue: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.source or self.name}: image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}")
        if self.inst_map.shape != self.image.shape[:2]:
            raise ValueError(
                f"{self.source or self.name}: instance map shape {self.inst_map.shape} does not match image {self.image.shape[:2]}"
            )
        if self.type_map is not None and self.type_map.shape != self.inst_map.shape:
            raise ValueError(f"{self.source or self.name}: class map shape {self.type_map.shape} does not match {self.inst_map.shape}")


@dataclass
class DatasetItem:
    """A lazily loaded record: ``load()`` reads the files only when called (datasets can be larger than memory)."""

    name: str
    source: str
    loader: Callable[[], NucleusRecord] = field(repr=False)
    tissue: str | None = None

    def load(self) -> NucleusRecord:
        return self.loader()


def load_class_table(metadata_path: str | Path = METADATA_PATH) -> dict[int, dict]:
    """Class table from ``metadata.json``: ``{class_id: {"name": str, "color": [r, g, b]}}``, ids from 1."""
    with open(metadata_path) as f:
        table = json.load(f)["class_table"]
    return {int(k): {"name": v["name"], "color": list(v["color"])} for k, v in table.items()}


# Distinct colours for the classes of a new table (the bundle table's colour wins for a name it knows).
PALETTE = ((255, 165, 0), (255, 0, 0), (0, 200, 0), (0, 120, 255), (160, 32, 240), (0, 200, 200), (255, 0, 255),
           (128, 64, 0), (255, 215, 0), (0, 0, 139), (128, 128, 0), (255, 105, 180))


def class_table_from_names(names: Sequence[str], known: Mapping[int, Mapping] | None = None) -> dict[int, dict]:
    """A class table for classes 1..len(names): each name with the colour ``known`` (default: the bundle's table)
    gives that name, else the next unused colour of :data:`PALETTE`."""
    known_colors = {entry["name"]: list(entry["color"]) for entry in (load_class_table() if known is None
                                                                        else known).values()}
    spare = [list(c) for c in PALETTE if list(c) not in known_colors.values()] + [list(c) for c in PALETTE]
    table = {}
    for class_id, name in enumerate(map(str, names), start=1):
        table[class_id] = {"name": name, "color": known_colors[name] if name in known_colors else spare.pop(0)}
    return table
