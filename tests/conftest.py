"""Shared fixtures: paths to the real data that ships beside the repository and in packages, and
the one rule for tests that need a system program (Xvfb, dcm2niix)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYRADIOMICS = SHARED_DATA / "pyradiomics"
SAMPLE_DATA = REPO / "sample_data"

#: Set to 1 (``.ci/run`` does) to turn a missing system program into a test failure.
REQUIRE_SYSTEM_TOOLS = "MEDSEG_REQUIRE_SYSTEM_TOOLS"
XVFB_HINT = "Debian/Ubuntu: apt-get install xvfb"
DCM2NIIX_HINT = "Debian/Ubuntu: apt-get install dcm2niix"


def require_program(name: str, install_hint: str) -> str:
    """The path of the program ``name`` on ``PATH``; otherwise skip the calling test or fixture.

    The skip reason is one line naming the program and how to install it. When the environment
    variable ``MEDSEG_REQUIRE_SYSTEM_TOOLS`` is set to anything but ``""``/``"0"`` the missing
    program fails the test instead, so CI never silently skips what it installed.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} not found on PATH ({install_hint})"
    if os.environ.get(REQUIRE_SYSTEM_TOOLS, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_SYSTEM_TOOLS} is set, so this is a failure", False)
    pytest.skip(reason)


def require_display() -> None:
    """Skip (or fail, see :func:`require_program`) unless Qt can get an X display on Linux:
    ``DISPLAY`` is set, or ``Xvfb`` is installed to start one
    (:func:`medseg._napari._xvfb.ensure_display`). Other systems have their own window server."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        require_program("Xvfb", f"napari needs an X server: set DISPLAY or {XVFB_HINT}")


@pytest.fixture(scope="session")
def x_display() -> str | None:
    """The X display napari's Qt uses: ``DISPLAY``, or an ``Xvfb`` started for the session.

    Skips (or fails, see :func:`require_program`) when there is no display and no Xvfb.
    """
    require_display()
    from medseg._napari._xvfb import ensure_display

    return ensure_display()


@pytest.fixture
def dcm2niix() -> str:
    """Path of the ``dcm2niix`` converter (a reference tool); skips the test when missing."""
    return require_program("dcm2niix", DCM2NIIX_HINT)


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
