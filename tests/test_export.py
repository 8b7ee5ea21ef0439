"""The model file: export from training checkpoints in float32 / float16 / int8 storage, read back as float32;
the class table travels with the model (a PanNuke-trained model writes PanNuke's class names); older files still
read, with the bundle's table; a file of another kind is refused by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import BUNDLE_ROOT, run_bundle
from scripts.io.atomic import atomic_torch_save
from scripts.pipeline.model_file import INT8_MIN_ELEMENTS, PARTS, export_model, load_model, part_state_dict, read_model_file
from scripts.inference import image_tensor
from scripts.evaluation.metrics import panoptic_quality
from scripts.data.readers.common import read_image
from scripts.data.readers.pannuke import CLASS_NAMES as PANNUKE_CLASSES
from scripts.data.records import load_class_table
from scripts.data.synthetic import write_synthetic_dataset

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
SAMPLE = sorted((BUNDLE_ROOT / "sample_data" / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def shipped_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped model's two parts written back as training checkpoints (float32)."""
    model = read_model_file(SHIPPED)
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for part in PARTS:
        path = folder / f"{part}.pt"
        atomic_torch_save({"network": part_state_dict(model, part), "config": model[part]["config"]}, path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def exported(shipped_checkpoints, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {storage: export_model(*shipped_checkpoints, folder / f"{storage}.pt", storage=storage)
            for storage in ("float32", "float16", "int8")}


def test_storages_read_back_as_float32_within_their_precision(exported) -> None:
    reference = read_model_file(exported["float32"])
    sizes = {storage: path.stat().st_size for storage, path in exported.items()}
    assert sizes["float16"] < 0.55 * sizes["float32"] and sizes["int8"] < 0.3 * sizes["float32"]
    for storage in ("float16", "int8"):
        model = read_model_file(exported[storage])
        assert model["storage"] == storage
        n_int8 = 0
        for part in PARTS:
            expected, restored = part_state_dict(reference, part), part_state_dict(model, part)
            assert expected.keys() == restored.keys()
            for key, value in expected.items():
                assert restored[key].dtype == value.dtype, key
                if not value.is_floating_point():
                    assert torch.equal(restored[key], value), key
                    continue
                stored = model[part]["state_dict"][key]
                if stored.dtype == torch.int8:  # error at most half a step of its row's scale
                    n_int8 += 1
                    assert value.dim() >= 2 and value.numel() >= INT8_MIN_ELEMENTS
                    rows = value.reshape(value.shape[0], -1)
                    half_step = rows.abs().amax(1) / 254 + 1e-7
                    error = (restored[key] - value).reshape(rows.shape).abs().amax(1)
                    assert torch.all(error <= half_step * 1.001), key
                else:
                    assert stored.dtype == (torch.float32 if storage == "float32" else torch.float16), key
                    torch.testing.assert_close(restored[key], value, rtol=1e-3, atol=1e-4)
        assert (n_int8 > 0) == (storage == "int8")


@pytest.mark.slow
def test_int8_model_finds_the_same_nuclei_on_a_sample_tile(exported) -> None:
    image = image_tensor(read_image(SAMPLE))
    maps = {}
    for storage in ("float32", "int8"):
        with torch.no_grad():
            maps[storage] = load_model(exported[storage])(image)["inst_map"].numpy()
    assert maps["float32"].max() > 20
    agreement = panoptic_quality(maps["float32"], maps["int8"]).pq
    assert agreement > 0.95


def test_older_formats_read_with_the_bundle_table_and_other_files_are_refused(shipped_checkpoints, tmp_path) -> None:
    for old_format in ("promptnucseg/1", "promptnucseg/2"):
        old = {"format": old_format}
        for part, path in zip(PARTS, shipped_checkpoints):
            checkpoint = torch.load(path, weights_only=True)
            old[part] = {"config": checkpoint["config"], "state_dict": checkpoint["network"]}
        atomic_torch_save(old, tmp_path / "old.pt")
        network = load_model(tmp_path / "old.pt")
        assert network.prompter is not None and network.class_table == load_class_table()
    atomic_torch_save({"format": "something/9"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a PromptNucSeg model file \(format 'something/9'"):
        read_model_file(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a model\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a PromptNucSeg model file"):
        read_model_file(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_model_file(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="storage must be one of"):
        export_model(*shipped_checkpoints, tmp_path / "x.pt", storage="bfloat16")


def test_a_part_can_come_from_a_model_file(shipped_checkpoints, tmp_path) -> None:
    """A new prompter with the shipped model's segmentor: the model file's part is taken as it is (its config and
    its weights restored to float32); a file of another format is an error naming it."""
    prompter = torch.load(shipped_checkpoints[0], weights_only=True)
    prompter["network"] = {key: value + 1 if value.is_floating_point() else value
                           for key, value in prompter["network"].items()}
    atomic_torch_save(prompter, tmp_path / "new_prompter.pt")
    mixed = read_model_file(export_model(tmp_path / "new_prompter.pt", SHIPPED, tmp_path / "mixed.pt"))
    shipped = read_model_file(SHIPPED)
    assert mixed["segmentor"]["config"] == shipped["segmentor"]["config"]
    expected, got = part_state_dict(shipped, "segmentor"), part_state_dict(mixed, "segmentor")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(torch.equal(prompter["network"][k], v) for k, v in part_state_dict(mixed, "prompter").items())
    atomic_torch_save({"format": "something/9"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a PromptNucSeg model file"):
        export_model(tmp_path / "new_prompter.pt", tmp_path / "other.pt", tmp_path / "x.pt")
    atomic_torch_save({"weights": {}}, tmp_path / "foreign.pt")
    with pytest.raises(KeyError, match=r"foreign\.pt: not a training checkpoint"):
        export_model(tmp_path / "foreign.pt", SHIPPED, tmp_path / "x.pt")


def test_exported_model_carries_its_class_table(shipped_checkpoints, tmp_path) -> None:
    """A prompter trained with other class names (here PanNuke's, in another order) gives a table of those names,
    colours kept for the names the bundle knows and distinct for the others; an untyped model an empty table."""
    prompter, segmentor = (torch.load(path, weights_only=True) for path in shipped_checkpoints)
    renamed = {**prompter, "config": {**prompter["config"], "class_names": ["Neoplastic", "Inflammatory",
                                                                               "Connective", "Dead", "Epithelial"]}}
    atomic_torch_save(renamed, tmp_path / "p.pt")
    table = read_model_file(export_model(tmp_path / "p.pt", shipped_checkpoints[1], tmp_path / "m.pt"))["class_table"]
    assert [table[k]["name"] for k in sorted(table)] == list(PANNUKE_CLASSES.values())
    bundle_colors = {v["name"]: v["color"] for v in load_class_table().values()}
    assert table[2]["color"] == bundle_colors["Inflammatory"] and table[5]["color"] == bundle_colors["Epithelial"]
    assert len({tuple(v["color"]) for v in table.values()}) == 5
    untyped = {**prompter, "config": {**prompter["config"], "class_names": []}}
    atomic_torch_save(untyped, tmp_path / "u.pt")
    assert read_model_file(export_model(tmp_path / "u.pt", shipped_checkpoints[1], tmp_path / "u_model.pt")
                           )["class_table"] == {}


@pytest.mark.slow
def test_pannuke_trained_model_writes_pannuke_class_names(tmp_path) -> None:
    """Train both stages on small folds in PanNuke's exact format (5 classes), export, run ``inference``: the
    GeoJSON and CSV name PanNuke's classes, with no flag about classes."""
    data = write_synthetic_dataset(tmp_path / "pannuke", n_images=8, size=(64, 64), n_nuclei=(6, 10), num_classes=5,
                                   seed=3, dataset_format="pannuke")
    assert sorted(p.name for p in data.iterdir()) == ["Fold 1"]
    run = tmp_path / "run"
    run_bundle("training", "configs/train.json", "--dataset_dir", str(data), "--output_dir", str(run),
               "--max_epochs", "1", "--epoch_length", "1", "--patch_size", "64", "--val_fraction", "0.25",
               "--prompter#hparams#batch_size", "2", "--segmentor#hparams#batch_size", "2",
               "--segmentor#hparams#num_prompts_per_image", "4", "--segmentor#hparams#sam_variant", "conv_small")
    model = export_model(run / "prompter" / "last.pt", run / "segmentor" / "last.pt", tmp_path / "model.pt")
    # an untrained prompter finds no nucleus with the default rule: take every anchor (the writers are under test)
    run_bundle("inference", "configs/inference.json", "--model_path", str(model), "--input_dir",
               str(BUNDLE_ROOT / "sample_data" / "images"), "--output_dir", str(tmp_path / "out"),
               "--pipeline#foreground_threshold", "0", "--pipeline#mask_filter", "false", "--device", "cpu")
    geojson = sorted((tmp_path / "out").glob("*.geojson"))
    names = {f["properties"]["classification"]["name"] for path in geojson
             for f in json.loads(path.read_text())["features"] if "classification" in f["properties"]}
    assert names and names <= set(PANNUKE_CLASSES.values())
    with open(sorted((tmp_path / "out").glob("*.csv"))[0], newline="") as f:
        csv_names = {row["class_name"] for row in csv.DictReader(f)}
    assert csv_names and csv_names <= set(PANNUKE_CLASSES.values())
