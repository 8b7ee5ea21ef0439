"""Assemble ``docs/results.md`` from the sections the benchmarks write to ``docs/results/``.

``quality.py`` -> ``docs/results/quality.md``, ``speed_vs_hovernet.py`` -> ``docs/results/speed.md``,
``ablation_negative_prompts.py`` -> ``docs/benchmarks/negative_prompts.md`` (linked). Sections missing on disk are
listed as not yet measured, never invented.

    .venv/bin/python benchmarks/results_page.py [--demo_dir demo_output]

``--demo_dir`` (the output of ``make demo``) first redraws ``docs/results/demo_overlay.png`` from the overlays of
the two held-out sample tiles, side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common import DOCS
SECTIONS = [
    ("results/quality.md", "benchmarks/quality.py"),
    ("results/speed.md", "benchmarks/speed_vs_hovernet.py"),
]
LINKED = [
    ("benchmarks/negative_prompts.md",
     "negative prompts K = 0/1/2 in training and testing (synthetic, oracle prompts)"),
    ("benchmarks/inference_ablation.md",
     "mask-aided filtering on/off, K = 0/1/2 and the detection rule at test time (shipped model, real data)"),
    ("benchmarks/token_stride.md", "segmentor token stride 16 vs 8 (synthetic, oracle prompts)"),
    ("benchmarks/token_stride_4.md",
     "segmentor token stride 4 with a 64 px decoding window (synthetic, oracle prompts)"),
    ("benchmarks/vit_tiny_encoder.md", "segmentor encoder vit_tiny vs conv_small (synthetic, oracle prompts)"),
    ("benchmarks/prompter_ablation.md", "prompter auxiliary head and mask-aided filtering (synthetic)"),
    ("benchmarks/segmentor.md", "segmentor variants: encoder and decoder cost"),
    ("benchmarks/prompter.md", "prompter backbones: cost"),
    ("benchmarks/pipeline.md", "pipeline stages, outputs and a 4096 px slide: time and memory"),
    ("benchmarks/assembly.md", "inference assembly: ours vs the official code's, `min_area`, a ViT on large images "
     "(shipped model, real data; vit_tiny, synthetic)"),
    ("benchmarks/scale.md", "automatic input scale: 20x and 40x images without a hint (shipped model, real data)"),
    ("benchmarks/linear_cost.md", "cost against image size: 16 tiles against their 4096 px mosaic, decoder time per "
     "prompt (shipped model, real data)"),
    ("benchmarks/slide.md", "a 20k x 20k px 40x pyramidal slide through `run inference`, killed and resumed"),
    ("benchmarks/paper_tables_8_9.md", "paper Tables 8 and 9 at CPU scale: the segmentor as classifier, joint "
     "training (CoNSeP)"),
    ("results/gpu.md", "on a GPU (H200): same nuclei as on the CPU, time per tile next to HoVer-Net, training on CUDA"),
    ("default_model.md", "how the default CPU model was chosen and trained"),
]


HELD_OUT_SAMPLES = ("TCGA-CH-5767-01Z-00-DX1_x300_y600", "TCGA-E2-A1B5-01Z-00-DX1_x400_y400")


def demo_figure(demo_dir: Path, out: Path, gap: int = 8) -> Path:
    """The overlays ``<stem>_overlay.png`` of the held-out sample tiles side by side, ``gap`` px of white between."""
    overlays = []
    for stem in HELD_OUT_SAMPLES:
        path = demo_dir / f"{stem}_overlay.png"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `make demo` first")
        overlays.append(np.asarray(Image.open(path).convert("RGB")))
    height = max(o.shape[0] for o in overlays)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    row = [overlays[0]]
    for overlay in overlays[1:]:
        row += [spacer, overlay]
    Image.fromarray(np.concatenate(row, axis=1)).save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default=None, help="make demo's output folder: redraw the overlay figure")
    args = parser.parse_args()
    if args.demo_dir:
        print(f"written: {demo_figure(Path(args.demo_dir), DOCS / 'results' / 'demo_overlay.png')}")
    parts = [
        "# Results",
        "",
        "Written by `benchmarks/results_page.py` from the sections each benchmark writes; every figure says the",
        "command and machine that produced it.",
        "",
    ]
    if (DOCS / "results" / "demo_overlay.png").is_file():
        parts += ["![shipped model on two held-out MoNuSeg crops (make demo)](results/demo_overlay.png)", "",
                  "The shipped model on the two held-out sample tiles (`make demo`; contour colour = predicted class).",
                  ""]
    for section, script in SECTIONS:
        path = DOCS / section
        if path.is_file():
            parts.append(path.read_text().rstrip() + "\n")
        else:
            parts += [f"## {section}", "", f"Not measured yet: run `python {script}`.", ""]
    if (DOCS / "results" / "curves.png").is_file():
        parts += ["## Training curves of the shipped model", "",
                  "Validation oracle PQ of the segmentor and detection F1 of the prompter per epoch (MLflow store "
                  "of the "
                  "default training, `scripts/compare_runs.py --plot`; a run resumed after an interruption is a new "
                  "run of the same name; each stage counts its own epochs). The segmentor's stages: "
                  "`default-segmentor` (16 px tokens), `default-segmentor-s8` (8 px tokens on 128 px windows, from "
                  "the former's epoch 58), `default-segmentor-s4` (4 px tokens on 96 px windows, from the s8 stage's "
                  "epoch 24; the shipped segmentor is its epoch 16). The prompter: `default-prompter-r18-aug` "
                  "(ResNet-18 backbone, 120 epochs with scale and H&E stain augmentation; shipped since 0.5.0: "
                  "epoch 102), "
                  "`default-prompter-r18` (the same without them, 60 epochs; shipped in 0.4.0: epoch 52, in 0.4.1: "
                  "epoch 56), `default-prompter` (`resnet_small`, shipped in 0.3.0: epoch 58) and "
                  "`default-prompter-ft` (20 more epochs of the latter: no better on the held-out images, not "
                  "shipped).", "", "![validation curves](results/curves.png)", ""]
    parts += ["## Further measurements", ""]
    for page, what in LINKED:
        if (DOCS / page).is_file():
            parts.append(f"- [{what}]({page})")
    (DOCS / "results.md").write_text("\n".join(parts) + "\n")
    print(f"written: {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
