"""Whether a CPU computes in bfloat16 natively, for the bundle's ``cpu_bf16`` option.

On CPUs with native bfloat16 arithmetic (AVX-512 BF16 or AMX: Intel Xeon from Cooper Lake and
Sapphire Rapids, AMD Zen 4 and later) oneDNN convolves in bfloat16 faster than in float32;
elsewhere bfloat16 is emulated and slower. ``cpu_bf16`` is off by default, since it moves
P(COVID-19) by a few hundredths (``benchmarks/bench_precision.py``, README "Speed"); asked for
on a CPU without native bfloat16 it warns.
"""

from __future__ import annotations

import torch

__all__ = ["cpu_has_native_bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX BF16), as torch reports it."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # torch older than 2.9
        return False
    capabilities = get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
