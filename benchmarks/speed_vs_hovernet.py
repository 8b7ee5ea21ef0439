"""Speed on this CPU: PromptNucSeg next to MONAI's HoVer-Net, the floating-point bound, and how time grows.

1. Per 256 px tile, on the same real H&E tiles (CoNSeP tiles held out by the default training's split; MoNuSeg
   crops without the shared data), in one process, alternating tile by tile:
   - PromptNucSeg end to end (``PromptNucSeg.forward``: prompter, prompt decoding + NMS, image encoder, mask
     decoder batched over the tile's prompts, stitching) and each stage; and end to end with the prompter's
     test-time augmentation (``prompter_tta``: 8 prompter passes);
   - ``monai.networks.nets.HoVerNet`` (fast mode, 4 CoNSeP classes, batch 1; weights random: its time does not
     depend on them) plus MONAI's ``HoVerNetInstanceMapPostProcessingd`` and ``HoVerNetNuclearTypePostProcessingd``
     run on the tile's ground truth turned into HoVer-Net outputs (``ComputeHoVerMaps``), so that the watershed
     sees real nuclei. Fast mode outputs only the central 164 px of its 256 px input, so a slide needs 2.4x more
     HoVer-Net tiles than 256 px tiles; the table reports time per input tile and per output megapixel.
2. The floating-point bound: FLOPs of each stage (``torch.utils.flop_counter.FlopCounterMode``) divided by this
   machine's dense fp32 matmul rate (best of 2048 x 2048 ``torch.mm``).
3. Growth: mask-decoder and tile time against the number of prompts in a tile (10-150, points from the tile's
   ground truth, then random points), and end-to-end time against image size (256-4096 px H&E mosaics).

The model is ``bundle/models/model.pt`` (``--model`` for another, ``--random`` for the default architecture with
random weights calibrated to about 40 prompts per tile). Writes ``docs/results/speed.md`` and two plots.

    .venv/bin/python benchmarks/speed_vs_hovernet.py [--tiles 16] [--threads 2] [--max_size 4096] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (DOCS, HOVERNET_OUT, MODEL, REPO, SHARED_DATA, TILE, HoverNetRunner, Stopwatch, he_crops,
                    instrumented, machine, random_model_file, slide_mosaic)
from scripts.pipeline.model_file import load_model
from scripts.inference import image_tensor
from scripts.data.records import NucleusRecord
from scripts.segmentor.net import decode_at_points


# ---------------------------------------------------------------------------------------------- inputs
def eval_tiles(count: int) -> tuple[list[NucleusRecord], str]:
    """``count`` 256 px H&E tiles with ground truth: held-out CoNSeP tiles, else MoNuSeg-free synthetic tiles."""
    consep = SHARED_DATA / "consep_train"
    if consep.is_dir():
        from scripts.evaluation.scoring import list_dataset

        items = list_dataset([str(consep), str(SHARED_DATA / "monuseg_train")], "auto", "val", 0.2, 0)
        tiles = [it.load() for it in items if not it.name.startswith("TCGA")]
        step = max(1, len(tiles) // count)
        chosen = tiles[::step][:count]
        return chosen, f"{len(chosen)} CoNSeP 256 px tiles held out by the default training's split (every {step}th)"
    from scripts.data.synthetic import make_synthetic_record

    records = [make_synthetic_record((TILE, TILE), n_nuclei=40, num_classes=4, seed=k) for k in range(count)]
    return records, f"{count} synthetic 256 px tiles (no shared data)"


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best dense fp32 matmul rate of this machine, GFLOP/s (``torch.mm`` of two size x size matrices)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = min(Stopwatch().repeat("mm", lambda: torch.mm(a, b), repeats, warmup=1))
    return 2 * size**3 / best / 1e9


def flops(fn) -> float:
    """Floating-point operations of ``fn()`` (multiply-add = 2), counted by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- measurements
