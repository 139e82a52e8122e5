"""The ISA checks: which flags mean what, and the flags as /proc/cpuinfo lists them."""

from __future__ import annotations

import pytest

from onnxpress import cpu


@pytest.mark.parametrize("flags, int8_dots, bf16", [
    ({"avx2", "fma"}, False, False),  # AVX2-only: vpmaddubsw, emulated bfloat16
    ({"avx2", "avx512f", "avx512_vnni"}, True, False),
    ({"avx2", "avx_vnni"}, True, False),
    ({"avx512f", "avx512_vnni", "avx512_bf16"}, True, True),  # e.g. Zen 4
    ({"avx512f", "amx_int8", "amx_bf16"}, True, True),  # Sapphire Rapids and later
])
def test_isa_checks_follow_the_flags(monkeypatch, flags, int8_dots, bf16):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert cpu.has_int8_dot_products() is int8_dots
    assert cpu.has_bfloat16_matmul() is bf16


def test_flags_come_from_cpuinfo_when_linux_has_one():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    line = next(line for line in text.splitlines() if line.startswith("flags"))
    assert cpu.cpu_flags() == frozenset(line.split(":", 1)[1].split())
