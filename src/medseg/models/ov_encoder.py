"""The SAM-family image encoder run by OpenVINO, converted once and cached on disk.

:func:`openvino_encoder` converts a loaded model's image encoder with ``openvino.convert_model``
(static input ``(1, 3, S, S)``, ``S`` the model's input size), saves the IR under
``medseg_home()/openvino/<entry>/`` and compiles it for the CPU with the requested precision as
OpenVINO's inference-precision hint (``bf16`` or ``f32``). An entry is keyed by (model name,
weights SHA-256, precision, input size, OpenVINO version), written with
:func:`medseg.io.atomic.atomic_dir` and carries ``manifest.json`` with the SHA-256 and size of
every file: an entry whose files do not match (truncated, corrupted, edited) is deleted and
rebuilt, never loaded.

OpenVINO is optional (``pip install openvino``); :func:`openvino_available` says whether it is
installed without importing it. Importing this module imports neither torch nor OpenVINO.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.models.sam import SamModel

__all__ = [
    "INSTALL_HINT",
    "LazyOpenVinoEncoder",
    "OpenVinoEncoder",
    "entry_dir",
    "openvino_available",
    "openvino_cache_dir",
    "openvino_encoder",
    "openvino_version",
    "verify_entry",
]

#: One line telling a user how to get the OpenVINO runtime.
INSTALL_HINT = "pip install openvino (or medseg[openvino]), or use --runtime torch"
#: Layout version of a cache entry (bump when the files or the manifest change).
ENTRY_FORMAT = 1
_FILES = ("encoder.xml", "encoder.bin")
_HINTS = {"bf16": "bf16", "fp32": "f32"}


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def openvino_version() -> str | None:
    """The installed OpenVINO distribution's version, or ``None`` (read from its metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


def openvino_cache_dir() -> Path:
    """``medseg_home()/openvino``: the folder of converted models."""
    from medseg.models.weights import medseg_home

    return medseg_home() / "openvino"


def _sha256(path: Path) -> str:
    """The file's SHA-256 from its bytes, never from a digest cache (an entry is not trusted)."""
    from medseg.models.weights import sha256_file

    return sha256_file(path, cached=False)


def entry_key(
    model: str, weights_sha256: str, precision: str, input_size: int, version: str
) -> dict[str, Any]:
    """Everything that identifies a converted encoder (stored in the manifest)."""
    return {
        "format": ENTRY_FORMAT,
        "model": model,
        "weights_sha256": weights_sha256,
        "precision": precision,
        "input_size": int(input_size),
        "openvino": version,
    }


