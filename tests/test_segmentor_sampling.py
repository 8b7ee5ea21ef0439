"""Mask2Prompt sampling: positives inside their nucleus, negatives = K nearest other nuclei, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from scripts.segmentor.prompts import (
    SampleNucleusPromptsd,
    interior_points,
    knn_negative_prompts,
    oracle_prompts,
    random_interior_points,
)


def _blobs(n: int, size: int = 128, rmax: float = 7.0, seed: int = 0) -> np.ndarray:
    """Random overlapping disks (later ones paint over earlier ones, so nuclei touch); ids 1..n, not contiguous."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    for i in range(n):
        r, c, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, rmax)
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] = 3 * i + 5
    return inst


def _brute_knn(points: np.ndarray, k: int) -> list[list[int]]:
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return [list(np.argsort(row, kind="stable")[: min(k, len(points) - 1)]) for row in d]


def test_knn_negative_prompts_brute_force() -> None:
    rng = np.random.RandomState(1)
    pts = rng.uniform(0, 100, (30, 2))
    coords, labels = knn_negative_prompts(pts, 3)
    assert coords.shape == (30, 4, 2) and labels.shape == (30, 4)
    assert (labels[:, 0] == 1).all() and (labels[:, 1:] == 0).all()
    np.testing.assert_allclose(coords[:, 0], pts, rtol=1e-6)
    for i, nn_idx in enumerate(_brute_knn(pts, 3)):
        np.testing.assert_allclose(coords[i, 1:], pts[nn_idx], rtol=1e-6)


def test_knn_padding_duplicates_and_empty() -> None:
    coords, labels = knn_negative_prompts(np.array([[1.0, 2.0], [5.0, 2.0]]), 3)
    np.testing.assert_array_equal(labels, [[1, 0, -1, -1], [1, 0, -1, -1]])
    np.testing.assert_array_equal(coords[0, 1], [5, 2])
    assert (coords[:, 2:] == 0).all()
    coords, labels = knn_negative_prompts(np.array([[3.0, 3.0], [3.0, 3.0], [9.0, 3.0]]), 1)
    np.testing.assert_array_equal(coords[:2, 1], [[3, 3], [3, 3]])  # each twin's negative is the other twin
    assert (labels[:, 1] == 0).all()
    coords, labels = knn_negative_prompts(np.zeros((0, 2)), 2)
    assert coords.shape == (0, 3, 2) and labels.shape == (0, 3)
    coords, labels = knn_negative_prompts(np.ones((4, 2)), 0)
    assert coords.shape == (4, 1, 2) and (labels == 1).all()


def test_positives_inside_and_uniform() -> None:
    inst = _blobs(40)
    t = SampleNucleusPromptsd("inst", num_prompts=15, num_neg=2)
    t.set_random_state(3)
    out = t({"inst": inst[None]})
    assert out["prompt_valid"].all()
    xy = out["prompt_coords"][:, 0].numpy().astype(int)
    ids = out["prompt_ids"].numpy()
    np.testing.assert_array_equal(inst[xy[:, 1], xy[:, 0]], ids)
    assert len(set(ids)) == 15
    np.testing.assert_array_equal(out["prompt_masks"].numpy(), inst[None] == ids[:, None, None])
    # uniform: a 3x3 nucleus is hit evenly over many draws
    small = np.zeros((16, 16), np.int32)
    small[4:7, 4:7] = 1
    rng = np.random.RandomState(0)
    hits = np.zeros((16, 16), int)
    for _ in range(900):
        p, _ = random_interior_points(small, rng)
        hits[int(p[0, 1]), int(p[0, 0])] += 1
    assert hits.sum() == 900 and hits[4:7, 4:7].min() > 60 and hits[4:7, 4:7].max() < 140


def test_negatives_are_k_nearest_single_pixel_nuclei() -> None:
    """Single-pixel nuclei make every sampled point known: the negatives must be a brute-force k-NN."""
    rng = np.random.RandomState(5)
    flat = rng.choice(64 * 64, 50, replace=False)
    inst = np.zeros(64 * 64, np.int32)
    inst[flat] = np.arange(1, 51) * 7
    inst = inst.reshape(64, 64)
    rows, cols = np.unravel_index(flat, (64, 64))
    pts = np.stack([cols, rows], 1).astype(float)
    near = _brute_knn(pts, 3)
    t = SampleNucleusPromptsd("inst", num_prompts=20, num_neg=3)
    t.set_random_state(0)
    out = t({"inst": inst[None]})
    for z in range(20):
        i = int(np.flatnonzero(inst.ravel()[flat] == int(out["prompt_ids"][z]))[0])
        np.testing.assert_array_equal(out["prompt_coords"][z, 0].numpy(), pts[i])
        neg = out["prompt_coords"][z, 1:].numpy()
        got = np.sqrt(((neg - pts[i]) ** 2).sum(-1))
        want = np.sqrt(((pts[near[i]] - pts[i]) ** 2).sum(-1))
        np.testing.assert_allclose(got, want)  # same distances, in order (ties may swap equidistant points)
        others = {tuple(p) for j, p in enumerate(pts) if j != i}
        assert all(tuple(p) in others for p in neg) and len({tuple(p) for p in neg}) == 3
        assert (out["prompt_labels"][z].numpy() == [1, 0, 0, 0]).all()


