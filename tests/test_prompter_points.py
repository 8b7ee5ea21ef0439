"""Ground-truth prompt points: inside every nucleus, on odd shapes too; classes from the type map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.data.points import NucleusPointsd, instance_points


pytestmark = pytest.mark.usefixtures("one_thread")


def disk(shape, centre_rc, radius):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre_rc[0]) ** 2 + (cols - centre_rc[1]) ** 2 <= radius**2


def assert_inside(inst: np.ndarray, points: np.ndarray, ids: np.ndarray) -> None:
    for (x, y), nucleus in zip(points, ids):
        row, col = int(round(float(y))), int(round(float(x)))
        assert inst[row, col] == nucleus, f"point {(x, y)} of nucleus {nucleus} lies on {inst[row, col]}"


def test_convex_nuclei_get_their_centroid():
    inst = np.zeros((40, 50), np.int32)
    inst[disk(inst.shape, (10, 12), 4)] = 7
    inst[5:9, 30:40] = 3  # rectangle: centroid (6.5, 34.5)
    points, classes, ids = instance_points(inst)
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(points, [[34.5, 6.5], [12.0, 10.0]])  # (x, y)
    assert points.dtype == np.float32 and classes.tolist() == [0, 0]


def test_odd_shapes_get_interior_points():
    shape = (64, 64)
    inst = np.zeros(shape, np.int32)
    ring = disk(shape, (16, 16), 10) & ~disk(shape, (16, 16), 5)
    inst[ring] = 1
    c_shape = disk(shape, (16, 48), 10) & ~disk(shape, (16, 48), 5)
    c_shape[12:21, 48:] = False  # open to the right: a C
    inst[c_shape] = 2
    crescent = disk(shape, (48, 16), 10) & ~disk(shape, (48, 21), 9)
    inst[crescent] = 3
    inst[(30, 40)] = 4  # one pixel
    inst[55:60, 40:44] = 5  # two pieces of one id, centroid in the gap
    inst[55:60, 56:60] = 5
    points, _, ids = instance_points(inst)
    assert ids.tolist() == [1, 2, 3, 4, 5]
    assert_inside(inst, points, ids)
    for nucleus in (1, 2, 5):  # centroid off the nucleus: the fallback is the pixel deepest inside it
        x, y = points[nucleus - 1]
        depth = ndimage.distance_transform_edt(np.pad(inst == nucleus, 1))[1:-1, 1:-1]
        assert depth[int(y), int(x)] == depth.max()
    assert points[3].tolist() == [40.0, 30.0]
    # the centroid of the ring is its (empty) centre: the point must be on the ring, ~7.5 px away
    assert 6 <= np.hypot(points[0, 0] - 16, points[0, 1] - 16) <= 9


def test_classes_from_majority_type_and_non_contiguous_ids():
    inst = np.zeros((20, 20), np.int64)
    types = np.zeros_like(inst)
    inst[2:6, 2:6] = 1000
    types[2:6, 2:6] = 3
    types[2, 2:5] = 1  # minority
    inst[10:14, 10:14] = 17
    types[10:14, 10:14] = 2
    types[10:14, 10] = 0  # untyped pixels do not vote
    inst[16:18, 2:4] = 5  # nucleus without any typed pixel
    points, classes, ids = instance_points(inst, types)
    assert ids.tolist() == [5, 17, 1000]
    assert classes.tolist() == [0, 1, 2]  # type ids 1..C -> class indices 0..C-1; untyped -> untyped_class
    assert instance_points(inst, types, untyped_class=4)[1].tolist() == [4, 1, 2]
    assert instance_points(inst)[1].tolist() == [0, 0, 0]


def test_edge_cases():
    points, classes, ids = instance_points(np.zeros((8, 8), np.int32))
    assert points.shape == (0, 2) and classes.shape == ids.shape == (0,)
    points, _, ids = instance_points(np.full((5, 7), 9))  # no background at all
    assert ids.tolist() == [9] and points.tolist() == [[3.0, 2.0]]
    with pytest.raises(ValueError, match="type_map"):
        instance_points(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="inst_map"):
        instance_points(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="negative"):
        instance_points(-np.ones((4, 4)))


def test_many_nuclei_stay_fast():
    """Vectorised path: 1024 rings (every centroid off the nucleus) on a 512 x 512 map."""
    import time

    ring = (disk((16, 16), (7.5, 7.5), 7) & ~disk((16, 16), (7.5, 7.5), 3)).astype(np.int32)
    inst = np.kron(np.arange(1, 1025).reshape(32, 32), np.ones((16, 16), np.int32)) * np.tile(ring, (32, 32))
    start = time.perf_counter()
    points, _, ids = instance_points(inst)
    assert time.perf_counter() - start < 5.0
    assert len(ids) == 1024
    assert_inside(inst, points, ids)


def test_map_transform_on_channel_first_tensors():
    inst = torch.zeros(1, 16, 16, dtype=torch.int32)
    types = torch.zeros_like(inst)
    inst[0, 2:5, 2:5] = 4
    types[0, 2:5, 2:5] = 2
    data = {"image": torch.rand(3, 16, 16), "inst": inst, "type": types}
    out = NucleusPointsd(keys=("inst", "type"), ids_key="point_ids")(data)
    assert out["points"].dtype == torch.float32 and out["points"].tolist() == [[3.0, 3.0]]
    assert out["point_classes"].dtype == torch.int64 and out["point_classes"].tolist() == [1]
    assert out["point_ids"].tolist() == [4]
    out = NucleusPointsd(keys=("inst", "type"))({"inst": inst})  # single-class data: no type map
    assert out["point_classes"].tolist() == [0]
    with pytest.raises(KeyError, match="type"):
        NucleusPointsd(keys=("inst", "type"), allow_missing_keys=False)({"inst": inst})
    with pytest.raises(KeyError, match="inst"):
        NucleusPointsd()({"type": types})
