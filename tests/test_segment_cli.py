"""``medseg segment`` with a SAM-family model, end to end on the real breast1 case (21 x 120 x 45).

The embedding cache is a module-wide temporary folder so the runs after the first reuse the
embedded slices. Error cases fail before any model work and are fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emb_cache")


@pytest.fixture(scope="module")
def breast(pyradiomics_dir) -> tuple[Path, Path]:
    return pyradiomics_dir / "breast1_image.nrrd", pyradiomics_dir / "breast1_label.nrrd"


@pytest.fixture(scope="module")
def main_run(breast, cache_dir, tmp_path_factory):
    """The README's main job on breast1: box from GT, metrics, oracle, JSON and label map."""
    img, lab = breast
    out = tmp_path_factory.mktemp("seg")
    rc = main(
        [
            "segment",
            str(img),
            "--model",
            "litemedsam",
            "--box-from-gt",
            str(lab),
            "--gt",
            str(lab),
            "--json",
            str(out / "r.json"),
            "--out",
            str(out / "seg.nrrd"),
            "--cache-dir",
            str(cache_dir),
            "--quiet",
        ]
    )
    return rc, out


def test_main_job_report_and_label_map(main_run, breast, capsys):
    from medseg.io.files import read_labels, read_volume
    from medseg.predict.propagate import dice3d

    rc, out = main_run
    assert rc == 0
    img, lab = breast
    rep = json.loads((out / "r.json").read_text())
    for key in ("schema", "engine", "image", "model", "labels", "metrics", "timings", "provenance"):
        assert key in rep, key
    assert rep["engine"] == "sam"
    sam = rep["sam"]
    for key in ("config", "key_prompts", "propagation", "oracle", "dice", "cache"):
        assert key in sam, key
    assert rep["model"]["name"] == "litemedsam"
    assert len(rep["model"]["weights_sha256"]) == 64
    assert sam["key_prompts"][0]["index"] == 9 and len(sam["key_prompts"][0]["box_rc"]) == 4
    recs = sam["propagation"]["records"]
    assert {
        "index",
        "iou_pred",
        "stability",
        "area_px",
        "similarity",
        "source",
        "stopped",
        "review_score",
    } <= set(recs[0])
    assert [r["index"] for r in recs] == sorted(r["index"] for r in recs)
    scores = [r["review_score"] for r in sam["propagation"]["review"]]
    assert scores == sorted(scores, reverse=True)
    # the written label map is on the image grid and scores what the report says
    image = read_volume(img)
    pred = read_labels(out / "seg.nrrd", reference=image)
    gt = read_labels(lab, reference=image)
    d = dice3d(pred.array > 0, gt.array > 0)
    assert sam["dice"] == pytest.approx(d, abs=1e-6)
    assert rep["metrics"][0]["dice"] == pytest.approx(d, abs=1e-6)
    assert set(np.unique(pred.array)) <= {0, 1}
    assert sam["propagation"]["slices"] == [
        int(i) for i in np.flatnonzero((pred.array > 0).any(axis=(1, 2)))
    ]
    orc = sam["oracle"]
    assert 0.3 < orc["dice"] <= 1 and orc["ratio"] == pytest.approx(d / orc["dice"], abs=1e-3)
    assert [p["index"] for p in orc["per_slice"]] == [8, 9, 10]
    # breast1's tumour is 3 tiny slices; the oracle itself reaches ~0.55. One box on slice 9
    # propagated to 8 and 10 gives 0.538; the key slice alone (no propagation) only 0.47
    assert sam["propagation"]["slices"] == [8, 9, 10]
    assert d > 0.5


def test_refuses_to_overwrite_before_work(main_run, breast, cache_dir, capsys):
    img, lab = breast
    _, out = main_run
    rc = main(
        [
            "segment",
            str(img),
            "--box-from-gt",
            str(lab),
            "--out",
            str(out / "seg.nrrd"),
            "--cache-dir",
            str(cache_dir),
            "--quiet",
        ]
    )
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    rc = main(["segment", str(img), "--box-from-gt", str(lab), "--out", str(img), "--quiet"])
    assert rc == 2
    assert "input" in capsys.readouterr().err


def test_box_prompt_file_and_no_propagate(breast, cache_dir, tmp_path, capsys):
    img, lab = breast
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"axis": "z", "boxes": [{"slice": 9, "box": [62, 19, 77, 31]}]}))
    rc = main(
        [
            "segment",
            str(img),
            "--prompts",
            str(prompts),
            "--no-propagate",
            "--gt",
            str(lab),
            "--json",
            str(tmp_path / "r.json"),
            "--cache-dir",
            str(cache_dir),
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["sam"]["propagation"]["slices"] == [9]
    assert rep["sam"]["key_prompts"] == [{"index": 9, "box_rc": [62.0, 19.0, 77.0, 31.0]}]
    assert rep["sam"]["oracle"] is None and 0 < rep["sam"]["dice"] < 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "9,10,10,200,20"], "outside the image"),
        (["--box", "30,10,10,20,20"], "out of range"),
        (["--box", "9,10,10,20"], "malformed --box"),
        (["--box", "9,a,10,20,20"], "malformed --box"),
        (["--box", "9,20,10,10,20"], "R0 <= R1"),
        (["--box", "9,10,10,10,30"], "zero height or width"),
        (["--box", "9,10,10,20,10"], "zero height or width"),
        (["--point", "9,10"], "malformed --point"),
        (["--point", "9,10,10,2"], "label must be 1 or 0"),
        (["--point", "9,130,10"], "outside the image"),
        (["--box", "9,10,10,20,20", "--weights", "/nonexistent/lite_medsam.pth"], "does not exist"),
        ([], "no prompt"),
    ],
)
def test_bad_prompts_exit_2_with_one_line(breast, extra, message, capsys):
    img, _ = breast
    rc = main(["segment", str(img), *extra, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_gt_on_another_grid_is_refused(breast, tmp_path, capsys):
    from medseg.io.files import read_labels, write_labels

    img, lab = breast
    gt = read_labels(lab)
    gt.spacing = (gt.spacing[0] * 2, gt.spacing[1], gt.spacing[2])
    bad = write_labels(gt, tmp_path / "other_grid.nrrd")
    rc = main(["segment", str(img), "--box-from-gt", str(bad), "--quiet"])
    assert rc == 2
    assert "grid" in capsys.readouterr().err


def test_bad_prompts_file(breast, tmp_path, capsys):
    img, _ = breast
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"boxes": [{"slice": 9}]}))
    assert main(["segment", str(img), "--prompts", str(p), "--quiet"]) == 2
    assert "boxes[0]" in capsys.readouterr().err
    p.write_text(json.dumps({"axis": "y", "boxes": []}))
    assert main(["segment", str(img), "--prompts", str(p), "--quiet"]) == 2
    assert "axis" in capsys.readouterr().err


