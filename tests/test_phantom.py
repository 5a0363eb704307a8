"""The synthetic CT phantom: determinism, anatomy, intensities and label geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import InputError
from medseg.phantom import NOISE_SIGMA_HU, PHANTOM_LABELS, make_phantom
from medseg.volume import LabelMap, Volume

LIVER, TUMOUR, KIDNEY, SPLEEN = 1, 2, 3, 4


@pytest.fixture(scope="module")
def p0() -> tuple[Volume, LabelMap]:
    return make_phantom(0)


@pytest.fixture(scope="module")
def p1() -> tuple[Volume, LabelMap]:
    return make_phantom(1)


def _ml(lab: LabelMap, value: int) -> float:
    return float((lab.array == value).sum() * np.prod(lab.spacing) / 1000.0)


def test_types_geometry_and_meta(p0):
    img, lab = p0
    assert img.array.dtype == np.int16
    assert img.shape == (48, 160, 160) == lab.shape
    assert img.spacing == (3.0, 1.2, 1.2)  # anisotropic: thick slices
    assert img.spacing[0] / img.spacing[1] == pytest.approx(2.5)
    np.testing.assert_array_equal(img.direction, np.eye(3))
    assert img.meta["modality"] == "CT"
    assert img.same_grid(lab)
    assert lab.labels == PHANTOM_LABELS == {1: "liver", 2: "tumour", 3: "kidney", 4: "spleen"}
    assert lab.present() == [1, 2, 3, 4]
    # origin at the grid centre in x and y
    centre = img.index_to_world(
        [(img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2, (img.shape[2] - 1) / 2]
    )
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)


def test_deterministic_per_seed(p0):
    img, lab = make_phantom(0)
    np.testing.assert_array_equal(img.array, p0[0].array)
    np.testing.assert_array_equal(lab.array, p0[1].array)
    assert img.meta["tumours"] == p0[0].meta["tumours"]


def test_seeds_differ(p0, p1):
    a, b = p0[1].array == LIVER, p1[1].array == LIVER
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    assert dice < 0.97  # different organ shapes...
    assert dice > 0.5  # ...of the same anatomy
    assert not np.array_equal(p0[0].array, p1[0].array)
    assert p0[0].meta["tumours"] != p1[0].meta["tumours"]


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_tumours_inside_liver(seed, p0, p1):
    img, lab = {0: p0, 1: p1}.get(seed) or make_phantom(seed)
    tum = lab.array == TUMOUR
    comps, n = ndimage.label(tum)
    assert 1 <= n <= 3
    assert n == len(img.meta["tumours"])
    # every tumour is wrapped in liver: its outer 6-neighbour shell is (almost) all liver
    for c in range(1, n + 1):
        m = comps == c
        shell = ndimage.binary_dilation(m) & ~m
        assert np.mean(lab.array[shell] == LIVER) > 0.97
    # each tumour's centre (from the generator's truth) is a tumour voxel
    for t in img.meta["tumours"]:
        k, j, i = np.rint(img.world_to_index(t["center_lps"])).astype(int)
        assert lab.array[k, j, i] == TUMOUR
    # at least one tumour is >= 15 mm across, measured on the label map (x extent in mm)
    widths = [
        np.ptp(np.nonzero(comps == c)[2]) * img.spacing[2] + img.spacing[2] for c in range(1, n + 1)
    ]
    assert max(widths) >= 15.0


def test_tumour_count_and_sizes_follow_arguments():
    img, lab = make_phantom(7, shape=(32, 112, 112), spacing=(4.0, 1.6, 1.6), n_tumours=(2, 2))
    assert img.spacing == (4.0, 1.6, 1.6)
    assert len(img.meta["tumours"]) == 2
    _, n = ndimage.label(lab.array == TUMOUR)
    assert n == 2
    for t in img.meta["tumours"]:
        d = 2 * max(t["semi_axes_mm"])
        assert 6.0 <= d <= 30.0
    img0, lab0 = make_phantom(3, n_tumours=(0, 0))
    assert TUMOUR not in lab0.present() and img0.meta["tumours"] == []


def test_hu_per_label(p0):
    img, lab = p0
    a, L = img.array.astype(float), lab.array
    assert np.mean(a[L == LIVER]) == pytest.approx(60, abs=10)
    tumour_mean = np.mean(a[L == TUMOUR])
    assert 5 <= tumour_mean <= 40  # hypodense (10-30 HU plus partial volume with liver)
    assert np.mean(a[L == LIVER]) - tumour_mean > 20
    assert 120 <= np.mean(a[L == KIDNEY]) <= 185
    assert np.mean(a[L == SPLEEN]) == pytest.approx(50, abs=10)
    # air in the corners: -1000 HU with Gaussian noise of the stated sigma
    corner = a[:, :8, :8]
    assert corner.mean() == pytest.approx(-1000, abs=3)
    assert corner.std() == pytest.approx(NOISE_SIGMA_HU, rel=0.15)
    # bone (vertebrae) and fat exist in the body
    assert np.percentile(a, 99.9) > 500
    body = a > -500
    assert np.mean((a[body] > -160) & (a[body] < -40)) > 0.05  # subcutaneous / visceral fat


def test_anatomy_sides_and_lung_bases(p0):
    img, lab = p0
    L = lab.array
    x_of = {v: img.index_to_world(np.argwhere(lab.array == v).mean(axis=0))[0] for v in (1, 3, 4)}
    assert x_of[LIVER] < 0 < x_of[SPLEEN]  # LPS: patient's right is -x
    kid, n = ndimage.label(L == KIDNEY)
    assert n == 2
    xs = sorted(img.index_to_world(np.argwhere(kid == c).mean(axis=0))[0] for c in (1, 2))
    assert xs[0] < 0 < xs[1]
    # kidneys are posterior to the liver's centre (+y is posterior in LPS)
    y_kid = img.index_to_world(np.argwhere(L == KIDNEY).mean(axis=0))[1]
    y_liv = img.index_to_world(np.argwhere(L == LIVER).mean(axis=0))[1]
    assert y_kid > y_liv
    # lung bases (about -850 HU) in the top (superior, high z) slices only, inside the body
    a = img.array
    inside = np.stack([ndimage.binary_fill_holes(s > -500) for s in a])  # body incl. lungs
    lung = (a < -700) & inside
    assert lung[-3:].sum() > 200
    assert lung[:10].sum() == 0
    core = ndimage.binary_erosion(lung, structure=np.ones((1, 5, 5), bool))
    assert a[core].mean() == pytest.approx(-850, abs=40)


def test_partial_volume_across_thick_slices():
    """Each slice averages its thickness: organ surfaces crossing a slice get intermediate HU.

    Noise-free; spleen voxels far from the spleen's in-plane border hold exactly 50 HU when
    their z-neighbours are spleen too, and often not when the slice above or below is not.
    """
    img, lab = make_phantom(2, noise_sigma=0.0)
    a, spl = img.array.astype(float), lab.array == SPLEEN
    inplane_core = ndimage.binary_erosion(spl, structure=np.ones((1, 3, 3), bool))
    z_inner = np.zeros_like(spl)
    z_inner[1:-1] = spl[:-2] & spl[2:]
    core = inplane_core & z_inner
    surface = inplane_core & ~z_inner
    assert core.sum() > 100 and surface.sum() > 100
    assert np.mean(np.abs(a[core] - 50) > 1) < 0.005
    # a third of a slab crossing the surface moves a voxel by >= 5 HU (soft tissue 35 HU, fat
    # -90 HU); only a fraction of surface voxels have the surface inside their slab
    assert np.mean(np.abs(a[surface] - 50) > 3) > 0.03


def test_label_volumes_plausible(p0, p1):
    for _, lab in (p0, p1):
        assert 150 < _ml(lab, LIVER) < 900
        assert 0.2 < _ml(lab, TUMOUR) < 40
        assert 15 < _ml(lab, KIDNEY) < 200
        assert 10 < _ml(lab, SPLEEN) < 200
        assert _ml(lab, LIVER) > _ml(lab, SPLEEN)


def test_bad_arguments():
    with pytest.raises(InputError, match="shape"):
        make_phantom(0, shape=(4, 160, 160))
    with pytest.raises(InputError, match="spacing"):
        make_phantom(0, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(InputError, match="n_tumours"):
        make_phantom(0, n_tumours=(3, 1))
