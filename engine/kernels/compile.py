"""torch.compile of a DiT's repeated blocks (EngineOptions.compile)."""
from __future__ import annotations

from torch import nn

from engine.dit import blocks_of


def compile_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile each of the model's repeated blocks (`engine.dit` seam `repeated_blocks`) in place
    (the blocks share one compiled graph, since they have the same code and shapes); returns the
    model. Elementwise work (norms, modulation, rotary, gating, activation quantization when it is
    plain torch) gets fused by Inductor. TypeError if the model declares no repeated blocks.

    Shapes are specialised (dynamic=False), unless the class declares `compile_dynamic = True`
    (optional engine.dit seam): its blocks see token counts that change from call to call (e.g.
    HunyuanVideo-1.5's prompt tokens), so they compile with torch's automatic dynamic shapes (a
    size seen to change is made symbolic at its first recompile) instead of once per count.
    """
    dynamic = None if getattr(type(model), "compile_dynamic", False) else False
    for block in blocks_of(model):
        block.compile(mode=mode, dynamic=dynamic)
    return model
