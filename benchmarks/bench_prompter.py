"""Prompter speed on CPU: parameters and seconds per 256 px tile for each backbone.

Prints the machine (CPU model, threads, torch version) and, per backbone, the parameter count, the median
seconds of an inference forward pass (eval, no grad, batch 1) and of a training step (forward + loss +
backward, batch 1) over ``--runs`` runs after ``--warmup`` runs; writes a markdown table.

    .venv/bin/python benchmarks/bench_prompter.py --runs 5 --threads 1 2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from common import DOCS, Stopwatch, machine
from scripts.prompter.loss import PrompterLoss
from scripts.prompter.net import Prompter


def bench_backbone(name: str, args: argparse.Namespace) -> dict:
    """Parameters (M) of the prompter with backbone ``name`` and the median seconds of an inference forward pass
    and (``args.train``) of a training step on one ``args.size`` px tile."""
    torch.manual_seed(0)
    net = Prompter(args.num_classes, backbone=name, levels=tuple(args.levels), anchor_step=args.anchor_step)
    params = sum(p.numel() for p in net.parameters())
    image = torch.rand(1, 3, args.size, args.size) * 255

    net.eval()

    def infer():
        with torch.no_grad():
            net(image)

    watch = Stopwatch()
    watch.repeat("inference", infer, args.runs, args.warmup)

    net.train()
    criterion = PrompterLoss()
    gt_points = [torch.rand(40, 2) * args.size]
    gt_classes = [torch.randint(0, args.num_classes, (40,))]
    mask = (torch.rand(1, 1, args.size, args.size) > 0.7).float()

    def train_step():
        net.zero_grad(set_to_none=True)
        criterion(net(image), gt_points, gt_classes, mask)["loss"].backward()

    if args.train:
        watch.repeat("training step", train_step, max(1, args.runs // 2), 1)
    return {"backbone": name, "params_m": params / 1e6, "infer_s": watch.median("inference"),
            "train_s": watch.median("training step") if args.train else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=None, help="default: resnet_small resnet18 [convnext_small]")
    parser.add_argument("--size", type=int, default=256, help="tile side in px")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts to time")
    parser.add_argument("--num_classes", type=int, default=5)
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--anchor_step", type=int, default=8)
    parser.add_argument("--no_train", dest="train", action="store_false", help="skip the training-step timing")
    parser.add_argument("--output", type=Path, default=DOCS / "benchmarks" / "prompter.md")
    args = parser.parse_args()

    backbones = args.backbones
    if backbones is None:
        backbones = ["resnet_small", "resnet18"]
        try:
            import timm  # noqa: F401

            backbones.append("convnext_small")
        except ImportError:
            print("timm not importable: skipping convnext_small")

    info = machine()
    load = f", 1-min load average {info['load'][0]:.1f}" if not math.isnan(info["load"][0]) else ""
    host = f"{info['cpu']}, {info['cores']} CPUs visible, torch {info['torch']}"
    print(f"machine: {host}{load}")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in backbones:
            row = {**bench_backbone(name, args), "threads": threads}
            rows.append(row)
            print(
                f"{name:16s} {threads} thr {row['params_m']:7.2f} M params  infer {row['infer_s']:.3f} s/tile  "
                f"train step {row['train_s']:.3f} s/tile"
            )

    setting = (
        f"{args.size} px tile, batch 1, C = {args.num_classes}, levels {tuple(args.levels)}, λ = {args.anchor_step}, "
        f"FPN 256 ch, MLP 256; median of {args.runs} runs after {args.warmup} warm-up (training step: median of "
        f"{max(1, args.runs // 2)} after 1)"
    )
    lines = [
        "# Prompter CPU benchmark",
        "",
        f"Machine: {host}{load}.",
        "",
        f"Setting: {setting}. Written by `benchmarks/bench_prompter.py`; figures on a shared machine are noisy.",
        "",
        "| backbone | torch threads | parameters (M) | inference (s / tile) | training step (s / tile) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['backbone']} | {r['threads']} | {r['params_m']:.2f} | {r['infer_s']:.3f} | {r['train_s']:.3f} |"
        for r in rows
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
