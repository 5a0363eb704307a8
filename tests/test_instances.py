"""medseg.instances: components, lesion measurements, panoptic encoding, CSV output."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from medseg.errors import InputError, OutputError
from medseg.instances import (
    label_lesions,
    lesion_table,
    panoptic_to_semantic,
    semantic_to_panoptic,
    write_lesion_table,
)
from medseg.volume import LabelMap, Volume

SPACING = (3.0, 0.8, 0.5)
ORIGIN = (-10.0, 20.0, 30.0)


def _grid(shape=(10, 20, 30), direction=None) -> Volume:
    return Volume(
        array=np.zeros(shape, np.int16),
        spacing=SPACING,
        origin=ORIGIN,
        direction=np.eye(3) if direction is None else direction,
    )


def test_label_lesions_connectivity_and_order():
    m = np.zeros((6, 10, 10), bool)
    m[0, 0, 0] = True
    m[1, 1, 1] = True  # corner-touching: one 26-connected lesion of 2 voxels
    m[3:5, 5:8, 5:8] = True  # 18 voxels
    m[5, 0, 9] = True  # single voxel
    lab = label_lesions(m)
    assert lab.dtype == np.int32 and lab.max() == 3
    assert np.count_nonzero(lab == 1) == 18  # largest first
    assert lab[0, 0, 0] == lab[1, 1, 1] == 2
    assert lab[5, 0, 9] == 3
    # equal sizes: ordered by first voxel in C order
    e = np.zeros((4, 4, 4), bool)
    e[3, 0, 0] = e[0, 3, 3] = True
    lab = label_lesions(e)
    assert lab[0, 3, 3] == 1 and lab[3, 0, 0] == 2
    # min volume (voxel 2 * 1 * 1 = 2 mm3): drops the 1- and 2-voxel lesions below 4.5 mm3
    lab = label_lesions(m, (2.0, 1.0, 1.0), min_volume_mm3=4.5)
    assert lab.max() == 1 and np.count_nonzero(lab) == 18


def test_lesion_table_boxes_and_line():
    vol = _grid()
    inst = np.zeros(vol.shape, np.int32)
    inst[2:4, 5:10, 10:14] = 1  # box 2 x 5 x 4 voxels
    inst[7, 15, 3:13] = 2  # a line of 10 voxels along x
    rows = lesion_table(inst, vol)
    assert [r["id"] for r in rows] == [1, 2]
    box, line = rows
    assert box["voxels"] == 40
    assert box["volume_mm3"] == pytest.approx(40 * 3.0 * 0.8 * 0.5)
    assert box["centroid_zyx"] == pytest.approx((2.5, 7.0, 11.5))
    # identity direction: LPS x = origin_x + x * 0.5, y = origin_y + y * 0.8, z = origin_z + z * 3
    assert box["centroid_lps"] == pytest.approx((-10 + 11.5 * 0.5, 20 + 7 * 0.8, 30 + 2.5 * 3))
    # farthest surface voxel centres: opposite corners, (1, 4, 3) voxel steps apart
    assert box["max_diameter_mm"] == pytest.approx(math.sqrt(3.0**2 + (4 * 0.8) ** 2 + 1.5**2))
    assert line["voxels"] == 10 and line["max_diameter_mm"] == pytest.approx(9 * 0.5)
    single = np.zeros(vol.shape, np.int32)
    single[0, 0, 0] = 4  # ids may have gaps; missing ids produce no row
    (r,) = lesion_table(single, vol)
    assert r["id"] == 4 and r["max_diameter_mm"] == 0.0
    assert r["centroid_lps"] == pytest.approx(ORIGIN)


def test_lesion_table_large_sphere_and_direction():
    """Convex-hull diameter on a big object equals brute force; direction is applied."""
    flip = np.diag([1.0, -1.0, 1.0])  # y axis flipped, like brain1
    vol = _grid((12, 40, 60), direction=flip)
    zz, yy, xx = np.meshgrid(
        np.arange(12) * 3.0, np.arange(40) * 0.8, np.arange(60) * 0.5, indexing="ij"
    )
    ball = ((zz - 16) / 13) ** 2 + ((yy - 16) / 12) ** 2 + ((xx - 15) / 11) ** 2 <= 1
    (r,) = lesion_table(ball.astype(np.int32), vol)
    pts = np.argwhere(ball).astype(float) * np.array(SPACING)  # all ~6000 voxels, brute force
    d = max(
        np.sqrt(((pts[i : i + 256, None] - pts[None]) ** 2).sum(-1)).max()
        for i in range(0, len(pts), 256)
    )
    assert r["max_diameter_mm"] == pytest.approx(d)
    cz, cy, cx = np.argwhere(ball).mean(axis=0)
    assert r["centroid_lps"] == pytest.approx((-10 + cx * 0.5, 20 - cy * 0.8, 30 + cz * 3.0))
    with pytest.raises(InputError, match="does not match"):
        lesion_table(np.zeros((2, 2, 2)), vol)


def test_semantic_to_panoptic_roundtrip():
    arr = np.zeros((5, 12, 12), np.uint8)
    arr[:, :6, :6] = 1  # organ (stuff)
    arr[1:3, 8:11, 8:11] = 2  # tumour, 18 voxels
    arr[4, 0:2, 10:12] = 2  # tumour, 4 voxels
    table = {1: "liver", 2: "tumor"}
    sem = LabelMap(
        array=arr,
        spacing=SPACING,
        origin=ORIGIN,
        labels=table,
        meta={"labels": table, "source": "x.nrrd"},
    )  # as read_labels fills meta
    pan, table = semantic_to_panoptic(sem, thing_labels=[2])
    assert pan.same_grid(sem) and pan.meta["source"] == "x.nrrd"
    assert sorted(np.unique(pan.array).tolist()) == [0, 1, 2001, 2002]
    assert np.count_nonzero(pan.array == 2001) == 18 and pan.array[4, 0, 10] == 2002
    assert pan.labels == {1: "liver", 2001: "tumor_1", 2002: "tumor_2"}
    assert [(r["id"], r["kind"], r["class"], r["instance"], r["voxels"]) for r in table] == [
        (1, "stuff", 1, 0, 180),
        (2001, "thing", 2, 1, 18),
        (2002, "thing", 2, 2, 4),
    ]
    s, i = panoptic_to_semantic(pan.array)
    assert np.array_equal(s, arr) and i[4, 0, 10] == 2 and i[0, 0, 0] == 0
    # min volume drops the small tumour (4 voxels * 1.2 mm3)
    pan2, table2 = semantic_to_panoptic(sem, [2], min_volume_mm3=10.0)
    assert 2002 not in pan2.array and len(table2) == 2
    big = LabelMap(array=np.full((2, 2, 2), 1000, np.uint16))
    with pytest.raises(InputError, match="collide"):
        semantic_to_panoptic(big, thing_labels=[])


def test_write_lesion_table(tmp_path):
    vol = _grid()
    inst = np.zeros(vol.shape, np.int32)
    inst[2:4, 5:10, 10:14] = 1
    rows = lesion_table(inst, vol)
    out = write_lesion_table(rows, tmp_path / "lesions.csv")
    with open(out) as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == 1
    assert float(back[0]["volume_mm3"]) == pytest.approx(48.0)
    assert float(back[0]["centroid_x_mm"]) == pytest.approx(-10 + 11.5 * 0.5)
    assert float(back[0]["centroid_z_vox"]) == pytest.approx(2.5)
    assert [p.name for p in tmp_path.iterdir()] == ["lesions.csv"]  # no temp files left
    with pytest.raises(OutputError, match="exists"):
        write_lesion_table(rows, out)
    write_lesion_table([], out, overwrite=True)
    assert out.read_text().startswith("id,voxels,volume_mm3")
