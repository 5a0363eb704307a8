"""The encoder runtime choice (issue 14): ``resolve_runtime``, the OpenVINO encoder and its
verified cache, and ``runtime=`` through the pipeline into the report."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import medseg
from medseg.errors import InputError
from medseg.models import ov_encoder
from medseg.models.registry import get_spec
from medseg.models.sam import SMALL_TINY_VIT, build_sam_model, load_sam_model
from medseg.predict.sam import VolumePredictor
from medseg.prompts import Box
from medseg.report import validate_report
from medseg.runtime import AUTO_RUNTIME, resolve_runtime
from medseg.volume import Volume

REQUIRE = "MEDSEG_REQUIRE_SYSTEM_TOOLS"


def need_openvino() -> None:
    """Skip (fail with MEDSEG_REQUIRE_SYSTEM_TOOLS=1, as .ci/run sets) when openvino is missing."""
    if importlib.util.find_spec("openvino") is not None:
        return
    reason = "openvino not installed (pip install openvino)"
    if os.environ.get(REQUIRE, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE} is set, so this is a failure", False)
    pytest.skip(reason)


# ------------------------------------------------------------------ resolve_runtime (no openvino)
def test_resolve_runtime_names_and_errors(monkeypatch):
    assert resolve_runtime("torch") == "torch"
    assert resolve_runtime(" Torch ", "cpu") == "torch"
    assert AUTO_RUNTIME in ("torch", "openvino")
    with pytest.raises(InputError, match="unknown runtime 'onnx'; use one of auto, torch"):
        resolve_runtime("onnx")
    monkeypatch.setattr(ov_encoder, "openvino_available", lambda: False)
    assert resolve_runtime("auto", "cpu") == "torch"  # falls back without the package
    with pytest.raises(InputError, match="not installed; pip install openvino") as exc:
        resolve_runtime("openvino", "cpu")
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(ov_encoder, "openvino_available", lambda: True)
    with pytest.raises(InputError, match="CPU only"):
        resolve_runtime("openvino", "cuda")


def test_imports_stay_light():
    code = (
        "import sys, medseg, medseg.runtime, medseg.models.ov_encoder;"
        "print(sorted(m for m in ('torch', 'openvino') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_rejects_unknown_runtime(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "segment", "x.nii.gz", "--runtime", "onnx"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'onnx'" in proc.stderr


# ------------------------------------------------------------------ OpenVINO encoder (tiny model)
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random TinyViT LiteMedSAM saved in the official layout and loaded from the file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_lite.pth"
    spec = dataclasses.replace(
        get_spec("litemedsam"), filename=path.name, sha256=None, url=None, arch=SMALL_TINY_VIT
    )
    torch.save(build_sam_model(spec).state_dict(), path)
    return spec, path


def _inputs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(2, 3, 256, 256)).astype(np.float32)


@pytest.fixture(scope="module")
def converted(tiny):
    """The tiny model (torch, fp32) and its OpenVINO encoder, converted once into the test
    session's MEDSEG_HOME (conversion is the slow part: ~5-20 s)."""
    need_openvino()
    spec, path = tiny
    model = load_sam_model(spec, weights=path, precision="fp32")
    return model, ov_encoder.openvino_encoder(model, "fp32")


def test_openvino_encoder_matches_torch_and_cache_is_verified(converted, tmp_path):
    model, enc = converted
    assert enc.source == "built" and enc.convert_s > 0
    assert enc.path.parent == ov_encoder.openvino_cache_dir()
    x = _inputs()
    ref = model.encode(torch.from_numpy(x)).numpy()
    got = enc(x)
    assert got.shape == (2, 256, 64, 64) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, float(np.abs(ref).max()))
    manifest = json.loads((enc.path / "manifest.json").read_text())
    key = manifest["key"]
    assert key["weights_sha256"] == model.weights_sha256
    assert key["openvino"] == ov_encoder.openvino_version()
    assert (key["precision"], key["input_size"]) == ("fp32", 256)
    assert sorted(manifest["files"]) == ["encoder.bin", "encoder.xml"]

    again = ov_encoder.openvino_encoder(model, "fp32")
    assert again.source == "cache" and again.convert_s == 0.0 and again.path == enc.path
    np.testing.assert_array_equal(again(x), got)

    # another precision or weights digest is another entry
    other = ov_encoder.entry_key("litemedsam", model.weights_sha256, "bf16", 256, key["openvino"])
    assert ov_encoder.entry_dir(other) != enc.path
    assert not ov_encoder.verify_entry(enc.path, other)

    # a copy of the entry whose weights are corrupted (same size): detected, rebuilt, equal
    root = tmp_path / "ov"
    copy = root / enc.path.name
    shutil.copytree(enc.path, copy)
    binf = copy / "encoder.bin"
    raw = bytearray(binf.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    binf.write_bytes(bytes(raw))
    assert not ov_encoder.verify_entry(copy, key)
    rebuilt = ov_encoder.openvino_encoder(model, "fp32", root=root)
    assert rebuilt.source == "rebuilt" and rebuilt.path == copy
    assert ov_encoder.verify_entry(copy, key)
    np.testing.assert_array_equal(rebuilt(x), got)

    # truncated files and a missing manifest are caught too
    with open(binf, "r+b") as fh:
        fh.truncate(100)
    assert not ov_encoder.verify_entry(copy, key)
    (copy / "manifest.json").unlink()
    assert not ov_encoder.verify_entry(copy, key)


def test_segment_runtime_openvino_in_report_and_equal_masks(tiny, converted, tmp_path):
    spec, path = tiny
    rng = np.random.default_rng(1)
    _, yy, xx = np.mgrid[:3, :40, :48]
    arr = np.where((yy - 20) ** 2 + (xx - 24) ** 2 < 100, 300.0, -700.0)
    arr = (arr + rng.normal(0, 20, arr.shape)).astype(np.float32)
    vol = Volume(arr, (3.0, 1.0, 1.0))
    box = Box(1, 10, 14, 30, 34)
    reports, labels = {}, {}
    for rt in ("torch", "openvino"):
        model = load_sam_model(spec, weights=path, precision="fp32", runtime=rt)
        assert model.runtime == rt and (model.ov_encoder is not None) == (rt == "openvino")
        if rt == "openvino":
            assert not model.ov_encoder.loaded  # compiled at the first encoder call
            assert model.ov_encoder.load().source == "cache"  # the fixture's entry
        pred = VolumePredictor(vol, model, cache_dir=tmp_path / f"emb-{rt}")
        seg = medseg.segment(vol, "litemedsam", box, predictor=pred, runtime=rt)
        reports[rt], labels[rt] = seg.report, seg.labels.array
        assert pred.cache_info()["runtime"] == rt
    assert reports["openvino"]["model"]["runtime"] == "openvino"
    assert reports["torch"]["model"]["runtime"] == "torch"
    assert reports["openvino"]["provenance"]["settings"]["runtime"] == "openvino"
    for rep in reports.values():
        validate_report(rep)
    bad = {**reports["torch"], "model": {**reports["torch"]["model"], "runtime": "onnx"}}
    with pytest.raises(InputError, match="model/runtime: 'onnx' is not one of"):
        validate_report(bad)
    a, b = labels["torch"] > 0, labels["openvino"] > 0
    assert a.any()
    dice = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
    assert dice >= 0.999
