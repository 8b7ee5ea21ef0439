"""Negative prompts (paper §3.4, Table 7): train the segmentor with K = 0, 1, 2 negatives, test each with
K = 0, 1, 2, prompted by the ground truth ("oracle"), on held-out synthetic H&E with overlapping nuclei.

Every step goes through the bundle's own commands (``training`` with ``--num_neg_prompts K``; ``evaluating`` with
``--prompts oracle --pipeline#num_neg K``). Prints the table and the machine, writes
``docs/benchmarks/negative_prompts.md``.

    python benchmarks/ablation_negative_prompts.py [--epochs 150] [--size 128] [--k_train 0 1 2] [--k_test 0 1 2]
        [--stride 16] [--work /tmp/ablation_neg] [--out docs/benchmarks/negative_prompts.md]

``--stride 8`` gives the segmentor's convolutional encoder a 2x finer token grid (the token-resolution study);
``--window 64`` decodes each prompt on the 64 px window centred on it (with ``--stride 4``: 16x16 tokens, 1 px masks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import DOCS, Stopwatch, bundle, machine_line
from scripts.pipeline.model_file import export_model
from scripts.data.synthetic import write_synthetic_dataset


def train_segmentor(run: Path, train: Path, args: argparse.Namespace, k_train: int, overrides: dict) -> None:
    """The bundle's training run (prompter for 1 epoch only: the oracle evaluation does not use it)."""
    bundle("training", "--config_file", "configs/train.json", "--stage", "both", "--dataset_dir", str(train),
           "--output_dir", str(run), "--patch_size", str(args.size), "--val_fraction", "0.125",
           "--num_neg_prompts", str(k_train), "--prompter#hparams#max_epochs", "1",
           "--prompter#hparams#fpn_channels", "64",
           "--prompter#hparams#mlp_hidden", "64", "--segmentor#hparams#sam_variant", args.variant,
           "--segmentor#hparams#max_epochs", str(args.epochs), "--segmentor#hparams#lr", "0.001",
           "--segmentor#hparams#overrides", repr(overrides),
           "--segmentor#hparams#num_prompts_per_image", "16", "--segmentor#hparams#batch_size", "8",
           "--segmentor#hparams#mask_loss", "bce", "--segmentor#hparams#mask_reduction", "balanced",
           "--segmentor#hparams#focal_weight", "1.0", "--val_interval", "10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--k_train", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k_test", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stride", type=int, default=16, choices=(4, 8, 16), help="segmentor token stride in px")
    parser.add_argument("--window", type=int, default=0,
                        help="segmentor decoding window in px (0: the whole image, as SAM)")
    parser.add_argument("--variant", default="conv_small", help="segmentor variant (conv_small or vit_tiny)")
    parser.add_argument("--work", default="/tmp/ablation_neg")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite the table from the metrics.json files of an earlier run in --work")
    parser.add_argument("--out", default=str(DOCS / "benchmarks" / "negative_prompts.md"))
    args = parser.parse_args()
    work = Path(args.work)
    size = (args.size, args.size)
    command_file = work / "command.txt"
    if args.report_only:
        train, heldout = work / "train", work / "heldout"
    else:
        train = write_synthetic_dataset(work / "train", 64, size=size, n_nuclei=(10, 20), num_classes=3, seed=0)
        heldout = write_synthetic_dataset(work / "heldout", 16, size=size, n_nuclei=(10, 20), num_classes=3, seed=1000)
        command_file.write_text(" ".join(["python benchmarks/ablation_negative_prompts.py", *sys.argv[1:]]))
    start_machine = machine_line()
    results, seconds, watch = {}, {}, Stopwatch()
    overrides = {"prompt_dim": 128, "decoder_mlp_dim": 512, "decoder_heads": 4, "patch_size": args.stride,
                 "decoder_window": args.window}
    if args.variant != "conv_small":  # a ViT encoder at 128 px: window 8 divides its 8x8 (stride 16) token grid
        overrides["window_size"] = 128 // args.stride
    seconds_file = work / "training_seconds.json"
    if args.report_only:
        seconds = {int(k): v for k, v in json.loads(seconds_file.read_text()).items()} if seconds_file.is_file() else {}
    for k_train in args.k_train:
        run = work / f"train_k{k_train}"
        if not args.report_only:
            watch.time(f"training K = {k_train}", train_segmentor, run, train, args, k_train, overrides)
            seconds[k_train] = watch.seconds[f"training K = {k_train}"]
            seconds_file.write_text(json.dumps(seconds))
            export_model(run / "prompter" / "last.pt", run / "segmentor" / "last.pt", run / "model.pt")
        for k_test in args.k_test:
            out = work / f"eval_train{k_train}_test{k_test}"
            if not args.report_only:
                bundle("evaluating", "--config_file", "configs/evaluate.json", "--dataset_dir", str(heldout),
                       "--model_path", str(run / "model.pt"), "--prompts", "oracle", "--pipeline#num_neg", str(k_test),
                       "--output_dir", str(out))
            results[(k_train, k_test)] = json.loads((out / "metrics.json").read_text())
    command = (command_file.read_text().strip() if command_file.is_file()
               else "python benchmarks/ablation_negative_prompts.py")
    lines = [
        "# Negative prompts: K in training and in testing (oracle prompts)"
        if (args.stride, args.variant, args.window) == (16, "conv_small", 0) else
        f"# Segmentor {args.variant}, token stride {args.stride} px"
        + (f", {args.window} px decoding window" if args.window else "")
        + " (oracle prompts; compare with the conv_small stride-16 rows of negative_prompts.md)",
        "",
        f"Command: `{command}`.",
        f"Machine: {start_machine} (start); {machine_line()} (end)." if not args.report_only else
        "Machine: AMD EPYC, 2 cores, 1 torch thread per process, shared with other trainings (times are wall times).",
        f"Data: synthetic H&E ({args.size} px, 64 training / 16 held-out images, 10-20 touching and overlapping",
        "nuclei each, `scripts/data/synthetic.py`). Segmentor `" + args.variant + "` (128-d mask decoder, token stride "
        f"{args.stride} px) trained from scratch for "
        f"{args.epochs} epochs (balanced BCE + dice + IoU MSE, lr 1e-3, same seed); tested with one ground-truth",
        "point per nucleus and its K nearest other points as negatives (paper Table 7, \"GT\" columns).",
        "",
        "| K train | K test | PQ | DQ | SQ | AJI | training time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (k_train, k_test), m in sorted(results.items()):
        took = f"{seconds[k_train]:.0f}" if k_train in seconds else "–"
        lines.append(f"| {k_train} | {k_test} | {m['pq']:.3f} | {m['dq']:.3f} | {m['sq']:.3f} | {m['aji']:.3f} "
                     f"| {took} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
