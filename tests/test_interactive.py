"""medseg.InteractiveSession: a box, then corrective clicks acting locally, with the real
LiteMedSAM weights on a small seeded phantom (an ellipsoid, true extent slices 2..9, in a textured
body; 12 x 96 x 96, so a dozen slices are embedded once per module) and on the real breast1 case.
"""

from __future__ import annotations

import numpy as np
import pytest

import medseg
from medseg.errors import InputError, PromptError
from medseg.predict.propagate import dice3d as dice
from medseg.prompts import key_prompts
from medseg.volume import Volume

KEY = 5
BOX = (27, 28, 65, 72)  # (y0, x0, y1, x1) around the object on slice 5, margin ~2 px
FP = np.zeros((96, 96), bool)
FP[70:80, 20:30] = True  # a false positive inside the body, away from the object


def phantom(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """``(volume, object mask)``: a bright ellipsoid (z 2..9) in a textured body."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nz, ny, nx = 12, 96, 96
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    obj = ((z - 5.5) / 3.9) ** 2 + ((y - 46) / 17) ** 2 + ((x - 50) / 20) ** 2 <= 1
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (nz, ny, nx)), (1.0, 6, 6))
    img = 200 + 40 * tex / tex.std()
    body = ((y - 48) / 44) ** 2 + ((x - 48) / 44) ** 2 <= 1
    img[~body] = 0
    img[obj] = 600
    img += rng.normal(0, 15, img.shape)
    vol = Volume(img.astype(np.float32), spacing=(2.5, 1.0, 1.0), meta={"modality": "MR"})
    return vol, obj


@pytest.fixture(scope="module")
def blob() -> tuple[Volume, np.ndarray]:
    return phantom()


@pytest.fixture(scope="module")
def seeded(blob):
    """A session seeded with the key box (no z range); its predictor holds the embeddings."""
    s = medseg.InteractiveSession(blob[0], cache_dir=False)
    s.add(medseg.Box(KEY, *BOX))
    return s


def fresh(seeded, blob, box: medseg.Box | None = None) -> medseg.InteractiveSession:
    """A new session on the same image reusing the seeded session's embeddings."""
    s = medseg.InteractiveSession(blob[0], cache_dir=False, predictor=seeded.predictor)
    s.add(box or medseg.Box(KEY, *BOX))
    return s


# --------------------------------------------------------------------------- prompts
def test_box_z_range_is_checked_and_recorded():
    b = medseg.Box(5, 1, 2, 10, 12, z_min=3, z_max=8)
    assert b.bounds == (3, 8)
    assert b.to_json()["z_range"] == [3, 8]
    assert "z_range" not in medseg.Box(5, 1, 2, 10, 12).to_json()
    (kp,) = key_prompts([b], (12, 20, 20))
    assert kp.bounds == (3, 8) and kp.to_json()["bounds"] == [3, 8]
    with pytest.raises(PromptError, match="z_min <= z <= z_max"):
        medseg.Box(5, 1, 2, 10, 12, z_min=6)
    with pytest.raises(PromptError, match="not an integer"):
        medseg.Box(5, 1, 2, 10, 12, z_min=2.5)
    with pytest.raises(PromptError, match="outside the image"):
        key_prompts([medseg.Box(5, 1, 2, 10, 12, z_max=12)], (12, 20, 20))
    # the prompts file round-trips it
    from medseg.prompts import prompts_from_json

    (back,) = prompts_from_json({"boxes": [{"slice": 5, "box": [1, 2, 10, 12], "z_range": [3, 8]}]})
    assert back == b


def test_start_from_a_mask(seeded, blob):
    vol, obj = blob
    s = medseg.InteractiveSession(vol, cache_dir=False, predictor=seeded.predictor)
    with pytest.raises(InputError, match="empty"):
        s.start_from(np.zeros(vol.shape, bool))
    lm = s.start_from(obj, {3: 0.2, 8: 0.7, 9: 0.1})
    assert np.array_equal(lm.array > 0, obj) and s.review == [8, 3, 9]
    assert s.report["provenance"]["prompts"][0]["kind"] == "mask"
    assert s.report["provenance"]["prompts"][0]["slice"] == 5  # the largest slice (ties: lowest)
    medseg.validate_report(s.report)
    with pytest.raises(InputError, match="already has prompts"):
        s.start_from(obj)
    assert not s.undo().array.any()


# --------------------------------------------------------------------------- seeding
def test_seed_is_segment_and_z_range_bounds_it(seeded, blob):
    vol, obj = blob
    plain = medseg.segment(
        vol, prompts=medseg.Box(KEY, *BOX), predictor=seeded.predictor, config=seeded.config
    )
    assert np.array_equal(seeded.labels.array, plain.labels.array)  # one engine
    assert seeded.config.alternatives == ("box+points", "box+mask")
    assert dice(seeded.labels.array > 0, obj) > 0.8

    box = medseg.Box(KEY, *BOX, z_min=4, z_max=7)
    seg = medseg.segment(vol, prompts=box, predictor=seeded.predictor, config=seeded.config)
    zs = np.flatnonzero(seg.labels.array.any(axis=(1, 2)))
    assert zs.min() >= 4 and zs.max() <= 7
    assert set(zs) == {4, 5, 6, 7}  # the object is on all of them: only "vanished" stops inside
    s = fresh(seeded, blob, box)
    assert np.array_equal(s.labels.array, seg.labels.array)
    assert s.report["interactive"]["z_range"] == [4, 7]
    # a click outside the range re-segments its slice but propagation stays in the range
    s.add(medseg.Point(9, 46, 50))
    assert s.mask[9].any()
    assert np.array_equal(s.mask[[0, 1, 2, 3, 10, 11]], np.zeros((6, 96, 96), bool))
    with pytest.raises(PromptError, match="first box only"):
        s.add(medseg.Box(6, *BOX, z_min=5, z_max=7))


# --------------------------------------------------------------------------- corrections
def test_undo_restores_exactly(seeded, blob):
    s = fresh(seeded, blob)
    seed_arr = s.labels.array.copy()
    s.add(medseg.MaskPrompt(blob[1][6] | FP, z=6))
    after_mask = s.labels.array.copy()
    assert not np.array_equal(after_mask, seed_arr)
    s.add(medseg.Point(6, 75, 25, positive=False))
    assert not np.array_equal(s.labels.array, after_mask)
    assert len(s.steps) == 3
    assert np.array_equal(s.undo().array, after_mask)
    assert np.array_equal(s.undo().array, seed_arr)
    assert len(s.steps) == 1 and len(s.prompts) == 1
    assert not s.undo().array.any()  # before the box: nothing
    with pytest.raises(InputError, match="nothing to undo"):
        s.undo()


def test_negative_click_removes_false_positive_on_its_slice(seeded, blob):
    _, obj = blob
    s = fresh(seeded, blob)
    z, fp = 6, FP
    s.add(medseg.MaskPrompt(obj[z] | fp, z=z))
    assert s.mask[z][fp].all()
    s.add(medseg.Point(z, 75, 25, positive=False))
    m = s.mask[z]
    assert not m[fp].any()  # the false positive is gone
    assert dice(m, obj[z]) > 0.85  # the object stays
    assert s.steps[-1].slice == z


def test_click_acts_locally(seeded, blob):
    _, obj = blob
    s = fresh(seeded, blob)
    s.add(medseg.MaskPrompt(obj[8] | FP, z=8))
    before = s.mask
    s.add(medseg.Point(8, 75, 25, positive=False))
    after = s.mask
    step = s.steps[-1]
    differ = [int(i) for i in np.flatnonzero((before != after).any(axis=(1, 2)))]
    assert 8 in differ and set(differ) <= set(step.changed)  # what changed is reported
    # the key slice is the user's: the walk towards it stops there, so slices 0..5 keep their mask
    assert np.array_equal(before[: KEY + 1], after[: KEY + 1])
    assert not after[8][FP].any() and dice(after[8], obj[8]) > 0.85
    # a background click deep inside the slice's mask never empties the slice: it takes the
    # disk reaching the mask's nearest edge (the cross-section's semi-axes are about 13 and 15
    # px: most of it); slices up to the key keep their masks
    s.add(medseg.Point(8, 46, 50, positive=False))
    final = s.mask
    assert not final[8, 46, 50] and final[8].any() and not (final[8] & ~after[8]).any()
    assert final[8].sum() < 0.5 * after[8].sum()
    assert np.array_equal(final[: KEY + 1], after[: KEY + 1])


def test_positive_click_extends_an_empty_slice(seeded, blob):
    _, obj = blob
    s = fresh(seeded, blob, medseg.Box(KEY, *BOX, z_min=5, z_max=7))
    assert not s.mask[3].any()
    s.add(medseg.Point(3, 46, 50))
    assert s.mask[3, 46, 50]
    assert dice(s.mask[3], obj[3]) > 0.5  # from a box carried off the larger slice 5
    # a foreground click outside the z range widens it: slice 4, between, is filled too
    assert s.report["interactive"]["z_range"] == [3, 7]
    assert 4 in s.steps[-1].changed and dice(s.mask[4], obj[4]) > 0.3  # carried from slice 3


def test_report_validates_with_every_prompt_and_step(seeded, blob):
    s = fresh(seeded, blob)
    with pytest.raises(PromptError, match="outside the image"):
        s.add(medseg.Point(12, 4, 4))
    s.add(medseg.Point(8, 46, 50, positive=False))
    s.add(medseg.Point(7, 46, 50))
    rep = s.report
    medseg.validate_report(rep)
    kinds = [(p["kind"], p.get("label")) for p in rep["provenance"]["prompts"]]
    assert kinds == [("box", None), ("point", 0), ("point", 1)]
    steps = rep["interactive"]["steps"]
    assert [st["slice"] for st in steps] == [KEY, 8, 7]
    assert all(st["seconds"] >= 0 for st in steps)
    assert rep["labels"][0]["voxels"] == int(np.count_nonzero(s.mask)) == steps[-1]["voxels"]
    assert set(s.review).isdisjoint({KEY, 7, 8})  # prompted slices are not to review
    assert set(s.review) <= set(np.flatnonzero(s.mask.any(axis=(1, 2))))


def test_session_refuses_unet_and_reports_before_prompt(blob):
    with pytest.raises(InputError, match="promptable"):
        medseg.InteractiveSession(blob[0], model="unet-demo")
    s = medseg.InteractiveSession(blob[0], cache_dir=False)
    with pytest.raises(InputError, match="no prompt yet"):
        _ = s.report


# --------------------------------------------------------------------------- slice rules (pure)
def test_local_edit_rules_by_hand():
    from medseg.interactive import _box_holding, _local_edit

    cur = np.zeros((20, 20), bool)
    cur[5:15, 5:15] = True  # 100 px, depth 5 at the centre
    empty = np.zeros_like(cur)
    # background click near the edge whose piece is the whole mask: a bite of radius 1 (the
    # distance to the edge row 4), 4 px: the click, its two row neighbours and the one below
    out = _local_edit(cur, empty, (5.0, 9.0), False)
    assert out.sum() == 96 and not out[5, 8:11].any() and not out[6, 9] and out[7, 9]
    # deep inside (depth 5): never the whole slice, the disk of radius 5 (81 lattice points;
    # (4, 9) and (9, 4) lie outside the mask): 100 - 79 = 21 px stay
    out = _local_edit(cur, empty, (9.0, 9.0), False)
    assert out.sum() == 21 and out[5, 5] and not out[9, 9] and not out[14, 9]
    # a small piece under the click goes, the rest stays
    new = cur.copy()
    new[5:8, 5:15] = False  # the model drops rows 5..7 (30 px < half)
    out = _local_edit(cur, new, (6.0, 9.0), False)
    assert np.array_equal(out, new)
    # a foreground click adds only the piece of new & ~cur under it
    grown = cur.copy()
    grown[15:18, 5:15] = True  # a piece below (under the click)
    grown[0:2, 0:2] = True  # and an unrelated one
    out = _local_edit(cur, grown, (16.0, 9.0), True)
    assert out.sum() == 130 and not out[0:2, 0:2].any()
    # a foreground click the model's change does not reach: a bite reaching the mask, radius
    # |(1, 18) - (5, 14)| = sqrt(32)
    out = _local_edit(cur, grown, (1.0, 18.0), True)
    assert out[1, 18] and out[0, 19] and out[5, 15] and not out[1, 12] and (out >= cur).all()
    assert not out[0:2, 0:2].any()  # the model's unrelated piece is not taken
    # a background click outside the mask (already as it says) changes nothing
    assert np.array_equal(_local_edit(cur, empty, (1.0, 1.0), False), cur)
    # the box grows to hold a foreground click, with the carry margin on the moved side only
    assert _box_holding((5, 5, 14, 14), [(18.0, 9.0)], (20, 20), 0.1, 2.0) == (5, 5, 19.0, 14)
    assert _box_holding((5, 5, 14, 14), [(9.0, 9.0)], (20, 20), 0.1, 2.0) == (5, 5, 14, 14)


def test_candidate_choice_by_hand():
    from medseg.interactive import _agreeing, _closest_honouring

    cur = np.zeros((10, 10), bool)
    cur[2:6, 2:6] = True  # 16 px
    far = np.zeros_like(cur)
    far[2:9, 2:9] = True  # honours both clicks, Dice with cur 2*16/(16+49) = 0.49
    near = cur.copy()
    near[6, 2:6] = True  # honours both, Dice 2*16/(16+20) = 0.89
    wrong = cur.copy()  # misses the foreground click at (6, 3)
    masks = np.stack([wrong, far, near])
    pts, labs = [(6.0, 3.0), (0.0, 0.0)], [1, 0]
    assert _agreeing(masks, pts, labs).tolist() == [1, 2, 2]
    # the most clicks first, then the closest to the current mask, though its IoU is lowest
    assert _closest_honouring(masks, np.array([0.9, 0.8, 0.1]), cur, pts, labs) == 2
    # an empty current mask: the predicted IoU decides between the honouring ones
    empty = np.zeros_like(cur)
    assert _closest_honouring(masks, np.array([0.9, 0.8, 0.1]), empty, pts, labs) == 1


def test_carried_change_stays_local_by_hand():
    from medseg.predict.propagate import _local_change

    cur = np.zeros((12, 12), bool)
    cur[2:8, 2:8] = True  # 36 px
    new = cur.copy()
    new[8:10, 2:5] = True  # a piece below (6 px) ...
    new[2:4, 9:11] = True  # ... and one beside (4 px)
    below = np.zeros_like(cur)
    below[9, 3] = True  # what the click changed on the slice before lies under the lower piece
    out = _local_change(cur, new, below, "grow")
    assert out is not None and out.sum() == 42 and out[9, 3] and not out[2, 9]
    assert _local_change(cur, new, np.zeros_like(cur), "grow") is None  # nothing overlaps
    # shrink: only the piece of cur - new under the region goes; at most half of cur
    trimmed = cur.copy()
    trimmed[2:4, 2:8] = False  # the model drops rows 2..3 (12 px)
    top = np.zeros_like(cur)
    top[2, 4] = True
    out = _local_change(cur, trimmed, top, "shrink")
    assert out is not None and out.sum() == 24 and not out[2:4].any()
    gone = np.zeros_like(cur)
    gone[7, 7] = True  # the model keeps only 1 px: more than half would go
    assert _local_change(cur, gone, top, "shrink") is None
