"""Shared fixtures: paths to the real data that ships beside the repository and in packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(autouse=True, scope="session")
def _private_medseg_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never read or write the user's ``~/.cache/medseg`` (weights, embedding cache)."""
    old = os.environ.get("MEDSEG_HOME")
    os.environ["MEDSEG_HOME"] = str(tmp_path_factory.mktemp("medseg_home"))
    yield
    if old is None:
        os.environ.pop("MEDSEG_HOME", None)
    else:
        os.environ["MEDSEG_HOME"] = old
