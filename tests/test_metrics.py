"""medseg.metrics: hand-computed cases, the empty rule, agreement with SimpleITK and MONAI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medseg import metrics as M
from medseg.errors import GeometryError
from medseg.volume import LabelMap

SPACING = (2.5, 0.7, 0.9)


# ----------------------------------------------------------------------------- fixtures
def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """Two 3x3x3 cubes, the second shifted by one voxel along z."""
    a = np.zeros((6, 5, 5), bool)
    b = np.zeros_like(a)
    a[0:3, 1:4, 1:4] = True
    b[1:4, 1:4, 1:4] = True
    return a, b


def _blobs(rng: np.random.Generator, shape=(20, 48, 44), n=4, spacing=SPACING) -> np.ndarray:
    """Union of ``n`` random ellipsoids (radii in mm) on an anisotropic grid."""
    zz, yy, xx = np.meshgrid(
        *[np.arange(s) * sp for s, sp in zip(shape, spacing, strict=True)], indexing="ij"
    )
    out = np.zeros(shape, bool)
    ext = np.array(shape) * np.array(spacing)
    for _ in range(n):
        c = rng.uniform(0.2, 0.8, 3) * ext
        r = rng.uniform(3.0, 8.0, 3)
        d2 = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        out |= d2 <= 1
    return out


@pytest.fixture(scope="module")
def random_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (pred, gt) pairs: gt blobs, pred = gt with a blob added, one removed and a shift."""
    rng = np.random.default_rng(1234)
    pairs = []
    for _ in range(4):
        gt = _blobs(rng)
        pred = np.roll(gt, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
        pred |= _blobs(rng, n=1)
        pred &= ~_blobs(rng, n=1)
        assert gt.any() and pred.any()
        pairs.append((pred, gt))
    return pairs


def _sitk(mask: np.ndarray, spacing=SPACING):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    return img


# ----------------------------------------------------------------------------- hand computed
def test_cubes_by_hand():
    a, b = _cubes()
    sp = (2.0, 1.0, 1.0)
    # |A| = |B| = 27, |A∩B| = 18 (two shared layers)
    assert M.dice(a, b) == pytest.approx(2 * 18 / 54)
    assert M.iou(a, b) == pytest.approx(18 / 36)
    # surface of a 3x3x3 cube: 26 voxels (all but the centre). A→B: A's bottom face (9 voxels) is
    # one z-step = 2 mm from B's bottom face; A's top-face centre is 1 mm (in y or x) from B's
    # ring; the other 16 A surface voxels are B surface voxels (0). B→A is the mirror image.
    sd = M.surface_distances(a, b, sp)
    assert sorted(sd.pred_to_gt.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    assert sorted(sd.gt_to_pred.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    assert M.hausdorff(a, b, sp) == pytest.approx(2.0)
    assert M.hd95(a, b, sp) == pytest.approx(2.0)
    # percentile 60 of 16x0, 1x1, 9x2 (linear): position 0.6 * 25 = 15 -> 0.0; 65 -> 16.25 -> 1.25
    assert M.hausdorff(a, b, sp, percentile=60) == pytest.approx(0.0)
    assert M.hausdorff(a, b, sp, percentile=65) == pytest.approx(1.25)
    assert M.mean_surface_distance(a, b, sp) == pytest.approx(2 * (9 * 2 + 1) / 52)
    assert M.surface_dice(a, b, sp, tolerance_mm=1.0) == pytest.approx(34 / 52)
    assert M.surface_dice(a, b, sp, tolerance_mm=0.5) == pytest.approx(32 / 52)
    assert M.surface_dice(a, b, sp, tolerance_mm=2.0) == pytest.approx(1.0)
    # spacing matters: with 1 mm along z the farthest voxels are 1 mm apart
    assert M.hausdorff(a, b, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_identical_and_diagonal():
    a, _ = _cubes()
    assert M.dice(a, a) == 1.0 and M.hausdorff(a, a, SPACING) == 0.0
    assert M.surface_dice(a, a, SPACING, 0.0) == 1.0
    p = np.zeros((4, 4, 4), bool)
    g = np.zeros_like(p)
    p[0, 0, 0] = True
    g[3, 3, 3] = True
    assert M.hausdorff(p, g, (2.0, 3.0, 6.0)) == pytest.approx(math.sqrt(36 + 81 + 324))
    assert M.dice(p, g) == 0.0


def test_empty_rule():
    a, _ = _cubes()
    z = np.zeros_like(a)
    # both empty: perfect agreement
    assert M.dice(z, z) == 1.0 and M.iou(z, z) == 1.0
    assert M.surface_dice(z, z, SPACING) == 1.0
    assert M.hausdorff(z, z, SPACING) == 0.0 and M.hd95(z, z, SPACING) == 0.0
    assert M.mean_surface_distance(z, z, SPACING) == 0.0
    # exactly one empty: worst scores, infinite distances (both directions)
    for p, g in ((a, z), (z, a)):
        assert M.dice(p, g) == 0.0 and M.iou(p, g) == 0.0
        assert M.surface_dice(p, g, SPACING, 5.0) == 0.0
        assert math.isinf(M.hausdorff(p, g, SPACING))
        assert math.isinf(M.hd95(p, g, SPACING))
        assert math.isinf(M.mean_surface_distance(p, g, SPACING))
    assert M.surface_distances(a, z).empty == "gt"
    assert M.surface_distances(z, a).empty == "pred"
    assert M.surface_distances(z, z).empty == "both"


def test_monai_differs_on_empty():
    """The documented differences from MONAI's empty handling, and where it agrees."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    a, _ = _cubes()
    z = np.zeros_like(a)
    t = lambda m: torch.from_numpy(m[None, None].astype(np.float32))  # noqa: E731
    kw = {"include_background": True}
    with pytest.warns(UserWarning):
        hd_both = compute_hausdorff_distance(t(z), t(z), **kw).item()
        hd_one = compute_hausdorff_distance(t(a), t(z), **kw).item()
        nsd_both = compute_surface_dice(t(z), t(z), [1.0], **kw).item()
        nsd_one = compute_surface_dice(t(z), t(a), [1.0], **kw).item()
    assert math.isnan(hd_both) and M.hausdorff(z, z) == 0.0  # differs
    assert math.isnan(nsd_both) and M.surface_dice(z, z) == 1.0  # differs
    assert math.isinf(hd_one) and math.isinf(M.hausdorff(a, z))  # agrees
    assert nsd_one == 0.0 == M.surface_dice(z, a)  # agrees
    assert math.isnan(compute_dice(t(z), t(z), **kw).item())  # default ignore_empty=True
    assert math.isnan(compute_dice(t(a), t(z), **kw).item())
    for p, g in ((z, z), (a, z), (z, a)):  # ignore_empty=False is our rule
        assert compute_dice(t(p), t(g), ignore_empty=False, **kw).item() == M.dice(p, g)


def test_mask_touching_array_edge():
    """Outside the array is background: a mask filling the array has its border as surface."""
    full = np.ones((3, 4, 5), bool)
    assert int(M.surface(full).sum()) == full.size - 1 * 2 * 3
    half = full.copy()
    half[:, :, 3:] = False
    # the gt's surface voxels at x = 4 are 2 x-steps (0.9 mm) from pred's face at x = 2
    assert M.hausdorff(half, full, SPACING) == pytest.approx(2 * 0.9)


# ----------------------------------------------------------------------------- references
def test_overlap_matches_simpleitk(random_pairs):
    import SimpleITK as sitk

    for pred, gt in random_pairs:
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(_sitk(gt), _sitk(pred))
        assert M.dice(pred, gt) == pytest.approx(f.GetDiceCoefficient(), abs=1e-12)
        assert M.iou(pred, gt) == pytest.approx(f.GetJaccardCoefficient(), abs=1e-12)


def test_max_hausdorff_matches_simpleitk(random_pairs):
    """ITK's filter uses all object voxels; the maximum agrees with the surface-based one here."""
    import SimpleITK as sitk

    for pred, gt in random_pairs:
        f = sitk.HausdorffDistanceImageFilter()
        f.Execute(_sitk(gt), _sitk(pred))
        assert M.hausdorff(pred, gt, SPACING) == pytest.approx(f.GetHausdorffDistance(), abs=1e-6)


def test_hausdorff_differs_from_simpleitk_with_cavity():
    """A prediction with an internal cavity: the cavity wall is surface here, interior for ITK."""
    import SimpleITK as sitk

    gt = np.zeros((15, 15, 15), bool)
    gt[2:13, 2:13, 2:13] = True
    pred = gt.copy()
    pred[7, 7, 7] = False  # one-voxel hole in the middle
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(_sitk(gt, (1.0, 1.0, 1.0)), _sitk(pred, (1.0, 1.0, 1.0)))
    assert f.GetHausdorffDistance() == pytest.approx(1.0)  # hole voxel -> nearest pred voxel
    # here: the hole's 6 walls are pred surface, 4 voxels (+1 to the wall) from gt's surface
    assert M.hausdorff(pred, gt) == pytest.approx(4.0)


def _monai_inputs(pred: np.ndarray, gt: np.ndarray):
    import torch

    return (
        torch.from_numpy(pred[None, None].astype(np.float32)),
        torch.from_numpy(gt[None, None].astype(np.float32)),
    )


def test_hd95_msd_match_monai(random_pairs):
    """Same definitions as MONAI (face-connected erosion edges, exact EDT, max of the directed
    percentiles, pooled ASSD). MONAI keeps distances in float32, hence the 1e-5 relative bound."""
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
    )

    for pred, gt in random_pairs:
        tp, tg = _monai_inputs(pred, gt)
        for pct in (95, 50, None):
            ref = compute_hausdorff_distance(
                tp, tg, include_background=True, percentile=pct, spacing=SPACING
            ).item()
            ours = M.hausdorff(pred, gt, SPACING, percentile=pct or 100)
            assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5)
        ref = compute_average_surface_distance(
            tp, tg, include_background=True, symmetric=True, spacing=SPACING
        ).item()
        assert M.mean_surface_distance(pred, gt, SPACING) == pytest.approx(ref, rel=1e-5)


def test_surface_dice_matches_monai(random_pairs):
    """Voxel-counted NSD equals MONAI ``compute_surface_dice(use_subvoxels=False)``.

    Not compared: Nikolov's area-weighted surfels (MONAI ``use_subvoxels=True``) put the surface on
    the dual grid between voxels and weight each element by its area; on these anisotropic
    phantoms (faces of 0.63 to 2.25 mm²) that differed from the voxel count by 0.01 to 0.22
    (measured), so no tight bound holds and the two must not be mixed in one table.
    """
    from monai.metrics import compute_surface_dice

    for pred, gt in random_pairs:
        tp, tg = _monai_inputs(pred, gt)
        for tol in (0.5, 1.3, 2.0, 4.1):
            ref = compute_surface_dice(
                tp, tg, class_thresholds=[tol], include_background=True, spacing=SPACING
            ).item()
            assert M.surface_dice(pred, gt, SPACING, tol) == pytest.approx(ref, abs=1e-6)


# ----------------------------------------------------------------------------- evaluate
def _lm(arr, labels=None, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> LabelMap:
    return LabelMap(array=arr, spacing=spacing, origin=origin, labels=labels or {})


def test_evaluate_per_label(random_pairs):
    pred_a, gt_a = random_pairs[0]
    gt = np.where(gt_a, 1, 0).astype(np.uint8)
    z0 = int(np.flatnonzero(gt_a.any(axis=(1, 2)))[0])
    gt[z0 : z0 + 2][gt_a[z0 : z0 + 2]] = 2  # label 2: the first two slices holding blobs
    assert (gt == 2).any() and (gt == 1).any()
    pred = np.where(pred_a, 1, 0).astype(np.uint8)
    rows = M.evaluate(_lm(pred), _lm(gt, {1: "liver", 2: "tumor", 3: "vessel"}), tolerance_mm=1.5)
    assert [r["label"] for r in rows] == [1, 2, 3]
    assert [r["name"] for r in rows] == ["liver", "tumor", "vessel"]
    r1, r2, r3 = rows
    assert r1["dice"] == pytest.approx(M.dice(pred == 1, gt == 1))
    assert r1["hd95"] == pytest.approx(M.hd95(pred == 1, gt == 1, SPACING))
    assert r1["surface_dice"] == pytest.approx(M.surface_dice(pred == 1, gt == 1, SPACING, 1.5))
    assert r1["volume_mm3_gt"] == pytest.approx((gt == 1).sum() * 2.5 * 0.7 * 0.9)
    assert r1["voxels_pred"] == int((pred == 1).sum()) and r1["empty"] is None
    # label 2 is in gt only, label 3 in neither
    assert r2["empty"] == "pred" and r2["dice"] == 0.0 and math.isinf(r2["hd"])
    assert r3["empty"] == "both" and r3["dice"] == 1.0 and r3["hd95"] == 0.0
    js = M.rows_to_json(rows)
    text = json.dumps(js, allow_nan=False)
    back = json.loads(text)
    assert back[1]["hd"] is None and "note" in back[1] and "note" not in back[0]
    extra = pred.copy()
    extra[-1, 0, 0] = 4  # a label only the prediction has
    assert gt[-1, 0, 0] == 0
    rows4 = M.evaluate(_lm(extra), _lm(gt, {1: "liver", 2: "tumor"}))
    assert [(r["label"], r["empty"]) for r in rows4] == [(1, None), (2, "pred"), (4, "gt")]
    assert rows4[2]["name"] == "label_4" and rows4[2]["voxels_pred"] == 1
    calls: list[tuple[int, int]] = []
    only = M.evaluate(
        _lm(pred), _lm(gt), labels={1: "organ"}, progress=lambda d, t: calls.append((d, t))
    )
    assert [(r["label"], r["name"]) for r in only] == [(1, "organ")]
    assert calls == [(0, 1), (1, 1)]


def test_evaluate_refuses_other_grid():
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(GeometryError, match="resample"):
        M.evaluate(_lm(a), _lm(a, origin=(0.0, 0.0, 5.0)))
    with pytest.raises(GeometryError, match="spacing"):
        M.evaluate(_lm(a, spacing=(1, 1, 1)), _lm(a))


# ----------------------------------------------------------------------------- lesions
def test_lesion_detection_hand_built():
    sp = (2.0, 1.0, 1.0)
    gt = np.zeros((10, 30, 30), bool)
    pred = np.zeros_like(gt)
    gt[1:4, 2:8, 2:8] = True  # G_A 108 vox: well detected
    pred[1:4, 3:8, 2:8] = True  #   pred 90 vox inside, IoU 90/108
    gt[1:4, 15:25, 15:25] = True  # G_B 300 vox: only touched
    pred[1:2, 15:17, 15:17] = True  # 4 vox, IoU 4/300 < 0.1 -> FP, G_B missed
    gt[6:9, 2:5, 20:23] = True  # G_C 27 vox: missed entirely
    pred[7:9, 26:29, 2:4] = True  # isolated pred -> FP
    # a pred component touching G_A only by a corner is a separate component (26-conn. joins
    # corners, so place it 2 voxels away)
    res = M.lesion_detection(pred, gt, sp)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 2, 2)
    assert (res["n_gt"], res["n_pred"]) == (3, 3)
    assert res["precision"] == pytest.approx(1 / 3)
    assert res["recall"] == pytest.approx(1 / 3)
    assert res["f1"] == pytest.approx(2 / (2 + 2 + 2))
    gts = [r for r in res["lesions"] if r["kind"] == "gt"]
    # ids are by size: G_B (300) = 1, G_A (108) = 2, G_C (27) = 3
    assert [r["voxels"] for r in gts] == [300, 108, 27]
    assert [r["detected"] for r in gts] == [False, True, False]
    assert gts[1]["iou"] == pytest.approx(90 / 108)
    assert gts[1]["volume_mm3"] == pytest.approx(108 * 2.0)
    # a lower threshold also matches the touched lesion
    low = M.lesion_detection(pred, gt, sp, iou_threshold=0.01)
    assert (low["tp"], low["fp"], low["fn"]) == (2, 1, 1)
    # min size drops the 4-voxel (8 mm3) component and the 12-voxel isolated one (24 mm3)
    big = M.lesion_detection(pred, gt, sp, min_volume_mm3=30.0)
    assert (big["tp"], big["fp"], big["fn"], big["n_gt"]) == (1, 0, 2, 3)


def test_lesion_detection_one_to_one_and_empty():
    gt = np.zeros((5, 20, 20), bool)
    gt[1:4, 2:12, 2:12] = True  # one GT lesion split by the prediction into two halves
    pred = np.zeros_like(gt)
    pred[1:4, 2:12, 2:6] = True
    pred[1:4, 2:12, 8:12] = True
    res = M.lesion_detection(pred, gt, (1, 1, 1))
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 0)  # one half matches, the other is FP
    # one predicted component bridging two GT lesions: matched to the one with the higher IoU
    gt2 = np.zeros((5, 20, 20), bool)
    gt2[1:4, 2:12, 2:8] = True  # 180 voxels
    gt2[1:4, 2:12, 9:11] = True  # 60 voxels, one column apart
    bridge = np.zeros_like(gt2)
    bridge[1:4, 2:12, 2:11] = True  # 270 voxels
    res = M.lesion_detection(bridge, gt2)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 0, 1)
    (a, b) = [r for r in res["lesions"] if r["kind"] == "gt"]
    assert a["detected"] and a["iou"] == pytest.approx(180 / 270) and not b["detected"]
    z = np.zeros_like(gt)
    e = M.lesion_detection(z, z)
    assert (e["precision"], e["recall"], e["f1"]) == (1.0, 1.0, 1.0)
    e = M.lesion_detection(z, gt)
    assert (e["precision"], e["recall"], e["f1"], e["fn"]) == (0.0, 0.0, 0.0, 1)


