"""PACS push from batch / export, batch over a QIDO query, RTSTRUCT push — against a real Orthanc.

Reuses the Orthanc fixture class of ``test_pacs`` (skips with one line where Orthanc is absent).
Two small seeded phantom series of one patient are stored in the server; the U-Net demo model
segments them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medseg
from medseg.io import remote
from medseg.io.files import write_labels, write_volume
from test_pacs import Orthanc, _cli

PATIENT = "BATCHPACS"
SHAPE, SPACING = (8, 48, 48), (5.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    s = Orthanc(tmp_path_factory.mktemp("orthanc_batch"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def series(server: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two phantom CT series of one patient (two studies), stored in ``server``; returns
    ``{series URL: local copy}``."""
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom

    root = tmp_path_factory.mktemp("local_series")
    out: dict[str, Path] = {}
    for seed in (1, 2):
        vol, _ = make_phantom(seed, SHAPE, SPACING)
        folder = root / f"s{seed}"
        write_dicom_series(vol, folder, uid_seed=f"batch-pacs-{seed}", patient_id=PATIENT)
        remote.push_files(sorted(folder.iterdir()), server.root)
        ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        url = f"{server.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        out[url] = folder
    return out


def _segs(server: Orthanc) -> list[dict]:
    return [r for r in remote.search(server.root, patient=PATIENT) if r["modality"] == "SEG"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_batch_over_query_pushes_each_seg_once(
    server: Orthanc, series: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "OUT"
    query = f"{server.root}/studies?PatientID={PATIENT}"
    n_segs = len(_segs(server))
    res = medseg.batch(query + "&Modality=CT", "unet-demo", out, push=True, plots=False)
    assert res.ok and res.push
    rows = _read_csv(out / "metrics.csv")
    assert sorted(r["study"] for r in rows) == sorted(series)  # one row per series, id = URL
    assert {r["status"] for r in rows} == {"no_gt"}
    pushed = {r["study"]: r["pushed"] for r in rows}
    assert all(pushed.values())

    assert len(_segs(server)) == n_segs + 2
    for url, local in series.items():
        _check_pushed(server, out, url, local, pushed[url], server.root, tmp_path)

    # the CLI with the search filter flags sees the same two studies, both complete
    args = ["batch", "--data", query, "--modality", "CT", "--model", "unet-demo", "--out"]
    res = _cli(*args, str(out), "--push", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert sorted(line.split()[:2] for line in res.stdout.splitlines()[:-1]) == sorted(
        ["skip", u] for u in series
    )
    # resume (the query without Modality: the pushed SEG series are not studies): nothing is
    # segmented or pushed again
    again = medseg.batch(query, "unet-demo", out, push=True, plots=False)
    assert sorted((r.study, r.status) for r in again.studies) == sorted(
        (u, "skipped") for u in series
    )
    assert {r.study: r.pushed for r in again.studies} == pushed
    assert len(_segs(server)) == n_segs + 2


def _check_pushed(
    server: Orthanc, out: Path, study: str, local: Path, sop: str, to: str, tmp: Path
) -> None:
    """The push record of ``study`` names ``sop`` on ``to``; that SEG, fetched back from the
    server, is a new series of the source study and equals the batch's label map."""
    ref = remote.parse_remote_series(study)
    record = json.loads((out / "studies" / f"{ref.series}.push.json").read_text())
    assert record["sop_instance_uid"] == sop and record["to"] == to
    assert record["study_uid"] == ref.study and record["series_uid"] != ref.series
    seg_url = f"{server.root}/studies/{ref.study}/series/{record['series_uid']}"
    pulled = tmp / f"pulled_{record['series_uid']}"
    remote.pull_series(seg_url, pulled)
    (seg_file,) = list(pulled.iterdir())
    assert str(pydicom.dcmread(seg_file).SOPInstanceUID) == sop
    image = medseg.read_volume(local)
    back = medseg.read_labels(seg_file, reference=image)
    want = medseg.read_labels(out / "studies" / f"{ref.series}.nii.gz", reference=image)
    assert want.array.max() > 0  # real segments are compared
    np.testing.assert_array_equal(back.array, want.array)


def test_batch_over_dimse_query_pushes_by_c_store(
    server: Orthanc, series: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "OUT"
    res = medseg.batch(
        f"{server.dimse}?PatientID={PATIENT}", "unet-demo", out, push=True, plots=False
    )
    assert res.ok
    by_series = {remote.parse_series_url(u).series: local for u, local in series.items()}
    assert sorted(r.study.rsplit("/", 1)[1] for r in res.studies) == sorted(by_series)
    for r in res.studies:
        assert r.study.startswith(server.dimse + "/studies/")
        local = by_series[r.study.rsplit("/", 1)[1]]
        _check_pushed(server, out, r.study, local, r.pushed, server.dimse, tmp_path)


def test_push_failure_is_recorded_and_retried(
    series: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = tmp_path / "data"  # local DICOM studies, pushed with --to
    data.mkdir()
    for i, folder in enumerate(series.values()):
        (data / f"case{i}").symlink_to(folder, target_is_directory=True)
    write_volume(medseg.read_volume(folder), data / "nifti.nii.gz")  # no DICOM: cannot be pushed
    down = Orthanc(tmp_path_factory.mktemp("orthanc_down"))
    down.stop()  # stopped before the push
    out = tmp_path / "OUT"
    res = medseg.batch(data, "unet-demo", out, push=True, to=down.root, plots=False)
    assert [r.study for r in res.failed] == ["case0", "case1", "nifti"]
    rows = _read_csv(out / "metrics.csv")
    assert [(r["study"], r["status"], r["pushed"]) for r in rows] == [
        ("case0", "failed", ""),
        ("case1", "failed", ""),
        ("nifti", "failed", ""),
    ]  # the batch went on after the first failure
    assert all("push failed" in r["error"] and "cannot reach" in r["error"] for r in rows[:2])
    assert "not a DICOM series" in rows[2]["error"] and "push failed" not in rows[2]["error"]
    assert (out / "studies" / "case0.nii.gz").is_file()  # the segmentation is kept
    assert not (out / "studies" / "case0.push.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [f["study"] for f in summary["failed"]] == ["case0", "case1", "nifti"]

    up = Orthanc(tmp_path_factory.mktemp("orthanc_up"))
    try:
        before = (out / "studies" / "case0.json").stat().st_mtime_ns
        again = medseg.batch(data, "unet-demo", out, push=True, to=up.root, plots=False)
        assert [(r.study, r.status) for r in again.studies] == [
            ("case0", "skipped"),
            ("case1", "skipped"),
            ("nifti", "failed"),
        ]  # pushed now, not segmented again
        assert (out / "studies" / "case0.json").stat().st_mtime_ns == before
        segs = [r for r in remote.search(up.root) if r["modality"] == "SEG"]
        assert sorted(s["study_uid"] for s in segs) == sorted(
            remote.parse_series_url(u).study for u in series
        )
        rows = _read_csv(out / "metrics.csv")
        assert [r["pushed"] for r in rows] == [r.pushed for r in again.studies]
        assert [bool(r.pushed) for r in again.studies] == [True, True, False]
    finally:
        up.stop()


def test_push_needs_a_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    res = _cli("batch", "--data", str(data), "--model", "unet-demo", "--out", "o", "--push")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "give --to URL" in res.stderr
    lab = tmp_path / "l.nii.gz"
    res = _cli("export", str(lab), "--reference", str(data), "--out", "x.dcm", "--push")
    assert res.returncode == 2 and "give --to URL" in res.stderr and "Traceback" not in res.stderr
    res = _cli("export", str(lab), "--reference", str(data), "--out", "x.dcm", "--to", "http://h")
    assert res.returncode == 2 and "add --push" in res.stderr
    assert list(tmp_path.iterdir()) == [data]  # nothing written


def _boxes(image: medseg.Volume) -> medseg.LabelMap:
    """Two boxes: label 1 on slices 2..4, label 2 on slices 1..6 (so 3 and 6 contours)."""
    a = np.zeros(image.array.shape, np.uint8)
    a[2:5, 10:20, 10:20] = 1
    a[1:7, 28:40, 25:35] = 2
    return medseg.LabelMap(
        array=a,
        labels={1: "liver", 2: "spleen"},
        spacing=image.spacing,
        origin=image.origin,
        direction=image.direction,
    )


def _rois(path: Path) -> dict[str, int]:
    """ROI name -> number of contours, read from an RTSTRUCT file."""
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    return {
        names[int(c.ReferencedROINumber)]: len(c.ContourSequence) for c in ds.ROIContourSequence
    }


def test_export_push_seg_and_rtstruct(
    server: Orthanc, series: dict[str, Path], tmp_path: Path
) -> None:
    url, local = next(iter(series.items()))
    ref = remote.parse_series_url(url)
    image = medseg.read_volume(local)
    lab = tmp_path / "boxes.nii.gz"
    write_labels(_boxes(image), lab, reference=image)
    before = {r["series_uid"] for r in remote.search(server.root, patient=PATIENT)}

    # DICOM-SEG, reference given as the series URL: stored on its server
    res = _cli("export", str(lab), "--reference", url, "--out", str(tmp_path / "seg.dcm"), "--push")
    assert res.returncode == 0, res.stderr
    # RTSTRUCT from a local reference, pushed with --to
    rt = tmp_path / "rt.dcm"
    args = ["export", str(lab), "--reference", str(local), "--format", "rtstruct", "--out", str(rt)]
    res = _cli(*args, "--push", "--to", server.root)
    assert res.returncode == 0, res.stderr
    # an RTSTRUCT file pushed on its own (`medseg push FILE --to URL`)
    rt2 = tmp_path / "rt2.dcm"
    medseg.export(_boxes(image), local, "rtstruct", rt2)
    res = _cli("push", str(rt2), "--to", server.root)
    assert res.returncode == 0, res.stderr

    new = [
        r
        for r in remote.search(server.root, patient=PATIENT)
        if r["series_uid"] not in before and r["study_uid"] == ref.study
    ]
    assert sorted(r["modality"] for r in new) == ["RTSTRUCT", "RTSTRUCT", "SEG"]
    for row in new:
        pulled = tmp_path / f"pulled_{row['series_uid']}"
        remote.pull_series(row["url"], pulled)
        (f,) = list(pulled.iterdir())
        if row["modality"] == "SEG":
            back = medseg.read_labels(f, reference=image)
            np.testing.assert_array_equal(back.array, _boxes(image).array)
        else:
            assert _rois(f) == {"liver": 3, "spleen": 6}  # one contour per slice of each box
            back = medseg.read_labels(f, reference=image)
            assert sorted(back.labels.values()) == ["liver", "spleen"]
