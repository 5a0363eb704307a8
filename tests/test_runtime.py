"""medseg.runtime: the one rule for device, precision (native bf16) and threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg import runtime
from medseg.errors import InputError, MedsegError

torch = pytest.importorskip("torch")


def _cpuinfo_flags() -> set[str]:
    """The flags line of /proc/cpuinfo, parsed here independently of medseg."""
    p = Path("/proc/cpuinfo")
    if not p.exists():
        return set()
    for line in p.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture
def no_bf16_env(monkeypatch: pytest.MonkeyPatch):
    """Detection from the hardware: MEDSEG_BF16 unset, caches cleared before and after."""
    monkeypatch.delenv("MEDSEG_BF16", raising=False)
    runtime.native_bf16.cache_clear()
    yield
    runtime.native_bf16.cache_clear()


def test_import_does_not_load_torch() -> None:
    code = "import sys, medseg.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_flags_and_native_bf16_match_cpuinfo(no_bf16_env: None) -> None:
    flags = _cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert runtime.cpu_flags() == frozenset(flags)
    assert runtime.native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_auto_is_bf16_on_a_cpu_with_native_bf16(no_bf16_env: None) -> None:
    """Issue 16: ``auto`` forced to fp32 on an AMX/AVX512-BF16 CPU must fail here."""
    flags = _cpuinfo_flags()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    assert runtime.resolve_precision("auto") == "bf16"
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    assert runtime.resolve_precision("AUTO", torch.device("cpu")) == "bf16"


def test_auto_is_fp32_on_a_cpu_without_native_bf16(no_bf16_env: None) -> None:
    if _cpuinfo_flags() & {"avx512_bf16", "amx_bf16"} or not _cpuinfo_flags():
        pytest.skip("this CPU has native bf16 (or no /proc/cpuinfo)")
    assert runtime.resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("env, expected", [("1", "bf16"), ("0", "fp32")])
def test_env_override_and_explicit_requests(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: str
) -> None:
    monkeypatch.setenv("MEDSEG_BF16", env)
    runtime.native_bf16.cache_clear()
    try:
        assert runtime.native_bf16() is (env == "1")
        assert runtime.resolve_precision("auto", "cpu") == expected
        # explicit requests are honoured whatever the hardware
        for name, want in (("fp32", "fp32"), ("float32", "fp32"), ("BF16", "bf16")):
            assert runtime.resolve_precision(name, "cpu") == want
        assert runtime.resolve_precision("bfloat16", "cuda") == "bf16"
    finally:
        runtime.native_bf16.cache_clear()


def test_unknown_precision_is_a_medseg_error() -> None:
    with pytest.raises(InputError, match=r"unknown precision 'fp16'; use one of auto, fp32, bf16"):
        runtime.resolve_precision("fp16")
    assert issubclass(InputError, MedsegError)


def test_auto_on_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_BF16", "1")
    runtime.native_bf16.cache_clear()
    try:
        for supported, want in ((True, "bf16"), (False, "fp32")):
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
            assert runtime.resolve_precision("auto", "cuda:0") == want
            assert runtime.resolve_precision("auto", torch.device("cuda", 0)) == want
        assert runtime.resolve_precision("auto", "mps") == "fp32"  # no native-bf16 rule there
    finally:
        runtime.native_bf16.cache_clear()


def test_resolve_device() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device() == torch.device(want)
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        runtime.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    start = torch.get_num_threads()
    try:
        monkeypatch.delenv("MEDSEG_THREADS", raising=False)
        assert runtime.configure_threads() == start  # nothing asked: unchanged
        assert torch.get_num_threads() == start
        assert runtime.configure_threads(1) == start
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("MEDSEG_THREADS", "2")
        assert runtime.configure_threads() == 1
        assert torch.get_num_threads() == 2
        assert runtime.configure_threads(1) == 2  # an explicit count wins over the variable
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("MEDSEG_THREADS", "many")
        with pytest.raises(InputError, match="MEDSEG_THREADS must be a positive integer"):
            runtime.configure_threads()
        with pytest.raises(InputError, match="threads must be a positive integer, got 0"):
            runtime.configure_threads(0)
        assert torch.get_num_threads() == 1  # a refused value changes nothing
    finally:
        torch.set_num_threads(start)


def test_engines_use_the_runtime_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SAM loader, the accelerated forwards and the U-Net share runtime's functions."""
    from medseg.models import accelerated, sam

    assert sam.resolve_precision is runtime.resolve_precision
    assert sam.resolve_device is runtime.resolve_device
    for old in ("cpu_has_native_bf16",):
        assert not hasattr(sam, old)
    for old in ("cpu_flags", "native_bf16", "precision_for"):
        assert not hasattr(accelerated, old)
    pytest.importorskip("monai")
    from medseg.predict.unet import UNetSegmenter

    for env, want in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv("MEDSEG_BF16", env)
        runtime.native_bf16.cache_clear()
        try:
            seg = UNetSegmenter.load("unet-demo", precision="auto", device="cpu")
            assert (seg.precision, seg.device) == (want, "cpu")
        finally:
            runtime.native_bf16.cache_clear()
    with pytest.raises(InputError, match="unknown precision"):
        UNetSegmenter.load("unet-demo", precision="half")


