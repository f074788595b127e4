"""torch.compile of a DiT's repeated blocks (EngineOptions.compile)."""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile each block of `model.blocks` in place (the blocks share one compiled graph, since
    they have the same code and shapes); returns the model. Elementwise work (norms, modulation,
    rotary, gating, activation quantization when it is plain torch) gets fused by Inductor.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks: {type(model).__name__} has no `blocks` ModuleList")
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return model
