"""Module swaps: how kernels, quantization and fusions replace parts of a loaded model from outside."""
from __future__ import annotations

from typing import Callable

from torch import nn


def swap_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule `m` named `name` with `select(name, m)` true by `make(m)`, in place.

    By name, one at a time: a replaced module (and any weight only it holds) is freed as soon as
    its replacement is in place, instead of the whole model being held twice until the end.
    Returns the number of modules replaced.
    """
    names = [name for name, m in model.named_modules() if name and select(name, m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)
