"""Entry points for the loaders: apply the speed options of EngineOptions to a loaded DiT / VAE."""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.attention import set_attention_backend
from engine.options import EngineOptions
from engine.quant import quantize_model

from .compile import compile_blocks
from .fused_attention import fuse_attention

log = logging.getLogger(__name__)


def optimize_transformer(model: nn.Module, options: EngineOptions) -> nn.Module:
    """On CUDA, fuse the attention projections (one q|k|v GEMM, norm + rotary in one pass);
    then quantize linears (options.quantization), pick the attention backend (options.attention)
    and torch.compile the blocks (options.compile). In place; returns the model. Raises at once,
    with the reason, if a selected kernel cannot run on the model's device."""
    if options.torch_device.type == "cuda":
        log.info("fused %d attention modules", fuse_attention(model))
    quantize_model(model, options.quantization)
    set_attention_backend(model, options.attention, options.torch_device)
    if options.compile:
        compile_blocks(model)
    return model


def optimize_vae(vae: nn.Module, options: EngineOptions) -> nn.Module:
    """On CUDA: channels-last convolutions (`WanVAE.to_channels_last`) and cuDNN autotuning of
    the convolution algorithms (`torch.backends.cudnn.benchmark`, process-wide: the first decode
    at a new size pays the search). Elsewhere unchanged. Returns the VAE."""
    if options.torch_device.type == "cuda":
        if hasattr(vae, "to_channels_last"):
            vae.to_channels_last()
        torch.backends.cudnn.benchmark = True
    return vae
