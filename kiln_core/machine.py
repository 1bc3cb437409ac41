"""What machine a figure was measured on: CPU model, the instruction-set flags that change
quantized kernels (AVX2, AVX-512, VNNI), cores. Recorded with every gate and benchmark figure,
because onnxruntime picks its int8 / 4-bit kernels by these flags.

Imports nothing of kiln's (ground floor).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# flags that select different MLAS kernels (or change their numerics)
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")


@lru_cache(maxsize=1)
def machine_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count() or 1,
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
    }


def flags_line() -> str:
    """One line for a table caption: 'AMD EPYC ..., 2 cores, avx2 fma f16c (no VNNI)'."""
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, {' '.join(m['flags']) or 'no AVX2'}{'' if m['vnni'] else ' (no VNNI)'}"
