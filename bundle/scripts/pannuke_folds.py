"""PanNuke's three-fold protocol in one command: for each fold, train on the other folds, test on it; then the mean
and standard deviation of bPQ, mPQ and the per-class figures over the folds (paper Tables 1-3).

Run from ``bundle/``::

    python -m scripts.pannuke_folds --dataset_dir PANNUKE --output_dir runs/pannuke3 \\
        --sam_checkpoint sam_vit_b_01ec64.pth --backbone_weights convnext_small.pth [--device cuda:0] [--key value ...]

``PANNUKE`` holds the folds in separate folders (the official download: ``Fold 1/``, ``Fold 2/``, ``Fold 3/``, each
with its ``images.npy``, ``types.npy`` and ``masks.npy``). Per test fold ``<k>`` (e.g. ``fold3``), in
``<output_dir>/test_<k>/``, three steps, each the bundle's documented command (run from the current folder, logged to
``train.log`` / ``evaluate.log`` there, printed before it runs):

1. ``monai.bundle run training`` with ``--config_file`` (default: ``configs/train.json`` +
   ``configs/paper/pannuke.json``) on the other folds (``--dataset_dir "[...]"``; each split by ``val_fraction`` for
   the validation that picks ``best.pt``); every option this script does not know is passed on to it
   (``--max_epochs 1``, ``--sam_variant vit_h``...), except ``--pipeline#<name> value``, which goes to step 3. An
   interrupted training resumes from its ``last.pt``.
2. ``model.pt`` exported from both stages' ``best.pt``.
3. ``monai.bundle run evaluating`` (``configs/evaluate.json``) on fold ``<k>``, with the pipeline options the
   networks were validated with: the prompter checkpoint's ``nms_radius`` and ``mask_filter``, the segmentor
   checkpoint's ``min_area``; ``--pipeline#<name> value`` options given to this script override or add to them
   (e.g. ``--pipeline#assembly official``).

Then ``<output_dir>/summary.json`` and ``summary.md``: per fold and as mean ± std over the folds (population std,
``numpy.std``), bPQ, mPQ (PanNuke: tissue means, see :func:`scripts.evaluation.scores.summarize_scores`), PQ, AJI,
detection precision / recall / F1, per-class PQ and F1, and per tissue bPQ and mPQ (each fold's image mean of the
tissue, averaged over the folds: Table 1's rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.evaluation.scores import mean_defined
from scripts.io.atomic import atomic_open
from scripts.io.checkpoints import load_checkpoint

__all__ = ["find_fold_dirs", "fold_plan", "split_options", "run_fold", "summarize_folds", "summary_markdown",
           "main"]

DEFAULT_CONFIG = "['configs/train.json','configs/paper/pannuke.json']"
FIGURES = ("bpq", "mpq", "pq", "aji", "precision_det", "recall_det", "f1_det")
PER_CLASS = ("pq_per_class", "f1_per_class")


def find_fold_dirs(dataset_dir: str | Path) -> dict[str, Path]:
    """Fold name (``fold1``...) -> the folder holding that fold alone (the deepest folder above its three files).

    Raises:
        FileNotFoundError: no PanNuke fold below ``dataset_dir``.
        ValueError: fewer than two folds, or folds that share a folder (the message names them).
    """
    from scripts.data.readers.pannuke import find_folds

    root = Path(dataset_dir).absolute()
    folds = find_folds(root)
    if len(folds) < 2:
        raise ValueError(f"dataset_dir {root}: {len(folds)} PanNuke fold found, the protocol needs at least two "
                         f"(the official folds: Fold 1/, Fold 2/, Fold 3/)")
    dirs: dict[str, Path] = {}
    for fold in folds:
        if fold.name in dirs:
            raise ValueError(f"dataset_dir {root}: two folds are called {fold.name!r}")
        dirs[fold.name] = Path(os.path.commonpath([fold.images.parent, fold.masks.parent, fold.types.parent]))
    for (name_a, dir_a), (name_b, dir_b) in itertools.combinations(dirs.items(), 2):
        if dir_a == dir_b or dir_a in dir_b.parents or dir_b in dir_a.parents:
            raise ValueError(f"dataset_dir {root}: folds {name_a} and {name_b} share the folder "
                             f"{min(dir_a, dir_b, key=lambda d: len(d.parts))}; put each fold in a folder of its own "
                             f"(as the official download: Fold 1/, Fold 2/, Fold 3/)")
    return dict(sorted(dirs.items()))


def fold_plan(fold_dirs: Mapping[str, Path]) -> list[tuple[str, list[str]]]:
    """(test fold, training folds) for every fold, in name order."""
    names = list(fold_dirs)
    return [(test, [name for name in names if name != test]) for test in names]


def _mean_std(values: Sequence[float | None]) -> dict:
    """Mean and population std over the folds where the value is defined; None where none is."""
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return {"mean": float(np.mean(kept)) if kept else None, "std": float(np.std(kept)) if kept else None,
            "n_folds": len(kept)}


def _tissue_means(metrics: Mapping, key: str) -> dict[str, float | None]:
    """Per tissue, the mean of the images' ``key`` (``bpq``/``mpq``) where defined, from ``metrics["per_image"]``."""
    groups: dict[str, list] = {}
    for image in metrics.get("per_image", []):
        if image.get("tissue") is not None:
            groups.setdefault(image["tissue"], []).append(image.get(key))
    return {tissue: mean_defined(values) for tissue, values in sorted(groups.items())}


