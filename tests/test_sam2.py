"""SAM 2 / MedSAM2 (issue 12): registry, weights, frames, and propagation equal to sam2's own.

No real SAM 2 weights can be installed here, so hiera-tiny is built with seeded random weights in
the official checkpoint layout (``{"model": state_dict}``), saved, and loaded through our path.
The network runs at 128x128 input to keep the tests a few seconds each (the weights do not
depend on the input size).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import WeightsError
from medseg.models.registry import SAM2_MODELS, known_models, resolve_model
from medseg.predict.propagate import KeyPrompt
from medseg.volume import Volume

SIZE = 128  # test input side (the registry's models run at 1024, MedSAM2 at 512)
REQUIRE = "MEDSEG_REQUIRE_SYSTEM_TOOLS"


def need_sam2() -> None:
    """Skip (fail with MEDSEG_REQUIRE_SYSTEM_TOOLS=1, as .ci/run sets) when sam2 is missing."""
    if importlib.util.find_spec("sam2") is not None:
        return
    reason = "sam2 not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)"
    if os.environ.get(REQUIRE, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE} is set, so this is a failure", False)
    pytest.skip(reason)


SPEC = replace(SAM2_MODELS["sam2.1_hiera_tiny"], input_size=SIZE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random hiera-tiny weights in Meta's layout; the object-score head is biased so the
    object is 'present' on every frame (random heads would blank every mask)."""
    need_sam2()
    import torch

    from medseg.models.sam2 import build_sam2_model

    torch.manual_seed(0)
    net = build_sam2_model(SPEC)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"].fill_(10.0)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    from medseg.models.sam2 import load_sam2_model

    return load_sam2_model(SPEC, checkpoint, device="cpu", precision="fp32")


def _volume() -> Volume:
    """Four 48x64 slices (non-square: the frame is padded), a bright block on a noisy ramp."""
    rng = np.random.default_rng(7)
    arr = np.linspace(0, 40, 64, dtype=np.float32)[None, None, :] + rng.normal(0, 5, (4, 48, 64))
    arr[:, 14:30, 20:42] += 60.0
    return Volume(arr.astype(np.float32), spacing=(3.0, 1.0, 1.0))


def _frames_by_hand(vol: Volume) -> np.ndarray:
    """(n, 3, 128, 128): window 0..100 → [0, 1], 48x64 → 96x128 bilinear, ImageNet
    normalisation, padding = normalised black."""
    import torch
    import torch.nn.functional as F

    x = np.clip(vol.array / 100.0, 0, 1).astype(np.float32)
    small = F.interpolate(torch.from_numpy(x)[:, None], size=(96, 128), mode="bilinear")
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    out = ((torch.zeros(len(x), 3, SIZE, SIZE) - mean) / std).clone()
    out[:, :, :96, :128] = (small.expand(-1, 3, -1, -1) - mean) / std
    return out.numpy()


# --------------------------------------------------------------------------- registry
def test_registry_lists_sam2_models_with_official_files():
    names = ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "medsam2"]
    assert all(n in known_models() for n in names)
    base = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    assert SAM2_MODELS["sam2.1_hiera_tiny"].url == base + "sam2.1_hiera_tiny.pt"
    assert SAM2_MODELS["sam2.1_hiera_base_plus"].filename == "sam2.1_hiera_base_plus.pt"
    med = SAM2_MODELS["medsam2"]
    assert (med.filename, med.input_size) == ("MedSAM2_latest.pt", 512)
    assert med.url == "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt"
    for n in names:
        ref = resolve_model(n)
        assert (ref.engine, ref.spec.normalisation, ref.spec.engine) == ("sam2", "imagenet", "sam2")
    assert resolve_model(SPEC).engine == "sam2"


