"""Run the automatic pipeline on image files and whole slides and write the outputs a pathologist uses.

Per input ``<stem>`` in ``output_dir``:

- ``<stem>_inst.tif`` (int32 instance map) and ``<stem>_type.tif`` (uint8 class map) — images only;
- ``<stem>.geojson`` — QuPath detections, one Polygon per nucleus with its class and measurements;
- ``<stem>.csv`` — one row per nucleus (see :data:`scripts.io.measurements.TABLE_COLUMNS`);
- ``<stem>_overlay.png`` — contours coloured by class (a thumbnail for slides).

Coordinates in the vector outputs are level-0 pixels, (x, y) = (col, row). One bad file does not stop the others:
failures are listed at the end and :func:`run_inference` raises :class:`InferenceFailures` (non-zero exit).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely.affinity
import tifffile
import torch
from monai.apps.utils import get_logger
from tqdm import tqdm

from scripts.io.measurements import instance_polygons, nucleus_table, with_microns
from scripts.parse import as_bool
from scripts.pipeline.options import SlideOptions
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.pipeline.tiling import tile_grid
from scripts.data.readers.common import read_image
from scripts.io.writers import write_csv, write_geojson, write_label_maps, write_overlay

logger = get_logger("scripts.inference")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ndpi")
SLIDE_SUFFIXES = (".svs", ".ndpi")
OUTPUT_SUFFIXES = ("_inst.tif", "_type.tif", "_overlay.png")  # this bundle's image outputs (see the docstring)
WRITE_AHEAD = 1  # images segmented while the outputs of earlier ones are still being written (bounds memory)


class InferenceFailures(RuntimeError):
    """Some inputs could not be processed; ``failures`` maps each file to its error message."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = failures
        lines = "\n".join(f"  {path}: {message}" for path, message in failures.items())
        super().__init__(f"{len(failures)} input(s) failed:\n{lines}")


@dataclass
class InferenceSummary:
    """What a run produced: ``outputs[input] = {kind: path}``, nuclei per input, seconds per input."""

    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    nuclei: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # inputs whose outputs were already complete


def list_inputs(input_dir: str | None = None, input_file: str | None = None) -> list[Path]:
    """The files to process: ``input_file``, or every image of ``input_dir`` (sorted), never both.

    Files of ``input_dir`` that are this bundle's outputs of another input there (``<stem>_inst.tif``,
    ``<stem>_type.tif``, ``<stem>_overlay.png`` beside ``<stem>.<ext>``: a rerun into the input folder) are not
    inputs. Inputs whose stems collide (``a.png`` and ``a.jpg``) would write the same outputs: an error naming them.
    """
    if bool(input_dir) == bool(input_file):
        raise ValueError("give exactly one of --input_dir or --input_file")
    if input_file:
        path = Path(input_file)
        if not path.is_file():
            raise FileNotFoundError(f"input_file not found: {path}")
        return [path]
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.stem for p in files}
    outputs = [p for p in files if any(p.name.endswith(s) and p.name[: -len(s)] in stems for s in OUTPUT_SUFFIXES)]
    if outputs:
        logger.info("input_dir %s: %d file(s) are this bundle's outputs of its images, not inputs (%s%s)", folder,
                    len(outputs), ", ".join(p.name for p in outputs[:3]), ", ..." if len(outputs) > 3 else "")
    files = [p for p in files if p not in outputs]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in input_dir {folder}")
    _check_unique_stems(files)
    return files


def _check_unique_stems(files: list[Path]) -> None:
    """Refuse inputs whose stems are equal (ignoring case): their outputs ``<stem>.*`` would overwrite each other."""
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(path.stem.lower(), []).append(path.name)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(", ".join(names) for names in clashes)
        raise ValueError(f"inputs with the same stem would write the same outputs: {listed} (rename or move them)")


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, before any work; the error names the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe_"):
            pass
    except OSError as error:
        raise PermissionError(f"output_dir {folder} is not writable ({type(error).__name__}: "
                              f"{error.strerror or error})") from error


