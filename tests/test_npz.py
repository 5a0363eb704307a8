"""The challenge's .npz layout: round trip, spacing order, dispatch, boxes and malformed files."""

from __future__ import annotations

import numpy as np
import pytest

import medseg
from medseg.errors import InputError
from medseg.io.npz import read_npz, write_npz
from medseg.protocol import ChallengeBox, challenge_box


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(6, 10, 14), dtype=np.uint8)
    gts = np.zeros((6, 10, 14), np.uint8)
    gts[1:4, 2:6, 3:9] = 1
    gts[4, 7:9, 10:13] = 3
    return imgs, gts


def test_spacing_is_stored_xyz_like_simpleitk(tmp_path):
    imgs, gts = _case()
    p = tmp_path / "CT_case.npz"
    # written as the challenge's preprocessing does: spacing = sitk_image.GetSpacing() (x, y, z)
    np.savez_compressed(p, imgs=imgs, gts=gts, spacing=np.array([0.7, 0.8, 2.5]))
    s = read_npz(p)
    assert s.image.spacing == (2.5, 0.8, 0.7)
    assert np.array_equal(s.image.array, imgs) and np.array_equal(s.gt.array, gts)
    assert s.image.origin == (0.0, 0.0, 0.0) and np.array_equal(s.image.direction, np.eye(3))
    assert s.gt.same_grid(s.image) and s.boxes == {}
    assert read_npz(p, spacing_order="zyx").image.spacing == (0.7, 0.8, 2.5)
    # the dispatch: read_volume gives 'imgs', read_labels gives 'gts'
    img = medseg.read_volume(p)
    lab = medseg.read_labels(p, reference=img)
    assert np.array_equal(img.array, imgs) and img.spacing == (2.5, 0.8, 0.7)
    assert np.array_equal(lab.array, gts) and lab.present() == [1, 3]


def test_round_trip_with_boxes(tmp_path):
    imgs, gts = _case(1)
    img = medseg.Volume(imgs, spacing=(3.0, 0.5, 0.6))
    gt = medseg.LabelMap(gts, spacing=(3.0, 0.5, 0.6))
    boxes = [challenge_box(gts == v).to_json() for v in (1, 3)]
    out = write_npz(tmp_path / "c.npz", img, gt, boxes=boxes)
    with np.load(out, allow_pickle=True) as raw:
        assert raw["spacing"].tolist() == [0.6, 0.5, 3.0]
    s = read_npz(out, allow_pickle=True)
    assert s.image.spacing == (3.0, 0.5, 0.6)
    assert np.array_equal(s.image.array, imgs) and s.image.array.dtype == np.uint8
    assert np.array_equal(s.gt.array, gts)
    assert s.boxes == {1: ChallengeBox(2, 2, 3, 5, 8, 1, 3), 3: ChallengeBox(4, 7, 10, 8, 12, 4, 4)}
    # without allow_pickle the stored boxes are skipped, with a warning
    s = read_npz(out)
    assert s.boxes == {} and "allow_pickle" in s.image.meta["warnings"][0]
    with pytest.raises(medseg.MedsegError, match="exists"):
        write_npz(out, img, gt)


def test_malformed_files(tmp_path):
    imgs, gts = _case()
    p = tmp_path / "a.npz"
    np.savez(p, gts=gts, spacing=[1, 1, 1])
    with pytest.raises(InputError, match="missing key 'imgs'"):
        read_npz(p)
    np.savez(p, imgs=imgs, gts=gts)
    with pytest.raises(InputError, match="missing key 'spacing'"):
        read_npz(p)
    np.savez(p, imgs=imgs, gts=gts[:, :, :-1], spacing=[1, 1, 1])
    with pytest.raises(InputError, match=r"'gts' has shape \(6, 10, 13\) but 'imgs' \(6, 10, 14\)"):
        read_npz(p)
    np.savez(p, imgs=imgs[0], spacing=[1, 1, 1])
    with pytest.raises(InputError, match="must be 3D"):
        read_npz(p)
    np.savez(p, imgs=imgs, spacing=[1, 0, 1])
    with pytest.raises(InputError, match="three positive numbers"):
        read_npz(p)
    np.savez(p, imgs=imgs, gts=gts.astype(float) + 0.5, spacing=[1, 1, 1])
    with pytest.raises(InputError, match=r"'gts'.*whole numbers"):
        read_npz(p)
    np.savez(p, imgs=imgs, gts=gts, spacing=[1, 1, 1], boxes=np.array([{"z_min": 1}], object))
    with pytest.raises(InputError, match="'boxes' has 1 entries but the labels are"):
        read_npz(p, allow_pickle=True)
    np.savez(p, imgs=imgs, spacing=[1, 1, 1])
    assert read_npz(p).gt is None
    with pytest.raises(InputError, match="no 'gts'"):
        medseg.read_labels(p)
    bad = tmp_path / "b.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match=r"not a readable \.npz"):
        medseg.read_volume(bad)
    with pytest.raises(InputError, match="no such file"):
        read_npz(tmp_path / "missing.npz")


def test_cli_malformed_npz_one_line_exit_2(tmp_path, capsys):
    from medseg.cli import main

    imgs, gts = _case()
    p = tmp_path / "case.npz"
    np.savez(p, imgs=imgs, gts=gts[:-1], spacing=[1, 1, 1])
    assert main(["evaluate-interactive", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gts' has shape (5, 10, 14)" in err
    np.savez(p, imgs=imgs, spacing=[1, 1, 1])
    assert main(["evaluate-interactive", str(p)]) == 2
    assert "no 'gts'" in capsys.readouterr().err


def test_stored_boxes_only_when_trusted(tmp_path):
    from medseg.protocol import load_study

    imgs, gts = _case()
    stored = ChallengeBox(2, 1, 2, 6, 10, 1, 3)  # wider than the tight box of label 1
    img = medseg.Volume(imgs)
    p = write_npz(
        tmp_path / "c.npz",
        img,
        medseg.LabelMap(gts),
        boxes=[stored.to_json(), challenge_box(gts == 3).to_json()],
    )
    _, gt, boxes = load_study(p, None)
    assert boxes == {} and gt.present() == [1, 3]
    _, _, boxes = load_study(p, None, trust_npz=True)
    assert boxes[1] == stored and boxes[3] == challenge_box(gts == 3)
    assert challenge_box(gts == 1) != stored
    # a separate ground truth file: no stored boxes are used
    _, _, boxes = load_study(p, gt, trust_npz=True)
    assert boxes == {}
