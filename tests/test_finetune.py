"""Fine-tuning the SAM-Med mask decoder (issue 9): decoder files, frozen encoder, embedding cache,
loss, held-out validation, resume, segmentation with a decoder, torchrun agreement.

Tiny ViT-B models (same classes, random weights, saved as a weights file) keep most tests fast;
the real LiteMedSAM is fine-tuned on a small phantom crop through the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import InputError, WeightsError
from medseg.io.datasets import write_msd_dataset
from medseg.models.decoder import (
    arch_digest,
    read_decoder,
    with_decoder,
)
from medseg.models.registry import get_spec
from medseg.models.sam import (
    SMALL_VIT_B,
    build_sam_model,
    get_sam_model,
    load_sam_model,
    read_checkpoint,
)
from medseg.train.decoder import finetune, resume_path_for, split_cases
from medseg.volume import LabelMap, Volume

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_weights(path: Path, seed: int, **arch) -> tuple[Path, object]:
    """A tiny random ViT-B saved as a weights file, and a spec naming it."""
    torch.manual_seed(seed)
    torch.save(build_sam_model("sam_vit_b", small=True, **arch).state_dict(), path)
    spec = dataclasses.replace(
        get_spec("sam_vit_b"),
        name="tiny_vit_b",
        filename=path.name,
        sha256=None,
        url=None,
        arch={**SMALL_VIT_B, **arch},
    )
    return path, spec


def blob_case(seed: int, z_range=(1, 2), shape=(4, 48, 40)) -> tuple[str, Volume, LabelMap]:
    """A bright ellipse (label 1 "blob") on slices ``z_range`` of a noisy CT-like volume."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    cy, cx = 24 + int(rng.integers(-4, 4)), 18 + int(rng.integers(-3, 3))
    inside = (
        ((yy - cy) ** 2 / 10**2 + (xx - cx) ** 2 / 8**2 <= 1)
        & (zz >= z_range[0])
        & (zz <= z_range[1])
    )
    noise = rng.integers(-20, 20, inside.shape).astype(np.int16)
    arr = np.where(inside, 60, -900).astype(np.int16) + noise
    vol = Volume(arr, spacing=(3.0, 1.0, 1.0), meta={"modality": "CT"})
    return f"blob{seed}", vol, LabelMap.like(vol, inside.astype(np.uint8), {1: "blob"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.pth", 0)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Three volumes, 2 object slices each (MSD layout)."""
    root = tmp_path_factory.mktemp("ds") / "blobs"
    write_msd_dataset(
        root, (blob_case(s) for s in range(3)), name="b", description="b", labels={1: "blob"}
    )
    return root


@pytest.fixture(scope="module")
def trained(tiny, blobs, tmp_path_factory):
    """Three epochs (2 steps of 2 slices each) on two volumes, one held out; fresh cache."""
    wpath, spec = tiny
    tmp = tmp_path_factory.mktemp("run")
    res = finetune(
        blobs,
        spec,
        weights=wpath,
        label="blob",
        out=tmp / "blob.pt",
        epochs=3,
        val_fraction=0.34,
        batch_size=2,
        lr=1e-3,
        precision="fp32",
        cache_dir=tmp / "cache",
    )
    return res, tmp


# --------------------------------------------------------------------------- decoder file
def test_decoder_file_round_trip(trained, tiny):
    res, _ = trained
    wpath, spec = tiny
    info = read_decoder(res.path)
    assert info.sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest() == res.sha256
    raw = torch.load(res.path, weights_only=True)  # plain data only
    assert raw["format"] == "medseg-sam-decoder"
    assert set(raw) == {
        "format", "version", "state_dict", "base", "preprocessing", "label", "training",
    }  # fmt: skip
    base = load_sam_model(spec, weights=wpath, precision="fp32")
    assert set(info.state_dict) == set(base.mask_decoder.state_dict())  # decoder weights only
    assert info.base["weights_sha256"] == hashlib.sha256(wpath.read_bytes()).hexdigest()
    assert info.base["arch_sha256"] == arch_digest(base)
    assert info.base["model"] == "tiny_vit_b"
    assert info.label == {"value": 1, "name": "blob"}
    assert info.preprocessing["input_size"] == 1024
    assert info.window == "wide"  # the CT default it trained with, reproduced at segment time
    assert info.training["best_epoch"] == res.best_epoch
    assert info.training["train_cases"] == res.train_cases
    # loading puts exactly the file's weights in a copy; the base model keeps its own
    before = {k: v.clone() for k, v in base.mask_decoder.state_dict().items()}
    model = with_decoder(base, res.path)
    for k, v in model.mask_decoder.state_dict().items():
        assert torch.equal(v, info.state_dict[k])
        assert torch.equal(base.mask_decoder.state_dict()[k], before[k])
    assert model.image_encoder is base.image_encoder
    assert model.decoder_sha256 == res.sha256
    assert any(not torch.equal(info.state_dict[k], before[k]) for k in before)


def test_decoder_refused_on_other_base(trained, tmp_path):
    res, _ = trained
    other_w, other_spec = tiny_weights(tmp_path / "other.pth", 1)  # same arch, other weights
    other = load_sam_model(other_spec, weights=other_w, precision="fp32")
    with pytest.raises(WeightsError, match="sha256") as e:
        with_decoder(other, res.path)
    assert "\n" not in str(e.value)
    wide_w, wide_spec = tiny_weights(tmp_path / "wide.pth", 0, embed_dim=32)  # other arch
    wide = load_sam_model(wide_spec, weights=wide_w, precision="fp32")
    with pytest.raises(WeightsError, match="architecture") as e:
        with_decoder(wide, res.path)
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.pt"
    torch.save(wide.state_dict(), bad)  # a full checkpoint is not a decoder
    with pytest.raises(WeightsError, match="not a medseg decoder"):
        read_decoder(bad)


# --------------------------------------------------------------------------- training
def test_encoder_frozen_and_shared_model_untouched(trained, tiny):
    wpath, spec = tiny
    base = get_sam_model(spec, weights=wpath, precision="fp32")  # the model training used
    file_state = read_checkpoint(wpath)
    for name, p in base.image_encoder.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p.detach(), file_state[f"image_encoder.{name}"])
    for name, p in base.prompt_encoder.named_parameters():
        assert not p.requires_grad
        assert torch.equal(p.detach(), file_state[f"prompt_encoder.{name}"])
    for name, t in base.mask_decoder.state_dict().items():  # the shared model keeps its decoder
        assert torch.equal(t, file_state[f"mask_decoder.{name}"])
    assert not base.image_encoder.training


def test_embeddings_computed_once(trained, tiny, blobs):
    res, tmp = trained
    # 2 training volumes x 2 object slices, each embedded once for 3 epochs
    assert res.train_slices == 4
    assert res.encoder_calls == 4
    # the same slices again: all from the disk cache interactive use shares
    wpath, spec = tiny
    again = finetune(
        blobs,
        spec,
        weights=wpath,
        label=1,
        out=tmp / "again.pt",
        epochs=0,
        val_fraction=0.34,
        precision="fp32",
        cache_dir=tmp / "cache",
    )
    assert again.train_slices == 4 and again.encoder_calls == 0
    assert again.best_epoch == 0
    same = ("val_box_dice", "val_dice_3d")
    assert [again.history[0][k] for k in same] == [res.history[0][k] for k in same]


def test_loss_decreases_and_validation_improves(trained):
    res, _ = trained
    losses = [r["train_loss"] for r in res.history if r["epoch"] > 0]
    assert len(losses) == 3 and losses[-1] < losses[0]
    base, best = res.baseline, res.best
    assert base is not None and best is not None
    assert res.best_epoch > 0
    assert best["val_box_dice"] > base["val_box_dice"] + 0.2
    curve = json.loads(res.curve_json.read_text())
    assert curve["history"] == res.history and curve["decoder_sha256"] == res.sha256
    assert res.curve_png is not None and res.curve_png.read_bytes()[:4] == b"\x89PNG"


def test_validation_uses_held_out_volumes_only(trained, tiny, blobs):
    res, _ = trained
    assert len(res.val_cases) == 1 and len(res.train_cases) == 2
    assert not set(res.val_cases) & set(res.train_cases)
    assert sorted(res.val_cases + res.train_cases) == ["blob0", "blob1", "blob2"]
    # epoch 0 is the zero-shot model on exactly the held-out volume
    from medseg.io.datasets import load_dataset
    from medseg.predict.propagate import oracle_dice
    from medseg.predict.sam import VolumePredictor

    ds = load_dataset(blobs)
    img, lab = ds.load_case(ds.case_ids.index(res.val_cases[0]))
    wpath, spec = tiny
    pred = VolumePredictor(img, load_sam_model(spec, weights=wpath, precision="fp32"))
    orc = oracle_dice(pred, lab.array == 1)
    want = np.mean([r["dice"] for r in orc.per_slice])
    assert res.baseline["val_box_dice"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("window", [None, "liver", "-100,300", "percentile"])
def test_saved_window_reproduces_the_mapping(modality, window):
    from medseg.intensity import resolve_intensity
    from medseg.train.decoder import window_of

    arr = np.random.default_rng(0).integers(-1000, 400, (3, 8, 8)).astype(np.int16)
    vol = Volume(arr, meta={"modality": modality})
    used = resolve_intensity(vol, window)
    again = resolve_intensity(Volume(arr), window_of(used))  # the test image may lack the tag
    assert again.key == used.key


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("frac", [0.1, 0.2, 0.5])
def test_split_whole_volumes(n, frac):
    tr, va = split_cases(n, frac, seed=3)
    assert sorted(tr + va) == list(range(n)) and not set(tr) & set(va)
    assert 1 <= len(va) <= n - 1
    assert split_cases(n, frac, seed=3) == (tr, va)


def test_split_and_label_errors(tiny, blobs, tmp_path):
    with pytest.raises(InputError, match="held-out volumes"):
        split_cases(1, 0.2, 0)
    with pytest.raises(InputError, match="val_fraction"):
        split_cases(4, 1.0, 0)
    wpath, spec = tiny
    with pytest.raises(InputError, match="label table"):
        finetune(blobs, spec, weights=wpath, label="liver", out=tmp_path / "d.pt", epochs=1)


def test_resume_after_interrupt_continues_same_optimizer_state(tiny, blobs, tmp_path):
    wpath, spec = tiny
    kw = {
        "weights": wpath,
        "label": 1,
        "epochs": 2,
        "val_fraction": 0.0,
        "batch_size": 3,
        "lr": 1e-3,
        "precision": "fp32",
        "cache_dir": tmp_path / "cache",
    }
    straight = finetune(blobs, spec, out=tmp_path / "a.pt", **kw)  # 6 slices: 2 steps/epoch

    def interrupt(done, total):  # Ctrl-C after the 3rd of 4 training steps (epoch 2, step 1)
        if total == 4 and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(blobs, spec, out=tmp_path / "b.pt", progress=interrupt, **kw)
    ck_path = resume_path_for(tmp_path / "b.pt")
    ck = torch.load(ck_path, weights_only=True)
    assert (ck["epoch"], ck["step"]) == (2, 1)
    assert not (tmp_path / "b.pt").exists()
    adam = ck["optimizer"]["state"]
    assert adam and all(float(s["step"]) == 3 for s in adam.values())
    resumed = finetune(blobs, spec, out=tmp_path / "b.pt", resume=ck_path, overwrite=True, **kw)
    for k, v in straight.state.items():
        torch.testing.assert_close(resumed.state[k], v, rtol=1e-5, atol=1e-6)
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [r["train_loss"] for r in straight.history], rel=1e-5
    )
    with pytest.raises(InputError, match="seed"):
        finetune(blobs, spec, out=tmp_path / "c.pt", resume=ck_path, seed=1, **kw)


# --------------------------------------------------------------------------- torchrun
DDP_SCRIPT = """
import dataclasses, sys, os, torch
from pathlib import Path
from medseg.models.registry import get_spec
from medseg.models.sam import SMALL_VIT_B
from medseg.train.decoder import finetune
data, weights, out = sys.argv[1:4]
spec = dataclasses.replace(get_spec("sam_vit_b"), name="tiny_vit_b", filename=Path(weights).name,
                           sha256=None, url=None, arch=dict(SMALL_VIT_B))
res = finetune(data, spec, weights=weights, label=1, out=out, epochs=1, val_fraction=0.0,
               batch_size=4, lr=1e-3, precision="fp32", cache_dir=Path(out).parent / "cache")
rank = int(os.environ.get("RANK", "0"))
torch.save({"state": res.state, "loss": res.history[-1]["train_loss"]},
           Path(out).parent / f"state{rank}.pt")
"""


def test_torchrun_two_processes_agree_with_one(tiny, tmp_path):
    """One optimizer step on 4 slices: 2 gloo processes (2 slices each) == 1 process (4)."""
    wpath, _ = tiny
    root = tmp_path / "ds"
    write_msd_dataset(
        root,
        (blob_case(s, z_range=(1, 2), shape=(4, 48, 40)) for s in range(2)),
        name="b",
        description="b",
        labels={1: "blob"},
    )
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r1 = subprocess.run(
        [sys.executable, str(script), str(root), str(wpath), str(tmp_path / "one" / "d.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r2 = subprocess.run(
        [*cmd, str(script), str(root), str(wpath), str(tmp_path / "two" / "d.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    one = torch.load(tmp_path / "one" / "state0.pt", weights_only=True)
    a = torch.load(tmp_path / "two" / "state0.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "state1.pt", weights_only=True)
    assert a["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert a["loss"] == b["loss"]
    moved = 0
    for k, v in one["state"].items():
        assert torch.equal(a["state"][k], b["state"][k])  # replicas identical
        torch.testing.assert_close(a["state"][k], v, rtol=1e-4, atol=1e-5)
    base = read_checkpoint(wpath)
    for k, v in one["state"].items():
        moved += int(not torch.equal(v, base[f"mask_decoder.{k}"]))
    assert moved > 0  # the step changed the decoder
    assert (tmp_path / "two" / "d.pt").is_file()


# --------------------------------------------------------------------------- real LiteMedSAM
def kidney_crop(seed: int) -> tuple[str, Volume, LabelMap]:
    """Three kidney slices of a phantom, cropped to 64x64 around the kidney."""
    from medseg.phantom import make_phantom

    img, lab = make_phantom(seed, shape=(24, 96, 96), spacing=(6.0, 2.0, 2.0))
    m = lab.array == 3
    zs = np.flatnonzero(m.any(axis=(1, 2)))
    zc = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(m[zc])
    y0 = int(np.clip(ys.mean() - 32, 0, 96 - 64))
    x0 = int(np.clip(xs.mean() - 32, 0, 96 - 64))
    sl = np.s_[zc - 1 : zc + 2, y0 : y0 + 64, x0 : x0 + 64]
    vol = Volume(np.ascontiguousarray(img.array[sl]), spacing=img.spacing, meta={"modality": "CT"})
    return f"kidney{seed}", vol, LabelMap.like(vol, m[sl].astype(np.uint8), {1: "kidney"})


def test_litemedsam_finetune_cli_and_segment_with_decoder(tmp_path):
    """`medseg finetune` on the real LiteMedSAM, then `medseg segment --decoder`: other masks,
    the decoder's hash in the report, the embedding cache of plain runs reused."""
    import medseg
    from medseg.io.files import write_labels, write_volume

    root = tmp_path / "ds"
    write_msd_dataset(
        root, (kidney_crop(s) for s in (1, 2)), name="k", description="k", labels={1: "kidney"}
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "cache"
    dec = tmp_path / "kidney.pt"
    cli = [sys.executable, "-m", "medseg"]
    r = subprocess.run(
        [
            *cli,
            "finetune",
            "--data",
            str(root),
            "--label",
            "kidney",
            "--out",
            str(dec),
            "--epochs",
            "2",
            "--val-fraction",
            "0",
            "--lr",
            "1e-3",
            "--batch-size",
            "3",
            "--cache-dir",
            str(cache),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    sha = hashlib.sha256(dec.read_bytes()).hexdigest()
    assert f"sha256 {sha}" in r.stdout
    assert read_decoder(dec).base["model"] == "litemedsam"

    _, img, gt = kidney_crop(0)  # an unseen volume
    box = medseg.box_from_gt(gt)
    plain = medseg.segment(img, "litemedsam", prompts=box, gt=gt, oracle=True, cache_dir=cache)
    assert plain.report["model"]["decoder_sha256"] is None
    tuned = medseg.segment(
        img, "litemedsam", prompts=box, gt=gt, oracle=True, cache_dir=cache, decoder=dec
    )
    assert tuned.report["model"]["decoder_sha256"] == sha
    assert tuned.report["model"]["decoder"] == str(dec)
    assert tuned.report["sam"]["cache"]["encoder_calls"] == 0  # the same embeddings
    assert not np.array_equal(tuned.oracle.mask, plain.oracle.mask)
    medseg.validate_report(tuned.report)
    again = medseg.segment(img, "litemedsam", prompts=box, gt=gt, oracle=True, cache_dir=cache)
    assert np.array_equal(again.oracle.mask, plain.oracle.mask)  # shared model untouched
    assert np.array_equal(again.labels.array, plain.labels.array)

    # the command line: same result, hash in the report
    write_volume(img, tmp_path / "img.nii.gz")
    write_labels(gt, tmp_path / "gt.nii.gz")
    rep = tmp_path / "r.json"
    r = subprocess.run(
        [
            *cli,
            "segment",
            str(tmp_path / "img.nii.gz"),
            "--decoder",
            str(dec),
            "--box-from-gt",
            str(tmp_path / "gt.nii.gz"),
            "--gt",
            str(tmp_path / "gt.nii.gz"),
            "--json",
            str(rep),
            "--cache-dir",
            str(cache),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    assert report["model"]["decoder_sha256"] == sha
    assert report["sam"]["oracle"]["dice"] == tuned.report["sam"]["oracle"]["dice"]
    # a decoder with the U-Net is refused with one line, exit 2
    r = subprocess.run(
        [
            *cli,
            "segment",
            str(tmp_path / "img.nii.gz"),
            "--model",
            "unet-demo",
            "--decoder",
            str(dec),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_single_volume_trains_without_validation(tiny, tmp_path):
    wpath, spec = tiny
    root = tmp_path / "one"
    write_msd_dataset(root, [blob_case(7)], name="o", description="o", labels={1: "blob"})
    kw = {"weights": wpath, "label": 1, "epochs": 1, "precision": "fp32", "cache_dir": None}
    with pytest.raises(InputError, match="held-out volumes"):
        finetune(root, spec, out=tmp_path / "x.pt", val_fraction=0.2, **kw)
    res = finetune(root, spec, out=tmp_path / "d.pt", **kw)  # default: no validation
    assert res.val_cases == [] and res.baseline is None and res.best_epoch == 1
    assert "no held-out validation" in res.extra["note"]
    assert read_decoder(res.path).training["val_cases"] == []
