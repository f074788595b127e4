"""Entry points for the loaders: apply the speed options of EngineOptions to a loaded DiT / VAE."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from engine.attention import set_attention_backend
from engine.models.wan.vae import RMSNorm
from engine.modules import swap_modules
from engine.options import EngineOptions
from engine.quant import quantize_model
from engine.requirements import use_triton_kernel

from .compile import compile_blocks
from .fused_attention import fuse_attention
from .fused_ffn import fuse_ffn

log = logging.getLogger(__name__)


def optimize_transformer(model: nn.Module, options: EngineOptions) -> nn.Module:
    """On CUDA, fuse the attention projections (one q|k|v GEMM, norm + rotary in one pass);
    then quantize linears (options.quantization; on CUDA the feed-forward's GELU is then fused
    with its hidden activations' quantization, or, unquantized in 16 bits, into the first GEMM's
    epilogue), pick the attention backend (options.attention)
    and torch.compile the blocks (options.compile). In place; returns the model. Raises at once,
    with the reason, if a selected kernel cannot run on the model's device."""
    if options.torch_device.type == "cuda":
        log.info("fused %d attention modules", fuse_attention(model))
    quantize_model(model, options.quantization)
    if options.torch_device.type == "cuda":
        log.info("fused %d feed-forwards", fuse_ffn(model))
    set_attention_backend(model, options.attention, options.torch_device)
    if options.compile:
        compile_blocks(model)
    return model


def optimize_vae(vae: nn.Module, options: EngineOptions) -> nn.Module:
    """On CUDA: channels-last convolutions (`WanVAE.to_channels_last`), RMS norm + SiLU in one
    Triton pass (`fuse_vae_norms`) and cuDNN autotuning of the convolution algorithms
    (`torch.backends.cudnn.benchmark`, process-wide: the first decode at a new size pays the
    search). Elsewhere unchanged. Returns the VAE."""
    if options.torch_device.type == "cuda":
        if hasattr(vae, "to_channels_last"):
            vae.to_channels_last()
        log.info("fused %d VAE norms", fuse_vae_norms(vae))
        torch.backends.cudnn.benchmark = True
    return vae


# ---------------------------------------------------------------------------------------------
# VAE: RMS norm (+ SiLU) in one Triton pass
# ---------------------------------------------------------------------------------------------


class FusedRMSNorm(RMSNorm):
    """The VAE's RMSNorm (same parameters, same `silu`) through `vae_norm.rms_norm_act` when x
    is a CUDA bf16/fp16 tensor with dense, innermost channels (channels-last(-3d)): one read and
    one write per element, the eager roundings kept (equal up to a rare one-ulp difference).
    Anything else (CPU, float32, contiguous layout, strided views) runs the eager math."""

    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)
        self.scale, self.silu = norm.scale, norm.silu
        self.gamma, self.bias = norm.gamma, norm.bias  # the same tensors: state dict unchanged

    def forward(self, x: Tensor) -> Tensor:
        if use_triton_kernel(x) and x.dim() >= 2 and x.movedim(1, -1).is_contiguous():
            from .vae_norm import rms_norm_act

            return rms_norm_act(x, self.gamma, self.bias, self.scale, self.silu)
        return super().forward(x)


def fuse_vae_norms(vae: nn.Module) -> int:
    """Swap every `RMSNorm` of `vae` (exact type) for a `FusedRMSNorm` sharing its parameters,
    in place (after `to_channels_last`: the kernel needs channels innermost). Returns the count."""
    return swap_modules(vae, lambda name, m: type(m) is RMSNorm, FusedRMSNorm)
