"""Fault injection for every writer (issue 16): a file-size limit, a failing ``os.replace``, a
read-only destination, SIGKILL mid-write. Whatever happens, nothing partial is left at the
destination, no temporary file stays behind, and the CLI exits 2 with one line and no traceback.

The CLI runs as ``python -m medseg`` in a child process whose ``RLIMIT_FSIZE`` is lowered
(SIGXFSZ ignored, so writes fail with EFBIG as on a full disk or quota).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import OutputError
from medseg.io import atomic
from medseg.io.atomic import atomic_path, write_csv, write_json, write_text
from medseg.io.files import read_volume, write_labels, write_sitk_image, write_volume
from medseg.volume import LabelMap, Volume

SRC = Path(__file__).resolve().parents[1] / "src"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONSTARTUP", None)
    return env


def run_cli(
    args: list[str],
    cwd: Path,
    fsize: int | None = None,
    uid: int | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """``python -m medseg ARGS`` with an optional file-size limit (bytes) or unprivileged uid."""

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if uid is not None:
            os.setgid(uid)
            os.setuid(uid)

    return subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        cwd=cwd,
        env=_env(),
        preexec_fn=pre,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_failure(res: subprocess.CompletedProcess[str], *words: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def entries(folder: Path) -> list[str]:
    """Everything in ``folder`` (recursively), temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def small_vol() -> Volume:
    rng = np.random.default_rng(16)
    arr = rng.integers(-1000, 1000, size=(6, 40, 50)).astype(np.int16)
    return Volume(arr, spacing=(2.5, 0.8, 0.7), origin=(10.0, -5.0, 3.0))


