"""The CUDA kernels compile (and register) wherever nvcc is installed, GPU or not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


@pytest.mark.slow
@pytest.mark.cuda_build
@pytest.mark.skipif(not (CUDA_HOME / "bin" / "nvcc").is_file(), reason=f"nvcc not found under {CUDA_HOME}")
def test_cuda_kernels_compile_and_register(tmp_path):
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        import torch
        from sparse_detr.ops import loader
        library = loader.compile_extension("cuda", Path({str(tmp_path)!r}))
        assert library.is_file(), library
        for op in ("ms_deform_attn", "ms_deform_attn_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_detr::{{op}}", "CUDA"), op
        print("ok", library)
        """
    )
    env = {**os.environ, "CUDA_HOME": str(CUDA_HOME), "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200
    )
    log = tmp_path / "build.log"
    details = log.read_text()[-4000:] if log.is_file() else result.stderr[-4000:]
    assert result.returncode == 0, details
    assert result.stdout.startswith("ok")
