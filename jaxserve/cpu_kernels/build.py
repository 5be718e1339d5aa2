"""Compile a kernel's C++ source once per machine, cache the library, register its FFI targets.

The source is built with the system C++ compiler (`CXX`, else g++, else c++) for this CPU
(-march=native) and cached under a key of the source, the flags, the compiler's version, the
XLA FFI headers and the CPU's flags, as Triton and torch's cpp_extension do; later processes
load the cached library without compiling. A failed build raises KernelBuildError with the
compiler's message: callers decide (and log) what to use instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-mprefer-vector-width=512", "-fPIC", "-shared", "-std=c++17", "-pthread",
         "-fno-math-errno")
DEFAULT_CACHE = Path(os.path.expanduser("~/.cache/jaxserve/cpu_kernels"))
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_registered: set[str] = set()


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded on this machine."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")


def _cpu_flags_line() -> str:
    """The first `flags` line of /proc/cpuinfo ("" where there is none: not Linux, or not x86)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cpu_has(*flags: str) -> bool:
    """Whether the CPU advertises every one of `flags` (Linux /proc/cpuinfo names)."""
    have = set(_cpu_flags_line().partition(":")[2].split())
    return all(flag in have for flag in flags)


def _cpu_signature() -> str:
    return _cpu_flags_line() or os.uname().machine


def _build_key(source: bytes, cxx: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(source)
    for part in (" ".join(flags), version, jax.ffi.include_dir(), jax.__version__,
                 _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:20]


def load_library(source: Path, cache_dir: Path = DEFAULT_CACHE,
                 extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled library of one .cc file (built now unless cached). extra_flags are appended
    to FLAGS (tests build the portable paths with "-mno-avx512f")."""
    flags = (*FLAGS, *extra_flags)
    name = f"{source}{' '.join(extra_flags)}"
    with _lock:
        if name in _loaded:
            return _loaded[name]
        cxx = _compiler()
        # the source and the headers beside it
        text = b"".join(f.read_bytes() for f in [source, *sorted(source.parent.glob("*.h"))])
        lib_path = cache_dir / f"{source.stem}-{_build_key(text, cxx, flags)}.so"
        if not lib_path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
            os.close(fd)
            cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
            logger.info("compiling CPU kernel %s", source.name)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                os.unlink(tmp)
                raise KernelBuildError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, lib_path)  # atomic: concurrent builders agree on one file
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError as e:
            raise KernelBuildError(f"loading {lib_path} failed: {e}") from e
        _loaded[name] = lib
        return lib


def register(source: Path, symbol: str, target: str, cache_dir: Path = DEFAULT_CACHE,
             extra_flags: tuple[str, ...] = ()) -> None:
    """Build/load `source` and register its handler `symbol` as the CPU FFI target `target`."""
    if target in _registered:
        return
    lib = load_library(source, cache_dir, extra_flags)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _registered.add(target)
