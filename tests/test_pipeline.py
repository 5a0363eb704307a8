"""The Python front door without a model: imports, prompt objects, the registry, the report schema,
the layering rule (no core module imports the command line), Volume's one-line repr."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.errors import InputError, PromptError, WeightsError

SRC = Path(__file__).resolve().parents[1] / "src" / "medseg"


def test_import_medseg_is_numpy_only_and_names_resolve() -> None:
    code = (
        "import sys, medseg\n"
        "heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'pydicom', 'scipy', 'napari') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for n in medseg.__all__: getattr(medseg, n)\n"
        "heavy = [m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    with pytest.raises(AttributeError):
        medseg.no_such_name  # noqa: B018


def test_no_module_outside_cli_imports_the_cli() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{rel}: {n}" for n in names if n.startswith("medseg.cli")]
    assert offenders == []


# --------------------------------------------------------------------------- prompts
def test_box_validation() -> None:
    b = medseg.Box(z=16, y0=82, x0=160, y1=117, x1=208)
    assert b.rc == (82.0, 160.0, 117.0, 208.0) and b.axis == "z" and isinstance(b.z, int)
    with pytest.raises(PromptError, match="zero height or width"):
        medseg.Box(12, 10, 10, 10, 30)  # the zero-height box the CLI used to accept
    with pytest.raises(PromptError, match="zero height or width"):
        medseg.Box(12, 10, 10, 20, 10)
    with pytest.raises(PromptError, match="R0 <= R1"):
        medseg.Box(12, 20, 10, 10, 30)
    with pytest.raises(PromptError, match="not an integer"):
        medseg.Box(12.5, 1, 1, 5, 5)
    with pytest.raises(PromptError, match="non-finite"):
        medseg.Box(1, float("nan"), 1, 5, 5)
    with pytest.raises(PromptError, match="unknown slicing axis"):
        medseg.Box(1, 1, 1, 5, 5, axis="w")


def test_key_prompts_check_the_image() -> None:
    from medseg.prompts import key_prompts

    shape = (10, 20, 30)
    keys = key_prompts(
        [medseg.Box(3, 1, 2, 5, 6), medseg.Point(4, 5, 6, positive=False)], shape, "z"
    )
    assert [k.index for k in keys] == [3, 4]
    assert keys[0].box_rc == (1.0, 2.0, 5.0, 6.0)
    assert keys[1].points_rc.tolist() == [[5.0, 6.0]] and keys[1].point_labels.tolist() == [0]
    # a point lands on the slice through it along the axis: along y, (z, x) is its (row, col)
    [k] = key_prompts([medseg.Point(4, 5, 6)], shape, "y")
    assert k.index == 5 and k.points_rc.tolist() == [[4.0, 6.0]]
    with pytest.raises(PromptError, match="outside the image"):
        key_prompts([medseg.Box(3, 1, 2, 5, 30)], shape)
    with pytest.raises(PromptError, match="outside the image"):
        key_prompts([medseg.Point(10, 1, 1)], shape)
    with pytest.raises(PromptError, match="out of range"):
        key_prompts([medseg.Box(10, 1, 2, 5, 6)], shape)
    with pytest.raises(PromptError, match="along y"):
        key_prompts([medseg.Box(3, 1, 2, 5, 6, axis="y")], shape, "z")
    m = np.zeros((20, 30), bool)
    with pytest.raises(PromptError, match="empty"):
        key_prompts([medseg.MaskPrompt(m, z=2)], shape)
    m[3:5, 4:9] = True
    [k] = key_prompts([medseg.MaskPrompt(m, z=2)], shape)
    assert k.index == 2 and k.mask.sum() == 10
    with pytest.raises(PromptError, match="shape"):
        key_prompts([medseg.MaskPrompt(m[:10], z=2)], shape)


def test_box_from_gt_hand_computed() -> None:
    gt = np.zeros((5, 40, 50), np.uint8)
    gt[1, 10:13, 20:22] = 1  # 6 px
    gt[2, 8:18, 15:30] = 1  # 150 px: the largest slice
    gt[3, 5:7, 5:7] = 2
    lm = medseg.LabelMap(gt, labels={1: "tumour", 2: "cyst"})
    b = medseg.box_from_gt(lm, label=1, margin=3)
    assert (b.z, b.rc) == (2, (5.0, 12.0, 20.0, 32.0))
    b0 = medseg.box_from_gt(lm, label=1, margin=0)
    assert b0.rc == (8.0, 15.0, 17.0, 29.0)
    assert medseg.box_from_gt(lm, label=2, margin=10).rc == (0.0, 0.0, 16.0, 16.0)  # clipped
    with pytest.raises(InputError, match="label 7 is not in the ground truth"):
        medseg.box_from_gt(lm, label=7)
    with pytest.raises(InputError, match="empty"):
        medseg.box_from_gt(np.zeros((2, 3, 4), bool))


def test_prompts_file_round_trip(tmp_path: Path) -> None:
    mask = np.zeros((6, 7), bool)
    mask[1:3, 2:4] = True
    np.save(tmp_path / "m.npy", mask)
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {
                "axis": "z",
                "boxes": [{"slice": 2, "box": [1, 2, 4, 5]}],
                "points": [{"zyx": [1, 2, 3], "label": 0}],
                "masks": [{"slice": 3, "file": "m.npy"}],
            }
        )
    )
    box, point, mp = medseg.load_prompts(f, axis="z")
    assert box == medseg.Box(2, 1, 2, 4, 5)
    assert point == medseg.Point(1, 2, 3, positive=False)
    assert mp.z == 3 and np.array_equal(mp.mask, mask)
    assert mp.to_json()["voxels"] == 4
    with pytest.raises(InputError, match="axis"):
        medseg.load_prompts(f, axis="y")
    f.write_text(json.dumps({"points": [{"zyx": [1, 2, 3], "label": 2}]}))
    with pytest.raises(PromptError, match="1 or 0"):
        medseg.load_prompts(f)


# --------------------------------------------------------------------------- registry
def test_registry_resolves_every_engine(tmp_path: Path) -> None:
    from medseg.models.registry import resolve_model

    assert resolve_model("litemedsam").engine == "sam"
    assert resolve_model("LiteMedSAM").spec.input_size == 256
    ref = resolve_model("unet-demo")
    assert ref.engine == "unet" and ref.path.is_file()
    assert resolve_model(ref.path).engine == "unet"  # the same checkpoint by path
    with pytest.raises(WeightsError, match=r"unknown model 'unet-foo'.*litemedsam"):
        resolve_model("unet-foo")
    with pytest.raises(WeightsError, match="no such checkpoint"):
        resolve_model(tmp_path / "missing.pt")
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        resolve_model(bad)


# --------------------------------------------------------------------------- report + volume
def test_report_schema_rejects_what_it_must() -> None:
    from medseg.report import schema, validate_report

    assert schema()["properties"]["schema"]["const"] == 1
    with pytest.raises(InputError, match="required"):
        validate_report({"schema": 1, "engine": "sam"})


def test_volume_repr_is_one_line_with_orientation(pyradiomics_dir: Path) -> None:
    from medseg.volume import orientation_code

    v = medseg.Volume(np.zeros((2, 3, 4), np.int16), spacing=(6.5, 0.78125, 0.78125))
    assert repr(v) == (
        "Volume(shape=(2, 3, 4), spacing=(6.5, 0.7812, 0.7812) mm, orientation=LPS, dtype=int16)"
    )
    assert orientation_code(np.diag([-1.0, 1.0, -1.0])) == "RPI"
    # RAS-stored NIfTI read as LPS: x points right, y anterior
    assert orientation_code(np.diag([-1.0, -1.0, 1.0])) == "RAS"
    brain = medseg.read_volume(pyradiomics_dir / "brain1_image.nrrd")
    assert "\n" not in repr(brain) and "orientation=LAS" in repr(brain)
    lm = medseg.LabelMap.like(v, np.ones((2, 3, 4), np.uint8), {1: "liver"})
    assert repr(lm).endswith("dtype=uint8, labels={1: liver})")