def time_tiles(network, hovernet: HoverNetRunner, tiles: list[NucleusRecord], network_tta=None) -> dict:
    """Per tile seconds of each stage of both methods, alternating tile by tile (after one warm-up of each); with
    ``network_tta`` (the model with prompter test-time augmentation), its end-to-end seconds too."""
    network(image_tensor(tiles[0].image))
    hovernet.forward(tiles[0].image)
    if network_tta is not None:
        network_tta(image_tensor(tiles[0].image))
    ours: list[Stopwatch] = []  # one per tile: the pieces of one pipeline call
    whole = Stopwatch()  # a run per tile: HoVer-Net's "network" and "post-processing", our pipeline with TTA "tta"
    prompts: list[int] = []
    for record in tiles:
        watch = Stopwatch()
        tensor = image_tensor(record.image)
        with instrumented(network, watch), watch.section("total"):
            result = network(tensor)
        ours.append(watch)
        prompts.append(int(len(result["classes"])))
        whole.time("network", hovernet.forward, record.image)
        outputs = hovernet.outputs_from_truth(record)
        whole.time("post-processing", hovernet.postprocess, outputs)
        if network_tta is not None:
            whole.time("tta", network_tta, tensor)
    stages = ["prompter network", "prompt decoding + NMS", "encoder", "decoder", "stitching", "total"]
    return {
        "ours": {s: statistics.median(w.seconds[s] for w in ours) for s in stages},
        "ours_mean_total": statistics.mean(w.seconds["total"] for w in ours),
        "hovernet": {k: whole.median(k) for k in ("network", "post-processing")},
        "hovernet_mean_total": statistics.mean(a + b for a, b in zip(whole.runs["network"],
                                                                     whole.runs["post-processing"])),
        "nuclei_median": statistics.median(prompts),
        "tta_total": whole.median("tta") if whole.runs["tta"] else None,
    }


@torch.no_grad()
def stage_flops(network, hovernet: HoverNetRunner, record: NucleusRecord, prompts: int) -> dict:
    """FLOPs per 256 px tile: prompter, encoder, decoder at ``prompts`` prompts (with 1 negative each), HoVer-Net."""
    tensor = image_tensor(record.image)[None]
    embedding = network.segmentor.encode(tensor)
    points = torch.rand(prompts, 2, 2) * TILE
    labels = torch.tensor([[1, 0]]).expand(prompts, 2)
    return {
        "prompter": flops(lambda: network.prompter(tensor)),
        "encoder": flops(lambda: network.segmentor.encode(tensor)),
        "decoder": flops(lambda: _decode(network, embedding, points, labels)),
        "hovernet": flops(lambda: hovernet.forward(record.image)),
    }


def _decode(network, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor):
    return decode_at_points(network.segmentor, embedding[0], points, labels)


@torch.no_grad()
def decoder_scaling(network, record: NucleusRecord, counts: list[int], repeats: int = 3) -> list[dict]:
    """Mask-decoder seconds for ``counts`` prompts on one tile (one positive + one negative point each)."""
    embedding = network.segmentor.encode(image_tensor(record.image)[None])
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in counts:
        points = torch.rand(n, 2, 2, generator=generator) * TILE
        labels = torch.tensor([[1, 0]]).expand(n, 2)
        runs = Stopwatch().repeat("decoder", lambda: _decode(network, embedding, points, labels), repeats, warmup=1)
        rows.append({"prompts": n, "decoder_s": min(runs)})
    return rows


