"""Just-in-time build and loading of the compiled op kernels in ``csrc/``.

Each backend is compiled once with ``torch.utils.cpp_extension.load`` and ninja into a cache folder
whose name hashes everything the binary depends on (sources, flags, torch/CUDA/Python versions, CPU
and GPU architecture), so a later process only ``dlopen``s the cached library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_detr.ops import library  # noqa: F401  (defines the op schema the kernels register into)
from sparse_detr.utils.cache import user_cache_dir

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
COMPILED_BACKENDS = ("cpu", "cuda")
_SOURCES = {"cpu": ("ms_deform_attn_cpu.cpp",), "cuda": ("ms_deform_attn_cuda.cu",)}
_HEADERS = ("ms_deform_attn_checks.h",)
_CPU_FLAGS = ("-O3", "-march=native", "-fopenmp")
_CPU_LDFLAGS = ("-fopenmp",)
_CUDA_FLAGS = ("-O3", "-lineinfo")


class BackendUnavailableError(RuntimeError):
    """A compiled backend was requested but cannot be built or loaded here."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here and, when it cannot, why."""

    name: str
    available: bool
    reason: str = ""
    build_log: Path | None = None


_loaded: dict[str, BackendStatus] = {}


def cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR/sparse_detr`` if set, else ``<user cache>/torch_extensions``
    (``~/.cache/sparse_detr/torch_extensions``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "sparse_detr"
    return user_cache_dir() / "torch_extensions"


def _cuda_arch_list() -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return arch
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return ""


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted)))


def build_directory(kind: str) -> Path:
    """The cache folder of one backend's build, unique to everything its binary depends on."""
    digest = hashlib.sha256()
    for part in (
        kind,
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        platform.machine(),
        os.environ.get("CXX", ""),
        " ".join(_CPU_FLAGS + _CPU_LDFLAGS if kind == "cpu" else _CUDA_FLAGS),
        _cpu_identity() if kind == "cpu" else _cuda_arch_list(),
    ):
        digest.update(part.encode())
    for source in _SOURCES[kind] + _HEADERS:
        digest.update((CSRC_DIR / source).read_bytes())
    tag = f"torch{torch.__version__.split('+')[0]}"
    return cache_root() / f"{kind}-{tag}-{digest.hexdigest()[:16]}"


def _library_name(kind: str) -> str:
    return f"sparse_detr_msda_{kind}"


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported with ``CUDA_HOME`` defaulting to ``/usr/local/cuda``.

    torch reads ``CUDA_HOME`` once, at import, and otherwise guesses it from the ``nvcc`` on PATH,
    which is wrong when that is a wrapper script (``/usr/local/bin/nvcc`` gives ``/usr/local``).
    """
    default = Path("/usr/local/cuda")
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and (default / "bin" / "nvcc").is_file():
        os.environ["CUDA_HOME"] = str(default)
    import torch.utils.cpp_extension

    return torch.utils.cpp_extension


def _missing_toolchain(kind: str) -> str | None:
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    if not (CSRC_DIR / _SOURCES[kind][0]).is_file():
        return f"kernel sources not found in {CSRC_DIR} (install sparse-detr from a source checkout)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: '{compiler}' is not on PATH (install g++ or set CXX)"
    if kind == "cuda":
        cuda_home = _cpp_extension().CUDA_HOME
        if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").is_file():
            return "CUDA compiler nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def compile_extension(kind: str, build_dir: Path) -> Path:
    """Compile one backend into ``build_dir`` and load it; returns the library path.

    Raises ``BackendUnavailableError`` naming the build log when the compiler fails.
    """
    load = _cpp_extension().load
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build.log"
    sources = [str(CSRC_DIR / source) for source in _SOURCES[kind]]
    start = time.perf_counter()
    try:
        if kind == "cpu":
            load(
                _library_name(kind), sources, extra_cflags=list(_CPU_FLAGS),
                extra_ldflags=list(_CPU_LDFLAGS), build_directory=str(build_dir),
                is_python_module=False, verbose=False,
            )
        else:
            load(
                _library_name(kind), sources, extra_cuda_cflags=list(_CUDA_FLAGS),
                build_directory=str(build_dir), is_python_module=False, verbose=False,
            )
    except Exception as error:  # the compiler's output is in the message: keep it in the log
        log_path.write_text(f"{type(error).__name__}: {error}\n")
        raise BackendUnavailableError(
            f"building the '{kind}' kernels failed; see the build log {log_path}"
        ) from error
    log_path.write_text(f"built in {time.perf_counter() - start:.1f} s from {', '.join(sources)}\n")
    return build_dir / f"{_library_name(kind)}.so"


def load_backend(kind: str) -> BackendStatus:
    """Load (building on first use) the compiled ``kind`` backend; never raises, reports status."""
    if kind in _loaded:
        return _loaded[kind]
    reason = _missing_toolchain(kind)
    if reason is not None:
        status = BackendStatus(kind, False, reason)
    else:
        build_dir = build_directory(kind)
        library_path = build_dir / f"{_library_name(kind)}.so"
        try:
            if library_path.is_file():
                torch.ops.load_library(str(library_path))
            else:
                compile_extension(kind, build_dir)
            status = BackendStatus(kind, True, build_log=build_dir / "build.log")
        except BackendUnavailableError as error:
            status = BackendStatus(kind, False, str(error), build_dir / "build.log")
        except OSError as error:
            status = BackendStatus(
                kind, False, f"loading {library_path} failed ({error}); delete {build_dir} to rebuild"
            )
    _loaded[kind] = status
    return status