def test_import_medseg_imports_neither_sam2_nor_torch():
    code = (
        "import sys, medseg, medseg.pipeline, medseg.models.sam2, medseg.predict.sam2; "
        "print(sorted(m for m in ('torch', 'sam2', 'hydra') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_weights_one_line_names_file_and_folder(tmp_path, monkeypatch):
    from medseg.models.sam2 import load_sam2_model

    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path))
    monkeypatch.delenv("MEDSEG_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsError) as exc:
        load_sam2_model("medsam2")
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"put MedSAM2_latest.pt at {tmp_path / 'weights' / 'MedSAM2_latest.pt'}" in msg
    assert "huggingface.co/wanglab/MedSAM2" in msg


def test_cli_without_weights_exits_2_with_one_line(tmp_path):
    img = tmp_path / "img.nrrd"
    from medseg.io.files import write_volume

    write_volume(_volume(), img)
    env = {**os.environ, "MEDSEG_HOME": str(tmp_path / "home")}
    env.pop("MEDSEG_ALLOW_DOWNLOAD", None)
    cmd = [sys.executable, "-m", "medseg", "segment", str(img), "--model", "sam2.1_hiera_tiny"]
    cmd += ["--box", "1,14,20,29,41", "--out", str(tmp_path / "o.nii.gz")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sam2.1_hiera_tiny.pt" in lines[0]
    assert str(tmp_path / "home" / "weights") in lines[0]


def test_checkpoint_missing_a_key_is_refused_naming_it(checkpoint, tmp_path):
    import torch

    from medseg.models.sam2 import load_sam2_model

    state = torch.load(checkpoint, weights_only=True)["model"]
    gone = "memory_encoder.fuser.layers.1.gamma"
    del state[gone]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(WeightsError) as exc:
        load_sam2_model(SPEC, bad, device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and gone in msg and "extra.weight" in msg


# --------------------------------------------------------------------------- frames
def test_frames_are_windowed_square_and_normalised(model):
    from medseg.predict.sam2 import Sam2Propagator

    vol = _volume()
    p = Sam2Propagator(vol, model, window="0,100")
    assert p.frame.resized_shape == (96, 128)
    got = np.stack([p.frames[i].numpy() for i in range(4)])
    np.testing.assert_allclose(got, _frames_by_hand(vol), atol=1e-5)
    # anisotropic rows (3 mm) seen from the side: coronal 4x64 slices → 12 mm x 64 mm → 24x128
    side = Sam2Propagator(vol, model, axis="y", window="0,100")
    assert side.frame.resized_shape == (24, 128)


# --------------------------------------------------------------------------- the key test
@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """sam2's own SAM2VideoPredictor: built and loaded by ``sam2.build_sam`` from the same
    checkpoint, and a function running it on our 4-slice volume: its ``init_state`` on a JPEG
    folder, then the frames replaced by the hand-made ones (fed the same frames)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from medseg.models.sam2 import hydra_overrides

    size_ov = [o for o in hydra_overrides(SPEC) if "image_size" in o or "feat_sizes" in o]
    ref = build_sam2_video_predictor(
        SPEC.arch["config"], str(checkpoint), device="cpu", hydra_overrides_extra=size_ov
    )
    frames_dir = tmp_path_factory.mktemp("jpg")
    for i in range(4):
        Image.new("RGB", (SIZE, SIZE)).save(frames_dir / f"{i:05d}.jpg")

    def run(add) -> dict[int, np.ndarray]:
        state = ref.init_state(str(frames_dir))
        state["images"] = torch.from_numpy(_frames_by_hand(_volume()))
        state["cached_features"] = {}
        add(ref, state)
        out_logits = {}
        for reverse in (False, True):
            for idx, _, out in ref.propagate_in_video(state, reverse=reverse):
                low = out[0, :, :96, :128].float()  # crop the padding, back to the 48x64 slice
                up = F.interpolate(low[None], size=(48, 64), mode="bilinear")[0, 0]
                out_logits[idx] = up.numpy()
        return out_logits

    return run


def _assert_same(ours, res, ref_logits) -> None:
    assert sorted(ref_logits) == sorted(ours.last_logits) == [0, 1, 2, 3]
    for i in range(4):
        a, b = ours.last_logits[i], ref_logits[i]
        assert np.abs(a - b).max() < 1e-5, (i, np.abs(a - b).max())
        ref_mask = b > 0
        assert ref_mask.any() and np.array_equal(a > 0, ref_mask)
        assert np.array_equal(res.mask[i], ref_mask)  # Dice 1.0


def test_propagation_from_a_box_equals_sam2_video_predictor(model, reference):
    """Same checkpoint, same frames, same box: our logits equal sam2's own (|diff| < 1e-5) and
    the masks are identical, both directions from the key slice."""
    from medseg.predict.sam2 import Sam2Propagator

    key, (r0, c0, r1, c1) = 1, (13.0, 19.0, 30.0, 42.0)
    ours = Sam2Propagator(_volume(), model, window="0,100")
    res = ours.propagate([KeyPrompt(key, box_rc=(r0, c0, r1, c1))], keep_logits=True)
    # the box in model pixels by hand: x = col * 128 / 64, y = row * 96 / 48
    box_xy = [2 * c0, 2 * r0, 2 * c1, 2 * r1]
    _assert_same(ours, res, reference(lambda p, st: p.add_new_points_or_box(st, 1, 1, box=box_xy)))
    # per-slice records: object score (biased +10 in the checkpoint), IoU, a review list
    assert [r.index for r in res.records] == [0, 1, 2, 3]
    assert all(r.accepted and r.object_score > 5 for r in res.records)
    assert all(0.0 <= r.iou_pred <= 1.0 for r in res.records)
    assert res.review and set(res.review) <= {0, 2, 3}
    assert ours.cache_info()["frames_made"] == 4  # each frame made once, on demand


def test_propagation_from_points_and_a_mask_equals_sam2_video_predictor(model, reference):
    """Two key slices: a positive and a negative point on slice 0, a mask on slice 3; the gap
    is filled as sam2 fills it."""
    import torch
    import torch.nn.functional as F

    from medseg.predict.sam2 import Sam2Propagator

    mask = np.zeros((48, 64), bool)
    mask[15:28, 22:40] = True
    pts, labels = np.array([[21.0, 30.0], [5.0, 5.0]]), np.array([1, 0])
    ours = Sam2Propagator(_volume(), model, window="0,100")
    keys = [KeyPrompt(0, points_rc=pts, point_labels=labels), KeyPrompt(3, mask=mask)]
    res = ours.propagate(keys, keep_logits=True)

    m = F.interpolate(
        torch.from_numpy(mask.astype(np.float32))[None, None], size=(96, 128), mode="bilinear"
    )[0, 0]
    mask_s = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask_s[:96, :128] = m >= 0.5

    def add(p, st):
        p.add_new_points_or_box(st, 0, 1, points=pts[:, ::-1] * 2, labels=labels)
        p.add_new_mask(st, 3, 1, mask_s)

    _assert_same(ours, res, reference(add))
    assert [(r.index, r.source, r.distance) for r in res.records][::3] == [(0, 0, 0), (3, 3, 0)]
    assert next(r for r in res.records if r.index == 3).iou_pred == 1.0  # a given mask


def test_walk_stops_where_the_object_score_says_gone(model):
    """A checkpoint whose object score is negative everywhere: the walk stops one slice past
    the key slice in each direction, with the reason recorded, and the mask is empty."""
    import torch

    from medseg.predict.sam2 import Sam2Propagator

    bias = model.net.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(-10.0)
        vol = Volume(np.concatenate([_volume().array] * 2), spacing=(3.0, 1.0, 1.0))
        p = Sam2Propagator(vol, model, window="0,100")
        res = p.propagate([KeyPrompt(4, box_rc=(13, 19, 30, 42))])
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert [r.index for r in res.records] == [3, 4, 5]
    assert all(not r.accepted and r.stopped == "object gone" for r in res.records)
    assert all(r.object_score < 0 for r in res.records)
    assert not res.mask.any() and p.frames.made == 3


# --------------------------------------------------------------------------- end to end
def test_real_mr_from_one_box_writes_labels_on_the_image_grid(
    checkpoint, pyradiomics_dir, tmp_path
):
    """brain1 (MR), slices 11-14 cut out, one box on slice 12: medseg.segment with the SAM 2
    engine writes a label map whose grid equals the image's, and a report that follows the
    schema with engine 'sam2' and the weights' digest."""
    import medseg
    from medseg.io.files import read_labels, read_volume, write_volume
    from medseg.models.weights import sha256_file
    from medseg.report import validate_report

    full = read_volume(pyradiomics_dir / "brain1_image.nrrd")
    z0 = 11
    cut = Volume(
        full.array[z0 : z0 + 4].copy(),
        spacing=full.spacing,
        origin=tuple(full.index_to_world((z0, 0, 0))),
        direction=full.direction,
        meta={"modality": "MR"},
    )
    img = tmp_path / "brain1_cut.nrrd"
    write_volume(cut, img)
    seg = medseg.segment(
        img,
        model=SPEC,
        weights=checkpoint,
        prompts=medseg.Box(z=1, y0=120, x0=175, y1=158, x1=208),
        precision="fp32",
        device="cpu",
    )
    out = tmp_path / "pred.nii.gz"
    seg.save(out)
    image = read_volume(img)
    lab = read_labels(out)
    assert lab.shape == image.shape == (4, 256, 256)
    np.testing.assert_allclose(lab.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(lab.origin, image.origin, atol=1e-4)
    np.testing.assert_allclose(lab.direction, image.direction, atol=1e-6)
    assert lab.array[1].any()  # the key slice holds the object
    rep = json.loads(out.with_name("pred.json").read_text())
    validate_report(rep)
    assert rep["engine"] == "sam2" and rep["model"]["engine"] == "sam2"
    assert rep["model"]["weights_sha256"] == sha256_file(checkpoint)
    recs = rep["sam2"]["propagation"]["records"]
    assert {r["index"] for r in recs} == {0, 1, 2, 3}
    assert all("object_score" in r and "iou_pred" in r for r in recs)
    from medseg.cli.segment import summary

    assert summary(rep)[0].startswith(f"segmented {int(lab.array.astype(bool).sum())} voxels on")


def test_napari_sam_panel_lists_sam2_models_whose_weights_are_present(tmp_path, monkeypatch):
    pytest.importorskip("magicgui")
    need_sam2()
    from medseg._napari._sam_widget import available_models

    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path))
    assert not {"sam2.1_hiera_tiny", "medsam2"} & set(available_models())
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "sam2.1_hiera_tiny.pt").write_bytes(b"")
    names = available_models()
    assert "sam2.1_hiera_tiny" in names and "medsam2" not in names
    assert names.index("sam2.1_hiera_tiny") > names.index("litemedsam")


def test_dropping_unreachable_state_changes_nothing(checkpoint):
    """On a volume longer than the memory's reach the model state is trimmed to a window, and
    the logits equal those of an untrimmed run (object pointers limited to 4 frames here so a
    short volume is 'long')."""
    from medseg.models.sam2 import load_sam2_model
    from medseg.predict.sam2 import Sam2Propagator

    arch = {**SPEC.arch, "overrides": {"max_obj_ptrs_in_encoder": 4}}
    m = load_sam2_model(replace(SPEC, arch=arch), checkpoint, device="cpu", precision="fp32")
    base = _volume().array
    vol = Volume(np.concatenate([base] * 6), spacing=(3.0, 1.0, 1.0))  # 24 slices
    runs = []
    for trim in (True, False):
        p = Sam2Propagator(vol, m, window="0,100")
        p.trim_state = trim
        res = p.propagate([KeyPrompt(1, box_rc=(13, 19, 30, 42))], keep_logits=True)
        runs.append((p, res))
    (pt, rt), (pf, rf) = runs
    assert sorted(pt.last_logits) == sorted(pf.last_logits) == list(range(24))
    for i in range(24):
        np.testing.assert_array_equal(pt.last_logits[i], pf.last_logits[i])
    np.testing.assert_array_equal(rt.mask, rf.mask)
    assert pf.peak_state_frames == 24 and pt.peak_state_frames <= 8 + 8 + 2


def test_sam2_checkpoint_given_as_model_says_how_to_pass_it(tmp_path):
    import torch

    path = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1, 96, 7, 7)}}, path)
    with pytest.raises(WeightsError) as exc:
        resolve_model(path)
    msg = str(exc.value)
    assert (
        "\n" not in msg and "SAM 2 layout" in msg and "--model sam2.1_hiera_tiny --weights" in msg
    )
