"""The fast SAM mask decoder (``medseg.models.accelerated._predict_masks_fast``) gives the stock
decoder's results: same logits to float rounding, same masks, on a tiny random decoder (every
prompt kind, the per-embedding memo, stale-memo guards) and on LiteMedSAM's real weights on a real
CT slice (lung1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medseg.models import accelerated as fast  # noqa: E402


class _Model(torch.nn.Module):
    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder = None
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def _tiny() -> _Model:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    pe = PromptEncoder(
        embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=8
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=4),
        transformer_dim=32,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    with torch.no_grad():  # non-trivial biases everywhere (zero-initialised ones included)
        for p in dec.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return _Model(pe, dec).eval()


_PROMPTS = {
    "box": {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]])},
    "box+point": {
        "boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]),
        "points": (torch.tensor([[[50.0, 60.0]]]), torch.tensor([[1]])),
    },
    "points": {"points": (torch.tensor([[[50.0, 60.0], [10.0, 5.0]]]), torch.tensor([[1, 0]]))},
    "box+mask": {
        "boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]),
        "masks": torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3)),
    },
}


def _decode(m: _Model, emb: torch.Tensor, prompt: dict, multimask: bool = True) -> tuple:
    with torch.no_grad():
        sparse, dense = m.prompt_encoder(
            points=prompt.get("points"), boxes=prompt.get("boxes"), masks=prompt.get("masks")
        )
        return m.mask_decoder(
            image_embeddings=emb,
            image_pe=m.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


def _close(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=2e-6, rtol=1e-5)


def test_fast_decoder_equals_stock_for_every_prompt_kind() -> None:
    m = _tiny()
    emb = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = {k: _decode(m, emb, p) for k, p in _PROMPTS.items()}
    fast.accelerate(m, "fp32")
    assert "predict_masks" in m.mask_decoder.__dict__
    for k, p in _PROMPTS.items():
        got = _decode(m, emb, p)
        assert got[0].shape == (1, 3, 32, 32) and got[1].shape == (1, 3)
        _close(got, ref[k])
    # the image side of the first block was computed once for the embedding (mask prompts
    # change the image tokens, so they bypass the memo)
    memo = m.mask_decoder.__dict__["_medseg_image_memo"]
    assert len(memo) == 1
    fast.restore(m)
    assert "predict_masks" not in m.mask_decoder.__dict__
    assert "_medseg_image_memo" not in m.mask_decoder.__dict__


def test_memo_is_reused_and_bounded_and_never_stale() -> None:
    m = _tiny()
    g = torch.Generator().manual_seed(2)
    embs = [torch.randn(1, 32, 8, 8, generator=g) for _ in range(3)]
    box = _PROMPTS["box+point"]
    ref = [_decode(m, e, box) for e in embs]
    fast.accelerate(m, "fp32")
    first = _decode(m, embs[0], box)
    # a new tensor object over the same memory (as the predictor's cache hands out) hits the memo
    again = _decode(m, torch.from_numpy(embs[0].numpy()), box)
    assert torch.equal(first[0], again[0])
    memo = m.mask_decoder.__dict__["_medseg_image_memo"]
    assert len(memo) == 1
    for e, r in zip(embs, ref, strict=True):
        _close(_decode(m, e, box), r)
    assert len(memo) == fast._DECODER_MEMO_ITEMS == 2
    # the embedding edited in place: recomputed, not served from the memo
    with torch.no_grad():
        embs[2].mul_(-1.5)
    fast.restore(m)
    ref_edit = _decode(m, embs[2], box)
    fast.accelerate(m, "fp32")
    _decode(m, embs[2], box)  # fill the memo with the edited embedding
    with torch.no_grad():
        embs[2][0, :, ::2].add_(1.0)  # values the probe samples and values it does not
    fast.restore(m)
    ref_edit2 = _decode(m, embs[2], box)
    fast.accelerate(m, "fp32")
    assert not torch.allclose(ref_edit[0], ref_edit2[0])
    _close(_decode(m, embs[2], box), ref_edit2)
    # decoder weights replaced (a fine-tuned decoder loaded): the memo is not used
    before = _decode(m, embs[1], box)
    state = {k: v + 0.1 for k, v in m.mask_decoder.state_dict().items()}
    m.mask_decoder.load_state_dict(state)
    after = _decode(m, embs[1], box)
    fast.restore(m)
    _close(after, _decode(m, embs[1], box))
    assert not torch.allclose(before[0], after[0], atol=1e-3)


def test_deep_copied_decoder_with_new_weights_does_not_reuse_the_memo() -> None:
    """``models.decoder.with_decoder`` deep-copies the (accelerated) decoder, memo included, and
    loads other weights: the copy must answer with its own weights."""
    import copy

    m = _tiny()
    emb = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(5))
    box = _PROMPTS["box"]
    fast.accelerate(m, "fp32")
    base = _decode(m, emb, box)  # fills the original's memo
    view = _Model(m.prompt_encoder, copy.deepcopy(m.mask_decoder))
    state = {k: v * 1.5 for k, v in m.mask_decoder.state_dict().items()}
    view.mask_decoder.load_state_dict(state)
    m.mask_decoder.load_state_dict(m.mask_decoder.state_dict())  # same versions on both
    got = _decode(view, emb, box)
    fast.restore(view)
    _close(got, _decode(view, emb, box))
    assert not torch.allclose(got[0], base[0], atol=1e-3)


def test_batched_prompts_take_the_stock_path() -> None:
    m = _tiny()
    emb = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(4))
    boxes = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [5.0, 5.0, 60.0, 40.0]])}
    ref = _decode(m, emb, boxes, multimask=False)
    fast.accelerate(m, "fp32")
    got = _decode(m, emb, boxes, multimask=False)
    assert got[0].shape == (2, 1, 32, 32)
    _close(got, ref)
    assert "_medseg_image_memo" not in m.mask_decoder.__dict__


def test_litemedsam_masks_equal_stock_fp32_on_lung1(pyradiomics_dir: Path) -> None:
    """Real weights, real CT slice (lung1's largest tumour slice): the fast decoder's masks equal
    the stock fp32 decoder's (per-slice Dice >= 0.999) for box, box + point, a point (three
    masks) and a mask prompt, all on one embedding."""
    from medseg.io import read_volume
    from medseg.models.sam import load_sam_model
    from medseg.predict.sam import VolumePredictor

    image = read_volume(pyradiomics_dir / "lung1_image.nrrd")
    model = load_sam_model("litemedsam", precision="fp32")
    pred = VolumePredictor(image, model)
    z, box = 33, (341.0, 200.0, 374.0, 235.0)
    prompts = [
        {"box_rc": box},
        {"box_rc": box, "points_rc": [[357.0, 217.0]]},
        {"points_rc": [[357.0, 217.0]], "multimask": True},
    ]
    got = [pred.predict(z, **p) for p in prompts]
    got.append(pred.predict(z, box_rc=box, mask_logits=got[0].low_res_logits[0]))
    fast.restore(model, keep_cache=True)
    try:
        ref = [pred.predict(z, **p) for p in prompts]
        ref.append(pred.predict(z, box_rc=box, mask_logits=ref[0].low_res_logits[0]))
    finally:
        fast.accelerate(model, model.precision)
    assert pred.encoder_calls == 1
    assert ref[0].masks[0].sum() > 300  # the box gives a tumour-sized mask
    for a, b in zip(got, ref, strict=True):
        assert a.masks.shape == b.masks.shape
        assert b.masks[b.best()].sum() > 30  # not an empty mask
        for ma, mb in zip(a.masks, b.masks, strict=True):
            dice = 2.0 * np.logical_and(ma, mb).sum() / max(1, ma.sum() + mb.sum())
            assert dice >= 0.999 or (ma.sum() + mb.sum()) == 0
        np.testing.assert_allclose(a.iou_pred, b.iou_pred, atol=1e-5)
        assert float(np.abs(a.low_res_logits - b.low_res_logits).max()) < 1e-3
