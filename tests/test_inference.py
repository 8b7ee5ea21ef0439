"""Automatic inference (``inference`` run id): images and whole slides to instance/class maps, GeoJSON, CSV and
overlays; bad inputs give an output or an error naming the file, and never stop the other inputs.

Most tests use a cheap model (random networks, prompter biases set so it finds about 8 prompts per 256 px tile;
see ``benchmarks/common.random_model_file``): they check the files, not the nuclei. The tests marked
``slow`` at the end use the model trained on synthetic data (``trained_model_path``) where good nuclei matter.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from shapely.geometry import shape

from conftest import REPO_ROOT, bundle_env, run_bundle
from scripts.io import wsi
from scripts.pipeline.model_file import load_model
from scripts.pipeline.promptnucseg import PromptNucSeg
from scripts.inference import (InferenceFailures, SlideOptions, image_tensor, is_whole_slide, run_inference,
                               segment_image_file)
from scripts.io.measurements import TABLE_COLUMNS, instance_polygons
from scripts.data.readers.common import read_image
from scripts.data.synthetic import make_synthetic_record

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from common import random_model_file  # noqa: E402

# the class table, read from the bundle's metadata.json here (not through scripts.data.records)
CLASS_TABLE = {int(k): v for k, v in json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())
               ["class_table"].items()}
# the bundle commands use this process's thread count (PNS_TEST_THREADS): the same arithmetic as in-process runs,
# and no oversubscription of a busy machine
THREADS = ("--num_threads", str(torch.get_num_threads()))
IMAGE_OUTPUTS = ("_inst.tif", "_type.tif", ".geojson", ".csv", "_overlay.png")
SLIDE_OUTPUTS = (".geojson", ".csv", "_overlay.png")
MONUSEG = "TCGA-21-5784-01Z-00-DX1"
CONSEP = ("train_10_000", "train_11_005")
SAMPLE_TILES = sorted((REPO_ROOT / "bundle" / "sample_data" / "images").glob("*.png"))
BUNDLE_DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # as configs/inference.json


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """Cheap model: random vit_tiny segmentor at 256 px, small random prompter calibrated on a MoNuSeg crop."""
    image = sample_mosaic()[:512, :512]
    return random_model_file(tmp_path_factory.mktemp("model") / "model.pt", image, prompts_per_tile=20,
                             fpn_channels=64, mlp_hidden=64)


@pytest.fixture(scope="module")
def model(model_file):
    """The model on the device the bundle's inference config picks (its results are compared with the bundle's)."""
    return load_model(model_file, BUNDLE_DEVICE)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """A 1000 x 1000 .tif (MoNuSeg size), two 256 px tiles (a .jpg and a .png), a 100 x 90 .png: the bundle's sample
    tiles (real 40x H&E), so that a clone without the project's datasets runs these tests."""
    folder = tmp_path_factory.mktemp("images")
    tifffile.imwrite(folder / f"{MONUSEG}.tif", sample_mosaic()[:1000, :1000])
    Image.fromarray(sample_tile(5)).save(folder / f"{CONSEP[0]}.jpg", quality=95)
    Image.fromarray(sample_tile(4)).save(folder / f"{CONSEP[1]}.png")
    Image.fromarray(read_image(folder / f"{CONSEP[0]}.jpg")[:100, :90]).save(folder / "small_100x90.png")
    return folder


def sample_tile(index: int) -> np.ndarray:
    """The bundle's sample tile ``index`` (256 x 256 RGB uint8, 40x H&E)."""
    return read_image(SAMPLE_TILES[index % len(SAMPLE_TILES)])


def sample_mosaic(side: int = 4) -> np.ndarray:
    """``side`` x ``side`` sample tiles (cycling through the six) as one image, (256 side, 256 side, 3)."""
    return np.concatenate([np.concatenate([sample_tile(r * side + c) for c in range(side)], 1)
                           for r in range(side)], 0)


@pytest.fixture(scope="module")
def bundle_outputs(image_dir, model_file, tmp_path_factory) -> tuple[Path, str]:
    """The bundle's inference run on ``image_dir`` (must exit 0): the output folder and the log."""
    out = tmp_path_factory.mktemp("out")
    proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(image_dir), "--output_dir", str(out),
                      "--model_path", str(model_file), *THREADS, timeout=600)
    return out, proc.stdout


