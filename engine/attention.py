"""Attention backends: a registry of `(q, k, v) -> out` functions on (B, L, H, D) tensors.

A model never calls an attention kernel directly: it calls an `AttentionCore` module, which holds
one `AttentionBackend` picked from this registry. Other parts of the engine change attention from
outside:

- `set_attention_backend(model, "name")` swaps the backend of every `AttentionCore` in a model
  (kernels and quantized attention register their own backends here);
- sequence parallelism swaps a whole `AttentionCore` module for a version that does all-to-all
  around an inner core.

A backend's requirement is checked when it is *selected* (`get_backend`), and its head sizes
against the model's (`check_head_dim`, called by the loaders), so a backend that cannot run fails
at start-up with the reason, never mid-request.

"sdpa" (`torch.nn.functional.scaled_dot_product_attention`, which picks flash / memory-efficient /
math kernels itself) is registered here and is the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""q (B, Lq, H, D), k (B, Lk, H, D), v (B, Lk, H, D) -> out (B, Lq, H, D); no mask, not causal,
softmax scale 1 / sqrt(D)."""

Requirement = Callable[[torch.device], "str | None"]
"""Returns None when the backend can run on the device, else the reason it cannot."""

DEFAULT_BACKEND = "sdpa"


def always_available(device: torch.device) -> str | None:
    """Requirement of backends that run anywhere torch runs."""
    return None


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation."""

    name: str
    """Registry name, as used by `EngineOptions.attention`."""
    fn: AttentionFn
    """The attention function on (B, L, H, D) tensors."""
    requirement: Requirement = always_available
    """Checked when the backend is selected for a device."""
    description: str = ""
    """One line for listings and error messages."""
    head_dims: tuple[int, ...] | None = None
    """Head sizes the backend supports (checked at start-up by `check_head_dim`); None: any."""


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> None:
    """Add a backend to the registry. A name registered twice is an error unless `replace`."""
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend (tests use this to clean up fakes)."""
    _BACKENDS.pop(name, None)


def list_backends() -> list[str]:
    """Names of all registered backends, sorted."""
    return sorted(_BACKENDS)


def get_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """The backend called `name`, after checking that it can run on `device`.

    Raises ValueError naming the known backends (unknown name) or the reason (unmet requirement).
    """
    known = ", ".join(list_backends())
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known backends: {known}")
    backend = _BACKENDS[name]
    reason = backend.requirement(torch.device(device))
    if reason is not None:
        raise ValueError(
            f"attention backend {name!r} cannot run on device {str(device)!r}: {reason} "
            f"(known backends: {known})"
        )
    return backend


def check_head_dim(backend: AttentionBackend, head_dim: int) -> None:
    """Raise ValueError at start-up if `backend` cannot take the model's head size."""
    if backend.head_dims is not None and head_dim not in backend.head_dims:
        raise ValueError(
            f"attention backend {backend.name!r} does not support head dim {head_dim} "
            f"(supported: {', '.join(map(str, backend.head_dims))}); pick another backend, e.g. {DEFAULT_BACKEND!r}"
        )


class AttentionCore(nn.Module):
    """The attention call inside a model's attention layer: (B, L, H, D) in, (B, L, H, D) out.

    Holds no parameters, so it never shows up in a state dict.
    """

    def __init__(self, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.backend = backend if backend is not None else _BACKENDS[DEFAULT_BACKEND]

    def set_backend(self, backend: AttentionBackend) -> None:
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.backend.fn(q, k, v)

    def extra_repr(self) -> str:
        return f"backend={self.backend.name!r}"


def set_attention_backend(model: nn.Module, name: str, device: torch.device | str | None = None) -> None:
    """Use backend `name` in every `AttentionCore` of `model` (nested ones too).

    The requirement is checked once, for `device` (default: the device of the model's first
    parameter, or CPU for a model without parameters). Raises ValueError if the backend cannot be
    used or the model has no `AttentionCore`.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    backend = get_backend(name, device)
    cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    if not cores:
        raise ValueError(f"{type(model).__name__} has no AttentionCore to set backend {name!r} on")
    for core in cores:
        core.set_backend(backend)


# ---------------------------------------------------------------------------------------------
# Built-in backends


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """torch SDPA; it wants (B, H, L, D), so transpose in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Lq, D)
    return out.transpose(1, 2)  # (B, Lq, H, D)


register_backend(
    AttentionBackend(
        name="sdpa",
        fn=sdpa_attention,
        requirement=always_available,
        description="torch.nn.functional.scaled_dot_product_attention (default)",
    )
)
