"""``medseg batch`` / ``medseg.batch``: a folder of phantom studies (NIfTI files, one DICOM
series, a truncated file) through the one pipeline; resumable after SIGKILL; Dask gives the same
Dice as the local executor; SAM with prompts from the ground truth or a prompts file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.batches import (
    Study,
    check_study_outputs,
    find_studies,
    load_batch_prompts,
    study_paths,
    worst_slice,
)
from medseg.errors import InputError, OutputError

SHAPE = (16, 64, 64)
#: the demo U-Net's field of view (it was trained on 48 x 160 x 160 phantoms at 3 x 1.2 x 1.2 mm)
SPACING = (9.0, 3.0, 3.0)
GOOD = ["case0", "case1", "case2", "dcm3"]


def _write_studies(folder: Path, seeds: dict[str, int], dicom: str | None = None) -> None:
    from medseg.io.dicom_write import write_dicom_series
    from medseg.io.itk import write_image
    from medseg.phantom import make_phantom

    folder.mkdir(parents=True)
    for name, seed in seeds.items():
        img, lab = make_phantom(seed=seed, shape=SHAPE, spacing=SPACING)
        if name == dicom:
            write_dicom_series(img, folder / name, uid_seed=name)
        else:
            write_image(img, folder / f"{name}.nii.gz")
        write_image(lab, folder / f"{name}_gt.nii.gz")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four phantom studies with ground truth (one a DICOM series) and a truncated image."""
    d = tmp_path_factory.mktemp("batch") / "data"
    _write_studies(d, {"case0": 0, "case1": 1, "case2": 2, "dcm3": 3}, dicom="dcm3")
    blob = (d / "case0.nii.gz").read_bytes()
    (d / "broken.nii.gz").write_bytes(blob[: len(blob) // 3])
    (d / "notes.txt").write_text("not a study")
    return d


@pytest.fixture(scope="module")
def reference(data: Path) -> tuple[Path, medseg.batches.BatchResult]:
    """An uninterrupted local run."""
    out = data.parent / "ref"
    return out, medseg.batch(data, "unet-demo", out)


def _image(data: Path, sid: str) -> Path:
    return data / sid if sid.startswith("dcm") else data / f"{sid}.nii.gz"


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _env() -> dict[str, str]:
    src = str(Path(medseg.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", "batch", *args]


def _same_outputs(a: Path, b: Path, ids: list[str]) -> None:
    """Label maps voxel for voxel, metrics.csv and summary.json identical."""
    for sid in ids:
        la, lb = study_paths(a, sid)[0], study_paths(b, sid)[0]
        ma, mb = medseg.read_labels(la), medseg.read_labels(lb)
        assert ma.same_grid(mb) and np.array_equal(ma.array, mb.array), sid
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    for png in ("dice_per_label.png", "worst_slices.png"):
        assert (a / "plots" / png).read_bytes() == (b / "plots" / png).read_bytes(), png
    assert json.loads((a / "summary.json").read_text()) == json.loads(
        (b / "summary.json").read_text()
    )


# --------------------------------------------------------------------------- discovery
def test_find_studies_folder_rule_and_msd(data: Path, tmp_path: Path) -> None:
    studies = find_studies(data)
    assert [s.id for s in studies] == ["broken", "case0", "case1", "case2", "dcm3"]
    by = {s.id: s for s in studies}
    assert by["case1"].gt == data / "case1_gt.nii.gz" and by["broken"].gt is None
    assert by["dcm3"].image == data / "dcm3" and by["dcm3"].gt == data / "dcm3_gt.nii.gz"

    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "a.nii.gz").write_bytes(b"")
    (dup / "a.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="two studies are named 'a'"):
        find_studies(dup)
    with pytest.raises(InputError, match="no studies found"):
        find_studies(_empty(tmp_path))

    from medseg.io.datasets import write_msd_dataset
    from medseg.phantom import make_phantom

    cases = [(f"ph_{i}", *make_phantom(seed=i, shape=(8, 16, 16), spacing=SPACING)) for i in (0, 1)]
    write_msd_dataset(
        tmp_path / "msd", cases, name="t", description="t", labels={1: "liver", 2: "tumour"}
    )
    msd = find_studies(tmp_path / "msd")
    assert [(s.id, s.image.name, s.gt.name if s.gt else None) for s in msd] == [
        ("ph_0", "ph_0.nii.gz", "ph_0.nii.gz"),
        ("ph_1", "ph_1.nii.gz", "ph_1.nii.gz"),
    ]
    assert all(s.gt is not None and s.gt.parent.name == "labelsTr" for s in msd)


def _empty(tmp_path: Path) -> Path:
    e = tmp_path / "empty"
    e.mkdir()
    (e / "readme.txt").write_text("x")
    return e


def test_worst_slice_and_prompts_mapping(tmp_path: Path) -> None:
    gt = np.zeros((4, 5, 5), bool)
    pred = np.zeros((4, 5, 5), bool)
    gt[1, 1:3, 1:3] = True  # 4 voxels, predicted exactly
    gt[2, 0:4, 0:4] = True  # 16 voxels, 12 predicted -> 4 wrong
    pred[1, 1:3, 1:3] = True
    pred[2, 0:3, 0:4] = True
    pred[3, 0, 0:2] = True  # 2 false positives
    assert worst_slice(pred, gt) == 2
    assert worst_slice(gt, gt) == 2  # no error: the slice of largest ground truth

    f = tmp_path / "p.json"
    f.write_text(json.dumps({"a": {"boxes": [{"slice": 3, "box": [1, 2, 10, 12]}]}, "b": {}}))
    with pytest.raises(InputError, match=r"\['b'\]: no prompts"):
        load_batch_prompts(f)
    f.write_text(json.dumps({"a": {"boxes": [{"slice": 3, "box": [1, 2, 10, 12]}]}}))
    (box,) = load_batch_prompts(f)["a"]
    assert (box.z, box.rc) == (3, (1.0, 2.0, 10.0, 12.0))


# --------------------------------------------------------------------------- local run
def test_batch_reports_failures_and_aggregates(
    data: Path, reference: tuple[Path, medseg.batches.BatchResult]
) -> None:
    out, res = reference
    assert [(r.study, r.status) for r in res.studies] == [
        ("broken", "failed"),
        *[(s, "ok") for s in GOOD],
    ]
    (bad,) = res.failed
    assert "truncated" in bad.error and "\n" not in bad.error and not res.ok
    assert not study_paths(out, "broken")[0].exists()

    rows = _csv(out / "metrics.csv")
    assert list(rows[0]) == ["study", "label", "name", "dice", "iou", "hd95", "status", "error"]
    assert rows[0]["study"] == "broken" and rows[0]["status"] == "failed"
    assert rows[0]["error"] == bad.error
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["study"], r["label"]) for r in ok] == [
        (s, str(v)) for s in GOOD for v in (1, 2, 3, 4)
    ]
    for sid in GOOD:
        lab_path, rep_path = study_paths(out, sid)
        rep = json.loads(rep_path.read_text())
        medseg.validate_report(rep)
        assert rep["provenance"]["batch"]["study"] == sid
        study = Study(sid, _image(data, sid), data / f"{sid}_gt.nii.gz")
        assert check_study_outputs(study, out) is None
        # Dice recomputed independently from the files on disk
        image = medseg.read_volume(_image(data, sid))
        pred = medseg.read_labels(lab_path, reference=image)
        gt = medseg.read_labels(data / f"{sid}_gt.nii.gz", reference=image)
        assert pred.shape == image.shape == SHAPE
        for row in (r for r in ok if r["study"] == sid):
            v = int(row["label"])
            p, g = pred.array == v, gt.array == v
            want = 2 * (p & g).sum() / (p.sum() + g.sum())
            assert float(row["dice"]) == pytest.approx(want, abs=1e-12)
    # the demo U-Net segments these phantoms well; the liver at least
    assert min(float(r["dice"]) for r in ok if r["name"] == "liver") > 0.8

    summ = json.loads((out / "summary.json").read_text())
    assert summ["studies"] == 5 and summ["succeeded"] == 4
    assert summ["failed"] == [{"study": "broken", "error": bad.error}]
    for e in summ["labels"]:
        d = np.array([float(r["dice"]) for r in ok if int(r["label"]) == e["label"]])
        assert e["dice"]["count"] == 4
        assert e["dice"]["mean"] == pytest.approx(d.mean(), abs=1e-6)
        assert e["dice"]["median"] == pytest.approx(np.median(d), abs=1e-6)
        assert e["dice"]["std"] == pytest.approx(d.std(), abs=1e-6)
    worst = min((float(r["dice"]), r["study"]) for r in ok)
    assert (summ["worst_studies"][0]["dice"], summ["worst_studies"][0]["study"]) == worst

    import matplotlib.image

    for p in res.plots:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01, p
    assert [p.name for p in res.plots] == ["dice_per_label.png", "worst_slices.png"]


def test_rerun_checks_outputs_not_existence(
    data: Path, reference: tuple[Path, medseg.batches.BatchResult], tmp_path: Path
) -> None:
    import shutil

    ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    # damage: a truncated label map, a report whose image digest does not match, a stale temp
    lab1 = study_paths(out, "case1")[0]
    lab1.write_bytes(lab1.read_bytes()[:200])
    rep2 = study_paths(out, "case2")[1]
    rep = json.loads(rep2.read_text())
    rep["image"]["sha256"] = "0" * 64
    rep2.write_text(json.dumps(rep))
    (out / "studies" / ".case0.nii.gz.abc.part.nii.gz").write_bytes(b"junk")
    (out / "metrics.csv").write_text("stale")

    studies = {s.id: s for s in find_studies(data)}
    why = check_study_outputs(studies["case1"], out)
    assert why is not None and why.startswith("unreadable")
    assert check_study_outputs(studies["case2"], out) == "the image changed"
    assert check_study_outputs(studies["case0"], out) is None
    other_gt = Study("case0", data / "case0.nii.gz", data / "case1_gt.nii.gz")
    assert check_study_outputs(other_gt, out) == "the ground truth changed"

    dry = medseg.batch(data, "unet-demo", out, dry_run=True)
    assert [(r.study, r.status) for r in dry.studies] == [
        ("broken", "run"),
        ("case0", "skip"),
        ("case1", "run"),
        ("case2", "run"),
        ("dcm3", "skip"),
    ]
    res = medseg.batch(data, "unet-demo", out)
    assert [(r.study, r.status) for r in res.studies] == [
        ("broken", "failed"),
        ("case0", "skipped"),
        ("case1", "ok"),
        ("case2", "ok"),
        ("dcm3", "skipped"),
    ]
    assert not any(".part" in f.name for f in (out / "studies").iterdir())
    _same_outputs(ref_out, out, GOOD)
    # a setting given at its default (as the CLI does) or one that does not change results
    # (the embedding cache) is the same run
    dry = medseg.batch(data, "unet-demo", out, dry_run=True, precision="auto", cache_dir=None)
    assert [r.status for r in dry.studies] == ["run", "skip", "skip", "skip", "skip"]
    # other settings are not the same outputs: everything reruns
    dry = medseg.batch(data, "unet-demo", out, dry_run=True, overlap=0.5)
    assert {r.status for r in dry.studies} == {"run"}
    assert {r.error for r in dry.studies if r.study != "broken"} == {"made with other settings"}


def test_dry_run_lists_and_writes_nothing(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    run = subprocess.run(
        _cli("--data", str(data), "--model", "unet-demo", "--out", str(out), "--dry-run"),
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines[:-1]] == [["run", s] for s in ["broken", *GOOD]]
    assert lines[-1] == "dry run: 5 to run, 0 complete; nothing written"
    assert not out.exists()

    with pytest.raises(OutputError, match="inside the data folder"):
        medseg.batch(data, "unet-demo", data / "out")
    with pytest.raises(InputError, match="prompts are for SAM"):
        medseg.batch(data, "unet-demo", out, prompts_from_gt=True)
    with pytest.raises(InputError, match="--prompts-from-gt or --prompts"):
        medseg.batch(data, "litemedsam", out)
    assert not out.exists()


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(
    data: Path, reference: tuple[Path, medseg.batches.BatchResult], tmp_path: Path
) -> None:
    ref_out, _ = reference
    out = tmp_path / "killed"
    cmd = _cli("--data", str(data), "--model", "unet-demo", "--out", str(out), "--quiet")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = study_paths(out, "case0")[1]  # studies run in name order; broken fails first
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()
    done = [s for s in GOOD if study_paths(out, s)[1].exists()]
    assert "case0" in done and len(done) < len(GOOD)

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 1, rerun.stderr  # the truncated study failed
    assert "broken: failed:" in rerun.stderr and "truncated" in rerun.stderr
    assert f"{len(done)} kept from an earlier run" in rerun.stdout
    _same_outputs(ref_out, out, GOOD)


def test_dask_two_workers_same_dice_as_local(
    data: Path,
    reference: tuple[Path, medseg.batches.BatchResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dask.distributed import Client, LocalCluster

    ref_out, _ = reference
    out = tmp_path / "dask"
    # a fresh worker-model cache: the two worker threads share this process, so one load in all
    monkeypatch.setattr(medseg.batches, "_WORKER_MODELS", {})
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        res = medseg.batch(
            data, "unet-demo", out, executor="dask", scheduler=cluster.scheduler_address
        )
    assert [(r.study, r.status) for r in res.studies] == [
        ("broken", "failed"),
        *[(s, "ok") for s in GOOD],
    ]
    assert sum(r.model_loaded for r in res.studies) == 1
    _same_outputs(ref_out, out, GOOD)


# --------------------------------------------------------------------------- SAM
@pytest.mark.slow
def test_sam_prompts_from_gt_and_prompts_file(tmp_path: Path) -> None:
    data = tmp_path / "sam"
    _write_studies(data, {"s0": 0, "s1": 1})
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    res = medseg.batch(
        data, "litemedsam", out, prompts_from_gt=True, label=2, plots=False, cache_dir=cache
    )
    assert res.ok
    rows = _csv(out / "metrics.csv")
    assert [(r["study"], r["label"], r["name"], r["status"]) for r in rows] == [
        ("s0", "2", "tumour", "ok"),
        ("s1", "2", "tumour", "ok"),
    ]
    for sid, row in zip(("s0", "s1"), rows, strict=True):
        rep = json.loads(study_paths(out, sid)[1].read_text())
        medseg.validate_report(rep)
        gt = medseg.read_labels(data / f"{sid}_gt.nii.gz")
        want = medseg.box_from_gt(gt, label=2).to_json()
        assert rep["provenance"]["prompts"] == [want]
        p = medseg.read_labels(study_paths(out, sid)[0], reference=gt).array == 2
        g = gt.array == 2
        assert float(row["dice"]) == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))
        assert float(row["dice"]) > 0.2  # a box on a 9 mm-slice phantom: not a quality bar

    # the same box from a prompts file gives the same label map; a study without prompts fails
    gt0 = medseg.read_labels(data / "s0_gt.nii.gz")
    b = medseg.box_from_gt(gt0, label=2)
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps({"s0": {"boxes": [{"slice": b.z, "box": list(b.rc)}]}}))
    res = medseg.batch(
        data, "litemedsam", tmp_path / "out2", prompts=pf, label=2, plots=False, cache_dir=cache
    )
    assert [(r.study, r.status) for r in res.studies] == [("s0", "ok"), ("s1", "failed")]
    assert res.studies[1].error == "no prompts for study s1 in the prompts file"
    a = medseg.read_labels(study_paths(out, "s0")[0]).array
    c = medseg.read_labels(study_paths(tmp_path / "out2", "s0")[0]).array
    assert np.array_equal(a, c)
