"""Speed on this CPU through ``run inference``: PromptNucSeg next to MONAI's HoVer-Net, per stage, and each lever.

1. Per 256 px tile, what the user runs: the bundle's ``inference`` command (``scripts.inference.main_inference``, the
   network built from ``configs/inference.json`` by ``monai.bundle.ConfigParser`` as the command builds it, default
   options, all five outputs written) over folders of PNG tiles, against ``monai.networks.nets.HoVerNet`` (fast
   mode, 4 CoNSeP classes, batch 1; random weights: its time does not depend on them) plus MONAI's
   ``HoVerNetInstanceMapPostProcessingd`` and ``HoVerNetNuclearTypePostProcessingd`` on the tile's ground truth made
   into HoVer-Net outputs (``ComputeHoVerMaps``, so that the watershed sees real nuclei). One process, alternating
   blocks of tiles (HoVer-Net on a block, then ``run inference`` on the same block), so that the load of this shared
   machine hits both; medians over the blocks. The tiles are the held-out CoNSeP tiles of typical density (at least
   ``--min_nuclei`` ground-truth nuclei: the tiles of sparse stroma and glass left out).
2. Where the time goes: the same tiles through ``run inference`` one by one, its outputs written in the loop
   (``write_ahead 0``), every stage timed (prompter, prompt decoding, image encoder, mask decoder, stitching, each
   writer); medians per tile. Next to each stage its FLOPs (``torch.utils.flop_counter``) over this machine's dense
   matmul rate (``torch.mm`` of 2048 x 2048, in the stage's precision): the time the arithmetic alone would take.
3. The levers, one at a time: ``run inference`` with the default options against the same with one lever changed,
   alternating blocks of tiles in the same run; and for those that change numerics, the held-out quality (the
   ``evaluating`` command on the validation split of CoNSeP and MoNuSeg), with the lever and without.
4. ``torch.compile`` of the mask decoder (``--compile``, minutes): its compile time and the decoder's time after.

Threads: ``torch.set_num_threads(--threads)`` (default 1, for both methods: one core's time, on a 2-core machine shared
with other work).
Writes ``docs/results/speed.md``.

    .venv/bin/python benchmarks/speed_vs_hovernet.py [--threads 1] [--min_nuclei 30] [--block 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from common import (BUNDLE, DOCS, MODEL, REPO, SHARED_DATA, TILE, HoverNetRunner, Stopwatch, evaluate, instrumented,
                    machine)
from scripts.data.records import NucleusRecord
from scripts.inference import image_tensor
from scripts.pipeline.options import PipelineOptions
from scripts.segmentor.net import decode_at_points

QUALITY_SETS = {"consep_train": "CoNSeP", "monuseg_train": "MoNuSeg"}  # held-out validation of the default split


# ---------------------------------------------------------------------------------------------- inputs
def typical_tiles(min_nuclei: int, limit: int | None = None) -> tuple[list[NucleusRecord], str]:
    """Held-out CoNSeP 256 px tiles (validation split of the default training) with at least ``min_nuclei``
    ground-truth nuclei; without the shared data, synthetic tiles of 40 nuclei."""
    consep = SHARED_DATA / "consep_train"
    if consep.is_dir():
        from scripts.evaluation.scoring import list_dataset

        items = list_dataset(str(consep), "auto", "val", 0.2, 0)
        records = [it.load() for it in items]
        chosen = [r for r in records if _nuclei(r) >= min_nuclei][:limit]
        counts = [_nuclei(r) for r in chosen]
        return chosen, (f"the {len(chosen)} held-out CoNSeP 256 px tiles (of {len(records)}) with at least "
                        f"{min_nuclei} ground-truth nuclei (median {statistics.median(counts):.0f}, "
                        f"{min(counts)}-{max(counts)})")
    from scripts.data.synthetic import make_synthetic_record

    count = limit or 16
    records = [make_synthetic_record((TILE, TILE), n_nuclei=40, num_classes=4, seed=k) for k in range(count)]
    return records, f"{count} synthetic 256 px tiles of 40 nuclei (no shared data)"


def _nuclei(record: NucleusRecord) -> int:
    return int(np.count_nonzero(np.unique(record.inst_map)))


def write_blocks(records: list[NucleusRecord], root: Path, block: int) -> list[Path]:
    """The tiles as PNG files, ``block`` per folder under ``root``; the folders."""
    folders = []
    for start in range(0, len(records), block):
        folder = root / f"block{start // block:02d}"
        folder.mkdir(parents=True)
        for k, record in enumerate(records[start : start + block]):
            Image.fromarray(record.image).save(folder / f"tile{start + k:03d}.png")
        folders.append(folder)
    return folders


# ---------------------------------------------------------------------------------------------- the command
def build_network(model: Path, pipeline: dict | None = None):
    """The ``network`` of ``configs/inference.json`` built as ``run inference`` builds it, with ``--pipeline#key
    value`` overrides ``pipeline``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["model_path"] = str(model)
    parser["device"] = "$torch.device('cpu')"
    for key, value in (pipeline or {}).items():
        parser[f"pipeline#{key}"] = value
    return parser.get_parsed_content("network")