def test_cpu_budget_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    code = (
        "import os; from medseg.runtime import cpu_budget; "
        "print(cpu_budget()); os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "print(cpu_budget())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    full, pinned = (int(v) for v in out.stdout.split())
    assert full == runtime.cpu_budget() <= len(os.sched_getaffinity(0))
    assert pinned == 1


def test_default_threads_are_shared_among_live_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSEG_THREADS", "auto")
    start = torch.get_num_threads()
    procs = tmp_path / "procs"
    assert runtime.sharing_processes() == 1  # this process registers itself
    assert (procs / str(os.getpid())).exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (procs / dead.stdout.strip()).touch()  # a finished process: dropped
    (procs / "notapid").touch()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (procs / str(sleeper.pid)).touch()
        assert runtime.sharing_processes() == 2
        assert sorted(p.name for p in procs.iterdir()) == sorted(
            [str(os.getpid()), str(sleeper.pid)]
        )
        want = max(1, min(start, runtime.cpu_budget() // 2))
        assert runtime.default_threads() == want
        assert runtime.configure_threads() == start
        assert torch.get_num_threads() == want
    finally:
        sleeper.kill()
        sleeper.wait()
        torch.set_num_threads(start)
    assert runtime.sharing_processes() == 1  # the sleeper is gone
    assert runtime.default_threads() == min(start, runtime.cpu_budget())


_MALLINFO_CHILD = r"""
import ctypes, json, sys
from medseg.runtime import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_allocator()
again = tune_allocator()
before = libc.mallinfo2().hblkhd
buf = ctypes.create_string_buffer(64 << 20)  # one 64 MiB malloc
print(json.dumps({"tuned": tuned, "again": again, "mmapped": libc.mallinfo2().hblkhd - before}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
    reason="glibc only",
)
@pytest.mark.parametrize("switch", ["1", "0"])
def test_tune_allocator_keeps_large_buffers_in_the_heap(switch: str) -> None:
    import json

    env = {**os.environ, "MEDSEG_MALLOC_TUNE": switch}
    out = subprocess.run(
        [sys.executable, "-c", _MALLINFO_CHILD], env=env, capture_output=True, text=True
    )
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    if switch == "1":  # tuned: the 64 MiB block comes from the heap, not its own mmap
        assert info == {"tuned": True, "again": True, "mmapped": 0}
    else:  # glibc default: a block that large is mmapped on its own
        assert info["tuned"] is False and info["again"] is False
        assert info["mmapped"] >= 64 << 20
