"""Fine-tune a PromptNucSeg model file on a ``folder`` dataset with the bundle's training config, then export.

Run by the ``promptnucseg`` trainer in a subprocess (``python lib/finetune.py ...``), from anywhere::

    python apps/promptnucseg/lib/finetune.py --dataset_dir <folder dataset> --model_path bundle/models/model.pt \
        --work_dir <dir> --max_epochs 5 [--output_path <file>] [--device cpu]

It parses ``bundle/configs/train.json`` (``monai.bundle.ConfigParser``, the same config ``monai.bundle run
training`` runs), points it at the dataset, uses the model's architecture and class names, loads the model's two
networks' weights into the config's networks before training (so training starts from the current model, not from
scratch; without a model file it starts from the config's initialisation), runs ``training`` (prompter, then
segmentor), and exports the best (else last) checkpoints into one model file written atomically at
``--output_path`` (default: ``--model_path``, whose previous version is kept as ``<name>.prev.pt``).
With fewer than ``--min_val_images`` images the training images also serve as validation images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

BUNDLE_DIR = Path(os.environ.get("PROMPTNUCSEG_BUNDLE_DIR") or Path(__file__).resolve().parents[3] / "bundle")

logger = logging.getLogger("promptnucseg.finetune")


def _expr(value) -> str:
    """A Python literal as a config expression (keeps int dict keys and lists as they are)."""
    return "$" + repr(value)


def build_parser(dataset_dir: Path, work_dir: Path, max_epochs: int, device: str, model: dict | None,
                 n_images: int, min_val_images: int, seed: int):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_DIR / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE_DIR)
    parser["output_dir"] = str(work_dir / "runs")
    parser["dataset_dir"] = str(dataset_dir)
    parser["dataset_format"] = "folder"
    parser["val_dir"] = str(dataset_dir) if n_images < min_val_images else None
    parser["max_epochs"] = int(max_epochs)
    parser["resume"] = False
    parser["seed"] = int(seed)
    parser["device"] = f"$torch.device({device!r})"
    if model is not None:
        p_cfg, s_cfg = model["prompter"]["config"], model["segmentor"]["config"]
        names = list(p_cfg.get("class_names") or [])
        if names:
            parser["class_names"] = _expr({i + 1: str(n) for i, n in enumerate(names)})
        parser["prompter#hparams#backbone"] = p_cfg["backbone"]
        parser["prompter#hparams#levels"] = list(p_cfg["levels"])
        parser["prompter#hparams#anchor_step"] = int(p_cfg["anchor_step"])
        for key in ("fpn_channels", "mlp_hidden"):  # head widths of the model being fine-tuned
            if key in p_cfg:
                parser[f"prompter#hparams#{key}"] = int(p_cfg[key])
        parser["prompter#hparams#pretrained"] = None
        parser["segmentor#hparams#sam_variant"] = s_cfg["variant"]
        parser["segmentor#hparams#sam_checkpoint"] = None
        parser["segmentor#hparams#overrides"] = _expr(dict(s_cfg.get("overrides") or {}))
        parser["patch_size"] = int(s_cfg["image_size"])
    return parser


def _checkpoint(run_dir: Path) -> Path:
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if best.is_file():
        return best
    if last.is_file():
        return last
    raise FileNotFoundError(f"training wrote no checkpoint in {run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--dataset_dir", required=True)
    args.add_argument("--model_path", required=True, help="current model (initial weights); may not exist yet")
    args.add_argument("--output_path", default=None, help="the new model file (default: --model_path)")
    args.add_argument("--work_dir", required=True)
    args.add_argument("--max_epochs", type=int, default=5)
    args.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args.add_argument("--min_val_images", type=int, default=5)
    args.add_argument("--seed", type=int, default=0)
    opts = args.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s")

    sys.path.insert(0, str(BUNDLE_DIR))
    os.chdir(BUNDLE_DIR)

    from scripts.pipeline.model_file import export_model, part_state_dict, read_model_file
    from scripts.data.readers import list_items

    dataset_dir, work_dir = Path(opts.dataset_dir).resolve(), Path(opts.work_dir).resolve()
    model_path = Path(opts.model_path).resolve()
    output_path = Path(opts.output_path).resolve() if opts.output_path else model_path
    n_images = len(list_items(dataset_dir, "folder"))
    model = None
    if model_path.is_file():
        model = read_model_file(model_path)
    else:
        logger.warning("no model at %s: training from the config's initialisation", model_path)

    start = time.time()
    parser = build_parser(dataset_dir, work_dir, opts.max_epochs, opts.device, model, n_images,
                          opts.min_val_images, opts.seed)
    parser.get_parsed_content("initialize")  # seeds first, as `monai.bundle run` does
    if model is not None:
        for name in ("prompter", "segmentor"):
            network = parser.get_parsed_content(f"{name}#network")  # the object the trainer will optimise
            network.load_state_dict(part_state_dict(model, name))
            logger.info("%s initialised from %s", name, model_path)
    parser.get_parsed_content("run")

    runs = work_dir / "runs"
    if output_path == model_path and model_path.is_file():
        shutil.copy2(model_path, model_path.with_name(model_path.stem + ".prev" + model_path.suffix))
    storage = model.get("storage", "float32") if model is not None else "float32"  # as compact as the model
    export_model(_checkpoint(runs / "prompter"), _checkpoint(runs / "segmentor"), output_path, storage=storage)
    stats = {"model_path": str(output_path), "images": n_images, "max_epochs": opts.max_epochs,
             "seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (work_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    logger.info("new model written to %s (%s)", output_path, stats)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
