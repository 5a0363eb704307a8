"""The notebooks in ``notebooks/`` run end to end (nbclient, this venv's kernel) and compute what
they say they compute.

Each notebook runs in a fresh ``tmp_path`` working directory; its last cell (tagged ``summary``)
prints one JSON object, which is checked here against independent readings of the files the
notebook wrote (SimpleITK reads, numpy Dice) and of the sample data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SAMPLE = REPO / "sample_data"
CELL_TIMEOUT_S = 900  # per cell; a loaded 2-core machine is many times slower than an idle one


def _summary(nb: Any) -> dict[str, Any]:
    cells = [c for c in nb.cells if "summary" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'summary'"
    text = "".join(o.get("text", "") for o in cells[0].outputs if o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def _execute(name: str, cwd: Path) -> tuple[Any, dict[str, Any]]:
    """Run ``notebooks/<name>`` with ``cwd`` as working directory; return it and its summary."""
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.get("output_type") == "error"]
            assert not errors, f"cell raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    summary = _summary(nb)
    # the kernel ran this interpreter's environment (the venv), not some other python3
    assert Path(summary["prefix"]).resolve() == Path(sys.prefix).resolve()
    return nb, summary


def _sitk(path: Path) -> tuple[np.ndarray, tuple, tuple, tuple]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- static checks
@pytest.mark.parametrize(
    "name", ["quickstart.ipynb", "batch_evaluation.ipynb", "export_dicom.ipynb"]
)
def test_notebook_is_clean_and_documented(name: str) -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs"
    # sections: a "## " markdown cell introduces each, and each section holds code
    heads = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "markdown" and c.source.startswith("## ")
    ]
    assert len(heads) >= 4
    for start, end in zip(heads, [*heads[1:], len(nb.cells)], strict=True):
        kinds = [c.cell_type for c in nb.cells[start + 1 : end]]
        assert "code" in kinds, f"section {nb.cells[start].source.splitlines()[0]!r} has no code"


def test_notebooks_match_their_generator() -> None:
    run = subprocess.run(
        [sys.executable, str(NOTEBOOKS / "_build.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_python3_kernelspec_is_this_interpreter() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client launches a bare python / pythonX / pythonX.Y as sys.executable (not the
    # first one on PATH); any other command must be this interpreter itself
    major, minor = sys.version_info[:2]
    bare = {"python", f"python{major}", f"python{major}.{minor}"}
    assert argv0 in bare or Path(argv0).resolve() == Path(sys.executable).resolve()


# --------------------------------------------------------------------------- execution
@pytest.mark.slow
def test_quickstart_runs_and_scores_the_tumour(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDSEG_SAMPLE_DATA", str(SAMPLE))
    _, s = _execute("quickstart.ipynb", tmp_path)

    gt, spacing, origin, direction = _sitk(SAMPLE / "brain1" / "brain1_label.nrrd")
    gt = gt == 1
    areas = gt.sum(axis=(1, 2))
    assert s["image_shape"] == list(gt.shape)
    assert s["gt_slices"] == [int(i) for i in np.flatnonzero(areas)]
    assert s["key_slice"] == int(np.argmax(areas))
    r0, c0, r1, c1 = s["box_rc"]
    rows, cols = np.nonzero(gt[s["key_slice"]])
    assert (r0, c0, r1, c1) == (rows.min() - 3, cols.min() - 3, rows.max() + 3, cols.max() + 3)

    # one box + propagation on a real tumour; the oracle (a box per slice) is the upper bound
    assert s["key_slice"] in s["slices"]
    assert set(s["review"]) <= set(s["slices"]) - {s["key_slice"]}
    assert s["dice"] > 0.5 and s["iou"] > 0.3
    assert 0.0 < s["hd95"] < 100.0
    assert s["oracle_dice"] > 0.7
    # only the slices the walk visited (accepted or rejected) were embedded, each once
    assert set(s["slices"]) <= set(s["visited_one_box"])
    assert s["encoder_calls"] == len(s["visited_one_box"])
    # a second box on a missed slice: more slices, a better Dice, nothing embedded twice
    assert len(s["key_slices_final"]) == 2 and set(s["slices"]) < set(s["slices_final"])
    assert s["dice_final"] > s["dice"]
    assert s["encoder_calls_final"] == len(s["visited"])

    # the written label maps, read by SimpleITK: the image's grid, and the reported Dice
    assert len(s["written"]) == 2
    for w in s["written"]:
        path = tmp_path / w["path"]
        assert path.is_file() and w["same_grid"] and w["equal"]
        arr, sp, org, dirn = _sitk(path)
        np.testing.assert_allclose(sp, spacing, atol=1e-6)
        np.testing.assert_allclose(org, origin, atol=1e-4)
        np.testing.assert_allclose(dirn, direction, atol=1e-6)
        assert set(np.unique(arr)) <= {0, 1}
        assert _dice(arr == 1, gt) == pytest.approx(s["dice_final"], abs=1e-9)
    assert not any((SAMPLE / "brain1").glob("*pred*")), "the notebook wrote into sample_data"

    # the phantom DICOM series, read by SimpleITK, holds the generator's HU on its grid
    import SimpleITK as sitk

    from medseg.phantom import make_phantom

    ph = s["phantom"]
    vol, _ = make_phantom(ph["seed"], tuple(ph["shape"]), tuple(ph["spacing"]))
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(tmp_path / ph["dicom_dir"]))
    assert len(files) == ph["files"] == vol.shape[0]
    reader.SetFileNames(files)
    img = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol.array)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing_xyz, atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), vol.origin, atol=1e-3)
    assert ph["same_grid"] and ph["equal"]
    assert s["info_rc"] == 0


@pytest.mark.slow
def test_batch_evaluation_records_the_failure_and_goes_on(tmp_path: Path) -> None:
    _, s = _execute("batch_evaluation.ipynb", tmp_path)

    status = {st["case"]: st for st in s["status"]}
    assert [st["case"] for st in s["status"]] == s["studies"]
    broken = s["studies"].index("broken_case")
    assert 0 < broken < len(s["studies"]) - 1  # a study after it was still processed
    assert not status["broken_case"]["ok"]
    assert status["broken_case"]["error"] == "InputError"
    assert "broken_case.nii.gz" in status["broken_case"]["message"]
    ok = [c for c in s["studies"] if c != "broken_case"]
    assert ok and all(status[c]["ok"] for c in ok)

    # per-case Dice recomputed from the written files (SimpleITK + numpy)
    root = tmp_path / "batch_output"
    values = s["label_values"]  # {name: label value} of the labels scored
    for case in ok:
        pred, psp, porg, _ = _sitk(tmp_path / status[case]["prediction"])
        gt, gsp, gorg, _ = _sitk(root / "phantoms" / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_allclose(psp, gsp, atol=1e-6)
        np.testing.assert_allclose(porg, gorg, atol=1e-4)
        assert set(status[case]["dice"]) == set(values)
        for name, d in status[case]["dice"].items():
            value = values[name]
            assert _dice(pred == value, gt == value) == pytest.approx(d, abs=1e-9)

    # the accumulator's table: every label over every scored case
    table = s["per_label"]
    assert table and all(row["n_cases"] == len(ok) for row in table.values())
    for name, row in table.items():
        mean = np.mean([status[c]["dice"][name] for c in ok])
        assert row["dice_mean"] == pytest.approx(mean, abs=1e-12)
    assert set(table) == set(values)
    if s["method"].startswith("litemedsam"):  # boxes from the label on every slice
        assert set(values) == {"liver", "tumour", "kidney", "spleen"}
        assert table["liver"]["dice_mean"] > 0.6 and table["kidney"]["dice_mean"] > 0.8
    else:  # the demo U-Net, trained on such phantoms
        assert all(row["dice_mean"] > 0.5 for row in table.values())
        assert table["liver"]["dice_mean"] > 0.8

    report = json.loads((tmp_path / s["report"]).read_text())
    assert len(report["per_case"]) == len(ok) * len(table)
    assert [st["case"] for st in report["status"]] == s["studies"]

    # medseg.batch over the same dataset gives the hand-written loop's Dice, study by study
    expect = {f"{c}/{name}": d for c in ok for name, d in status[c]["dice"].items()}
    assert set(s["batch_dice"]) == set(expect)
    for key, d in expect.items():
        assert s["batch_dice"][key] == pytest.approx(d, abs=1e-9), key
    assert s["batch_counts"] == {"ok": len(ok)}
    assert s["batch_rerun_counts"] == {"skipped": len(ok)}  # a rerun redoes nothing
    assert {Path(p).name for p in s["batch_plots"]} == {"dice_per_label.png", "worst_slices.png"}


@pytest.mark.slow
def test_export_notebook_round_trips_seg_and_rtstruct(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    _, s = _execute("export_dicom.ipynb", tmp_path)

    assert s["oblique"] and s["seg_equal"]
    assert all(d > 0.9 for d in s["rt_dice"].values()), s["rt_dice"]
    assert s["dice"]["liver"] > 0.6  # the demo U-Net on a small coarse phantom: 0.70 measured
    assert s["provenance_weights"] == s["report_weights"] and len(s["report_weights"]) == 64
    assert s["info_rc"] == 0
    # the files, read by highdicom / pydicom directly
    import highdicom as hd
    import pydicom

    out = tmp_path / "export_output"
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == len(s["rt_dice"])
    assert pydicom.dcmread(out / "rt.dcm").Modality == "RTSTRUCT"


@pytest.mark.slow
def test_finetune_notebook_trains_and_scores_before_after(tmp_path: Path) -> None:
    _, s = _execute("finetune_decoder.ipynb", tmp_path)

    from medseg.models.decoder import read_decoder
    from medseg.models.weights import sha256_file

    decoder = tmp_path / s["decoder"]
    assert decoder.is_file() and sha256_file(decoder, disk_cache=False) == s["decoder_sha256"]
    info = read_decoder(decoder)
    assert info.base["model"] == "litemedsam" and info.label["name"] == "tumour"
    assert s["before"]["decoder_sha256"] is None
    assert s["after"]["decoder_sha256"] == s["decoder_sha256"]
    # validation on a held-out volume only; epoch 0 is the zero-shot decoder
    assert len(s["val_cases"]) == 1 and not set(s["val_cases"]) & set(s["train_cases"])
    assert [r["epoch"] for r in s["history"]] == [0, 1, 2]
    # the kept epoch is the best on the held-out volume (epoch 0 = the base decoder)
    best = max(r["val_box_dice"] for r in s["history"])
    assert s["history"][s["best_epoch"]]["val_box_dice"] == best
    # before/after on the unseen volume are real scores of different decoders
    for step in ("before", "after"):
        assert 0.3 < s[step]["oracle_dice"] <= 1.0 and 0.0 <= s[step]["propagated_dice"] <= 1.0
