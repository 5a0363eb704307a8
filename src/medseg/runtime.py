"""The one place that decides where and how models run: device, precision and CPU threads.

Every engine (SAM-family encoders, the accelerated forwards, the U-Net) asks this module, so they
cannot disagree:

* :func:`resolve_device`: ``"auto"`` is CUDA when torch sees a GPU, else the CPU.
* :func:`resolve_precision`: ``"auto"`` is ``"bf16"`` on a CPU with native bfloat16 arithmetic
  (:func:`native_bf16`: AVX512-BF16 or AMX-BF16) or on a CUDA GPU that supports bf16, else
  ``"fp32"``. An explicit ``"fp32"``/``"bf16"`` is honoured everywhere (bf16 without native
  support is emulated: slower, but the caller asked).
* :func:`configure_threads`: torch intra-op threads from an argument, ``MEDSEG_THREADS`` or
  :func:`default_threads` (the CPUs this process may use, shared among live medseg processes).

Environment:

* ``MEDSEG_BF16=0|1`` overrides the native-bf16 detection (odd platforms, tests).
* ``MEDSEG_MALLOC_TUNE=0`` turns off :func:`tune_allocator` (glibc heap kept for the encoder).
* ``MEDSEG_THREADS=N`` is the thread count :func:`configure_threads` uses when given none
  (set it per batch worker or job, e.g. cores // workers, to pin the split yourself).

Importing this module does not import torch; the functions that need it import it lazily.
"""

from __future__ import annotations

import atexit
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "AUTO_RUNTIME",
    "PRECISIONS",
    "RUNTIMES",
    "configure_threads",
    "cpu_budget",
    "cpu_flags",
    "default_threads",
    "native_bf16",
    "resolve_device",
    "resolve_precision",
    "resolve_runtime",
    "sharing_processes",
    "tune_allocator",
]

#: Precision names a caller may request.
PRECISIONS = ("auto", "fp32", "bf16")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "f32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
#: Runtime names a caller may request.
RUNTIMES = ("auto", "torch", "openvino")
#: What ``"auto"`` picks where OpenVINO could run. Measured on the 2-core AVX512-BF16 CPU
#: (benchmarks/README.md): the OpenVINO bf16 encoder is ~1.1-1.25x the accelerated torch one,
#: its conversion costs ~40 s once per model, and the OpenVINO fp32 decoder is no faster than the
#: torch one; end to end that does not pay, so ``auto`` stays on torch.
AUTO_RUNTIME = "torch"
#: CPU flags that mean bfloat16 arithmetic runs natively (not emulated).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX-BF16).

    ``MEDSEG_BF16=0``/``1`` overrides the detection. Without ``/proc/cpuinfo`` (macOS, Windows)
    torch's reported CPU capability decides (AMX). The answer is cached; tests that change the
    environment call ``native_bf16.cache_clear()``.
    """
    env = os.environ.get("MEDSEG_BF16")
    if env is not None and env.strip() in {"0", "1"}:
        return env.strip() == "1"
    flags = cpu_flags()
    if flags:
        return bool(BF16_FLAGS & flags)
    try:
        import torch

        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - torch missing or very old
        return False


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """The torch device to run on.

    Args:
        requested: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:1"`` ... or a ``torch.device``.

    Raises:
        InputError: a name torch does not know, or CUDA asked for where there is none.
    """
    import torch

    if str(requested).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"unknown device {requested!r}; use auto, cpu or cuda (e.g. cuda:0)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} asked for but torch sees no CUDA GPU; use cpu")
    return dev


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cpu"
    return str(getattr(device, "type", device)).split(":", 1)[0].strip().lower()


def resolve_precision(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """Resolve a requested precision to what will run: ``"bf16"`` or ``"fp32"``.

    Args:
        requested: ``"auto"``, ``"fp32"`` (or ``float32``) or ``"bf16"`` (or ``bfloat16``),
            any case.
        device: the device the model runs on (``None``: the CPU). ``auto`` gives bf16 on a CPU
            with :func:`native_bf16` and on a CUDA GPU that supports bf16; fp32 elsewhere.

    Raises:
        InputError: an unknown precision name.
    """
    req = str(requested).strip().lower()
    if req in _ALIASES:
        return _ALIASES[req]
    if req != "auto":
        raise InputError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    kind = _device_type(device)
    if kind == "cpu":
        return "bf16" if native_bf16() else "fp32"
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def cpu_budget() -> int:
    """CPUs this process may use: the smallest of the CPU count, the affinity mask
    (``taskset``, batch schedulers) and a cgroup v2 CPU quota (containers), at least 1."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="ascii")
        quota, period = text.split()[:2]
        if quota != "max":
            counts.append(int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, min(counts))


