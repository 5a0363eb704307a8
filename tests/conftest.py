"""Shared fixtures: paths to the real data that ships beside the repository and in packages."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYRADIOMICS = SHARED_DATA / "pyradiomics"
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session")
def pyradiomics_dir() -> Path:
    """Folder with the real brain1/breast1/lung1 cases (``<case>_image.nrrd``, ``_label.nrrd``)."""
    assert PYRADIOMICS.is_dir(), f"real data missing: {PYRADIOMICS} (see ../shared/data/README.md)"
    return PYRADIOMICS


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """pydicom's bundled test-file folder."""
    import pydicom.data

    return Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