def is_whole_slide(path: Path, min_side: int = 8192) -> bool:
    """A slide: an SVS/NDPI file, or a TIFF with a multi-resolution pyramid or a side of at least ``min_side``."""
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return True
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return len(series.levels) > 1 or max(series.shape[:2]) >= min_side
    except Exception as error:  # a corrupt TIFF is reported by the image reader with its own message
        logger.debug("%s: not readable as TIFF (%s)", path, error)
        return False


def run_inference(
    network: PromptNucSeg,
    output_dir: str,
    input_dir: str | None = None,
    input_file: str | None = None,
    class_table: dict[int, dict] | None = None,
    slide_options: SlideOptions | None = None,
    save_label_maps: bool = True,
    shard: Any = None,
    overwrite: bool = False,
    write_ahead: int = WRITE_AHEAD,
) -> InferenceSummary:
    """Segment every input and write its outputs; raise :class:`InferenceFailures` listing the files that failed.

    An image's outputs are written on a background thread while the next image is segmented (at most
    ``write_ahead`` images are segmented before the writing of an earlier one ends; 0: each image's outputs are
    written before the next starts). A failed write is reported like a failed segmentation, and the writes under
    way are finished before this function returns or raises (an interrupt included).

    Args:
        network: the pipeline (eval mode).
        output_dir: folder of the outputs (created).
        input_dir, input_file: what to process (exactly one).
        class_table: ``{class_id: {"name", "color"}}``; default the network's own (its model file's).
        slide_options: whole-slide settings.
        save_label_maps: write ``_inst.tif``/``_type.tif`` for images.
        shard: optional callable ``list -> list`` selecting this process's inputs (distributed inference).
        overwrite: redo inputs whose outputs are all in ``output_dir`` already; False skips them (a rerun after a
            kill, or into the same folder, does only what is missing: every output is written atomically, and the
            overlay last).
    """
    files = list_inputs(input_dir, input_file)
    if shard is not None:
        files = shard(files)
    out = Path(output_dir)
    check_writable(out)
    class_table = network.class_table if class_table is None else class_table
    slide_options = slide_options or SlideOptions()
    summary, failures = InferenceSummary(), {}
    writing: deque[tuple[Path, float, Future]] = deque()  # (input, seconds segmenting it, its outputs' writing)

    def finish_writes(limit: int) -> None:
        """Wait for the oldest writes until at most ``limit`` are under way; record each input's result."""
        while len(writing) > limit:
            path, seconds, job = writing.popleft()
            try:
                outputs, count, write_seconds = job.result()
            except Exception as error:  # reported per file, like a failed segmentation
                _record_failure(failures, path, error)
                continue
            _record(summary, path, outputs, count, seconds + write_seconds)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-outputs") as writer:
        try:
            for path in files:
                whole_slide = is_whole_slide(path, slide_options.min_slide_side)
                if not overwrite and all(p.is_file() for p in expected_outputs(path, out, whole_slide,
                                                                               save_label_maps)):
                    summary.skipped.append(str(path))  # every output is written atomically: present means whole
                    continue
                start = time.perf_counter()
                try:
                    if whole_slide:
                        outputs, count = segment_slide(network, path, out, class_table, slide_options)
                        _record(summary, path, outputs, count, time.perf_counter() - start)
                        continue
                    image, result = segment_image(network, path)
                except Exception as error:  # one bad file must not stop the others; it is reported at the end
                    _record_failure(failures, path, error)
                    continue
                job = writer.submit(_timed_write, path.stem, image, result, out, class_table, save_label_maps)
                writing.append((path, time.perf_counter() - start, job))
                finish_writes(max(int(write_ahead), 0))
        finally:
            finish_writes(0)
    if failures:
        raise InferenceFailures(failures)
    return summary


