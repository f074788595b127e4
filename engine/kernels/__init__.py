"""Optional fast kernels, applied from outside the models.

- quantized attention ("sage_int8", "sage_fp8": Triton; "cudnn_fp8": cuDNN's FP8 flash
  attention) registered in engine.attention's registry when this package is imported
  (`register_backends()`; idempotent), with their device and head-size requirements;
- FP8/INT8 GEMM helpers used by engine.quant (quant_ops);
- `compile_blocks(model)`: torch.compile of each transformer block (EngineOptions.compile);
- `fuse_attention(model)`: fused q|k|v (self) and k|v (cross) projections, RMSNorm + rotary in one
  Triton pass (module swap; part of `optimize_transformer` on CUDA);
- `fused_ffn.fuse_ffn(model)`: the feed-forward's GELU fused: with 8-bit linears into the hidden
  activations' per-token quantization (one Triton pass), with 16-bit ones into the first GEMM's
  epilogue (cuBLASLt) (module swap; part of `optimize_transformer` on CUDA);
- `optimize_transformer(model, options)`: all of the above from EngineOptions (the loaders call it);
- `optimize_vae(vae, options)`: channels-last, fused RMS norm + SiLU and cuDNN autotuning on CUDA.

Importing this package never imports triton: kernels load on first use, and each backend's
requirement check says at start-up why it cannot run.
"""
from __future__ import annotations

from .attention_backends import register_backends, sage_requirement
from .compile import compile_blocks
from .apply import optimize_transformer, optimize_vae
from .fused_attention import fuse_attention

register_backends()

__all__ = ["compile_blocks", "fuse_attention", "optimize_transformer", "optimize_vae", "register_backends",
           "sage_requirement"]
