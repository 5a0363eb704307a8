"""The README's "Python API" example runs as written (from a folder holding ``sample_data``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _api_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    import medseg
    from medseg.io.files import read_labels

    (tmp_path / "sample_data").symlink_to(REPO / "sample_data", target_is_directory=True)
    script = tmp_path / "example.py"
    script.write_text(_api_block())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "orientation=LAS" in out  # brain1's flipped y axis, in the one-line repr
    dice = float(re.search(r"Dice (\d\.\d+)", out).group(1))
    assert dice > 0.7  # two boxes on brain1 (the napari guide's 0.81)
    report = json.loads((tmp_path / "pred.json").read_text())
    medseg.validate_report(report)
    assert report["engine"] == "sam" and len(report["provenance"]["prompts"]) == 2
    img = medseg.read_volume(REPO / "sample_data" / "brain1" / "brain1_image.nrrd")
    pred = read_labels(tmp_path / "pred.nii.gz", reference=img)
    gt = medseg.read_labels(REPO / "sample_data" / "brain1" / "brain1_label.nrrd", reference=img)
    assert medseg.evaluate(pred, gt)[0]["dice"] == pytest.approx(dice, abs=5e-4)
    assert "liver" in out and "tumour" in out  # the U-Net's label table printed
