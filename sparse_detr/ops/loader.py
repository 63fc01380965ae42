"""Just-in-time build and loading of the compiled op kernels in ``csrc/``.

Each backend is compiled once with ``torch.utils.cpp_extension.load`` and ninja into a cache folder
whose name hashes everything the binary depends on (sources, flags, torch/CUDA/Python versions, CPU
and GPU architecture), so a later process only ``dlopen``s the cached library.

A library that is mapped into the process can kill it (a truncated file raises SIGBUS), so a cached one is
loaded only when its sha256 is the one recorded beside it at build time (one without a record, built by an
older version, is first tried in a child process); any other is rebuilt, with one warning, or the backend
reports why it is unavailable (the op then falls back to the ``pytorch`` reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_detr.ops import library as library_ops  # defines the op schema the kernels register into
from sparse_detr.utils.cache import user_cache_dir
from sparse_detr.utils.io import atomic_write_text, file_sha256
from sparse_detr.utils.progress import timed_step

logger = logging.getLogger(__name__)
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
COMPILED_BACKENDS = ("cpu", "cuda")
_SOURCES = {"cpu": ("ms_deform_attn_cpu.cpp",), "cuda": ("ms_deform_attn_cuda.cu",)}
_HEADERS = ("ms_deform_attn_checks.h", "ms_deform_attn_cpu_kernel.h")
_CPU_FLAGS = ("-O3", "-march=native", "-fopenmp")
_CPU_LDFLAGS = ("-fopenmp",)
_CUDA_FLAGS = ("-O3", "-lineinfo")
STAGING_PREFIX = ".build-"  # each build links in a private folder of the build directory, then moves the library in
_ABANDONED_AFTER_S = 24 * 3600  # no build takes a day: an older private folder is one a killed build left
_KERNEL_OP = f"{library_ops.NAMESPACE}::ms_deform_attn"
_KERNEL_NAMES = {"cpu": "C++ deformable-attention kernel", "cuda": "CUDA deformable-attention kernel"}
_BUILD_TIMES = {"cpu": "30 s", "cuda": "a minute or two"}  # on a few cores
# run in a child process: load library argv[1], exit 0 only if op argv[2] then has a kernel for dispatch key argv[3]
_CHILD_LOAD_CHECK = (
    "import sys, torch; torch.ops.load_library(sys.argv[1]); "
    "sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key(sys.argv[2], sys.argv[3]) else 1)"
)


class BackendUnavailableError(RuntimeError):
    """A compiled backend was requested but cannot be built or loaded here."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here and, when it cannot, why."""

    name: str
    available: bool
    reason: str = ""
    build_log: Path | None = None
    note: str = ""  # what happened to an available backend's cache, e.g. a damaged library that was rebuilt
    library: Path | None = None  # the compiled library, where users load it themselves (onnxruntime)


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


def cpu_identity() -> str:
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
        cpu_identity() if kind == "cpu" else _cuda_arch_list(),
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
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    torch_logger.addFilter(_no_cuda_runtime_warning)
    try:
        import torch.utils.cpp_extension
    finally:
        torch_logger.removeFilter(_no_cuda_runtime_warning)
    return torch.utils.cpp_extension


