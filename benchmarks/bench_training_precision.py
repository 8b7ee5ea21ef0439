"""Training in float32 and in bfloat16 (``--<stage>#hparams#precision``) on CPU: speed, and what the networks learn.

Speed: ``python -m monai.bundle run training`` as a user runs it, with the shipped model's recipes (the prompter:
``configs/train_default_prompter_r18_aug.json``; the segmentor: ``configs/train_default_s4.json``, from random
weights) on real tiles (default: CoNSeP's training tiles), one stage at a time, for ``--iterations`` iterations, the
two precisions alternating ``--rounds`` times (paired: the machine is shared). The seconds per iteration are read
from the trainer's log (the time between consecutive iteration lines, the first ``--skip`` left out): data
loading, augmentation, forward, loss, backward and optimiser step, as in a real epoch (validation is not run).

Learning (``--learning``): the test suite's synthetic recipe (``tests/conftest.py: SYNTHETIC_TRAINING``, both
stages, 25 + 80 epochs on 64 synthetic 128 px images) trained to the end in each precision; the last validation
of each stage (prompter detection F1, segmentor oracle PQ and AJI) and the seconds each stage took. One seed each.

Prints the machine and the figures; writes ``docs/benchmarks/training_precision.md``.

    .venv/bin/python benchmarks/bench_training_precision.py --threads 2 --iterations 12 --rounds 2 --learning
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from common import DOCS, REPO, SHARED_DATA, bundle, machine, machine_line

RECIPES = {  # stage: the configs on top of configs/train.json and configs/train_default.json
    "prompter": ["configs/train_default_prompter_r18_aug.json"],
    "segmentor": ["configs/train_default_s4.json"],
}
ITERATION_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - INFO - Epoch: \d+/\d+, Iter: (\d+)/\d+ -- (\w+)_loss")
METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")
PRECISIONS = ("float32", "bfloat16")


def iteration_stamps(log: str, stage: str) -> list[datetime]:
    """The times of ``stage``'s iteration lines in a trainer's ``log`` (ignite's StatsHandler)."""
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in map(ITERATION_LINE.match, log.splitlines())
            if m and m.group(3) == stage]


def iteration_seconds(log: str, stage: str, skip: int) -> list[float]:
    """Seconds between consecutive iteration lines of ``stage`` in ``log``, the first ``skip`` iterations left out."""
    stamps = iteration_stamps(log, stage)
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])][skip:]


def last_validation(log: str, key: str) -> dict[str, float]:
    """The last validation line of ``log`` that holds ``key`` (e.g. ``f1_det``, ``pq``), as {name: value}, with its
    ``epoch``."""
    found = [m for m in map(METRICS_LINE.search, log.splitlines()) if m and f"{key}:" in m.group(2)]
    if not found:
        raise SystemExit(f"no validation with {key} in the log")
    pairs = re.findall(r"([\w/-]+): (\S+)", found[-1].group(2))
    return {"epoch": int(found[-1].group(1)), **{name: float(value) for name, value in pairs}}


def bundle_training(args: list[str], threads: int) -> str:
    """``python -m monai.bundle run training ARGS`` with ``threads`` torch threads and glibc told to keep freed
    memory (as ``tools/train_default.sh`` runs it); its log."""
    return bundle("training", *args, env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                                          "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"})


def run_training(stage: str, precision: str, args: argparse.Namespace, work: Path) -> list[float]:
    """One ``training`` run of ``stage`` in ``precision``; its seconds per iteration."""
    configs = ",".join(f"'{c}'" for c in ["configs/train.json", "configs/train_default.json", *RECIPES[stage]])
    log = bundle_training(["--config_file", f"[{configs}]", "--stage", stage, "--dataset_dir", str(args.dataset),
                           "--output_dir", str(work / f"{stage}_{precision}"), "--resume", "false",
                           "--max_epochs", "1", f"--{stage}#hparams#max_epochs", "1",
                           f"--{stage}#hparams#precision", precision, "--epoch_length", str(args.iterations),
                           "--val_interval", "1000", f"--{stage}#hparams#init_checkpoint", "$None"], args.threads)
    seconds = iteration_seconds(log, stage, args.skip)
    if not seconds:
        raise SystemExit(f"no {stage} iteration lines in the log:\n{log[-2000:]}")
    return seconds


