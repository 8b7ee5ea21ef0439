"""Reader for users' own data in a plain folder layout.

Layout::

    <dataset>/images/<stem>.(png|jpg|jpeg|tif|tiff)   image: RGB (grayscale, RGBA and 16-bit are converted
                                                     to RGB uint8 with a warning)
    <dataset>/labels/<stem>.(npy|tif|tiff|png)        instance map (H, W) of non-negative integers,
                                                     0 = background, one id per nucleus (any ids)
    <dataset>/labels/<stem>_type.(npy|tif|tiff|png)   optional class map (H, W): 0 = background,
                                                     1..C = class of the nucleus at that pixel

Label maps must have the image's size (rows, cols). Class maps are all-or-nothing: when one image has a
``_type`` map, every image must have one. Class names come from the bundle class table
(``configs/metadata.json``) for the ids it lists, otherwise "class <k>". Every image needs an instance map
and every label file an image: nothing is skipped.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from scripts.data.readers.common import (
    IMAGE_EXTENSIONS,
    check_same_shape,
    files_with_extensions,
    index_by_stem,
    read_image,
    read_label_map,
)
from scripts.data.records import DatasetItem, NucleusRecord, load_class_table

IMAGES_DIR = "images"
LABELS_DIR = "labels"
LABEL_EXTENSIONS = (".npy", ".tif", ".tiff", ".png")
TYPE_SUFFIX = "_type"


def load_record(name: str, image_path: str, label_path: str, type_path: str | None) -> NucleusRecord:
    """Read one image with its instance map and optional class map."""
    image = read_image(image_path)
    inst_map = read_label_map(label_path, "instance map")
    check_same_shape(image, inst_map, label_path, image_path)
    type_map = None
    if type_path is not None:
        type_map = read_label_map(type_path, "class map")
        check_same_shape(image, type_map, type_path, image_path)
    return NucleusRecord(name=name, image=image, inst_map=inst_map, type_map=type_map, source=str(image_path))


def _triples(dataset_dir: Path) -> list[tuple[Path, Path, Path | None]]:
    """(image, instance map, class map or None) per image, sorted by stem; unmatched files are errors."""
    images_dir, labels_dir = dataset_dir / IMAGES_DIR, dataset_dir / LABELS_DIR
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder layout needs {folder}")
    images = index_by_stem(files_with_extensions(images_dir, IMAGE_EXTENSIONS), "image")
    labels = index_by_stem(files_with_extensions(labels_dir, LABEL_EXTENSIONS), "label")
    if not images:
        raise FileNotFoundError(f"no images found in {images_dir}")
    triples, used = [], set()
    for stem in sorted(images):
        if stem not in labels:
            raise FileNotFoundError(f"{images[stem]}: instance map not found ({labels_dir / stem}.npy|tif|tiff|png)")
        type_path = labels.get(stem + TYPE_SUFFIX)
        used.update({stem, stem + TYPE_SUFFIX})
        triples.append((images[stem], labels[stem], type_path))
    for stem, label_path in labels.items():
        if stem not in used:
            raise FileNotFoundError(f"{label_path}: label without an image in {images_dir}")
    typed = [t for t in triples if t[2] is not None]
    if typed and len(typed) != len(triples):
        untyped = next(t[0] for t in triples if t[2] is None)
        raise FileNotFoundError(
            f"{untyped}: class map not found ({labels_dir / untyped.stem}{TYPE_SUFFIX}.*) while other images have one"
        )
    return triples


def list_items(dataset_dir: Path) -> list[DatasetItem]:
    """One lazy item per image in ``images/``."""
    items = []
    for image, label, type_path in _triples(dataset_dir):
        type_file = None if type_path is None else str(type_path)
        loader = functools.partial(load_record, image.stem, str(image), str(label), type_file)
        items.append(DatasetItem(name=image.stem, source=str(image), loader=loader))
    return items


def _max_class(type_path: Path) -> int:
    """Largest class id in a class map (``.npy`` files are memory-mapped)."""
    if type_path.suffix.lower() == ".npy":
        try:
            return int(np.load(type_path, mmap_mode="r", allow_pickle=False).max(initial=0))
        except Exception as error:
            message = f"{type_path}: unreadable or corrupt class map ({type(error).__name__}: {error})"
            raise ValueError(message) from error
    return int(read_label_map(type_path, "class map").max(initial=0))


def class_names(dataset_dir: Path) -> dict[int, str] | None:
    """Names of classes 1..K (K = largest id in any class map) or None without class maps; reads every class map."""
    type_paths = [t for _, _, t in _triples(dataset_dir) if t is not None]
    if not type_paths:
        return None
    num_classes = max(_max_class(p) for p in type_paths)
    table = load_class_table()
    return {k: table[k]["name"] if k in table else f"class {k}" for k in range(1, num_classes + 1)}
