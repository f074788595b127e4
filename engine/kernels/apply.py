"""Entry points for the loaders: apply the speed options of EngineOptions to a loaded DiT / VAE.

What is swapped for which fused module is the model's declaration (`engine.dit.Fusions`, from the
class's `fusions` seam, or passed explicitly); this file imports no model.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.attention import set_attention_backend
from engine.dit import Fusions, fusions_of
from engine.modules import swap_modules
from engine.options import EngineOptions
from engine.quant import quantize_model

from .compile import compile_blocks
from .fused_ffn import fuse_ffn

log = logging.getLogger(__name__)


def fuse_modules(model: nn.Module, fusions: Fusions | None = None) -> int:
    """Swap every module whose exact type is in `fusions.swaps` (default: the model's declared
    fusions) for its fused replacement, in place, one at a time (each original is freed as its
    replacement goes in). Returns the count."""
    swaps = (fusions if fusions is not None else fusions_of(model)).swaps
    return swap_modules(model, lambda name, m: type(m) in swaps, lambda m: swaps[type(m)](m))


def optimize_transformer(model: nn.Module, options: EngineOptions, fusions: Fusions | None = None) -> nn.Module:
    """On CUDA, apply the model's fused modules (`fusions`, default the class's declaration: e.g.
    one q|k|v GEMM, norm + rotary in one pass); then quantize linears (options.quantization, the
    model's `quant_skip` kept; on CUDA the declared feed-forwards' GELU is then fused with the
    hidden activations' quantization, or, unquantized in 16 bits, into the first GEMM's epilogue),
    pick the attention backend (options.attention) and torch.compile the repeated blocks
    (options.compile). In place; returns the model. Raises at once, with the reason, if a selected
    kernel cannot run on the model's device."""
    cuda = options.torch_device.type == "cuda"
    fusions = fusions if fusions is not None else (fusions_of(model) if cuda else None)
    if cuda:
        if fusions.prepare is not None:
            fusions.prepare(model)
        log.info("fused %d modules", fuse_modules(model, fusions))
    quantize_model(model, options.quantization)
    if cuda:
        log.info("fused %d feed-forwards", fuse_ffn(model, fusions.feed_forwards))
    set_attention_backend(model, options.attention, options.torch_device)
    if options.compile:
        compile_blocks(model)
    return model


def optimize_vae(vae: nn.Module, options: EngineOptions, fusions: Fusions | None = None) -> nn.Module:
    """On CUDA: the VAE's fusions (`fusions`, default the class's `fusions` declaration; e.g.
    channels-last convolutions, then RMS norm + SiLU in one Triton pass) and cuDNN autotuning of
    the convolution algorithms (`torch.backends.cudnn.benchmark`, process-wide: the first decode at
    a new size pays the search). Elsewhere unchanged. Returns the VAE."""
    if options.torch_device.type == "cuda":
        fusions = fusions if fusions is not None else fusions_of(vae)
        if fusions.prepare is not None:
            fusions.prepare(vae)
        log.info("fused %d VAE modules", fuse_modules(vae, fusions))
        torch.backends.cudnn.benchmark = True
    return vae