def _no_cuda_runtime_warning(record: logging.LogRecord) -> bool:
    """Drop torch's import-time "No CUDA runtime is found": it reads as an error while the CPU kernel builds,
    and a CUDA build never starts without a GPU (:func:`_cannot_run` says so instead)."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def _cannot_run(kind: str) -> str | None:
    """Why ``kind`` cannot run here at all, cached library or not."""
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    if not (CSRC_DIR / _SOURCES[kind][0]).is_file():
        return f"kernel sources not found in {CSRC_DIR} (install sparse-detr from a source checkout)"
    return None


def compiler() -> str:
    """The C++ compiler builds run: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def cannot_build(kind: str, build_dir: Path) -> str | None:
    """Why ``kind`` cannot be compiled into ``build_dir``: no compiler, or a cache folder that takes no files."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler: '{compiler()}' is not on PATH (install g++ or set CXX)"
    if kind == "cuda":
        cuda_home = _cpp_extension().CUDA_HOME
        if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").is_file():
            return "CUDA compiler nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=build_dir).close()
    except OSError as error:
        return (
            f"the kernel cache {cache_root()} cannot be written ({error.strerror or error}); "
            "set TORCH_EXTENSIONS_DIR to a writable folder"
        )
    return None


def _record_path(library: Path) -> Path:
    """The build record beside ``library``: its name, size and sha256 when it was built."""
    return library.with_suffix(".json")


def write_build_record(library: Path, sha256: str) -> None:
    record = {"library": library.name, "bytes": library.stat().st_size, "sha256": sha256, "torch": torch.__version__}
    atomic_write_text(_record_path(library), json.dumps(record, indent=1) + "\n")


def recorded_sha256(library: Path) -> str | None:
    """The sha256 recorded for ``library`` at build time; None without a readable record."""
    try:
        record = json.loads(_record_path(library).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("library") != library.name:
        return None
    sha256 = record.get("sha256")
    return sha256 if isinstance(sha256, str) else None


def _loads_in_child(kind: str, library: Path) -> bool:
    """Whether ``library`` loads and registers the ``kind`` kernel, tried in a child process that a damaged
    file can kill without harm to this one."""
    command = [sys.executable, "-c", _CHILD_LOAD_CHECK, str(library), _KERNEL_OP, kind.upper()]
    try:
        return subprocess.run(command, capture_output=True, timeout=600).returncode == 0
    except (OSError, ValueError, subprocess.SubprocessError):
        return False


def cached_library_damage(kind: str, library: Path) -> str | None:
    """Why the cached ``library`` must not be loaded (``"damaged (hash mismatch)"``), or None when it is the
    one built here: its sha256 is the one recorded beside it at build time.

    A library without a readable record (built by an older version) is first loaded in a child process; if
    that works its record is written (where the cache can be written) and it is trusted.
    """
    try:
        sha256 = file_sha256(library)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    recorded = recorded_sha256(library)
    if recorded is not None:
        return None if recorded == sha256 else "damaged (hash mismatch)"
    if not _loads_in_child(kind, library):
        return "damaged (it fails to load)"
    with contextlib.suppress(OSError):  # a read-only cache: trusted now, checked again by the next process
        write_build_record(library, sha256)
    return None


def remove_abandoned_builds(build_dir: Path) -> None:
    """Delete the private build folders that killed builds left behind."""
    for staging in build_dir.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if time.time() - staging.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(staging)


def _compile(kind: str, sources: list[str], staging: Path) -> Path:
    """Compile and load ``sources`` in ``staging``; returns the library, whose name carries a version
    suffix (``_v1``) when this process built the extension before."""
    load = _cpp_extension().load
    if kind == "cpu":
        flags = {"extra_cflags": list(_CPU_FLAGS), "extra_ldflags": list(_CPU_LDFLAGS)}
    else:
        flags = {"extra_cuda_cflags": list(_CUDA_FLAGS)}
    built = load(
        _library_name(kind), sources, build_directory=str(staging), is_python_module=False, verbose=False, **flags
    )
    return Path(built)


def compile_extension(kind: str, build_dir: Path) -> Path:
    """Compile one backend, load it, and place the library with its build record in ``build_dir``; returns
    the library path.

    The build links in a private folder inside ``build_dir`` and the library is moved in with one rename:
    another process never sees a half-written library, and ninja never takes a damaged one for up to date.

    Raises:
        BackendUnavailableError: the compiler failed (naming the build log), or ``build_dir`` cannot be written.
    """
    log_path = build_dir / "build.log"
    library = build_dir / f"{_library_name(kind)}.so"
    sources = [str(CSRC_DIR / source) for source in _SOURCES[kind]]
    start = time.perf_counter()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_builds(build_dir)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=build_dir))
    except OSError as error:
        raise BackendUnavailableError(f"cannot build in {build_dir} ({error.strerror or error})") from None
    try:
        built = _compile(kind, sources, staging)
        os.replace(built, library)
        write_build_record(library, file_sha256(library))
    except Exception as error:  # the compiler's output is in the message: keep it in the log
        atomic_write_text(log_path, f"{type(error).__name__}: {error}\n")
        raise BackendUnavailableError(f"building the '{kind}' kernels failed; see the build log {log_path}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(log_path, f"built in {time.perf_counter() - start:.1f} s from {', '.join(sources)}\n")
    return library


def _load(kind: str, library: Path) -> BackendStatus:
    """Load a verified cached library into this process."""
    build_log = library.parent / "build.log"
    try:
        torch.ops.load_library(str(library))
    except OSError as error:
        return BackendStatus(kind, False, f"loading {library} failed ({error}); delete {library.parent} to rebuild")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_KERNEL_OP, kind.upper()):
        return BackendStatus(kind, False, f"{library} has no '{kind}' kernel; delete {library.parent} to rebuild")
    logger.debug(f"loaded the {kind.upper()} kernel of deformable attention from {library}")
    return BackendStatus(kind, True, build_log=build_log)


def _load_or_build(kind: str) -> BackendStatus:
    """Load the cached ``kind`` library when it is verified, else build it (a damaged one with a warning)."""
    reason = _cannot_run(kind)
    if reason is not None:
        return BackendStatus(kind, False, reason)
    build_dir = build_directory(kind)
    library = build_dir / f"{_library_name(kind)}.so"
    damage = cached_library_damage(kind, library) if library.exists() else None
    if library.exists() and damage is None:
        return _load(kind, library)
    found = f"the cached library {library} is {damage}" if damage else ""
    reason = cannot_build(kind, build_dir)
    if reason is not None:
        return BackendStatus(kind, False, f"{found} and cannot be rebuilt: {reason}" if damage else reason)
    if damage:
        warnings.warn(f"sparse_detr: {found}; rebuilding it", RuntimeWarning, stacklevel=3)
    try:
        with timed_step(_build_line(kind, build_dir), f"built the {_KERNEL_NAMES[kind]}", logger):
            compile_extension(kind, build_dir)
    except (BackendUnavailableError, OSError) as error:  # OSError: the build log cannot be written
        return BackendStatus(kind, False, f"{found} and {error}" if damage else str(error), build_dir / "build.log")
    note = f"cached library {damage}: rebuilt" if damage else ""
    return BackendStatus(kind, True, build_log=build_dir / "build.log", note=note)


def _build_line(kind: str, build_dir: Path) -> str:
    """The status line before a kernel build: what is built, that it happens once, where it goes, how long."""
    return (
        f"building the {_KERNEL_NAMES[kind]} (once per machine and torch version; cached in {build_dir}; "
        f"about {_BUILD_TIMES[kind]})…"
    )


def load_backend(kind: str) -> BackendStatus:
    """Load (building on first use) the compiled ``kind`` backend; never raises, reports status."""
    if kind not in _loaded:
        _loaded[kind] = _load_or_build(kind)
        if not _loaded[kind].available:
            logger.debug(f"the '{kind}' kernel is unavailable: {_loaded[kind].reason}")
    return _loaded[kind]
