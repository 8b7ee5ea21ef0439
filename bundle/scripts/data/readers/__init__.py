"""Dataset readers: one module per on-disk format, all returning ``scripts.data.records.NucleusRecord``.

Formats (see each module's docstring for the exact layout):

- ``monuseg``  (:mod:`scripts.data.readers.monuseg`): ``<stem>.tif`` + Aperio ``<stem>.xml`` polygons, recursive.
- ``hovernet`` (:mod:`scripts.data.readers.hovernet`): ``Images/<stem>.png|jpg|tif`` + ``Labels/<stem>.mat``.
- ``pannuke``  (:mod:`scripts.data.readers.pannuke`): fold folders with ``images.npy``, ``masks.npy``, ``types.npy``.
- ``folder``   (:mod:`scripts.data.readers.folder`): ``images/<stem>.*`` + ``labels/<stem>.*`` (+ ``<stem>_type.*``).

Items are sorted by name, names are unique, and ``item.load()`` reads the files only when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from scripts.data.readers import folder, hovernet, monuseg, pannuke
from scripts.data.readers.common import check_unique_names, require_dir
from scripts.data.records import DatasetItem, NucleusRecord

READERS: dict[str, ModuleType] = {"monuseg": monuseg, "hovernet": hovernet, "pannuke": pannuke, "folder": folder}
FORMATS = tuple(READERS)

__all__ = ["FORMATS", "READERS", "dataset_class_names", "dataset_folders", "detect_format", "list_items", "read_dataset"]


def _has_file(dataset_dir: Path, pattern: str) -> bool:
    return next(iter(dataset_dir.rglob(pattern)), None) is not None


def detect_format(dataset_dir: str | Path) -> str:
    """The format of ``dataset_dir`` from its layout: ``Images/`` + ``Labels/`` is hovernet, ``images/`` + ``labels/``
    is folder, any ``images.npy`` below it is pannuke, any ``.xml`` below it is monuseg.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no layout fits (message names the folder and what it holds).
    """
    dataset_dir = require_dir(dataset_dir)
    entries = set(os.listdir(dataset_dir))  # exact (case-sensitive) names, also on case-insensitive file systems
    if {hovernet.IMAGES_DIR, hovernet.LABELS_DIR} <= entries:
        return "hovernet"
    if {folder.IMAGES_DIR, folder.LABELS_DIR} <= entries:
        return "folder"
    if _has_file(dataset_dir, "images.npy"):
        return "pannuke"
    if _has_file(dataset_dir, "*.xml") or _has_file(dataset_dir, "*.XML"):
        return "monuseg"
    shown = sorted(entries)[:10]
    raise ValueError(
        f"cannot detect the dataset format of {dataset_dir} (holds {shown}{' ...' if len(entries) > 10 else ''}): "
        "expected Images/ + Labels/ (hovernet), images/ + labels/ (folder), fold folders with images.npy "
        "(pannuke) or <stem>.tif + <stem>.xml files (monuseg)"
    )


def _reader(dataset_dir: str | Path, dataset_format: str) -> tuple[Path, ModuleType]:
    """The folder (absolute) and the reader module for ``dataset_format`` ("auto" detects it)."""
    path = require_dir(dataset_dir).absolute()
    if dataset_format == "auto":
        dataset_format = detect_format(path)
    if dataset_format not in READERS:
        raise ValueError(f"dataset_format must be 'auto' or one of {list(FORMATS)}, got {dataset_format!r}")
    return path, READERS[dataset_format]


def dataset_folders(dataset_dir: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """A dataset folder, or a list of them, as a list of folders."""
    return [dataset_dir] if isinstance(dataset_dir, (str, Path)) else list(dataset_dir)


def list_items(dataset_dir: str | Path | Sequence[str | Path], dataset_format: str = "auto") -> list[DatasetItem]:
    """Lazily loadable items of a dataset, sorted by name (a list of folders: folder by folder); raises ValueError
    when two items share a name."""
    items = []
    for dataset_folder in dataset_folders(dataset_dir):
        path, reader = _reader(dataset_folder, dataset_format)
        items += sorted(reader.list_items(path), key=lambda item: item.name)
    check_unique_names(items)
    return items


def read_dataset(dataset_dir: str | Path, dataset_format: str = "auto") -> list[NucleusRecord]:
    """Every record of a dataset, loaded, sorted by name."""
    return [item.load() for item in list_items(dataset_dir, dataset_format)]


def dataset_class_names(
    dataset_dir: str | Path | Sequence[str | Path], dataset_format: str = "auto"
) -> dict[int, str] | None:
    """Class id -> name for a typed dataset (ids from 1), None for untyped data.

    hovernet: the bundle class table when the labels have a class map; pannuke: its five fixed classes;
    monuseg: None; folder: classes 1..K of its class maps (table names or "class <k>"), None without class maps.
    A list of folders gives the class table of its typed folders (they must agree); untyped folders add
    nuclei of unknown class.
    """
    if isinstance(dataset_dir, (str, Path)):
        path, reader = _reader(dataset_dir, dataset_format)
        return reader.class_names(path)
    tables = {str(d): dataset_class_names(d, dataset_format) for d in dataset_folders(dataset_dir)}
    typed = {d: t for d, t in tables.items() if t}
    if len({tuple(sorted(t.items())) for t in typed.values()}) > 1:
        raise ValueError(f"dataset folders have different class tables: {typed}")
    return next(iter(typed.values()), None)
