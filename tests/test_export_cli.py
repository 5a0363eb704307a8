"""``medseg segment`` on a DICOM series → ``medseg export`` (SEG and RTSTRUCT) → ``medseg info``:
the label map comes back voxel for voxel and the run's provenance travels inside the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main

pytest.importorskip("highdicom")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict[str, Path]:
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom

    root = tmp_path_factory.mktemp("export_cli")
    vol, _ = make_phantom(5, (16, 64, 64), (5.0, 3.0, 3.0))
    series = root / "ct"
    write_dicom_series(vol, series, modality="CT", uid_seed="export-cli")
    rc = main(
        [
            "segment",
            str(series),
            "--model",
            "unet-demo",
            "--out",
            str(root / "seg.nii.gz"),
            "--quiet",
        ]
    )
    assert rc == 0
    return {"root": root, "series": series, "labels": root / "seg.nii.gz"}


def test_export_seg_round_trip_and_info_shows_provenance(segmented, capsys) -> None:
    import medseg
    from medseg.io.dicom_seg import read_dicom_seg

    root, series = segmented["root"], segmented["series"]
    capsys.readouterr()
    out = root / "seg.dcm"
    assert (
        main(
            [
                "export",
                str(segmented["labels"]),
                "--reference",
                str(series),
                "--format",
                "dicom-seg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "with provenance" in capsys.readouterr().out
    ct = medseg.read_volume(series)
    lm = medseg.read_labels(segmented["labels"], reference=ct)
    back = read_dicom_seg(out, reference=series)
    assert back.same_grid(ct) and np.array_equal(back.array, lm.array)
    assert {v: back.name(v) for v in back.present()} == {v: lm.name(v) for v in lm.present()}

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    report = json.loads((root / "seg.json").read_text())
    assert info["provenance"]["model"]["weights_sha256"] == report["model"]["weights_sha256"]
    assert info["provenance"]["image"]["sha256"] == report["image"]["sha256"]
    assert main(["info", str(out)]) == 0
    assert "model:           unet-demo (unet)" in capsys.readouterr().out
    # exporting again refuses to overwrite; a label map on another grid is refused by name
    assert (
        main(["export", str(segmented["labels"]), "--reference", str(series), "--out", str(out)])
        == 2
    )
    assert "already exists" in capsys.readouterr().err


def test_export_rtstruct_and_refusals(segmented, capsys) -> None:
    import medseg
    from medseg.io.rtstruct import read_rtstruct
    from medseg.metrics import dice

    root, series = segmented["root"], segmented["series"]
    out = root / "rt.dcm"
    assert (
        main(
            [
                "export",
                str(segmented["labels"]),
                "--reference",
                str(series),
                "--format",
                "rtstruct",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ct = medseg.read_volume(series)
    lm = medseg.read_labels(segmented["labels"], reference=ct)
    back = read_rtstruct(out, reference=series)
    for v in lm.present():
        assert dice(back.array == v, lm.array == v) > 0.9
    assert main(["info", str(out)]) == 0
    assert "DICOM RTSTRUCT" in capsys.readouterr().out

    other = lm.with_array(lm.array)
    other.spacing = (lm.spacing[0] * 2, lm.spacing[1], lm.spacing[2])
    medseg.write_labels(other, root / "other.nii.gz")
    capsys.readouterr()
    rc = main(
        [
            "export",
            str(root / "other.nii.gz"),
            "--reference",
            str(series),
            "--out",
            str(root / "o.dcm"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "spacing" in err and err.count("\n") == 1
    assert not (root / "o.dcm").exists()


def test_read_labels_and_napari_reader_open_seg_and_rtstruct(segmented) -> None:
    import medseg
    from medseg._napari._reader import napari_get_reader
    from medseg.errors import InputError

    root, series = segmented["root"], segmented["series"]
    ct = medseg.read_volume(series)
    lm = medseg.read_labels(segmented["labels"], reference=ct)
    seg = root / "for_read.dcm"
    rt = root / "for_read_rt.dcm"
    medseg.export(lm, series, "dicom-seg", seg)
    medseg.export(lm, series, "rtstruct", rt)

    back = medseg.read_labels(seg, reference=ct)  # the API's one reader for label maps
    assert back.same_grid(ct) and np.array_equal(back.array, lm.array)
    with pytest.raises(InputError, match="reference"):
        medseg.read_labels(rt)
    ras = medseg.read_labels(rt, reference=ct)
    assert ras.same_grid(ct) and set(ras.present()) == set(lm.present())

    # napari: the SEG opens as a labels layer placed in the world like the series
    [(data, kwargs, kind)] = napari_get_reader(str(seg))(str(seg))
    assert kind == "labels"
    z0 = int(np.flatnonzero(lm.array.any(axis=(1, 2)))[0])
    np.testing.assert_allclose(kwargs["translate"][0], ct.index_to_world((z0, 0, 0))[2], atol=1e-3)
    assert int(data.sum()) == int(lm.array.sum())
    with pytest.raises(InputError, match="RT Structure Set"):
        napari_get_reader(str(rt))(str(rt))


def test_napari_writer_saves_a_dicom_seg_of_the_source_series(segmented, tmp_path) -> None:
    import medseg
    from medseg._napari._layers import labels_layer_data
    from medseg._napari._writer import write_dicom_seg_layer
    from medseg.errors import InputError
    from medseg.io.dicom_seg import read_dicom_seg, read_provenance

    series = segmented["series"]
    ct = medseg.read_volume(series)
    lm = medseg.read_labels(segmented["labels"], reference=ct)
    data, attrs, _ = labels_layer_data(lm, "seg", image_source=str(series))
    report = json.loads((segmented["root"] / "seg.json").read_text())
    attrs["metadata"]["medseg_report"] = report
    [written] = write_dicom_seg_layer(str(tmp_path / "napari_seg"), data, attrs)
    assert written == str(tmp_path / "napari_seg.dcm")
    assert np.array_equal(read_dicom_seg(written, reference=series).array, lm.array)
    assert read_provenance(written)["image"]["sha256"] == report["image"]["sha256"]
    data, attrs, _ = labels_layer_data(lm, "seg", image_source=str(segmented["labels"]))
    with pytest.raises(InputError, match="not opened from a DICOM folder"):
        write_dicom_seg_layer(str(tmp_path / "x.dcm"), data, attrs)
    assert not (tmp_path / "x.dcm").exists()