def _record(summary: InferenceSummary, path: Path, outputs: dict[str, Path], count: int, seconds: float) -> None:
    summary.outputs[str(path)] = {k: str(v) for k, v in outputs.items()}
    summary.nuclei[str(path)] = count
    summary.seconds[str(path)] = seconds
    logger.info("%s: %d nuclei in %.2f s", path.name, count, seconds)


def _record_failure(failures: dict[str, str], path: Path, error: Exception) -> None:
    logger.error("%s: %s", path, error)
    failures[str(path)] = f"{type(error).__name__}: {error}"


def _timed_write(*args: Any) -> tuple[dict[str, Path], int, float]:
    """:func:`write_image_outputs` (same arguments) and the seconds it took."""
    start = time.perf_counter()
    outputs, count = write_image_outputs(*args)
    return outputs, count, time.perf_counter() - start


def expected_outputs(path: Path, output_dir: Path, whole_slide: bool, save_label_maps: bool = True) -> list[Path]:
    """The files :func:`run_inference` writes for the input ``path`` (label maps for images only, the overlay last)."""
    label_maps = ("_inst.tif", "_type.tif") if save_label_maps and not whole_slide else ()
    return [output_dir / f"{path.stem}{suffix}" for suffix in (*label_maps, ".geojson", ".csv", "_overlay.png")]


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) → float (3, H, W) in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def segment_image_file(network: PromptNucSeg, path: Path, output_dir: Path, class_table: dict[int, dict],
                       save_label_maps: bool = True) -> tuple[dict[str, Path], int]:
    """Segment one image file and write its five outputs."""
    image, result = segment_image(network, path)
    return write_image_outputs(path.stem, image, result, output_dir, class_table, save_label_maps)


