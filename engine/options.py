"""Engine options: fixed at start-up, never mutated by a request."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "fp8", "int8"]
Offload = Literal["none", "model", "block", "expert"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the DiT worker group: world size = cfg * ulysses."""

    cfg: int = 1
    """CFG-parallel degree: 1 or 2 (conditional / unconditional branch on different ranks)."""
    ulysses: int = 1
    """Ulysses sequence-parallel degree (>= 1); heads must divide by it."""

    def __post_init__(self) -> None:
        if isinstance(self.cfg, bool) or self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg must be 1 or 2, got {self.cfg!r}")
        if isinstance(self.ulysses, bool) or not isinstance(self.ulysses, int) or self.ulysses < 1:
            raise ValueError(f"parallel.ulysses must be an integer >= 1, got {self.ulysses!r}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses


@dataclass(frozen=True)
class EngineOptions:
    """Everything about *how* a model runs. Frozen: a request never changes it."""

    device: str = "cpu"
    """Torch device string: "cpu", "cuda", "cuda:1", ..."""
    dtype: DType = "float32"
    """Compute dtype of every component: DiT (its norms, modulation and time embedder stay float32),
    VAE, text and image encoders (umT5 runs "float16" as bfloat16: it overflows in float16).
    "float32" on CPU is the parity setting."""
    attention: str = "sdpa"
    """Attention backend, a name in engine.attention's registry."""
    quantization: Quantization = "none"
    """DiT linear-layer quantization."""
    offload: Offload = "none"
    """CPU offload of the DiT (engine/offload.py): "model" = weights in pinned CPU memory, copied
    to the GPU once per request; "block" = non-block weights on the GPU, blocks streamed through
    two GPU slots with prefetch; "expert" = a model with several experts (Wan2.2 A14B) keeps the
    idle expert in pinned CPU memory and swaps at the phase boundary (allowed with parallel ranks).
    A logged no-op on the CPU; "model"/"block" refused with parallel world size > 1, "block" with
    compile=True."""
    vae_tiling: bool = False
    """Decode the VAE in spatial tiles to bound memory."""
    compile: bool = False
    """torch.compile the DiT blocks."""
    cfg_batch: bool = False
    """Run classifier-free guidance's two branches as one batch-2 DiT forward instead of two
    batch-1 forwards (engine/guidance.py: no faster at the real sizes on an H200, and twice the
    activation memory; it can pay for small models)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device string such as cpu, cuda, cuda:1; "
                             f"got {self.device!r}") from None
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.quantization not in get_args(Quantization):
            raise ValueError(f"quantization must be one of {', '.join(get_args(Quantization))}; "
                             f"got {self.quantization!r}")
        if self.offload not in get_args(Offload):
            raise ValueError(f"offload must be one of {', '.join(get_args(Offload))}; got {self.offload!r}")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(f"attention must be an attention backend name (e.g. 'sdpa'), got {self.attention!r}")
        for name in ("vae_tiling", "compile", "cfg_batch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.parallel, ParallelConfig):
            raise ValueError(f"parallel must be a ParallelConfig, got {type(self.parallel).__name__}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def with_(self, **changes) -> "EngineOptions":
        """A copy with some fields changed (the original stays as it was)."""
        return replace(self, **changes)
