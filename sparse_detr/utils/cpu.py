"""What CPU this is, as a benchmark report names it: the model and the vector/matrix extensions that decide
how fast float32 and bfloat16 inference can run (``lscpu``'s model name and flags)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# flag in /proc/cpuinfo -> how reports name it, in the order they are listed
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_tile": "AMX-TILE",
}


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``model name`` and ``flags`` lines of /proc/cpuinfo (empty off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """``lscpu``'s model name (``Intel(R) Xeon(R) Processor``), else what the platform says."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The extensions of :data:`ISA_FLAGS` this CPU has (``["AVX2", "AVX-512", "AVX512-BF16", "AMX-BF16",
    "AMX-TILE"]`` on a Xeon with AMX)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def cpu_description() -> str:
    """Model and extensions in one line: ``Intel(R) Xeon(R) Processor (AVX2, AVX-512, AMX-BF16, ...)``."""
    isa = cpu_isa()
    return f"{cpu_model()} ({', '.join(isa) if isa else 'no AVX2/AVX-512/AMX'})"


def bf16_hardware() -> str | None:
    """How this CPU multiplies bfloat16 matrices natively: ``"AMX"`` (Intel Xeon from Sapphire Rapids on),
    ``"AVX512-BF16"`` (AMD EPYC/Ryzen from Zen 4 on, Intel Cooper Lake), or None (oneDNN converts bfloat16 to
    float32 first: ``--amp bf16`` is then slower than float32)."""
    isa = cpu_isa()
    return "AMX" if "AMX-BF16" in isa else "AVX512-BF16" if "AVX512-BF16" in isa else None


def bf16_note() -> str:
    """One line on what ``--amp bf16`` gets on this CPU, for benchmark reports and warnings."""
    hardware = bf16_hardware()
    if hardware == "AMX":
        return "bf16 on this CPU: AMX tiles (the fastest CPU path, about 2-4x float32 in the backbone)"
    if hardware == "AVX512-BF16":
        return "bf16 on this CPU: AVX512-BF16 dot products (AMD Zen 4 and later; about 2x float32 peak)"
    return "bf16 on this CPU: no AMX or AVX512-BF16, so bfloat16 is emulated and slower than float32"
