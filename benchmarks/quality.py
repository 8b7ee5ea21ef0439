"""Quality of a model on held-out real H&E, next to the training-free baseline and the paper's figures.

Every figure comes from the bundle's own ``evaluating`` command (``configs/evaluate.json``, the same metric code
for every method), on the images the default training held out (``--subset val``: the split of
``configs/train_default.json``, each dataset folder split on its own, ``val_fraction`` 0.2, seed 0):

- MoNuSeg held-out images at 40x (their native 0.25 µm/px) and resampled to 20x (``--scale 0.5``: a
  magnification the model was not trained at), as they are and with ``--pipeline#input_scale 2`` (the user states
  the magnification and the pipeline resamples to 40x);
- the held-out MoNuSeg images from TCGA tissue-source sites (hospitals: the code after ``TCGA-``) that no training
  image comes from, at 40x and at 20x (as they are: another source and another magnification at once; and with
  ``input_scale 2``);
- CoNSeP held-out 256 px tiles (typed: mPQ and per-class PQ too), at 40x and resampled to 20x (128 px tiles).

Methods: PromptNucSeg (the model, automatic prompts), the same segmentor prompted by the ground-truth points
(``--prompts oracle``: the segmentor's ceiling, paper Table 7 "GT"), and the watershed baseline
(``--method watershed``, ``scripts/evaluation/baseline.py``). Writes ``docs/results/quality.md``.

    .venv/bin/python benchmarks/quality.py [--model bundle/models/model.pt] [--work /tmp/quality]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from common import DOCS, MODEL, REPO, SHARED_DATA, cells, evaluate, fmt, machine

SETS = {
    "MoNuSeg held-out, 40x": {"folder": "monuseg_train", "scale": 1.0},
    "MoNuSeg held-out, 20x": {"folder": "monuseg_train", "scale": 0.5, "input_scale": 2.0},
    "MoNuSeg held-out, sites not in training, 40x": {"folder": "monuseg_train", "scale": 1.0, "unseen_sites": True},
    "MoNuSeg held-out, sites not in training, 20x": {"folder": "monuseg_train", "scale": 0.5, "unseen_sites": True,
                                                     "input_scale": 2.0},
    "CoNSeP held-out tiles, 40x": {"folder": "consep_train", "scale": 1.0},
    "CoNSeP held-out tiles, 20x": {"folder": "consep_train", "scale": 0.5, "input_scale": 2.0},
}
METHODS = {
    "PromptNucSeg (this model)": ["--method", "promptnucseg", "--prompts", "prompter"],
    "segmentor with ground-truth prompts": ["--method", "promptnucseg", "--prompts", "oracle"],
    "watershed baseline (no training)": ["--method", "watershed"],
}
PAPER = [  # Table 4 (Kumar) of the paper, SAM ViT-B/H trained on GPU with the official 16/14 image split
    ("paper: PromptNucSeg-B, Kumar test", {"aji": 0.614, "dq": 0.802, "sq": 0.773, "pq": 0.622}),
    ("paper: PromptNucSeg-H, Kumar test", {"aji": 0.622, "dq": 0.803, "sq": 0.779, "pq": 0.627}),
    ("paper: HoVer-Net, Kumar test", {"aji": 0.618, "dq": 0.770, "sq": 0.773, "pq": 0.597}),
    ("paper: PromptNucSeg-B, CPM-17 test", {"aji": 0.731, "dq": 0.892, "sq": 0.813, "pq": 0.726}),
]


def unseen_site_images(folder: str) -> list[str]:
    """Names of the held-out images of ``folder`` whose TCGA tissue-source site (``TCGA-<site>-...``) no training
    image shares (the same split as ``--subset val``)."""
    from scripts.evaluation.scoring import list_dataset

    def site(name: str) -> str:
        return name.split("-")[1]

    trained_sites = {site(it.name) for it in list_dataset(str(SHARED_DATA / folder), "auto", "train", 0.2, 0)}
    return [it.name for it in list_dataset(str(SHARED_DATA / folder), "auto", "val", 0.2, 0)
            if site(it.name) not in trained_sites]


def markdown(results: dict, model: Path, command: str, unseen: list[str]) -> str:
    trained = f"{datetime.fromtimestamp(model.stat().st_mtime):%Y-%m-%d}"
    shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
    lines = [
        "## Quality on held-out real H&E",
        "",
        f"Command: `{command}` ({trained} model, {machine()['cpu']}). Model: `{shown}`.",
        "Images the training never saw: the default training's validation split (MoNuSeg: 3 of the 13 shared",
        "images; CoNSeP: 5 of its 27 images = 80 tiles), scored by `configs/evaluate.json` (definitions in",
        "[metrics.md](metrics.md)). The 20x rows resample the same images to half size. \"This model\" runs with its",
        "defaults: `input_scale auto` finds the scale from the nuclei (scripts/pipeline/scale.py); with",
        "`--pipeline#input_scale 2` the pipeline is told the magnification, with `input_scale 1` it is kept from",
        "resampling (the images as they are).",
        f"\"Sites not in training\": {', '.join(unseen) or 'none'}, the held-out MoNuSeg images from TCGA "
        "tissue-source",
        "sites (hospitals, hence their staining) that no training image comes from; their 20x rows are another",
        "source and another magnification at once. All TCGA slides were scanned by the same",
        "project, so this is a partial proxy for a new lab; no H&E from another dataset is on this machine.",
        "",
        "| data | method | PQ | DQ | SQ | AJI | AJI+ | F1 det. | nuclei (true / predicted) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name, by_method in results.items():
        for method, m in by_method.items():
            lines.append(f"| {set_name} | {method} | {cells(m)} "
                         f"| {m.get('n_true', '–')} / {m.get('n_pred', '–')} |")
    for name, m in PAPER:
        lines.append(f"| {name} | (published) | {fmt(m['pq'])} | {fmt(m['dq'])} | {fmt(m['sq'])} | {fmt(m['aji'])} "
                     "| – | – | – |")
    typed = results.get("CoNSeP held-out tiles, 40x", {})
    if typed:
        lines += ["", "CoNSeP classes (held-out tiles): multi-class PQ and per-class PQ (the baseline has no "
                  "classes).", "",
                  "| method | mPQ | " + " | ".join(_class_names(typed)) + " |",
                  "|---|---|" + "---|" * len(_class_names(typed))]
        for method, m in typed.items():
            per_class = m.get("pq_per_class") or {}
            if not per_class or "watershed" in method:  # the baseline gives no classes
                continue
            lines.append(f"| {method} | {fmt(m.get('mpq'))} | "
                         + " | ".join(fmt(per_class.get(n)) for n in _class_names(typed)) + " |")
    lines += [
        "",
        "The paper's rows are its published test figures (SAM ViT-B/H pretrained, GPU training, the official",
        "Kumar/CPM-17 splits); they are not the same images as the held-out ones above and are shown for scale.",
        "",
    ]
    return "\n".join(lines)


def _class_names(by_method: dict) -> list[str]:
    for m in by_method.values():
        if m.get("pq_per_class"):
            return list(m["pq_per_class"])
    return []


def _without_options(argv: list[str], flags: set[str], with_value: set[str]) -> list[str]:
    """``argv`` less the ``flags`` and the options in ``with_value`` with their value (the page's command line
    reproduces the whole page)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif arg not in flags and arg.split("=")[0] not in with_value:
            kept.append(arg)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--work", default="/tmp/quality")
    parser.add_argument("--output", default=str(DOCS / "results" / "quality.md"))
    parser.add_argument("--report_only", action="store_true", help="rewrite the page from the metrics in --work")
    parser.add_argument("--only", default="", help="(re)evaluate only the sets whose name contains this text; the "
                        "others are read from the metrics already in --work")
    args = parser.parse_args()
    model = Path(args.model).resolve()
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"the shared data is needed: {SHARED_DATA}")
    selected_sets = [name for name in SETS if args.only in name]
    if not selected_sets:
        raise SystemExit(f"--only {args.only!r} matches none of the sets {list(SETS)}")
    unseen = unseen_site_images("monuseg_train")
    results: dict[str, dict] = {}
    for set_name, spec in SETS.items():
        if spec.get("unseen_sites") and not unseen:
            continue
        images = unseen if spec.get("unseen_sites") else None
        results[set_name] = {}
        methods = dict(METHODS)
        if "input_scale" in spec:  # the user says the magnification: the pipeline resamples to the model's 40x
            methods[f"PromptNucSeg, input_scale {spec['input_scale']:g} (resampled to 40x)"] = [
                *METHODS["PromptNucSeg (this model)"], "--pipeline#input_scale", str(spec["input_scale"])]
            methods["PromptNucSeg, input_scale 1 (as is, not resampled)"] = [
                *METHODS["PromptNucSeg (this model)"], "--pipeline#input_scale", "1"]
        for method, method_args in methods.items():
            out = Path(args.work) / (f"{spec['folder']}_{spec['scale']}_{method_args[1]}_{method_args[-1]}"
                                     + ("_unseen_sites" if images else ""))
            if args.report_only or set_name not in selected_sets:
                results[set_name][method] = json.loads((out / "metrics.json").read_text())
            else:
                results[set_name][method] = evaluate(spec["folder"], spec["scale"], method_args, model, out, images)
            m = results[set_name][method]
            print(f"{set_name} | {method}: pq {fmt(m.get('pq'))} aji {fmt(m.get('aji'))}", flush=True)
    command = " ".join(["python benchmarks/quality.py", *_without_options(sys.argv[1:], {"--report_only"}, {"--only"})])
    text = markdown(results, model, command, unseen)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
