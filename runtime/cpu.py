"""Whether this CPU computes ONNX Runtime's dynamic INT8 products exactly for full-range (8-bit) weights.

ONNX Runtime's ``MatMulInteger`` multiplies uint8 activations by int8 weights. On x86-64 with int8 dot-product
instructions (VNNI: AVX512-VNNI or AVX-VNNI) the products are summed in 32 bits, exact. Without them (AVX2, or
AVX-512 before Cascade Lake / Zen 4) the kernel uses ``VPMADDUBSW``, which adds pairs of products into a
*saturating* 16-bit lane: 255 x 127 x 2 = 64,770 overflows 32,767, so a file with full-range weights computes
something else there (ViT-S/14 on NEU-DET: mean cosine to fp32 0.9987, lowest 0.94, where the exact arithmetic of
the same file gives 0.9996 and 0.996; BENCHMARKS.md ``int8_weights``). 7-bit weights (-64..64: 255 x 64 x 2 =
32,640) never saturate, on any CPU. ARM64 is exact either way: with dot-product instructions (every Jetson since
Xavier) the products are summed in 32 bits, and the plain NEON kernel's 16-bit pair sums of signed products
overflow only at -128 x -128, which symmetric weights (|w| <= 127) never reach. ``exporter.int8_cpu`` makes either
file; ``runtime.runners`` checks here.

Python 3.8+, standard library only (the edge agent runs it on Jetson and on x86 boxes).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

CPUINFO = Path("/proc/cpuinfo")


def int8_saturates(machine: Optional[str] = None, cpuinfo: Optional[str] = None) -> Optional[bool]:
    """True when ONNX Runtime's u8 x s8 products saturate on this CPU (x86-64 without VNNI), False when they are
    exact (x86-64 with VNNI, or not x86), None when it cannot tell (an x86 system without ``/proc/cpuinfo``).
    ``machine`` / ``cpuinfo``: ``platform.machine()`` and the text of ``/proc/cpuinfo`` (tests pass their own)."""
    arch = (machine if machine is not None else platform.machine()).lower()
    if arch not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.split(":", 1)[0].strip() == "flags"), None)
    if flags is None:
        return None
    return not any(f in ("avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni") for f in flags)
