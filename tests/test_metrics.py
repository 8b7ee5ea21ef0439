"""Metrics: hand-computed cases, edge cases, a naive reference implementation, MONAI cross-check, engine handlers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from scripts.evaluation.detection import DetectionCounts, detection_counts, pair_coordinates
from scripts.evaluation.metrics import (
    aggregated_jaccard_index,
    aggregated_jaccard_index_plus,
    instance_centroids,
    instance_classes,
    panoptic_quality,
)
from scripts.evaluation.scores import score_image, tissue_mean
from scripts.evaluation.handlers import (
    NucleusDetectionMetric,
    NucleusMetric,
    NucleusMetricHandler,
    instance_output_transform,
)


# ----------------------------------------------------------------------------------------------- hand-made maps
def two_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """GT: id 1 = 2x2 (4 px), id 5 = 3x3 (9 px). Pred: id 7 = 2x3 over id 1 (IoU 4/6), id 2 = 3x2 in id 5
    (IoU 6/9), id 9 = one stray pixel."""
    true = np.zeros((6, 6), np.int32)
    true[0:2, 0:2] = 1
    true[3:6, 3:6] = 5
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:3] = 7
    pred[3:6, 3:5] = 2
    pred[5, 0] = 9
    return true, pred


def merged_strip() -> tuple[np.ndarray, np.ndarray]:
    """GT: id 1 = 5 px, id 2 = 3 px side by side on one row; Pred: one id 4 covering both (8 px)."""
    true = np.array([[1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
    pred = np.full((1, 8), 4, np.int32)
    return true, pred


def test_pq_hand_computed() -> None:
    true, pred = two_nuclei()
    r = panoptic_quality(true, pred)
    # pairs (1, 7) IoU 4/6 and (5, 2) IoU 6/9; id 9 is a FP. DQ = 2 / (2 + 0.5) ; SQ = (2/3 + 2/3) / 2
    assert (r.tp, r.fp, r.fn) == (2, 1, 0)
    assert r.dq == pytest.approx(0.8)
    assert r.sq == pytest.approx(2 / 3)
    assert r.pq == pytest.approx(0.8 * 2 / 3)


def test_pq_threshold_is_strict_and_hungarian_below_half() -> None:
    true = np.zeros((1, 4), np.int32)
    true[0, :] = 1
    pred = np.array([[3, 3, 0, 0]], np.int32)  # IoU exactly 2/4 = 0.5: not a match
    r = panoptic_quality(true, pred)
    assert (r.tp, r.fp, r.fn, r.pq, r.dq, r.sq) == (0, 1, 1, 0.0, 0.0, None)
    r = panoptic_quality(true, pred, match_iou=0.3)  # Hungarian branch, IoU 0.5 > 0.3
    assert (r.tp, r.fp, r.fn) == (1, 0, 0)
    assert r.pq == pytest.approx(0.5)


def test_aji_and_aji_plus_hand_computed() -> None:
    true, pred = two_nuclei()
    # both AJIs pair (1, 7) and (5, 2): inter 4 + 6, union 6 + 9 + stray pixel 1
    assert aggregated_jaccard_index(true, pred) == pytest.approx(10 / 16)
    assert aggregated_jaccard_index_plus(true, pred) == pytest.approx(10 / 16)
    true, pred = merged_strip()
    # AJI: both truths take pred 4: inter 5 + 3, union 8 + 8
    assert aggregated_jaccard_index(true, pred) == pytest.approx(8 / 16)
    # AJI+: one-to-one, truth 1 (IoU 5/8) takes pred 4; truth 2 unpaired adds 3 to the union
    assert aggregated_jaccard_index_plus(true, pred) == pytest.approx(5 / 11)
    r = panoptic_quality(true, pred)  # IoU(1, 4) = 0.625 > 0.5
    assert (r.tp, r.fp, r.fn) == (1, 0, 1)
    assert r.pq == pytest.approx((1 / 1.5) * 0.625)


def test_aji_unpaired_prediction_counts_once() -> None:
    true = np.array([[1, 1, 0, 0, 0]], np.int32)
    pred = np.array([[2, 0, 0, 3, 3]], np.int32)  # 2 overlaps truth 1 (IoU 1/2); 3 overlaps nothing
    assert aggregated_jaccard_index(true, pred) == pytest.approx(1 / (2 + 2))
    assert aggregated_jaccard_index_plus(true, pred) == pytest.approx(1 / (2 + 2))


def test_non_contiguous_ids_give_same_results() -> None:
    true, pred = merged_strip()
    t2 = np.where(true == 1, 1000, np.where(true == 2, 7, 0))
    p2 = np.where(pred > 0, 123456789, 0).astype(np.int64)  # large id: the np.unique path
    for f in (aggregated_jaccard_index, aggregated_jaccard_index_plus):
        assert f(t2, p2) == pytest.approx(f(true, pred))
    assert panoptic_quality(t2, p2) == panoptic_quality(true, pred)


@pytest.mark.parametrize("which", ["both", "true", "pred"])
def test_empty_maps(which: str) -> None:
    full = np.zeros((4, 4), np.int32)
    full[1:3, 1:3] = 4
    empty = np.zeros((4, 4), np.int32)
    true, pred = {"both": (empty, empty), "true": (empty, full), "pred": (full, empty)}[which]
    r = panoptic_quality(true, pred)
    aji, aji_p = aggregated_jaccard_index(true, pred), aggregated_jaccard_index_plus(true, pred)
    if which == "both":
        assert (r.pq, r.dq, r.sq, aji, aji_p) == (None, None, None, None, None)
    else:
        assert (r.pq, r.dq, r.sq, aji, aji_p) == (0.0, 0.0, None, 0.0, 0.0)
    s = score_image(true, pred, true, pred, class_ids=(4,))
    assert s.bpq == (None if which in ("both", "true") else 0.0)
    assert s.mpq == (None if which in ("both", "true") else 0.0)
    assert s.detection.f1 == (None if which == "both" else 0.0)


def test_single_pixel() -> None:
    true = np.zeros((3, 3), np.int32)
    true[1, 1] = 2
    assert panoptic_quality(true, true).pq == 1.0
    assert aggregated_jaccard_index(true, true) == 1.0
    shifted = np.roll(true, 1, axis=1)
    assert panoptic_quality(true, shifted).pq == 0.0
    assert aggregated_jaccard_index_plus(true, shifted) == 0.0  # no overlap: union 1 + 1


def test_instance_classes_majority_and_centroids() -> None:
    inst = np.zeros((4, 8), np.int32)
    inst[1:3, 5:8] = 3  # 6 px
    inst[0, 0:4] = 9  # 4 px
    inst[3, 0] = 4  # 1 px
    types = np.zeros_like(inst)
    types[1:3, 5:8] = [[2, 2, 1], [0, 0, 0]]  # background pixels do not vote: class 2
    types[0, 0:4] = [1, 1, 3, 3]  # tie: smallest class
    ids, classes = instance_classes(inst, types)
    assert ids.tolist() == [3, 4, 9] and classes.tolist() == [2, 0, 1]
    ids, xy = instance_centroids(inst)
    assert ids.tolist() == [3, 4, 9]
    np.testing.assert_allclose(xy, [[6.0, 1.5], [0.0, 3.0], [1.5, 0.0]])  # (x, y)


def test_pair_coordinates_hungarian_then_radius() -> None:
    true = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred = np.array([[1.0, 0.0], [30.0, 0.0]])
    # costs [[1, 30], [9, 20]]: assignment (0,0) + (1,1) = 21; (1,1) is 20 px > 12 so dropped
    pairing, ut, up = pair_coordinates(true, pred, 12)
    assert pairing.tolist() == [[0, 0]] and ut.tolist() == [1] and up.tolist() == [1]
    pairing, _, _ = pair_coordinates(np.array([[0.0, 0.0]]), np.array([[12.0, 0.0]]), 12)  # <= radius kept
    assert pairing.tolist() == [[0, 0]]
    pairing, ut, up = pair_coordinates(np.zeros((0, 2)), np.array([[1.0, 1.0]]), 12)
    assert pairing.shape == (0, 2) and ut.size == 0 and up.tolist() == [0]


def test_detection_and_type_f1_pooled_hand_computed() -> None:
    classes = (1, 2, 3)
    a = detection_counts(
        [[0, 0], [50, 0], [100, 0]], [[1, 0], [51, 0], [200, 0]], 12, [1, 2, 1], [1, 1, 2], classes
    )  # pairs t0-p0 (1,1), t1-p1 (2,1); t2 (class 1) and p2 (class 2) unpaired
    b = detection_counts([[5, 5]], [[6, 6]], 12, [2], [2], classes)
    total = a + b
    assert (total.tp, total.fp, total.fn) == (3, 1, 1)
    assert total.precision == pytest.approx(0.75) and total.recall == pytest.approx(0.75)
    assert total.f1 == pytest.approx(0.75)
    # class 1: tp_dt 1, fp_dt 1, fn_dt 0, fp_d 0, fn_d 1 -> 2 / (2 + 2 + 1)
    assert total.f1_type(1) == pytest.approx(2 / 5)
    # class 2: tp_dt 1, fp_dt 0, fn_dt 1, fp_d 1, fn_d 0 -> 2 / (2 + 2 + 1)
    assert total.f1_type(2) == pytest.approx(2 / 5)
    assert total.f1_type(3) is None
    empty = DetectionCounts()
    assert (empty.precision, empty.recall, empty.f1) == (None, None, None)


def test_unknown_true_class_counts_for_detection_only() -> None:
    """True class 0 = unknown (an untyped image scored with typed ones): detected, but no class to get right."""
    classes = (1, 2)
    counts = detection_counts([[0, 0], [50, 0], [100, 0]], [[1, 0], [51, 0]], 12, [0, 2, 0], [1, 2], classes)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 1)
    assert counts.type_counts.tolist() == [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]  # the pair (unknown, 1) is left out
    assert counts.f1_type(1) is None and counts.f1_type(2) == pytest.approx(1.0)


def test_tissue_mean() -> None:
    assert tissue_mean([1.0, 0.0, None, 0.5], [None] * 4) == pytest.approx(0.5)
    assert tissue_mean([1.0, 0.0, 0.5, None], ["a", "a", "b", "c"]) == pytest.approx(0.5)
    assert tissue_mean([None, None], ["a", "b"]) is None


def _paint(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for k, (r0, r1, c0, c1) in boxes.items():
        out[r0:r1, c0:c1] = k
    return out


def test_bpq_mpq_per_class_with_tissues_hand_computed() -> None:
    """Four images, two tissues; every expected number below is worked out by hand."""
    shape = (20, 20)
    a, b, c = (0, 4, 0, 4), (10, 14, 10, 14), (0, 4, 10, 14)
    names = {1: "one", 2: "two"}
    metric = NucleusMetric(names)
    # 1 (tissue A): class-1 nucleus found (PQ_1 = 1), class-2 nucleus missed (PQ_2 = 0): mPQ 0.5; bPQ 2/3
    t, tt = _paint(shape, {1: a, 2: b}), _paint(shape, {1: a, 2: b})
    metric.update(t, _paint(shape, {1: a}), tt, _paint(shape, {1: a}), name="i1", tissue="A")
    # 2 (A): class-1 truth found as class 2 plus a class-2 FP: PQ_1 = 0, class 2 absent from truth -> skipped
    pred_types = _paint(shape, {2: a}) + _paint(shape, {2: c})
    true_2 = _paint(shape, {1: a})
    metric.update(true_2, _paint(shape, {1: a, 2: c}), true_2, pred_types, name="i2", tissue="A")
    # 3 (B): no truth, one prediction: pq 0, bPQ/mPQ undefined
    empty = np.zeros(shape, int)
    metric.update(empty, _paint(shape, {1: a}), empty, _paint(shape, {1: a}), name="i3", tissue="B")
    # 4 (B): perfect class-1 nucleus
    class_1 = _paint(shape, {1: c})
    metric.update(_paint(shape, {3: c}), _paint(shape, {8: c}), class_1, class_1, name="i4", tissue="B")
    m = metric.aggregate()
    assert m["n_images"] == 4 and m["n_true"] == 4 and m["n_pred"] == 5
    assert m["pq"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 1) / 4)
    per_image = {e["name"]: e for e in m["per_image"]}
    assert per_image["i1"]["mpq"] == pytest.approx(0.5) and per_image["i2"]["mpq"] == 0.0
    assert per_image["i3"]["mpq"] is None and per_image["i3"]["bpq"] is None and per_image["i3"]["pq"] == 0.0
    assert m["mpq"] == pytest.approx(((0.5 + 0.0) / 2 + 1.0) / 2)  # tissues A 0.25, B 1.0
    assert m["bpq"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["pq_per_class"]["one"] == pytest.approx(((1.0 + 0.0) / 2 + 1.0) / 2)
    assert m["pq_per_class"]["two"] == pytest.approx(0.0)
    # detection (centroids coincide): tp 3 (i1 a, i2 a, i4 c), fp 2 (i2 c, i3 a), fn 1 (i1 b)
    assert (m["precision_det"], m["recall_det"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    # class 1: tp_dt 2 (i1, i4), fn_dt 1 (i2), fp_d 1 (i3) -> 4 / (4 + 2 + 1)
    assert m["f1_per_class"]["one"] == pytest.approx(4 / 7)
    # class 2: fp_dt 1 (i2 a), fp_d 1 (i2 c), fn_d 1 (i1 b) -> 0
    assert m["f1_per_class"]["two"] == 0.0


# ----------------------------------------------------------------------------------------------- naive reference
def naive_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    """PQ/DQ/SQ/AJI/AJI+ straight from the definitions: loops over instance pairs with boolean masks."""
    t_ids = [i for i in np.unique(true) if i != 0]
    p_ids = [i for i in np.unique(pred) if i != 0]
    if not t_ids and not p_ids:
        return dict(pq=None, dq=None, sq=None, aji=None, aji_plus=None)
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for i, t in enumerate(t_ids):
        for j, p in enumerate(p_ids):
            tm, pm = true == t, pred == p
            inter[i, j] = np.logical_and(tm, pm).sum()
            union[i, j] = np.logical_or(tm, pm).sum()
    t_area = [(true == t).sum() for t in t_ids]
    p_area = [(pred == p).sum() for p in p_ids]
    iou = inter / np.maximum(union, 1)
    pairs = [(i, j) for i in range(len(t_ids)) for j in range(len(p_ids)) if iou[i, j] > 0.5]
    tp = len(pairs)
    fp, fn = len(p_ids) - tp, len(t_ids) - tp
    dq = tp / (tp + fp / 2 + fn / 2)
    sq = sum(iou[i, j] for i, j in pairs) / tp if tp else None
    out = dict(pq=dq * sq if tp else 0.0, dq=dq, sq=sq)

    def aji_of(aji_pairs: list[tuple[int, int]]) -> float:
        num = sum(inter[i, j] for i, j in aji_pairs)
        den = sum(union[i, j] for i, j in aji_pairs)
        den += sum(t_area[i] for i in range(len(t_ids)) if i not in {a for a, _ in aji_pairs})
        den += sum(p_area[j] for j in range(len(p_ids)) if j not in {b for _, b in aji_pairs})
        return num / den

    score = inter / (union + 1e-6)  # HoVer-Net's pairing score
    if not t_ids or not p_ids:
        out.update(aji=0.0, aji_plus=0.0)
        return out
    aji_pairs = []
    for i in range(len(t_ids)):
        j = int(np.argmax(score[i]))
        if score[i, j] > 0:
            aji_pairs.append((i, j))
    rows, cols = linear_sum_assignment(-score)
    plus_pairs = [(i, j) for i, j in zip(rows, cols) if score[i, j] > 0]
    out.update(aji=aji_of(aji_pairs), aji_plus=aji_of(plus_pairs))
    return out


def random_nuclei(rng: np.random.Generator, shape: tuple[int, int] = (64, 64), n: int = 14) -> np.ndarray:
    """Random touching/overlapping disks painted in order (later ones on top), ids 1..n."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        r, c, rad = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2.5, 7)
        out[(rows - r) ** 2 + (cols - c) ** 2 <= rad**2] = k
    return out


