"""Paper Tables 8 and 9 at CPU scale: who classifies (prompter or segmentor) and joint training, on CoNSeP.

Every variant is trained through the bundle's ``training`` command for the same number of epochs from the same
start, exported, and scored with the bundle's ``evaluating`` command on the CoNSeP images held out by the split
(``--subset val``, ``val_fraction`` 0.2, seed 0: the 5 images, 80 tiles, the shipped model was validated on).

- Table 8 (classifier): the shipped segmentor fine-tuned for ``--epochs`` epochs without (``--classifier prompter``)
  and with a [cls] head (``--classifier segmentor``); both with the shipped prompter, whose classes the first uses
  and the second ignores. Only the source of each nucleus's class (and the masks' fine-tuning) differs.
- Table 9 (joint): a ``resnet_small`` prompter and the shipped segmentor, the prompter's backbone initialised from the
  segmentor's image-encoder backbone and its FPN and heads from scratch, trained for ``--epochs`` epochs each
  separately (``--stage both``) or jointly on the one shared backbone (``--stage joint``).

The last epoch's weights are scored (``last.pt``: no choice on the held-out images). Writes ``results.json`` in the
output folder and prints the Markdown rows of ``docs/benchmarks/paper_tables_8_9.md``. Resumable: a variant whose
model file exists is not trained again. Run from the repository root, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_tables_8_9.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BUNDLE, MODEL, SHARED_DATA, bundle, fmt, machine, machine_line  # first: the bundle's path
from scripts.io.atomic import atomic_torch_save
from scripts.pipeline.model_file import (
    export_joint_model,
    export_model,
    part_state_dict,
    read_model_file,
)

DATA = SHARED_DATA / "consep_train"
COLUMNS = ("pq", "mpq", "dq", "sq", "aji", "f1_det")
PROMPTER = ["--prompter#hparams#backbone", "resnet_small", "--prompter#hparams#fpn_channels", "128",
            "--prompter#hparams#mlp_hidden", "128", "--prompter#hparams#lr", "0.001",
            "--prompter#hparams#batch_size", "4"]  # the joint stage's batch: the same updates of the same images


def init_checkpoints(out: Path) -> dict[str, Path]:
    """The shipped model's parts as training checkpoints: ``segmentor`` (whole), ``prompter`` (the shipped
    ResNet-18 prompter, whole) and ``backbone`` (the segmentor's image-encoder backbone under the prompter's names,
    ``backbone.*``: a ``resnet_small`` prompter's warm start)."""
    model = read_model_file(MODEL)
    paths = {name: out / "init" / f"{name}.pt" for name in ("segmentor", "prompter", "backbone")}
    if all(path.is_file() for path in paths.values()):
        return paths
    for part in ("segmentor", "prompter"):
        atomic_torch_save({"network": part_state_dict(model, part), "config": model[part]["config"]}, paths[part])
    segmentor = part_state_dict(model, "segmentor")
    prefix = "image_encoder.backbone."
    atomic_torch_save({"network": {"backbone." + k.removeprefix(prefix): v for k, v in segmentor.items()
                                   if k.startswith(prefix)}}, paths["backbone"])
    return paths


def variants(init: dict[str, Path], epochs: int) -> dict[str, dict]:
    """Each variant: its training arguments and how its model file is made from the run folder."""
    shipped = read_model_file(MODEL)["segmentor"]["config"]  # its architecture, and the default recipe's prompts
    common = ["--dataset_dir", str(DATA), "--val_fraction", "0.2", "--seed", "0", "--resume", "false",
              "--val_interval", "1000", "--max_epochs", str(epochs),
              "--segmentor#hparams#init_checkpoint", str(init["segmentor"]),
              "--segmentor#hparams#overrides", repr(shipped["overrides"]), "--segmentor#hparams#num_prompts_per_image",
              "24"]
    table9 = [*common, *PROMPTER, "--prompter#hparams#init_checkpoint", str(init["backbone"])]

    def with_shipped_prompter(run: Path) -> Path:
        return export_model(init["prompter"], run / "segmentor" / "last.pt", run / "model.pt")

    def separate(run: Path) -> Path:
        return export_model(run / "prompter" / "last.pt", run / "segmentor" / "last.pt", run / "model.pt")

    def joint(run: Path) -> Path:
        return export_joint_model(run / "joint" / "last.pt", run / "model.pt")

    return {
        "t8_prompter": {"args": [*common, "--stage", "segmentor", "--classifier", "prompter"],
                        "export": with_shipped_prompter},
        "t8_segmentor": {"args": [*common, "--stage", "segmentor", "--classifier", "segmentor"],
                         "export": with_shipped_prompter},
        "t9_separate": {"args": [*table9, "--stage", "both"], "export": separate},
        "t9_joint": {"args": [*table9, "--stage", "joint"], "export": joint},
    }


def evaluate(model: Path, out: Path) -> dict:
    """``evaluating`` on the held-out CoNSeP tiles; the metrics.json."""
    if not (out / "metrics.json").is_file():
        bundle("evaluating", "--config_file", "configs/evaluate.json", "--dataset_dir", str(DATA), "--subset", "val",
               "--model_path", str(model), "--output_dir", str(out))
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of every network of every variant")
    parser.add_argument("--out", type=Path, default=BUNDLE / "runs" / "paper_tables_8_9")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the bundle's commands run in bundle/
    init = init_checkpoints(args.out)
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    results["machine"] = machine()
    results["shipped"] = {"metrics": evaluate(MODEL, args.out / "eval" / "shipped")}
    for name, variant in variants(init, args.epochs).items():
        if args.only and name not in args.only:
            continue
        run = args.out / name
        if not (run / "model.pt").is_file():
            start = time.perf_counter()
            bundle("training", "--config_file", "configs/train.json", "--output_dir", str(run), *variant["args"])
            results[name] = {"train_s": round(time.perf_counter() - start, 1), "epochs": args.epochs}
            variant["export"](run)
        results.setdefault(name, {})["metrics"] = evaluate(run / "model.pt", args.out / "eval" / name)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(machine_line(results["machine"]))
    print("| variant | training s | " + " | ".join(COLUMNS) + " |")
    for name in ("shipped", *variants(init, args.epochs)):
        if "metrics" in results.get(name, {}):
            metrics = results[name]["metrics"]
            print(f"| {name} | {results[name].get('train_s', '–')} | "
                  + " | ".join(fmt(metrics.get(c)) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
