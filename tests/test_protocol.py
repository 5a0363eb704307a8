"""The SEGFM3D protocol: click rule, initial box, scores and AUC on hand-built masks; the driver's
bookkeeping; the real model end to end on a small real case."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medseg import metrics
from medseg.errors import InputError
from medseg.protocol import (
    ChallengeBox,
    auc,
    challenge_box,
    component_edt,
    largest_error_component,
    next_click,
    run_protocol,
    step_scores,
)


def _zeros(shape=(8, 8, 8)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


# --------------------------------------------------------------------------- click rule
def test_largest_component_uses_26_connectivity():
    gt, pred = _zeros(), _zeros()
    # a diagonal chain of 3 voxels (one component only with 26-connectivity) ...
    for i in range(3):
        gt[1 + i, 1 + i, 1 + i] = True
    # ... against a face-connected pair elsewhere (an over-segmentation)
    pred[6, 6, 5:7] = True
    comp = largest_error_component(pred, gt)
    assert comp is not None and comp.sum() == 3
    assert comp[1, 1, 1] and comp[3, 3, 3] and not comp[6, 6, 5]


def test_largest_component_tie_goes_to_first_in_c_order():
    gt, pred = _zeros(), _zeros()
    pred[5, 0, 0:2] = True  # size 2, first voxel later in C order
    gt[1, 6, 6:8] = True  # size 2, first in C order
    comp = largest_error_component(pred, gt)
    assert comp is not None and comp[1, 6, 6] and not comp[5, 0, 0]


def test_no_error_no_click():
    gt = _zeros()
    gt[2:4, 2:4, 2:4] = True
    assert largest_error_component(gt, gt.copy()) is None
    assert next_click(gt, gt.copy()) is None


def test_click_at_edt_maximum_foreground_and_background():
    gt, pred = _zeros((9, 9, 9)), _zeros((9, 9, 9))
    gt[2:7, 2:7, 2:7] = True  # 5^3 cube missed by pred: the centre is 3 voxels from outside
    edt = component_edt(largest_error_component(pred, gt))
    assert edt[4, 4, 4] == 3.0 and edt.max() == 3.0 and np.count_nonzero(edt == 3.0) == 1
    assert edt[2, 2, 2] == 1.0 and edt[0, 0, 0] == 0.0
    click = next_click(pred, gt)
    assert (click.z, click.y, click.x, click.positive) == (4.0, 4.0, 4.0, True)
    # the same cube predicted where the truth is empty: a background click at its centre
    click = next_click(gt, pred)
    assert (click.z, click.y, click.x, click.positive) == (4.0, 4.0, 4.0, False)


def test_array_border_counts_as_background():
    gt, pred = _zeros((5, 5, 5)), _zeros((5, 5, 5))
    gt[:] = True  # the error fills the whole array: distances to the array's outside
    edt = component_edt(largest_error_component(pred, gt))
    assert edt[2, 2, 2] == 3.0 and edt[0, 2, 2] == 1.0 and edt[1, 1, 1] == 2.0
    assert next_click(pred, gt).zyx == (2.0, 2.0, 2.0)


def test_error_inside_a_correct_region():
    # pred has a hole: the largest error is the hole, its centre a foreground click
    gt, pred = _zeros((11, 11, 11)), _zeros((11, 11, 11))
    gt[1:10, 1:10, 1:10] = True
    pred[:] = gt
    pred[3:8, 3:8, 3:8] = False
    pred[0, 0, 0] = True  # a one-voxel over-segmentation elsewhere
    click = next_click(pred, gt)
    assert click.zyx == (5.0, 5.0, 5.0) and click.positive


def test_tie_broken_by_seed():
    gt, pred = _zeros(), _zeros()
    gt[3:5, 3:5, 3:5] = True  # 2^3 cube: all 8 voxels are 1 voxel from outside
    maxima = [(z, y, x) for z in (3, 4) for y in (3, 4) for x in (3, 4)]  # C order
    # numpy's legacy RandomState stream: choice(8) gives 6 for seed 42, 4 for 0, 7 for 7
    for seed, k in ((42, 6), (0, 4), (7, 7)):
        click = next_click(pred, gt, seed=seed)
        assert click.zyx == tuple(float(v) for v in maxima[k])
        assert next_click(pred, gt, seed=seed) == click  # re-seeded every call
    assert next_click(pred, gt).zyx == (4.0, 4.0, 3.0)  # default seed = the challenge's 42


def _challenge_style_click(pred, gt):
    """The click computed the way the challenge's script does it: the full-array component,
    EDT on its bounding box padded by 25 % (at least 1), maxima over the full array, and the
    *global* generator seeded with 42 before ``np.random.choice``."""
    from scipy import ndimage

    err = pred != gt
    lab, _ = ndimage.label(err, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    comp = lab == np.argmax(sizes)
    coords = np.argwhere(comp)
    lo, hi = coords.min(0), coords.max(0) + 1
    pad = np.maximum(((hi - lo) * 0.25).astype(int), 1)
    crop = np.zeros(hi - lo + 2 * pad, np.uint8)
    inner = tuple(slice(p, p + n) for p, n in zip(pad, hi - lo, strict=True))
    crop[inner] = comp[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    full = np.zeros(comp.shape)
    full[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = ndimage.distance_transform_edt(
        crop
    )[inner]
    state = np.random.get_state()
    try:
        np.random.seed(42)
        maxima = np.argwhere(full == full.max())
        z, y, x = maxima[np.random.choice(len(maxima))]
    finally:
        np.random.set_state(state)
    return (float(z), float(y), float(x)), bool(gt[z, y, x])


def test_click_equals_the_challenge_style_computation_on_random_blobs():
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(20):
        gt = ndimage.binary_opening(rng.random((10, 14, 12)) > 0.45)
        pred = ndimage.binary_dilation(gt) if rng.random() < 0.5 else ndimage.binary_erosion(gt)
        pred ^= rng.random(gt.shape) > 0.93
        click = next_click(pred, gt)
        assert (click.zyx, click.positive) == _challenge_style_click(pred, gt)  # 17 of 20 tie


# --------------------------------------------------------------------------- initial box
def test_challenge_box_on_median_voxel_slice():
    gt = _zeros((10, 12, 12))
    gt[2, 5, 5] = True
    gt[5, 3:5, 2:7] = True  # 10 voxels
    gt[6, 9, 9] = True
    # z of the voxels in C order: [2, 5 x 10, 6]; the 12 // 2 = 6th is 5 (the range's middle, 4,
    # is empty)
    b = challenge_box(gt)
    assert b == ChallengeBox(z_mid=5, y0=3, x0=2, y1=4, x1=6, z_min=2, z_max=6)
    assert b.to_json() == {
        "z_min": 2,
        "z_max": 6,
        "z_mid": 5,
        "z_mid_x_min": 2,
        "z_mid_y_min": 3,
        "z_mid_x_max": 6,
        "z_mid_y_max": 4,
    }
    assert ChallengeBox.from_json(b.to_json()) == b
    p = b.to_prompt()
    assert (p.z, p.rc) == (5, (3.0, 2.0, 4.0, 6.0))
    if hasattr(p, "z_min"):
        assert (p.z_min, p.z_max) == (2, 6)
    with pytest.raises(InputError, match="empty"):
        challenge_box(_zeros())
    with pytest.raises(InputError, match="z_mid"):
        ChallengeBox.from_json({"z_min": 1})


def test_one_pixel_box_is_widened():
    gt = _zeros()
    gt[4, 0, 3] = True
    p = challenge_box(gt).to_prompt()
    assert p.rc == (0.0, 2.0, 1.0, 3.0)


# --------------------------------------------------------------------------- scores
def test_nsd_by_hand_and_against_metrics():
    gt, pred = _zeros((1, 4, 12)), _zeros((1, 4, 12))
    gt[0, :, 0:4] = True  # one-voxel-thick plates: every voxel is surface
    pred[0, :, 3:7] = True  # shifted by 3 columns: overlap one column
    d, n = step_scores(pred, gt, (1.0, 1.0, 1.0))
    assert d == pytest.approx(2 * 4 / 32)
    # distances per column 0, 1, 2, 3 mm both ways; within 2 mm: 12 of 16 each way
    assert n == pytest.approx(24 / 32)
    assert n == metrics.surface_dice(pred, gt, (1.0, 1.0, 1.0), tolerance_mm=2.0)
    # anisotropic spacing: columns 1.5 mm apart, so only 0 and 1.5 mm are within 2 mm
    d, n = step_scores(pred, gt, (1.0, 1.0, 1.5))
    assert n == pytest.approx(16 / 32)
    # no overlap: DSC 0 <= 0.2 -> NSD counted 0 although half the surfaces are within 2 mm
    far = _zeros((1, 4, 12))
    far[0, :, 4:8] = True
    assert metrics.surface_dice(far, gt, None, tolerance_mm=2.0) == pytest.approx(0.5)
    assert step_scores(far, gt, None) == (0.0, 0.0)


def test_auc_by_hand():
    dsc = [0.5, 0.6, 0.7, 0.7, 0.8, 0.9]
    # the box step is left out: trapezoids over 0.6, 0.7, 0.7, 0.8, 0.9 at x = 0..4
    assert auc(dsc) == pytest.approx(0.65 + 0.7 + 0.75 + 0.85)
    assert auc([1.0] * 6) == pytest.approx(4.0)
    assert auc([0.3, 0.4, 0.8], clicks=2) == pytest.approx(0.6)
    assert auc([0.3], clicks=0) == 0.0 and auc([0.3, 0.4], clicks=1) == 0.0


# --------------------------------------------------------------------------- the driver
def _box_then_cubes(shape):
    """A deterministic segmenter: the box's prism over its z range, then each click sets the
    3x3x3 block around it to the click's sign."""
    state = {"pred": np.zeros(shape, bool)}

    def add(prompt):
        p = state["pred"]
        if hasattr(prompt, "rc"):
            r0, c0, r1, c1 = (int(v) for v in prompt.rc)
            z0, z1 = getattr(prompt, "z_min", None), getattr(prompt, "z_max", None)
            z0 = prompt.z if z0 is None else z0
            z1 = prompt.z if z1 is None else z1
            p[z0 : z1 + 1, r0 : r1 + 1, c0 : c1 + 1] = True
        else:
            z, y, x = (int(v) for v in prompt.zyx)
            p[max(z - 1, 0) : z + 2, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = prompt.positive
        return p.astype(np.uint8) * 3  # any non-zero value is the structure

    return add


def test_run_protocol_bookkeeping():
    gt = _zeros((12, 16, 16))
    gt[3:9, 4:12, 4:12] = True
    gt[6, 2:4, 6:8] = True  # a bump the box on the median slice misses elsewhere
    gt[3:5, 4:7, 4:7] = False  # a notch the box over-covers
    spacing = (2.0, 1.0, 1.0)
    dsc, nsd, secs, prompts, steps = run_protocol(
        _box_then_cubes(gt.shape), gt, spacing, clicks=3, keep_steps=True
    )
    assert len(dsc) == len(nsd) == len(secs) == len(prompts) == len(steps) == 4
    box = challenge_box(gt)
    assert prompts[0]["challenge_box"] == box.to_json() and prompts[0]["kind"] == "box"
    prev = None
    for i, step in enumerate(steps):
        d, n = step_scores(step, gt, spacing)
        assert (dsc[i], nsd[i]) == (d, n)
        if i:  # each click is the rule's click on the previous step's prediction
            expect = next_click(prev, gt)
            assert prompts[i] == expect.to_json()
        prev = step
    assert all(s >= 0 for s in secs)
    with pytest.raises(InputError, match="clicks"):
        run_protocol(_box_then_cubes(gt.shape), gt, spacing, clicks=-1)
    with pytest.raises(InputError, match="empty"):
        run_protocol(_box_then_cubes(gt.shape), _zeros(), spacing)


def test_run_protocol_perfect_prediction_adds_no_click():
    gt = _zeros()
    gt[2:5, 2:5, 2:5] = True

    def add(prompt):
        return gt

    dsc, nsd, _, prompts, _ = run_protocol(add, gt, None, clicks=2)
    assert dsc == [1.0, 1.0, 1.0] and nsd == [1.0, 1.0, 1.0]
    assert prompts[1] is None and prompts[2] is None


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def sam_cache(tmp_path_factory):
    """One embedding cache for the module's real-model tests."""
    return tmp_path_factory.mktemp("sam_cache")


@pytest.fixture(scope="module")
def breast_crop(pyradiomics_dir):
    """breast1 (real MR) cropped to 5 slices around its tumour (z 8..10), Volume + LabelMap."""
    import medseg

    img = medseg.read_volume(pyradiomics_dir / "breast1_image.nrrd")
    gt = medseg.read_labels(pyradiomics_dir / "breast1_label.nrrd", reference=img)
    z = slice(7, 12)
    geo = {"spacing": img.spacing}  # the .npz stores no direction / origin
    return (
        medseg.Volume(img.array[z], meta={"modality": "MR"}, **geo),
        medseg.LabelMap(gt.array[z], **geo),
    )


def test_evaluate_interactive_cli_on_real_npz(breast_crop, sam_cache, tmp_path, capsys):
    from medseg.io.npz import write_npz

    img, gt = breast_crop
    case = write_npz(tmp_path / "MR_breast1.npz", img, gt)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medseg", "evaluate-interactive", str(case), "--clicks", "2"]
    cmd += ["--json", str(out / "r.json"), "--out", str(out / "final.nii.gz")]
    cmd += ["--cache-dir", str(sam_cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "r.json").read_text())
    (r,) = doc["labels"]  # no --label and one label in the .npz's gts
    assert r["label"] == 1 and len(r["dsc"]) == len(r["nsd"]) == len(r["steps"]) == 3
    mask = gt.array == 1
    assert r["steps"][0]["prompt"]["challenge_box"] == challenge_box(mask).to_json()
    assert r["dsc_auc"] == pytest.approx(auc(r["dsc"], 2)) and r["final_dsc"] == r["dsc"][-1]
    # independent check: Dice / NSD recomputed from the label map the command saved
    import medseg

    saved = medseg.read_labels(out / "final.nii.gz").array == 1
    d, n = step_scores(saved, mask, img.spacing)
    assert r["final_dsc"] == pytest.approx(d, abs=1e-6)
    assert r["final_nsd"] == pytest.approx(n, abs=1e-6)
    assert r["final_dsc"] > 0.3  # LiteMedSAM on a real tumour, not an empty mask
    assert "DSC_AUC" in res.stdout and f"{r['final_dsc']:.4f}" in res.stdout
    # bad input: one clear line, exit 2
    from medseg.cli import main

    assert main(["evaluate-interactive", str(case), "--label", "7"]) == 2
    assert "label 7 is not in the ground truth" in capsys.readouterr().err


def test_evaluate_interactive_every_label_shares_the_model(breast_crop, sam_cache):
    from medseg.protocol import evaluate_interactive

    img, gt = breast_crop
    two = gt.array.copy()
    two[:, :, 25:][two[:, :, 25:] == 1] = 2  # the tumour's right part becomes label 2
    gt2 = type(gt)(two, spacing=gt.spacing, labels={1: "left", 2: "right"})
    results, final = evaluate_interactive(
        img, gt2, clicks=1, cache_dir=str(sam_cache), keep_steps=True
    )
    assert [r.label for r in results] == [1, 2] and [r.name for r in results] == ["left", "right"]
    for r in results:
        truth = two == r.label
        assert r.dsc[-1] == pytest.approx(metrics.dice(r.labels.array != 0, truth), abs=1e-6)
        assert r.dsc == [step_scores(s, truth, img.spacing)[0] for s in r.steps]
    assert results[1].predictor is results[0].predictor  # embeddings reused across labels
    assert np.array_equal(final.array == 2, results[1].labels.array != 0)
    assert final.same_grid(img) and final.labels == {1: "left", 2: "right"}


def test_batch_protocol_interactive_rows_and_resume(breast_crop, tmp_path, capsys):
    import csv

    import medseg
    from medseg.batches import find_studies, study_paths
    from medseg.protocol import batch_columns, check_batch_study

    img, gt = breast_crop
    data = tmp_path / "data"
    data.mkdir()
    medseg.write_labels(gt, data / "b1_gt.nii.gz")
    from medseg.io import write_volume

    write_volume(img, data / "b1.nii.gz")
    write_volume(img, data / "nogt.nii.gz")  # no ground truth: fails alone
    out = tmp_path / "out"
    from medseg.cli import main

    cmd = ["batch", "--data", str(data), "--model", "litemedsam", "--out", str(out)]
    cmd += ["--protocol", "interactive", "--clicks", "1", "--quiet"]
    assert main(cmd) == 1  # one study failed (in-process: the model loads once per module)
    capsys.readouterr()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == batch_columns(1)
    assert [(r["study"], r["label"], r["status"]) for r in rows] == [
        ("b1", "1", "ok"),
        ("nogt", "", "failed"),
    ]
    assert "no ground truth" in rows[1]["error"]
    lab_path, rep_path = study_paths(out, "b1")
    doc = json.loads(rep_path.read_text())
    (e,) = doc["labels"]
    saved = medseg.read_labels(lab_path).array == 1
    d, n = step_scores(saved, gt.array == 1, img.spacing)
    assert float(rows[0]["final_dsc"]) == pytest.approx(d, abs=1e-6) == e["final_dsc"]
    assert float(rows[0]["final_nsd"]) == pytest.approx(n, abs=1e-6)
    assert float(rows[0]["dsc_0"]) == pytest.approx(e["dsc"][0])
    assert float(rows[0]["dsc_auc"]) == 0.0  # one click step: no trapezoid
    # a rerun keeps the complete study and rebuilds the same table
    before = (out / "metrics.csv").read_text()
    assert main(cmd) == 1
    assert "1 kept from an earlier run" in capsys.readouterr().out
    assert (out / "metrics.csv").read_text() == before
    # a changed ground truth is noticed
    study = find_studies(data)[0]
    assert check_batch_study(study, out) is None
    changed = gt.array.copy()
    changed[0, 0, 0] = 1
    medseg.write_labels(gt.with_array(changed), data / "b1_gt.nii.gz", overwrite=True)
    assert check_batch_study(study, out) == "the ground truth changed"
