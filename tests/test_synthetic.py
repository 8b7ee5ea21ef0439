"""Synthetic H&E nucleus generator: determinism, sizes, overlaps, classes, appearance, written layouts."""

import warnings

import numpy as np
import pytest
import scipy.io
from scipy import ndimage
from skimage.measure import regionprops

from scripts.data.readers.monuseg import rasterise_polygons
from scripts.data.synthetic import generate, instance_table, make_synthetic_record, write_synthetic_dataset


def _touching_pairs(inst_map: np.ndarray) -> int:
    """Number of 4-neighbour pixel pairs that belong to two different nuclei."""
    pairs = 0
    for a, b in ((inst_map[1:], inst_map[:-1]), (inst_map[:, 1:], inst_map[:, :-1])):
        pairs += int(np.count_nonzero((a > 0) & (b > 0) & (a != b)))
    return pairs


def test_deterministic_given_seed():
    first, second = make_synthetic_record(seed=3), make_synthetic_record(seed=3)
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.inst_map, second.inst_map)
    assert np.array_equal(first.type_map, second.type_map)
    assert not np.array_equal(first.image, make_synthetic_record(seed=4).image)


@pytest.mark.parametrize("size", [(256, 256), (100, 300), (512, 384)])
def test_sizes_and_dtypes(size):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every requested nucleus fits
        record = make_synthetic_record(size=size, n_nuclei=30)
    assert record.image.shape == (*size, 3) and record.image.dtype == np.uint8
    assert record.inst_map.shape == size and record.inst_map.dtype == np.int32
    assert record.type_map.shape == size and record.type_map.dtype == np.int32
    assert np.array_equal(np.unique(record.inst_map), np.arange(31))  # background + ids 1..30


def test_crowded_small_image_warns_and_keeps_what_fits():
    with pytest.warns(UserWarning, match="of 45 nuclei fit"):
        record = make_synthetic_record(size=(40, 30), n_nuclei=45)
    assert record.image.shape == (40, 30, 3)
    assert 1 <= record.inst_map.max() < 45
    assert np.bincount(record.inst_map.ravel())[1:].min() >= 20


def test_overlapping_nuclei_keep_area_and_stay_connected():
    record, outlines = generate(n_nuclei=40, seed=1)
    inst_map = record.inst_map
    assert inst_map.max() == 40
    assert _touching_pairs(inst_map) > 0
    alone = [np.count_nonzero(rasterise_polygons([o], inst_map.shape)) for o in outlines]
    areas = np.bincount(inst_map.ravel())[1:]
    assert np.count_nonzero(areas < np.array(alone)) >= 3  # several nuclei partly covered by later ones
    assert areas.min() >= 20
    for instance_id in range(1, inst_map.max() + 1):
        assert ndimage.label(inst_map == instance_id)[1] == 1


def test_outlines_reproduce_the_instance_map():
    record, outlines = generate(n_nuclei=35, seed=2)
    assert np.array_equal(rasterise_polygons(outlines, record.inst_map.shape), record.inst_map)


def test_no_overlap_option_keeps_nuclei_apart():
    record = make_synthetic_record(n_nuclei=25, overlap=False, seed=5)
    assert record.inst_map.max() == 25
    assert _touching_pairs(record.inst_map) == 0


@pytest.mark.parametrize("num_classes", [1, 3, 5])
def test_classes_present_and_one_per_nucleus(num_classes):
    record = make_synthetic_record(n_nuclei=30, num_classes=num_classes, seed=7)
    assert set(np.unique(record.type_map)) == set(range(num_classes + 1))
    assert np.array_equal(record.type_map > 0, record.inst_map > 0)
    for instance_id in range(1, record.inst_map.max() + 1):
        assert len(np.unique(record.type_map[record.inst_map == instance_id])) == 1


def test_untyped_record():
    assert make_synthetic_record(num_classes=0).type_map is None


def test_classes_differ_in_appearance_and_size():
    record = make_synthetic_record(size=(512, 512), n_nuclei=90, num_classes=3, seed=11)
    gray = record.image.mean(axis=2)
    stats = {1: [], 2: [], 3: []}
    for region in regionprops(record.inst_map, intensity_image=gray):
        cls = int(record.type_map[tuple(region.coords[0])])
        stats[cls].append((region.intensity_mean, region.axis_major_length, region.axis_minor_length))
    mean = {cls: np.median(np.array(values), axis=0) for cls, values in stats.items()}
    assert mean[2][0] < mean[3][0] < mean[1][0]  # small dark < spindle < pale
    assert mean[2][1] < mean[1][1]  # class 2 smaller than class 1
    assert mean[3][1] / mean[3][2] > 2.0 > mean[1][1] / mean[1][2]  # spindles elongated, class 1 round
    background = gray[record.inst_map == 0].mean()
    assert max(m[0] for m in mean.values()) < background  # nuclei darker than stroma
    lengths = np.array([v[1] for values in stats.values() for v in values])
    assert 7 <= np.percentile(lengths, 5) and np.percentile(lengths, 95) <= 32  # diameters ~8-30 px


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_record(num_classes=6)
    with pytest.raises(ValueError, match="size"):
        make_synthetic_record(size=(0, 10))
    with pytest.raises(ValueError, match="dataset_format"):
        write_synthetic_dataset("unused", 1, dataset_format="coco")


def test_instance_table_centroids_are_x_y():
    inst_map = np.zeros((10, 20), dtype=np.int32)
    inst_map[2:4, 10:16] = 1  # rows 2-3, cols 10-15
    type_map = (inst_map > 0).astype(np.int32) * 3
    centroids, classes = instance_table(inst_map, type_map)
    assert np.allclose(centroids, [[12.5, 2.5]]) and classes.tolist() == [[3]]


def test_write_hovernet_layout(tmp_path):
    out = write_synthetic_dataset(tmp_path / "hv", 2, size=(64, 96), n_nuclei=(4, 6), seed=1)
    assert sorted(p.name for p in (out / "Images").iterdir()) == ["synthetic_000.png", "synthetic_001.png"]
    mat = scipy.io.loadmat(out / "Labels" / "synthetic_000.mat")
    n = int(mat["inst_map"].max())
    assert 4 <= n <= 6
    assert mat["inst_type"].shape == (n, 1) and mat["inst_centroid"].shape == (n, 2)
    assert mat["type_map"].shape == (64, 96)
    x, y = mat["inst_centroid"][0]
    rows, cols = np.nonzero(mat["inst_map"] == 1)
    assert np.isclose(x, cols.mean()) and np.isclose(y, rows.mean())


def test_write_other_layouts(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "f", 1, size=(32, 32), n_nuclei=2, dataset_format="folder")
    assert {p.name for p in (folder / "labels").iterdir()} == {"synthetic_000.npy", "synthetic_000_type.npy"}
    pannuke = write_synthetic_dataset(tmp_path / "p", 3, size=(32, 32), n_nuclei=2, num_classes=5,
                                      dataset_format="pannuke")
    masks = np.load(pannuke / "Fold 1" / "masks" / "fold1" / "masks.npy")
    assert masks.shape == (3, 32, 32, 6)
    assert np.load(pannuke / "Fold 1" / "images" / "fold1" / "types.npy").shape == (3,)
    with pytest.raises(ValueError, match="num_classes"):
        write_synthetic_dataset(tmp_path / "q", 1, size=(32, 32), n_nuclei=2, num_classes=0, dataset_format="pannuke")