def summarize_folds(fold_metrics: Mapping[str, Mapping]) -> dict:
    """The protocol's figures from each test fold's ``metrics.json`` content (``{fold name: metrics}``).

    Returns ``{"folds": [...], "per_fold": {fold: {figure: value}}, "mean_std": {figure: {mean, std, n_folds}},
    "per_class": {figure: {class: {mean, std, n_folds}}}, "per_tissue": {tissue: {"bpq": {...}, "mpq": {...}}}}``.
    """
    folds = list(fold_metrics)
    per_fold = {fold: {key: fold_metrics[fold].get(key) for key in FIGURES} for fold in folds}
    out: dict = {"folds": folds, "per_fold": per_fold,
                 "mean_std": {key: _mean_std([per_fold[f][key] for f in folds]) for key in FIGURES}}
    out["per_class"] = {}
    for key in PER_CLASS:
        classes = sorted({name for f in folds for name in (fold_metrics[f].get(key) or {})})
        out["per_class"][key] = {name: _mean_std([(fold_metrics[f].get(key) or {}).get(name) for f in folds])
                                 for name in classes}
    tissues: dict[str, dict] = {}
    for key in ("bpq", "mpq"):
        by_fold = [_tissue_means(fold_metrics[f], key) for f in folds]
        for tissue in sorted({t for means in by_fold for t in means}):
            tissues.setdefault(tissue, {})[key] = _mean_std([means.get(tissue) for means in by_fold])
    out["per_tissue"] = tissues
    return out


