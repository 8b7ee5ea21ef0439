"""Inference-time ablations of a trained model on held-out real H&E (paper Tables 6 and 7, test side):
mask-aided prompt filtering on/off, K = 0/1/2 negative prompts at test time, the prompter's detection rule
(argmax over background and classes, the official rule, or the summed class probability >= 0.5) and the prompter's
test-time augmentation (``scripts/prompter/tta.py``).

Every figure comes from the bundle's ``evaluating`` command (``--subset val``: the images the default training held
out) with ``--pipeline#mask_filter`` / ``--pipeline#num_neg`` / ``--pipeline#foreground_threshold`` /
``--pipeline#prompter_tta`` changed, nothing else. Writes ``docs/benchmarks/inference_ablation.md``.

    .venv/bin/python benchmarks/ablation_inference.py [--model bundle/models/model.pt] [--work /tmp/ablation_inference]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import DOCS, MODEL, SHARED_DATA, cells, evaluate, fmt, machine

SETTINGS = {
    "default (filtering on, K = 1)": [],
    "mask-aided filtering off": ["--pipeline#mask_filter", "False"],
    "K = 0 negative prompts": ["--pipeline#num_neg", "0"],
    "K = 2 negative prompts": ["--pipeline#num_neg", "2"],
    "nucleus if p(any class) >= 0.5, not argmax": ["--pipeline#foreground_threshold", "0.5"],
    "prompter TTA: 8 flips/turns, points found in >= 4": ["--pipeline#prompter_tta", "True"],
}
SETS = {"MoNuSeg held-out, 40x": "monuseg_train", "CoNSeP held-out tiles, 40x": "consep_train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--work", default="/tmp/ablation_inference")
    parser.add_argument("--output", default=str(DOCS / "benchmarks" / "inference_ablation.md"))
    args = parser.parse_args()
    model = Path(args.model).resolve()
    if not model.is_file() or not SHARED_DATA.is_dir():
        raise SystemExit(f"needs the model ({model}) and the shared data ({SHARED_DATA})")
    info = machine()
    lines = [
        "# Inference-time ablations of the shipped model (paper Tables 6 and 7, test side)",
        "",
        f"Command: `python benchmarks/ablation_inference.py {' '.join(sys.argv[1:])}`; {info['cpu']}, "
        f"{info['cores']} cores. Held-out images of the default training (`--subset val`), automatic prompts; "
        "the model was trained with mask-aided filtering's auxiliary head and K = 1.",
        "",
        "| data | setting | PQ | DQ | SQ | AJI | F1 det. | nuclei predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, folder in SETS.items():
        for setting, extra in SETTINGS.items():
            out = Path(args.work) / f"{folder}_{len(lines)}"
            m = evaluate(folder, 1.0, ["--method", "promptnucseg", "--prompts", "prompter", *extra], model, out)
            print(f"{set_name} | {setting}: pq {fmt(m['pq'])}", flush=True)
            lines.append(f"| {set_name} | {setting} | {cells(m, ('pq', 'dq', 'sq', 'aji', 'f1_det'))} "
                         f"| {m['n_pred']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
