"""What a GPU kernel needs, asked in one place: CUDA, a compute capability, triton.

Requirement checks (`engine.attention` backends, quantized linears) return None when a kernel can
run on a device and otherwise the reason, which start-up errors show to the user.
"""
from __future__ import annotations

import functools

import torch


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device or when CUDA is not available."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@functools.cache
def triton_problem() -> str | None:
    """None if triton imports here, else why not (asked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e})"
    return None


def gpu_requirement(device: torch.device, min_capability: tuple[int, int], what: str,
                    needs_triton: bool = True) -> str | None:
    """None if `device` is a CUDA GPU of at least `min_capability` (and triton imports, when
    `needs_triton`), else the reason; `what` says what needs it (e.g. "8-bit tensor cores")."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, got device {str(device)!r}"
    cap = cuda_capability(device)
    if cap is None:
        return "needs a CUDA GPU, but torch.cuda.is_available() is False"
    if cap < min_capability:
        return (f"needs compute capability >= {min_capability[0]}.{min_capability[1]} ({what}), "
                f"this GPU has {cap[0]}.{cap[1]}")
    if needs_triton and triton_problem() is not None:
        return f"needs triton: {triton_problem()}"
    return None


def use_triton_kernel(x: torch.Tensor) -> bool:
    """Whether an eager fast path should run its Triton kernel on `x`: a CUDA bf16/fp16 tensor,
    not under torch.compile (Inductor fuses the torch version itself), triton importable."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling():
        return False
    return triton_problem() is None