@torch.no_grad()
def size_scaling(network, sizes: list[int]) -> list[dict]:
    """End-to-end seconds of the pipeline on H&E images of each size (crops or mosaics of MoNuSeg images)."""
    rows = []
    for size in sizes:
        image = (he_crops(size, 1, seed=size)[0] if size <= 1000
                 else slide_mosaic(size, block=512, tissue=1.0, holes=0.0))
        tensor = image_tensor(image)
        watch = Stopwatch()
        result = watch.time("pipeline", network, tensor)
        rows.append({"size": size, "seconds": watch.seconds["pipeline"], "nuclei": int(len(result["classes"]))})
        print(f"  {size} px: {rows[-1]['seconds']:.2f} s, {rows[-1]['nuclei']} nuclei", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def plots(decoder_rows: list[dict], size_rows: list[dict], tile_total: float, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["prompts"] for r in decoder_rows], [1000 * r["decoder_s"] for r in decoder_rows], "o-")
    ax.set_xlabel("prompts (nuclei) in a 256 px tile")
    ax.set_ylabel("mask decoder, ms per tile")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "speed_vs_nuclei.png", dpi=110)
    names.append("speed_vs_nuclei.png")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    mpx = [r["size"] ** 2 / 1e6 for r in size_rows]
    ax.loglog(mpx, [r["seconds"] for r in size_rows], "o-", label="measured")
    ax.loglog(mpx, [tile_total * m * 1e6 / TILE**2 for m in mpx], "--", label="tile time x area")
    ax.set_xlabel("image size, megapixels")
    ax.set_ylabel("seconds end to end")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_dir / "speed_vs_size.png", dpi=110)
    names.append("speed_vs_size.png")
    plt.close("all")
    return names


