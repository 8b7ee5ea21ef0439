"""Does cost grow linearly with the image? ``run inference`` (the bundle's command, its default outputs) on 16
MoNuSeg images of 1000 px padded to 1024 px with white, and on the 4096 px mosaic of the same 16 (one image):
wall time, peak memory (the process's maximum resident set) and nuclei found, alternating the two, each run its own
process. Then the mask decoder's time per prompt against the number of prompts in an image (real prompts, the
pipeline's own chunking). Writes ``docs/benchmarks/linear_cost.md``.

    .venv/bin/python benchmarks/bench_linear.py [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import BUNDLE, DOCS, MODEL, SHARED_DATA, machine_line
from scripts.data.readers import list_items
from scripts.inference import image_tensor
from scripts.pipeline.model_file import load_model
from scripts.pipeline.options import PipelineOptions
from scripts.segmentor.net import decode_at_points

SIDE = 1024  # each part, px
GRID = 4  # parts per side of the mosaic


def parts() -> list[np.ndarray]:
    """16 MoNuSeg training images (1000 px, 40x), padded to 1024 px with white."""
    items = list_items(str(SHARED_DATA / "monuseg_train")) + list_items(str(SHARED_DATA / "monuseg_train_extra"))
    images = []
    for item in items[: GRID * GRID]:
        image = item.load().image
        padded = np.full((SIDE, SIDE, 3), 255, np.uint8)
        padded[: image.shape[0], : image.shape[1]] = image
        images.append(padded)
    return images


def run_inference(args: list[str], out: Path, threads: int) -> dict:
    """One ``run inference`` in its own process: wall seconds, peak RSS (GiB), nuclei (CSV rows)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
               "--output_dir", str(out), "--num_threads", str(threads), "--overwrite", "true", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=BUNDLE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    nuclei = 0
    for table in out.glob("*.csv"):
        with open(table, newline="") as f:
            nuclei += sum(1 for _ in csv.DictReader(f))
    return {"seconds": seconds, "peak_gib": usage.ru_maxrss / 2**20, "nuclei": nuclei}


def decoder_per_prompt(counts: list[int], chunks: list[int], repeats: int = 3) -> dict[int, dict[int, float]]:
    """ms per prompt of the mask decoder (the pipeline's arithmetic: ``decoder_tokens``, ``precision``) over the
    first ``n`` real prompts of one 1024 px image, decoded in chunks of each size: {chunk: {n: ms}}."""
    from scripts.pipeline.promptnucseg import negative_prompts

    network = load_model(MODEL)
    image = image_tensor(parts()[0])
    points = network.find_prompts(image)["points"]
    coords, labels = negative_prompts(points, None, network.options.num_neg)
    embedding = network.embed(image, points)
    tokens, dtype = network.options.decoder_tokens, network.dtype(network.segmentor)
    out: dict[int, dict[int, float]] = {}
    with torch.no_grad():
        for chunk in chunks:
            out[chunk] = {}
            for n in counts:
                n = min(n, len(points))
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for first in range(0, n, chunk):
                        part = slice(first, min(first + chunk, n))
                        decode_at_points(network.segmentor, embedding, coords[part], labels[part], tokens=tokens,
                                         dtype=dtype)
                    times.append(time.perf_counter() - start)
                out[chunk][n] = 1000 * min(times) / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = parts()
        (tmp / "parts").mkdir()
        for k, image in enumerate(images):
            Image.fromarray(image).save(tmp / "parts" / f"part_{k:02d}.png")
        rows = [np.concatenate(images[r * GRID : (r + 1) * GRID], axis=1) for r in range(GRID)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp / "mosaic.png")
        runs = {"parts": [], "mosaic": []}
        for _ in range(args.repeats):
            runs["parts"].append(run_inference(["--input_dir", str(tmp / "parts")], tmp / "out_parts", args.threads))
            runs["mosaic"].append(run_inference(["--input_file", str(tmp / "mosaic.png")], tmp / "out_mosaic",
                                                args.threads))
            print(runs["parts"][-1], runs["mosaic"][-1], flush=True)
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_gib", "nuclei")}
              for k, v in runs.items()}
    ratio = median["mosaic"]["seconds"] / median["parts"]["seconds"]
    nuclei = median["mosaic"]["nuclei"] / median["parts"]["nuclei"] - 1
    chunk = PipelineOptions().chunk_size  # the default the runs above used
    counts = [20, 40, 150, 300]
    decoder = decoder_per_prompt(counts, sorted({16, 32, 64, 128, chunk}))
    lines = [
        "# Linear cost: a 4096 px mosaic against its 16 parts",
        "",
        f"Machine: {machine_line()}; torch threads {args.threads}; {args.repeats} runs of each, alternating, each "
        "in its own process (medians). Command: `python -m monai.bundle run inference --config_file "
        "configs/inference.json` with its default outputs (label maps, GeoJSON, CSV, overlay) and options.",
        "Inputs: 16 MoNuSeg training images (1000 px, 40x) padded to 1024 px with white, as 16 PNG files "
        "(`--input_dir`) and as one 4096 px PNG (`--input_file`). Produced by `benchmarks/bench_linear.py`.",
        "",
        "| input | seconds | peak memory (GiB) | nuclei |",
        "|---|---|---|---|",
        *(f"| {name} | {m['seconds']:.1f} | {m['peak_gib']:.2f} | {m['nuclei']:.0f} |" for name, m in median.items()),
        "",
        f"Mosaic / parts: **{ratio:.2f}x** the time, {100 * nuclei:+.1f} % nuclei.",
        "",
        "(Until 2026-12-07 every chunk of 128 prompts copied the whole image embedding to channels-last before "
        "gathering its windows: 1 GiB for a 4096 px image, 48 times; the mosaic then took 1.57x the parts' time and "
        "peaked at 4.07 GiB. The embedding is now stored channels-last, in the decoder's dtype, once.)",
        "",
        "Mask decoder, ms per prompt against the prompts in one image (real prompts of a 1024 px MoNuSeg image, "
        "the pipeline's `decoder_tokens` and `precision`, in chunks of each size; best of 3). The default "
        f"`chunk_size` is {chunk}:",
        "",
        "| prompts | " + " | ".join(f"chunk {c}" for c in decoder) + " |",
        "|---|" + "---|" * len(decoder),
        *(f"| {n} | " + " | ".join(f"{decoder[c][n]:.2f}" for c in decoder) + " |" for n in counts),
        "",
        f"Per prompt at {counts[-1]} / at {counts[0]} with the default chunk: "
        f"**{decoder[chunk][counts[-1]] / decoder[chunk][counts[0]]:.2f}x**.",
        "",
    ]
    page = DOCS / "benchmarks" / "linear_cost.md"
    page.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
