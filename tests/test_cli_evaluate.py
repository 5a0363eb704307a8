"""``medseg evaluate`` through ``medseg.cli.main`` with real files in ``tmp_path``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main

SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm


def _write(
    path: Path,
    arr: np.ndarray,
    spacing=SPACING,
    origin=(0.0, 0.0, 0.0),
    labels: dict[int, str] | None = None,
) -> str:
    """Write with SimpleITK directly (independent of medseg's writer)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    img.SetOrigin(origin)
    if labels:
        img.SetMetaData("medseg_labels", json.dumps({str(k): v for k, v in labels.items()}))
    sitk.WriteImage(img, str(path))
    return str(path)


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """gt: a 3x3x3 cube of label 1 and a 2x2x2 cube of label 2; pred: the label-1 cube one voxel
    higher in z, no label 2."""
    gt = np.zeros((8, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:3, 1:4, 1:4] = 1
    pred[1:4, 1:4, 1:4] = 1
    gt[5:7, 5:7, 5:7] = 2
    return pred, gt


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line, no traceback
    return err[0]


def test_evaluate_json_numbers(tmp_path, capsys):
    pred, gt = _cubes()
    p = _write(tmp_path / "pred.nii.gz", pred)
    g = _write(tmp_path / "gt.nii.gz", gt)
    out = tmp_path / "report.json"
    rc = main(
        [
            "evaluate",
            "--pred",
            p,
            "--gt",
            g,
            "--labels",
            "1=liver,2=tumor",
            "--json",
            str(out),
            "--tolerance",
            "1.0",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "liver" in printed and "tumor" in printed and "inf" in printed
    rep = json.loads(out.read_text())
    liver, tumor = rep["labels"]
    assert (liver["label"], liver["name"], tumor["name"]) == (1, "liver", "tumor")
    # by hand (see tests/test_metrics.py::test_cubes_by_hand): Dice 2/3, IoU 1/2, HD = HD95 =
    # one z step = 2 mm, ASSD 38/52 mm, surface Dice@1mm 34/52
    assert liver["dice"] == pytest.approx(2 / 3) and liver["iou"] == pytest.approx(0.5)
    assert liver["hd"] == pytest.approx(2.0) and liver["hd95"] == pytest.approx(2.0)
    assert liver["msd"] == pytest.approx(38 / 52)
    assert liver["surface_dice"] == pytest.approx(34 / 52)
    assert liver["volume_mm3_gt"] == pytest.approx(27 * 2.0)
    # tumour missing from the prediction: Dice 0, distances null with a note
    assert tumor["dice"] == 0.0 and tumor["empty"] == "pred"
    assert tumor["hd"] is None and tumor["hd95"] is None and "empty" in tumor["note"]
    assert rep["resampled"] is False
    # an existing report is not replaced without --overwrite
    assert main(["evaluate", "--pred", p, "--gt", g, "--json", str(out)]) == 2
    assert "already exists" in _err_line(capsys)


def test_names_from_dataset_json_and_lesions(tmp_path, capsys):
    pred, gt = _cubes()
    gt[6, 0, 0] = 2  # a second, single-voxel tumour (not predicted)
    pred[5:7, 5:7, 5:7] = 2  # the big tumour found
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumor"}})
    )
    p = _write(tmp_path / "pred.nrrd", pred)
    g = _write(tmp_path / "gt.nrrd", gt)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", p, "--gt", g, "--json", str(out), "--lesions", "tumor"]) == 0
    rep = json.loads(out.read_text())
    assert [r["name"] for r in rep["labels"]] == ["liver", "tumor"]
    les = rep["lesions"]
    assert (les["label"], les["tp"], les["fp"], les["fn"]) == (2, 1, 0, 1)
    assert les["recall"] == pytest.approx(0.5) and les["precision"] == 1.0
    # panoptic: liver (stuff) IoU 1/2 is not > 1/2 -> unmatched; tumour 1 of 2 matched with IoU 1
    pq = rep["panoptic"]["per_class"]
    assert pq["1"]["pq"] == 0.0 and pq["2"]["sq"] == pytest.approx(1.0)
    assert pq["2"]["rq"] == pytest.approx(1 / 1.5)
    assert "lesions (label 2 tumor" in capsys.readouterr().out
    assert main(["evaluate", "--pred", p, "--gt", g, "--lesions", "kidney"]) == 2
    assert "kidney" in _err_line(capsys)


def test_mismatched_grid_and_resample(tmp_path, capsys):
    _, gt = _cubes()
    g = _write(tmp_path / "gt.nrrd", gt)
    # the same array with the origin moved one voxel (+1 mm) along LPS x; its label table in the
    # file's metadata (read into LabelMap.meta) must survive the resampling
    p = _write(tmp_path / "pred.nrrd", gt, origin=(1.0, 0.0, 0.0), labels={1: "liver", 2: "tumor"})
    assert main(["evaluate", "--pred", p, "--gt", g]) == 2
    line = _err_line(capsys)
    assert "not on the ground truth's grid" in line and "origin" in line and "--resample" in line
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", p, "--gt", g, "--resample", "--json", str(out)]) == 0
    assert "resampled" in capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert rep["resampled"] is True
    assert [r["name"] for r in rep["labels"]] == ["liver", "tumor"]
    # on the gt grid the prediction is the gt shifted by one voxel along x
    shifted = np.zeros_like(gt)
    shifted[:, :, 1:] = gt[:, :, :-1]
    from medseg import metrics as M

    for row in rep["labels"]:
        v = row["label"]
        assert row["dice"] == pytest.approx(M.dice(shifted == v, gt == v))
        assert row["hd"] == pytest.approx(1.0)  # one x step


def test_non_integer_labels_refused(tmp_path, capsys):
    _, gt = _cubes()
    g = _write(tmp_path / "gt.nrrd", gt)
    prob = _write(tmp_path / "prob.nrrd", gt.astype(np.float32) * 0.37)
    assert main(["evaluate", "--pred", prob, "--gt", g]) == 2
    line = _err_line(capsys)
    assert "prob.nrrd" in line and "whole numbers" in line
    assert main(["evaluate", "--pred", g, "--gt", g, "--labels", "liver"]) == 2
    assert "VALUE=NAME" in _err_line(capsys)
    assert main(["evaluate", "--pred", g, "--gt", g, "--tolerance", "-1"]) == 2
    assert "tolerance" in _err_line(capsys)


def test_real_lung1_against_shifted_copy(tmp_path, pyradiomics_dir, capsys):
    """lung1's tumour vs itself shifted by (1, 3, -2) voxels: Dice and max HD equal SimpleITK's."""
    import SimpleITK as sitk

    gt_path = pyradiomics_dir / "lung1_label.nrrd"
    img = sitk.ReadImage(str(gt_path))
    a = sitk.GetArrayFromImage(img)
    b = np.zeros_like(a)
    b[1:, 3:, :-2] = a[:-1, :-3, 2:]
    shifted = sitk.GetImageFromArray(b)
    shifted.CopyInformation(img)
    p = tmp_path / "lung1_shifted.nrrd"
    sitk.WriteImage(shifted, str(p))
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(p), "--gt", str(gt_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["labels"]
    # the references run on the union bounding box (+2 voxels; SimpleITK slicing keeps the physical
    # geometry): both measures only see object voxels, and the full 48x512x512 distance map
    # would cost seconds
    nz = np.argwhere((a > 0) | (b > 0))
    lo, hi = np.maximum(nz.min(0) - 2, 0), np.minimum(nz.max(0) + 3, a.shape)
    crop = lambda im: im[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]  # noqa: E731 (x, y, z)
    ov = sitk.LabelOverlapMeasuresImageFilter()
    ov.Execute(crop(img), crop(shifted))
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(crop(img), crop(shifted))
    assert row["dice"] == pytest.approx(ov.GetDiceCoefficient(), abs=1e-12)
    assert row["iou"] == pytest.approx(ov.GetJaccardCoefficient(), abs=1e-12)
    assert row["hd"] == pytest.approx(hd.GetHausdorffDistance(), abs=1e-6)
    assert 0.0 < row["dice"] < 1.0 and math.isfinite(row["hd95"])
    assert row["voxels_gt"] == int(np.count_nonzero(a))
    # HD95 and surface Dice as MONAI computes them (same definitions, float32 distances there)
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    sx, sy, sz = img.GetSpacing()
    tb = torch.from_numpy((b > 0)[None, None].astype(np.float32))
    ta = torch.from_numpy((a > 0)[None, None].astype(np.float32))
    kw = {"include_background": True, "spacing": (sz, sy, sx)}
    hd95 = compute_hausdorff_distance(tb, ta, percentile=95, **kw).item()
    nsd = compute_surface_dice(tb, ta, class_thresholds=[1.0], **kw).item()
    assert row["hd95"] == pytest.approx(hd95, rel=1e-5)
    assert row["surface_dice"] == pytest.approx(nsd, abs=1e-6)
