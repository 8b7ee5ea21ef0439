"""HoVer-Net layout reader (CoNSeP, CPM-17, Kumar as distributed with HoVer-Net).

Layout::

    <dataset>/Images/<stem>.(png|jpg|jpeg|tif|tiff)   RGB image (H, W, 3)
    <dataset>/Labels/<stem>.mat                       MATLAB file with
        inst_map     (H, W) integers, 0 = background
        type_map     (H, W) optional class per pixel, 0 = background
        inst_type    (N, 1) optional class of instance ids 1..N in order; used to build the class map
                     when ``type_map`` is absent
        inst_centroid (N, 2) optional (x, y) = (col, row); not read

Class ids follow the bundle class table (CoNSeP merged classes: 1 other, 2 inflammatory, 3 epithelial,
4 spindle-shaped).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import scipy.io

from scripts.data.readers.common import (
    IMAGE_EXTENSIONS,
    as_label_map,
    check_same_shape,
    files_with_extensions,
    index_by_stem,
    read_image,
)
from scripts.data.records import DatasetItem, NucleusRecord, load_class_table

IMAGES_DIR = "Images"
LABELS_DIR = "Labels"


def read_mat_labels(mat_path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Instance map and class map (or None) int32 (H, W) from a HoVer-Net ``.mat`` file; errors name the file."""
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise FileNotFoundError(f"label file not found: {mat_path}")
    try:
        mat = scipy.io.loadmat(mat_path, variable_names=["inst_map", "type_map", "inst_type"])
    except Exception as error:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3 HDF5), ...
        raise ValueError(f"{mat_path}: unreadable or corrupt .mat file ({type(error).__name__}: {error})") from error
    if "inst_map" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{mat_path}: no 'inst_map' variable (found {found})")
    inst_map = as_label_map(mat["inst_map"], mat_path, "inst_map")
    if "type_map" in mat:
        type_map = as_label_map(mat["type_map"], mat_path, "type_map")
        if type_map.shape != inst_map.shape:
            raise ValueError(f"{mat_path}: type_map shape {type_map.shape} differs from inst_map {inst_map.shape}")
    elif "inst_type" in mat:
        type_map = type_map_from_inst_type(inst_map, mat["inst_type"], mat_path)
    else:
        type_map = None
    return inst_map, type_map


def type_map_from_inst_type(inst_map: np.ndarray, inst_type: np.ndarray, source: str | Path) -> np.ndarray:
    """Class map (H, W) int32 from ``inst_type`` (N, 1): instance id k (1..N) gets class ``inst_type[k - 1]``."""
    classes = as_label_map(np.asarray(inst_type).reshape(-1, 1), source, "inst_type")[:, 0]
    if inst_map.max(initial=0) > len(classes):
        raise ValueError(
            f"{source}: inst_map has id {inst_map.max()} but inst_type lists only {len(classes)} instances"
        )
    lookup = np.concatenate([[0], classes]).astype(np.int32)
    return lookup[inst_map]


def load_record(name: str, image_path: str, mat_path: str) -> NucleusRecord:
    """Read one image and its ``.mat`` labels."""
    image = read_image(image_path)
    inst_map, type_map = read_mat_labels(mat_path)
    check_same_shape(image, inst_map, mat_path, image_path)
    return NucleusRecord(name=name, image=image, inst_map=inst_map, type_map=type_map, source=str(image_path))


def _paired_files(dataset_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs sorted by stem; a missing label or an orphan label is an error."""
    images_dir, labels_dir = dataset_dir / IMAGES_DIR, dataset_dir / LABELS_DIR
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"HoVer-Net layout needs {folder}")
    images = index_by_stem(files_with_extensions(images_dir, IMAGE_EXTENSIONS), "image")
    labels = index_by_stem(files_with_extensions(labels_dir, (".mat",)), "label")
    for stem, label_path in labels.items():
        if stem not in images:
            raise FileNotFoundError(f"{label_path}: label without an image in {images_dir}")
    pairs = []
    for stem in sorted(images):
        if stem not in labels:
            raise FileNotFoundError(f"{images[stem]}: label file not found ({labels_dir / (stem + '.mat')})")
        pairs.append((images[stem], labels[stem]))
    if not pairs:
        raise FileNotFoundError(f"no images found in {images_dir}")
    return pairs


def list_items(dataset_dir: Path) -> list[DatasetItem]:
    """One lazy item per image in ``Images/``."""
    items = []
    for image, label in _paired_files(dataset_dir):
        loader = functools.partial(load_record, image.stem, str(image), str(label))
        items.append(DatasetItem(name=image.stem, source=str(image), loader=loader))
    return items


def class_names(dataset_dir: Path) -> dict[int, str] | None:
    """The bundle class table's names when the first label file has ``type_map`` or ``inst_type``, else None."""
    _, first_label = _paired_files(dataset_dir)[0]
    try:
        variables = {name for name, _, _ in scipy.io.whosmat(first_label)}
    except Exception as error:
        raise ValueError(f"{first_label}: unreadable or corrupt .mat file ({type(error).__name__}: {error})") from error
    if not variables & {"type_map", "inst_type"}:
        return None
    return {class_id: entry["name"] for class_id, entry in load_class_table().items()}