# ----------------------------------------------------------------------------- panoptic
def test_panoptic_quality_hand_built():
    gs = np.zeros((4, 20, 20), np.uint8)
    ps = np.zeros_like(gs)
    gs[:, 0:10, 0:10] = 1  # organ (stuff), 400 vox
    ps[:, 0:10, 0:8] = 1  # 320 vox, IoU 0.8
    gs[:, 12:16, 12:16] = 2  # lesion a: 64 vox
    ps[:, 12:16, 12:15] = 2  # 48 vox inside -> IoU 0.75 (TP)
    gs[:, 17:20, 0:4] = 2  # lesion b: 48 vox
    ps[:, 17:20, 0:1] = 2  # 12 vox -> IoU 0.25 (no match: FP + FN)
    ps[0, 0:2, 17:20] = 2  # lone pred lesion: FP
    res = M.panoptic_quality(ps, gs, stuff_labels=[1], thing_labels=[2, 3])
    organ, lesion = res["per_class"][1], res["per_class"][2]
    assert (organ["tp"], organ["fp"], organ["fn"]) == (1, 0, 0)
    assert organ["pq"] == pytest.approx(0.8) and organ["sq"] == pytest.approx(0.8)
    assert (lesion["tp"], lesion["fp"], lesion["fn"]) == (1, 2, 1)
    assert lesion["sq"] == pytest.approx(0.75)
    assert lesion["rq"] == pytest.approx(1 / (1 + 1 + 0.5))
    assert lesion["pq"] == pytest.approx(0.75 / 2.5)
    assert res["per_class"][3]["pq"] is None  # absent class: left out of the averages
    assert res["pq"] == pytest.approx((0.8 + 0.3) / 2)
    assert res["pq_things"] == pytest.approx(0.3) and res["pq_stuff"] == pytest.approx(0.8)
    # explicit instance maps (lesion b's pred part given the same id as lesion a's: one segment)
    gi = np.zeros_like(gs, np.int32)
    gi[:, 12:16, 12:16] = 1
    gi[:, 17:20, 0:4] = 2
    pi = np.zeros_like(gi)
    pi[:, 12:16, 12:15] = 5
    pi[:, 17:20, 0:1] = 5
    pi[0, 0:2, 17:20] = 7
    r2 = M.panoptic_quality(ps, gs, pi, gi, stuff_labels=[1], thing_labels=[2])
    les = r2["per_class"][2]
    # merged pred segment (60 vox) vs lesion a: IoU 48 / (64 + 60 - 48) = 0.63 > 0.5 -> TP;
    # the lone pred is FP, lesion b FN
    assert (les["tp"], les["fp"], les["fn"]) == (1, 1, 1)
    assert les["pq"] == pytest.approx((48 / 76) / 2.0)
    pi[:, 17:20, 0:3] = 5  # a larger merged part: 48 / (64 + 84 - 48) = 0.48 -> no match
    ps[pi == 5] = 2
    les = M.panoptic_quality(ps, gs, pi, gi, stuff_labels=[1], thing_labels=[2])["per_class"][2]
    assert (les["tp"], les["fp"], les["fn"]) == (0, 2, 2) and les["pq"] == 0.0


