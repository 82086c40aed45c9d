"""Which reduced precision a machine runs fast: the bundle's default for ``cpu_bf16``.

On CPUs with native bfloat16 arithmetic (AVX-512 BF16 or AMX, Intel Xeon from Cooper Lake and
Sapphire Rapids, AMD Zen 4 and later) oneDNN convolves in bfloat16 at about twice the float32
rate; elsewhere bfloat16 is emulated and slower than float32. The bundle turns CPU autocast on
where it is native (``benchmarks/bench_profile.py`` measures both, README "Speed").
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