def run_command(network, folder: Path, out: Path, write_ahead: int | None = None) -> float:
    """Wall seconds of the ``inference`` command's entry point over ``folder`` (outputs in a fresh ``out``);
    ``write_ahead``: that argument of ``run_inference`` (None: the command's own, ``main_inference``)."""
    from scripts.inference import main_inference, run_inference

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if write_ahead is None:
        main_inference(network, str(out), input_dir=str(folder))
    else:
        run_inference(network, str(out), input_dir=str(folder), write_ahead=write_ahead)
    return time.perf_counter() - start


def tiles_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# ---------------------------------------------------------------------------------------------- 1. against HoVer-Net
def against_hovernet(network, hovernet: HoverNetRunner, folders: list[Path], records: list[NucleusRecord],
                     block: int, work: Path, rounds: int) -> dict:
    """Per tile seconds: ``run inference`` per block / tiles in it, HoVer-Net network and post-processing per tile,
    alternating block by block (after one warm-up of each); ``folders[k]`` holds ``records[k * block:][:block]``."""
    run_command(network, folders[0], work / "warmup")
    hovernet.forward(records[0].image)
    ours: list[float] = []
    hv_net, hv_post = [], []
    for _ in range(rounds):
        for k, folder in enumerate(folders):
            block_records = records[k * block : (k + 1) * block]
            for record in block_records:
                start = time.perf_counter()
                hovernet.forward(record.image)
                hv_net.append(time.perf_counter() - start)
                outputs = hovernet.outputs_from_truth(record)
                start = time.perf_counter()
                hovernet.postprocess(outputs)
                hv_post.append(time.perf_counter() - start)
            ours.append(run_command(network, folder, work / "out") / len(block_records))
    return {"ours": statistics.median(ours), "ours_blocks": ours, "hv_network": statistics.median(hv_net),
            "hv_post": statistics.median(hv_post),
            "hv_total": statistics.median([a + b for a, b in zip(hv_net, hv_post)]), "blocks": len(ours)}


# ---------------------------------------------------------------------------------------------- 2. per stage
WRITERS = {"read_image": "read the tile", "write_label_maps": "label maps (2 TIFF)",
           "nucleus_table": "measurements (table)", "instance_polygons": "polygons",
           "write_geojson": "GeoJSON", "write_csv": "CSV", "write_overlay": "overlay PNG"}
NETWORK_STAGES = ["prompter network", "prompt decoding + NMS", "encoder", "decoder", "stitching"]


@contextlib.contextmanager
def writers_timed(watch: Stopwatch) -> Iterator[None]:
    """Time the functions ``scripts.inference`` reads and writes with (:data:`WRITERS`) while in the block."""
    import scripts.inference as inference

    originals = {name: getattr(inference, name) for name in WRITERS}
    for name, label in WRITERS.items():
        setattr(inference, name, watch.wrap(label, originals[name]))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(inference, name, fn)


