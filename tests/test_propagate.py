"""3D propagation from key-slice prompts with the real LiteMedSAM weights on a synthetic volume.

The volume is a bright ellipsoid (the object, true extent slices 2..9) inside a textured body with
a bright tube as a distractor; 12 slices of 96 x 96, so only a dozen slices are embedded (once,
module-scoped). Pure functions (stop rule, review score, boxes) are tested on hand-made inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import PromptError
from medseg.predict.propagate import (
    NO_STOP,
    KeyPrompt,
    PropagationConfig,
    SliceRecord,
    box_from_gt,
    dice3d,
    expand_box,
    interior_point,
    mask_box,
    oracle_dice,
    propagate,
    review_score,
    stop_reason,
)
from medseg.volume import Volume

TRUE_SLICES = list(range(2, 10))


def blob_volume(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """``(volume, object mask)``: an ellipsoid (z 2..9) in a textured body, 12 x 96 x 96."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nz, ny, nx = 12, 96, 96
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    obj = ((z - 5.5) / 3.9) ** 2 + ((y - 46) / 17) ** 2 + ((x - 50) / 20) ** 2 <= 1
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (nz, ny, nx)), (1.0, 6, 6))
    img = 200 + 40 * tex / tex.std()
    body = ((y - 48) / 44) ** 2 + ((x - 48) / 44) ** 2 <= 1
    img[~body] = 0
    img[((y - 20) / 7) ** 2 + ((x - 75) / 7) ** 2 <= 1] = 700  # a bright tube on every slice
    img[obj] = 600
    img += rng.normal(0, 15, img.shape)
    vol = Volume(img.astype(np.float32), spacing=(2.5, 1.0, 1.0), meta={"modality": "MR"})
    return vol, obj


@pytest.fixture(scope="module")
def model():
    from medseg.models.sam import get_sam_model

    return get_sam_model("litemedsam", precision="auto")


@pytest.fixture(scope="module")
def blob():
    return blob_volume()


@pytest.fixture(scope="module")
def predictor(model, blob):
    from medseg.predict.sam import VolumePredictor

    return VolumePredictor(blob[0], model)


@pytest.fixture(scope="module")
def single(predictor, blob):
    key = box_from_gt(blob[1], "z", 3)
    return key, propagate(predictor, [key])


# --------------------------------------------------------------------------- pure functions
def test_box_from_gt_picks_largest_slice_with_margin():
    gt = np.zeros((4, 10, 12), bool)
    gt[1, 2:4, 3:5] = True  # 4 px
    gt[2, 1:6, 0:4] = True  # 20 px, touches the left border
    kp = box_from_gt(gt, "z", margin_px=2)
    assert kp.index == 2
    assert kp.box_rc == (0.0, 0.0, 7.0, 5.0)  # rows 1-2 clipped at 0, 5+2; cols 0 clipped, 3+2
    kp_y = box_from_gt(gt, "y", margin_px=0)  # (z, x) slices along y: rows 1..5 have 4+ px
    assert kp_y.index == 2 and kp_y.box_rc == (1.0, 0.0, 2.0, 4.0)
    with pytest.raises(PromptError, match="empty"):
        box_from_gt(np.zeros((2, 3, 3), bool))


def test_mask_box_expand_and_interior_point():
    m = np.zeros((9, 9), bool)
    m[2:7, 3:6] = True
    assert mask_box(m) == (2, 3, 6, 5)
    assert mask_box(np.zeros((3, 3), bool)) is None
    assert expand_box((2, 3, 6, 5), (9, 9), 0.0, 1) == (1.0, 2.0, 7.0, 6.0)
    assert expand_box((2, 3, 6, 5), (9, 9), 0.5, 0) == (0.0, 1.5, 8.0, 6.5)
    sq = np.zeros((9, 9), bool)
    sq[2:7, 1:6] = True  # 5 x 5: the unique deepest pixel is the centre
    assert interior_point(sq) == (4.0, 3.0)


def _rec(**kw) -> SliceRecord:
    base: dict = {
        "index": 3,
        "source": 2,
        "distance": 1,
        "accepted": True,
        "iou_pred": 0.9,
        "stability": 0.9,
        "area_px": 100,
        "area_ratio": 1.0,
        "similarity": 0.9,
        "intensity": 0.5,
        "intensity_shift": 0.02,
        "overlap": 0.8,
        "extent": 0.3,
    }
    base.update(kw)
    return SliceRecord(**base)