def test_negatives_lie_in_nearest_other_nuclei() -> None:
    """Well-separated disks: a negative falls inside another nucleus, one of the K nearest by centre."""
    yy, xx = np.mgrid[:160, :160]
    rng = np.random.RandomState(2)
    centres = np.array([(r, c) for r in range(10, 160, 30) for c in range(10, 160, 30)], float)
    centres += rng.uniform(-8, 8, centres.shape)
    inst = np.zeros((160, 160), np.int32)
    for i, (r, c) in enumerate(centres, 1):
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= 9] = i
    K = 2
    t = SampleNucleusPromptsd("inst", num_prompts=25, num_neg=K)
    t.set_random_state(1)
    out = t({"inst": inst})
    d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    for z in range(25):
        own = int(out["prompt_ids"][z])
        neg = out["prompt_coords"][z, 1:].numpy().astype(int)
        neg_ids = inst[neg[:, 1], neg[:, 0]]
        assert (neg_ids != own).all() and (neg_ids != 0).all() and len(set(neg_ids)) == K
        order = np.argsort(d[own - 1])
        if d[own - 1, order[K]] - d[own - 1, order[K - 1]] > 12:  # ranking cannot flip within the 3 px radius
            assert set(neg_ids) == set(order[:K] + 1)


def test_padding_and_empty_image() -> None:
    inst = np.zeros((32, 32), np.int32)
    inst[2:6, 2:6] = 4
    inst[20:25, 20:25] = 9
    t = SampleNucleusPromptsd("inst", num_prompts=5, num_neg=2)
    t.set_random_state(0)
    out = t({"inst": torch.from_numpy(inst)[None]})
    assert out["prompt_coords"].shape == (5, 3, 2) and out["prompt_labels"].shape == (5, 3)
    assert out["prompt_masks"].shape == (5, 32, 32) and out["prompt_masks"].dtype == torch.bool
    np.testing.assert_array_equal(out["prompt_valid"].numpy(), [True, True, False, False, False])
    np.testing.assert_array_equal(out["prompt_labels"][:2].numpy(), [[1, 0, -1], [1, 0, -1]])
    assert (out["prompt_labels"][2:] == -1).all() and (out["prompt_coords"][2:] == 0).all()
    assert not out["prompt_masks"][2:].any() and (out["prompt_ids"][2:] == 0).all()
    assert sorted(out["prompt_ids"][:2].tolist()) == [4, 9]

    empty = t({"inst": np.zeros((1, 32, 32), np.int32)})
    assert not empty["prompt_valid"].any() and (empty["prompt_labels"] == -1).all()
    assert empty["prompt_masks"].shape == (5, 32, 32) and not empty["prompt_masks"].any()

    batch = list_data_collate([{k: v for k, v in o.items() if k != "inst"} for o in (out, empty)])
    assert batch["prompt_coords"].shape == (2, 5, 3, 2) and batch["prompt_masks"].shape == (2, 5, 32, 32)


def test_determinism_and_metatensor_input() -> None:
    inst = MetaTensor(torch.from_numpy(_blobs(30, seed=4)).float()[None])
    a, b, c = (SampleNucleusPromptsd("inst", num_prompts=10) for _ in range(3))
    a.set_random_state(11)
    b.set_random_state(11)
    c.set_random_state(12)
    oa, ob, oc = a({"inst": inst}), b({"inst": inst}), c({"inst": inst})
    for key in ("prompt_coords", "prompt_labels", "prompt_masks", "prompt_ids"):
        assert torch.equal(oa[key], ob[key])
    assert not torch.equal(oa["prompt_coords"], oc["prompt_coords"])
    with pytest.raises(ValueError, match="non-integer"):
        a({"inst": inst * 0.5})
    with pytest.raises(ValueError, match="'inst'"):
        a({"inst": np.zeros((2, 8, 8), np.int32)})


def test_interior_points_and_oracle() -> None:
    inst = np.zeros((40, 40), np.int32)
    yy, xx = np.mgrid[:40, :40]
    inst[(yy - 10) ** 2 + (xx - 12) ** 2 <= 16] = 2  # disk: centroid (x 12, y 10) inside
    ring = ((yy - 26) ** 2 + (xx - 26) ** 2 <= 81) & ((yy - 26) ** 2 + (xx - 26) ** 2 >= 25)
    inst[ring & (xx < 30)] = 7  # C-shape: its centroid falls in the hole
    points, ids = interior_points(inst)
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_allclose(points[0], [12, 10], atol=1e-5)
    x, y = points[1]
    assert float(x).is_integer() and inst[int(y), int(x)] == 7
    cy, cx = np.argwhere(inst == 7).mean(0)
    assert inst[int(round(cy)), int(round(cx))] != 7
    coords, labels, oids = oracle_prompts(inst, 2)
    assert coords.shape == (2, 3, 2)
    np.testing.assert_array_equal(labels, [[1, 0, -1], [1, 0, -1]])
    np.testing.assert_allclose(coords[0, 1], points[1])
    e_coords, e_labels, e_ids = oracle_prompts(np.zeros((8, 8), np.int32), 1)
    assert e_coords.shape == (0, 2, 2) and e_ids.shape == (0,)
