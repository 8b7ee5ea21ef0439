"""PanNuke reader: fold folders of ``images.npy``, ``masks.npy`` and ``types.npy``.

Layout: the dataset folder either holds the three files itself, or fold folders below it at any depth, e.g.
the official download::

    <dataset>/Fold 1/images/fold1/images.npy   (N, 256, 256, 3) float64 or uint8, RGB in 0..255
    <dataset>/Fold 1/images/fold1/types.npy    (N,) tissue names
    <dataset>/Fold 1/masks/fold1/masks.npy     (N, 256, 256, 6) instance maps per channel:
                                               0 neoplastic, 1 inflammatory, 2 connective, 3 dead,
                                               4 epithelial, 5 background

Every ``images.npy`` is paired with the ``masks.npy`` and ``types.npy`` nearest to it in the folder tree
(searching the image file's folder, then each parent up to the dataset folder). Arrays are memory-mapped
(``np.load(mmap_mode="r")``), so only the requested image is read. Items are named ``<fold>_<index:06d>``,
e.g. ``fold1_000123``, with ``<fold>`` the nearest folder called like "fold 1" / "Fold1" (lower-cased, spaces
removed), else the image file's folder name.

The instance map is the union of channels 0-4 with ids made unique across channels (channel order, then the
channel's own id order; ids 1..N); the class map is channel + 1 (1..5) under each instance.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.segmentation import relabel_sequential

from scripts.data.readers.common import as_label_map, to_rgb_uint8
from scripts.data.records import DatasetItem, NucleusRecord

CLASS_NAMES = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead", 5: "Epithelial"}
NUM_TYPE_CHANNELS = 5


@dataclass(frozen=True)
class Fold:
    """One PanNuke fold: the three array files and its name."""

    name: str
    images: Path
    masks: Path
    types: Path


def _normalise(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def _fold_name(images_path: Path, dataset_dir: Path) -> str:
    """Nearest folder (from the file's folder up to ``dataset_dir``) named like ``fold<k>``, else the file's folder."""
    folders = [images_path.parent, *images_path.parent.parents]
    for folder in folders[: folders.index(dataset_dir) + 1]:
        if re.fullmatch(r"fold\d+", _normalise(folder.name)):
            return _normalise(folder.name)
    return _normalise(images_path.parent.name) or "fold"


def _nearest_file(images_path: Path, filename: str, dataset_dir: Path, fold_name: str) -> Path:
    """The ``filename`` closest to ``images_path`` in the tree below ``dataset_dir`` (errors name the images file)."""
    folders = [images_path.parent, *images_path.parent.parents]
    for folder in folders[: folders.index(dataset_dir) + 1]:
        matches = sorted(folder.rglob(filename))
        if len(matches) > 1:  # several folds side by side: keep those whose path names this fold
            matches = [m for m in matches if fold_name in map(_normalise, m.relative_to(folder).parts)] or matches
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(f"{images_path}: cannot tell which {filename} belongs to it: {[str(m) for m in matches]}")
    raise FileNotFoundError(f"{images_path}: no {filename} found for it under {dataset_dir}")


def find_folds(dataset_dir: Path) -> list[Fold]:
    """All folds below ``dataset_dir``, each ``images.npy`` with its nearest ``masks.npy`` and ``types.npy``."""
    folds = []
    for images_path in sorted(dataset_dir.rglob("images.npy")):
        name = _fold_name(images_path, dataset_dir)
        masks = _nearest_file(images_path, "masks.npy", dataset_dir, name)
        types = _nearest_file(images_path, "types.npy", dataset_dir, name)
        folds.append(Fold(name=name, images=images_path, masks=masks, types=types))
    if not folds:
        raise FileNotFoundError(f"no PanNuke images.npy found in {dataset_dir}")
    return folds


def _open_array(path: Path) -> np.ndarray:
    """Memory-map a .npy file; unreadable or corrupt files raise ValueError naming the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise ValueError(f"{path}: unreadable or corrupt .npy file ({type(error).__name__}: {error})") from error


def _read_types(path: Path) -> list[str]:
    try:
        types = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"{path}: unreadable or corrupt .npy file ({type(error).__name__}: {error})") from error
    if types.ndim != 1:
        raise ValueError(f"{path}: tissue types must be a 1-D array of names, got shape {types.shape}")
    return [str(t) for t in types]


def check_fold(fold: Fold) -> list[str]:
    """Validate the three arrays' shapes (headers only) and return the tissue names; errors name the file."""
    images, masks = _open_array(fold.images), _open_array(fold.masks)
    tissues = _read_types(fold.types)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{fold.images}: expected (N, H, W, 3) RGB images, got shape {images.shape}")
    if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] < NUM_TYPE_CHANNELS:
        raise ValueError(
            f"{fold.masks}: shape {masks.shape} does not match images {images.shape[:3]} + (6 channels) "
            f"of {fold.images}"
        )
    if len(tissues) != images.shape[0]:
        raise ValueError(f"{fold.types}: {len(tissues)} tissue names for {images.shape[0]} images in {fold.images}")
    return tissues


def masks_to_maps(masks: np.ndarray, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Instance map and class map, int32 (H, W), from PanNuke masks (H, W, >=5); ids unique across channels."""
    inst_map = np.zeros(masks.shape[:2], dtype=np.int32)
    type_map = np.zeros(masks.shape[:2], dtype=np.int32)
    next_id = 1
    for channel in range(NUM_TYPE_CHANNELS):
        ids = as_label_map(np.asarray(masks[..., channel]), source, f"mask channel {channel}")
        relabelled, _, _ = relabel_sequential(ids, offset=next_id)
        present = ids > 0
        inst_map[present] = relabelled[present]
        type_map[present] = channel + 1
        next_id = max(next_id, int(relabelled.max()) + 1)
    return inst_map, type_map


def load_record(name: str, images_path: str, masks_path: str, index: int, tissue: str) -> NucleusRecord:
    """Read image ``index`` of a fold (memory-mapped) with its masks."""
    source = f"{images_path}[{index}]"
    image = to_rgb_uint8(np.asarray(_open_array(Path(images_path))[index]), source, warn=False)
    inst_map, type_map = masks_to_maps(_open_array(Path(masks_path))[index], f"{masks_path}[{index}]")
    return NucleusRecord(name=name, image=image, inst_map=inst_map, type_map=type_map, tissue=tissue, source=source)


def list_items(dataset_dir: Path) -> list[DatasetItem]:
    """One lazy item per image of every fold, named ``<fold>_<index:06d>``."""
    items = []
    for fold in find_folds(dataset_dir):
        for index, tissue in enumerate(check_fold(fold)):
            name = f"{fold.name}_{index:06d}"
            loader = functools.partial(load_record, name, str(fold.images), str(fold.masks), index, tissue)
            items.append(DatasetItem(name=name, source=f"{fold.images}[{index}]", loader=loader, tissue=tissue))
    return items


def class_names(dataset_dir: Path) -> dict[int, str]:
    """PanNuke's fixed five classes."""
    return dict(CLASS_NAMES)