# ----------------------------------------------------------------------------- accumulator
def test_accumulator():
    a, b = _cubes()
    z = np.zeros_like(a)
    acc = M.MetricAccumulator()
    acc.add(M.evaluate(_lm(a.astype(np.uint8)), _lm(b.astype(np.uint8))), case="c1")
    acc.add(M.evaluate(_lm(a.astype(np.uint8)), _lm(a.astype(np.uint8))), case="c2")
    acc.add(M.evaluate(_lm(z.astype(np.uint8)), _lm(a.astype(np.uint8))), case="c3")
    assert len(acc) == 3
    (s,) = acc.aggregate()
    assert s["label"] == 1 and s["n_cases"] == 3 and s["n_pred_empty"] == 1
    d = [2 / 3, 1.0, 0.0]
    assert s["dice"]["mean"] == pytest.approx(np.mean(d))
    assert s["dice"]["std"] == pytest.approx(np.std(d))
    assert s["dice"]["median"] == pytest.approx(2 / 3)
    hd = [M.hausdorff(a, b, SPACING), 0.0]
    assert s["hd"]["mean"] == pytest.approx(np.mean(hd)) and s["hd"]["n_inf"] == 1
    acc.reset()
    assert acc.aggregate() == []


def test_speed_512_grid_crops():
    """A small object in a 48x512x512 grid is evaluated on its bounding box (fast)."""
    import time

    g = np.zeros((48, 512, 512), bool)
    g[20:30, 200:260, 210:280] = True
    p = np.roll(g, (1, 3, -2), axis=(0, 1, 2))
    t = time.perf_counter()
    sd = M.surface_distances(p, g, (5.0, 0.57, 0.57))
    assert time.perf_counter() - t < 5.0  # generous: shared CI cores; full-grid EDT is far slower
    # farthest: a corner row of pred's top face, (1, 3, 2) voxels from gt's top face edge
    assert sd.hausdorff() == pytest.approx(math.sqrt(5.0**2 + (3 * 0.57) ** 2 + (2 * 0.57) ** 2))


