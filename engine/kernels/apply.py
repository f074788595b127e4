"""One entry point for the loaders: apply the speed options of EngineOptions to a loaded DiT."""
from __future__ import annotations

from torch import nn

from engine.attention import set_attention_backend
from engine.options import EngineOptions
from engine.quant import quantize_model

from .compile import compile_blocks


def optimize_transformer(model: nn.Module, options: EngineOptions) -> nn.Module:
    """Quantize linears (options.quantization), pick the attention backend (options.attention),
    then torch.compile the blocks (options.compile). In place; returns the model. Raises at once,
    with the reason, if a selected kernel cannot run on the model's device."""
    quantize_model(model, options.quantization)
    set_attention_backend(model, options.attention, options.torch_device)
    if options.compile:
        compile_blocks(model)
    return model
