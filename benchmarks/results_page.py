"""Assemble ``docs/results.md`` from the sections the benchmarks write to ``docs/results/``.

``quality.py`` -> ``docs/results/quality.md``, ``speed_vs_hovernet.py`` -> ``docs/results/speed.md`` (and its plots),
``ablation_negative_prompts.py`` -> ``docs/benchmarks/negative_prompts.md`` (linked). Sections missing on disk are
listed as not yet measured, never invented.

    .venv/bin/python benchmarks/results_page.py
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
SECTIONS = [
    ("results/quality.md", "benchmarks/quality.py"),
    ("results/speed.md", "benchmarks/speed_vs_hovernet.py"),
]
LINKED = [
    ("benchmarks/negative_prompts.md", "negative prompts K = 0/1/2 in training and testing (synthetic, oracle prompts)"),
    ("benchmarks/inference_ablation.md", "mask-aided filtering on/off and K = 0/1/2 at test time (shipped model, real data)"),
    ("benchmarks/token_stride.md", "segmentor token stride 16 vs 8 (synthetic, oracle prompts)"),
    ("benchmarks/vit_tiny_encoder.md", "segmentor encoder vit_tiny vs conv_small (synthetic, oracle prompts)"),
    ("benchmarks/prompter_ablation.md", "prompter auxiliary head and mask-aided filtering (synthetic)"),
    ("benchmarks/segmentor.md", "segmentor variants: encoder and decoder cost"),
    ("benchmarks/prompter.md", "prompter backbones: cost"),
    ("benchmarks/pipeline.md", "pipeline stages, outputs and a 4096 px slide: time and memory"),
    ("default_model.md", "how the default CPU model was chosen and trained"),
]


def main() -> None:
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
                  "Validation oracle PQ of the segmentor and detection F1 of the prompter per epoch (MLflow store of the "
                  "default training, `scripts/compare_runs.py --plot`).", "", "![validation curves](results/curves.png)", ""]
    parts += ["## Further measurements", ""]
    for page, what in LINKED:
        if (DOCS / page).is_file():
            parts.append(f"- [{what}]({page})")
    (DOCS / "results.md").write_text("\n".join(parts) + "\n")
    print(f"written: {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