# --------------------------------------------------------------------------- the Python API
def test_api_equals_cli_and_reports_follow_the_schema(main_run, breast, cache_dir, tmp_path):
    """The API example on the same input gives the CLI's Dice to 1e-6 and the same mask."""
    import medseg
    from medseg.io.files import read_labels as read_file_labels

    _, out = main_run
    img_path, lab_path = breast
    cli = json.loads((out / "r.json").read_text())
    medseg.validate_report(cli)

    img = medseg.read_volume(img_path)
    gt = medseg.read_labels(lab_path, reference=img)
    seg = medseg.segment(
        img, model="litemedsam", prompts=medseg.box_from_gt(gt, label=1), cache_dir=cache_dir
    )
    rows = medseg.evaluate(seg.labels, gt)
    assert rows[0]["dice"] == pytest.approx(cli["metrics"][0]["dice"], abs=1e-6)
    cli_mask = read_file_labels(out / "seg.nrrd", reference=img).array
    assert np.array_equal(seg.labels.array > 0, cli_mask > 0)
    assert seg.labels.same_grid(img)
    medseg.validate_report(seg.report)
    assert seg.report["metrics"] is None  # no gt given to segment: no metrics
    assert seg.report["provenance"]["prompts"] == [
        {"kind": "box", "axis": "z", "slice": 9, "box": cli["sam"]["key_prompts"][0]["box_rc"]}
    ]
    assert seg.report["image"]["sha256"] == cli["image"]["sha256"]

    # save: sidecar report, refuses to overwrite, refuses an input
    written = seg.save(tmp_path / "pred.nii.gz")
    assert written["report"] == tmp_path / "pred.json"
    rep = json.loads((tmp_path / "pred.json").read_text())
    assert rep["outputs"]["labels"] == str(tmp_path / "pred.nii.gz")
    medseg.validate_report(rep)
    with pytest.raises(medseg.MedsegError, match="already exists"):
        seg.save(tmp_path / "pred.nii.gz")
    with pytest.raises(medseg.MedsegError, match="input"):
        seg.save(tmp_path / "x.nii.gz", report=img_path, overwrite=True)
    assert not (tmp_path / "x.nii.gz").exists()  # checked before anything was written


def test_api_refuses_bad_requests_before_work(breast, tmp_path):
    import medseg
    from medseg.errors import InputError, PromptError, WeightsError

    img_path, _ = breast
    img = medseg.read_volume(img_path)
    with pytest.raises(PromptError, match="no prompt"):
        medseg.segment(img, model="litemedsam")
    with pytest.raises(InputError, match="takes no prompts"):
        medseg.segment(img, model="unet-demo", prompts=medseg.Point(9, 60, 20))
    with pytest.raises(WeightsError, match="unknown model"):
        medseg.segment(img, model="sam_vit_h", prompts=medseg.Point(9, 60, 20))
    with pytest.raises(PromptError, match="outside the image"):
        medseg.segment(img, prompts=medseg.Box(9, 10, 10, 200, 20))
    with pytest.raises(PromptError, match="out of range"):
        medseg.segment(img, prompts=[medseg.Box(30, 10, 10, 20, 20)])
    with pytest.raises(PromptError, match=r"medseg\.Box"):
        medseg.segment(img, prompts=["9,10,10,20,20"])
    with pytest.raises(InputError, match="U-Net options"):
        medseg.segment(img, prompts=medseg.Point(9, 60, 20), refine_with="litemedsam")
    sam_state = tmp_path / "sam.pth"
    import torch

    torch.save({"image_encoder.w": torch.zeros(2)}, sam_state)
    with pytest.raises(WeightsError, match="SAM-family weights file"):
        medseg.segment(img, model=sam_state)


def test_cancel_stops_with_cancelled(breast, cache_dir):
    import threading

    import medseg
    from medseg.errors import Cancelled

    img_path, _ = breast
    seen: list[tuple[int, int]] = []
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        medseg.segment(
            img_path,
            prompts=medseg.Box(9, 62, 19, 77, 31),
            cache_dir=cache_dir,
            progress=lambda d, t: seen.append((d, t)),
            cancel=stop,
        )
    assert seen == []  # stopped at the first step, before any slice was reported done