def erode_labels(inst: np.ndarray) -> np.ndarray:
    """Keep a pixel when its 3x3 neighbourhood holds only its own id."""
    same = (ndimage.minimum_filter(inst, 3) == inst) & (ndimage.maximum_filter(inst, 3) == inst)
    return np.where(same, inst, 0)


def perturbations(true: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = np.unique(true)[1:]
    dropped = np.where(np.isin(true, rng.choice(ids, size=len(ids) // 3, replace=False)), 0, true)
    merge = {int(a): int(b) for a, b in zip(ids[0::2], ids[1::2])}
    merged = true.copy()
    for a, b in merge.items():
        merged[true == a] = b
    lut = np.zeros(true.max() + 1, np.int64)  # shuffled ids with gaps
    lut[1:] = rng.choice(np.arange(1, 10**6), size=true.max(), replace=False)
    gaps = lut[merged]  # merged, then relabelled
    return {
        "identity": true,
        "eroded": erode_labels(true),
        "dropped": dropped,
        "merged": merged,
        "gaps": gaps,
        "shifted": np.roll(true, (1, 1), axis=(0, 1)),
        "other": random_nuclei(rng, true.shape, 10),
        "empty": np.zeros_like(true),
    }


KEYS = ("pq", "dq", "sq", "aji", "aji_plus")


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-4)


def test_cross_check_against_naive_reference() -> None:
    rng = np.random.default_rng(0)
    metric = NucleusMetric()
    expected: dict[str, list] = {k: [] for k in KEYS}
    for _ in range(3):
        true = random_nuclei(rng)
        for name, pred in perturbations(true, rng).items():
            ref = naive_scores(true, pred)
            got = metric.update(true, pred, name=name)
            for k in KEYS:
                assert _close(getattr(got, k), ref[k]), (name, k, getattr(got, k), ref[k])
                expected[k].append(ref[k])
    ref = naive_scores(np.zeros((8, 8), int), np.zeros((8, 8), int))
    got = metric.update(np.zeros((8, 8), int), np.zeros((8, 8), int), name="both empty")
    assert all(getattr(got, k) is None and ref[k] is None for k in KEYS)
    agg = metric.aggregate()
    for k in KEYS:
        values = [v for v in expected[k] if v is not None]
        assert agg[k] == pytest.approx(np.mean(values), abs=1e-4)
    assert agg["n_images"] == 3 * 8 + 1


def test_binary_pq_matches_monai_compute_panoptic_quality() -> None:
    from monai.metrics import compute_panoptic_quality

    rng = np.random.default_rng(1)
    true = random_nuclei(rng, (48, 48), 8)
    for name, pred in perturbations(true, rng).items():
        if name == "empty":
            continue
        ours = panoptic_quality(true, pred)
        for key, monai_key in (("pq", "pq"), ("sq", "sq"), ("dq", "rq")):
            theirs = compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(true), metric_name=monai_key)
            theirs = float(theirs)
            assert (getattr(ours, key) or 0.0) == pytest.approx(theirs, abs=1e-4), (name, key)


# ----------------------------------------------------------------------------------------------- components
def test_cumulative_reset_and_tensor_inputs() -> None:
    true, pred = two_nuclei()
    metric = NucleusMetric()
    metric.update(torch.as_tensor(true)[None], torch.as_tensor(pred)[None])
    assert len(metric) == 1 and metric.aggregate()["pq"] == pytest.approx(0.8 * 2 / 3)
    metric.reset()
    assert len(metric) == 0 and metric.aggregate()["n_images"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(true, pred[:3])


def test_detection_metric_over_points() -> None:
    metric = NucleusDetectionMetric({1: "one", 2: "two"}, det_radius=12)
    metric.update([[0, 0], [50, 0], [100, 0]], [[1, 0], [51, 0], [200, 0]], [1, 2, 1], [1, 1, 2])
    metric.update(torch.tensor([[5.0, 5.0]]), torch.tensor([[6.0, 6.0]]), [2], [2])
    metric.update(np.zeros((0, 2)), np.zeros((0, 2)))
    m = metric.aggregate()
    assert (m["n_images"], m["n_true"], m["n_pred"]) == (3, 4, 4)
    assert m["f1_det"] == pytest.approx(0.75)
    assert m["f1_per_class"] == {"one": pytest.approx(0.4), "two": pytest.approx(0.4)}


def test_ignite_handler_writes_engine_metrics() -> None:
    true, pred = two_nuclei()
    ttype = (true > 0).astype(np.int32)
    t = torch.as_tensor
    batches = [
        [{"inst": t(true)[None], "pred_inst": t(pred)[None], "type": t(ttype)[None], "name": "a"}],
        {  # a collated dict of batches also works
            "inst": torch.as_tensor(np.stack([true, true]))[:, None],
            "pred_inst": torch.as_tensor(np.stack([true, np.zeros_like(true)]))[:, None],
            "type": torch.as_tensor(np.stack([ttype, ttype]))[:, None],
            "pred_type": torch.as_tensor(np.stack([ttype, ttype]))[:, None],
        },
    ]
    engine = Engine(lambda e, batch: batch)
    handler = NucleusMetricHandler(
        metric_name="pq",
        extra_metrics=("f1_det", "aji", "pq_per_class"),
        class_names={1: "nucleus"},
        output_transform=instance_output_transform(pred_type_key="pred_type"),
        save_details=True,
    )
    handler.attach(engine, "val_pq")
    engine.run(batches, max_epochs=1)
    expected = [0.8 * 2 / 3, 1.0, 0.0]
    assert engine.state.metrics["val_pq"] == pytest.approx(np.mean(expected))
    assert engine.state.metrics["aji"] == pytest.approx((10 / 16 + 1.0 + 0.0) / 3)
    assert engine.state.metrics["f1_det"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert engine.state.metrics["pq_per_class/nucleus"] == pytest.approx(np.mean([0.0, 1.0, 0.0]))
    assert [d["name"] for d in engine.state.metric_details["val_pq"]] == ["a", "image_1", "image_2"]
    engine.run(batches[:1], max_epochs=1)  # reset between runs
    assert engine.state.metrics["val_pq"] == pytest.approx(0.8 * 2 / 3)


def test_ignite_handler_points_nan_when_undefined() -> None:
    engine = Engine(lambda e, batch: batch)
    handler = NucleusMetricHandler(NucleusDetectionMetric(), metric_name="precision_det", extra_metrics=("recall_det",))
    handler.attach(engine, "precision_det")
    engine.run([[{"points": np.array([[3.0, 4.0]]), "pred_points": np.zeros((0, 2))}]], max_epochs=1)
    assert math.isnan(engine.state.metrics["precision_det"]) and engine.state.metrics["recall_det"] == 0.0
