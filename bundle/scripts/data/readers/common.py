"""Helpers shared by the dataset readers: image and label-map reading, conversion to RGB uint8, file pairing.

Arrays are indexed (row, col). Every error names the offending file; nothing is silently skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import tifffile
from PIL import Image

from scripts.data.records import DatasetItem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")


def to_rgb_uint8(array: np.ndarray, source: str | Path, warn: bool = True) -> np.ndarray:
    """Convert an image array to RGB uint8 (H, W, 3).

    Grayscale (H, W) or (H, W, 1) is replicated to 3 channels, gray + alpha (H, W, 2) and RGBA (H, W, 4) lose
    their alpha channel, channel-first (3|4, H, W) arrays are transposed. Values: integer images with values up
    to 255 are cast; 16-bit images (values up to 65535) are scaled linearly by 255/65535; float images in [0, 1]
    are scaled by 255, other floats are clipped to [0, 255]. Each conversion other than a float cast warns with
    ``source`` in the message (when ``warn``).

    Raises:
        ValueError: naming ``source`` when the array cannot be an image.
    """
    image = np.asarray(array)
    notes: list[str] = []
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (1, 2, 3, 4):
        image = np.moveaxis(image, 0, -1)
        notes.append("channel-first array transposed")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
        notes.append("grayscale converted to RGB")
    elif image.ndim == 3 and image.shape[2] == 2:
        image = np.repeat(image[..., :1], 3, axis=2)
        notes.append("grayscale + alpha converted to RGB (alpha dropped)")
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
        notes.append("RGBA converted to RGB (alpha dropped)")
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"{source}: cannot read as an RGB image (array shape {np.shape(array)})")
    image, value_note = _to_uint8_values(image, source)
    if value_note:
        notes.append(value_note)
    if notes and warn:
        warnings.warn(f"{source}: {'; '.join(notes)}", stacklevel=2)
    return np.ascontiguousarray(image)


def _to_uint8_values(image: np.ndarray, source: str | Path) -> tuple[np.ndarray, str]:
    """Cast or scale pixel values to uint8; returns the array and a note ('' for plain casts)."""
    if image.dtype == np.uint8:
        return image, ""
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255, "binary image scaled to 0/255"
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{source}: image contains NaN or infinite values")
        scale = 255.0 if image.size and float(image.max()) <= 1.0 else 1.0
        return np.clip(np.rint(image * scale), 0, 255).astype(np.uint8), ""
    if np.issubdtype(image.dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{source}: image values {low}..{high} are outside 0..65535")
        if high <= 255:
            return image.astype(np.uint8), f"{image.dtype} image cast to uint8"
        scaled = np.rint(image.astype(np.float32) * (255.0 / 65535.0))
        return scaled.astype(np.uint8), f"{image.dtype} (16-bit) image scaled to uint8"
    raise ValueError(f"{source}: unsupported image data type {image.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file (tif/tiff with tifffile, others with PIL) as RGB uint8 (H, W, 3).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable or corrupt, or not an image (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            array = tifffile.imread(path)
        else:
            with Image.open(path) as pil:
                if pil.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    pil = pil.convert("RGBA" if pil.mode == "PA" or "transparency" in pil.info else "RGB")
                array = np.asarray(pil)
    except Exception as error:  # decoder errors come in many types; re-raise naming the file
        raise ValueError(f"{path}: unreadable or corrupt image file ({type(error).__name__}: {error})") from error
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    return to_rgb_uint8(array, path)


def as_label_map(array: np.ndarray, source: str | Path, what: str = "label map") -> np.ndarray:
    """Check that ``array`` is a 2-D map of non-negative integers and return it as int32 (H, W).

    Float maps are accepted when every value is an integer. Raises ValueError naming ``source`` otherwise.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{source}: {what} must be 2-D (H, W), got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{source}: {what} has non-numeric data type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise ValueError(f"{source}: {what} has non-integer values")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        limit = np.iinfo(np.int32).max
        raise ValueError(f"{source}: {what} values {array.min()}..{array.max()} are outside 0..{limit}")
    return np.ascontiguousarray(array, dtype=np.int32)


def read_label_map(path: str | Path, what: str = "label map") -> np.ndarray:
    """Read a 2-D integer label map from .npy, .tif/.tiff or .png as int32 (H, W); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix in TIFF_EXTENSIONS:
            array = tifffile.imread(path)
        else:
            with Image.open(path) as pil:
                array = np.asarray(pil)
    except Exception as error:
        raise ValueError(f"{path}: unreadable or corrupt {what} file ({type(error).__name__}: {error})") from error
    return as_label_map(array, path, what)


def check_same_shape(image: np.ndarray, label: np.ndarray, label_source: str | Path, image_source: str | Path) -> None:
    """Raise ValueError naming both files when the label map's (H, W) differs from the image's."""
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{label_source}: label map size {label.shape} (rows, cols) does not match image {image_source} "
            f"size {image.shape[:2]}"
        )


def files_with_extensions(folder: Path, extensions: Iterable[str], recursive: bool = False) -> list[Path]:
    """Files in ``folder`` (recursively if asked) whose lower-case suffix is in ``extensions``, sorted by path."""
    extensions = tuple(e.lower() for e in extensions)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in extensions)


def index_by_stem(paths: Iterable[Path], kind: str) -> dict[str, Path]:
    """Map file stem -> path; raise ValueError naming both files when two share a stem (e.g. a.png and a.jpg)."""
    index: dict[str, Path] = {}
    for path in paths:
        if path.stem in index:
            raise ValueError(f"two {kind} files share the name '{path.stem}': {index[path.stem]} and {path}")
        index[path.stem] = path
    return index


def check_unique_names(items: list[DatasetItem]) -> None:
    """Raise ValueError naming both sources when two items share a name."""
    seen: dict[str, str] = {}
    for item in items:
        if item.name in seen:
            raise ValueError(f"duplicate item name '{item.name}': {seen[item.name]} and {item.source}")
        seen[item.name] = item.source


def require_dir(path: str | Path, what: str = "dataset folder") -> Path:
    """Return ``path`` as a Path; raise FileNotFoundError naming it when it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path
