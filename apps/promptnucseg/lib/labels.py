"""Saved MONAI Label labels -> the bundle's ``folder`` dataset layout, for fine-tuning.

A label is the ASAP XML QuPath's "Submit Label" writes into the datastore (``labels/final/<image id>.xml``): one
``<Annotation Name="<class>">`` per nucleus with its outline ``<Coordinate X= Y=>`` in pixels of the image it
belongs to (QuPath subtracts the patch origin when it uploads a patch), pixel-corner convention. Each outline is
rasterised (pixel centres inside it) into an instance map, later outlines over earlier ones, its class name looked
up in the model's classes. Images of at most ``max_area`` pixels are used whole; of a larger one (a slide) only the
box around the outlines (plus ``margin`` px) is cut out, itself at most ``max_area`` pixels.

Output (``scripts.data.readers.folder``)::

    <dataset>/images/<id>.png  <dataset>/labels/<id>.npy (int32 instance map)  <dataset>/labels/<id>_type.npy
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import polygon as fill_polygon

from lib.region import ImageSource, Region


@dataclass
class Outline:
    """One nucleus outline: class name and (N, 2) (x, y) vertices, pixel-corner convention."""

    name: str
    xy: np.ndarray


def read_asap_outlines(path: str | Path) -> list[Outline]:
    """Outlines of an ASAP XML label; raises ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not a valid XML label ({error})") from error
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: expected an ASAP_Annotations XML label (QuPath 'Submit Label'), got <{root.tag}>")
    outlines = []
    for annotation in root.iter("Annotation"):
        name = annotation.get("Name") or annotation.get("PartOfGroup") or ""
        coords = sorted(annotation.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            xy = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: annotation '{name}' has a coordinate without a numeric X/Y") from error
        if len(xy) < 3:
            raise ValueError(f"{path}: annotation '{name}' has {len(xy)} point(s); a nucleus outline needs 3 or more")
        outlines.append(Outline(name, xy.reshape(-1, 2)))
    return outlines


def rasterise(outlines: list[Outline], region: Region, class_ids: dict[str, int], source: str = ""
              ) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map, type_map) int32 (h, w) of ``region``: outline k fills the pixels whose centres it contains with
    id k + 1 and its class id. Class names are matched case-insensitively; an unknown one raises ValueError."""
    lookup = {name.lower(): cid for name, cid in class_ids.items()}
    inst = np.zeros((region.height, region.width), np.int32)
    types = np.zeros_like(inst)
    for k, outline in enumerate(outlines):
        cid = lookup.get(outline.name.lower())
        if cid is None:
            raise ValueError(f"{source}: class '{outline.name}' is not one of the model's classes {sorted(class_ids)}")
        # corner convention -> pixel-centre convention (-0.5), then into the region
        rows, cols = fill_polygon(outline.xy[:, 1] - 0.5 - region.y, outline.xy[:, 0] - 0.5 - region.x,
                                  shape=inst.shape)
        inst[rows, cols] = k + 1
        types[rows, cols] = cid
    return inst, types


def label_region(outlines: list[Outline], width: int, height: int, margin: int, max_area: int, source: str) -> Region:
    """The whole image when it has at most ``max_area`` pixels, else (a slide) the box around the outlines plus
    ``margin`` px, clipped to the image."""
    if width * height <= max_area:
        region = Region(0, 0, width, height)
    else:
        xy = np.concatenate([o.xy for o in outlines])
        x0, y0 = np.maximum(np.floor(xy.min(axis=0)).astype(int) - margin, 0)
        x1, y1 = np.minimum(np.ceil(xy.max(axis=0)).astype(int) + margin, (width, height))
        region = Region(int(x0), int(y0), int(x1 - x0), int(y1 - y0))
    if region.area > max_area:
        raise ValueError(f"{source}: the labelled area {region.width} x {region.height} px exceeds {max_area} px; "
                         "submit labels of a smaller region (QuPath: select a rectangle)")
    return region


def write_folder_dataset(pairs: list[dict], out_dir: str | Path, class_ids: dict[str, int], margin: int = 32,
                         max_area: int = 4096 * 4096) -> list[str]:
    """Convert ``[{"image": path, "label": path}, ...]`` (``Datastore.datalist()``) into the folder layout.

    Returns the stems written. Raises ValueError naming the file for a label that is not ASAP XML, an unknown
    class or an empty label; nothing is skipped silently.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "labels").mkdir()
    stems = []
    for pair in pairs:
        image_path, label_path = Path(pair["image"]), Path(pair["label"])
        if label_path.suffix.lower() != ".xml":
            raise ValueError(f"{label_path}: only ASAP XML labels (QuPath 'Submit Label') can be used for training")
        outlines = read_asap_outlines(label_path)
        if not outlines:
            raise ValueError(f"{label_path}: no annotations in the label")
        source = ImageSource(image_path)
        try:
            region = label_region(outlines, source.width, source.height, margin, max_area, str(label_path))
            pixels = source.read(region)
        finally:
            source.close()
        inst, types = rasterise(outlines, region, class_ids, str(label_path))
        stem = label_path.stem  # the datastore saves the label of image <id> as <id>.xml
        Image.fromarray(pixels).save(out_dir / "images" / f"{stem}.png")
        np.save(out_dir / "labels" / f"{stem}.npy", inst)
        np.save(out_dir / "labels" / f"{stem}_type.npy", types)
        stems.append(stem)
    return stems
