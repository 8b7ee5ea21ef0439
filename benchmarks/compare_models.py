"""A candidate model against the shipped one on the held-out images of every training source.

Both models are scored by the bundle's own ``evaluating`` command (``configs/evaluate.json``, ``--subset val``: the
images the default training split holds out of each folder, the same for both models, with the pipeline's
defaults) on each folder of ``--sets`` (default: CoNSeP's training tiles, the 13 MoNuSeg images with XML, the 17
with rebuilt labels). The candidate is a model file (``--candidate``) or is built from a training checkpoint of
the prompter (``--prompter``) and of the segmentor (``--segmentor``; default: the baseline's segmentor), stored as
``--storage`` (the shipped files are int8). Prints PQ, AJI, detection precision and recall (and mPQ on typed
data) of both and whether the candidate is better on every source (PQ on each, and mPQ where there are classes),
as the quality issue asks; ``--out`` also writes the table as markdown.

    .venv/bin/python benchmarks/compare_models.py --prompter bundle/runs/default/prompter_r18_all/best.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import MODEL, SHARED_DATA, evaluate, fmt, machine_line
from scripts.pipeline.model_file import export_model

SETS = ("consep_train", "monuseg_train", "monuseg_train_extra")


def fmt4(value: float | None) -> str:
    """A metric with 4 decimals: differences between close models are in the third."""
    return fmt(value, 4)


def scores(model: Path, folder: str, work: Path) -> dict:
    """metrics.json of ``model`` on the held-out images of ``folder`` (evaluated into ``work / folder``)."""
    return evaluate(folder, 1.0, [], model, work / folder)


def row(name: str, folder: str, metrics: dict) -> str:
    """One markdown row: model, source, held-out images, PQ, mPQ, AJI, detection precision / recall."""
    return (f"| {name} | {folder} | {metrics.get('n_images')} | {fmt4(metrics.get('pq'))} | {fmt4(metrics.get('mpq'))} | "
            f"{fmt4(metrics.get('aji'))} | {fmt4(metrics.get('precision_det'))} / {fmt4(metrics.get('recall_det'))} |")


def better_everywhere(candidate: dict[str, dict], baseline: dict[str, dict]) -> list[str]:
    """The figures (``folder: metric``) on which ``candidate`` is not above ``baseline``: PQ of each folder and mPQ
    where both have one. Empty: better on every source."""
    worse = []
    for folder, base in baseline.items():
        for metric in ("pq", "mpq"):
            if base.get(metric) is not None and not (candidate[folder].get(metric) or 0.0) > base[metric]:
                worse.append(f"{folder}: {metric} {fmt4(candidate[folder].get(metric))} vs {fmt4(base[metric])}")
    return worse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--candidate", type=Path, help="the candidate's model file")
    source.add_argument("--prompter", type=Path, help="the candidate prompter's training checkpoint")
    parser.add_argument("--segmentor", type=Path, default=None,
                        help="with --prompter: the segmentor's training checkpoint (default: the baseline's)")
    parser.add_argument("--storage", default="int8", help="with --prompter: the model file's storage")
    parser.add_argument("--baseline", type=Path, default=MODEL, help="default: the shipped model")
    parser.add_argument("--sets", nargs="+", default=list(SETS), help=f"folders of {SHARED_DATA}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compare_models"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    for name in ("candidate", "prompter", "segmentor", "baseline", "work"):  # the evaluation runs from bundle/
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    for folder in args.sets:
        if not (SHARED_DATA / folder).is_dir():
            raise SystemExit(f"--sets: no folder {SHARED_DATA / folder}")
    args.work.mkdir(parents=True, exist_ok=True)
    candidate = args.candidate
    if candidate is None:
        candidate = export_model(args.prompter, args.segmentor or args.baseline, args.work / "candidate.pt",
                                 storage=args.storage)
    print(machine_line(), flush=True)
    results: dict[str, dict[str, dict]] = {"baseline": {}, "candidate": {}}
    for folder in args.sets:
        for name, model in (("baseline", args.baseline), ("candidate", candidate)):
            results[name][folder] = scores(model, folder, args.work / name)
            print(row(name, folder, results[name][folder]), flush=True)
    worse = better_everywhere(results["candidate"], results["baseline"])
    described = (f"`{args.candidate}` (as given)" if args.candidate else
                 f"`{args.prompter}` + `{args.segmentor or args.baseline}` ({args.storage})")
    lines = [f"Baseline: `{args.baseline}`; candidate: {described}. `configs/evaluate.json --subset val`, "
             "the pipeline's defaults.", "",
             "| model | source | held-out images | PQ | mPQ | AJI | detection precision / recall |",
             "|---|---|---|---|---|---|---|",
             *(row(name, folder, results[name][folder]) for folder in args.sets for name in results), "",
             "Better on every source: " + ("yes" if not worse else "no (not above on " + "; ".join(worse) + ")")]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.work / "comparison.json").write_text(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
