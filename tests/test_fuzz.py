"""Seeded mutation fuzzing of ``medseg.read_volume`` over real files (issue 16).

The corpus is the real data the other tests use: nibabel's ``anatomical.nii``, small crops of the
pyradiomics NRRDs (gzip and raw encodings, and as ``.mha`` / ``.nii.gz``), pydicom's
``CT_small.dcm`` / ``MR_small.dcm`` / ``MR_small_RLE.dcm`` and a 3-slice DICOM series folder.
Mutations: bit flips, bytes set to extreme values, truncation, splicing (a chunk of the file or of
another file), repeated chunks, and header fields set to extreme values (NIfTI ``dim``/
``datatype``/``vox_offset``, NRRD header lines, DICOM Rows/Columns/lengths).

The one property: only :class:`~medseg.errors.MedsegError` escapes ``read_volume`` (``read_labels``
for the label map), nothing is printed, and no read takes unbounded time (a case that hangs fails
the whole run by its timeout).

A quick run by default (``MEDSEG_FUZZ_CASES``, default 300); set ``MEDSEG_FUZZ_CASES=10000`` for
the long run and ``MEDSEG_FUZZ_SEED`` to explore other seeds. The mutator is hand-written and
seeded rather than ``hypothesis`` (not installed, and its shrinking buys little on binary formats)
or ``atheris`` (coverage-guided, needs an instrumented build and runs unbounded): a fixed seed
gives the same cases on every machine, and a failure prints its case number to replay.
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import read_labels, read_volume

N_CASES = int(os.environ.get("MEDSEG_FUZZ_CASES", "300"))
SEED = int(os.environ.get("MEDSEG_FUZZ_SEED", "16"))

EXTREMES_16 = [0, 1, -1, 0x7FFF, -0x8000, 0xFFFF]
EXTREMES_32 = [0, 1, -1, 0x7FFFFFFF, -0x80000000, 0xFFFFFFFF, 352, 1 << 30]
EXTREME_FLOATS = [0.0, -1.0, 1e38, -1e38, float("nan"), float("inf"), 1e-38]


# --------------------------------------------------------------------------- corpus
def _nibabel_file(name: str) -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / name


def build_corpus(root: Path, pyradiomics_dir: Path) -> dict[str, tuple[bytes, str]]:
    """``{name: (bytes, suffix)}`` of small real files; DICOM series members are marked by a
    ``series/`` name prefix and mutated inside a copy of the series folder."""
    import pydicom.data
    import SimpleITK as sitk

    from medseg.io.dicom_write import write_dicom_series

    corpus: dict[str, tuple[bytes, str]] = {}
    corpus["anatomical.nii"] = (_nibabel_file("anatomical.nii").read_bytes(), ".nii")
    img = sitk.ReadImage(str(pyradiomics_dir / "breast1_image.nrrd"))
    size = img.GetSize()
    crop = sitk.RegionOfInterest(img, [min(24, size[0]), min(20, size[1]), min(4, size[2])])
    for name, suffix, compress in [
        ("breast_gz.nrrd", ".nrrd", True),
        ("breast_raw.nrrd", ".nrrd", False),
        ("breast.mha", ".mha", True),
        ("breast.nii.gz", ".nii.gz", True),
    ]:
        out = root / f"corpus_{name}"
        sitk.WriteImage(crop, str(out), compress)
        corpus[name] = (out.read_bytes(), suffix)
    lab = sitk.ReadImage(str(pyradiomics_dir / "breast1_label.nrrd"))
    corpus["breast_label.nrrd"] = ((pyradiomics_dir / "breast1_label.nrrd").read_bytes(), ".nrrd")
    del lab
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"):
        corpus[name] = (Path(pydicom.data.get_testdata_file(name)).read_bytes(), ".dcm")
    vol = read_volume(pydicom.data.get_testdata_file("CT_small.dcm"))
    from medseg.volume import Volume

    arr = np.concatenate([vol.array] * 3, axis=0)[:, :16, :16]
    series = root / "corpus_series"
    write_dicom_series(Volume(arr, spacing=(2.0, 0.7, 0.7)), series, uid_seed="fuzz")
    for f in sorted(series.iterdir()):
        corpus[f"series/{f.name}"] = (f.read_bytes(), ".dcm")
    return corpus


# --------------------------------------------------------------------------- mutator
def _flip_bits(rng: np.random.Generator, b: bytearray) -> None:
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))


def _extreme_bytes(rng: np.random.Generator, b: bytearray) -> None:
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(b)))
        n = int(rng.integers(1, 5))
        b[i : i + n] = bytes([int(rng.choice([0x00, 0xFF, 0x7F, 0x80]))]) * len(b[i : i + n])


def _truncate(rng: np.random.Generator, b: bytearray) -> None:
    cut = int(rng.integers(0, len(b)))
    del b[cut:]


def _splice(rng: np.random.Generator, b: bytearray, other: bytes) -> None:
    src = other if rng.random() < 0.5 else bytes(b)
    n = int(rng.integers(1, 256))
    i = int(rng.integers(max(1, len(src) - n)))
    j = int(rng.integers(len(b)))
    chunk = src[i : i + n]
    if rng.random() < 0.5:
        b[j : j + len(chunk)] = chunk  # overwrite
    else:
        b[j:j] = chunk  # insert


def _repeat(rng: np.random.Generator, b: bytearray) -> None:
    i = int(rng.integers(len(b)))
    n = int(rng.integers(1, 64))
    b[i:i] = b[i : i + n] * int(rng.integers(2, 50))


def _nifti_field(rng: np.random.Generator, b: bytearray) -> None:
    """NIfTI-1 header (little endian): dim[0..7] @40 int16, datatype @70, bitpix @72,
    pixdim @76 float32[8], vox_offset @108 float32, scl_slope @112, sform codes @252-254."""
    field = int(rng.integers(6))
    if field == 0:
        k = int(rng.integers(8))
        struct.pack_into("<h", b, 40 + 2 * k, _s16(rng.choice(EXTREMES_16)))
    elif field == 1:
        struct.pack_into("<h", b, 70, _s16(rng.choice([0, 1, 2, 4, 8, 16, 64, 128, 2304, 0x7FFF])))
    elif field == 2:
        struct.pack_into("<h", b, 72, _s16(rng.choice([*EXTREMES_16, 8, 16, 32, 64])))
    elif field == 3:
        struct.pack_into("<f", b, 76 + 4 * int(rng.integers(8)), rng.choice(EXTREME_FLOATS))
    elif field == 4:
        struct.pack_into("<f", b, 108, rng.choice([*EXTREME_FLOATS, 352.0, 1000000000.0]))
    else:
        struct.pack_into("<f", b, 112, rng.choice(EXTREME_FLOATS))


def _s16(v: int) -> int:
    v = int(v)
    return v - 0x10000 if v > 0x7FFF else v


_NRRD_LINES = [
    b"sizes: 100000 100000 100000",
    b"sizes: 0 0 0",
    b"sizes: -1 2 3",
    b"sizes: 4 4",
    b"dimension: 9",
    b"dimension: 0",
    b"type: double",
    b"type: nonsense",
    b"encoding: raw",
    b"encoding: gzip",
    b"encoding: bzip2",
    b"encoding: ascii",
    b"encoding: hex",
    b"space directions: (0,0,0) (0,0,0) (0,0,0)",
    b"space directions: (nan,0,0) (0,inf,0) (0,0,1)",
    b"space origin: (1e308,1e308,1e308)",
    b"data file: /etc/passwd",
    b"data file: LIST",
    b"byte skip: 999999999",
    b"line skip: 999999",
    b"ElementDataFile = /dev/zero",
    b"DimSize = 100000 100000 100000",
    b"ElementType = MET_DOUBLE",
    b"NDims = 7",
    b"CompressedData = True",
    b"CompressedDataSize = 99999999",
    b"HeaderSize = 999999999",
    b"TransformMatrix = 0 0 0 0 0 0 0 0 0",
]


def _text_header_line(rng: np.random.Generator, b: bytearray) -> None:
    """NRRD/MetaImage: replace one header line (before the first blank line) with an extreme."""
    end = b.find(b"\n\n")
    if end < 0:
        end = min(len(b), 1024)
    lines = bytes(b[:end]).split(b"\n")
    k = int(rng.integers(len(lines)))
    lines[k] = _NRRD_LINES[int(rng.integers(len(_NRRD_LINES)))]
    b[:end] = b"\n".join(lines)


def _dicom_field(rng: np.random.Generator, b: bytearray) -> None:
    """Overwrite an explicit/implicit VR length or a US value right after a known tag."""
    tags = [
        (0x0028, 0x0010),  # Rows
        (0x0028, 0x0011),  # Columns
        (0x0028, 0x0100),  # BitsAllocated
        (0x0028, 0x0002),  # SamplesPerPixel
        (0x0028, 0x0008),  # NumberOfFrames
        (0x7FE0, 0x0010),  # PixelData
        (0x0002, 0x0010),  # TransferSyntaxUID
        (0x0020, 0x0032),  # ImagePositionPatient
        (0x0028, 0x0030),  # PixelSpacing
    ]
    g, e = tags[int(rng.integers(len(tags)))]
    pat = struct.pack("<HH", g, e)
    i = bytes(b).find(pat)
    if i < 0:
        _flip_bits(rng, b)
        return
    off = i + 4 + int(rng.integers(0, 8))
    if off + 4 <= len(b):
        struct.pack_into("<I", b, off, int(rng.choice(EXTREMES_32)) & 0xFFFFFFFF)


def mutate(rng: np.random.Generator, data: bytes, suffix: str, other: bytes) -> bytes:
    b = bytearray(data)
    ops: list[Callable[[], None]] = [
        lambda: _flip_bits(rng, b),
        lambda: _extreme_bytes(rng, b),
        lambda: _truncate(rng, b),
        lambda: _splice(rng, b, other),
        lambda: _repeat(rng, b),
    ]
    if suffix == ".nii":
        ops += [lambda: _nifti_field(rng, b)] * 3
    elif suffix in (".nrrd", ".mha"):
        ops += [lambda: _text_header_line(rng, b)] * 3
    elif suffix == ".dcm":
        ops += [lambda: _dicom_field(rng, b)] * 3
    for _ in range(int(rng.integers(1, 3))):
        if not b:
            break
        ops[int(rng.integers(len(ops)))]()
    return bytes(b)


# --------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, pyradiomics_dir: Path):
    root = tmp_path_factory.mktemp("fuzz_corpus")
    return build_corpus(root, pyradiomics_dir)


def test_corpus_reads_cleanly(corpus: dict[str, tuple[bytes, str]], tmp_path: Path) -> None:
    """Unmutated, every corpus file reads (so the fuzz cases start from valid files)."""
    for name, (data, suffix) in corpus.items():
        if name.startswith("series/"):
            continue
        p = tmp_path / f"{name.replace('/', '_')}"
        p = p.with_name(p.name if p.name.endswith(suffix) else p.name + suffix)
        p.write_bytes(data)
        vol = read_volume(p)
        assert vol.array.ndim == 3 and vol.array.size > 0, name


def run_cases(corpus: dict[str, tuple[bytes, str]], work: Path, n: int, seed: int) -> list[str]:
    """Run ``n`` seeded cases; return a description of every non-MedsegError escape."""
    rng = np.random.default_rng(seed)
    names = sorted(corpus)
    series = sorted(k for k in names if k.startswith("series/"))
    singles = [k for k in names if not k.startswith("series/")]
    escapes: list[str] = []
    for case in range(n):
        name = names[int(rng.integers(len(names)))]
        data, suffix = corpus[name]
        other = corpus[names[int(rng.integers(len(names)))]][0]
        mutated = mutate(rng, data, suffix, other)
        case_dir = work / f"c{case}"
        case_dir.mkdir()
        if name.startswith("series/"):
            for s in series:
                (case_dir / s.split("/", 1)[1]).write_bytes(corpus[s][0])
            (case_dir / name.split("/", 1)[1]).write_bytes(mutated)
            target = case_dir
        else:
            target = case_dir / f"f{suffix}"
            target.write_bytes(mutated)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if "label" in name:
                    read_labels(target)
                else:
                    read_volume(target)
        except MedsegError as exc:
            assert "\n" not in str(exc), f"case {case} ({name}): multi-line message {exc!r}"
        except Exception as exc:
            escapes.append(f"case {case} ({name}): {type(exc).__name__}: {str(exc)[:150]}")
        shutil.rmtree(case_dir, ignore_errors=True)
    assert len(singles) + len(series) == len(names)
    return escapes


def test_only_medseg_errors_escape_read_volume(
    corpus: dict[str, tuple[bytes, str]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    escapes = run_cases(corpus, tmp_path, N_CASES, SEED)
    assert not escapes, f"{len(escapes)} of {N_CASES} cases escaped:\n" + "\n".join(escapes[:20])
    # ITK / niftilib / nibabel diagnostics never reach the terminal raw
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out + err)[:2000]


def test_mutator_is_seeded(corpus: dict[str, tuple[bytes, str]]) -> None:
    data, suffix = corpus["anatomical.nii"]
    a = mutate(np.random.default_rng(7), data, suffix, data)
    b = mutate(np.random.default_rng(7), data, suffix, data)
    c = mutate(np.random.default_rng(8), data, suffix, data)
    assert a == b and a != data and c != a
