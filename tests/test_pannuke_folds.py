"""PanNuke's three-fold protocol (``python -m scripts.pannuke_folds``): folds found in PanNuke's exact layout, each
tested once after training on the others, figures as mean ± std over the folds and per tissue; layouts the
protocol cannot split are refused by name."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLE_PYTHON, BUNDLE_ROOT, bundle_env
from scripts.data.synthetic import write_synthetic_dataset
from scripts.pannuke_folds import (FIGURES, find_fold_dirs, fold_plan, split_options, summarize_folds,
                                   summary_markdown)


def write_pannuke_folds(root: Path, n_folds: int = 3, n_images: int = 4, size: tuple[int, int] = (64, 64)) -> Path:
    """Synthetic folds in the official layout: ``Fold k/images/foldk/{images,types}.npy``,
    ``Fold k/masks/foldk/masks.npy`` (five classes, random tissues)."""
    for k in range(1, n_folds + 1):
        written = write_synthetic_dataset(root / f".fold{k}", n_images=n_images, size=size, n_nuclei=(6, 10),
                                          num_classes=5, seed=10 + k, dataset_format="pannuke")
        for sub in ("images", "masks"):
            target = root / f"Fold {k}" / sub / f"fold{k}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (written / "Fold 1" / sub / "fold1").rename(target)
    return root


def test_folds_and_plan(tmp_path) -> None:
    root = write_pannuke_folds(tmp_path / "pannuke", n_images=1)
    dirs = find_fold_dirs(root)
    assert dirs == {f"fold{k}": (root / f"Fold {k}").absolute() for k in (1, 2, 3)}
    assert fold_plan(dirs) == [("fold1", ["fold2", "fold3"]), ("fold2", ["fold1", "fold3"]),
                               ("fold3", ["fold1", "fold2"])]


def test_layouts_the_protocol_cannot_split_are_named(tmp_path) -> None:
    one = write_pannuke_folds(tmp_path / "one", n_folds=1, n_images=1)
    with pytest.raises(ValueError, match="1 PanNuke fold found, the protocol needs at least two"):
        find_fold_dirs(one)
    # all folds' arrays side by side under images/ and masks/: no folder holds one fold alone
    mixed = tmp_path / "mixed"
    for k in (1, 2):
        written = write_synthetic_dataset(tmp_path / f"w{k}", n_images=1, size=(64, 64), n_nuclei=(4, 6),
                                          num_classes=5, seed=k, dataset_format="pannuke")
        for sub in ("images", "masks"):
            (mixed / sub).mkdir(parents=True, exist_ok=True)
            (written / "Fold 1" / sub / "fold1").rename(mixed / sub / f"fold{k}")
    with pytest.raises(ValueError, match=r"folds fold1 and fold2 share the folder .*mixed; put each fold"):
        find_fold_dirs(mixed)
    with pytest.raises(FileNotFoundError, match="no PanNuke images.npy"):
        find_fold_dirs(tmp_path / "w1" / "Fold 1" / "masks")


def test_pipeline_options_go_to_the_evaluation() -> None:
    training, pipeline = split_options(["--max_epochs", "1", "--pipeline#assembly", "official",
                                        "--pipeline#official_box_nms=0.5", "--sam_variant", "vit_h"])
    assert training == ["--max_epochs", "1", "--sam_variant", "vit_h"]
    assert pipeline == {"assembly": "official", "official_box_nms": "0.5"}
    with pytest.raises(ValueError, match="--pipeline#min_area needs a value"):
        split_options(["--pipeline#min_area", "--max_epochs", "1"])


def _metrics(bpq: float, mpq: float, tissues: dict[str, list[tuple[float, float | None]]]) -> dict:
    per_image = [{"tissue": tissue, "bpq": b, "mpq": m} for tissue, values in tissues.items() for b, m in values]
    return {"bpq": bpq, "mpq": mpq, "pq": bpq, "aji": 0.5, "precision_det": 0.8, "recall_det": 0.7, "f1_det": 0.75,
            "pq_per_class": {"Neoplastic": bpq - 0.1, "Dead": None}, "f1_per_class": {"Neoplastic": 0.6, "Dead": None},
            "per_image": per_image}


def test_summary_is_mean_and_population_std_over_folds() -> None:
    """Mean ± std (numpy's population std) over the folds; a class undefined in every fold stays undefined; per
    tissue, each fold's image mean (undefined images skipped), averaged over the folds that have the tissue."""
    metrics = {"fold1": _metrics(0.70, 0.50, {"Colon": [(0.6, 0.4), (0.8, None)], "Skin": [(0.5, 0.3)]}),
               "fold2": _metrics(0.66, 0.48, {"Colon": [(0.5, 0.2)]}),
               "fold3": _metrics(0.68, 0.52, {"Colon": [(0.7, 0.6)], "Skin": [(0.9, 0.7)]})}
    summary = summarize_folds(metrics)
    assert summary["folds"] == ["fold1", "fold2", "fold3"] and set(summary["mean_std"]) == set(FIGURES)
    assert summary["mean_std"]["bpq"]["mean"] == pytest.approx(0.68)
    assert summary["mean_std"]["bpq"]["std"] == pytest.approx(np.std([0.70, 0.66, 0.68]))
    assert summary["mean_std"]["mpq"] == {"mean": pytest.approx(0.50), "std": pytest.approx(np.std([0.5, 0.48, 0.52])),
                                          "n_folds": 3}
    assert summary["per_class"]["pq_per_class"]["Neoplastic"]["mean"] == pytest.approx(0.58)
    assert summary["per_class"]["pq_per_class"]["Dead"] == {"mean": None, "std": None, "n_folds": 0}
    colon, skin = summary["per_tissue"]["Colon"], summary["per_tissue"]["Skin"]
    assert colon["bpq"]["mean"] == pytest.approx(np.mean([0.7, 0.5, 0.7]))
    assert colon["mpq"]["mean"] == pytest.approx(np.mean([0.4, 0.2, 0.6]))  # fold1: the None image skipped
    assert skin["mpq"]["n_folds"] == 2 and skin["mpq"]["mean"] == pytest.approx(0.5)
    table = summary_markdown(summary)
    assert "| bpq | 0.7000 | 0.6600 | 0.6800 | 0.6800 ± 0.0163 |" in table
    assert "| Dead | n/a | n/a |" in table and "| Skin |" in table


@pytest.mark.slow
def test_three_folds_in_one_command(tmp_path) -> None:
    """Three tiny folds in PanNuke's exact layout, one epoch of one iteration per stage and fold (the CPU recipe,
    64 px): every fold is tested once, on its own images, by a model trained on the other two."""
    root = write_pannuke_folds(tmp_path / "pannuke")
    out = tmp_path / "out"
    command = [BUNDLE_PYTHON, "-m", "scripts.pannuke_folds", "--dataset_dir", str(root), "--output_dir", str(out),
               "--config_file", "configs/train.json", "--device", "cpu",
               "--max_epochs", "1", "--epoch_length", "1", "--patch_size", "64", "--val_fraction", "0.25",
               "--prompter#hparams#batch_size", "2", "--segmentor#hparams#batch_size", "2",
               "--segmentor#hparams#num_prompts_per_image", "4", "--pipeline#chunk_size", "16"]
    proc = subprocess.run(command, cwd=BUNDLE_ROOT, env=bundle_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"] == [{"test": t, "train": train} for t, train in fold_plan(find_fold_dirs(root))]
    for fold in ("fold1", "fold2", "fold3"):
        metrics = json.loads((out / f"test_{fold}" / "eval" / "metrics.json").read_text())
        assert metrics["n_images"] == 4 and {im["name"][:6] for im in metrics["per_image"]} == {f"{fold}_"}
        assert set(metrics["pq_per_class"]) == {"Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"}
        assert summary["per_fold"][fold]["mpq"] == metrics["mpq"]
        assert (out / f"test_{fold}" / "model.pt").is_file()
        assert "scored 4 images" in (out / f"test_{fold}" / "evaluate.log").read_text()
        evaluation = shlex.split(proc.stdout.split(f"evaluation on test fold {fold}: ")[1].splitlines()[0])
        options = {evaluation[i]: evaluation[i + 1] for i in range(len(evaluation) - 1)
                   if evaluation[i].startswith("--pipeline#")}  # the validated options, and the one given
        assert options == {"--pipeline#nms_radius": "12", "--pipeline#mask_filter": "true",
                           "--pipeline#min_area": "0", "--pipeline#chunk_size": "16"}
        training = proc.stdout.split(f"training for test fold {fold} ")[1].splitlines()[0]  # the printed command
        test_dir = f"Fold {fold[-1]}"
        assert [f"Fold {k}" in training for k in (1, 2, 3)] == [f"Fold {k}" != test_dir for k in (1, 2, 3)]
    defined = [summary["per_fold"][f]["bpq"] for f in summary["folds"] if summary["per_fold"][f]["bpq"] is not None]
    assert summary["mean_std"]["bpq"]["mean"] == pytest.approx(np.mean(defined) if defined else None)
    assert "mean ± std" in proc.stdout and (out / "summary.md").is_file()
    shutil.rmtree(out)  # three runs' checkpoints and models: about 0.8 GB
