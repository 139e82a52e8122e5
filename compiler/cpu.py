"""What this CPU computes natively, read from ``/proc/cpuinfo`` (Linux; elsewhere nothing is
known, and the callers take their safe choice)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot_products() -> bool:
    """VNNI (AVX-512, AVX or AMX): int8 products summed without the saturating 16-bit step."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_bfloat16_matmul() -> bool:
    """bfloat16 dot products in hardware (AMX or AVX-512 BF16); elsewhere they are emulated, slower than float32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