def stage_times(network, records_folders: list[Path], work: Path, rounds: int = 1) -> dict:
    """Median seconds per tile of each stage (network and writers) and in all, each tile its own ``run_inference``
    call with the outputs written in the loop; and the median nuclei per tile."""
    from scripts.inference import run_inference

    files = [p for f in records_folders for p in tiles_in(f)]
    watches, nuclei = [], []
    for _ in range(rounds):
        for path in files:
            watch = Stopwatch()
            with instrumented(network, watch), writers_timed(watch), watch.section("total"):
                summary = run_inference(network, str(work / "stages"), input_file=str(path), overwrite=True,
                                        write_ahead=0)
            watches.append(watch)
            nuclei.append(summary.nuclei[str(path)])
    names = NETWORK_STAGES + list(WRITERS.values()) + ["total"]
    med = {name: statistics.median(w.seconds[name] for w in watches) for name in names}
    med["network, other"] = statistics.median(
        w.seconds["total"] - sum(w.seconds[n] for n in names if n != "total") for w in watches)
    return {"median": med, "nuclei": statistics.median(nuclei), "tiles": len(files)}


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best dense matmul rate of this machine in ``dtype``, GFLOP/s (``torch.mm`` of two size x size matrices)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = min(Stopwatch().repeat("mm", lambda: torch.mm(a, b), repeats, warmup=1))
    return 2 * size**3 / best / 1e9


