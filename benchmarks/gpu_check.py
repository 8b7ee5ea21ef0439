"""PromptNucSeg on a CUDA GPU: same nuclei as on the CPU, time per tile next to HoVer-Net, and the paper's sizes.

A check for a machine with a GPU (the project trains and tests on CPU; a GPU is a config choice of its users):

1. Agreement: the shipped model on held-out CoNSeP 256 px tiles, once on the CPU and once on the GPU; the GPU's
   instance map is scored against the CPU's (PQ, matched at IoU > 0.5) and the nucleus counts compared.
2. Speed per 256 px tile on the GPU (CUDA-synchronised wall time, batch 1, after a warm-up; median of the tiles):
   - the shipped model end to end (``PromptNucSeg.forward``);
   - the same pipeline with the paper's segmentor size, SAM ViT-B at 256 px (random weights: time does not depend
     on them);
   - MONAI's HoVer-Net (fast mode) network on the GPU and its MONAI post-processing (watershed, on the CPU), run
     on HoVer-Net-shaped outputs made from the tile's ground truth, as in ``speed_vs_hovernet.py``.
3. One large image (2048 px mosaic of the CoNSeP tiles) end to end with the shipped model.

Writes ``docs/results/gpu.md``.

    python benchmarks/gpu_check.py [--data ../shared/data] [--tiles 32] [--output docs/results/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from common import DOCS, MODEL, SHARED_DATA, HoverNetRunner, Stopwatch, machine, random_model_file
from scripts.pipeline.model_file import load_model
from scripts.inference import image_tensor
from scripts.evaluation.metrics import panoptic_quality
from scripts.data.records import METADATA_PATH, NucleusRecord


def held_out_tiles(data: Path, count: int) -> list[NucleusRecord]:
    """``count`` CoNSeP tiles of the default training's validation split (every k-th)."""
    from scripts.evaluation.scoring import list_dataset

    consep = data / "consep_train"
    if not consep.is_dir():
        raise SystemExit(f"--data {data}: no consep_train folder")
    items = list_dataset([str(consep)], "auto", "val", 0.2, 0)
    tiles = [it.load() for it in items]
    return tiles[:: max(1, len(tiles) // count)][:count]


def agreement(cpu_net, gpu_net, tiles: list[NucleusRecord]) -> dict:
    """PQ of the GPU's instance maps against the CPU's, and the nuclei each found."""
    pqs, cpu_counts, gpu_counts = [], [], []
    for record in tiles:
        on_cpu = cpu_net(image_tensor(record.image))
        on_gpu = gpu_net(image_tensor(record.image))
        pqs.append(panoptic_quality(on_cpu["inst_map"].numpy(), on_gpu["inst_map"].cpu().numpy()).pq)
        cpu_counts.append(len(on_cpu["classes"]))
        gpu_counts.append(len(on_gpu["classes"]))
    return {"pq": statistics.mean(pqs), "min_pq": min(pqs), "cpu_nuclei": sum(cpu_counts),
            "gpu_nuclei": sum(gpu_counts), "tiles": len(tiles)}


@torch.no_grad()
def tile_seconds(network, tiles: list[NucleusRecord]) -> tuple[float, float]:
    """Median end-to-end s per tile and median nuclei per tile, after one warm-up tile."""
    network(image_tensor(tiles[0].image))
    watch, counts = Stopwatch(sync=True), []
    for record in tiles:
        out = watch.time("tile", network, image_tensor(record.image))
        counts.append(len(out["classes"]))
    return watch.median("tile"), statistics.median(counts)


def hovernet_seconds(tiles: list[NucleusRecord], device: torch.device) -> dict:
    """Median s per tile of MONAI's HoVer-Net (fast) network on ``device`` and of its post-processing."""
    runner = HoverNetRunner()
    runner.network.to(device)
    runner.forward(tiles[0].image)
    on_gpu, on_cpu = Stopwatch(sync=True), Stopwatch()
    for record in tiles:
        on_gpu.time("network", runner.forward, record.image)
        on_cpu.time("post-processing", runner.postprocess, runner.outputs_from_truth(record))
    return {"network": on_gpu.median("network"), "post-processing": on_cpu.median("post-processing")}


def mosaic(tiles: list[NucleusRecord], size: int) -> np.ndarray:
    """A size x size RGB image tiled with the given 256 px tiles (repeated)."""
    per_side = size // 256
    rows = [np.concatenate([tiles[(r * per_side + c) % len(tiles)].image for c in range(per_side)], axis=1)
            for r in range(per_side)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def markdown(info: dict, agree: dict, rows: list[tuple[str, float, float]], hover: dict, large: dict) -> str:
    hover_total = hover["network"] + hover["post-processing"]
    lines = [
        "# PromptNucSeg on a GPU",
        "",
        f"Measured {info['date']} by `benchmarks/gpu_check.py` on **{info['gpu']}** (host CPU: {info['cpu']}, "
        f"{info['threads']} threads), PyTorch {info['torch']}, {info['tiles']} held-out CoNSeP 256 px tiles. "
        "Times are CUDA-synchronised wall times per tile (batch 1, median after a warm-up). "
        f"The shipped model is bundle version {info['version']}'s (`bundle/models/model.pt`).",
        "",
        "## Same nuclei as on the CPU",
        "",
        f"The shipped model's GPU instance maps scored against its CPU ones on {agree['tiles']} of the tiles: mean "
        f"PQ **{agree['pq']:.3f}** "
        f"(lowest tile {agree['min_pq']:.3f}); nuclei found: {agree['cpu_nuclei']} on the CPU, "
        f"{agree['gpu_nuclei']} on the GPU.",
        "",
        "## Time per 256 px tile",
        "",
        "| method | s / tile | tiles / s | nuclei / tile |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds, nuclei in rows:
        lines.append(f"| {name} | {seconds:.4f} | {1 / seconds:.1f} | {nuclei:.0f} |")
    lines += [
        f"| MONAI HoVer-Net fast: network (GPU) | {hover['network']:.4f} | {1 / hover['network']:.1f} | |",
        f"| MONAI HoVer-Net fast: + post-processing (CPU, MONAI transforms) | {hover_total:.4f} | "
        f"{1 / hover_total:.1f} | |",
        "",
        "HoVer-Net's fast mode outputs only the central 164 px of its 256 px input (2.4x more tiles per slide); its "
        "post-processing ran on HoVer-Net-shaped outputs made from each tile's ground truth; the ViT rows use random "
        "weights (their time does not depend on them) with the shipped prompter.",
        "",
        f"Large image: a {large['size']} px mosaic end to end with the shipped model in **{large['seconds']:.2f} s** "
        f"({large['nuclei']} nuclei).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--output", default=str(DOCS / "results" / "gpu.md"))
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke run of this script without a GPU")
    args = parser.parse_args()
    gpu = torch.device(args.device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --device cpu for a smoke run)")
    tiles = held_out_tiles(Path(args.data), args.tiles)
    gpu_name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else "no GPU (smoke run)"
    host = machine()
    info = {"date": datetime.now().strftime("%Y-%m-%d"), "gpu": gpu_name, "cpu": host["cpu"],
            "threads": host["threads"], "torch": host["torch"], "tiles": len(tiles),
            "version": json.loads(METADATA_PATH.read_text())["version"]}
    print(info, flush=True)

    shipped_gpu = load_model(args.model, device=gpu)
    agree = agreement(load_model(args.model, device="cpu"), shipped_gpu, tiles[:8])
    print("agreement", agree, flush=True)
    rows = [("PromptNucSeg, shipped model (end to end)", *tile_seconds(shipped_gpu, tiles))]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        for variant in ("vit_b",):
            path = random_model_file(Path(work) / f"{variant}.pt", tiles[0].image, variant=variant)
            network = load_model(path, device=gpu)
            label = {"vit_b": "ViT-B"}[variant]
            rows.append((f"PromptNucSeg, SAM {label} segmentor at 256 px (end to end)",
                         *tile_seconds(network, tiles)))
            print(rows[-1], flush=True)
            del network
            torch.cuda.empty_cache()
    hover = hovernet_seconds(tiles, gpu)
    print("hovernet", hover, flush=True)
    image = image_tensor(mosaic(tiles, 2048))
    shipped_gpu(image)
    watch = Stopwatch(sync=True)
    out = watch.time("large", shipped_gpu, image)
    large = {"size": 2048, "seconds": watch.seconds["large"], "nuclei": len(out["classes"])}
    print("large", large, flush=True)
    text = markdown(info, agree, rows, hover, large)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