def _fmt(entry: Mapping | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def summary_markdown(summary: Mapping) -> str:
    """The summary as Markdown tables: figures per fold and mean ± std, per class, per tissue."""
    folds = summary["folds"]
    lines = ["| figure | " + " | ".join(folds) + " | mean ± std |", "|---" * (len(folds) + 2) + "|"]
    for key in FIGURES:
        values = [summary["per_fold"][f][key] for f in folds]
        lines.append(f"| {key} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values)
                     + f" | {_fmt(summary['mean_std'][key])} |")
    classes = list(summary["per_class"].get("pq_per_class", {}))
    if classes:
        lines += ["", "| class | PQ | F1 (classification) |", "|---|---|---|"]
        for name in classes:
            lines.append(f"| {name} | {_fmt(summary['per_class']['pq_per_class'].get(name))} | "
                         f"{_fmt(summary['per_class'].get('f1_per_class', {}).get(name))} |")
    if summary["per_tissue"]:
        lines += ["", "| tissue | bPQ | mPQ |", "|---|---|---|"]
        for tissue, entry in summary["per_tissue"].items():
            lines.append(f"| {tissue} | {_fmt(entry.get('bpq'))} | {_fmt(entry.get('mpq'))} |")
    return "\n".join(lines) + "\n"


def _run(command: list[str], log_path: Path, what: str) -> None:
    """Run a bundle command, its output appended to ``log_path``; a failure names ``what``, the command and the log."""
    print(f"[pannuke_folds] {what}: {shlex.join(command)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{what} failed (exit {code}); log {log_path}:\n" + "\n".join(tail))


def _bundle(run_id: str, config_file: str, options: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *options]


def split_options(options: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Options for the training, and the pipeline's (``--pipeline#<name> value`` or ``--pipeline#<name>=value``,
    keys of ``configs/evaluate.json``) by name.

    Raises:
        ValueError: a pipeline option without a value (naming it).
    """
    training: list[str] = []
    pipeline: dict[str, str] = {}
    items = iter(options)
    for item in items:
        if not item.startswith("--pipeline#"):
            training.append(item)
            continue
        name, equals, value = item[len("--pipeline#"):].partition("=")
        if not equals:
            value = next(items, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"--pipeline#{name} needs a value")
        pipeline[name] = value
    return training, pipeline


def run_fold(test: str, train: Sequence[str], fold_dirs: Mapping[str, Path], output_dir: Path, config_file: str,
             device: str | None, training_options: Sequence[str], pipeline: Mapping[str, str] | None = None) -> dict:
    """Train on ``train``, export, evaluate on ``test`` (the validated pipeline options, ``pipeline`` over them);
    returns the test fold's ``metrics.json`` content."""
    from scripts.pipeline.model_file import export_model

    run_dir = output_dir / f"test_{test}"
    device_options = ["--device", device] if device else []
    dataset = repr([str(fold_dirs[name]) for name in train])
    _run(_bundle("training", config_file, ["--dataset_dir", dataset, "--dataset_format", "pannuke",
                                           "--output_dir", str(run_dir), *device_options, *training_options]),
         run_dir / "train.log", f"training for test fold {test} (on {', '.join(train)})")
    checkpoints = [run_dir / stage / "best.pt" for stage in ("prompter", "segmentor")]
    model = export_model(*checkpoints, run_dir / "model.pt")
    prompter, segmentor = (load_checkpoint(path)["config"] for path in checkpoints)
    options = {"nms_radius": str(prompter["nms_radius"]), "mask_filter": str(bool(prompter["mask_filter"])).lower(),
               "min_area": str(segmentor["min_area"]), **(pipeline or {})}
    eval_dir = run_dir / "eval"
    _run(_bundle("evaluating", "configs/evaluate.json",
                 ["--dataset_dir", str(fold_dirs[test]), "--dataset_format", "pannuke", "--model_path", str(model),
                  "--output_dir", str(eval_dir), *device_options,
                  *(arg for name, value in options.items() for arg in (f"--pipeline#{name}", value))]),
         run_dir / "evaluate.log", f"evaluation on test fold {test}")
    return json.loads((eval_dir / "metrics.json").read_text())


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.pannuke_folds", description=__doc__.split("\n")[0],
                                     epilog="Other --key value options are passed on to the training, "
                                            "--pipeline#<name> value to the evaluation.")
    parser.add_argument("--dataset_dir", required=True, help="the PanNuke folder, one sub-folder per fold")
    parser.add_argument("--output_dir", required=True, help="runs and summary go here (test_<fold>/, summary.*)")
    parser.add_argument("--config_file", default=DEFAULT_CONFIG, help=f"training configs (default {DEFAULT_CONFIG})")
    parser.add_argument("--device", default=None, help="training and evaluation device (default: cuda:0 if any)")
    args, options = parser.parse_known_args(argv)
    try:
        training_options, pipeline = split_options(options)
    except ValueError as error:
        parser.error(str(error))
    for option in ("--dataset_dir", "--dataset_format", "--output_dir"):
        if any(o == option or o.startswith(option + "=") for o in training_options):
            parser.error(f"{option} is set by the protocol for each fold")
    try:
        fold_dirs = find_fold_dirs(args.dataset_dir)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    output_dir = Path(args.output_dir).absolute()
    plan = fold_plan(fold_dirs)
    fold_metrics = {test: run_fold(test, train, fold_dirs, output_dir, args.config_file, args.device,
                                   training_options, pipeline) for test, train in plan}
    summary = {"plan": [{"test": test, "train": train} for test, train in plan], **summarize_folds(fold_metrics)}
    with atomic_open(output_dir / "summary.json", "w", suffix=".tmp") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    table = summary_markdown(summary)
    with atomic_open(output_dir / "summary.md", "w", suffix=".tmp") as f:
        f.write(table)
    print(table, end="")
    print(f"[pannuke_folds] wrote {output_dir / 'summary.json'} and {output_dir / 'summary.md'}")
    return summary


if __name__ == "__main__":
    main()
