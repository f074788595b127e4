"""Optional fast kernels, applied from outside the models.

- quantized attention ("sage_int8", "sage_fp8": Triton; "cudnn_fp8": cuDNN's FP8 flash
  attention) registered in engine.attention's registry when this package is imported
  (`register_backends()`; idempotent), with their device and head-size requirements;
- FP8/INT8 GEMM helpers used by engine.quant (quant_ops);
- `compile_blocks(model)`: torch.compile of each repeated block (EngineOptions.compile);
- `fuse_modules(model)`: the module swaps a family declares (`engine.dit.Fusions.swaps`, from its
  class's `fusions` seam), built on this package's generic pieces (`fused_attention.concat_linears`,
  `fused_attention.norm_rope` with its Triton norm + rotary kernel, `vae_norm.rms_norm_act`);
  part of `optimize_transformer` / `optimize_vae` on CUDA;
- `fused_ffn.fuse_ffn(model, feed_forwards)`: the declared feed-forwards' GELU fused: with 8-bit
  linears into the hidden activations' per-token quantization (one Triton pass), with 16-bit ones
  into the first GEMM's epilogue (cuBLASLt) (module swap; part of `optimize_transformer` on CUDA);
- `optimize_transformer(model, options)`: all of the above from EngineOptions (the loaders call it);
- `optimize_vae(vae, options)`: the VAE's declared fusions (channels-last, fused RMS norm + SiLU)
  and cuDNN autotuning on CUDA.

Importing this package never imports triton (kernels load on first use, and each backend's
requirement check says at start-up why it cannot run) nor any model (a family's fusions live in
its folder; tests/engine/test_kernels.py scans for it).
"""
from __future__ import annotations

from .attention_backends import register_backends, sage_requirement
from .compile import compile_blocks
from .apply import fuse_modules, optimize_transformer, optimize_vae

register_backends()

__all__ = ["compile_blocks", "fuse_modules", "optimize_transformer", "optimize_vae", "register_backends",
           "sage_requirement"]
