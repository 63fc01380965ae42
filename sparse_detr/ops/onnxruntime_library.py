"""The onnxruntime custom-op library of deformable attention (``csrc/ms_deform_attn_onnxruntime.cpp``): the
torch op's CPU kernel behind onnxruntime's custom-op ABI, for files exported with ``--msda custom`` (and,
for checking them on a CPU, ``--msda tensorrt``).

It is compiled once with the C++ compiler (no torch, no onnxruntime headers: the library declares the
part of the ABI it uses) into the kernel cache beside the torch extensions, in a folder named after a hash
of its sources, flags and CPU, and loaded only when its sha256 is the one recorded at build time. For plain
onnxruntime::

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(str(sparse_detr.ops.onnxruntime_library.library_path()))
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sparse_detr.ops.loader import (
    CSRC_DIR,
    STAGING_PREFIX,
    BackendUnavailableError,
    cache_root,
    cannot_build,
    compiler,
    cpu_identity,
    recorded_sha256,
    remove_abandoned_builds,
    write_build_record,
)
from sparse_detr.utils.io import atomic_write_text, file_sha256
from sparse_detr.utils.progress import timed_step

logger = logging.getLogger(__name__)
SOURCE = "ms_deform_attn_onnxruntime.cpp"
HEADERS = ("ms_deform_attn_cpu_kernel.h", "onnxruntime_abi.h")
LIBRARY_NAME = "libsparse_detr_onnxruntime.so"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden")
_built: dict[Path, Path] = {}


def build_directory() -> Path:
    """The cache folder of the library, unique to its sources, flags, compiler and CPU."""
    digest = hashlib.sha256()
    for part in ("onnxruntime", compiler(), " ".join(FLAGS), cpu_identity()):
        digest.update(part.encode())
    for name in (SOURCE, *HEADERS):
        digest.update((CSRC_DIR / name).read_bytes())
    return cache_root() / f"onnxruntime-{digest.hexdigest()[:16]}"


def _compile(build_dir: Path, library: Path) -> None:
    """Compile in a private folder of ``build_dir`` and move the library in with one rename, then record its
    sha256, as the torch extensions are built (:func:`sparse_detr.ops.loader.compile_extension`)."""
    reason = cannot_build("cpu", build_dir)
    if reason is not None:
        raise BackendUnavailableError(reason)
    remove_abandoned_builds(build_dir)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=build_dir))
    log = build_dir / "build.log"
    try:
        built = staging / LIBRARY_NAME
        command = [compiler(), *FLAGS, str(CSRC_DIR / SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        atomic_write_text(log, f"{' '.join(command)}\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            raise BackendUnavailableError(f"building the onnxruntime custom-op library failed; see the build log {log}")
        os.replace(built, library)
        write_build_record(library, file_sha256(library))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def library_path() -> Path:
    """The custom-op library for onnxruntime, built on first use (a few seconds) and cached.

    Raises:
        BackendUnavailableError: no compiler, an unwritable cache, or a failed build (naming its log).
    """
    build_dir = build_directory()
    if build_dir in _built:
        return _built[build_dir]
    if not (CSRC_DIR / SOURCE).is_file():
        raise BackendUnavailableError(
            f"kernel sources not found in {CSRC_DIR} (install sparse-detr from a source checkout)"
        )
    library = build_dir / LIBRARY_NAME
    if not (library.is_file() and recorded_sha256(library) == file_sha256(library)):
        building = (
            f"building the onnxruntime custom-op library (once per machine; cached in {build_dir}; a few seconds)…"
        )
        with timed_step(building, "built the onnxruntime custom-op library", logger):
            _compile(build_dir, library)
    _built[build_dir] = library
    return library
