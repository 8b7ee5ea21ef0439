"""``make demo``: segment the bundle's sample tiles with the shipped model and write every output.

Run from ``bundle/``: ``python -m scripts.demo --output_dir ../demo_output``. It runs the bundle's own
``inference`` config on ``sample_data/images``. When no shipped model exists (``models/model.pt``), it first
trains a small model briefly on the sample tiles with the bundle's ``training`` config (a smoke run: expect
poor nuclei) and uses that.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from monai.bundle import run

from scripts.pipeline.model_file import export_model

BUNDLE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = BUNDLE_ROOT / "models" / "model.pt"
SAMPLE_DIR = BUNDLE_ROOT / "sample_data"

logger = logging.getLogger("demo")


def train_smoke_model(output_dir: Path, epochs: int) -> Path:
    """Train both stages briefly on the sample tiles; returns the exported model file."""
    train_dir = output_dir / "train"
    run("training", config_file=str(BUNDLE_ROOT / "configs" / "train.json"), bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(SAMPLE_DIR), dataset_format="folder", val_fraction=0.25, max_epochs=epochs,
        output_dir=str(train_dir))
    return export_model(train_dir / "prompter" / "best.pt", train_dir / "segmentor" / "best.pt",
                        output_dir / "model.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default=str(BUNDLE_ROOT.parent / "demo_output"))
    parser.add_argument("--model_path", default=str(SHIPPED_MODEL))
    parser.add_argument("--smoke_epochs", type=int, default=3, help="epochs of the smoke training (no model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model_path)
    if not model_path.is_file():
        logger.warning("no model at %s: training a small smoke model on the sample tiles first", model_path)
        model_path = train_smoke_model(output_dir, args.smoke_epochs)
    run("inference", config_file=str(BUNDLE_ROOT / "configs" / "inference.json"), bundle_root=str(BUNDLE_ROOT),
        model_path=str(model_path), input_dir=str(SAMPLE_DIR / "images"), output_dir=str(output_dir))
    logger.info("demo outputs in %s", output_dir)


if __name__ == "__main__":
    main()
