"""Automatic pipeline speed and memory on this machine's CPU: where the time of a 256 px tile goes, and a slide.

1. Per tile: the pipeline on one ~1 Mpx H&E image (a MoNuSeg 1000 x 1000 tile from the shared data, or a synthetic
   1024 x 1024 image without it), every piece timed separately — prompter (network + prompt decoding + NMS),
   segmentor image encoder, mask decoder (batched over the prompts of a tile), stitching (painting masks by
   predicted IoU, relabelling) — and the writing of each output (label-map TIFFs, GeoJSON with its polygons,
   CSV with its measurements, overlay PNG). Figures are seconds per 256 px segmentor tile of the pipeline's grid.
2. End to end: a 4096 x 4096 pyramidal TIFF (3 levels; a mosaic of H&E tiles with white background blocks)
   through the bundle's ``inference`` run id in a child process: wall time, peak resident memory of that process
   (VmHWM; also for the same command on one 256 px tile, the libraries-and-model baseline), nuclei,
   tiles processed.

The model: randomly initialised networks of the default architectures (prompter ``resnet_small`` with FPN/MLP
width 256; segmentor ``vit_tiny`` and ``conv_small`` at 256 px), exported with
``scripts.pipeline.model_file.export_model``, with two biases set so the prompter yields a realistic number of
prompts (about 40 per 256 px tile of H&E; the figures report the count actually found). Speed does not depend on
the weights, only on the prompt count.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_pipeline.py [--quick] [--threads 1] [--output docs/benchmarks/pipeline.md]

``--quick``: a 512 px image, a 1024 px slide, one repeat (a smoke run; its figures are not written unless
``--output`` is given).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from common import (BUNDLE, DOCS, TILE, Stopwatch, as_batch, he_crops, instrumented, machine, monuseg_files,
                    random_model_file, slide_mosaic)
from scripts.pipeline.model_file import load_model
from scripts.prompter.decode import decode_prompts
from scripts.data.records import load_class_table


# ---------------------------------------------------------------------------------------------- inputs
def he_record(size: int, index: int = 0):
    """A ``scripts.data.records.NucleusRecord`` of H&E with annotated nuclei, (size, size) px: a MoNuSeg 1000 px image
    (shared data) cropped, else a synthetic one; and a description."""
    from scripts.data.synthetic import make_synthetic_record

    files = monuseg_files()
    if not files or size > 1000:
        record = make_synthetic_record((size, size), n_nuclei=size * size // 1500, num_classes=4, seed=index)
        return record, f"synthetic {size} x {size} px (scripts.data.synthetic, {int(record.inst_map.max())} nuclei)"
    from scripts.data.readers.monuseg import load_record

    path = files[index % len(files)]
    record = load_record(path.stem, str(path), str(path.with_suffix(".xml")))
    record.image, record.inst_map = record.image[:size, :size].copy(), record.inst_map[:size, :size].copy()
    nuclei = len(np.unique(record.inst_map)) - 1
    return record, f"MoNuSeg {path.stem}, {size} x {size} px ({nuclei} annotated nuclei)"


# ---------------------------------------------------------------------------------------------- per tile
def time_writers(watch: Stopwatch, prefix: str, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray,
                 classes: dict, scores: dict, ious: dict, out_dir: Path) -> None:
    """Time each output of ``scripts.inference.write_image_outputs`` separately (sections ``prefix + piece``)."""
    from scripts.io.measurements import instance_polygons, nucleus_table
    from scripts.io.writers import write_csv, write_geojson, write_label_maps, write_overlay

    class_table = load_class_table()
    with watch.section(prefix + "label-map TIFFs"):
        write_label_maps(out_dir, "bench", inst_map, type_map)
    with watch.section(prefix + "measurements table"):
        table = nucleus_table(inst_map, image, classes, scores, ious, class_table=class_table)
    with watch.section(prefix + "polygons"):
        polygons = instance_polygons(inst_map)
    with watch.section(prefix + "GeoJSON file"):
        write_geojson(out_dir / "bench.geojson", polygons, table, class_table)
    with watch.section(prefix + "CSV file"):
        write_csv(out_dir / "bench.csv", table)
    with watch.section(prefix + "overlay PNG"):
        write_overlay(out_dir / "bench_overlay.png", image, inst_map, type_map, class_table)


def bench_tile(model_path: Path, record, repeats: int, out_dir: Path) -> dict:
    """Seconds per 256 px segmentor tile of each piece (medians over ``repeats`` runs after a warm-up); the writers
    on the pipeline's output and on the image's annotated nuclei (``record.inst_map``, realistic outlines)."""
    from scripts.inference import _per_id, image_tensor

    image = record.image
    network = load_model(model_path, "cpu")
    tensor = image_tensor(image)
    network(tensor)  # warm-up
    truth = record.inst_map.astype(np.int32)
    truth_ids = np.unique(truth[truth > 0]).tolist()
    truth_types = (truth > 0).astype(np.int32)  # class 1 for every annotated nucleus
    ones = dict.fromkeys(truth_ids, 1.0)
    runs, result = [], None
    for _ in range(repeats):
        watch = Stopwatch()
        with instrumented(network, watch), watch.section("total pipeline"):
            result = network(tensor)
        classes, scores, ious = _per_id(np.arange(1, len(result["classes"]) + 1), result)
        time_writers(watch, "", image, result["inst_map"].numpy(), result["type_map"].numpy(), classes, scores, ious,
                     out_dir)
        time_writers(watch, "annotated: ", image, truth, truth_types, dict.fromkeys(truth_ids, 1), ones, ones,
                     out_dir)
        runs.append(watch)
    names = list(runs[-1].seconds)
    return {
        "image_shape": tuple(image.shape[:2]),
        "grid_tiles": image.shape[0] * image.shape[1] / network.tile_size**2,  # 256 px tile areas
        "tiles_with_prompts": runs[-1].calls["encoder"],
        "prompts": int(network.find_prompts(tensor)["points"].shape[0]),
        "nuclei": int(len(result["classes"])),
        "annotated": len(truth_ids),
        "seconds": {n: statistics.median(r.seconds[n] for r in runs) for n in names},
        "fastest": {n: min(r.seconds[n] for r in runs) for n in names},
        "repeats": repeats,
    }


# ---------------------------------------------------------------------------------------------- end to end
# Runs ``python -m monai.bundle ...`` and, at exit, prints the process's peak resident memory (VmHWM: this
# process image only; ru_maxrss would also count the parent's pages copied by fork before exec).
_PEAK_WRAPPER = """
import atexit, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        kib = [line.split()[1] for line in f if line.startswith('VmHWM')]
    sys.stdout.write('PEAK_RSS_KIB ' + (kib[0] if kib else '-1') + chr(10))
    sys.stdout.flush()
