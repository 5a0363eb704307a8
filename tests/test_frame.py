"""Slice extraction and slice ⇄ model-frame scaling (hand-computed cases and round trips)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import PromptError
from medseg.models.registry import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from medseg.predict.frame import (
    AXES,
    MASK_PROMPT_LOGIT,
    ModelFrame,
    check_index,
    join_point,
    set_slice,
    slice_of,
    slice_spacing,
    split_point,
)


def test_slices_along_each_axis():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert AXES == {"z": 0, "y": 1, "x": 2}
    assert slice_of(vol, "z", 1).tolist() == vol[1].tolist()
    assert slice_of(vol, "y", 2).shape == (2, 4)
    assert slice_of(vol, "y", 2)[1, 3] == vol[1, 2, 3]
    assert slice_of(vol, "x", 3).shape == (2, 3)
    assert slice_of(vol, "x", 3)[1, 2] == vol[1, 2, 3]
    out = np.zeros_like(vol)
    set_slice(out, "y", 1, 7)
    assert out[:, 1, :].min() == 7 and out.sum() == 7 * 2 * 4
    set_slice(out, "x", 0, np.full((2, 3), 5))
    assert (out[:, :, 0] == 5).all()


def test_slice_index_errors():
    vol = np.zeros((2, 3, 4))
    with pytest.raises(PromptError, match=r"out of range; valid: 0\.\.2"):
        slice_of(vol, "y", 3)
    with pytest.raises(PromptError, match="out of range"):
        slice_of(vol, "z", -1)
    with pytest.raises(PromptError, match="not an integer"):
        check_index("a", 5)
    with pytest.raises(PromptError, match="out of range"):
        check_index(1.5, 5)
    with pytest.raises(PromptError, match="unknown slicing axis"):
        slice_of(vol, "w", 0)


def test_spacing_and_point_split():
    sp = (5.0, 0.7, 0.6)
    assert slice_spacing(sp, "z") == (0.7, 0.6)
    assert slice_spacing(sp, "y") == (5.0, 0.6)
    assert slice_spacing(sp, "x") == (5.0, 0.7)
    assert split_point((3, 10, 20), "z") == (3, (10.0, 20.0))
    assert split_point((3, 10, 20), "y") == (10, (3.0, 20.0))
    assert split_point((3, 10, 20), "x") == (20, (3.0, 10.0))
    for ax in "zyx":
        idx, rc = split_point((3, 10, 20), ax)
        assert join_point(idx, rc, ax) == (3.0, 10.0, 20.0)


def test_square_frame_scaling_hand_computed():
    f = ModelFrame((512, 512), 256)
    assert f.resized_shape == (256, 256)
    assert f.scale_rc == (0.5, 0.5)
    # (row, col) -> (x, y): x = col * 0.5, y = row * 0.5
    np.testing.assert_allclose(f.points_to_model([[100, 40]]), [[20.0, 50.0]])
    np.testing.assert_allclose(f.box_to_model((10, 20, 30, 40)), [10.0, 5.0, 20.0, 15.0])
    f1024 = ModelFrame((512, 512), 1024)
    np.testing.assert_allclose(f1024.box_to_model((10, 20, 30, 40)), [40.0, 20.0, 80.0, 60.0])


def test_non_square_frame_scaling_hand_computed():
    # breast1-like 120 x 45 slice: long side 120 -> 256, short 45 -> round(96) = 96
    f = ModelFrame((120, 45), 256)
    assert f.resized_shape == (256, 96)
    sy, sx = f.scale_rc
    assert sy == pytest.approx(256 / 120) and sx == pytest.approx(96 / 45)
    np.testing.assert_allclose(f.points_to_model([[60, 30]]), [[64.0, 128.0]], rtol=1e-6)
    wide = ModelFrame((100, 400), 1024)
    assert wide.resized_shape == (256, 1024)
    np.testing.assert_allclose(wide.box_to_model((0, 0, 50, 200)), [0, 0, 512, 128])


def test_anisotropic_frame_makes_pixels_square():
    # coronal slice of 40 slices x 200 columns, 5 mm x 1 mm -> 200 mm x 200 mm -> 256 x 256
    f = ModelFrame((40, 200), 256, pixel_spacing=(5.0, 1.0))
    assert f.resized_shape == (256, 256)
    assert f.scale_rc == (6.4, 1.28)
    np.testing.assert_allclose(f.points_to_model([[10, 100]]), [[128.0, 64.0]])
    # lung1-like coronal: 48 x 512 at (5.0, 0.57) mm -> 240 x 291.84 mm -> 211 x 256
    g = ModelFrame((48, 512), 256, pixel_spacing=(5.0, 0.57))
    assert g.resized_shape == (int(240 * 256 / 291.84 + 0.5), 256) == (211, 256)


@pytest.mark.parametrize(
    "shape,size,spacing",
    [((512, 512), 256, (1, 1)), ((120, 45), 256, (1, 1)), ((48, 512), 1024, (5.0, 0.57))],
)
def test_point_and_box_round_trip(shape, size, spacing):
    f = ModelFrame(shape, size, spacing)
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (20, 2)) * (np.array(shape) - 1)
    np.testing.assert_allclose(
        f.points_from_model(f.points_to_model(pts)), pts, rtol=1e-5, atol=1e-4
    )
    box = (2.0, 3.0, shape[0] - 5.0, shape[1] - 7.0)
    np.testing.assert_allclose(f.box_from_model(f.box_to_model(box)), box, rtol=1e-5, atol=1e-4)
    # the far corner of the slice lands inside the unpadded part of the model input
    x, y = f.points_to_model([[shape[0] - 1, shape[1] - 1]])[0]
    nh, nw = f.resized_shape
    assert x < nw and y < nh


def test_image_to_model_resizes_bilinear_and_pads():
    img = np.arange(16, dtype=np.float32).reshape(4, 4) / 15.0
    f = ModelFrame((4, 4), 2, lowres_size=2)
    out = f.image_to_model(img)
    # exact 2x bilinear (align_corners=False) downsampling = mean of each 2x2 block
    blocks = img.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c], blocks, atol=1e-6)
    # non-square: 2 x 4 -> 1 x 2, padded bottom with zeros
    g = ModelFrame((2, 4), 2, lowres_size=2)
    out2 = g.image_to_model(img[:2])
    np.testing.assert_allclose(out2[0, 0], img[:2].reshape(1, 2, 2, 2).mean(axis=(1, 3))[0])
    assert (out2[:, 1] == 0).all()


def test_image_to_model_sam_rgb_normalises_before_padding():
    f = ModelFrame((8, 4), 8)
    out = f.image_to_model(np.ones((8, 4), np.float32), "sam_rgb")
    for c in range(3):
        expect = (255.0 - SAM_PIXEL_MEAN[c]) / SAM_PIXEL_STD[c]
        np.testing.assert_allclose(out[c, :, :4], expect, rtol=1e-6)
        assert (out[c, :, 4:] == 0).all()
    with pytest.raises(PromptError, match="does not match frame"):
        f.image_to_model(np.ones((4, 8)))


def test_logits_to_slice_crops_padding_and_upsamples():
    # square 512 slice, 256 model: half-plane logits land exactly on columns < 256
    f = ModelFrame((512, 512), 256)
    low = np.where(np.arange(256)[None, None, :] < 128, 5.0, -5.0) * np.ones((2, 256, 1))
    out = f.logits_to_slice(low)
    assert out.shape == (2, 512, 512)
    mask = out > 0
    assert mask[:, :, :256].all() and not mask[:, :, 256:].any()
    # 100 x 50 slice -> 256 x 128 inside the square: the padded half must be cropped away
    g = ModelFrame((100, 50), 256)
    low2 = np.where(np.arange(256)[None, :] < 128, 3.0, -3.0) * np.ones((256, 1))
    out2 = g.logits_to_slice(low2)
    assert out2.shape == (1, 100, 50) and (out2 > 0).all()
    # ViT-B: 256 low-res logits upsampled to 1024 first, then cropped
    h = ModelFrame((512, 256), 1024)
    low3 = np.where(np.arange(256)[:, None] < 64, 4.0, -4.0) * np.ones((1, 256))
    m3 = h.logits_to_slice(low3)[0] > 0
    assert m3[:128].all() and not m3[128:].any()


def test_mask_prompt_round_trip():
    f = ModelFrame((300, 200), 256, pixel_spacing=(0.5, 0.8))
    yy, xx = np.mgrid[:300, :200]
    disc = (yy - 150) ** 2 / 60**2 + (xx - 90) ** 2 / 40**2 <= 1
    low = f.mask_to_lowres(disc)
    assert low.shape == (256, 256) and low.dtype == np.float32
    assert low.max() == pytest.approx(MASK_PROMPT_LOGIT, rel=1e-4)
    _, nw = f.resized_shape
    assert low[:, nw + 1 :] == pytest.approx(-MASK_PROMPT_LOGIT, rel=1e-4)
    back = f.logits_to_slice(low)[0] > 0
    dice = 2 * np.count_nonzero(back & disc) / (back.sum() + disc.sum())
    assert dice > 0.98


def test_mask_to_grid_fractions():
    f = ModelFrame((256, 256), 256)
    m = np.zeros((256, 256), bool)
    m[4:8, 8:12] = True  # exactly embedding cell (1, 2)
    m[0:2, 0:4] = True  # half of cell (0, 0)
    g = f.mask_to_grid(m)
    assert g.shape == (64, 64)
    assert g[1, 2] == 1.0 and g[0, 0] == 0.5 and g.sum() == 1.5