def _procs_dir() -> Path:
    from medseg.models.weights import medseg_home

    return medseg_home() / "procs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sharing_processes() -> int:
    """Live medseg processes sharing this medseg home (``MEDSEG_HOME``) that let
    :func:`configure_threads` choose, this one included (registered on first call as
    ``procs/<pid>``, removed at exit; entries of dead processes are dropped)."""
    folder = _procs_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine = folder / str(os.getpid())
        if not mine.exists():
            mine.touch()
            atexit.register(mine.unlink, missing_ok=True)
        live = 0
        for entry in folder.iterdir():
            pid = int(entry.name) if entry.name.isdigit() else -1
            if pid == os.getpid() or (pid > 0 and _alive(pid)):
                live += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, live)
    except OSError:
        return 1


def default_threads() -> int:
    """The intra-op thread count used when none is asked for: :func:`cpu_budget` shared among
    the live medseg processes (:func:`sharing_processes`), at least 1, never more than torch's
    current setting (so it only ever lowers the count)."""
    import torch

    return max(1, min(torch.get_num_threads(), cpu_budget() // sharing_processes()))


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op CPU threads; returns the number in effect *before* the call.

    ``n`` wins; without it ``MEDSEG_THREADS`` (a count, or ``auto``: :func:`default_threads`,
    the CPUs this process may use — affinity, cgroup quota — shared among the medseg processes
    running on the machine, so several ``medseg segment`` runs or batch workers do not
    oversubscribe the cores: OpenMP threads spinning against each other made 4 runs on 2 cores
    8x slower each); with neither, torch's count is left as it is. ``auto`` is opt-in because a
    thread count that depends on other processes may move floating-point results by a rounding,
    and a rerun must give the same label map. Restore a previous value with
    ``configure_threads(old)``.

    Args:
        n: threads (``>= 1``) or ``None``.

    Raises:
        InputError: ``n`` or ``MEDSEG_THREADS`` is not a positive integer.
    """
    import torch

    old = torch.get_num_threads()
    source = "threads"
    if n is None:
        env = os.environ.get("MEDSEG_THREADS", "").strip()
        if not env:
            return old
        if env.lower() == "auto":
            torch.set_num_threads(default_threads())
            return old
        source, n = "MEDSEG_THREADS", env  # type: ignore[assignment]
    try:
        count = int(n)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(n).strip() != str(count):
        hint = " or auto" if source == "MEDSEG_THREADS" else ""
        raise InputError(f"{source} must be a positive integer{hint}, got {n!r}")
    torch.set_num_threads(count)
    return old


#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: Free heap memory glibc keeps instead of returning it to the system (1 GiB).
TRIM_THRESHOLD = 1 << 30
_ALLOCATOR_TUNED: bool | None = None


def tune_allocator() -> bool:
    """Keep large buffers in glibc's heap between encoder calls; once per process.

    glibc serves each big allocation with a fresh ``mmap`` and unmaps it on free, so every encoder
    call page-faults its activation buffers in again. ``mallopt(M_MMAP_MAX, 0)`` and a high
    ``M_TRIM_THRESHOLD`` (:data:`TRIM_THRESHOLD`) keep them mapped for reuse (the same as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``). Linux with glibc only; elsewhere, or with
    ``MEDSEG_MALLOC_TUNE=0``, nothing happens.

    Returns:
        True when the settings are in effect (now or from an earlier call).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if os.environ.get("MEDSEG_MALLOC_TUNE", "1").strip() == "0":
        return False
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def resolve_runtime(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """Resolve a requested encoder runtime to what will run: ``"torch"`` or ``"openvino"``.

    Args:
        requested: ``"auto"``, ``"torch"`` or ``"openvino"`` (any case).
        device: the model's device (``None``: the CPU); OpenVINO runs on the CPU only.

    ``"auto"`` gives :data:`AUTO_RUNTIME` when it is available on ``device``, else torch.

    Raises:
        InputError: an unknown name; ``"openvino"`` without the package (one line on how to
            install it) or on a non-CPU device.
    """
    from medseg.models.ov_encoder import INSTALL_HINT, openvino_available

    req = str(requested).strip().lower()
    if req not in RUNTIMES:
        raise InputError(f"unknown runtime {requested!r}; use one of {', '.join(RUNTIMES)}")
    kind = _device_type(device)
    if kind == "auto":
        kind = resolve_device("auto").type
    on_cpu = kind == "cpu"
    if req == "auto":
        if AUTO_RUNTIME == "openvino" and on_cpu and openvino_available():
            return "openvino"
        return "torch"
    if req == "openvino":
        if not openvino_available():
            raise InputError(f"runtime 'openvino' asked for but not installed; {INSTALL_HINT}")
        if not on_cpu:
            raise InputError(
                f"runtime 'openvino' runs on the CPU only, not {device!s}; use --device cpu "
                "or --runtime torch"
            )
    return req