atexit.register(_peak)
sys.argv = ['monai.bundle'] + sys.argv[1:]
runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)
"""


def run_bundle_inference(model_path: Path, input_file: Path, out_dir: Path, threads: int) -> dict:
    """The bundle's ``inference`` run id on one file in a child process: wall seconds, the run's own seconds
    (its log), the child's peak resident memory (MiB, Linux VmHWM), its log."""
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, "run", "inference", "--config_file", "configs/inference.json",
           "--input_file", str(input_file), "--output_dir", str(out_dir), "--model_path", str(model_path),
           "--num_threads", str(threads), "--device", "$torch.device('cpu')"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(BUNDLE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    watch = Stopwatch()
    with watch.section("run"):
        proc = subprocess.run(cmd, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bundle inference on {input_file} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    run_seconds, peak_kib = None, -1
    for line in proc.stdout.splitlines():
        if "inference done:" in line:
            run_seconds = float(line.rsplit(" s ->", 1)[0].rsplit(",", 1)[1].strip())
        if line.startswith("PEAK_RSS_KIB "):
            peak_kib = int(line.split()[1])
    return {"wall_s": watch.seconds["run"], "run_s": run_seconds, "peak_rss_mib": peak_kib / 1024, "log": proc.stdout}


def imports_peak_mib() -> float:
    """Peak resident memory (MiB, VmHWM) of a child process that only imports torch, MONAI and the bundle."""
    code = ("import torch, monai.bundle, scripts.inference, scripts.pipeline.model_file\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    env = dict(os.environ, PYTHONPATH=str(BUNDLE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def bench_slide(model_path: Path, size: int, threads: int, work: Path) -> dict:
    """A ``size`` px pyramidal TIFF end to end through the bundle (after a one-tile baseline run)."""
    from PIL import Image

    from scripts.io import wsi
    from scripts.inference import SlideOptions

    small = work / "baseline" / "tile.png"
    small.parent.mkdir(parents=True)
    Image.fromarray(he_crops(TILE, 1, seed=7)[0]).save(small)
    baseline = run_bundle_inference(model_path, small, work / "baseline_out", threads)

    slide_path = work / "slide" / f"slide_{size}.tif"
    slide_path.parent.mkdir(parents=True)
    watch = Stopwatch()
    with watch.section("write slide"):
        wsi.write_pyramidal_tiff(slide_path, slide_mosaic(size), levels=3)
    options = SlideOptions()
    with wsi.open_slide(slide_path) as slide:
        mask = wsi.tissue_mask(slide)
        kept = len(wsi.iter_tiles(slide, 0, options.tile_size, options.tile_overlap, mask,
                                  options.min_tissue_fraction))
        total = len(wsi.iter_tiles(slide, 0, options.tile_size, options.tile_overlap))
    out = work / "slide_out"
    run = run_bundle_inference(model_path, slide_path, out, threads)
    with open(out / f"{slide_path.stem}.csv") as f:
        nuclei = sum(1 for _ in f) - 1
    return {"size": size, "levels": 3, "slide_tile": options.tile_size, "slide_overlap": options.tile_overlap,
            "tiles_kept": kept, "tiles_total": total, "nuclei": nuclei, "write_slide_s": watch.seconds["write slide"],
            "wall_s": run["wall_s"], "run_s": run["run_s"], "peak_rss_mib": run["peak_rss_mib"],
            "baseline_wall_s": baseline["wall_s"], "baseline_run_s": baseline["run_s"],
            "baseline_rss_mib": baseline["peak_rss_mib"], "imports_rss_mib": imports_peak_mib(),
            "file_mib": slide_path.stat().st_size / 2**20}


# ---------------------------------------------------------------------------------------------- report
PIECES = ("prompter network", "prompt decoding + NMS", "encoder", "decoder", "stitching")
WRITERS = ("label-map TIFFs", "measurements table", "polygons", "GeoJSON file", "CSV file", "overlay PNG")


def markdown(info: dict, tiles: dict[str, dict], slide: dict | None, image_note: str, calibration: dict) -> str:
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    first = next(iter(tiles.values()))
    area_tiles = first["image_shape"][0] * first["image_shape"][1] / TILE**2
    lines = [
        "# Automatic pipeline speed and memory (CPU)",
        "",
        f"Written by `benchmarks/bench_pipeline.py` on {datetime.now():%Y-%m-%d %H:%M}.",
        "",
        f"CPU: {info['cpu']} ({info['cores']} logical cores), torch {info['torch']} with {info['threads']} "
        f"thread(s), fp32, Python {info['python']}, nice {info['nice']}; load average (1, 5, 15 min) at start "
        f"{load(info['load'])}, at end {load(info['load_end'])}.",
        "",
        "Model: **randomly initialised** networks of the default architectures — prompter `resnet_small` (FPN and "
        "MLP width 256), segmentor `vit_tiny` or `conv_small` at 256 px — exported with "
        "`scripts.pipeline.model_file.export_model`, with two biases of the prompter set (nuclear map above 0.5 on "
        "half of the "
        "image below; background logit shifted) so that it yields a realistic ~40 prompts per 256 x 256 px of H&E "
        f"({calibration['found']} prompts on that {calibration['shape'][0]} x {calibration['shape'][1]} px image; "
        "on other images a random prompter finds more or fewer). Speed depends on the prompt count, not on the "
        "weights; the masks of random networks are not nuclei (larger, ragged), so the nuclei counts are not "
        "quality figures and the writers are also timed on the image's annotated nuclei.",
        "",
        "## Per 256 px tile",
        "",
        f"Image: {image_note}. Default inference options (segmentor encoder on tiles of 1024 px for the CNN encoder, "
        "256 px for the ViT, 128 px overlap, every prompt decoded on the 256 px window centred on it; prompter on "
        "tiles of 1024 px; 1 negative prompt; mask filter; NMS 12 px). Seconds per tile = seconds for the whole "
        f"image / its area in 256 x 256 px tiles ({first['grid_tiles']:.1f}); median of "
        f"{first['repeats']} run(s) after a warm-up, the fastest in brackets.",
        "",
    ]
    header = "| piece |" + "".join(f" {v} s/tile |" for v in tiles) + "".join(f" {v} s/image |" for v in tiles)
    lines += [header, "|---|" + "---|" * (2 * len(tiles))]

    def row(name: str, label: str | None = None) -> str:
        cells = []
        for t in tiles.values():
            cells.append(f" {t['seconds'][name] / t['grid_tiles']:.4f} ({t['fastest'][name] / t['grid_tiles']:.4f}) |")
        for t in tiles.values():
            cells.append(f" {t['seconds'][name]:.3f} |")
        return f"| {label or name} |" + "".join(cells)

    for name in PIECES:
        lines.append(row(name))
    lines.append(row("total pipeline", "**pipeline total** (incl. cropping, prompt bookkeeping)"))
    for name in WRITERS:
        lines.append(row(name, f"write: {name}"))
    for name in WRITERS:
        lines.append(row("annotated: " + name, f"write, annotated nuclei: {name}"))
    lines.append("")
    for variant, t in tiles.items():
        lines.append(f"- {variant}: {t['prompts']} prompts ({t['prompts'] / area_tiles:.1f} per 256 x 256 px; "
                     f"{t['tiles_with_prompts']} encoder calls), {t['nuclei']} nuclei written; "
                     f"{t['annotated']} annotated nuclei.")
    lines += [
        "",
        "Encoder and decoder are the segmentor's forward passes; stitching = painting the masks by predicted IoU "
        "and relabelling. The GeoJSON needs the polygons, GeoJSON and CSV both need the measurements table "
        "(computed once per image); 'GeoJSON file' and 'CSV file' are the serialisation alone.",
        "",
    ]
    if slide:
        s = slide
        lines += [
            "## Whole slide, end to end",
            "",
            f"A {s['size']} x {s['size']} px pyramidal TIFF ({s['levels']} levels, zlib, {s['file_mib']:.1f} MiB): "
            "512 px crops of MoNuSeg images over the top-left three quarters (in x and y), a tenth of those blocks "
            "left white, glass elsewhere; through `python -m monai.bundle run inference --config_file "
            "configs/inference.json --input_file <slide> --model_path <vit_tiny model> --num_threads "
            f"{info['threads']}` in a child process (defaults: slide tiles of {s['slide_tile']} px with "
            f"{s['slide_overlap']} px overlap at level 0, tissue tiles only).",
            "",
            "| figure | value |",
            "|---|---|",
            f"| slide tiles processed / in the grid (the others are glass) | {s['tiles_kept']} / {s['tiles_total']} |",
            f"| nuclei written (GeoJSON, CSV, overlay thumbnail) | {s['nuclei']} |",
            f"| seconds of the run (its log: reading, tissue mask, pipeline, writing) | {s['run_s']:.1f} "
            f"({s['run_s'] / max(s['tiles_kept'], 1):.1f} per slide tile) |",
            f"| wall seconds of the command (with imports and model loading) | {s['wall_s']:.1f} |",
            f"| peak resident memory of the command (VmHWM) | {s['peak_rss_mib']:.0f} MiB |",
            f"| the same command on one 256 px tile (libraries + model) | {s['baseline_rss_mib']:.0f} MiB, "
            f"{s['baseline_wall_s']:.1f} s wall |",
            f"| a process that only imports torch, MONAI and the bundle's scripts | {s['imports_rss_mib']:.0f} MiB |",
            "",
            f"The slide raised the peak by {s['peak_rss_mib'] - s['baseline_rss_mib']:.0f} MiB over the one-tile "
            f"run (not broken down further; one {s['slide_tile']} px slide tile's working set — prompter feature "
            "maps, "
            "the stitched image embedding, up to 128 masks of 256 px at a time, label maps — is the likely part); "
            "slide tiles are read one at a time, GeoJSON and CSV are streamed, and "
            "only the overlay thumbnail (<= 2048 px) is held whole. Most of the resident memory is the libraries.",
            "",
        ]
    lines += [
        "The machine is shared: a load average above the thread count means other processes competed for the "
        "cores and the figures are upper bounds.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image_size", type=int, default=1000)
    ap.add_argument("--slide_size", type=int, default=4096)
    ap.add_argument("--variants", nargs="+", default=["vit_tiny", "conv_small"])
    ap.add_argument("--no_slide", action="store_true")
    ap.add_argument("--output", default=None, help="markdown file (default docs/benchmarks/pipeline.md unless --quick)")
    args = ap.parse_args()
    if args.quick:
        args.image_size, args.slide_size, args.repeats = 512, 1024, 1
    output = args.output or (None if args.quick else str(DOCS / "benchmarks" / "pipeline.md"))
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    info = machine(args.threads)
    print(f"CPU {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {args.threads} thread(s), "
          f"nice {info['nice']}, load average at start {info['load']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = Path(tmp)
        record, image_note = he_record(args.image_size, index=1)
        calibration = record.image  # the prompt density is set on the benchmark image itself
        tiles, models, found = {}, {}, {}
        for variant in args.variants:
            models[variant] = random_model_file(work / variant / "model.pt", calibration, 40, variant=variant)
            with torch.no_grad():
                prompts = decode_prompts(load_model(models[variant]).prompter(as_batch(calibration)),
                                         calibration.shape[:2])
            found = {"found": len(prompts[0]["points"]), "shape": calibration.shape[:2]}
            tiles[variant] = bench_tile(models[variant], record, args.repeats, work / variant / "out")
            t = tiles[variant]
            print(f"\n{variant}: {t['grid_tiles']} tiles, {t['prompts']} prompts, {t['nuclei']} nuclei; s/tile:",
                  flush=True)
            for name in (*PIECES, "total pipeline", *WRITERS, *("annotated: " + w for w in WRITERS)):
                print(f"  {name:40s} {t['seconds'][name] / t['grid_tiles']:.4f}", flush=True)
        slide = None
        if not args.no_slide:
            slide = bench_slide(models[args.variants[0]], args.slide_size, args.threads, work / "e2e")
            print(f"\nslide {slide['size']} px: {slide['tiles_kept']}/{slide['tiles_total']} tiles, "
                  f"{slide['nuclei']} nuclei, run {slide['run_s']:.1f} s, wall {slide['wall_s']:.1f} s, peak RSS "
                  f"{slide['peak_rss_mib']:.0f} MiB (one-tile baseline {slide['baseline_rss_mib']:.0f} MiB)",
                  flush=True)
    info["load_end"] = os.getloadavg()
    print(f"load average at end {info['load_end']}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(markdown(info, tiles, slide, image_note, found))
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