def test_stop_reason_checks_each_signal():
    cfg = PropagationConfig(
        **{
            **NO_STOP,
            "min_iou": 0.8,
            "min_similarity": 0.5,
            "min_consistency": 0.3,
            "max_area_ratio": 2.0,
        }
    )
    assert stop_reason(_rec(), cfg) is None
    assert stop_reason(_rec(area_px=2), cfg) == "vanished"
    assert stop_reason(_rec(iou_pred=0.7), cfg) == "iou_pred<0.8"
    assert stop_reason(_rec(similarity=0.4), cfg) == "similarity<0.5"
    # similarity 0.6 passes its own check but 0.6 - 2 * 0.2 = 0.2 < 0.3
    assert stop_reason(_rec(similarity=0.6, intensity_shift=0.2), cfg) == "consistency<0.3"
    assert stop_reason(_rec(area_ratio=2.5), cfg) == "area_ratio>2"
    # the default rule: more like the key object's surroundings than like the object -> stop
    dflt = PropagationConfig()
    assert stop_reason(_rec(similarity=0.8, bg_similarity=0.7), dflt) is None
    assert stop_reason(_rec(similarity=0.7, bg_similarity=0.8), dflt) == "margin<0"
    assert stop_reason(_rec(intensity_shift=0.3), dflt) == "intensity_shift>0.15"
    # between two key slices only "vanished" stops
    assert stop_reason(_rec(iou_pred=0.1), cfg, full=False) is None
    assert stop_reason(_rec(area_px=0), cfg, full=False) == "vanished"
    with pytest.raises(PromptError, match="carry"):
        PropagationConfig(carry="box+scribble")


def test_review_score_orders_by_doubt():
    good = review_score(_rec())
    worse = review_score(_rec(iou_pred=0.6, stability=0.5))
    worst = review_score(_rec(iou_pred=0.4, stability=0.3, similarity=0.4, area_ratio=4.0))
    assert 0.0 <= good < worse < worst <= 1.0
    # hand value: shortfalls 0.1, 0.1, 0.2, 0 -> mean 0.1, + 0.02 * distance 1
    assert good == pytest.approx(0.12)


# --------------------------------------------------------------------------- with the model
def test_single_box_propagation_dice_and_ends(single, blob):
    key, res = single
    gt = blob[1]
    assert key.index in (5, 6)
    assert res.mask.shape == gt.shape and res.mask.dtype == bool
    d = dice3d(res.mask, gt)
    assert d > 0.7, d
    got = res.slices
    assert got[0] >= TRUE_SLICES[0] - 1 and got[-1] <= TRUE_SLICES[-1] + 1, got
    assert len(got) >= 4
    # nothing predicted outside the accepted slices, every accepted slice non-empty
    assert set(np.flatnonzero(res.mask.any(axis=(1, 2)))) == set(got)
    # each walk ends with a recorded stop (or the volume's end)
    stops = [r for r in res.records if r.stopped]
    assert all(not r.accepted for r in stops)
    ends = {r.index for r in stops} | ({0, 11} & set(got))
    assert min(got) - 1 in ends or min(got) == 0
    assert max(got) + 1 in ends or max(got) == 11


def test_review_sorted_by_stated_score(single):
    _, res = single
    scores = res.review_scores()
    assert res.review, "a multi-slice result has slices to review"
    assert res.key_slices[0] not in res.review
    vals = [scores[i] for i in res.review]
    assert vals == sorted(vals, reverse=True)
    rest = [s for i, s in scores.items() if i not in res.review and i not in res.key_slices]
    assert all(s <= vals[-1] for s in rest)
    js = res.to_json()
    assert [r["index"] for r in js["review"]] == res.review
    assert js["slices"] == res.slices


