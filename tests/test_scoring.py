"""Scoring saved predictions: prediction formats, metrics.json, the bundle command, real data against itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from scripts.evaluation.scores import score_image
from scripts.data.readers import dataset_class_names, list_items
from scripts.data.records import NucleusRecord
from scripts.evaluation.scoring import PredictionDir, _json_safe, read_prediction_mat, score_dataset, write_metrics


BUNDLE_ROOT = Path(__file__).resolve().parent.parent / "bundle"
SHAPE = (32, 32)
CLASS_NAMES = {1: "Other", 2: "Inflammatory", 3: "Epithelial", 4: "Spindle-shaped"}  # the bundle class table


def _boxes(boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(SHAPE, np.int32)
    for k, (r0, r1, c0, c1) in boxes.items():
        out[r0:r1, c0:c1] = k
    return out


def ground_truth() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three tiles: (inst_map, type_map) with contiguous ids, classes 1..4."""
    a = _boxes({1: (2, 8, 2, 8), 2: (10, 16, 10, 18), 3: (20, 30, 2, 9)})
    b = _boxes({1: (0, 6, 0, 6), 2: (20, 28, 20, 28)})
    c = _boxes({1: (4, 12, 4, 12), 2: (4, 12, 16, 24), 3: (18, 26, 8, 16)})
    classes = {"a": [0, 3, 2, 1], "b": [0, 4, 2], "c": [0, 3, 3, 1]}
    maps = {"a": a, "b": b, "c": c}
    return {k: (m, np.asarray(classes[k], np.int32)[m]) for k, m in maps.items()}


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A HoVer-Net layout dataset: Images/<stem>.png + Labels/<stem>.mat (inst_map, type_map)."""
    root = tmp_path / "data"
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    rng = np.random.default_rng(0)
    for stem, (inst, types) in ground_truth().items():
        Image.fromarray(rng.integers(0, 255, (*SHAPE, 3), dtype=np.uint8)).save(root / "Images" / f"{stem}.png")
        scipy.io.savemat(root / "Labels" / f"{stem}.mat", {"inst_map": inst, "type_map": types})
    return root


@pytest.fixture()
def predictions(tmp_path: Path) -> Path:
    """Predictions in the three formats: a as _inst/_type.tif (exact), b as HoVer-Net .mat (ids 10, 40 with
    inst_uid/inst_type, one class wrong, one nucleus missed), c as .npy (shifted by one pixel, no classes)."""
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = ground_truth()
    tifffile.imwrite(pred / "a_inst.tif", gt["a"][0])
    tifffile.imwrite(pred / "a_type.tif", gt["a"][1].astype(np.uint8))
    b_inst = _boxes({40: (0, 6, 0, 7), 10: (13, 20, 0, 5)})
    mat = {"inst_map": b_inst, "inst_uid": np.array([[10], [40]]), "inst_type": np.array([[1], [2]])}
    scipy.io.savemat(pred / "b.mat", mat)
    np.save(pred / "c.npy", np.roll(gt["c"][0], 1, axis=1))
    return pred


def test_prediction_formats(dataset: Path, predictions: Path) -> None:
    records = {item.name: item.load() for item in list_items(dataset, "hovernet")}
    source = PredictionDir(predictions)
    inst, types = source.predict(records["a"])
    np.testing.assert_array_equal(inst, records["a"].inst_map)
    np.testing.assert_array_equal(types, records["a"].type_map)
    inst, types = source.predict(records["b"])
    assert sorted(np.unique(inst).tolist()) == [0, 10, 40]
    assert np.unique(types[inst == 40]).tolist() == [2] and np.unique(types[inst == 10]).tolist() == [1]
    inst, types = source.predict(records["c"])
    assert types is None and inst.dtype == np.int32


def test_read_prediction_mat_without_uid_and_errors(tmp_path: Path) -> None:
    inst = _boxes({1: (0, 3, 0, 3), 2: (5, 8, 5, 8)})
    scipy.io.savemat(tmp_path / "x.mat", {"inst_map": inst.astype(float), "inst_type": np.array([[3], [4]])})
    got_inst, got_type = read_prediction_mat(tmp_path / "x.mat")
    assert got_type[1, 1] == 3 and got_type[6, 6] == 4 and got_type[0, 10] == 0
    scipy.io.savemat(tmp_path / "y.mat", {"type_map": inst})
    with pytest.raises(ValueError, match="y.mat.*inst_map"):
        read_prediction_mat(tmp_path / "y.mat")


def test_score_dataset_matches_per_image_scores(dataset: Path, predictions: Path) -> None:
    items = list_items(dataset, "hovernet")
    class_names = dataset_class_names(dataset, "hovernet")
    assert class_names == CLASS_NAMES
    metrics = score_dataset(items, PredictionDir(predictions), class_names)
    assert set(metrics) >= {"n_images", "n_true", "n_pred", "pq", "dq", "sq", "aji", "aji_plus", "precision_det",
                            "recall_det", "f1_det", "bpq", "mpq", "pq_per_class", "f1_per_class", "per_image"}
    assert (metrics["n_images"], metrics["n_true"], metrics["n_pred"]) == (3, 8, 8)
    per_image = {e["name"]: e for e in metrics["per_image"]}
    assert per_image["a"]["pq"] == 1.0 and per_image["a"]["mpq"] == 1.0
    # b: truth 1 (6x6, class 4) vs pred 40 (6x7, class 2): IoU 36/42; truth 2 missed; pred 10 a FP
    assert per_image["b"]["pq"] == pytest.approx(0.5 * 36 / 42)
    assert per_image["b"]["mpq"] == 0.0  # classes 4 and 2 present in the truth, both PQ 0
    for item in items:
        rec = item.load()
        inst, types = PredictionDir(predictions).predict(rec)
        expected = score_image(rec.inst_map, inst, rec.type_map, types, tuple(CLASS_NAMES), name=rec.name)
        assert per_image[rec.name]["aji_plus"] == expected.aji_plus and per_image[rec.name]["sq"] == expected.sq


def test_missing_and_ambiguous_predictions(dataset: Path, predictions: Path) -> None:
    items = list_items(dataset, "hovernet")
    (predictions / "c.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"'c'.*c_inst\.tif, c\.mat, c\.npy"):
        score_dataset(items, PredictionDir(predictions), None)
    np.save(predictions / "c.npy", ground_truth()["c"][0])
    np.save(predictions / "a.npy", ground_truth()["a"][0])
    with pytest.raises(ValueError, match="ambiguous.*a_inst.tif.*a.npy"):
        score_dataset(items, PredictionDir(predictions), None)
    (predictions / "a.npy").unlink()
    np.save(predictions / "c.npy", np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="c.npy.*shape"):
        score_dataset(items, PredictionDir(predictions), None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PredictionDir(predictions / "nowhere")


def test_write_metrics_is_atomic_json(tmp_path: Path) -> None:
    metrics = {"pq": float("nan"), "n": np.int64(3), "x": np.float32(0.5), "per_image": [{"sq": None}]}
    path = write_metrics(metrics, tmp_path / "out")
    write_metrics(metrics, tmp_path / "out")  # overwrites
    assert json.loads(path.read_text()) == {"pq": None, "n": 3, "x": 0.5, "per_image": [{"sq": None}]}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_evaluate_returns_the_metrics_it_wrote_and_keeps_the_first_predictions(dataset: Path, predictions: Path,
                                                                               tmp_path: Path) -> None:
    from scripts.evaluation.scoring import Scores, evaluate

    items = list_items(dataset, "hovernet")
    scores = evaluate(items, PredictionDir(predictions), CLASS_NAMES, tmp_path / "out", n_samples=2)
    assert isinstance(scores, Scores) and isinstance(scores, dict)
    assert scores.path == tmp_path / "out" / "metrics.json"
    assert json.loads(scores.path.read_text()) == _json_safe(scores)
    assert [s.record.name for s in scores.samples] == ["a", "b"]
    inst, types = PredictionDir(predictions).predict(scores.samples[1].record)
    assert np.array_equal(scores.samples[1].inst_map, inst) and np.array_equal(scores.samples[1].type_map, types)
    assert evaluate(items, PredictionDir(predictions), CLASS_NAMES, tmp_path / "out").samples == []


class GroundTruthFiles:
    """A prediction source for the self-scoring tests: the ground truth itself."""

    def predict(self, record: NucleusRecord) -> tuple[np.ndarray, np.ndarray | None]:
        return record.inst_map, record.type_map


@pytest.mark.slow
def test_consep_ground_truth_scores_one(shared_data: Path, tmp_path: Path) -> None:
    """40 CoNSeP tiles written as this bundle's _inst/_type.tif and scored against themselves."""
    dataset = shared_data / "consep_train"
    items = list_items(dataset, "hovernet")[:40]
    for item in items:
        rec = item.load()
        tifffile.imwrite(tmp_path / f"{rec.name}_inst.tif", rec.inst_map)
        tifffile.imwrite(tmp_path / f"{rec.name}_type.tif", rec.type_map.astype(np.uint8))
    m = score_dataset(items, PredictionDir(tmp_path), dataset_class_names(dataset, "hovernet"))
    assert m["n_images"] == 40 and m["n_true"] == m["n_pred"] > 0
    for key in ("pq", "dq", "sq", "aji", "aji_plus", "f1_det", "bpq", "mpq"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in m["pq_per_class"].values() if v is not None)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in m["f1_per_class"].values() if v is not None)