# ------------------------------------------------------------------------------------------------ checks
def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def check_table_and_geojson(csv_path: Path, geojson_path: Path, bounds: tuple[float, float]) -> tuple[list, list]:
    """CSV columns, GeoJSON validity and one-to-one ids between them; returns (rows, features).

    ``bounds`` = (width, height) in level-0 px: every outline lies in [0, width] x [0, height] (+0.5 shift).
    """
    columns, rows = read_csv(csv_path)
    assert columns == list(TABLE_COLUMNS)
    collection = json.loads(geojson_path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(rows)
    ids = [int(r["id"]) for r in rows]
    assert len(set(ids)) == len(ids)
    names = {v["name"]: list(v["color"]) for v in CLASS_TABLE.values()}
    for feature, row in zip(features, rows):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"]["Nucleus id"] == int(row["id"])
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.area > 0, row["id"]
        x0, y0, x1, y1 = polygon.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= bounds[0] + 1e-6 and y1 <= bounds[1] + 1e-6
        cls = int(row["class"])
        if cls == 0:
            assert "classification" not in props and row["class_name"] == ""
        else:
            entry = CLASS_TABLE[cls]
            assert props["classification"] == {"name": entry["name"], "color": list(entry["color"])}
            assert row["class_name"] == entry["name"] and names[row["class_name"]] == list(entry["color"])
        assert 0 <= float(row["centroid_x"]) < bounds[0] and 0 <= float(row["centroid_y"]) < bounds[1]
        assert 0 <= float(row["class_score"]) <= 1
    return rows, features


def check_image_outputs(out: Path, stem: str, shape_hw: tuple[int, int]) -> int:
    """The five outputs of one image: dtypes, shapes, ids in the TIFF = CSV rows = GeoJSON features, centroids
    and areas of the CSV = those of the TIFF's instances, one class per instance. Returns the nuclei count."""
    for suffix in IMAGE_OUTPUTS:
        assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"
    inst = tifffile.imread(out / f"{stem}_inst.tif")
    types = tifffile.imread(out / f"{stem}_type.tif")
    assert inst.dtype == np.int32 and types.dtype == np.uint8
    assert inst.shape == shape_hw and types.shape == shape_hw
    assert ((inst == 0) == (types == 0)).all()
    rows, features = check_table_and_geojson(out / f"{stem}.csv", out / f"{stem}.geojson",
                                             (shape_hw[1], shape_hw[0]))
    ids = np.unique(inst[inst > 0])
    assert sorted(int(r["id"]) for r in rows) == ids.tolist() == list(range(1, len(ids) + 1))
    n = len(ids) + 1
    flat = inst.ravel()
    rr, cc = np.indices(shape_hw)
    area = np.bincount(flat, minlength=n)
    cx = np.bincount(flat, cc.ravel(), minlength=n) / np.maximum(area, 1)
    cy = np.bincount(flat, rr.ravel(), minlength=n) / np.maximum(area, 1)
    boxes = {i + 1: s for i, s in enumerate(ndimage.find_objects(inst))}
    for row, feature in zip(rows, features):
        i = int(row["id"])
        assert float(row["area"]) == area[i]
        # the outline (+0.5 px, QuPath's pixel corners) follows the pixel edges of the instance's largest part
        x0, y0, x1, y1 = shape(feature["geometry"]).bounds
        rows_i, cols_i = boxes[i]
        assert cols_i.start - 1e-6 <= x0 and x1 <= cols_i.stop + 1e-6
        assert rows_i.start - 1e-6 <= y0 and y1 <= rows_i.stop + 1e-6
        assert abs(float(row["centroid_x"]) - cx[i]) < 0.01 and abs(float(row["centroid_y"]) - cy[i]) < 0.01
        assert set(np.unique(types[inst == i]).tolist()) == {int(row["class"])}
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    assert overlay.shape == (*shape_hw, 3) and overlay.dtype == np.uint8
    return len(rows)


# ------------------------------------------------------------------------------------------------ images
def test_bundle_writes_five_outputs_per_image(bundle_outputs, image_dir):
    out, log = bundle_outputs
    expected = {MONUSEG: (1000, 1000), CONSEP[0]: (256, 256), CONSEP[1]: (256, 256), "small_100x90": (100, 90)}
    counts = {stem: check_image_outputs(out, stem, hw) for stem, hw in expected.items()}
    assert counts[MONUSEG] > 50 and counts[CONSEP[0]] > 0  # the cheap model finds "nuclei" in H&E
    assert "inference done: 4 input(s)" in log
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bundle_matches_in_process_pipeline(bundle_outputs, image_dir, model):
    """The files hold what the network returns for the image (a 256 px tile and the image smaller than a tile)."""
    out, _ = bundle_outputs
    for name in (f"{CONSEP[1]}.png", "small_100x90.png"):
        result = model(image_tensor(read_image(image_dir / name)))
        inst = tifffile.imread(out / f"{Path(name).stem}_inst.tif")
        np.testing.assert_array_equal(inst, result["inst_map"].cpu().numpy())
        np.testing.assert_array_equal(tifffile.imread(out / f"{Path(name).stem}_type.tif"),
                                      result["type_map"].cpu().numpy())


def test_blank_tile_gives_empty_outputs_not_an_error(tmp_path, model_file):
    """A tile without nuclei: the five files with zero nuclei (a model finding no prompt, as on glass)."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 255, np.uint8)).save(blank)
    image = sample_tile(0)
    network = load_model(random_model_file(tmp_path / "nothing.pt", image, finds_nothing=True, fpn_channels=64,
                                           mlp_hidden=64))
    out = tmp_path / "out"
    summary = run_inference(network, str(out), input_file=str(blank))
    assert summary.nuclei == {str(blank): 0}
    assert check_image_outputs(out, "blank", (256, 256)) == 0
    assert not tifffile.imread(out / "blank_inst.tif").any()
    collection = json.loads((out / "blank.geojson").read_text())
    assert (collection["type"], collection["features"]) == ("FeatureCollection", [])
    assert collection["properties"]["scale_source"] == "default"  # no nuclei: nothing to resample for
    assert (out / "blank.csv").read_text().strip() == ",".join(TABLE_COLUMNS)
    overlay = np.asarray(Image.open(out / "blank_overlay.png"))
    assert (overlay == 255).all()  # the image itself, no contour


def test_bad_files_are_listed_and_do_not_stop_the_others(tmp_path, model_file):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_notes.txt").write_text("not an image: ignored")
    Image.fromarray(sample_tile(0)[:100, :90]).save(folder / "d_small.png")
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(folder), "--output_dir", str(out),
                      "--model_path", str(model_file), *THREADS, check=False, timeout=300)
    assert proc.returncode != 0
    check_image_outputs(out, "d_small", (100, 90))  # processed after the two bad files
    assert sorted(p.name for p in out.iterdir()) == sorted(f"d_small{s}" for s in IMAGE_OUTPUTS)
    log = proc.stdout
    summary = log[log.index("2 input(s) failed:"):]
    assert log.index("d_small.png: ") < log.index("2 input(s) failed:")  # listed at the end, after the good one
    for name in ("a_corrupt.png", "b_empty.jpg"):
        assert f"{folder / name}: ValueError: {folder / name}: unreadable or corrupt image file" in summary
    assert "c_notes.txt" not in log


def test_run_inference_raises_listing_failures(tmp_path, model):
    """In process: the failures as a dict, raised after the good inputs were written."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.tif").write_bytes(b"II*\x00garbage")
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(folder / "good.png")
    with pytest.raises(InferenceFailures) as info:
        run_inference(model, str(tmp_path / "out"), input_dir=str(folder))
    assert list(info.value.failures) == [str(folder / "bad.tif")]
    assert str(folder / "bad.tif") in str(info.value)
    assert (tmp_path / "out" / "good.geojson").is_file()


