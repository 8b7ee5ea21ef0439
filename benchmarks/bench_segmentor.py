"""Segmentor speed on this machine: parameters, encoder seconds per tile, decoder seconds per prompt.

For each variant at 256 px: the image encoder on one tile (batch 1), and the mask decoder batched over Z prompts of
one tile (Z = 1, 40, 150; one positive + one negative point each, each prompt on its decoding window, masks
upsampled to the window's px), medians after
warm-up. Prints the machine and writes a markdown table to ``docs/benchmarks/segmentor.md``.

Usage (from the repository root):
``.venv/bin/python benchmarks/bench_segmentor.py [--threads 2] [--variants vit_tiny vit_b]``

A variant may carry ``SegmentorSpec`` overrides: ``conv_small:prompt_dim=128,decoder_mlp_dim=512,decoder_heads=4``
(the default model's 128-d decoder), ``conv_small:patch_size=8`` (stride-8 tokens),
``conv_small:patch_size=8,decoder_window=128`` (stride-8 tokens, each prompt decoded on a 128 px window),
``vit_b:window_size=16``
(a window that divides the 16x16 grid instead of SAM's 14, which pads it to 28x28).
(on a shared machine, ``nice -n -10`` in front gives the benchmark the cores over nice-0 neighbours).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from common import DOCS, Stopwatch, machine
from scripts.segmentor.build import build_segmentor
from scripts.segmentor.net import decode_at_points


def timed(watch: Stopwatch, name: str, fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall seconds of ``fn()`` over ``repeats`` runs after one warm-up, timed as ``name``."""
    watch.repeat(name, fn, repeats, warmup=1)
    return watch.median(name), watch.fastest(name)


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> (name, overrides with int values)."""
    name, _, rest = spec.partition(":")
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    return name, overrides


def bench_variant(variant: str, image_size: int, prompts: list[int], repeats: int) -> dict:
    torch.manual_seed(0)
    name, overrides = parse_variant(variant)
    model = build_segmentor(name, image_size, **overrides).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    row = {
        "variant": variant,
        "params_total": count(model),
        "params_encoder": count(model.image_encoder),
        "params_prompt": count(model.prompt_encoder),
        "params_decoder": count(model.mask_decoder),
        "grid": model.image_size // model.patch_size,
        "window": model.embedding_size[0],
    }
    image = torch.rand(1, 3, image_size, image_size) * 255
    watch = Stopwatch()
    with torch.inference_mode():
        row["encoder_s"] = timed(watch, "encoder", lambda: model.encode(image), repeats)
        emb = model.encode(image)
        for z in prompts:
            coords = torch.rand(z, 2, 2) * (image_size - 1)
            labels = torch.tensor([1, 0]).repeat(z, 1)
            row[f"decoder_{z}"] = timed(watch, f"decoder_{z}", lambda: decode_at_points(model, emb[0], coords, labels),
                                        repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["vit_tiny", "vit_b"])
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--prompts", nargs="+", type=int, default=[1, 40, 150])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(DOCS / "benchmarks" / "segmentor.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    info = machine()
    host = (
        f"CPU: {info['cpu']} ({info['cores']} logical cores), torch {info['torch']} with {info['threads']} "
        f"threads, fp32, Python {info['python']}, nice {info['nice']}, load average before {info['load'][0]:.2f}"
    )
    print(host, flush=True)
    rows = []
    for v in args.variants:
        row = bench_variant(v, args.image_size, args.prompts, args.repeats)
        rows.append(row)
        print(row, flush=True)
    load_after = os.getloadavg()

    header = (
        "| variant | tokens: tile / decoder window | params total (M) | encoder (M) | prompt enc. (M) | decoder (M) "
        "| encoder s/tile | "
        + " | ".join(f"decoder @{z} prompts: ms/prompt" for z in args.prompts)
        + " |"
    )
    lines = [
        "# Segmentor speed (CPU)",
        "",
        f"Written by `benchmarks/bench_segmentor.py` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        host + f"; load average after {load_after[0]:.2f}.",
        "",
        f"Input {args.image_size} px; encoder on one tile (batch 1); decoder = prompt encoder + mask decoder batched "
        "over all prompts of one tile (1 positive + 1 negative point each, each prompt on the embedding window "
        f"centred on it, single-mask output upsampled to the window's px). Median of {args.repeats} runs after one "
        "warm-up, the fastest run in brackets (less "
        "sensitive to other processes). Decoder columns: milliseconds per prompt = seconds per batched call / "
        "prompts. Random weights (speed does not depend on them).",
        "",
        header,
        "|" + "---|" * (7 + len(args.prompts)),
    ]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['grid']}x{r['grid']} / {r['window']}x{r['window']}",
            f"{r['params_total'] / 1e6:.2f}",
            f"{r['params_encoder'] / 1e6:.2f}",
            f"{r['params_prompt'] / 1e6:.3f}",
            f"{r['params_decoder'] / 1e6:.2f}",
            f"{r['encoder_s'][0]:.3f} ({r['encoder_s'][1]:.3f})",
        ] + [f"{1e3 * r[f'decoder_{z}'][0] / z:.2f} ({1e3 * r[f'decoder_{z}'][1] / z:.2f})" for z in args.prompts]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The machine is shared: a load average above the thread count means other processes competed for the "
        "cores and the figures are upper bounds.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