@pytest.mark.slow
def test_monuseg_ground_truth_scores_one(shared_data: Path) -> None:
    dataset = shared_data / "monuseg_train"
    records = [item.load() for item in list_items(dataset, "monuseg")[:3]]
    m = score_dataset(records, GroundTruthFiles(), dataset_class_names(dataset, "monuseg"))
    assert "mpq" not in m and m["n_true"] == m["n_pred"] > 1000
    for key in ("pq", "dq", "sq", "aji", "aji_plus", "precision_det", "recall_det", "f1_det"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key


def _run_bundle(dataset: Path, pred: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "configs/evaluate.json"]
    cmd += ["--dataset_dir", str(dataset), "--dataset_format", "hovernet"]
    cmd += ["--pred_dir", str(pred), "--output_dir", str(out), *extra]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bundle_evaluate_command(dataset: Path, predictions: Path, tmp_path: Path) -> None:
    """``monai.bundle run evaluating`` on the three prediction formats, then with one prediction missing."""
    out = tmp_path / "out"
    proc = _run_bundle(dataset, predictions, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = json.loads((out / "metrics.json").read_text())
    expected = _json_safe(score_dataset(list_items(dataset, "hovernet"), PredictionDir(predictions), CLASS_NAMES))
    assert written == expected
    assert "pq=" in proc.stdout + proc.stderr  # the summary is logged
    (predictions / "b.mat").unlink()
    proc = _run_bundle(dataset, predictions, tmp_path / "out2")
    assert proc.returncode != 0
    assert "no prediction for image 'b'" in proc.stderr and "b.mat" in proc.stderr
    assert not (tmp_path / "out2" / "metrics.json").exists()
    kept = [it for it in list_items(dataset, "hovernet") if it.name != "b"]  # --images scores only those
    proc = _run_bundle(dataset, predictions, tmp_path / "out3", "--images", json.dumps([it.name for it in kept]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = json.loads((tmp_path / "out3" / "metrics.json").read_text())
    assert written == _json_safe(score_dataset(kept, PredictionDir(predictions), CLASS_NAMES))
    assert written["n_images"] == len(kept) >= 1


def test_list_dataset_subsets_and_scale(shared_data: Path) -> None:
    """``--subset val`` gives the images a training with the same split held out; ``--scale`` resamples."""
    from scripts.data.datasets import train_val_items
    from scripts.evaluation.scoring import list_dataset

    folders = [str(shared_data / "consep_train"), str(shared_data / "monuseg_train")]
    val = list_dataset(folders, "auto", "val", 0.2, 0)
    assert [it.name for it in val] == [it.name for it in train_val_items(folders, "auto", None, 0.2, 0)[1]]
    assert len(list_dataset(folders, "auto", "train", 0.2, 0)) + len(val) == len(list_dataset(folders)) == 445
    monuseg = [it for it in val if it.name.startswith("TCGA")][0]
    half = [it for it in list_dataset(folders, "auto", "val", 0.2, 0, scale=0.5) if it.name == monuseg.name][0]
    full, small = monuseg.load(), half.load()
    assert small.image.shape == (500, 500, 3) and small.image.dtype == np.uint8 and small.inst_map.shape == (500, 500)
    kept = set(np.unique(small.inst_map)) - {0}
    assert kept <= set(np.unique(full.inst_map)) and len(kept) > 0.95 * (len(np.unique(full.inst_map)) - 1)
    with pytest.raises(ValueError, match="subset"):
        list_dataset(folders, "auto", "test")
    with pytest.raises(ValueError, match="dataset_dir is not set"):
        list_dataset("")


def test_list_dataset_images_filter(shared_data: Path) -> None:
    """``--images`` keeps the items whose name matches a shell pattern; a pattern that matches nothing is an error."""
    from scripts.evaluation.scoring import list_dataset

    folder = str(shared_data / "monuseg_train")
    val_names = [it.name for it in list_dataset(folder, "auto", "val", 0.2, 0)]
    site = val_names[0][:8]  # "TCGA-XX-": one tissue-source site
    picked = list_dataset(folder, "auto", "val", 0.2, 0, images=f"{site}*")
    assert [it.name for it in picked] == [n for n in val_names if n.startswith(site)]
    both = list_dataset(folder, "auto", "all", images=[val_names[0], "TCGA-21-*"])
    assert {it.name for it in both} == {val_names[0]} | {n for n in (it.name for it in list_dataset(folder))
                                                          if n.startswith("TCGA-21-")}
    with pytest.raises(ValueError, match="images: pattern 'nothing-\\*' matches none"):
        list_dataset(folder, "auto", "val", 0.2, 0, images=["TCGA-*", "nothing-*"])


def test_watershed_baseline_finds_separated_and_touching_disks() -> None:
    from scripts.evaluation.baseline import BaselinePredictions, watershed_baseline

    rows, cols = np.mgrid[:96, :96]
    image = np.full((96, 96, 3), (235, 200, 225), np.uint8)  # eosin-pink background
    centres = [(20, 20), (70, 25), (48, 70), (60, 70)]  # the last two touch
    truth = np.zeros((96, 96), np.int32)
    for k, (y, x) in enumerate(centres, 1):
        disk = (rows - y) ** 2 + (cols - x) ** 2 <= 8**2
        image[disk] = (70, 50, 140)  # haematoxylin blue-purple
        truth[disk & (truth == 0)] = k
    inst = watershed_baseline(image)
    assert inst.dtype == np.int32 and inst.max() == 4  # the touching pair is split
    assert score_image(truth, inst).pq > 0.8
    assert watershed_baseline(np.full((32, 32, 3), 255, np.uint8)).max() == 0  # blank: no nuclei
    record = NucleusRecord(name="t", image=image, inst_map=truth)
    assert BaselinePredictions().predict(record)[1] is None
    with pytest.raises(ValueError, match="RGB"):
        watershed_baseline(np.zeros((8, 8)))
