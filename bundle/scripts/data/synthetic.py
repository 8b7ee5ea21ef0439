"""Synthetic H&E-like nucleus images with exact instance and class labels, for tests and smoke runs.

The image is composed in optical density: a pink eosin background (smooth texture, fibres, a few pale lumina)
plus purple hematoxylin nuclei with chromatin texture and soft (about 1 px) edges, converted to RGB with reference
H&E stain vectors (Macenko et al.), lightly blurred, with Gaussian noise. Classes differ in appearance:

1. medium, round, pale (vesicular, darker rim), 2. small, round, very dark, 3. elongated spindle,
4. large, irregular, dark, coarse chromatin, 5. small oval with a dark rim.

Nuclei touch and overlap (``overlap=True``): a later nucleus overwrites an earlier one in the instance map,
but only where the earlier one keeps at least ``MIN_AREA`` px, ``KEEP_FRACTION`` of its area and stays one
connected piece. Nucleus outlines are polygons with vertices (x, y) = (col, row) in pixels, rasterised with
``skimage.draw.polygon`` (the same rule as the MoNuSeg reader). Sizes are (H, W) = (rows, cols) in pixels.
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon

from scripts.data.records import NucleusRecord

STAIN_HEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062])  # unit optical-density vectors (Macenko reference H&E)
STAIN_EOSIN = np.array([0.2159, 0.8012, 0.5581])
MIN_AREA = 20  # px: no instance is left smaller than this
KEEP_FRACTION = 0.4  # an overlapped nucleus keeps at least this fraction of its own area
TOUCH_FRACTION = 0.4  # with overlap=True, share of nuclei placed against an earlier one
MAX_TRIES = 100  # placement attempts per nucleus
EDGE_WIDTH = 1.2  # px, width of the soft nucleus edge
HARMONICS = np.arange(2, 5)  # outline irregularity: radius 1 + sum_k a_k cos(k theta + phi_k)
TISSUES = ("Breast", "Colon", "Lung", "Kidney", "Prostate")
FORMATS = ("hovernet", "folder", "pannuke", "monuseg")


@dataclass(frozen=True)
class NucleusStyle:
    """Appearance of one class: semi-axes in px, hematoxylin optical density, texture and rim strength."""

    semi_major: tuple[float, float]  # px, sampled uniformly
    aspect: tuple[float, float]  # semi-minor / semi-major
    irregularity: float  # amplitude of the outline harmonics
    density: tuple[float, float]  # hematoxylin optical density inside the nucleus
    texture: float  # relative amplitude of the chromatin texture
    rim: float  # extra relative density at the nuclear membrane


STYLES: dict[int, NucleusStyle] = {
    1: NucleusStyle((7.0, 11.0), (0.75, 1.0), 0.06, (0.55, 0.75), 0.30, 0.6),
    2: NucleusStyle((4.0, 6.0), (0.85, 1.0), 0.03, (1.70, 2.00), 0.08, 0.0),
    3: NucleusStyle((10.0, 15.0), (0.25, 0.38), 0.03, (0.95, 1.20), 0.15, 0.0),
    4: NucleusStyle((11.0, 15.0), (0.70, 0.95), 0.12, (1.20, 1.40), 0.40, 0.2),
    5: NucleusStyle((5.5, 8.0), (0.50, 0.70), 0.04, (0.80, 1.00), 0.10, 0.8),
}


@dataclass
class _Nucleus:
    """A placed nucleus: centre (x, y) px, semi-axes px, rotation rad, outline harmonics."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    amps: np.ndarray
    phases: np.ndarray

    def radius(self, theta: np.ndarray) -> np.ndarray:
        """Relative outline radius at parametric angle ``theta``."""
        return 1.0 + (self.amps * np.cos(theta[..., None] * HARMONICS + self.phases)).sum(-1)

    def vertices(self) -> np.ndarray:
        """Outline polygon (V, 2) of (x, y) = (col, row) px, rounded to 1e-3 px."""
        theta = np.linspace(0.0, 2.0 * np.pi, max(24, int(2.0 * np.pi * self.a)), endpoint=False)
        r = self.radius(theta)
        u, v = self.a * r * np.cos(theta), self.b * r * np.sin(theta)
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return np.round(np.stack([self.cx + u * cos - v * sin, self.cy + u * sin + v * cos], axis=1), 3)

    def normalised_distance(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For pixel centres (row, col): d (1 on the outline, 0 at the centre) and the pixel distance to the centre."""
        dx, dy = cols - self.cx, rows - self.cy
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u, v = (dx * cos + dy * sin) / self.a, (-dx * sin + dy * cos) / self.b
        return np.hypot(u, v) / self.radius(np.arctan2(v, u)), np.hypot(dx, dy)

    @property
    def max_radius(self) -> float:
        return self.a * (1.0 + self.amps.sum())


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise (H, W) scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(size), sigma=sigma, mode="wrap")
    return field / max(float(field.std()), 1e-8)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities (H, W) of the stroma: smooth texture, fibres, pale lumina."""
    texture = _smooth_noise(rng, size, 10.0)
    fibres = _smooth_noise(rng, size, (1.0, 5.0) if rng.random() < 0.5 else (5.0, 1.0))
    lumen = np.clip((_smooth_noise(rng, size, 16.0) - 1.7) / 0.3, 0.0, 1.0)  # 0 stroma .. 1 empty lumen
    eosin = np.clip(0.45 + 0.10 * texture + 0.05 * fibres, 0.15, None) * (1.0 - 0.85 * lumen)
    hema = np.clip(0.05 + 0.02 * texture, 0.0, None)
    return hema * rng.uniform(0.9, 1.1), eosin * rng.uniform(0.85, 1.15)


def _sample_nucleus(rng: np.random.Generator, style: NucleusStyle, centre: tuple[float, float]) -> _Nucleus:
    a = rng.uniform(*style.semi_major)
    amps = rng.uniform(0.0, style.irregularity, size=len(HARMONICS)) / (HARMONICS / 2.0)
    return _Nucleus(centre[0], centre[1], a, a * rng.uniform(*style.aspect), rng.uniform(0.0, np.pi),
                    amps, rng.uniform(0.0, 2.0 * np.pi, size=len(HARMONICS)))


def _candidate_centre(rng: np.random.Generator, size: tuple[int, int], placed: list[_Nucleus], shape_radius: float,
                      overlap: bool) -> tuple[float, float]:
    """A centre (x, y) px: against an earlier nucleus (overlap=True, sometimes) or uniform in the image."""
    if overlap and placed and rng.random() < TOUCH_FRACTION:
        other = placed[rng.integers(len(placed))]
        distance = (shape_radius + np.sqrt(other.a * other.b)) * rng.uniform(0.55, 1.0)
        direction = rng.uniform(0.0, 2.0 * np.pi)
        return other.cx + distance * np.cos(direction), other.cy + distance * np.sin(direction)
    return rng.uniform(0.0, size[1]), rng.uniform(0.0, size[0])


def _keeps_earlier_intact(inst_map: np.ndarray, rows: np.ndarray, cols: np.ndarray, full_areas: list[int],
                          boxes: list[tuple[int, int, int, int]]) -> bool:
    """Whether every instance the new pixels (rows, cols) cover keeps enough area and stays one connected piece.

    ``boxes`` holds each instance's pixel bounding box (row0, row1, col0, col1), end-exclusive.
    """
    covered = inst_map[rows, cols]
    ids, counts = np.unique(covered[covered > 0], return_counts=True)
    for instance_id, count in zip(ids, counts):
        r0, r1, c0, c1 = boxes[instance_id - 1]
        remaining = inst_map[r0:r1, c0:c1] == instance_id
        if remaining.sum() - count < max(MIN_AREA, KEEP_FRACTION * full_areas[instance_id - 1]):
            return False
        inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
        remaining[rows[inside] - r0, cols[inside] - c0] = False
        if ndimage.label(remaining)[1] != 1:
            return False
    return True


def _place(rng: np.random.Generator, style: NucleusStyle, inst_map: np.ndarray, placed: list[_Nucleus],
           full_areas: list[int], boxes: list[tuple[int, int, int, int]],
           overlap: bool) -> tuple[_Nucleus, np.ndarray, np.ndarray, np.ndarray] | None:
    """Find a position for one nucleus; returns it, its outline (x, y) and its pixels (rows, cols), or None."""
    size = inst_map.shape
    for _ in range(MAX_TRIES):
        nucleus = _sample_nucleus(rng, style, (0.0, 0.0))
        nucleus.cx, nucleus.cy = _candidate_centre(rng, size, placed, np.sqrt(nucleus.a * nucleus.b), overlap)
        if not overlap and placed:
            gaps = [np.hypot(o.cx - nucleus.cx, o.cy - nucleus.cy) - o.max_radius - nucleus.max_radius for o in placed]
            if min(gaps) < 2.0:
                continue
        vertices = nucleus.vertices()
        rows, cols = polygon(vertices[:, 1], vertices[:, 0], shape=size)
        if len(rows) < MIN_AREA:
            continue
        if not overlap and np.any(inst_map[rows, cols]):
            continue
        if overlap and not _keeps_earlier_intact(inst_map, rows, cols, full_areas, boxes):
            continue
        return nucleus, vertices, rows, cols
    return None


def _paint(nucleus: _Nucleus, style: NucleusStyle, rng: np.random.Generator, chromatin: np.ndarray,
           hema: np.ndarray, eosin: np.ndarray) -> None:
    """Blend the nucleus (soft edge, chromatin texture, rim) into the optical-density maps in place."""
    h, w = hema.shape
    reach = nucleus.max_radius + 3.0
    r0, r1 = max(int(nucleus.cy - reach), 0), min(int(nucleus.cy + reach) + 2, h)
    c0, c1 = max(int(nucleus.cx - reach), 0), min(int(nucleus.cx + reach) + 2, w)
    if r0 >= r1 or c0 >= c1:
        return
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    d, rho = nucleus.normalised_distance(rows, cols)
    inside_px = rho * (1.0 - d) / np.maximum(d, 1e-6)  # distance to the outline along the ray, px
    alpha = np.clip(0.5 + inside_px / EDGE_WIDTH, 0.0, 1.0)
    density = rng.uniform(*style.density) * (1.0 + style.texture * chromatin[r0:r1, c0:c1])
    density *= 1.0 + style.rim * np.clip(d, 0.0, 1.0) ** 4
    hema[r0:r1, c0:c1] = hema[r0:r1, c0:c1] * (1.0 - alpha) + np.clip(density, 0.05, None) * alpha
    eosin[r0:r1, c0:c1] *= 1.0 - 0.6 * alpha


def _to_rgb(rng: np.random.Generator, hema: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) from optical densities: Beer-Lambert, slight blur, Gaussian noise (sigma 3)."""
    density = hema[..., None] * STAIN_HEMATOXYLIN + eosin[..., None] * STAIN_EOSIN
    rgb = ndimage.gaussian_filter(255.0 * np.exp(-density), sigma=(0.6, 0.6, 0.0))
    rgb += rng.normal(0.0, 3.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (rows, cols) of positive integers, got {size}")
    return int(size[0]), int(size[1])


def _class_sequence(rng: np.random.Generator, n_nuclei: int, num_classes: int) -> np.ndarray:
    """Class per nucleus (1..num_classes), every class present when n_nuclei >= num_classes; 0 if untyped."""
    if num_classes == 0:
        return np.zeros(n_nuclei, dtype=np.int32)
    return rng.permutation(np.arange(n_nuclei) % num_classes + 1).astype(np.int32)


def generate(size: tuple[int, int] = (256, 256), n_nuclei: int = 30, num_classes: int = 3, seed: int = 0,
             name: str = "synthetic_0", overlap: bool = True) -> tuple[NucleusRecord, list[np.ndarray]]:
    """A synthetic record and the outline polygons (V, 2) of its instances 1..N in drawing order, (x, y) px.

    Rasterising the polygons in order with ``skimage.draw.polygon`` (later ones overwrite) reproduces
    ``record.inst_map`` exactly. See :func:`make_synthetic_record` for the arguments.
    """
    size = _check_size(size)
    if not 0 <= num_classes <= len(STYLES):
        raise ValueError(f"num_classes must be in 0..{len(STYLES)} (0 = untyped), got {num_classes}")
    if n_nuclei < 0:
        raise ValueError(f"n_nuclei must be >= 0, got {n_nuclei}")
    rng = np.random.default_rng(seed)
    hema, eosin = _background(rng, size)
    chromatin = _smooth_noise(rng, size, 0.8)
    inst_map = np.zeros(size, dtype=np.int32)
    type_map = np.zeros(size, dtype=np.int32)
    placed: list[_Nucleus] = []
    outlines: list[np.ndarray] = []
    full_areas: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    for cls in _class_sequence(rng, n_nuclei, num_classes):
        style = STYLES[int(cls) if cls else int(rng.integers(1, 4))]
        found = _place(rng, style, inst_map, placed, full_areas, boxes, overlap)
        if found is None:
            continue
        nucleus, vertices, rows, cols = found
        inst_map[rows, cols] = len(placed) + 1
        type_map[rows, cols] = cls
        placed.append(nucleus)
        outlines.append(vertices)
        full_areas.append(len(rows))
        boxes.append((int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1))
        _paint(nucleus, style, rng, chromatin, hema, eosin)
    if len(placed) < n_nuclei:
        warnings.warn(f"synthetic image {name}: only {len(placed)} of {n_nuclei} nuclei fit in size {size}",
                      stacklevel=3)
    record = NucleusRecord(name=name, image=_to_rgb(rng, hema, eosin), inst_map=inst_map,
                           type_map=type_map if num_classes else None, source=f"synthetic(seed={seed})")
    return record, outlines


def make_synthetic_record(size: tuple[int, int] = (256, 256), n_nuclei: int = 30, num_classes: int = 3, seed: int = 0,
                          name: str = "synthetic_0", overlap: bool = True) -> NucleusRecord:
    """An H&E-like image with ``n_nuclei`` labelled nuclei (diameters about 8-30 px).

    Args:
        size: (H, W) = (rows, cols) in pixels, any size (nuclei that do not fit are left out with a warning).
        n_nuclei: number of nuclei requested; instance ids are 1..N in drawing order.
        num_classes: 1..5 classes of distinct appearance (see the module docstring), each present when
            ``n_nuclei >= num_classes``; 0 makes an untyped record (``type_map`` None).
        seed: random seed; the output is a deterministic function of all arguments.
        name: the record's name.
        overlap: place some nuclei touching or overlapping earlier ones (later ones win); False keeps every
            nucleus at least 2 px from the others.
    """
    return generate(size, n_nuclei, num_classes, seed, name, overlap)[0]


def _dataset_plan(n_images: int, n_nuclei: int | tuple[int, int], seed: int) -> list[tuple[str, int, int]]:
    """(name, number of nuclei, seed) per image, deterministic given ``seed``."""
    low, high = (n_nuclei, n_nuclei) if isinstance(n_nuclei, (int, np.integer)) else n_nuclei
    sequence = np.random.SeedSequence(seed)
    counts = np.random.default_rng(sequence).integers(low, high + 1, size=n_images)
    seeds = [int(child.generate_state(1)[0]) for child in sequence.spawn(n_images)]
    return [(f"synthetic_{i:03d}", int(counts[i]), seeds[i]) for i in range(n_images)]


def synthetic_dataset(n_images: int, size: tuple[int, int] = (256, 256), n_nuclei: int | tuple[int, int] = (20, 40),
                      num_classes: int = 3, seed: int = 0,
                      overlap: bool = True) -> list[tuple[NucleusRecord, list[np.ndarray]]]:
    """The (record, outlines) pairs :func:`write_synthetic_dataset` writes, named ``synthetic_000`` ...

    ``n_nuclei`` is a count or an inclusive (low, high) range sampled per image.
    """
    return [generate(size, n, num_classes, image_seed, name, overlap) for name, n, image_seed in
            _dataset_plan(n_images, n_nuclei, seed)]


def instance_table(inst_map: np.ndarray, type_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net per-instance arrays for ids 1..max: centroids (N, 2) as (x, y) px and classes (N, 1).

    Ids absent from the map get centroid NaN and class 0.
    """
    ids = inst_map.ravel()
    count = int(inst_map.max(initial=0)) + 1
    rows, cols = np.indices(inst_map.shape)
    areas = np.bincount(ids, minlength=count).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid_x = np.bincount(ids, weights=cols.ravel(), minlength=count) / areas
        centroid_y = np.bincount(ids, weights=rows.ravel(), minlength=count) / areas
    classes = np.zeros(count, dtype=np.int32)
    if type_map is not None:
        classes[ids] = type_map.ravel()
    return np.stack([centroid_x, centroid_y], axis=1)[1:], classes[1:, None]


def _write_hovernet(records: list[NucleusRecord], out_dir: Path) -> None:
    (out_dir / "Images").mkdir(parents=True, exist_ok=True)
    (out_dir / "Labels").mkdir(parents=True, exist_ok=True)
    for record in records:
        Image.fromarray(record.image).save(out_dir / "Images" / f"{record.name}.png")
        centroids, classes = instance_table(record.inst_map, record.type_map)
        labels = {"inst_map": record.inst_map, "inst_centroid": centroids}
        if record.type_map is not None:
            labels.update(type_map=record.type_map, inst_type=classes)
        scipy.io.savemat(out_dir / "Labels" / f"{record.name}.mat", labels)


def _write_folder(records: list[NucleusRecord], out_dir: Path) -> None:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    for record in records:
        Image.fromarray(record.image).save(out_dir / "images" / f"{record.name}.png")
        np.save(out_dir / "labels" / f"{record.name}.npy", record.inst_map)
        if record.type_map is not None:
            np.save(out_dir / "labels" / f"{record.name}_type.npy", record.type_map)


def _write_pannuke(records: list[NucleusRecord], out_dir: Path, rng: np.random.Generator) -> None:
    """One fold in the official layout: ``Fold 1/images/fold1/{images,types}.npy``, ``Fold 1/masks/fold1/masks.npy``."""
    if any(r.type_map is None or r.type_map.max(initial=0) > 5 for r in records):
        raise ValueError("pannuke layout needs typed records with classes 1..5 (num_classes 1..5)")
    images_dir, masks_dir = out_dir / "Fold 1" / "images" / "fold1", out_dir / "Fold 1" / "masks" / "fold1"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    masks = np.zeros((len(records), *records[0].inst_map.shape, 6), dtype=np.float64)
    for i, record in enumerate(records):
        for channel in range(5):
            masks[i, ..., channel] = np.where(record.type_map == channel + 1, record.inst_map, 0)
        masks[i, ..., 5] = record.inst_map == 0
    np.save(images_dir / "images.npy", np.stack([r.image for r in records]).astype(np.float64))
    np.save(images_dir / "types.npy", np.array([TISSUES[rng.integers(len(TISSUES))] for _ in records]))
    np.save(masks_dir / "masks.npy", masks)


def _write_monuseg(items: list[tuple[NucleusRecord, list[np.ndarray]]], out_dir: Path) -> None:
    """``<name>.tif`` + Aperio ``<name>.xml``; vertices written with ``repr`` so they parse back bit-exactly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for record, outlines in items:
        tifffile.imwrite(out_dir / f"{record.name}.tif", record.image, photometric="rgb")
        root = ET.Element("Annotations", MicronsPerPixel="0.252700")
        regions = ET.SubElement(ET.SubElement(root, "Annotation", Id="1"), "Regions")
        for region_id, vertices in enumerate(outlines, start=1):
            region = ET.SubElement(regions, "Region", Id=str(region_id))
            vertex_list = ET.SubElement(region, "Vertices")
            for x, y in vertices:
                ET.SubElement(vertex_list, "Vertex", X=repr(float(x)), Y=repr(float(y)))
        ET.ElementTree(root).write(out_dir / f"{record.name}.xml", encoding="utf-8", xml_declaration=True)


def write_synthetic_dataset(out_dir: str | Path, n_images: int, size: tuple[int, int] = (256, 256),
                            n_nuclei: int | tuple[int, int] = (20, 40), num_classes: int = 3, seed: int = 0,
                            dataset_format: str = "hovernet", overlap: bool = True) -> Path:
    """Write the ``n_images`` records of :func:`synthetic_dataset` in a reader layout; returns ``out_dir``.

    Layouts: ``hovernet`` (``Images/*.png`` + ``Labels/*.mat`` with inst_map, type_map, inst_type (N, 1),
    inst_centroid (N, 2) as (x, y)), ``folder`` (``images/*.png`` + ``labels/*.npy`` + ``labels/*_type.npy``),
    ``pannuke`` (one official-layout fold, 5 class channels + background; needs 1 <= num_classes <= 5) and
    ``monuseg`` (``*.tif`` + Aperio ``*.xml`` outlines, untyped). ``size`` is (rows, cols) px.
    """
    if dataset_format not in FORMATS:
        raise ValueError(f"dataset_format must be one of {list(FORMATS)}, got {dataset_format!r}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    out_dir = Path(out_dir)
    items = synthetic_dataset(n_images, size, n_nuclei, num_classes, seed, overlap)
    records = [record for record, _ in items]
    if dataset_format == "hovernet":
        _write_hovernet(records, out_dir)
    elif dataset_format == "folder":
        _write_folder(records, out_dir)
    elif dataset_format == "pannuke":
        _write_pannuke(records, out_dir, np.random.default_rng(seed))
    else:
        _write_monuseg(items, out_dir)
    return out_dir