def flops(fn: Callable) -> float:
    """Floating-point operations of ``fn()`` (multiply-add = 2), counted by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@torch.no_grad()
def stage_flops(network, hovernet: HoverNetRunner, record: NucleusRecord, prompts: int) -> dict:
    """FLOPs per 256 px tile: prompter, encoder, mask decoder at ``prompts`` prompts (one negative each, the
    pipeline's ``decoder_tokens``), HoVer-Net."""
    tensor = image_tensor(record.image)[None]
    embedding = network.segmentor.encode(tensor)[0]
    points = torch.rand(prompts, 2, 2, generator=torch.Generator().manual_seed(0)) * TILE
    labels = torch.tensor([[1, 0]]).expand(prompts, 2)
    tokens = network.options.decoder_tokens
    return {
        "prompter network": flops(lambda: network.prompter(tensor, region_map=False)),  # as the pipeline runs it
        "encoder": flops(lambda: network.segmentor.encode(tensor)),
        "decoder": flops(lambda: decode_at_points(network.segmentor, embedding, points, labels, tokens=tokens)),
        "hovernet": flops(lambda: hovernet.forward(record.image)),
    }


# ---------------------------------------------------------------------------------------------- 3. levers
@dataclass
class Lever:
    """One lever: the default against the default with ``pipeline`` options changed, ``write_ahead`` changed, or
    an attribute ``patch`` ((module, dotted name, value): a module constant or a class's method) set while the variant
    runs."""

    name: str
    what: str
    pipeline: dict = field(default_factory=dict)
    write_ahead: int | None = None
    patch: tuple | None = None
    numerics: bool = False  # changes the outputs: quality measured with and without


def levers(network) -> list[Lever]:
    """The levers measured, each against the defaults of ``network`` (so each row says what that lever is worth
    now)."""
    from scripts.inference import WRITE_AHEAD
    from scripts.io.writers import OVERLAY_PNG_LEVEL

    defaults = network.options
    full_window = defaults.decoder_tokens is None
    bf16 = network.dtype(network.prompter) == torch.bfloat16
    rows = [
        Lever("writing on a background thread", f"write_ahead {WRITE_AHEAD} vs 0 (outputs written before the next "
              "tile starts)", write_ahead=0),
        Lever("overlay PNG compression", f"zlib level {OVERLAY_PNG_LEVEL} vs PIL's default 6",
              patch=("scripts.io.writers", "OVERLAY_PNG_LEVEL", 6)),
        Lever("bfloat16", f"--pipeline#precision {defaults.precision} ({'bfloat16' if bf16 else 'float32'} here) vs "
              f"{'float32' if bf16 else 'bfloat16'}: prompter and encoder under torch.autocast, mask decoder in "
              "bfloat16", pipeline={"precision": "float32" if bf16 else "bfloat16"}, numerics=True),
        Lever("decoder tokens", f"--pipeline#decoder_tokens {defaults.decoder_tokens} vs "
              f"{16 if full_window else 'None (the whole 24 x 24 window)'}",
              pipeline={"decoder_tokens": 16 if full_window else None}, numerics=True),
        Lever("channels-last images", "the prompter's and the encoder's input in channels-last memory vs "
              "channels-first", patch=("scripts.pipeline.promptnucseg", "CHANNELS_LAST_ON_CPU", False)),
        Lever("decoder chunk", f"--pipeline#chunk_size 16 vs {defaults.chunk_size} prompts per decoder call",
              pipeline={"chunk_size": 16}),
    ]
    from scripts.pipeline.promptnucseg import PromptNucSeg

    run_prompter = PromptNucSeg.run_prompter
    rows += [
        Lever("weights kept in bfloat16", "the convolution and linear weights cast once (a copy kept by the pipeline) "
              "vs cast by autocast on every call (outputs bit for bit equal)",
              patch=("scripts.pipeline.promptnucseg", "PromptNucSeg.lowered", lambda self, module: module)),
        Lever("region head at the candidates", "the prompter's nuclear-region head on the P2 cells the candidate "
              "points read vs over the whole map, resampled to every pixel",
              patch=("scripts.pipeline.promptnucseg", "PromptNucSeg.run_prompter",
                     lambda self, batch, region_map=True: run_prompter(self, batch))),
    ]
    if defaults.input_scale == "auto":  # the scale chosen per image from its nuclei: a second pass on some tiles
        rows.append(Lever("scale check settles in a run", "a tile follows a settled run of tiles (every 4th still "
                          "checked) vs every tile checked (held-out PQ the same: docs/benchmarks/scale.md)",
                          patch=("scripts.pipeline.scale", "RunEvidence.follow", lambda self, *args: None)))
        rows.append(Lever("automatic input scale", "--pipeline#input_scale auto vs 1.0 (these tiles are 40x)",
                          pipeline={"input_scale": 1.0}, numerics=True))
    return rows


@contextlib.contextmanager
def patched(patch: tuple | None) -> Iterator[None]:
    if patch is None:
        yield
        return
    import importlib

    owner = importlib.import_module(patch[0])  # the attribute may be dotted: a class's method
    *path, name = patch[1].split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    setattr(owner, name, patch[2])
    try:
        yield
    finally:
        setattr(owner, name, original)


def measure_lever(lever: Lever, default_net, model: Path, folders: list[Path], work: Path, rounds: int) -> dict:
    """Median seconds per tile of ``run inference`` with the defaults and with ``lever``, alternating blocks."""
    from scripts.inference import WRITE_AHEAD

    variant_net = build_network(model, lever.pipeline) if lever.pipeline else default_net
    runs: dict[str, list[float]] = {"default": [], "lever": []}
    run_command(variant_net, folders[0], work / "warmup", WRITE_AHEAD)
    for _ in range(rounds):
        for folder in folders:
            n = len(tiles_in(folder))
            runs["default"].append(run_command(default_net, folder, work / "out", WRITE_AHEAD) / n)
            write_ahead = WRITE_AHEAD if lever.write_ahead is None else lever.write_ahead
            with patched(lever.patch):
                runs["lever"].append(run_command(variant_net, folder, work / "out", write_ahead) / n)
    return {k: statistics.median(v) for k, v in runs.items()}


def lever_quality(lever: Lever, model: Path, work: Path) -> dict[str, dict]:
    """Held-out PQ / mPQ of the ``evaluating`` command with the lever's options, per dataset."""
    args = [arg for key, value in lever.pipeline.items() for arg in (f"--pipeline#{key}", str(value))]
    name = "_".join(f"{k}-{v}" for k, v in lever.pipeline.items()) or "default"
    return {folder: evaluate(folder, 1.0, args, model, work / f"{name}_{folder}") for folder in QUALITY_SETS}


# ---------------------------------------------------------------------------------------------- 4. torch.compile
@torch.no_grad()
def compiled_decoder(network, record: NucleusRecord, repeats: int = 5) -> dict:
    """Seconds to compile the mask decoder (``torch.compile`` of ``Segmentor.predict_mask``, dynamic shapes, first
    call) and the decoder's time on one tile's prompts before and after (the pipeline's tokens and precision)."""
    import copy

    from scripts.pipeline.promptnucseg import negative_prompts

    prompts = network.find_prompts(image_tensor(record.image))
    coords, labels = negative_prompts(prompts["points"], None, network.options.num_neg)
    embedding = network.embed(image_tensor(record.image), prompts["points"])
    eager = network.segmentor
    compiled = copy.deepcopy(eager)
    compiled.predict_mask = torch.compile(compiled.predict_mask, dynamic=True)
    tokens, dtype = network.options.decoder_tokens, network.dtype(eager)

    def decode(segmentor):
        return decode_at_points(segmentor, embedding, coords, labels, tokens=tokens, dtype=dtype)

    start = time.perf_counter()
    try:
        decode(compiled)
    except Exception as error:  # reported, not fatal: the eager pipeline is what ships
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    compile_s = time.perf_counter() - start
    watch = Stopwatch()
    for _ in range(repeats):
        watch.time("eager", decode, eager)
        watch.time("compiled", decode, compiled)
    return {"compile_s": compile_s, "eager": watch.median("eager"), "compiled": watch.median("compiled"),
            "prompts": len(coords)}


# ---------------------------------------------------------------------------------------------- report
def markdown(info: dict, command: str, model_note: str, tiles_note: str, options: PipelineOptions, bf16: bool,
             main: dict, stages: dict, fl: dict, rates: dict, lever_rows: list[tuple[Lever, dict, dict | None]],
             compiled: dict | None, block: int) -> str:
    """The page; ``bf16``: the networks ran in bfloat16 (the FLOP bound then uses the bfloat16 matmul rate)."""
    speedup = main["hv_total"] / main["ours"]
    med = stages["median"]
    rate = rates["bfloat16" if bf16 else "float32"]
    precision = "bf16" if bf16 else "fp32"

    def bound(stage: str) -> str:
        return f"{fl[stage] / 1e9:.2f} | {fl[stage] / 1e9 / rate:.3f}" if stage in fl else "– | –"

    network_total = sum(med[s] for s in NETWORK_STAGES) + med["network, other"]
    writing_total = sum(med[label] for label in WRITERS.values())
    lines = [
        "## Speed on this CPU",
        "",
        f"Command: `{command}` ({info['date']}).",
        f"Machine: {info['cpu']}, {info['cores']} cores, **{info['threads']} torch thread** for both methods "
        f"(one core's time, on a machine shared with other work), torch {info['torch']}; load average {info['load'][0]:.1f} at "
        f"the start, {os.getloadavg()[0]:.1f} at the end.",
        f"Model: {model_note}; the pipeline's defaults (`{_options_note(options)}`; precision here: "
        f"{precision.replace('bf16', 'bfloat16').replace('fp32', 'float32')}).",
        f"Tiles: {tiles_note}; median {stages['nuclei']:.0f} nuclei found per tile.",
        "",
        f"**Through `run inference`, all five outputs written, PromptNucSeg takes {main['ours']:.3f} s per 256 px "
        f"tile against {main['hv_total']:.3f} s for MONAI's HoVer-Net (fast mode) with its post-processing: "
        f"{speedup:.1f}x faster** (medians over {main['blocks']} blocks of up to {block} tiles, the two methods "
        "alternating block by block in one process).",
        "",
        "| method | s per 256 px tile (median) |",
        "|---|---|",
        f"| PromptNucSeg, `run inference` (read, segment, write TIFF x2, GeoJSON, CSV, overlay) | {main['ours']:.3f} |",
        f"| HoVer-Net (fast), network + MONAI post-processing | {main['hv_total']:.3f} |",
        f"| &nbsp; network | {main['hv_network']:.3f} |",
        f"| &nbsp; post-processing | {main['hv_post']:.3f} |",
        "",
        "### Where the time goes",
        "",
        f"Each tile through `run_inference` alone, its outputs written in the loop (`write_ahead 0`), every stage "
        f"timed; medians over {stages['tiles']} tiles. GFLOP at the median nuclei count; the last column is that "
        f"work at this machine's dense {precision} matmul rate ({rate:.0f} GFLOP/s, 2048 x 2048 `torch.mm`, one "
        f"thread; fp32 {rates['float32']:.0f}, bf16 {rates['bfloat16']:.0f}): a floor for matmul-bound work, "
        "not reached by the many small matmuls and memory-bound steps of the mask decoder.",
        "",
        "| stage | s per tile (median) | GFLOP | GFLOP / matmul rate (s) |",
        "|---|---|---|---|",
        f"| network (`PromptNucSeg.forward`) | {network_total:.3f} | "
        f"{sum(fl[s] for s in ('prompter network', 'encoder', 'decoder')) / 1e9:.2f} | "
        f"{sum(fl[s] for s in ('prompter network', 'encoder', 'decoder')) / 1e9 / rate:.3f} |",
        f"| &nbsp; prompter network | {med['prompter network']:.3f} | {bound('prompter network')} |",
        f"| &nbsp; prompt decoding + NMS (the region head at the candidates included) | "
        f"{med['prompt decoding + NMS']:.3f} | – | – |",
        f"| &nbsp; segmentor image encoder | {med['encoder']:.3f} | {bound('encoder')} |",
        f"| &nbsp; mask decoder ({stages['nuclei']:.0f} prompts) | {med['decoder']:.3f} | {bound('decoder')} |",
        f"| &nbsp; stitching (painting, one region per nucleus) | {med['stitching']:.3f} | – | – |",
        f"| &nbsp; the rest (windows, negatives, glue) | {med['network, other']:.3f} | – | – |",
        f"| writing the outputs | {writing_total:.3f} | – | – |",
        *[f"| &nbsp; {label} | {med[label]:.3f} | – | – |" for label in WRITERS.values()],
        f"| one tile, in all | {med['total']:.3f} | – | – |",
        f"| HoVer-Net network, for scale | {main['hv_network']:.3f} | {fl['hovernet'] / 1e9:.1f} "
        f"| {fl['hovernet'] / 1e9 / rates['float32']:.3f} (fp32) |",
        "",
        "In the folder runs of the first table the writing overlaps the next tile's segmentation (a background "
        "thread), so a tile there costs less than the sum of these stages.",
        "",
        "### The levers",
        "",
        "Each lever against the defaults above, alternating blocks of tiles in the same run (medians per tile); "
        "for levers that change the outputs, held-out PQ (the `evaluating` command on the validation split of the "
        "default training: 80 CoNSeP tiles, 3 MoNuSeg images) with the defaults and with the lever.",
        "",
        "| lever | compared | defaults (s / tile) | with the lever (s / tile) | defaults / lever | PQ CoNSeP "
        "(mPQ) | PQ MoNuSeg |",
        "|---|---|---|---|---|---|---|",
    ]
    for lever, t, quality in lever_rows:
        q_cells = "– | –"
        if quality is not None:
            cells = []
            for folder in QUALITY_SETS:
                d, v = quality["default"][folder], quality["lever"][folder]
                mpq = f" ({d['mpq']:.4f} → {v['mpq']:.4f})" if d.get("mpq") is not None else ""
                cells.append(f"{d['pq']:.4f} → {v['pq']:.4f}{mpq}")
            q_cells = " | ".join(cells)
        lines.append(f"| {lever.name} | {lever.what} | {t['default']:.3f} | {t['lever']:.3f} | "
                     f"{t['default'] / t['lever']:.2f} | {q_cells} |")
    lines += ["", "Not measured here: int8 prompter by PyTorch's PT2E quantization (`torch.ao.quantization."
              "quantize_pt2e` is no longer in torch 2.14; it moved to `torchao`, which this project does not install) "
              "and ONNX Runtime (not installed either); both also need the prompter exported or compiled first."]
    if compiled and "error" in compiled:
        lines += ["", f"`torch.compile` of the mask decoder failed here: {compiled['error']}."]
    elif compiled:
        lines += [
            "",
            f"`torch.compile` of the mask decoder (`Segmentor.predict_mask`, Inductor, dynamic shapes; not used): "
            f"compiling took {compiled['compile_s']:.0f} s, paid again by every new process, and the decoder then "
            f"ran in {compiled['compiled']:.3f} s instead of {compiled['eager']:.3f} s on a tile of "
            f"{compiled['prompts']} prompts.",
        ]
    lines.append("")
    return "\n".join(lines)


def _options_note(options: PipelineOptions) -> str:
    """The options that set the speed, and any other that differs from :class:`PipelineOptions`'s defaults."""
    shown = ("decoder_tokens", "precision", "chunk_size", "input_scale")
    fields = PipelineOptions.__dataclass_fields__
    return ", ".join(f"{k} {v}" for k, v in vars(options).items() if k in shown or fields[k].default != v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min_nuclei", type=int, default=30, help="ground-truth nuclei a benchmark tile has at least")
    parser.add_argument("--block", type=int, default=8, help="tiles per block (per `run inference` call)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the tiles for the HoVer-Net comparison")
    parser.add_argument("--lever_tiles", type=int, default=16, help="tiles per lever comparison (3 rounds)")
    parser.add_argument("--no_quality", action="store_true", help="skip the held-out PQ of the numerics levers")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the mask decoder")
    parser.add_argument("--quick", action="store_true", help="8 tiles, no quality (smoke run)")
    parser.add_argument("--output", default=str(DOCS / "results" / "speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("scripts.inference").setLevel(logging.WARNING)
    info = {**machine(args.threads), "date": datetime.now().strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {info}", flush=True)
    model = Path(args.model)
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")
    model_note = f"`{model.relative_to(REPO) if model.is_relative_to(REPO) else model}`"
    records, tiles_note = typical_tiles(args.min_nuclei, 8 if args.quick else None)
    work = Path(tempfile.mkdtemp(prefix="speed_"))
    try:
        folders = write_blocks(records, work / "tiles", args.block)
        network = build_network(model)
        hovernet = HoverNetRunner()
        main_t = against_hovernet(network, hovernet, folders, records, args.block, work, args.rounds)
        print(f"per tile: ours {main_t['ours']:.3f} s, HoVer-Net {main_t['hv_total']:.3f} s", flush=True)
        stages = stage_times(network, folders, work)
        print(f"stages: {stages}", flush=True)
        rates = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
        fl = stage_flops(network, hovernet, records[0], int(round(stages["nuclei"])) or 1)
        lever_folders = write_blocks(records[: args.lever_tiles], work / "lever_tiles", max(1, args.block // 2))
        rows = []
        default_quality = None
        for lever in levers(network):
            t = measure_lever(lever, network, model, lever_folders, work, rounds=3)
            quality = None
            if lever.numerics and not (args.no_quality or args.quick):
                if default_quality is None:
                    default_quality = lever_quality(Lever("default", ""), model, work / "quality")
                quality = {"default": default_quality, "lever": lever_quality(lever, model, work / "quality")}
            rows.append((lever, t, quality))
            print(f"{lever.name}: {t} {quality and {k: {f: m['pq'] for f, m in v.items()} for k, v in quality.items()}}",
                  flush=True)
        compiled = compiled_decoder(network, records[0]) if args.compile else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python benchmarks/speed_vs_hovernet.py", *sys.argv[1:]])
    bf16 = network.dtype(network.prompter) == torch.bfloat16
    text = markdown(info, command, model_note, tiles_note, network.options, bf16, main_t, stages, fl, rates, rows,
                    compiled, args.block)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