def segment_image(network: PromptNucSeg, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one image file (RGB uint8 (H, W, 3)) and segment it: the image and the network's outputs (with the
    scale it ran at, logged; the file's resolution metadata, if any, read by ``input_scale auto``)."""
    from scripts.io.wsi import image_mpp

    image = read_image(path)
    if image.size == 0 or min(image.shape[:2]) == 0:
        raise ValueError(f"{path}: empty image (shape {image.shape})")
    result = network(image_tensor(image), mpp=image_mpp(path))
    log_scale(path, result.get("scale"))
    return image, result


def log_scale(path: Path, choice: Any) -> None:
    """Log the scale an input was segmented at; a disagreement between its metadata and its nuclei is a warning."""
    if choice is None:
        return
    if choice.note and choice.source == "metadata":
        logger.warning("%s: %s", path, choice.note)
    elif choice.scale != 1.0 or choice.source != "default":
        logger.info("%s: segmented at input_scale %.3g (%s%s)", path.name, choice.scale, choice.source,
                    f": {choice.note}" if choice.note else "")


def write_image_outputs(stem: str, image: np.ndarray, result: dict[str, torch.Tensor], output_dir: Path,
                        class_table: dict[int, dict], save_label_maps: bool = True) -> tuple[dict[str, Path], int]:
    """Write the outputs of one segmented image; returns the paths and the number of nuclei."""
    inst_map = result["inst_map"].numpy().astype(np.int32)
    type_map = result["type_map"].numpy()
    ids = np.arange(1, len(result["classes"]) + 1)
    classes, scores, ious = _per_id(ids, result)
    outputs: dict[str, Path] = {}
    if save_label_maps:
        outputs.update(write_label_maps(output_dir, stem, inst_map, type_map))
    choice = result.get("scale")
    table = with_microns(nucleus_table(inst_map, image, classes, scores, ious, class_table=class_table),
                         None if choice is None else choice.mpp)
    polygons = instance_polygons(inst_map)
    outputs["geojson"] = write_geojson(output_dir / f"{stem}.geojson", polygons, table, class_table,
                                       properties=None if choice is None else choice.as_dict())
    outputs["csv"] = write_csv(output_dir / f"{stem}.csv", table)
    outputs["overlay"] = write_overlay(output_dir / f"{stem}_overlay.png", image, inst_map, type_map, class_table)
    return outputs, len(ids)


def _per_id(ids: np.ndarray, result: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    classes = dict(zip(ids.tolist(), result["classes"].tolist()))
    scores = dict(zip(ids.tolist(), result["scores"].tolist()))
    ious = dict(zip(ids.tolist(), result["ious"].tolist()))
    return classes, scores, ious


def segment_slide(network: PromptNucSeg, path: Path, output_dir: Path, class_table: dict[int, dict],
                  options: SlideOptions) -> tuple[dict[str, Path], int]:
    """Segment a whole slide tile by tile (tissue only), streaming the vector outputs; memory stays flat.

    Resumable: the nuclei of each finished tile are recorded in ``<output_dir>/.<stem>.partial/``
    (:mod:`scripts.io.slide_progress`), so a run killed half-way goes on from its last tile when rerun with the
    same slide, settings and model; the outputs appear when the slide is complete.
    A nucleus is kept by the slide tile whose core holds its prompt point (the same rule as inside an image).
    Outputs are in level-0 pixels: polygons, centroids, area (px²) and perimeter (px) are scaled from the level
    read by its downsample factor d, keeping the pixel-centre convention (level coordinate u -> (u + 0.5) d - 0.5,
    so outlines stay on pixel edges and inside the slide).
    """
    from scripts.io import wsi  # the slide readers are only needed here
    from scripts.io.slide_progress import SlideProgress, slide_run_key

    stem = path.stem
    with wsi.open_slide(path, backend=options.backend) as slide:
        level = slide_level(network, slide, options)
        info = slide.levels[level]
        mask = wsi.tissue_mask(slide)
        tiles = wsi.iter_tiles(slide, level, options.tile_size, options.tile_overlap, mask,
                               options.min_tissue_fraction)
        choice = slide_scale(network, slide, level, options, tiles)
        log_scale(path, choice)
        upsampling = choice.scale
        mpp0 = None if choice.mpp is None else choice.mpp / info.downsample  # µm per level-0 px
        cores = {(t.x0, t.y0): t for t in tile_grid(info.height, info.width, options.tile_size, options.tile_overlap)}
        thumb_scale = max(info.width, info.height) / options.thumbnail_size
        thumb_scale = max(thumb_scale, 1.0)
        thumb_shape = (max(1, int(info.height / thumb_scale)), max(1, int(info.width / thumb_scale)))
        key = slide_run_key(path, {"slide": dataclasses.asdict(options), "level": level, "scale": upsampling,
                                   "pipeline": dataclasses.asdict(network.options), "model": network.fingerprint()})
        progress = SlideProgress.open(output_dir, stem, key, class_table, thumb_shape)
        try:
            remaining = tiles.without(progress.done)
            logger.info("%s: %d tissue tiles of %d px at level %d (%d done before)", path.name, len(tiles),
                        options.tile_size, level, len(tiles) - len(remaining))
            for tile in tqdm(remaining, desc=stem, unit="tile", total=len(tiles), initial=len(tiles) - len(remaining)):
                core = cores[(tile.x, tile.y)]
                inst_map, type_map, table, polygons = _segment_slide_tile(network, tile, core, info, class_table,
                                                                          progress.count, upsampling)
                with_microns(table, mpp0)
                _paint_thumbnail(progress.thumb_inst, progress.thumb_type, inst_map, type_map, tile.x, tile.y,
                                 thumb_scale)
                progress.add_tile((tile.x, tile.y), polygons, table)
            thumbnail = wsi.read_thumbnail(slide, max_size=options.thumbnail_size)
            geojson_path, csv_path = output_dir / f"{stem}.geojson", output_dir / f"{stem}.csv"
            progress.write_outputs(geojson_path, csv_path, properties=choice.as_dict())
            overlay = write_overlay(output_dir / f"{stem}_overlay.png", _fit(thumbnail, thumb_shape),
                                    np.asarray(progress.thumb_inst), np.asarray(progress.thumb_type), class_table)
        except BaseException:
            progress.close()
            raise
        count = progress.count
        progress.remove()
    return {"geojson": geojson_path, "csv": csv_path, "overlay": overlay}, count


def slide_level(network: PromptNucSeg, slide: Any, options: SlideOptions) -> int:
    """The level to read: ``slide#level``, or the one nearest ``slide#mpp`` when given; else, with ``input_scale
    auto`` and resolution metadata, the one nearest the model's training mpp (a coarser slide: level 0); else 0."""
    from scripts.io import wsi

    mpp = options.mpp
    if mpp is None and options.level is None and network.options.input_scale == "auto" and slide.mpp is not None:
        mpp = network.training_mpp
    return wsi.choose_level(slide, mpp=mpp, level=options.level)


def slide_scale(network: PromptNucSeg, slide: Any, level: int, options: SlideOptions, tiles: Any,
                sample: int = 3, crop: int = 768) -> Any:
    """The :class:`~scripts.pipeline.scale.ScaleChoice` for every tile of a slide, decided once: the given
    ``input_scale`` or ``slide#mpp``; else (``auto``) the level's resolution metadata, checked against the nuclei
    of ``sample`` crops of ``crop`` px from tissue tiles spread over the slide (a disagreement is a warning); without
    metadata, the scale most of those crops' nuclei ask for."""
    from scripts.io import wsi
    from scripts.pipeline.scale import ScaleChoice

    info = slide.levels[level]
    level_mpp = None if info.mpp_x is None else (info.mpp_x + info.mpp_y) / 2
    requested = network.options.input_scale
    if options.mpp is not None or requested != "auto":
        upsampling = wsi.level_upsampling(slide, level, options.mpp)
        if upsampling != 1.0:
            logger.info("%s: level %d is coarser than the %.3f um/px asked; tiles are enlarged x%.2f for the model",
                        slide.path, level, options.mpp, upsampling)
        scale = upsampling if requested == "auto" else requested * upsampling
        return ScaleChoice(scale, "given", None if level_mpp is None else level_mpp / scale)
    positions = tiles.positions[np.linspace(0, len(tiles.positions) - 1, min(sample, len(tiles.positions)))
                                .round().astype(int)] if len(tiles.positions) else tiles.positions
    choices = []
    for x, y in positions.tolist():
        size = min(crop, tiles.tile_size)
        offset = (tiles.tile_size - size) // 2
        region = wsi.read_level_region(slide, level, x + offset, y + offset, size, size)
        choices.append(network(image_tensor(region), mpp=level_mpp)["scale"])
    if level_mpp is not None:
        notes = [c.note for c in choices if c.note]
        note = notes[0] if len(notes) > len(choices) / 2 else ""
        return ScaleChoice(choices[0].scale if choices else 1.0, "metadata", level_mpp, note)
    scales = sorted(c.scale for c in choices)
    if not scales or scales[len(scales) // 2] == 1.0:
        return ScaleChoice(1.0, "default", None)
    scale = scales[len(scales) // 2]
    return ScaleChoice(scale, "nuclei", network.training_mpp / scale,
                       f"the nuclei of {sum(s == scale for s in scales)} of {len(scales)} sample crops ask for it")


def _segment_slide_tile(network: PromptNucSeg, tile: Any, core: Any, info: Any, class_table: dict[int, dict],
                        first_id: int, upsampling: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """Nuclei of one slide tile whose prompt lies in its core, with slide-unique ids from ``first_id + 1``;
    ``upsampling``: the tile's resampling factor for the model (:func:`slide_scale`)."""
    image = image_tensor(tile.image)
    result = network(image, input_scale=upsampling)
    points = result["points"]
    core_points = points + torch.tensor([tile.x, tile.y], dtype=torch.float32)
    keep = core.core_holds(core_points).numpy()
    inst_map = result["inst_map"].numpy()
    relabel = np.zeros(len(keep) + 1, np.int32)
    relabel[1:][keep] = np.arange(first_id + 1, first_id + 1 + int(keep.sum()), dtype=np.int32)
    inst_map = relabel[inst_map]
    type_map = np.where(inst_map > 0, result["type_map"].numpy(), 0)
    ids = relabel[1:][keep]
    kept = {k: v[torch.from_numpy(keep)] for k, v in result.items() if k in ("classes", "scores", "ious")}
    classes, scores, ious = (dict(zip(ids.tolist(), kept[k].tolist())) for k in ("classes", "scores", "ious"))
    table = nucleus_table(inst_map, tile.image, classes, scores, ious, class_table=class_table)
    sx, sy = info.downsample_x, info.downsample_y
    for row in table:
        row["centroid_x"] = _to_level0(row["centroid_x"] + tile.x, sx)
        row["centroid_y"] = _to_level0(row["centroid_y"] + tile.y, sy)
        row["area"] = row["area"] * sx * sy
        row["perimeter"] = row["perimeter"] * (sx + sy) / 2
    polygons = {
        i: shapely.affinity.translate(
            shapely.affinity.scale(shapely.affinity.translate(p, tile.x + 0.5, tile.y + 0.5), sx, sy, origin=(0, 0)),
            -0.5, -0.5)
        for i, p in instance_polygons(inst_map).items()
    }
    return inst_map, type_map, table, polygons


def _to_level0(u: float, downsample: float) -> float:
    """A level coordinate (px, pixel centres at integers) in level-0 px: level pixel c covers level-0 pixels
    [c * d, (c + 1) * d), whose centre is (c + 0.5) * d - 0.5 (pixel edges c ± 0.5 map to edges likewise)."""
    return (u + 0.5) * downsample - 0.5


def _paint_thumbnail(thumb_inst: np.ndarray, thumb_type: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray,
                     x: int, y: int, scale: float) -> None:
    """Nearest-neighbour paint of a tile's labels (level px at (x, y)) into the thumbnail label maps."""
    rows, cols = np.nonzero(inst_map)
    if rows.size == 0:
        return
    tr = np.minimum(((rows + y) / scale).astype(np.intp), thumb_inst.shape[0] - 1)
    tc = np.minimum(((cols + x) / scale).astype(np.intp), thumb_inst.shape[1] - 1)
    thumb_inst[tr, tc] = inst_map[rows, cols]
    thumb_type[tr, tc] = type_map[rows, cols]


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a thumbnail to exactly ``shape`` (rows, cols) by nearest neighbour (sizes differ by rounding only)."""
    rows = np.minimum((np.arange(shape[0]) * image.shape[0] / shape[0]).astype(np.intp), image.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * image.shape[1] / shape[1]).astype(np.intp), image.shape[1] - 1)
    return image[np.ix_(rows, cols)]


def main_inference(network: PromptNucSeg, output_dir: str, input_dir: str | None = None, input_file: str | None = None,
                   slide_options: SlideOptions | None = None, save_label_maps: bool = True,
                   shard: Any = None, overwrite: bool = False) -> InferenceSummary:
    """Bundle entry point (``inference`` run id): run, log a summary, re-raise failures after the others ran.

    Classes are named and coloured by the network's own class table (its model file's). ``shard`` (a callable
    ``list -> list``) picks this process's inputs (``configs/multi_gpu_inference.json``).
    """
    summary = run_inference(network, output_dir, input_dir=input_dir, input_file=input_file,
                            slide_options=slide_options, save_label_maps=as_bool(save_label_maps, "save_label_maps"),
                            shard=shard, overwrite=as_bool(overwrite, "overwrite"))
    total = sum(summary.nuclei.values())
    seconds = sum(summary.seconds.values())
    if summary.skipped:
        logger.info("%d input(s) skipped: their outputs are complete in %s (--overwrite true redoes them)",
                    len(summary.skipped), output_dir)
    logger.info("inference done: %d input(s), %d nuclei, %.1f s -> %s", len(summary.nuclei), total, seconds,
                output_dir)
    return summary