# --------------------------------------------------------------------------- file-size limit
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_cli_convert_under_file_size_limit(pyradiomics_dir: Path, tmp_path: Path, suffix: str):
    src = pyradiomics_dir / "breast1_image.nrrd"
    out = tmp_path / "out"
    out.mkdir()
    res = run_cli(["convert", str(src), str(out / f"img{suffix}"), "--quiet"], tmp_path, 20_000)
    assert_one_line_failure(res, f"img{suffix}", "file too large")
    assert entries(out) == []  # no destination, no temporary file
    # the same command without the limit writes a whole, readable file
    ok = run_cli(["convert", str(src), str(out / f"img{suffix}"), "--quiet"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    back = read_volume(out / f"img{suffix}")
    assert back.array.shape == read_volume(src).array.shape


def test_cli_phantom_dicom_under_file_size_limit(tmp_path: Path):
    res = run_cli(["phantom", "P", "--dicom", "--quiet"], tmp_path, 100_000)
    assert_one_line_failure(res, "P", "file too large")
    assert entries(tmp_path) == []


def test_cli_segment_under_file_size_limit(tmp_path: Path):
    """``segment --out p.nii --json r.json``: neither output exists after a short write."""
    from medseg.phantom import make_phantom

    # matplotlib (imported by a dependency) builds its font cache on first import and says so
    # on stderr when it cannot: build it first, without the limit
    subprocess.run(
        [sys.executable, "-c", "import matplotlib.font_manager"],
        env=_env(),
        capture_output=True,
        timeout=120,
    )

    img, _ = make_phantom(shape=(16, 64, 64), seed=3)
    write_volume(img, tmp_path / "img.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    args = ["segment", str(tmp_path / "img.nii.gz"), "--model", "unet-demo"]
    args += ["--out", str(out / "p.nii"), "--json", str(out / "r.json")]
    res = run_cli(args, tmp_path, 20_000)
    assert_one_line_failure(res, "p.nii", "file too large")
    assert entries(out) == []


def test_nifti_short_write_is_detected_in_process(small_vol: Volume, tmp_path: Path):
    """ITK's NIfTI writer only prints ``NWAD`` and returns: the size check catches it."""
    code = (
        "import resource, signal, sys, numpy as np\n"
        "from medseg.volume import Volume\n"
        "from medseg.io import write_volume\n"
        "from medseg.errors import OutputError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))\n"
        "v = Volume(np.arange(6*40*50, dtype=np.int16).reshape(6, 40, 50))\n"
        "try:\n"
        "    write_volume(v, sys.argv[1])\n"
        "except OutputError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "v.nii")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 3, res.stderr
    assert "v.nii: cannot write: file too large" in res.stdout
    assert "NWAD" not in res.stderr  # ITK's raw diagnostic is captured, not printed
    assert entries(tmp_path) == []


# --------------------------------------------------------------------------- failing rename
def _fail_replace(*_a: object, **_k: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failing_replace_leaves_nothing(small_vol: Volume, tmp_path: Path, monkeypatch):
    import SimpleITK as sitk

    from medseg.io.datasets import write_msd_dataset
    from medseg.io.dicom_write import write_dicom_series

    lab = LabelMap((small_vol.array > 0).astype(np.uint8), labels={1: "x"}, **_geom(small_vol))
    probs = sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True)
    monkeypatch.setattr(os, "replace", _fail_replace)
    calls = [
        lambda: write_volume(small_vol, tmp_path / "a.nii.gz"),
        lambda: write_labels(lab, tmp_path / "l.nrrd"),
        lambda: write_sitk_image(probs, tmp_path / "p.nii.gz"),
        lambda: write_volume(small_vol, tmp_path / "a.mhd"),
        lambda: write_json({"a": 1}, tmp_path / "r.json"),
        lambda: write_csv([{"a": 1}], tmp_path / "r.csv"),
        lambda: write_dicom_series(small_vol, tmp_path / "dicom"),
        lambda: write_msd_dataset(
            tmp_path / "ds", [("c0", small_vol, lab)], name="t", description="", labels={1: "x"}
        ),
    ]
    for call in calls:
        with pytest.raises(OutputError, match="disk full"):
            call()
    monkeypatch.undo()
    assert entries(tmp_path) == []


def _geom(v: Volume) -> dict:
    return {"spacing": v.spacing, "origin": v.origin, "direction": v.direction}


def test_dicom_series_disk_full_mid_series(small_vol: Volume, tmp_path: Path, monkeypatch):
    """The third slice fails with ENOSPC: no folder claims to be the series, nothing left."""
    import pydicom

    from medseg.io.dicom_write import write_dicom_series

    real = pydicom.dataset.Dataset.save_as
    n = {"calls": 0}

    def flaky(self, *a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", flaky)
    with pytest.raises(OutputError) as ei:
        write_dicom_series(small_vol, tmp_path / "series")
    assert str(ei.value).startswith(f"{tmp_path / 'series'}: cannot write: disk full")
    assert entries(tmp_path) == []


def test_verify_failure_and_size_mismatch(tmp_path: Path):
    out = tmp_path / "x.bin"

    def bad(_p: Path) -> None:
        raise ValueError("header does not parse")

    with pytest.raises(OutputError, match="does not read back"), atomic_path(out, verify=bad) as t:
        t.write_bytes(b"abc")
    short = pytest.raises(OutputError, match=r"wrote 3 of 10 bytes")
    with short, atomic_path(out, expected_size=10) as t:
        t.write_bytes(b"abc")
    with pytest.raises(OutputError, match="produced no file"), atomic_path(out) as t:
        t.unlink()
    assert entries(tmp_path) == []
    # a good write: exact bytes, usual permissions, nothing else left
    write_text("héllo\n", out)
    assert out.read_bytes() == "héllo\n".encode()
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert entries(tmp_path) == ["x.bin"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_write_json_csv_round_trip_and_refusals(tmp_path: Path):
    data = {"dice": np.float32(0.5), "shape": np.array([2, 3]), "path": tmp_path}
    p = write_json(data, tmp_path / "r.json")
    assert json.loads(p.read_text()) == {"dice": 0.5, "shape": [2, 3], "path": str(tmp_path)}
    with pytest.raises(OutputError, match="already exists"):
        write_json({}, p)
    write_json({"b": 2}, p, overwrite=True)
    assert json.loads(p.read_text()) == {"b": 2}
    with pytest.raises(OutputError, match="is an input"):
        write_json({}, tmp_path / "in.nii", inputs=[tmp_path / "in.nii"])
    c = write_csv([{"a": 1, "b": "x"}, {"b": "y", "c": 2.5}], tmp_path / "t.csv")
    assert c.read_text().splitlines() == ["a,b,c", "1,x,", ",y,2.5"]
    c2 = write_csv([{"a": 1, "b": 2}], tmp_path / "t2.csv", columns=["b", "a"])
    assert c2.read_text().splitlines() == ["b,a", "2,1"]


# --------------------------------------------------------------------------- permissions
_AS_NOBODY = """
import os, sys
import medseg.cli, medseg.cli.convert, medseg.io.files, medseg.io.itk, medseg.io.atomic
import SimpleITK, nibabel, pydicom, numpy, tqdm, gzip, zlib, csv, json, tempfile
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # from here on, file permissions apply
sys.exit(medseg.cli.main(sys.argv[1:]))
"""


def test_cli_convert_into_read_only_folder(pyradiomics_dir: Path):
    """A folder the user cannot write. Root ignores permissions, so the child imports what it
    needs, drops to uid 65534 (the interpreter lives under /root, unreadable to others), then
    runs the CLI's ``main``."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged uid (as non-root: run by hand)")
    base = Path(tempfile.mkdtemp(prefix="medseg-ro-"))
    try:
        os.chmod(base, 0o755)
        src = base / "in.nrrd"
        shutil.copy(pyradiomics_dir / "breast1_image.nrrd", src)
        os.chmod(src, 0o644)
        ro = base / "ro"
        ro.mkdir(mode=0o755)
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                _AS_NOBODY,
                "convert",
                str(src),
                str(ro / "o.nii.gz"),
                "--quiet",
            ],
            cwd=base,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_one_line_failure(res, "o.nii.gz", "permission denied")
        assert entries(ro) == []
        # the helper itself maps EACCES from the OS (past the early path check)
        code = _AS_NOBODY.replace(
            "sys.exit(medseg.cli.main(sys.argv[1:]))",
            "try:\n    with medseg.io.atomic.atomic_path(sys.argv[1]) as t:\n"
            "        t.write_text('x')\nexcept medseg.errors.OutputError as e:\n    print(e)\n",
        )
        r2 = subprocess.run(
            [sys.executable, "-c", code, str(ro / "x.txt")],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "x.txt: cannot write: permission denied" in r2.stdout, r2.stdout + r2.stderr
        assert entries(ro) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- SIGKILL
_KILL_CHILD = """
import sys, time
import medseg.io.itk as itk
from medseg.io import write_volume
from medseg.volume import Volume
import numpy as np

def hang(*a, **k):  # the file is written, not yet verified or renamed: die here
    print("ready", flush=True)
    time.sleep(600)

itk._verify_file = hang
write_volume(Volume(np.ones((4, 8, 8), np.int16)), sys.argv[1])
"""


def test_sigkill_mid_write_leaves_no_destination(small_vol: Volume, tmp_path: Path):
    out = tmp_path / "killed.nii.gz"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        left = entries(tmp_path)
        assert len(left) == 1 and left[0].startswith(".killed.nii.gz.")  # the hidden temp file
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # the next write to the same target removes the dead writer's temporary file
    t0 = time.monotonic()
    write_volume(small_vol, out)
    assert time.monotonic() - t0 >= 0  # (ordering only; no timing assertion)
    assert entries(tmp_path) == ["killed.nii.gz"]
    np.testing.assert_array_equal(read_volume(out).array, small_vol.array)


def test_stale_parts_of_live_processes_are_kept(tmp_path: Path):
    target = tmp_path / "t.json"
    mine = tmp_path / f".t.json.{os.getpid()}.abc123.part.json"
    mine.write_text("in progress")
    dead = tmp_path / ".t.json.999999999.zz.part.json"
    dead.write_text("dead")
    other = tmp_path / ".u.json.999999999.zz.part.json"  # another target: not ours to touch
    other.write_text("x")
    assert atomic.remove_stale_parts(target) == 1
    assert mine.exists() and not dead.exists() and other.exists()


# --------------------------------------------------------------------------- reasons
@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.ENOSPC, "disk full"),
        (errno.EFBIG, "file too large"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_os_reasons(err: int, words: str):
    e = atomic.output_error("/x/out.nii", OSError(err, os.strerror(err)))
    assert isinstance(e, OutputError)
    assert str(e).startswith(f"/x/out.nii: cannot write: {words}")
    assert "\n" not in str(e)


def test_write_sitk_image_vector_round_trip(tmp_path: Path):
    import SimpleITK as sitk

    arr = np.random.default_rng(1).random((3, 4, 5, 2)).astype(np.float32)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing((0.5, 0.75, 2.0))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = write_sitk_image(img, tmp_path / f"p{suffix}")
        back = sitk.ReadImage(str(out))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
        assert back.GetSpacing() == pytest.approx((0.5, 0.75, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.mha", "p.nii.gz", "p.nrrd"]
