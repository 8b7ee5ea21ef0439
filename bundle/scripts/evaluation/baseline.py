"""Training-free baseline: colour deconvolution + Otsu threshold + distance-transform watershed.

The classical nucleus segmentation a learned model has to beat (``benchmarks/quality.py`` scores it with the
same code as the model). Steps, all from scikit-image / scipy:

1. haematoxylin channel of the Ruifrok-Johnston colour deconvolution (``skimage.color.rgb2hed``), smoothed by a
   Gaussian of ``sigma`` px;
2. foreground = haematoxylin above its Otsu threshold, holes filled, objects under ``min_area`` px removed;
3. markers = maxima of the (smoothed) distance transform at least ``min_distance`` px apart, one region per
   marker by a watershed on the negated distance, restricted to the foreground.

Lengths are in pixels at the image's own resolution (defaults suit 40x, about 0.25 µm/px).

    python -m scripts.evaluation.baseline --input_dir D --output_dir O    # writes O/<stem>.npy instance maps
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import relabel_sequential, watershed

from scripts.data.records import NucleusRecord

__all__ = ["watershed_baseline", "BaselinePredictions", "main"]


def watershed_baseline(image: np.ndarray, sigma: float = 1.0, min_area: int = 30, min_distance: int = 9) -> np.ndarray:
    """Instance map (H, W) int32 (0 = background, ids 1..N) of an RGB uint8 image (H, W, 3).

    Args:
        image: RGB, uint8 (or float in [0, 255]), rows x cols x channels.
        sigma: Gaussian smoothing of the haematoxylin channel and of the distance map, in px.
        min_area: smallest kept object, in px.
        min_distance: smallest distance between two nucleus centres (watershed markers), in px.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {image.shape}")
    haematoxylin = gaussian(rgb2hed(np.asarray(image, np.float64) / 255.0)[..., 0], sigma=sigma)
    if np.ptp(haematoxylin) == 0:
        return np.zeros(image.shape[:2], np.int32)
    foreground = ndimage.binary_fill_holes(haematoxylin > threshold_otsu(haematoxylin))
    foreground = remove_small_objects(foreground, max_size=min_area - 1)
    distance = gaussian(ndimage.distance_transform_edt(foreground), sigma=sigma)
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(image.shape[:2], np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground)
    labels = remove_small_objects(labels, max_size=min_area - 1)
    return relabel_sequential(labels)[0].astype(np.int32)


class BaselinePredictions:
    """Prediction source for ``scripts.evaluation.scoring`` (``configs/evaluate.json --method watershed``): no classes."""

    def __init__(self, **kwargs: float) -> None:
        self.kwargs = kwargs

    def predict(self, record: NucleusRecord) -> tuple[np.ndarray, None]:
        return watershed_baseline(record.image, **self.kwargs), None


def main(argv: list[str] | None = None) -> None:
    from scripts.data.readers.common import files_with_extensions, read_image

    parser = argparse.ArgumentParser(description="Training-free nucleus baseline (writes <stem>.npy instance maps).")
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--min_distance", type=int, default=9)
    parser.add_argument("--min_area", type=int, default=30)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = files_with_extensions(Path(args.input_dir), (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    if not paths:
        raise SystemExit(f"no images in --input_dir {args.input_dir}")
    for path in paths:
        inst = watershed_baseline(read_image(path), min_area=args.min_area, min_distance=args.min_distance)
        np.save(out / f"{path.stem}.npy", inst)
        print(f"{path.name}: {inst.max()} nuclei")


if __name__ == "__main__":
    main()
