"""A whole slide as a user runs it: a 40x pyramidal TIFF of at least 20k x 20k px built from real H&E, through
``run inference`` (default settings: tissue detection on the coarsest level, the scale from the slide's metadata,
a progress bar, resumable), killed part way and run again to finish: time, peak memory, nuclei per second.

The slide: white glass with irregular tissue islands (about a fifth of the area), filled with the 30
MoNuSeg training images (1000 px, 40x, flipped and turned for variety) and JPEG-compressed tiles of 256 px, three
levels, 0.25 µm/px in its resolution tags. Writes ``docs/benchmarks/slide.md``.

    .venv/bin/python benchmarks/bench_slide.py [--size 20480] [--threads 2] [--kill_after 120]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import BUNDLE, DOCS, SHARED_DATA, machine_line
from scripts.data.readers import list_items
from scripts.io import wsi
from scripts.pipeline.options import SlideOptions

BLOCK = 1000  # px, one MoNuSeg image


def tissue_islands(size: int, seed: int = 0) -> np.ndarray:
    """Boolean (size, size) mask of smooth irregular tissue islands covering about a fifth of the slide."""
    rng = np.random.default_rng(seed)
    low = 64
    field = ndimage.gaussian_filter(rng.standard_normal((low, low)), 6)
    yy, xx = np.mgrid[0:low, 0:low] / low
    centres = [(0.3, 0.3, 0.18), (0.65, 0.6, 0.2), (0.25, 0.75, 0.12)]
    blob = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)) for cy, cx, r in centres)
    small = blob + 4 * field > 0.75
    zoom = size / low
    return ndimage.zoom(small.astype(np.uint8), zoom, order=0).astype(bool)[:size, :size]


def build_slide(path: Path, size: int) -> float:
    """Write the benchmark slide; returns its tissue fraction."""
    images = [item.load().image for folder in ("monuseg_train", "monuseg_train_extra")
              for item in list_items(str(SHARED_DATA / folder))]
    mask = tissue_islands(size)
    slide = np.full((size, size, 3), 255, np.uint8)
    k = 0
    for y in range(0, size, BLOCK):
        for x in range(0, size, BLOCK):
            block = mask[y : y + BLOCK, x : x + BLOCK]
            if not block.any():
                continue
            image = np.rot90(images[k % len(images)], k // len(images))
            image = image[:, ::-1] if (k // 7) % 2 else image
            k += 1
            h, w = block.shape
            region = slide[y : y + h, x : x + w]
            region[block] = image[:h, :w][block]
    wsi.write_pyramidal_tiff(path, slide, levels=3, tile=256, mpp=0.25, compression="jpeg")
    return float(mask.mean())


def run(slide: Path, out: Path, threads: int, kill_after: float | None = None) -> dict:
    """``run inference`` on the slide in its own process (killed with SIGKILL after ``kill_after`` s if given):
    wall seconds, peak RSS (GiB), return status, and the last progress line."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
               "--input_file", str(slide), "--output_dir", str(out), "--num_threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = out.parent / f"{out.name}_{'killed' if kill_after else 'run'}.log"
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=BUNDLE, env=env, stdout=stderr, stderr=stderr)
        if kill_after:
            try:
                process.wait(kill_after)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        _, status, usage = os.wait4(process.pid, 0)
    progress = [line for line in log.read_text().replace("\r", "\n").splitlines() if "tile/s" in line or "s/tile" in line]
    return {"seconds": time.perf_counter() - start, "peak_gib": usage.ru_maxrss / 2**20, "status": status,
            "progress": progress[-1].strip() if progress else "", "log": log.read_text()[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20480)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kill_after", type=float, default=120.0, help="seconds before the first run is killed")
    parser.add_argument("--work", default=None, help="folder for the slide and outputs (default: a temporary one)")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: write the slide and exit
    args = parser.parse_args()
    if args.build:
        build_slide(Path(args.build), args.size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide = work / "slide.tif"
        start = time.perf_counter()
        # built in a child process: Linux counts the parent's resident memory at fork in a child's peak (across
        # exec), so the inference runs (children of this process) would otherwise report the slide array as theirs
        subprocess.run([sys.executable, __file__, "--build", str(slide), "--size", str(args.size)], check=True)
        tissue = float(tissue_islands(args.size).mean())
        print(f"slide {args.size} px, tissue {tissue:.1%}, {slide.stat().st_size / 2**20:.0f} MiB, built in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)  # a fresh start, also when --work holds an earlier run
        killed = run(slide, out, args.threads, args.kill_after)
        partial = out / ".slide.partial"
        done_before = len(__import__("json").loads((partial / "state.json").read_text())["done"]) \
            if (partial / "state.json").is_file() else 0
        print(f"killed after {killed['seconds']:.0f} s with {done_before} tiles done", flush=True)
        resumed = run(slide, out, args.threads)
        if resumed["status"] != 0:
            raise SystemExit(f"the resumed run failed:\n{resumed['log']}")
        with open(out / "slide.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        ids = [int(r["id"]) for r in rows]
        assert len(set(ids)) == len(ids) == max(ids), "nucleus ids are not 1..N"
        opts = SlideOptions()  # the defaults the command ran with
        with wsi.open_slide(slide) as opened:
            mask = wsi.tissue_mask(opened, max_size=opts.thumbnail_size)
            tiles = len(wsi.iter_tiles(opened, 0, opts.tile_size, opts.tile_overlap, mask, opts.min_tissue_fraction))
        grid = len(range(0, args.size - opts.tile_size + 1, opts.tile_size - opts.tile_overlap)) ** 2
        total = killed["seconds"] + resumed["seconds"]
        lines = [
            "# A whole slide",
            "",
            f"Machine: {machine_line()}; torch threads {args.threads}. Produced by `benchmarks/bench_slide.py "
            f"--size {args.size} --kill_after {args.kill_after:g}`.",
            "",
            f"Slide: {args.size} x {args.size} px at 0.25 µm/px (40x), 3 levels, JPEG tiles of 256 px "
            f"({slide.stat().st_size / 2**20:.0f} MiB); {tissue:.0%} of it tissue (islands filled with the 30 "
            "MoNuSeg training images), the rest glass. Command: `python -m monai.bundle run inference --config_file "
            f"configs/inference.json --input_file slide.tif --output_dir out` (defaults: tissue found on the coarsest "
            f"level, tiles of {opts.tile_size} px with {opts.tile_overlap} px overlap, scale from the slide's metadata checked on 3 crops).",
            "",
            "| run | seconds | peak memory (GiB) | tiles done |",
            "|---|---|---|---|",
            f"| first, killed (SIGKILL) | {killed['seconds']:.0f} | {killed['peak_gib']:.2f} | {done_before} of {tiles} |",
            f"| rerun, resumed to the end | {resumed['seconds']:.0f} | {resumed['peak_gib']:.2f} | "
            f"{tiles - done_before} of {tiles} |",
            "",
            f"Nuclei: **{len(rows)}** (ids 1..N, none twice) in {total:.0f} s of segmenting in all: "
            f"**{len(rows) / total:.0f} nuclei per second**, {total / tiles:.1f} s per tissue tile of {opts.tile_size} px; "
            f"{total / (tissue * args.size**2 / 1e6):.2f} s per tissue megapixel. The glass costs nothing: "
            f"{tiles} of the {grid}+ tiles of the grid are read.",
            f"Last progress line: `{resumed['progress']}`",
            "",
        ]
        page = DOCS / "benchmarks" / "slide.md"
        page.write_text("\n".join(lines))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