def markdown(info: dict, model_note: str, tiles_note: str, t: dict, fl: dict, rate: float, dec: list[dict],
             sizes: list[dict], pictures: list[str], command: str) -> str:
    ours, hv = t["ours"], t["hovernet"]
    hv_total = hv["network"] + hv["post-processing"]
    speedup = hv_total / ours["total"]
    out_mpx_ours = TILE**2 / 1e6
    out_mpx_hv = HOVERNET_OUT**2 / 1e6
    lines = [
        "## Speed on this CPU",
        "",
        f"Command: `{command}` ({info['date']}).",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}; "
        f"load average {info['load'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        f"Model: {model_note}. Tiles: {tiles_note}; median {t['nuclei_median']:.0f} nuclei found per tile.",
        "",
        f"**PromptNucSeg is {speedup:.1f}x faster than MONAI's HoVer-Net per 256 px tile** (medians, same process, "
        "same tiles, alternating), and "
        f"{(hv_total / out_mpx_hv) / (ours['total'] / out_mpx_ours):.1f}x per output megapixel.",
        "",
        "| method / stage | s per 256 px tile (median) | GFLOP | GFLOP / matmul rate (s) |",
        "|---|---|---|---|",
        f"| PromptNucSeg, end to end | {ours['total']:.3f} "
        f"| {(fl['prompter'] + fl['encoder'] + fl['decoder']) / 1e9:.1f} "
        f"| {(fl['prompter'] + fl['encoder'] + fl['decoder']) / 1e9 / rate:.3f} |",
        f"| &nbsp; prompter network | {ours['prompter network']:.3f} | {fl['prompter'] / 1e9:.1f} "
        f"| {fl['prompter'] / 1e9 / rate:.3f} |",
        f"| &nbsp; prompt decoding + NMS | {ours['prompt decoding + NMS']:.3f} | – | – |",
        f"| &nbsp; segmentor image encoder | {ours['encoder']:.3f} | {fl['encoder'] / 1e9:.1f} "
        f"| {fl['encoder'] / 1e9 / rate:.3f} |",
        f"| &nbsp; mask decoder ({t['nuclei_median']:.0f} prompts) | {ours['decoder']:.3f} "
        f"| {fl['decoder'] / 1e9:.1f} | "
        f"{fl['decoder'] / 1e9 / rate:.3f} |",
        f"| &nbsp; stitching | {ours['stitching']:.3f} | – | – |",
        *([f"| PromptNucSeg with prompter TTA (`--pipeline#prompter_tta true`, 8 prompter passes), end to end | "
           f"{t['tta_total']:.3f} | – | – |"] if t.get("tta_total") else []),
        f"| HoVer-Net (fast), end to end | {hv_total:.3f} | {fl['hovernet'] / 1e9:.1f} "
        f"| {fl['hovernet'] / 1e9 / rate:.3f} |",
        f"| &nbsp; network | {hv['network']:.3f} | {fl['hovernet'] / 1e9:.1f} | {fl['hovernet'] / 1e9 / rate:.3f} |",
        f"| &nbsp; post-processing (MONAI) | {hv['post-processing']:.3f} | – | – |",
        "",
        f"Dense fp32 matmul rate measured here: {rate:.0f} GFLOP/s (2048 x 2048 `torch.mm`, best of 5). Means: "
        f"PromptNucSeg {t['ours_mean_total']:.3f} s, HoVer-Net {t['hovernet_mean_total']:.3f} s per tile. "
        "The decoder's "
        "FLOPs are counted at the median prompt count with one negative point per prompt. The last column is the "
        "time the counted FLOPs would take at the `torch.mm` rate: a floor for matmul-bound stages (the mask "
        "decoder: many small matmuls run far from it), not for convolutions, which oneDNN runs faster than that "
        "rate here (HoVer-Net's network).",
        "",
        "### Time against nuclei per tile",
        "",
        "| prompts in the tile | mask decoder (s) |",
        "|---|---|",
        *[f"| {r['prompts']} | {r['decoder_s']:.3f} |" for r in dec],
        "",
        f"![decoder time against nuclei](results/{pictures[0]})",
        "",
        "### Time against image size",
        "",
        "| image (px) | end to end (s) | nuclei | s per 256 px of area |",
        "|---|---|---|---|",
        *[f"| {r['size']} x {r['size']} | {r['seconds']:.2f} | {r['nuclei']} "
          f"| {r['seconds'] / (r['size'] ** 2 / TILE**2):.3f} |"
          for r in sizes],
        "",
        f"![end-to-end time against image size](results/{pictures[1]})",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--random", action="store_true", help="random weights of the default architecture")
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="4 tiles, sizes up to 1024 (smoke run)")
    parser.add_argument("--output", default=str(DOCS / "results" / "speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = {**machine(args.threads), "date": datetime.now().strftime("%Y-%m-%d %H:%M")}
    tiles, tiles_note = eval_tiles(4 if args.quick else args.tiles)
    if args.random:
        model_path = random_model_file(Path(tempfile.mkdtemp()) / "model.pt", he_crops(1000, 1)[0],
                                       variant="conv_small")
        model_note = "default architecture, random weights (prompter calibrated to ~40 prompts per tile)"
    else:
        model_path = Path(args.model)
        if not model_path.is_file():
            raise SystemExit(f"model file not found: {model_path} (train and export one, or pass --random)")
        model_note = f"`{model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path}`"
    network = load_model(model_path, "cpu")
    hovernet = HoverNetRunner()
    print(f"machine: {info}", flush=True)
    timing = time_tiles(network, hovernet, tiles, load_model(model_path, "cpu", prompter_tta=True))
    print(f"per tile: ours {timing['ours']}, HoVer-Net {timing['hovernet']}", flush=True)
    rate = matmul_gflops(args.threads)
    fl = stage_flops(network, hovernet, tiles[0], int(round(timing["nuclei_median"])) or 1)
    dec = decoder_scaling(network, tiles[0], [10, 20, 40, 80, 150])
    sizes = [s for s in (256, 512, 1024, 2048, 4096) if s <= (1024 if args.quick else args.max_size)]
    size_rows = size_scaling(network, sizes)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    pictures = plots(dec, size_rows, timing["ours"]["total"], out.parent)  # linked from docs/results.md
    command = " ".join(["python benchmarks/speed_vs_hovernet.py", *sys.argv[1:]])
    text = markdown(info, model_note, tiles_note, timing, fl, rate, dec, size_rows, pictures, command)
    print(text)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
