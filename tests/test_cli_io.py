"""``medseg info`` and ``medseg convert`` through ``medseg.cli.main``: geometry against SimpleITK
and nibabel, and one test per bad input (exit 2, one stderr line, no traceback, nothing left)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.io import read_volume, write_volume
from medseg.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def ct5n(pydicom_test_files: Path) -> Path:
    return pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"


def sitk_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uid = reader.GetGDCMSeriesIDs(str(folder))[0]
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_geometry(rep: dict, img) -> None:
    sx, sy, sz = img.GetSpacing()
    assert rep["shape"] == list(img.GetSize())[::-1]
    np.testing.assert_allclose(rep["spacing"], (sz, sy, sx), atol=1e-9)
    np.testing.assert_allclose(rep["origin"], img.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(np.reshape(rep["direction"], -1), img.GetDirection(), atol=1e-9)


# ----------------------------------------------------------------------------- info
def test_info_json_brain1_matches_simpleitk(
    capsys: pytest.CaptureFixture[str], pyradiomics_dir: Path
) -> None:
    import SimpleITK as sitk

    path = pyradiomics_dir / "brain1_image.nrrd"
    rep = run_json(capsys, str(path))
    img = sitk.ReadImage(str(path))
    assert_geometry(rep, img)
    arr = sitk.GetArrayFromImage(img)
    assert rep["intensity_range"] == [arr.min().item(), arr.max().item()]
    assert rep["dtype"] == str(arr.dtype) and rep["format"] == "nrrd"
    assert rep["warnings"] == [] and rep["series_chosen"] is None


def test_info_json_ct5n_matches_simpleitk(capsys: pytest.CaptureFixture[str], ct5n: Path) -> None:
    import SimpleITK as sitk

    rep = run_json(capsys, str(ct5n))
    img = sitk_series(ct5n)
    assert_geometry(rep, img)
    arr = sitk.GetArrayFromImage(img)
    assert rep["intensity_range"] == [int(arr.min()), int(arr.max())]
    assert rep["modality"] == "CT" and rep["dtype"] == "int16"
    assert rep["series_chosen"] == "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
    assert [s["n_files"] for s in rep["series"]] == [5]


def test_info_text_lists_series_and_warnings(
    capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    assert main(["info", str(ct5n.parent), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "shape (z,y,x):   5 x 16 x 16" in out
    assert "spacing (z,y,x): 2.5, 0.488281, 0.488281 mm" in out
    assert "series in folder (2):" in out and "Scout" in out
    assert "warning: the folder holds 2 series" in out
    uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
    rep = run_json(capsys, str(ct5n.parent), "--series", uid)
    assert rep["series_chosen"] == uid and rep["shape"] == [5, 16, 16]
    assert rep["warnings"] == []  # chosen explicitly: no "several series" warning
    # the 2-file scout holds two orthogonal localizer images: refused with a reason
    scout = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.2"
    assert main(["info", str(ct5n.parent), "--series", scout, "--quiet"]) == 2
    assert "mixes 2 orientations with no majority" in capsys.readouterr().err


# ----------------------------------------------------------------------------- convert
def test_convert_dicom_to_nifti_opens_aligned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(ct5n), str(out), "--quiet"]) == 0
    ref = sitk_series(ct5n)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, sitk.GetArrayFromImage(ref))
    sx, sy, sz = ref.GetSpacing()
    np.testing.assert_allclose(back.spacing, (sz, sy, sx), atol=1e-5)
    np.testing.assert_allclose(back.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.direction.reshape(-1), ref.GetDirection(), atol=1e-6)
    # nibabel: affine (i, j, k) = (x, y, z) in RAS == our LPS affine flipped and permuted
    nimg = nib.load(str(out))
    ours = Volume.from_sitk(ref).affine_lps()[:, [2, 1, 0, 3]]
    np.testing.assert_allclose(nimg.affine, LPS_TO_RAS @ ours, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nimg.dataobj), sitk.GetArrayFromImage(ref).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_convert_overwrite_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), spacing=(2, 1, 1))
    src = write_volume(vol, tmp_path / "a.nrrd")
    out = tmp_path / "b.nii.gz"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --overwrite" in err[0]
    assert out.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(out).array, vol.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd", "b.nii.gz"]


def test_convert_labels_keeps_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.io import read_labels, write_labels
    from medseg.volume import LabelMap

    lm = LabelMap(np.eye(4, dtype=np.uint8)[None].repeat(2, 0), labels={1: "vessel"})
    write_labels(lm, tmp_path / "l.nrrd")
    assert main(["convert", str(tmp_path / "l.nrrd"), str(tmp_path / "l.nii.gz"), "--labels"]) == 0
    assert read_labels(tmp_path / "l.nii.gz").labels == {1: "vessel"}


# ----------------------------------------------------------------------------- bad input
def assert_clean_failure(
    capsys: pytest.CaptureFixture[str], argv: list[str], folder: Path, match: str
) -> None:
    """Exit 2, one stderr line containing ``match``, no traceback, ``folder`` unchanged."""
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1, cap.err
    assert "Traceback" not in cap.err and match in lines[0], lines[0]
    assert lines[0].startswith(f"medseg {argv[0]}: error: ")
    if before is not None:
        assert sorted(p.name for p in folder.iterdir()) == before


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_bad_empty_folder(tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["convert", str(tmp_path / "empty"), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "the folder is empty")
    assert_clean_failure(
        capsys, ["info", str(tmp_path / "empty"), "--quiet"], outdir, "the folder is empty"
    )


def test_bad_folder_without_dicom(
    tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    (src / "readme.txt").write_text("no images here\n")
    (src / "data.csv").write_text("a,b\n1,2\n")
    argv = ["convert", str(src), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "no readable DICOM image files found (2 non-DICOM")


def test_bad_truncated_nifti(
    tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vol = Volume(np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32))
    good = write_volume(vol, tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:-500])
    argv = ["convert", str(bad), str(outdir / "x.nrrd"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "truncated")


def test_bad_truncated_dicom(
    tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    src = tmp_path / "ct"
    shutil.copytree(ct5n, src)
    f = src / "2693"
    f.write_bytes(f.read_bytes()[:-100])
    argv = ["convert", str(src), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "2693")
    assert_clean_failure(capsys, ["info", str(src), "--quiet"], outdir, "truncated")


def test_bad_dicom_without_pixel_data(
    outdir: Path, capsys: pytest.CaptureFixture[str], pydicom_test_files: Path
) -> None:
    src = pydicom_test_files / "dicomdirtests" / "TINY_ALPHA"
    argv = ["convert", str(src), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "none holds pixel data")


def test_bad_4d_nifti(outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel.testing

    src = Path(nibabel.testing.data_path) / "example4d.nii.gz"
    argv = ["convert", str(src), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "a 3D volume is needed")


def test_bad_nan_intensities(
    tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arr = np.ones((3, 4, 5), dtype=np.float32)
    arr[1, 1, 1] = np.nan
    src = write_volume(Volume(arr), tmp_path / "nan.nrrd")
    argv = ["convert", str(src), str(outdir / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "1 voxels are NaN or infinite")


def test_bad_unwritable_output_under_a_file(
    tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    blocker = outdir / "not_a_folder"
    blocker.write_text("x")  # root ignores permission bits, but no one can mkdir under a file
    argv = ["convert", str(ct5n), str(blocker / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "cannot create folder")


def test_bad_unwritable_output_under_proc(
    outdir: Path, capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    argv = ["convert", str(ct5n), "/proc/medseg_no_such_dir/x.nii.gz", "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "cannot create folder")


def test_bad_output_equals_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = Volume(np.zeros((2, 3, 4), dtype=np.int16))
    src = write_volume(vol, tmp_path / "a.nii.gz")
    before = src.read_bytes()
    argv = ["convert", str(src), str(src), "--overwrite", "--quiet"]
    assert_clean_failure(capsys, argv, tmp_path, "output path is an input")
    assert src.read_bytes() == before


def test_bad_output_inside_dicom_input_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ct5n: Path
) -> None:
    src = tmp_path / "ct"
    shutil.copytree(ct5n, src)
    argv = ["convert", str(src), str(src / "x.nii.gz"), "--quiet"]
    assert_clean_failure(capsys, argv, src, "output path is an input")


def test_bad_unknown_series(outdir: Path, capsys: pytest.CaptureFixture[str], ct5n: Path) -> None:
    argv = ["convert", str(ct5n), str(outdir / "x.nii.gz"), "--series", "1.2.3", "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "no series with UID 1.2.3; available: ")


def test_bad_output_type(outdir: Path, capsys: pytest.CaptureFixture[str], ct5n: Path) -> None:
    argv = ["convert", str(ct5n), str(outdir / "x.png"), "--quiet"]
    assert_clean_failure(capsys, argv, outdir, "unknown output type")
