"""DICOM behaviours issue 16 found untested: per-slice rescale, no position/orientation,
MONOCHROME1, mixed pixel spacing, mixed multi-frame/single-frame, damaged headers. Each test
fails when its behaviour breaks (checked by breaking the reader on purpose)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.errors import DicomError, InputError
from medseg.io import read_volume
from medseg.io.dicom import read_dicom_series
from test_dicom import make_series, write_slice

AXIAL = np.array([1.0, 0, 0, 0, 1.0, 0])


def _edit(path: Path, **attrs: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


def test_per_slice_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    """Slice k has slope k+1 and intercept -100k; HU = stored * slope + intercept per slice.
    (Applying the first slice's slope/intercept to every slice fails this.)"""
    folder = tmp_path / "s"
    folder.mkdir()
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 500, size=(4, 6, 5)).astype(np.int16)
    for k in range(4):
        ipp = np.array([0.0, 0.0, 2.0 * k])
        write_slice(
            folder / f"f{k}.dcm",
            stored[k],
            ipp,
            AXIAL,
            instance=k + 1,
            slope=k + 1,
            intercept=-100 * k,
        )
    vol = read_dicom_series(folder)
    expect = np.stack([stored[k].astype(np.int64) * (k + 1) - 100 * k for k in range(4)])
    np.testing.assert_array_equal(vol.array, expect)
    assert vol.array.dtype == np.int16
    # fractional slopes on some slices: float32, still per slice
    _edit(folder / "f2.dcm", RescaleSlope="0.5", RescaleIntercept="10.25")
    vol = read_dicom_series(folder)
    expect_f = expect.astype(np.float64)
    expect_f[2] = stored[2] * 0.5 + 10.25
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, expect_f, atol=1e-4)


def test_series_without_position_orientation(tmp_path: Path) -> None:
    """One file without IPP/IOP: read with origin 0, identity direction and a warning; several
    such files cannot be ordered: a DicomError that says so."""
    one = tmp_path / "one"
    one.mkdir()
    px = np.arange(30, dtype=np.int16).reshape(6, 5)
    write_slice(one / "a.dcm", px, np.array([5.0, 6.0, 7.0]), AXIAL, intercept=0.0)
    _edit(one / "a.dcm", ImagePositionPatient=None, ImageOrientationPatient=None)
    vol = read_dicom_series(one)
    np.testing.assert_array_equal(vol.array[0], px)
    np.testing.assert_array_equal(vol.origin, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(vol.direction, np.eye(3))
    assert vol.spacing == pytest.approx((1.5, 0.7, 0.9))  # z from SliceThickness
    assert any("no ImagePositionPatient" in w for w in vol.meta["warnings"])

    many = tmp_path / "many"
    make_series(many, n=3, iop=AXIAL)
    for f in sorted(many.iterdir())[:2]:
        _edit(f, ImagePositionPatient=None)
    with pytest.raises(DicomError, match="lack ImagePositionPatient/ImageOrientationPatient"):
        read_dicom_series(many)


def test_monochrome1_values_kept_with_warning(tmp_path: Path) -> None:
    raw, _, _ = make_series(tmp_path / "m", n=3, iop=AXIAL, intercept=-1024.0)
    for f in (tmp_path / "m").iterdir():
        _edit(f, PhotometricInterpretation="MONOCHROME1")
    vol = read_dicom_series(tmp_path / "m")
    np.testing.assert_array_equal(vol.array, raw.astype(np.int64) - 1024)  # not inverted
    assert sum("MONOCHROME1" in w for w in vol.meta["warnings"]) == 1


def test_mixed_pixel_spacing_uses_first_slice_and_warns(tmp_path: Path) -> None:
    make_series(tmp_path / "p", n=4, iop=AXIAL, pixel_spacing=(0.7, 0.9))
    files = sorted((tmp_path / "p").iterdir())
    first = min(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    other = next(f for f in files if f != first)
    _edit(other, PixelSpacing=["0.8", "1.1"])
    vol = read_dicom_series(tmp_path / "p")
    assert vol.spacing[1:] == pytest.approx((0.7, 0.9))
    assert vol.shape[0] == 4
    assert any("pixel spacing differs" in w for w in vol.meta["warnings"])


def test_mixed_multiframe_and_single_frame_errors(tmp_path: Path) -> None:
    make_series(tmp_path / "x", n=3, iop=AXIAL)
    f = sorted((tmp_path / "x").iterdir())[0]
    ds = pydicom.dcmread(f)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(f)
    with pytest.raises(DicomError, match="mixes multi-frame and single-frame"):
        read_dicom_series(tmp_path / "x")


def test_damaged_header_values_are_one_line_dicom_errors(tmp_path: Path) -> None:
    """pydicom parses values lazily: a bad transfer syntax UID or VR surfaces at pixel access
    as ValueError/NotImplementedError; the reader names the file in one line instead."""
    make_series(tmp_path / "d", n=3, iop=AXIAL)
    bad = sorted((tmp_path / "d").iterdir())[1]
    data = bytearray(bad.read_bytes())
    i = data.find(b"1.2.840.10008.1.2.1")  # TransferSyntaxUID value in the file meta
    assert i > 0
    data[i : i + 19] = b"9.9.9.9.9.9.9.9.9.9"
    bad.write_bytes(bytes(data))
    with pytest.raises(DicomError) as ei:
        read_volume(tmp_path / "d")
    msg = str(ei.value)
    assert bad.name in msg and "\n" not in msg


def test_huge_rows_columns_refused_before_allocating(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDSEG_MAX_IMAGE_BYTES", str(10_000))
    make_series(tmp_path / "h", n=2, iop=AXIAL, shape=(80, 80))  # 12.8 kB per slice
    with pytest.raises(InputError, match="claims 12800 bytes"):
        read_volume(tmp_path / "h")