def test_missing_model_file_is_named(tmp_path, image_dir):
    missing = tmp_path / "no_such_model.pt"
    proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(image_dir), "--output_dir",
                      str(tmp_path / "out"), "--model_path", str(missing), *THREADS, check=False, timeout=300)
    assert proc.returncode != 0
    assert f"model file not found: {missing}" in proc.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_command_says_what_went_wrong_first_and_last(tmp_path, model_file):
    """A text file given as the model and a typo in a boolean option: the error under MONAI's "Failed to evaluate"
    wrappers is the line before the traceback and the last line, naming the file or the option."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    cases = [(["--model_path", str(notes)], f"promptnucseg: ValueError: {notes}: not a PromptNucSeg model file"),
             (["--model_path", str(model_file), "--pipeline#prompter_tta", "ture"],
              "promptnucseg: ValueError: prompter_tta must be true or false (also yes/no, 1/0), got 'ture'")]
    for args, expected in cases:
        proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(REPO_ROOT / "bundle" / "sample_data"
                          / "images"), "--output_dir", str(tmp_path / "out"), *args, *THREADS, check=False, timeout=300)
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode != 0 and lines[-1].startswith(expected), lines[-3:]
        assert lines.index(lines[-1]) < lines.index("Traceback (most recent call last):")


def test_missing_input_dir_is_named(tmp_path, model_file):
    missing = tmp_path / "no_such_dir"
    proc = run_bundle("inference", "configs/inference.json", "--input_dir", str(missing), "--output_dir",
                      str(tmp_path / "out"), "--model_path", str(model_file), *THREADS, check=False, timeout=300)
    assert proc.returncode != 0
    assert f"input_dir not found: {missing}" in proc.stdout


def test_empty_input_dir_and_image_errors_name_the_file(tmp_path, model):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images .* in input_dir {re.escape(str(empty))}"):
        run_inference(model, str(tmp_path / "out"), input_dir=str(empty))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.png"))):
        run_inference(model, str(tmp_path / "out"), input_file=str(tmp_path / "gone.png"))
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(zero))):
        segment_image_file(model, zero, tmp_path / "out", CLASS_TABLE)


def test_inputs_sharing_a_stem_are_refused_before_any_work(tmp_path, model):
    """``a.png`` and ``a.jpg`` would both write ``a.*``: an error naming both, nothing written."""
    folder = tmp_path / "in"
    folder.mkdir()
    tile = np.full((64, 48, 3), 200, np.uint8)
    Image.fromarray(tile).save(folder / "a.png")
    Image.fromarray(tile).save(folder / "a.jpg")
    Image.fromarray(tile).save(folder / "b.png")
    with pytest.raises(ValueError, match=r"same stem .*a\.jpg, a\.png"):
        run_inference(model, str(tmp_path / "out"), input_dir=str(folder))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_rerun_into_the_input_folder_reads_no_outputs(tmp_path, model):
    """``--output_dir`` equal to ``--input_dir``: the second run segments the same images, not their outputs."""
    folder = tmp_path / "in"
    folder.mkdir()
    samples = sorted((REPO_ROOT / "bundle" / "sample_data" / "images").glob("*.png"))[:2]
    for sample in samples:
        shutil.copy(sample, folder)
    first = run_inference(model, str(folder), input_dir=str(folder))
    files = sorted(p.name for p in folder.iterdir())
    second = run_inference(model, str(folder), input_dir=str(folder), overwrite=True)
    assert sorted(second.nuclei) == sorted(first.nuclei) == sorted(str(folder / s.name) for s in samples)
    assert second.nuclei == first.nuclei
    assert sorted(p.name for p in folder.iterdir()) == files  # the same 2 x 6 files, rewritten
    third = run_inference(model, str(folder), input_dir=str(folder))  # without overwrite: nothing left to do
    assert not third.nuclei and sorted(third.skipped) == sorted(first.nuclei)


def test_unwritable_output_folder_fails_before_any_image_is_segmented(tmp_path, model):
    calls = CountingNetwork(model)
    not_a_folder = tmp_path / "taken"
    not_a_folder.write_text("a file where the output folder should be")
    with pytest.raises(PermissionError, match=f"output_dir {re.escape(str(not_a_folder / 'out'))} is not writable"):
        run_inference(calls, str(not_a_folder / "out"), input_dir=str(REPO_ROOT / "bundle" / "sample_data" / "images"))
    assert calls.calls == 0


@pytest.mark.slow
def test_cohort_on_two_ranks_does_each_input_once_and_a_rerun_only_what_is_missing(tmp_path):
    """``torchrun --nproc_per_node 2`` with ``configs/multi_gpu_inference.json`` (gloo on CPU): the sample tiles
    shared between the ranks, each segmented once; a rerun skips inputs whose outputs are complete, redoes one whose
    overlay is missing, and ``--overwrite true`` redoes them all."""
    samples = sorted((REPO_ROOT / "bundle" / "sample_data" / "images").glob("*.png"))
    out = tmp_path / "cohort"

    def cohort(*extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "monai.bundle", "run", "inference", "--config_file",
               "['configs/inference.json','configs/multi_gpu_inference.json']", "--input_dir",
               str(samples[0].parent), "--output_dir", str(out), "--num_threads", "1", *extra]
        proc = subprocess.run(cmd, cwd=REPO_ROOT / "bundle", env=bundle_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert proc.stdout.count("process group ready (gloo") == 2
        return sorted(re.findall(r"INFO - (\S+\.png): \d+ nuclei in", proc.stdout))

    assert cohort() == sorted(s.name for s in samples)  # every input once, across both ranks
    assert len(list(out.iterdir())) == 5 * len(samples)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / f"{samples[2].stem}_overlay.png").unlink()  # as if killed before its last output
    assert cohort() == [samples[2].name]
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.iterdir() if samples[2].stem not in p.name)
    assert cohort("--overwrite", "true") == sorted(s.name for s in samples)


def test_resolution_metadata_sets_the_scale_and_micron_measurements(model, tmp_path):
    """A TIFF saying 0.5 µm/px (20x) is enlarged 2x for the 40x model (``input_scale auto``): the GeoJSON says the
    scale and its source, the CSV's areas and perimeters in µm follow the px ones at 0.5 µm/px, and the areas are
    the polygons' (in px). A TIFF at a 72 dpi default, a PNG: no resolution, no µm (unless the nuclei set it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    tile = sample_tile(4)
    tifffile.imwrite(folder / "at20x.tif", tile, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    tifffile.imwrite(folder / "dpi72.tif", tile, resolution=(72, 72), resolutionunit="INCH")
    out = tmp_path / "out"
    run_inference(model, str(out), input_dir=str(folder))
    collection = json.loads((out / "at20x.geojson").read_text())
    assert collection["properties"] == {"input_scale": 2.0, "scale_source": "metadata", "mpp": 0.5}
    rows, features = check_table_and_geojson(out / "at20x.csv", out / "at20x.geojson", (256, 256))
    assert rows
    for row, feature in zip(rows, features):
        area, perimeter = float(row["area"]), float(row["perimeter"])
        assert float(row["area_um2"]) == pytest.approx(area * 0.25) and float(row["perimeter_um"]) == pytest.approx(
            perimeter * 0.5)
        assert feature["properties"]["measurements"]["Area µm^2"] == pytest.approx(area * 0.25, abs=0.01)
    plain = json.loads((out / "dpi72.geojson").read_text())
    assert plain.get("properties", {}).get("scale_source") in (None, "default", "nuclei")
    _, rows = read_csv(out / "dpi72.csv")
    if plain.get("properties", {}).get("scale_source") in (None, "default"):
        assert all(r["area_um2"] == "" for r in rows)


# ------------------------------------------------------------------------------------------------ slides
SLIDE = 2048
BLOCK = 256
TISSUE_BLOCKS = [(r, c) for r in (0, 1, 6, 7) for c in ((0, 1) if r < 2 else (6, 7))]  # (block row, block col)


def tissue_layout() -> np.ndarray:
    """Boolean (SLIDE, SLIDE) level-0 mask of the tissue blocks of the test slide."""
    mask = np.zeros((SLIDE, SLIDE), bool)
    for r, c in TISSUE_BLOCKS:
        mask[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = True
    return mask


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """A 2048 px 3-level pyramidal TIFF: synthetic H&E blocks of 256 px (``TISSUE_BLOCKS``) on white glass."""
    image = np.full((SLIDE, SLIDE, 3), 255, np.uint8)
    for k, (r, c) in enumerate(TISSUE_BLOCKS):
        record = make_synthetic_record((BLOCK, BLOCK), n_nuclei=40, num_classes=3, seed=100 + k)
        image[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = record.image
    return wsi.write_pyramidal_tiff(tmp_path_factory.mktemp("slide") / "mosaic.tif", image, levels=3)


class CountingNetwork(torch.nn.Module):
    """The pipeline, counting the slide tiles it is called on (with their scale; the sample crops that decide the
    slide's scale are counted apart); with ``fail_at`` it dies on that tile (a kill)."""

    def __init__(self, network, fail_at: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.class_table, self.options, self.training_mpp = network.class_table, network.options, network.training_mpp
        self.calls, self.samples, self.fail_at = 0, 0, fail_at

    def forward(self, image, input_scale=None, mpp=None):
        if input_scale is None:
            self.samples += 1
            return self.network(image, mpp=mpp)
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.network(image, input_scale=input_scale)

    def fingerprint(self) -> str:
        return self.network.fingerprint()


def expected_slide_tiles(tile: int, overlap: int, min_fraction: float = 0.05) -> tuple[np.ndarray, int]:
    """Level-0 (SLIDE, SLIDE) mask of the tiles with enough tissue and their count, and the count of all tiles of
    the grid, from the known layout (not from scripts.io.wsi)."""
    stride = tile - overlap
    starts = list(range(0, SLIDE - tile + 1, stride))
    if starts[-1] + tile < SLIDE:
        starts.append(SLIDE - tile)
    mask = tissue_layout()
    processed = np.zeros_like(mask)
    kept = 0
    for y in starts:
        for x in starts:
            fraction = mask[y : y + tile, x : x + tile].mean()
            assert not min_fraction / 2 < fraction < 2 * min_fraction, "layout too close to the tissue threshold"
            if fraction >= min_fraction:
                processed[y : y + tile, x : x + tile] = True
                kept += 1
    return processed, kept, len(starts) ** 2


def test_is_whole_slide(slide_file, image_dir, tmp_path):
    assert is_whole_slide(slide_file)  # a pyramid, however small
    monuseg = image_dir / f"{MONUSEG}.tif"  # a 1000 x 1000 single-level TIFF
    assert not is_whole_slide(monuseg)
    assert is_whole_slide(monuseg, min_side=1000)  # a big single-level TIFF
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"")
    assert is_whole_slide(bad)  # by suffix: the slide reader then names the file in its error


def test_slide_at_level0_skips_glass_and_writes_level0_outputs(slide_file, model, tmp_path):
    options = SlideOptions(tile_size=512, tile_overlap=64, thumbnail_size=512)
    counting = CountingNetwork(model)
    out = tmp_path / "out"
    summary = run_inference(counting, str(out), input_file=str(slide_file), slide_options=options)
    processed, kept, total = expected_slide_tiles(512, 64)
    assert counting.calls == kept and kept < total  # glass tiles are skipped
    assert counting.samples == 3  # crops deciding the scale: the slide says 0.25 um/px, checked on its nuclei
    assert sorted(p.name for p in out.iterdir()) == sorted(f"mosaic{s}" for s in SLIDE_OUTPUTS)
    rows, features = check_table_and_geojson(out / "mosaic.csv", out / "mosaic.geojson", (SLIDE, SLIDE))
    assert summary.nuclei[str(slide_file)] == len(rows) > 0
    assert sorted(int(r["id"]) for r in rows) == list(range(1, len(rows) + 1))
    # every nucleus comes from a processed tile (a random model also "finds" nuclei on the glass of those tiles)
    xs, ys = np.array([float(r["centroid_x"]) for r in rows]), np.array([float(r["centroid_y"]) for r in rows])
    assert processed[ys.astype(int), xs.astype(int)].all()
    assert (xs > 1024).any() and (ys > 1024).any()  # the lone tissue blocks at the bottom right were found
    overlay = np.asarray(Image.open(out / "mosaic_overlay.png"))
    assert overlay.shape == (512, 512, 3)


def test_slide_run_resumes_after_a_kill(slide_file, model, tmp_path):
    """A slide run killed half-way goes on from its last finished tile: the rerun segments only the other tiles,
    and the outputs are byte for byte those of an uninterrupted run; rows written after the last checkpoint (a
    tile cut short) are dropped; a changed slide file starts again."""
    options = SlideOptions(tile_size=512, tile_overlap=64, thumbnail_size=512)
    _, kept, _ = expected_slide_tiles(512, 64)
    model = PromptNucSeg(model.prompter, model.segmentor, model.options, model.class_table, input_scale=1)
    whole = tmp_path / "whole"
    run_inference(model, str(whole), input_file=str(slide_file), slide_options=options)
    out = tmp_path / "out"
    killed = CountingNetwork(model, fail_at=kept // 2 + 1)
    with pytest.raises(KeyboardInterrupt):
        run_inference(killed, str(out), input_file=str(slide_file), slide_options=options)
    partial = out / ".mosaic.partial"
    assert [p.name for p in out.iterdir()] == [partial.name]  # no output before the slide is complete
    assert len(json.loads((partial / "state.json").read_text())["done"]) == kept // 2
    with open(partial / "features.jsonl", "a") as f:  # a tile cut short after the checkpoint
        f.write('{"type":"Feature","half a tile"}\n')
    with open(partial / "rows.csv", "a") as f:
        f.write("999999,1,2\n")
    resumed = CountingNetwork(model)
    summary = run_inference(resumed, str(out), input_file=str(slide_file), slide_options=options)
    assert resumed.calls == kept - kept // 2
    for suffix in SLIDE_OUTPUTS:
        assert (out / f"mosaic{suffix}").read_bytes() == (whole / f"mosaic{suffix}").read_bytes(), suffix
    assert not partial.exists() and summary.nuclei[str(slide_file)] > 0
    # killed again, then the slide file changes: its partial run is discarded and every tile is done again
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        run_inference(CountingNetwork(model, fail_at=2), str(out), input_file=str(slide_file), slide_options=options)
    changed = tmp_path / "copy" / "mosaic.tif"
    changed.parent.mkdir()
    shutil.copy(slide_file, changed)
    rerun = CountingNetwork(model)
    run_inference(rerun, str(out), input_file=str(changed), slide_options=options)
    assert rerun.calls == kept
    assert (out / "mosaic.csv").read_bytes() == (whole / "mosaic.csv").read_bytes()


@pytest.fixture(scope="module")
def small_slide_file(tmp_path_factory) -> Path:
    """A 1024 px 3-level pyramidal TIFF of synthetic H&E without glass (level 1: 512 px)."""
    image = make_synthetic_record((1024, 1024), n_nuclei=300, num_classes=3, seed=7).image
    return wsi.write_pyramidal_tiff(tmp_path_factory.mktemp("small_slide") / "small.tif", image, levels=3)


def test_slide_at_level1_gives_level0_coordinates(small_slide_file, model_file, model, tmp_path):
    """``--slide#level 1`` with one slide tile covering level 1 = the network on the level-1 image, with centroids,
    areas and outlines in level-0 px: level pixel c covers level-0 pixels 2c and 2c + 1 (centre 2c + 0.5)."""
    out = tmp_path / "out"
    run_bundle("inference", "configs/inference.json", "--input_file", str(small_slide_file), "--output_dir",
               str(out), "--model_path", str(model_file), *THREADS, "--slide#level", "1", "--slide#tile_size", "512",
               "--pipeline#input_scale", "1", timeout=600)  # level 1 as it is (auto would enlarge its 0.5 µm/px)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"small{s}" for s in SLIDE_OUTPUTS)
    rows, features = check_table_and_geojson(out / "small.csv", out / "small.geojson", (1024, 1024))
    with wsi.open_slide(small_slide_file) as slide:
        assert (slide.levels[1].width, slide.levels[1].height) == (512, 512)
        level1 = wsi.read_level_region(slide, 1, 0, 0, 512, 512)
    result = model(image_tensor(level1), input_scale=1)
    inst = result["inst_map"].cpu().numpy()
    assert len(rows) == len(result["classes"]) > 0
    n = len(rows) + 1
    rr, cc = np.indices(inst.shape)
    area = np.bincount(inst.ravel(), minlength=n)
    cx = np.bincount(inst.ravel(), cc.ravel(), minlength=n) / np.maximum(area, 1)
    cy = np.bincount(inst.ravel(), rr.ravel(), minlength=n) / np.maximum(area, 1)
    got = np.array([[float(r["centroid_x"]), float(r["centroid_y"]), float(r["area"])] for r in rows])
    np.testing.assert_allclose(got[:, 0], 2 * cx[1:] + 0.5, atol=0.01)
    np.testing.assert_allclose(got[:, 1], 2 * cy[1:] + 0.5, atol=0.01)
    np.testing.assert_allclose(got[:, 2], 4 * area[1:])
    outlines = instance_polygons(inst)
    for feature, row in zip(features, rows):
        level1_outline = outlines[int(row["id"])]
        polygon = shape(feature["geometry"])  # level-0 px + 0.5 (pixel corners at integers)
        assert polygon.area == pytest.approx(4 * level1_outline.area, rel=1e-3)
        bx0, by0, bx1, by1 = level1_outline.bounds  # pixel edges at half-integers
        np.testing.assert_allclose(polygon.bounds, [2 * bx0 + 1, 2 * by0 + 1, 2 * bx1 + 1, 2 * by1 + 1], atol=0.02)
    overlay = np.asarray(Image.open(out / "small_overlay.png"))
    assert overlay.shape == (512, 512, 3)  # thumbnail of the level read (<= 2048 px)


def test_slide_coarser_than_asked_is_enlarged_for_the_model(small_slide_file, model_file, model, tmp_path):
    """``--slide#mpp 0.125`` on a 0.25 µm/px slide: level 0 is read and each tile enlarged 2x for the model (what a
    40x model needs on a 20x slide); with one tile covering the slide, the same nuclei as the network called with
    ``input_scale=2``, in level-0 px."""
    out = tmp_path / "out"
    log = run_bundle("inference", "configs/inference.json", "--input_file", str(small_slide_file), "--output_dir",
                     str(out), "--model_path", str(model_file), *THREADS, "--slide#mpp", "0.125",
                     "--slide#tile_size", "1024", timeout=600)
    assert "enlarged x2.00" in log.stdout
    rows, _ = check_table_and_geojson(out / "small.csv", out / "small.geojson", (1024, 1024))
    with wsi.open_slide(small_slide_file) as slide:
        level0 = wsi.read_level_region(slide, 0, 0, 0, 1024, 1024)
    result = model(image_tensor(level0), input_scale=2.0)
    assert len(rows) == len(result["classes"]) > 0
    got = sorted((round(float(r["centroid_x"])), round(float(r["centroid_y"]))) for r in rows)
    inst = result["inst_map"].cpu().numpy()
    n = len(rows) + 1
    rr, cc = np.indices(inst.shape)
    area = np.bincount(inst.ravel(), minlength=n)
    expected = sorted(zip(np.round(np.bincount(inst.ravel(), cc.ravel(), minlength=n)[1:] / area[1:]).astype(int),
                          np.round(np.bincount(inst.ravel(), rr.ravel(), minlength=n)[1:] / area[1:]).astype(int)))
    assert got == [tuple(map(int, e)) for e in expected]


# ------------------------------------------------------------------------------------------------ trained model
@pytest.mark.slow
def test_trained_model_nuclei_lie_in_tissue_and_glass_has_none(trained_model_path, slide_file, tmp_path):
    """With a model that finds nuclei: every slide nucleus is centred on tissue, and a blank tile gives none."""
    model = load_model(trained_model_path, "cpu")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(blank)
    summary = run_inference(model, str(tmp_path / "blank_out"), input_file=str(blank))
    assert summary.nuclei[str(blank)] == 0
    out = tmp_path / "out"
    options = SlideOptions(tile_size=512, tile_overlap=64, thumbnail_size=512)
    run_inference(model, str(out), input_file=str(slide_file), slide_options=options)
    rows, _ = check_table_and_geojson(out / "mosaic.csv", out / "mosaic.geojson", (SLIDE, SLIDE))
    xs = np.array([float(r["centroid_x"]) for r in rows]).round().astype(int)
    ys = np.array([float(r["centroid_y"]) for r in rows]).round().astype(int)
    assert tissue_layout()[ys, xs].all()
    assert len(rows) >= 0.5 * 40 * len(TISSUE_BLOCKS)  # most of the ~40 nuclei per block are found
