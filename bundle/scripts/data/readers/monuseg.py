"""MoNuSeg / Kumar reader: ``<stem>.tif`` images with ``<stem>.xml`` Aperio annotations, found recursively.

Layout (any depth below the dataset folder; the XML sits next to its image)::

    <dataset>/.../<stem>.tif      RGB image (H, W, 3)
    <dataset>/.../<stem>.xml      Annotations/Annotation/Regions/Region/Vertices/Vertex X="col" Y="row"

Each Region is one nucleus polygon with vertices (x, y) = (col, row) in pixels. Regions are rasterised with
``skimage.draw.polygon`` (pixel centres inside the polygon, clipped to the image) in file order, instance ids
1..N in that order; a later region overwrites an earlier one where they overlap. Vertices may overhang the
image by a few pixels; an annotation reaching far beyond the image size is an error (wrong image). The data
is untyped (no class map).
"""

from __future__ import annotations

import functools
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from scripts.data.readers.common import TIFF_EXTENSIONS, files_with_extensions, read_image
from scripts.data.records import DatasetItem, NucleusRecord


def parse_regions(xml_path: str | Path) -> list[np.ndarray]:
    """Polygons of an Aperio XML file in file order, each a float64 array (V, 2) of (x, y) = (col, row) pixels.

    Raises:
        ValueError: naming the file when it is not well-formed XML or a vertex lacks a numeric X or Y.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{xml_path}: malformed annotation XML ({error})") from error
    polygons = []
    for index, region in enumerate(root.iter("Region"), start=1):
        try:
            vertices = np.array([(v.get("X"), v.get("Y")) for v in region.iter("Vertex")], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{xml_path}: region {index} has a vertex without numeric X/Y ({error})") from error
        if not np.all(np.isfinite(vertices)):  # a missing attribute converts to NaN
            raise ValueError(f"{xml_path}: region {index} has a vertex without numeric X/Y")
        polygons.append(vertices.reshape(-1, 2))
    return polygons


def rasterise_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map int32 of ``shape`` (rows, cols): polygon i (vertices (x, y)) gets id i + 1; later ones win."""
    inst_map = np.zeros(shape, dtype=np.int32)
    for instance_id, vertices in enumerate(polygons, start=1):
        if len(vertices) < 3:
            continue
        rows, cols = polygon(vertices[:, 1], vertices[:, 0], shape=shape)
        inst_map[rows, cols] = instance_id
    return inst_map


def check_fits_image(polygons: list[np.ndarray], shape: tuple[int, int], xml_path: str | Path) -> None:
    """Raise ValueError naming the XML when vertices lie far outside an image of ``shape`` (rows, cols).

    Annotations may overhang the border by a few pixels (they are clipped); beyond ``max(8, 5 %)`` of the image
    size the annotation was almost certainly made for another image.
    """
    if not polygons or not any(len(p) for p in polygons):
        return
    vertices = np.concatenate(polygons)
    height, width = shape
    margin_x, margin_y = max(8.0, 0.05 * width), max(8.0, 0.05 * height)
    (x0, y0), (x1, y1) = vertices.min(axis=0), vertices.max(axis=0)
    if x0 < -margin_x or y0 < -margin_y or x1 > width + margin_x or y1 > height + margin_y:
        raise ValueError(
            f"{xml_path}: vertices span x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}, which does not fit the image "
            f"size {width} x {height} (width x height) px"
        )


def load_record(name: str, image_path: str, xml_path: str) -> NucleusRecord:
    """Read one image and rasterise its XML annotation into an instance map (ids 1..N in file order).

    Regions that end up covering no pixel (fewer than 3 vertices, too thin, or fully overwritten by later
    regions) leave their id absent, with a warning naming the XML.
    """
    image = read_image(image_path)
    polygons = parse_regions(xml_path)
    check_fits_image(polygons, image.shape[:2], xml_path)
    inst_map = rasterise_polygons(polygons, image.shape[:2])
    missing = len(polygons) - (len(np.unique(inst_map)) - 1)
    if missing:
        message = f"{xml_path}: {missing} of {len(polygons)} regions cover no pixel; their ids are absent"
        warnings.warn(message, stacklevel=2)
    return NucleusRecord(name=name, image=image, inst_map=inst_map, source=str(image_path))


def list_items(dataset_dir: Path) -> list[DatasetItem]:
    """One lazy item per ``<stem>.tif``; an image without its XML, or an XML without its image, is an error."""
    images = files_with_extensions(dataset_dir, TIFF_EXTENSIONS, recursive=True)
    xmls = files_with_extensions(dataset_dir, (".xml",), recursive=True)
    image_bases = {p.with_suffix("") for p in images}
    for xml_path in xmls:
        if xml_path.with_suffix("") not in image_bases:
            raise FileNotFoundError(f"{xml_path}: annotation without an image ({xml_path.stem}.tif)")
    items = []
    for image_path in images:
        xml_path = image_path.with_suffix(".xml")
        if not xml_path.is_file():
            raise FileNotFoundError(f"{image_path}: annotation file not found ({xml_path})")
        loader = functools.partial(load_record, image_path.stem, str(image_path), str(xml_path))
        items.append(DatasetItem(name=image_path.stem, source=str(image_path), loader=loader))
    if not items:
        raise FileNotFoundError(f"no .tif images with .xml annotations found in {dataset_dir}")
    return items


def class_names(dataset_dir: Path) -> None:
    """MoNuSeg is untyped: always None."""
    return None
