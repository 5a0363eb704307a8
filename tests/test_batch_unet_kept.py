"""A batch worker reads its U-Net checkpoint once, not once per study (and a replaced checkpoint
file is read again)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg import batches
from medseg.errors import CheckpointConfigError
from medseg.predict import unet


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No model kept yet in this process; returns the list of checkpoint files read (the real
    loader, recorded)."""
    monkeypatch.setattr(unet, "_KEPT", {})
    monkeypatch.setattr(batches, "_WORKER_MODELS", {})
    reads: list[str] = []
    real = unet.load_checkpoint

    def recording(path: str | os.PathLike[str]) -> dict:
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(unet, "load_checkpoint", recording)
    return reads


def test_batch_reads_the_unet_checkpoint_once(cold: list[str], tmp_path: Path) -> None:
    from medseg.io.files import write_volume
    from medseg.phantom import make_phantom

    data = tmp_path / "data"
    data.mkdir()
    images = {}
    for i in range(3):
        vol, _ = make_phantom(i, (8, 48, 48), (5.0, 3.0, 3.0))
        write_volume(vol, data / f"s{i}.nii.gz")
        images[f"s{i}"] = data / f"s{i}.nii.gz"
    res = medseg.batch(data, "unet-demo", tmp_path / "out", plots=False)
    assert res.ok and [r.status for r in res.studies] == ["ok"] * 3
    assert len(cold) == 1  # three studies, one read (was four: the warm-up and one per study)
    for sid, img in images.items():  # the kept model gives what a fresh load gives
        got = medseg.read_labels(batches.study_paths(tmp_path / "out", sid)[0]).array
        unet._KEPT.clear()
        np.testing.assert_array_equal(got, medseg.segment(img, model="unet-demo").labels.array)


def test_kept_unet_is_per_checkpoint_file(cold: list[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    shutil.copy(unet.demo_model_path(), ckpt)
    first = unet.keep_loaded(unet.UNetSegmenter.load(ckpt))
    assert unet.UNetSegmenter.load(ckpt) is first and len(cold) == 1
    assert unet.UNetSegmenter.load(ckpt, precision="fp32") is not first  # other settings
    with pytest.raises(CheckpointConfigError, match="was requested"):
        unet.UNetSegmenter.load(ckpt, labels={1: "nothing-like-this"})  # still checked
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    n = len(cold)
    assert unet.UNetSegmenter.load(ckpt) is not first and len(cold) == n + 1