def synthetic_learning(precision: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """The test suite's synthetic recipe, both stages, in ``precision``: last validations and seconds per stage."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import SYNTHETIC_SIZE, SYNTHETIC_TRAINING
    from scripts.data.synthetic import write_synthetic_dataset

    data = work / "synthetic"
    if not data.is_dir():
        write_synthetic_dataset(data, 64, size=(SYNTHETIC_SIZE, SYNTHETIC_SIZE), n_nuclei=(8, 16), num_classes=3, seed=0)
    log = bundle_training(["--config_file", "configs/train.json", "--dataset_dir", str(data),
                           "--output_dir", str(work / f"synthetic_{precision}"), *SYNTHETIC_TRAINING,
                           "--prompter#hparams#precision", precision, "--segmentor#hparams#precision", precision],
                          args.threads)
    prompter, segmentor = last_validation(log, "f1_det"), last_validation(log, "pq")
    seconds = {stage: (stamps[-1] - stamps[0]).total_seconds()
               for stage in ("prompter", "segmentor") for stamps in [iteration_stamps(log, stage)]}
    return {"f1_det": prompter["f1_det"], "pq": segmentor["pq"], "aji": segmentor["aji"],
            "prompter_epoch": prompter["epoch"], "segmentor_epoch": segmentor["epoch"],
            "prompter_s": seconds["prompter"], "segmentor_s": seconds["segmentor"]}


def speed_table(args: argparse.Namespace, work: Path) -> list[str]:
    """Seconds per iteration of each stage in each precision (paired rounds), as markdown lines."""
    lines = [f"`--threads {args.threads} --iterations {args.iterations} --rounds {args.rounds}`: the bundle's "
             f"`training` command on `{args.dataset.name}` (256 px crops), one stage at a time, the two precisions "
             "alternating; seconds per iteration from the trainer's log (data, augmentation, forward, loss, "
             f"backward, step; no validation), median over the runs' iterations after the first {args.skip}.", "",
             "| stage (recipe) | float32 s/iteration | bfloat16 s/iteration | speed-up | iterations timed per precision |",
             "|---|---|---|---|---|"]
    for stage in args.stages:
        seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
        for round_ in range(args.rounds):
            for precision in PRECISIONS:
                seconds[precision] += run_training(stage, precision, args, work / str(round_))
                print(f"{stage} {precision} round {round_ + 1}: "
                      f"{statistics.median(seconds[precision]):.2f} s/iteration so far", flush=True)
        fp32, bf16 = (statistics.median(seconds[precision]) for precision in PRECISIONS)
        lines.append(f"| {stage} ({RECIPES[stage][0]}) | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x | "
                     f"{len(seconds['float32'])} |")
    return lines


def learning_table(args: argparse.Namespace, work: Path) -> list[str]:
    """The synthetic recipe trained in each precision, as markdown lines."""
    lines = ["The test suite's synthetic recipe (`tests/conftest.py: SYNTHETIC_TRAINING`: both stages, 25 + 80 "
             "epochs, 64 synthetic 128 px images, one seed), trained to the end in each precision; the last "
             "validation of each stage and the seconds it took.", "",
             "| precision | prompter F1 (epoch) | segmentor oracle PQ / AJI (epoch) | prompter s | segmentor s |",
             "|---|---|---|---|---|"]
    for precision in PRECISIONS:
        got = synthetic_learning(precision, args, work)
        print(precision, got, flush=True)
        lines.append(f"| {precision} | {got['f1_det']:.3f} ({got['prompter_epoch']}) | {got['pq']:.3f} / "
                     f"{got['aji']:.3f} ({got['segmentor_epoch']}) | "
                     f"{got['prompter_s']:.0f} | {got['segmentor_s']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=SHARED_DATA / "consep_train", help="a training folder")
    parser.add_argument("--stages", nargs="*", default=list(RECIPES), choices=list(RECIPES),
                        help="stages to time (none: no timing)")
    parser.add_argument("--iterations", type=int, default=12, help="iterations per run")
    parser.add_argument("--skip", type=int, default=2, help="first iterations left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="float32 / bfloat16 pairs per stage")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--learning", action="store_true", help="also train the synthetic recipe in each precision")
    parser.add_argument("--out", type=Path, default=DOCS / "benchmarks" / "training_precision.md")
    args = parser.parse_args()
    if args.stages and not args.dataset.is_dir():
        raise SystemExit(f"--dataset {args.dataset}: no such folder")
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))  # for the report
    info = machine(args.threads)
    print(machine_line(info), flush=True)
    lines = ["# Training in float32 and in bfloat16 (`--<stage>#hparams#precision`)", "",
             f"Machine: {machine_line(info)}; torch {info['torch']}. "
             "`benchmarks/bench_training_precision.py` (its arguments below).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if args.stages:
            lines += ["## Speed", "", *speed_table(args, Path(tmp)), ""]
        if args.learning:
            lines += ["## Learning", "", *learning_table(args, Path(tmp)), ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
