"""The two infer tasks: ``promptnucseg`` (automatic, every nucleus of a region) and ``promptnucseg_click``
(interactive, the nucleus under each foreground click).

Both follow MONAI Label's ``BasicInferTask`` stages: a pre-transform reads and checks the requested region, the
inferer runs the bundle's :class:`scripts.pipeline.promptnucseg.PromptNucSeg`, a post-transform turns the instance
map into one polygon per nucleus (:mod:`lib.annotations`), and MONAI Label's ``PolygonWriter`` writes the ASAP XML
or DSA JSON file the ``output`` param asks for (``asap``, ``dsa`` default, ``json`` = none) and returns the JSON
annotation.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from lib.annotations import annotation_from_instances
from lib.clicks import segment_clicks
from lib.errors import RequestError, shown
from lib.model import ModelStore
from lib.region import ImageSource, check_clicks, parse_points, resolve_region
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import PolygonWriter

logger = logging.getLogger(__name__)

MAX_COORDINATE = 2**31 - 1  # px: larger than any slide; larger numbers are refused before they reach numpy
_COORDINATE_KEYS = {"location": 1, "size": 1, "foreground": 2, "background": 2}  # key -> nesting depth of numbers


def _numbers(value: Any, depth: int) -> Iterator[numbers.Real]:
    """The numbers ``depth`` lists deep in ``value`` (other entries are left to :mod:`lib.region`'s checks)."""
    if depth == 0:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield value
    elif isinstance(value, (list, tuple)):
        for entry in value:
            yield from _numbers(entry, depth - 1)


def check_coordinate_range(data: dict) -> None:
    """``location``, ``size`` and click coordinates within +-``MAX_COORDINATE`` (a 400 naming the key): a JSON
    integer beyond int64 would make numpy raise a TypeError (a bare 500)."""
    for key, depth in _COORDINATE_KEYS.items():
        for number in _numbers(data.get(key), depth):
            if abs(number) > MAX_COORDINATE:
                raise RequestError(f"'{key}' holds {shown(number)}, beyond the largest coordinate "
                                   f"({MAX_COORDINATE} px)")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite as a float (huge JSON integers are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class LoadRegiond:
    """Pre-transform: check the request and read its region as ``image`` (3, h, w) float32 [0, 255].

    Sets ``location`` / ``size`` to the region actually read (clipped to the image) and, for the click task,
    ``fg_points`` / ``bg_points`` (N, 2) float (x, y) px of the region.
    """

    def __init__(self, max_region_area: int, clicks: bool, slide_backend: str = "tifffile",
                 click_context: int = 128) -> None:
        self.max_region_area = max_region_area
        self.clicks = clicks
        self.slide_backend = slide_backend
        self.click_context = click_context

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        path = d.get("image")
        if not isinstance(path, str) or not path:
            raise RequestError("no image: pass ?image=<id of an image in the datastore> (or upload a file)")
        check_coordinate_range(d)
        source = ImageSource(path, self.slide_backend)
        try:
            fg = parse_points(d.get("foreground"), "foreground") if self.clicks else np.zeros((0, 2))
            bg = parse_points(d.get("background"), "background") if self.clicks else np.zeros((0, 2))
            if self.clicks and len(fg) == 0:
                raise RequestError("promptnucseg_click needs at least one 'foreground' click [[x, y], ...] "
                                   "(level-0 pixels of the slide)")
            everything = np.concatenate([fg, bg])
            check_clicks(fg, "foreground", source.width, source.height)  # before a region is derived from them
            check_clicks(bg, "background", source.width, source.height)
            region = resolve_region(d, source.width, source.height, self.max_region_area,
                                    around=everything if self.clicks else None, context=self.click_context)
            if self.clicks:
                check_clicks(fg, "foreground", source.width, source.height, region)
                check_clicks(bg, "background", source.width, source.height, region)
            pixels = source.read(region)
        finally:
            source.close()
        d["image"] = torch.from_numpy(pixels).permute(2, 0, 1).float().contiguous()
        d["location"] = [region.x, region.y]
        d["size"] = [region.width, region.height]
        d["fg_points"] = fg - (region.x, region.y)
        d["bg_points"] = bg - (region.x, region.y)
        return d


class BuildAnnotationd:
    """Post-transform: ``pred`` (instance map + per-nucleus class/score/IoU) -> ``result["annotation"]``."""

    def __init__(self, store: ModelStore, simplify_tolerance: float = 0.5) -> None:
        self.store = store
        self.simplify_tolerance = simplify_tolerance

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        pred = d["pred"]
        names = self.store.class_names()
        annotation = annotation_from_instances(pred["inst_map"], pred["classes"], pred["scores"], pred["ious"],
                                               d["location"], names, self.store.class_colors(),
                                               self.simplify_tolerance)
        result = dict(d.get("result") or {})
        result["annotation"] = annotation
        result["count"] = len(annotation["elements"])
        if "clicks" in pred:
            result["clicks"] = pred["clicks"]
        d["result"] = result
        return d


class PromptNucSegInfer(BasicInferTask):
    """``promptnucseg``: the automatic pipeline (prompter -> segmentor) on the requested region."""

    def __init__(self, store: ModelStore, max_region_area: int, simplify_tolerance: float = 0.5,
                 slide_backend: str = "tifffile", device: str | None = None,
                 description: str = "PromptNucSeg: every nucleus of the region, one classified polygon each",
                 type: InferType = InferType.SEGMENTATION, config: dict | None = None) -> None:
        names = store.class_names()
        super().__init__(path=str(store.path), network=None, type=type,
                         labels={name: cid for cid, name in names.items()}, dimension=2, description=description,
                         config=config)
        if device:
            self._config["device"] = device
        self.store = store
        self.max_region_area = max_region_area
        self.simplify_tolerance = simplify_tolerance
        self.slide_backend = slide_backend

    def info(self) -> dict[str, Any]:
        self.labels = {name: cid for cid, name in self.store.class_names().items()}  # a new model may bring others
        d = super().info()
        d["pathology"] = True
        d["max_region_area"] = self.max_region_area
        d["model_path"] = str(self.store.path)
        d["model_found"] = self.store.path.is_file()
        return d

    def is_valid(self) -> bool:
        return True  # listed even without a model file: an infer call then says which file is missing

    def _region_loader(self) -> LoadRegiond:
        return LoadRegiond(self.max_region_area, clicks=False, slide_backend=self.slide_backend)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [self._region_loader()]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [BuildAnnotationd(self.store, self.simplify_tolerance)]

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        model = self.store.get(device)
        with torch.no_grad():
            out = model(data["image"])
        data["pred"] = {
            "inst_map": out["inst_map"].numpy(),
            "classes": out["classes"].numpy(),
            "scores": out["scores"].numpy(),
            "ious": out["ious"].numpy(),
        }
        return data

    def writer(self, data: dict, extension=None, dtype=None):
        return PolygonWriter(label=self.output_label_key, json=self.output_json_key)(data)


class PromptNucSegClickInfer(PromptNucSegInfer):
    """``promptnucseg_click``: the nucleus under each ``foreground`` click (see :mod:`lib.clicks` for the rule)."""

    def __init__(self, store: ModelStore, max_region_area: int, exclude_radius: float = 12.0,
                 min_probability: float = 0.5, min_iou: float = 0.0, click_context: int = 128, **kwargs) -> None:
        kwargs.setdefault("description", "PromptNucSeg interactive: the nucleus under each click, other clicks "
                                         "and the prompter's neighbours as negative prompts")
        kwargs.setdefault("type", InferType.ANNOTATION)
        config = {"exclude_radius": exclude_radius, "min_click_probability": min_probability,
                  "min_click_iou": min_iou}
        super().__init__(store, max_region_area, config=config, **kwargs)
        self.click_context = click_context

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["nuclick"] = True  # QuPath: offered by the click tool, clicks of any class sent as 'foreground'
        return d

    def _region_loader(self) -> LoadRegiond:
        return LoadRegiond(self.max_region_area, clicks=True, slide_backend=self.slide_backend,
                           click_context=self.click_context)

    @staticmethod
    def _option(data: dict, key: str) -> float:
        value = data.get(key)
        if not is_finite_number(value) or value < 0:
            raise RequestError(f"'{key}' must be a non-negative number, got {shown(value)}")
        return float(value)

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        model = self.store.get(device)
        res = segment_clicks(model, data["image"], data["fg_points"], data["bg_points"],
                             exclude_radius=self._option(data, "exclude_radius"),
                             min_probability=self._option(data, "min_click_probability"),
                             min_iou=self._option(data, "min_click_iou"))
        x0, y0 = data["location"]
        fg_slide = data["fg_points"] + (x0, y0)
        nucleus_of_click = {int(k): i + 1 for i, k in enumerate(res.click_of_id.tolist())}
        clicks = [{"point": [float(x), float(y)], "status": res.status[k],
                   "nuclear_probability": round(float(res.probability[k]), 4), "id": nucleus_of_click.get(k)}
                  for k, (x, y) in enumerate(fg_slide.tolist())]
        data["pred"] = {"inst_map": res.inst_map, "classes": res.classes, "scores": res.scores, "ious": res.ious,
                        "clicks": clicks}
        return data
