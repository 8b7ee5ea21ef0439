"""Per-nucleus measurements, outline polygons and the output writers (TIFF, GeoJSON, CSV, overlay PNG)."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import tifffile
from PIL import Image
from shapely.geometry import Point, shape
from skimage.color import rgb2hed

from scripts.io.measurements import TABLE_COLUMNS, instance_polygons, nucleus_table
from scripts.data.records import load_class_table
from scripts.io.atomic import atomic_open, atomic_path
from scripts.io.writers import (
    CSVWriter,
    GeoJSONWriter,
    overlay_image,
    write_csv,
    write_geojson,
    write_label_maps,
    write_overlay,
)

CLASS_TABLE = load_class_table()


@pytest.fixture()
def scene() -> tuple[np.ndarray, np.ndarray]:
    """inst_map with a 10x10 square (id 3), a 5x30 wide bar (id 8), an ellipse (id 12); image in H&E-like colours."""
    inst = np.zeros((80, 100), np.int32)
    inst[5:15, 20:30] = 3  # rows 5..14, cols 20..29
    inst[30:35, 10:40] = 8  # 5 rows x 30 cols: wide, not tall
    yy, xx = np.mgrid[:80, :100]
    inst[((yy - 55) / 20.0) ** 2 + ((xx - 75) / 10.0) ** 2 <= 1] = 12  # semi-axes 20 (rows) and 10 (cols)
    rng = np.random.default_rng(0)
    image = np.full((80, 100, 3), (235, 200, 220), np.uint8)
    image[inst > 0] = (90, 50, 140)
    image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return inst, image


def _rows(table: list[dict]) -> dict[int, dict]:
    return {r["id"]: r for r in table}


def test_table_square_and_ellipse(scene):
    inst, image = scene
    rows = _rows(nucleus_table(inst, image, classes={3: 2, 12: 3}, class_scores={3: 0.9}, iou_preds={12: 0.8}))
    assert list(rows) == [3, 8, 12]
    sq = rows[3]
    assert sq["area"] == 100 and sq["solidity"] == pytest.approx(1.0)
    assert (sq["centroid_x"], sq["centroid_y"]) == pytest.approx((24.5, 9.5))  # x = col, y = row
    assert abs(sq["perimeter"] - 40) <= 4
    assert sq["eccentricity"] == pytest.approx(0.0, abs=1e-6)
    assert (sq["class"], sq["class_name"], sq["class_score"]) == (2, CLASS_TABLE[2]["name"], 0.9)
    assert math.isnan(sq["pred_iou"])
    ell = rows[12]
    assert ell["eccentricity"] == pytest.approx(math.sqrt(1 - (10 / 20) ** 2), abs=0.02)
    assert ell["pred_iou"] == 0.8 and ell["class_name"] == CLASS_TABLE[3]["name"]
    assert rows[8]["class"] == 0 and rows[8]["class_name"] is None  # unclassified
    hema = rgb2hed(image)[..., 0]
    assert rows[8]["hematoxylin_mean"] == pytest.approx(hema[inst == 8].mean())
    assert set(sq) == set(TABLE_COLUMNS)


def test_table_offset_no_image_and_errors(scene):
    inst, _ = scene
    rows = _rows(nucleus_table(inst, offset_xy=(1000, 2000)))
    assert (rows[3]["centroid_x"], rows[3]["centroid_y"]) == pytest.approx((1024.5, 2009.5))
    assert math.isnan(rows[3]["hematoxylin_mean"])
    with pytest.raises(ValueError, match="class 9"):
        nucleus_table(inst, classes={3: 9})
    assert nucleus_table(np.zeros((8, 8), np.int32)) == []


def test_polygons_valid_xy_order_and_area(scene):
    inst, _ = scene
    exact = instance_polygons(inst, simplify_tolerance=0)
    simple = instance_polygons(inst)
    for nid in (3, 8, 12):
        n_px = int((inst == nid).sum())
        assert exact[nid].is_valid and simple[nid].is_valid
        assert exact[nid].area == pytest.approx(n_px, abs=1.0)
        assert simple[nid].area == pytest.approx(n_px, rel=0.05)
    # the 5-row x 30-col bar is wide in x: bounds are (minx, miny, maxx, maxy) on pixel edges
    assert exact[8].bounds == pytest.approx((9.5, 29.5, 39.5, 34.5))
    shifted = instance_polygons(inst, offset_xy=(100, 7), simplify_tolerance=0)
    assert shifted[8].bounds == pytest.approx((109.5, 36.5, 139.5, 41.5))
    rows = _rows(nucleus_table(inst))
    for nid, poly in simple.items():
        assert poly.contains(Point(rows[nid]["centroid_x"], rows[nid]["centroid_y"]))


def test_polygons_split_tiny_and_diagonal():
    inst = np.zeros((30, 30), np.int32)
    inst[2:10, 2:10] = 1
    inst[20:22, 20:22] = 1  # a second, smaller part of nucleus 1
    inst[15, 5] = 2  # one pixel
    inst[25, 2], inst[26, 3] = 3, 3  # two pixels touching by a corner
    polys = instance_polygons(inst)
    assert polys.keys() == {1, 2, 3}
    assert all(p.is_valid and p.geom_type == "Polygon" for p in polys.values())
    assert polys[1].area == pytest.approx(64, rel=0.05) and polys[1].bounds[0] < 5  # largest part kept
    assert polys[2].contains(Point(5, 15))


def test_label_maps_roundtrip(tmp_path, scene):
    inst, _ = scene
    type_map = np.where(inst == 3, 2, np.where(inst > 0, 1, 0)).astype(np.int32)
    paths = write_label_maps(tmp_path, "tile", inst, type_map)
    assert paths["inst"].name == "tile_inst.tif" and paths["type"].name == "tile_type.tif"
    back = tifffile.imread(paths["inst"])
    assert back.dtype == np.int32 and np.array_equal(back, inst)
    back_t = tifffile.imread(paths["type"])
    assert back_t.dtype == np.uint8 and np.array_equal(back_t, type_map)
    with pytest.raises(ValueError, match="0..255"):
        write_label_maps(tmp_path, "bad", inst, type_map * 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile_inst.tif", "tile_type.tif"]  # no temp files left


def test_geojson_qupath_detections(tmp_path, scene):
    inst, image = scene
    table = nucleus_table(inst, image, classes={3: 2, 12: 4}, class_scores={3: 0.9, 12: 0.7})
    polygons = instance_polygons(inst)
    path = write_geojson(tmp_path / "tile.geojson", polygons, table, CLASS_TABLE)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    by_id = {f["properties"]["measurements"]["Nucleus id"]: f for f in data["features"]}
    for nid, feature in by_id.items():
        geom = shape(feature["geometry"])
        assert feature["geometry"]["type"] == "Polygon" and geom.is_valid
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and all(isinstance(v, float) for pt in ring for v in pt)
        assert feature["properties"]["objectType"] == "detection"
        assert geom.area == pytest.approx(polygons[nid].area, abs=0.1)
        assert all(isinstance(v, (int, float)) for v in feature["properties"]["measurements"].values())
    expected = {"name": CLASS_TABLE[2]["name"], "color": CLASS_TABLE[2]["color"]}
    assert by_id[3]["properties"]["classification"] == expected
    assert by_id[12]["properties"]["classification"]["color"] == CLASS_TABLE[4]["color"]
    assert "classification" not in by_id[8]["properties"]  # unclassified
    assert "Predicted IoU" not in by_id[3]["properties"]["measurements"]  # NaN left out
    assert by_id[3]["properties"]["measurements"]["Class score"] == 0.9
    # QuPath puts integer coordinates on pixel corners: +0.5 against our pixel-centre convention
    assert shape(by_id[8]["geometry"]).bounds[0] == pytest.approx(polygons[8].bounds[0] + 0.5, abs=0.01)


def test_streaming_writers(tmp_path, scene):
    inst, _ = scene
    table, polygons = nucleus_table(inst), instance_polygons(inst)
    with GeoJSONWriter(tmp_path / "s.geojson", CLASS_TABLE) as gw, CSVWriter(tmp_path / "s.csv") as cw:
        for part in (table[:1], table[1:], []):  # batches, e.g. one per tile
            gw.add(polygons, part)
            cw.add(part)
    assert gw.count == cw.count == 3
    assert len(json.loads((tmp_path / "s.geojson").read_text())["features"]) == 3
    with pytest.raises(KeyError, match="no polygon"):
        with GeoJSONWriter(tmp_path / "fail.geojson", CLASS_TABLE) as gw:
            gw.add({}, table)
    assert not (tmp_path / "fail.geojson").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.geojson"]


def test_csv_rows_and_columns(tmp_path, scene):
    inst, image = scene
    table = nucleus_table(inst, image, classes={3: 1})
    path = write_csv(tmp_path / "tile.csv", table)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == TABLE_COLUMNS and len(rows) == 3
    assert rows[0]["class_name"] == CLASS_TABLE[1]["name"] and float(rows[0]["centroid_x"]) == pytest.approx(24.5)
    assert rows[1]["class"] == "0" and rows[1]["class_name"] == "" and rows[1]["class_score"] == ""


def test_overlay_colours_and_thumbnail(tmp_path, scene):
    inst, image = scene
    classes = {3: 2, 12: 3}
    path = write_overlay(tmp_path / "tile.png", image, inst, classes, CLASS_TABLE)
    out = np.asarray(Image.open(path).convert("RGB"))
    assert out.shape == image.shape
    assert out[5, 25].tolist() == CLASS_TABLE[2]["color"]  # top edge of the square
    assert out[55, 65].tolist() == CLASS_TABLE[3]["color"]  # left tip of the ellipse
    assert out[32, 10].tolist() == [255, 255, 0]  # unclassified bar: default colour
    assert np.array_equal(out[10, 25], image[10, 25]) and np.array_equal(out[70, 5], image[70, 5])
    type_map = np.zeros_like(inst)
    for nid, cls in classes.items():
        type_map[inst == nid] = cls
    out_t = np.asarray(Image.open(write_overlay(tmp_path / "t.png", image, inst, type_map, CLASS_TABLE)))
    assert out_t[5, 25].tolist() == CLASS_TABLE[2]["color"]
    thumb = np.asarray(Image.open(write_overlay(tmp_path / "s.png", image, inst, classes, CLASS_TABLE, max_size=50)))
    assert thumb.shape == (40, 50, 3)
    assert (thumb.reshape(-1, 3) == CLASS_TABLE[3]["color"]).all(axis=1).any()
    with pytest.raises(ValueError, match="bad.png: class ids"):
        write_overlay(tmp_path / "bad.png", image, inst, {3: 7}, CLASS_TABLE)
    assert not (tmp_path / "bad.png").exists()


def test_overlay_image_is_the_png_drawn_in_memory(tmp_path, scene):
    inst, image = scene
    drawn = overlay_image(image, inst, {3: 2, 12: 3}, CLASS_TABLE)
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape and drawn is not image
    written = np.asarray(Image.open(write_overlay(tmp_path / "o.png", image, inst, {3: 2, 12: 3}, CLASS_TABLE)))
    assert np.array_equal(drawn, written)
    assert overlay_image(image, inst, None, CLASS_TABLE, max_size=50).shape == (40, 50, 3)
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay_image(image.astype(np.float32), inst, None, CLASS_TABLE)


def test_atomic_writes_replace_whole_files_or_nothing(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_open(target, "w", fsync=True) as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["a.json"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # replaced only when the block ends
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_model_without_classes_writes_every_nucleus_unclassified(tmp_path):
    """An untyped model's class table is empty: its class ids (all 1) are no class, not the bundle's "Other"."""
    from scripts.io.measurements import instance_polygons, nucleus_table
    from scripts.io.writers import UNCLASSIFIED_COLOR, write_geojson, write_overlay

    inst = np.zeros((20, 20), np.int32)
    inst[2:8, 2:8], inst[10:16, 10:16] = 1, 2
    table = nucleus_table(inst, classes={1: 1, 2: 1}, class_table={})
    assert [row["class"] for row in table] == [0, 0] and [row["class_name"] for row in table] == [None, None]
    features = json.loads(write_geojson(tmp_path / "a.geojson", instance_polygons(inst), table, {}).read_text())
    assert all("classification" not in f["properties"] for f in features["features"])
    image = np.full((20, 20, 3), 200, np.uint8)
    overlay = np.asarray(Image.open(write_overlay(tmp_path / "a.png", image, inst, (inst > 0).astype(np.int32), {})))
    assert (overlay[2, 2] == UNCLASSIFIED_COLOR).all()
    with pytest.raises(ValueError, match="class 1 is not in the class table"):
        nucleus_table(inst, classes={1: 1, 2: 1}, class_table={2: {"name": "x", "color": [1, 2, 3]}})
