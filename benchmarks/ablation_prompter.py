"""Prompter ablation (paper Table 6): auxiliary nuclear-region head on/off in training, mask-aided prompt
filtering on/off at inference, on held-out synthetic H&E.

Training goes through the bundle's own command (``training --stage prompter``, ``--prompter#hparams#aux_weight 1`` or
``0``); the held-out images are then decoded with ``scripts.prompter.decode.decode_prompts`` with and without
``mask_filter`` and scored by ``scripts.evaluation.handlers.NucleusDetectionMetric`` (pairing radius 6 px at 128 px).
Without the auxiliary loss the nuclear map is untrained, so filtering by it is shown for completeness only.
Writes ``docs/benchmarks/prompter_ablation.md``.

    python benchmarks/ablation_prompter.py [--epochs 25] [--work /tmp/ablation_prompter]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import DOCS, Stopwatch, bundle, cells, machine
from scripts.io.checkpoints import load_checkpoint
from scripts.evaluation.handlers import NucleusDetectionMetric
from scripts.data.points import instance_points
from scripts.prompter.net import Prompter
from scripts.prompter.decode import decode_prompts
from scripts.data.readers import list_items
from scripts.data.synthetic import write_synthetic_dataset


def load_prompter(checkpoint: Path) -> Prompter:
    ck = load_checkpoint(checkpoint)
    cfg = ck["config"]
    prompter = Prompter(num_classes=cfg["num_classes"], backbone=cfg["backbone"], levels=tuple(cfg["levels"]),
                        anchor_step=cfg["anchor_step"], fpn_channels=cfg["fpn_channels"], mlp_hidden=cfg["mlp_hidden"])
    prompter.load_state_dict(ck["network"])
    return prompter.eval()


@torch.no_grad()
def detection(prompter: Prompter, heldout: Path, mask_filter: bool, radius: float) -> dict:
    metric = NucleusDetectionMetric(det_radius=radius)
    for item in list_items(heldout):
        record = item.load()
        image = torch.from_numpy(record.image.transpose(2, 0, 1).copy()).float()[None]
        pred = decode_prompts(prompter(image), image_size=record.image.shape[:2], mask_filter=mask_filter,
                              nms_radius=8)[0]
        metric.update(instance_points(record.inst_map)[0], pred["points"])
    return metric.aggregate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--work", default="/tmp/ablation_prompter")
    parser.add_argument("--out", default=str(DOCS / "benchmarks" / "prompter_ablation.md"))
    args = parser.parse_args()
    work = Path(args.work)
    train = write_synthetic_dataset(work / "train", 64, size=(128, 128), n_nuclei=(10, 20), num_classes=3, seed=0)
    heldout = write_synthetic_dataset(work / "heldout", 16, size=(128, 128), n_nuclei=(10, 20), num_classes=3,
                                      seed=1000)
    rows, watch = [], Stopwatch()
    for aux_weight in (1.0, 0.0):
        run = work / f"aux{aux_weight:g}"
        with watch.section(run.name):
            bundle("training", "--config_file", "configs/train.json", "--stage", "prompter",
                   "--dataset_dir", str(train), "--output_dir", str(run), "--patch_size", "128",
                   "--val_fraction", "0.125", "--prompter#hparams#max_epochs", str(args.epochs),
                   "--prompter#hparams#fpn_channels", "64", "--prompter#hparams#mlp_hidden", "64",
                   "--prompter#hparams#nms_radius", "8", "--prompter#hparams#aux_weight", str(aux_weight),
                   "--val_interval", "5")
        seconds = watch.seconds[run.name]
        prompter = load_prompter(run / "prompter" / "last.pt")
        for mask_filter in (True, False):
            m = detection(prompter, heldout, mask_filter, radius=6.0)
            rows.append((aux_weight > 0, mask_filter, m, seconds))
            print(f"aux {aux_weight} filter {mask_filter}: {m}", flush=True)
    info = machine()
    lines = [
        "# Prompter: auxiliary head and mask-aided filtering (paper Table 6)",
        "",
        f"Command: `python benchmarks/ablation_prompter.py {' '.join(sys.argv[1:])}`; {info['cpu']}, "
        f"{info['cores']} cores, load {info['load'][0]:.1f} at the end.",
        f"Synthetic H&E, 128 px, 64 training / 16 held-out images; prompter `resnet_small` (FPN/MLP 64) trained "
        f"{args.epochs} epochs from scratch; detection of the held-out nuclei (points paired within 6 px).",
        "",
        "| auxiliary head in training | mask-aided filtering | precision | recall | F1 | training (s) |",
        "|---|---|---|---|---|---|",
    ]
    for aux, mask_filter, m, seconds in rows:
        figures = cells(m, ("precision_det", "recall_det", "f1_det"))
        lines.append(f"| {'on' if aux else 'off'} | {'on' if mask_filter else 'off'} | {figures} | {seconds:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
