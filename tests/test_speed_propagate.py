"""Fewer decoder calls per slice (``PropagationConfig.alternatives_below``): the alternatives are
tried only when the carry's mask looks unlike the key object, and the extreme thresholds give
exactly the two configurations they stand between (real LiteMedSAM weights, the small synthetic
volume of ``test_propagate``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medseg.predict.propagate import DEFAULT_CONFIG, box_from_gt, dice3d, propagate
from test_propagate import blob_volume

ALWAYS = replace(DEFAULT_CONFIG, alternatives_below=None)


@pytest.fixture(scope="module")
def setup():
    from medseg.models.sam import get_sam_model
    from medseg.predict.sam import VolumePredictor

    vol, obj = blob_volume()
    pred = VolumePredictor(vol, get_sam_model("litemedsam", precision="auto"))
    return pred, obj, box_from_gt(obj, "z", 3)


def _run(pred, key, cfg):
    d0 = pred.decoder_calls
    res = propagate(pred, [key], cfg)
    return res, pred.decoder_calls - d0


@pytest.fixture(scope="module")
def always(setup):
    """The alternative tried on every slice (as before ``alternatives_below``) and its calls."""
    pred, _, key = setup
    return _run(pred, key, ALWAYS)


def test_alternatives_below_extremes_equal_always_and_never(setup, always) -> None:
    pred, obj, key = setup
    always, n_always = always
    never, n_never = _run(pred, key, replace(ALWAYS, alternatives=()))
    above_all, n_above = _run(pred, key, replace(ALWAYS, alternatives_below=2.0))
    below_all, n_below = _run(pred, key, replace(ALWAYS, alternatives_below=-2.0))
    steps = len(always.records) - 1  # every slice but the key slice is one step
    assert steps >= 6 and DEFAULT_CONFIG.alternatives == ("box+points",)
    assert n_always == 1 + 2 * steps  # key slice: one call; each step: carry + alternative
    assert n_above == n_always and np.array_equal(above_all.mask, always.mask)
    assert n_never == 1 + (len(never.records) - 1)
    assert n_below == n_never and np.array_equal(below_all.mask, never.mask)
    assert dice3d(always.mask, obj) > 0.8


def test_alternatives_below_skips_only_confident_slices(setup, always) -> None:
    pred, obj, key = setup
    ref, n_ref = always
    sims = [r.similarity for r in ref.records if r.distance > 0]
    thr = float(np.median(sims))  # about half of the slices are confident at this threshold
    lazy, n_lazy = _run(pred, key, replace(ALWAYS, alternatives_below=thr))
    assert n_lazy < n_ref
    # a slice skips its alternative only when the carry's own mask reached the threshold, and
    # the kept mask is then the carry's: so only slices whose kept mask has similarity >= thr
    # can have skipped
    steps = [r for r in lazy.records if r.distance > 0]
    skipped = (1 + 2 * len(steps)) - n_lazy
    assert 0 < skipped <= sum(r.similarity >= thr for r in steps)
    assert abs(dice3d(lazy.mask, obj) - dice3d(ref.mask, obj)) < 0.05
    assert DEFAULT_CONFIG.alternatives_below == 0.9  # chosen by bench_speed_decoder.py