def _uncropped_distances(
    a: np.ndarray, b: np.ndarray, sp: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: distance transforms over the whole volume, no crop, no k-d tree."""
    from scipy import ndimage

    sa, sb = M.surface(a), M.surface(b)
    return (
        ndimage.distance_transform_edt(~sb, sampling=sp)[sa],
        ndimage.distance_transform_edt(~sa, sampling=sp)[sb],
    )


@pytest.mark.parametrize("kdtree", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_surface_distances_equal_the_uncropped_distance_transform(
    seed: int, kdtree: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    # the k-d tree path is taken for big boxes only; force either path on this small volume
    monkeypatch.setattr(M, "_KDTREE_MIN_VOXELS", 0 if kdtree else 1 << 40)

    rng = np.random.default_rng(seed)
    shape = (30, 40, 36)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    a[:, :3] = b[:, :3] = False  # leave background margins of different widths
    b[-4:] = False
    sp = (1.0, 0.78, 0.78) if seed % 2 else tuple(rng.uniform(0.4, 3.0, 3))
    sd = M.surface_distances(a, b, sp)
    ref_ab, ref_ba = _uncropped_distances(a, b, sp)
    assert sd.pred_to_gt.shape == ref_ab.shape and sd.gt_to_pred.shape == ref_ba.shape
    assert sd.pred_to_gt.size > 100 and sd.gt_to_pred.size > 100
    # same voxels, same order, same distances: bitwise except where two nearest voxels tie in
    # exact arithmetic and the sum's rounding differs (a few ulp)
    np.testing.assert_allclose(sd.pred_to_gt, ref_ab, rtol=4e-16 * 4, atol=0)
    np.testing.assert_allclose(sd.gt_to_pred, ref_ba, rtol=4e-16 * 4, atol=0)
    assert np.mean(sd.pred_to_gt == ref_ab) > 0.95
    ref = M.SurfaceDistances(ref_ab, ref_ba)
    for p in (50.0, 95.0, 100.0):
        assert sd.hausdorff(p) == pytest.approx(ref.hausdorff(p), rel=1e-14, abs=0)
    assert sd.mean() == pytest.approx(ref.mean(), rel=1e-14, abs=0)
    for tol in (0.5, 1.0, 2.0):
        assert sd.surface_dice(tol) == ref.surface_dice(tol)


@pytest.mark.parametrize("kdtree", [True, False])
def test_surface_distances_small_hand_case(kdtree: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_KDTREE_MIN_VOXELS", 0 if kdtree else 1 << 40)
    a = np.zeros((1, 1, 8), bool)
    b = np.zeros((1, 1, 8), bool)
    a[0, 0, 1] = True
    b[0, 0, 4:6] = True
    sd = M.surface_distances(a, b, (1.0, 1.0, 0.5))
    assert sd.pred_to_gt.tolist() == [1.5]  # voxel 1 to voxel 4: 3 x 0.5 mm
    assert sd.gt_to_pred.tolist() == [1.5, 2.0]