def test_several_key_slices_fill_between(predictor, blob):
    gt = blob[1]
    keys = [box_from_gt(gt[:4], "z", 3), box_from_gt(np.concatenate([0 * gt[:7], gt[7:]]), "z", 3)]
    assert [k.index for k in keys] == [3, 7]
    res = propagate(predictor, keys)
    assert res.key_slices == [3, 7]
    for i in range(3, 8):
        assert res.mask[i].any(), f"slice {i} between the key slices is empty"
    # default rule: of two predictions for a slice, the one with the larger embedding margin wins
    for i in range(4, 7):
        cands = [r for r in res.records if r.index == i and r.stopped in (None, "superseded")]
        won = [r for r in cands if r.accepted]
        assert len(won) == 1
        assert all(won[0].margin >= r.margin for r in cands)
    assert dice3d(res.mask, gt) > 0.7
    assert res.slices[0] >= 1 and res.slices[-1] <= 10
    nearer = propagate(predictor, keys, PropagationConfig(resolve="nearer"))
    src = {r.index: r.source for r in nearer.records if r.accepted}
    assert src[4] == 3 and src[6] == 7  # the nearer key slice wins


def test_no_propagation_and_key_mask(predictor, blob):
    gt = blob[1]
    key = box_from_gt(gt, "z", 3)
    res = propagate(predictor, [key], PropagationConfig(max_slices=0))
    assert res.slices == [key.index]
    res2 = propagate(
        predictor, [KeyPrompt(key.index, mask=gt[key.index])], PropagationConfig(max_slices=1)
    )
    assert np.array_equal(res2.mask[key.index], gt[key.index])  # a given mask is used as is
    assert set(res2.slices) <= {key.index - 1, key.index, key.index + 1}


def test_axis_y_matches_axial_on_transposed_volume(model, predictor, blob, single):
    """Propagating along y in a volume whose y is the blob's z gives the axial result.

    Two slices each way keep the number of embedded coronal slices small.
    """
    from medseg.predict.sam import VolumePredictor

    vol, gt = blob
    vol_t = Volume(
        np.ascontiguousarray(vol.array.transpose(1, 0, 2)),
        spacing=(1.0, 2.5, 1.0),
        meta=dict(vol.meta),
    )
    gt_t = gt.transpose(1, 0, 2)
    pred_y = VolumePredictor(vol_t, model, axis="y")
    key = box_from_gt(gt_t, "y", 3)
    assert key.index == single[0].index and key.box_rc == single[0].box_rc
    cfg = PropagationConfig(max_slices=2)
    res = propagate(pred_y, [key], cfg)
    ref = propagate(predictor, [single[0]], cfg)  # axial, embeddings already cached
    assert res.axis == "y" and res.mask.shape == vol_t.shape
    back = res.mask.transpose(1, 0, 2)
    assert res.slices == ref.slices and len(res.slices) >= 3
    assert dice3d(back, ref.mask) > 0.98
    assert np.array_equal(np.flatnonzero(res.mask.any(axis=(0, 2))), np.asarray(res.slices))


def test_oracle_dice_and_labelmap(predictor, blob, single):
    vol, gt = blob
    orc = oracle_dice(predictor, gt, margin_px=3)
    assert [p["index"] for p in orc.per_slice] == TRUE_SLICES
    assert orc.dice == pytest.approx(dice3d(orc.mask, gt))
    assert orc.dice > 0.75
    lm = single[1].to_labelmap(vol, label=2, name="blob")
    assert lm.same_grid(vol) and lm.labels == {2: "blob"}
    assert set(np.unique(lm.array)) == {0, 2}
    assert np.array_equal(lm.array == 2, single[1].mask)


def test_prompt_errors(predictor):
    with pytest.raises(PromptError, match="out of range"):
        propagate(predictor, [KeyPrompt(12, box_rc=(10, 10, 20, 20))])
    with pytest.raises(PromptError, match="outside"):
        propagate(predictor, [KeyPrompt(5, box_rc=(10, 10, 120, 20))])
    with pytest.raises(PromptError, match="no key-slice prompt"):
        propagate(predictor, [])
    with pytest.raises(PromptError, match="no prompt"):
        propagate(predictor, [KeyPrompt(5)])
    with pytest.raises(PromptError, match="two boxes"):
        propagate(predictor, [KeyPrompt(5, box_rc=(1, 1, 9, 9)), KeyPrompt(5, box_rc=(2, 2, 9, 9))])