def entry_dir(key: dict[str, Any], root: Path | None = None) -> Path:
    """The cache folder of ``key``: ``<root>/<model>-<precision>-<size>-<digest16>``."""
    blob = json.dumps(key, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    base = openvino_cache_dir() if root is None else Path(root)
    return base / f"{key['model']}-{key['precision']}-{key['input_size']}-{digest}"


def verify_entry(folder: Path, key: dict[str, Any]) -> bool:
    """True when ``folder`` holds a whole entry for ``key``: its manifest names this key and
    every file has the recorded size and SHA-256."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("key") != key:
            return False
        files = manifest["files"]
        if sorted(files) != sorted(_FILES):
            return False
        for name, rec in files.items():
            f = folder / name
            if f.stat().st_size != int(rec["size"]) or _sha256(f) != rec["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _stock_encoder(model: SamModel) -> Any:
    """A fresh, unaccelerated copy of ``model``'s image encoder with its weights (the
    accelerated forward is not traceable; ``state_dict`` is the same)."""
    from medseg.models.sam import build_sam_model

    fresh = build_sam_model(model.spec).image_encoder
    fresh.load_state_dict(model.image_encoder.state_dict(), strict=True)
    fresh.eval()  # TinyViT caches its attention biases when switched to eval
    return fresh


def _convert(model: SamModel, out: Path) -> None:
    import openvino as ov
    import torch

    s = int(model.spec.input_size)
    enc = _stock_encoder(model)
    example = torch.zeros(1, 3, s, s)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the stock code's asserts
        ovm = ov.convert_model(enc, example_input=example, input=[(1, 3, s, s)])
    ov.save_model(ovm, str(out / "encoder.xml"), compress_to_fp16=False)


class OpenVinoEncoder:
    """A compiled OpenVINO image encoder.

    Attributes:
        path: the cache entry folder.
        precision: ``'bf16'`` or ``'fp32'`` (OpenVINO's inference-precision hint).
        threads: inference threads given to OpenVINO.
        source: ``'cache'`` (a verified entry), ``'built'`` (none existed) or ``'rebuilt'``
            (an entry failed verification and was replaced).
        convert_s: seconds spent converting (0 for ``'cache'``); ``load_s``: reading + compiling.
    """

    def __init__(self, compiled: Any, path: Path, precision: str, threads: int) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: predictors sharing a model take turns
        self.path = path
        self.precision = precision
        self.threads = threads
        self.source = "cache"
        self.convert_s = 0.0
        self.load_s = 0.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Embeddings ``(B, 256, 64, 64)`` float32 of model-ready inputs ``(B, 3, S, S)``
        (one inference per image: the model is static at batch 1)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        outs = []
        with self._lock:
            for i in range(x.shape[0]):
                res = self._request.infer({0: x[i : i + 1]})
                outs.append(np.array(res[0], dtype=np.float32, copy=True))
        return np.concatenate(outs, axis=0)


def _check_usable(model: SamModel, precision: str) -> str:
    """The OpenVINO version, after checking the package, the weights digest and the precision."""
    version = openvino_version()
    if version is None or not openvino_available():
        raise InputError(f"runtime 'openvino' needs the openvino package: {INSTALL_HINT}")
    if model.weights_sha256 is None:
        raise InputError(
            "runtime 'openvino' needs a model loaded from a weights file (random weights have "
            "no digest to cache the converted model under); use --runtime torch"
        )
    if precision not in _HINTS:
        raise InputError(f"unknown precision {precision!r} for OpenVINO; use fp32 or bf16")
    return version


class LazyOpenVinoEncoder:
    """An :class:`OpenVinoEncoder` loaded (converted on first use) at the first call, so a
    process whose embeddings all come from the disk cache never imports or compiles OpenVINO.

    The checks (package installed, weights digest, precision) run at construction.
    """

    def __init__(
        self, model: SamModel, precision: str, *, threads: int = 1, root: str | Path | None = None
    ) -> None:
        _check_usable(model, precision)
        self._model: SamModel | None = model
        self.precision = precision
        self.threads = threads
        self._root = root
        self._enc: OpenVinoEncoder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the compiled encoder exists yet."""
        return self._enc is not None

    def load(self) -> OpenVinoEncoder:
        """The compiled encoder (loading, or converting and caching, it now if needed)."""
        with self._lock:
            if self._enc is None:
                assert self._model is not None
                self._enc = openvino_encoder(
                    self._model, self.precision, threads=self.threads, root=self._root
                )
                self._model = None  # the weights are in the compiled model now
            return self._enc

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """See :meth:`OpenVinoEncoder.__call__`."""
        return self.load()(images)


def openvino_encoder(
    model: SamModel,
    precision: str,
    *,
    threads: int = 1,
    root: str | Path | None = None,
) -> OpenVinoEncoder:
    """Load (or convert, cache and load) ``model``'s image encoder for OpenVINO on the CPU.

    Args:
        model: a loaded SAM-family model with weights from a file (``weights_sha256`` set).
        precision: ``'bf16'`` or ``'fp32'`` (resolved; see :mod:`medseg.runtime`).
        threads: OpenVINO inference threads.
        root: cache folder (default :func:`openvino_cache_dir`).

    Raises:
        InputError: OpenVINO is not installed, or the model has no weights digest.
    """
    version = _check_usable(model, precision)
    from medseg.io.atomic import atomic_dir

    key = entry_key(
        model.spec.name, model.weights_sha256, precision, model.spec.input_size, version
    )
    folder = entry_dir(key, None if root is None else Path(root))
    source = "cache"
    convert_s = 0.0
    if not verify_entry(folder, key):
        source = "rebuilt" if folder.exists() else "built"
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()

        def _check(tmp: Path) -> None:
            if not verify_entry(tmp, key):
                raise OSError("converted OpenVINO model failed its own manifest check")

        with atomic_dir(folder, verify=_check, overwrite=True) as tmp:
            _convert(model, tmp)
            files = {
                n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in _FILES
            }
            manifest = {"key": key, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        convert_s = time.perf_counter() - t0
    import openvino as ov

    t0 = time.perf_counter()
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "INFERENCE_NUM_THREADS": max(1, int(threads)),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(core.read_model(str(folder / "encoder.xml")), "CPU", config)
    enc = OpenVinoEncoder(compiled, folder, precision, max(1, int(threads)))
    enc.source = source
    enc.convert_s = convert_s
    enc.load_s = time.perf_counter() - t0
    return enc
