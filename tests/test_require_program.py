"""conftest's rule for tests that need a system program (Xvfb for the GUI, dcm2niix): without the
program they skip with one reason and the install hint; with ``MEDSEG_REQUIRE_SYSTEM_TOOLS=1`` (as
``.ci/run`` sets) they fail instead. Checked by running pytest in a subprocess with an empty
``PATH`` and no ``DISPLAY``, on a probe that uses the real conftest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the X display rule (DISPLAY/Xvfb) is Linux's"
)

PROBE = """
def test_gui(x_display):
    print("DISPLAY in use:", x_display)
    assert x_display == ":97"


def test_dcm2niix(dcm2niix):
    raise AssertionError("ran without dcm2niix")
"""


def _summary(text: str) -> str:
    """pytest's final counts without the timing, e.g. ``"2 skipped"`` or ``"1 passed, 1 skipped"``
    (warnings are left out: other packages' deprecation warnings are not the subject here)."""
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    counts = re.sub(r"\s+in [\d.]+s.*$", "", last.strip("= "))
    return ", ".join(c for c in counts.split(", ") if "warning" not in c)


def _run_probe(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    shutil.copy(TESTS / "conftest.py", probe / "conftest.py")
    (probe / "test_probe.py").write_text(PROBE)
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "MEDSEG_REQUIRE_SYSTEM_TOOLS", "PYTEST_ADDOPTS")
    }
    env.update(PATH=str(empty_bin), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(probe), "-rA", "-p", "no:cacheprovider"],
        cwd=probe,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_programs_skip_with_install_hint(tmp_path):
    out = _run_probe(tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert _summary(text) == "2 skipped", text
    assert "Xvfb not found on PATH (napari needs an X server: set DISPLAY or " in text
    assert "apt-get install xvfb" in text
    assert "dcm2niix not found on PATH (Debian/Ubuntu: apt-get install dcm2niix)" in text


def test_missing_programs_fail_when_required(tmp_path):
    out = _run_probe(tmp_path, MEDSEG_REQUIRE_SYSTEM_TOOLS="1")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert _summary(text) == "2 errors", text
    assert text.count("MEDSEG_REQUIRE_SYSTEM_TOOLS is set, so this is a failure") >= 2, text


def test_a_set_display_needs_no_xvfb(tmp_path):
    """With ``DISPLAY`` set the GUI fixture uses it (no Xvfb needed); ``=0`` means not required."""
    out = _run_probe(tmp_path, DISPLAY=":97", MEDSEG_REQUIRE_SYSTEM_TOOLS="0")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert _summary(text) == "1 passed, 1 skipped", text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the X display rule is for Linux")
def test_gui_module_skips_without_display_or_xvfb(tmp_path):
    """The real GUI test module, with no display and no Xvfb: skipped, with one reason."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "PYTEST_ADDOPTS")}
    env.pop("MEDSEG_REQUIRE_SYSTEM_TOOLS", None)
    env["PATH"] = str(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(TESTS / "test_napari_gui.py"),
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    if "needs napari" in text:
        pytest.skip("needs napari (the [napari] extra)")
    assert out.returncode == 0, text[-3000:]
    summary = _summary(text)
    assert re.fullmatch(r"\d+ skipped", summary), summary  # no pass, failure or error
    # "SKIPPED [1] tests/test_napari_gui.py:102: <reason>": one reason for every test
    reasons = {ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("SKIPPED")}
    assert reasons == {
        "Xvfb not found on PATH (napari needs an X server: set DISPLAY or Debian/Ubuntu: "
        "apt-get install xvfb)"
    }, reasons
    assert int(summary.split()[0]) >= 10  # the whole module, not one test
