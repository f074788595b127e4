"""Speed of this engine against diffusers 0.42.1 on one GPU, in one run, random weights at the
real sizes (issue 2's ratio and issue 5's targets).

Sections (pick with --sections):
  kernels  micro-benchmarks: bf16 / FP8 / INT8 linears and SDPA / sage_int8 attention at the
           Wan-14B 480p shapes (tile configurations swept, the fastest kept for later sections)
  dit      per model and resolution: one DiT forward and one denoising step with CFG (two
           batch-1 forwards, as diffusers and the engine's default; --batched-cfg-modes also
           times the engine's cfg_batch step, one batch-2 forward) for diffusers and each engine
           mode; TFLOP/s, peak GiB, DiT weight memory; accuracy of each mode against the engine's
           bf16 path (one forward; latents after a 4-step sample)
  vae      Wan VAE decode of 81 frames, diffusers AutoencoderKLWan vs engine WanVAE (same weights)
  t5       umT5-XXL-sized encode, 2 x 512 tokens (the engine runs transformers' UMT5EncoderModel,
           as diffusers does: one number for both)
  profile  top CUDA kernels of one engine forward per mode listed in --profile-modes

Modes: "+"-joined: a precision (bf16 | fp8 | int8) then options (sage: the faster quantized
attention backend of the kernel sweep, or sage_int8 / sage_fp8 by name; compile: torch.compile of
the blocks; tq: keep the Triton activation-quant op under compile instead of letting Inductor fuse
the quantization; nofuse: without the fused attention projections; noffn: without the
feed-forward's fused GELU: + quantization in 8 bits, in the GEMM epilogue in 16 bits). Example:
  python bench/bench_dit.py --sections kernels,dit --models 14b --res 480p \
      --modes bf16,bf16+compile,fp8,int8,fp8+sage --json $OUT/bench.json
Needs diffusers importable (dev dependency; on the GPU machine carried as a wheel).
Times: CUDA events after warm-up, the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.dit import fusions_of  # noqa: E402
from engine.options import EngineOptions  # noqa: E402

DEV = "cuda"
GIB = 2**30

from dit_sizes import DIT_SIZES as MODELS  # noqa: E402
RES = {"480p": (480, 832), "720p": (720, 1280), "tiny": (32, 48)}
RESULTS: list[dict] = []
SAGE_BEST: dict[str, float] = {}
SAGE_PICK: list[str] = ["sage_int8"]
"""The attention backend a mode's "sage" means: the faster of sage_int8 / sage_fp8 in the kernel
sweep (sage_int8 when the sweep did not run); each record names the one it used."""


def log(rec: dict) -> None:
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median ms over `repeats` CUDA-event-timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


class Peak:
    """Peak memory of a region above what was allocated at its start."""

    def __enter__(self):
        self.extra = 0
        if DEV == "cpu":
            return self
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if DEV == "cpu":
            return
        torch.cuda.synchronize()
        self.extra = torch.cuda.max_memory_allocated() - self.base


# ----------------------------------------------------------------------------------------------
# kernels


def section_kernels(args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.kernels import quant_ops, sage_attention as sa
    from engine.quant import FP8Linear, Int8Linear

    torch.manual_seed(0)
    m = 32760
    linear_shapes = [(5120, 5120), (5120, 13824), (13824, 5120)] if "linear" in args.kernel_ops else []
    for k, n in linear_shapes:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, device=DEV, dtype=torch.bfloat16)
        flop = 2 * m * k * n
        ref = lin(x)
        ms = timed(lambda: lin(x), args.repeats * 3)
        log(dict(section="kernels", op="bf16 linear", shape=[m, k, n], ms=ms, tflops=flop / ms / 1e9))
        for kind, cls in [("fp8", FP8Linear), ("int8", Int8Linear)]:
            ms_q = timed(lambda: quant_ops.quant_rows(x, kind), args.repeats * 3)
            log(dict(section="kernels", op=f"{kind} per-token quant", shape=[m, k], ms=ms_q,
                     gbps=(x.numel() * 3) / ms_q / 1e6))
        q8 = FP8Linear.from_linear(lin)
        ms = timed(lambda: q8(x), args.repeats * 3)
        log(dict(section="kernels", op="fp8 linear (quant + _scaled_mm)", shape=[m, k, n], ms=ms,
                 tflops=flop / ms / 1e9, rel_err=rel(q8(x), ref)))
        qi = Int8Linear.from_linear(lin)
        xq, xs = quant_ops.quant_rows(x, "int8")
        best = None
        for cfg in quant_ops.INT8_GEMM_CONFIGS:
            try:
                ms = timed(lambda: quant_ops.int8_gemm(xq, qi.weight_q, xs, qi.weight_scale, qi.bias,
                                                       torch.bfloat16, config=cfg), args.repeats * 3)
            except Exception as e:  # a config that does not fit shared memory, say
                log(dict(section="kernels", op="int8 gemm", config=cfg, error=str(e)[:200]))
                continue
            log(dict(section="kernels", op="int8 gemm (Triton)", shape=[m, k, n], config=cfg, ms=ms,
                     tops=flop / ms / 1e9))
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is not None:
            log(dict(section="kernels", op="int8 gemm best", shape=[m, k, n], config=best[1], ms=best[0],
                     default=quant_ops.default_int8_config(n, k)))
        ms = timed(lambda: qi(x), args.repeats * 3)
        log(dict(section="kernels", op="int8 linear (quant + Triton gemm)", shape=[m, k, n], ms=ms,
                 tops=flop / ms / 1e9, rel_err=rel(qi(x), ref)))
        try:
            bi = qi.weight_q.t()
            ms = timed(lambda: torch._int_mm(xq, bi), args.repeats)
            log(dict(section="kernels", op="torch._int_mm", shape=[m, k, n], ms=ms, tops=flop / ms / 1e9))
        except Exception as e:
            log(dict(section="kernels", op="torch._int_mm", error=str(e)[:200]))
        del x, lin, ref, q8, qi, xq
        torch.cuda.empty_cache()

    if "attention" in args.kernel_ops:
        bench_norm_rope(args)
    attn_shapes = [(40, 32760)] + ([(40, 75600)] if "720p" in args.res else [])
    for heads, seq in attn_shapes if "attention" in args.kernel_ops else []:
        q, k, v = (torch.randn(1, seq, heads, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        k = k + 0.5 * torch.randn(1, 1, heads, 128, device=DEV, dtype=torch.bfloat16)  # a key offset
        flop = 4 * seq * seq * 128 * heads
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        ref = sdpa().transpose(1, 2)
        ms = timed(sdpa, args.repeats)
        log(dict(section="kernels", op="sdpa (default pick)", heads=heads, tokens=seq, ms=ms, tflops=flop / ms / 1e9))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            try:
                ms = timed(sdpa, args.repeats)
                log(dict(section="kernels", op="sdpa cudnn", heads=heads, tokens=seq, ms=ms, tflops=flop / ms / 1e9))
            except Exception as e:
                log(dict(section="kernels", op="sdpa cudnn", error=str(e)[:200]))
        for pv_fp8, backend in ((False, "sage_int8"), (True, "sage_fp8")):
            best = None
            n_cfg = args.sage_configs or len(sa.SAGE_CONFIGS)
            configs = list(sa.SAGE_CONFIGS[:n_cfg])
            if pv_fp8:  # the previous winner first, then the Hopper variants
                configs = [sa.SAGE_CONFIGS[1]] + [c for c in sa.SAGE_CONFIGS if c != sa.SAGE_CONFIGS[1]][:n_cfg - 1]
                configs += list(sa.SAGE_VARIANTS) if args.sage_variants else []
            else:
                configs += [c._replace(skip_rescale=True) for c in configs[:1]]
                configs += [c._replace(qk_fp8=True, skip_rescale=True) for c in configs[:1]]
            for cfg in configs:
                try:
                    out = sa.sage_attention(q, k, v, config=cfg, pv_fp8=pv_fp8)
                    ms = timed(lambda: sa.sage_attention(q, k, v, config=cfg, pv_fp8=pv_fp8), args.repeats)
                except Exception as e:
                    log(dict(section="kernels", op=backend, config=cfg, error=str(e)[:200]))
                    continue
                err = rel(out, ref)
                log(dict(section="kernels", op=f"{backend} (Triton)", heads=heads, tokens=seq, config=list(cfg),
                         ms=ms, tflops=flop / ms / 1e9, rel_err=err))
                if err < 0.06 and (best is None or ms < best[0]):
                    best = (ms, cfg)
            if best is not None and seq == 32760:
                sa.set_sage_config(best[1], pv_fp8)
                SAGE_BEST[backend] = best[0]
                log(dict(section="kernels", op=f"{backend} pick", config=list(best[1]), ms=best[0]))
        if seq == 32760 and SAGE_BEST:
            SAGE_PICK[0] = min(SAGE_BEST, key=SAGE_BEST.get)
            log(dict(section="kernels", op="sage pick", backend=SAGE_PICK[0], ms=SAGE_BEST))
        bench_cudnn_fp8(args, q, k, v, ref, flop)
        del q, k, v, ref
        torch.cuda.empty_cache()


def bench_cudnn_fp8(args, q, k, v, ref, flop: float) -> None:
    """cuDNN's FP8 flash attention (engine.kernels.cudnn_attention): the whole backend (quantize
    + cuDNN + dequantize), the cuDNN call alone, and at batch 2 (the CFG step's shape)."""
    from engine.kernels import cudnn_attention as ca

    heads, seq = q.shape[2], q.shape[1]
    reason = ca.cudnn_fp8_requirement(torch.device(DEV))
    if reason is not None:
        log(dict(section="kernels", op="cudnn_fp8", error=reason))
        return
    try:
        out = ca.cudnn_fp8_attention(q, k, v)
        ms = timed(lambda: ca.cudnn_fp8_attention(q, k, v), args.repeats)
        log(dict(section="kernels", op="cudnn_fp8 (quant + cuDNN sdpa_fp8 + dequant)", heads=heads, tokens=seq,
                 ms=ms, tflops=flop / ms / 1e9, rel_err=rel(out, ref)))
        q8, k8, v8, scales = ca.quantize_inputs(q, k, v)
        ms = timed(lambda: ca.cudnn_fp8_sdpa(q8, k8, v8, scales), args.repeats)
        log(dict(section="kernels", op="cudnn_fp8 sdpa_fp8 call alone", heads=heads, tokens=seq, ms=ms,
                 tflops=flop / ms / 1e9))
        q2, k2, v2 = (torch.cat([t, t]) for t in (q8, k8, v8))
        ms = timed(lambda: ca.cudnn_fp8_sdpa(q2, k2, v2, scales), args.repeats)
        log(dict(section="kernels", op="cudnn_fp8 sdpa_fp8 call alone, batch 2", heads=heads, tokens=seq, ms=ms,
                 tflops=2 * flop / ms / 1e9))
        del q2, k2, v2
    except Exception as e:
        import traceback

        log(dict(section="kernels", op="cudnn_fp8", error=traceback.format_exc()[-1500:]))


def bench_norm_rope(args, grid: tuple[int, int, int] = (21, 30, 52), heads: int = 40) -> None:
    """q/k RMSNorm + rotary at the 14B 480p shape: the model's eager code and the fused Triton
    kernel (engine.kernels.norm_rope), on a strided q of q|k|v."""
    from engine.kernels.norm_rope import rms_norm_rope
    from engine.models.wan.transformer import apply_rope, rope_3d

    seq, dim = math.prod(grid), heads * 128
    qkv = torch.randn(1, seq, 3 * dim, device=DEV, dtype=torch.bfloat16)
    x = qkv[..., :dim]
    norm = torch.nn.RMSNorm(dim, eps=1e-6, device=DEV, dtype=torch.bfloat16)
    rope = rope_3d(grid, 128, torch.device(DEV))
    with torch.no_grad():
        ref = apply_rope(norm(x).unflatten(2, (heads, -1)), rope)
        variants = {
            "eager (model code)": lambda: apply_rope(norm(x).unflatten(2, (heads, -1)), rope),
            "Triton fused": lambda: rms_norm_rope(x, norm.weight, 1e-6, rope[0], rope[1], heads),
        }
        for name, fn in variants.items():
            ms = timed(fn, args.repeats * 3)
            log(dict(section="kernels", op=f"rms_norm+rope {name}", shape=[seq, dim], ms=ms,
                     rel_err=rel(fn(), ref), gbps=2 * x.numel() * 2 / ms / 1e6))
    del qkv, x, ref
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# DiT


SD_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def random_state_dict(cfg_kwargs: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the modules' default init (as diffusers' constructor gives, which the
    baseline scripts use), bf16 except diffusers' float32 keep-list, on the GPU (cached per model)."""
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    key = json.dumps(cfg_kwargs, sort_keys=True)
    if key in SD_CACHE:
        return SD_CACHE[key]

    torch.manual_seed(seed)
    with torch.device(DEV):
        model = WanTransformer(WanDiTConfig(**cfg_kwargs))
    sd = {}
    for name, p in list(model.named_parameters()):
        sd[name] = p.detach().to(torch.float32 if WanTransformer.keeps_fp32(name) else torch.bfloat16)
        p.data = torch.empty(0, device=DEV)  # free the float32 copy as we go
    del model
    if DEV == "cuda":
        torch.cuda.empty_cache()
    SD_CACHE[key] = sd
    return sd


def engine_model(cfg_kwargs: dict, sd: dict, mode: str):
    """The engine's DiT on the shared weights with `mode` applied (quantized copies are new)."""
    from engine.attention import list_backends
    from engine.kernels import optimize_transformer
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    from engine.quant import linear as qlinear

    parts = mode.split("+")
    precision = parts[0]
    qlinear.COMPILE_FUSED_QUANT[0] = "tq" not in parts  # tq: Triton quant op under compile (no fusion)
    attention = "sdpa"
    for part in parts:
        if part == "sage":
            attention = SAGE_PICK[0]
        elif part in list_backends():
            attention = part
    with torch.device("meta"):
        model = WanTransformer(WanDiTConfig(**cfg_kwargs))
    model.load_state_dict(sd, assign=True, strict=True)
    model.eval().requires_grad_(False)
    options = EngineOptions(device=DEV, dtype="bfloat16", quantization="none" if precision == "bf16" else precision,
                            attention=attention, compile="compile" in parts)
    fusions = fusions_of(WanTransformer)
    if "nofuse" in parts:  # the same without the fused attention projections (A/B)
        fusions = dataclasses.replace(fusions, swaps={})
    if "noffn" in parts:  # the same without the feed-forward's fused GELU (A/B)
        fusions = dataclasses.replace(fusions, feed_forwards=())
    return optimize_transformer(model, options, fusions)


def diffusers_model(cfg_kwargs: dict, sd: dict):
    """diffusers' WanTransformer3DModel on the same tensors (keys are equal)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    kw = dict(cfg_kwargs, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              rope_max_seq_len=1024, patch_size=(1, 2, 2))
    with torch.device("meta"):
        model = WanTransformer3DModel(**kw)
    model.rope = WanRotaryPosEmbed(kw["attention_head_dim"], kw["patch_size"], kw["rope_max_seq_len"]).to(DEV)
    missing, unexpected = model.load_state_dict(sd, assign=True, strict=False)
    missing = [k for k in missing if not k.startswith("rope.")]
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval().requires_grad_(False)


def dit_flops(nparams: int, tokens: int, dim: int, layers: int, text: int = 512) -> float:
    """As ../shared/bench: 2·params·tokens + 4·tokens²·dim·layers + 4·tokens·text·dim·layers."""
    return 2 * nparams * tokens + 4 * tokens * tokens * dim * layers + 4 * tokens * text * dim * layers


def section_dit(args, name: str, res: str) -> None:
    from engine.guidance import CFGPredictor
    from engine.quant import weight_bytes
    from engine.samplers import make_sampler

    cfgk = MODELS[name]
    h, w = RES[res]
    f = (args.frames - 1) // 4 + 1
    torch.manual_seed(1)
    lat = torch.randn(1, 16, f, h // 8, w // 8, device=DEV, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=DEV)
    ctx = torch.randn(1, 512, 4096, device=DEV, dtype=torch.bfloat16)
    neg = torch.randn(1, 512, 4096, device=DEV, dtype=torch.bfloat16)
    tokens = f * (h // 16) * (w // 16)
    dim, layers = cfgk["num_attention_heads"] * 128, cfgk["num_layers"]
    sd = random_state_dict(cfgk)
    nparams = sum(v.numel() for v in sd.values())
    flops = dit_flops(nparams, tokens, dim, layers)
    base = dict(section="dit", model=name, res=res, frames=args.frames, tokens=tokens)
    reps = args.repeats
    times: dict[str, float] = {}

    # 1. diffusers: forward, and a CFG step = cond + uncond forwards + guidance (+ Euler update)
    if not args.no_diffusers:
        dm = diffusers_model(cfgk, sd)
        fwd = lambda: dm(hidden_states=lat, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]  # noqa: E731

        def dstep():
            c = fwd()
            u = dm(hidden_states=lat, timestep=t, encoder_hidden_states=neg, return_dict=False)[0]
            v = u.float() + 5.0 * (c.float() - u.float())
            return (lat.float() - 0.02 * v).to(lat.dtype)

        with torch.no_grad():
            with Peak() as pk:
                ms = timed(fwd, reps)
            times["diffusers/fwd"] = ms
            log(dict(base, impl="diffusers", mode="bf16", what="forward", ms=ms, tflops=flops / ms / 1e9,
                     peak_gib=(pk.extra + weight_bytes(dm)) / GIB, weight_gib=weight_bytes(dm) / GIB))
            if not args.no_step:
                with Peak() as pk:
                    ms = timed(dstep, max(1, reps - 1))
                times["diffusers/step"] = ms
                log(dict(base, impl="diffusers", mode="bf16", what="step_cfg", ms=ms, tflops=2 * flops / ms / 1e9,
                         peak_gib=(pk.extra + weight_bytes(dm)) / GIB))
            ref_diffusers = fwd().float() if args.accuracy else None
        del dm
        gc.collect()
        torch.cuda.empty_cache()

    # 2. the engine, mode by mode; references from its bf16 path
    ref_fwd = ref_lat = None
    for mode in args.modes:
        try:
            t0 = time.time()
            model = engine_model(cfgk, sd, mode)
            pred = CFGPredictor(model)
            fwd = lambda: model(lat, t, ctx)  # noqa: E731

            def step():
                sampler = make_sampler("unipc", 50, shift=5.0)
                v = pred(lat, t, ctx, neg, 5.0)
                return sampler.step(v, 0, lat.float())

            with torch.no_grad():
                out = fwd()  # first call: compile / autotune
                setup_s = time.time() - t0
                with Peak() as pk:
                    ms = timed(fwd, reps)
                times[f"{mode}/fwd"] = ms
                wb = weight_bytes(model)
                attn = next(m.backend.name for m in model.modules() if hasattr(m, "backend"))
                rec = dict(base, impl="engine", mode=mode, attention=attn, what="forward", ms=ms,
                           tflops=flops / ms / 1e9, peak_gib=(pk.extra + wb) / GIB, weight_gib=wb / GIB,
                           setup_s=setup_s)
                if "diffusers/fwd" in times:
                    rec["speedup_vs_diffusers"] = times["diffusers/fwd"] / ms
                if args.accuracy:
                    if mode == "bf16":
                        ref_fwd = out.float()
                        if not args.no_diffusers:
                            rec["rel_err_vs_diffusers_bf16"] = rel(out, ref_diffusers)
                    elif ref_fwd is not None:
                        rec["rel_err_vs_bf16"] = rel(out, ref_fwd)
                log(rec)
                if not args.no_step:
                    with Peak() as pk:
                        ms = timed(step, max(1, reps - 1))
                    times[f"{mode}/step"] = ms
                    rec = dict(base, impl="engine", mode=mode, what="step_cfg", ms=ms, tflops=2 * flops / ms / 1e9,
                               peak_gib=(pk.extra + wb) / GIB)
                    if "diffusers/step" in times:
                        rec["speedup_vs_diffusers"] = times["diffusers/step"] / ms
                    log(rec)
                if not args.no_step and mode in args.batched_cfg_modes:
                    # EngineOptions.cfg_batch: both branches as one batch-2 forward
                    batched = CFGPredictor(model, batched=True)

                    def batched_step():
                        sampler = make_sampler("unipc", 50, shift=5.0)
                        return sampler.step(batched(lat, t, ctx, neg, 5.0), 0, lat.float())

                    with Peak() as pk:
                        ms = timed(batched_step, max(1, reps - 1))
                    rec = dict(base, impl="engine", mode=mode, what="step_cfg_batch2", ms=ms,
                               tflops=2 * flops / ms / 1e9, peak_gib=(pk.extra + wb) / GIB)
                    if "diffusers/step" in times:
                        rec["speedup_vs_diffusers"] = times["diffusers/step"] / ms
                    log(rec)
                same_numerics = mode.split("+")[0] == "bf16" and mode != "bf16"  # compile-only variants
                if args.accuracy and args.sample_steps > 0 and not same_numerics:
                    sampler = make_sampler("unipc", args.sample_steps, shift=5.0)
                    x = torch.randn(lat.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(7))
                    for i, ts in enumerate(sampler.timesteps):
                        v = pred(x.to(torch.bfloat16), ts.reshape(1).to(DEV), ctx, neg, 5.0)
                        x = sampler.step(v, i, x)
                    if mode == "bf16":
                        ref_lat = x
                    elif ref_lat is not None:
                        log(dict(base, impl="engine", mode=mode, what=f"sampled_{args.sample_steps}_steps",
                                 rel_err_vs_bf16=rel(x, ref_lat)))
                if mode in args.profile_modes:
                    profile(fwd, dict(base, mode=mode), args)
        except Exception as e:
            log(dict(base, impl="engine", mode=mode, error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
        finally:
            model = pred = None
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
    del sd
    if not args.keep_weights:
        SD_CACHE.clear()
    gc.collect()
    torch.cuda.empty_cache()


def profile(fn, base: dict, args) -> None:
    """Top CUDA kernels of one call, grouped by name (to $OUT when set)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
    total = sum(e.device_time_total for e in prof.key_averages()) / 1e3
    top = [dict(name=e.key[:90], ms=e.device_time_total / 1e3, calls=e.count)
           for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]]
    log(dict(base, section="profile", kernel_ms_total=total, top=top))
    if args.out_dir:
        tag = base["mode"].replace("+", "_")
        with open(os.path.join(args.out_dir, f"profile_{base['model']}_{base['res']}_{tag}.txt"), "w") as fh:
            fh.write(table)


# ----------------------------------------------------------------------------------------------
# VAE and text encoder


def section_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    from engine.models.wan.vae import WanVAE, WanVAEConfig

    torch.manual_seed(2)
    with torch.device(DEV):
        ours = WanVAE(WanVAEConfig()).to(torch.bfloat16).eval().requires_grad_(False)
    with torch.device("meta"):
        theirs = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                  temperal_downsample=[False, True, True])
    theirs.load_state_dict(ours.state_dict(), assign=True, strict=True)
    theirs.eval().requires_grad_(False)
    cfg = ours.config
    mean = torch.tensor(cfg.latents_mean, device=DEV).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=DEV).view(1, -1, 1, 1, 1)
    for res in args.res:
        h, w = RES[res]
        z = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=DEV)
        raw = (z * std + mean).to(torch.bfloat16)
        base = dict(section="vae", res=res, frames=args.frames)
        with torch.no_grad():
            with Peak() as pk:
                ms_d = timed(lambda: theirs.decode(raw).sample, 1)
            ref = theirs.decode(raw).sample.clamp(-1, 1)
            log(dict(base, impl="diffusers", mode="bf16", ms=ms_d, peak_gib=pk.extra / GIB))
            for layout in ("contiguous", "channels_last"):
                if layout == "channels_last":
                    ours.to_channels_last()
                with Peak() as pk:
                    ms = timed(lambda: ours.decode(z), 1)
                log(dict(base, impl="engine", mode=f"bf16 {layout}", ms=ms, peak_gib=pk.extra / GIB,
                         speedup_vs_diffusers=ms_d / ms, rel_err_vs_diffusers=rel(ours.decode(z), ref)))
            if args.vae_cudnn_benchmark:
                # what the engine's loader does on CUDA (engine.kernels.optimize_vae): channels-last
                # and cudnn.benchmark; diffusers measured again with cudnn.benchmark on, for fairness
                from engine.kernels import optimize_vae

                optimize_vae(ours, EngineOptions(device=DEV, dtype="bfloat16"))
                with Peak() as pk:
                    ms = timed(lambda: ours.decode(z), 1)
                log(dict(base, impl="engine", mode="bf16 channels_last + cudnn.benchmark (optimize_vae)", ms=ms,
                         peak_gib=pk.extra / GIB, speedup_vs_diffusers=ms_d / ms,
                         rel_err_vs_diffusers=rel(ours.decode(z), ref)))
                ms_db = timed(lambda: theirs.decode(raw).sample, 1)
                log(dict(base, impl="diffusers", mode="bf16 + cudnn.benchmark", ms=ms_db,
                         speedup_of_engine_vs_this=ms_db / ms))
                torch.backends.cudnn.benchmark = False
            if args.vae_profile:
                ours.to_channels_last()
                profile(lambda: ours.decode(z), dict(base, model="vae", mode="bf16_channels_last"), args)
        del z, raw, ref
        torch.cuda.empty_cache()


def section_t5(args) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.device(DEV):
        t5 = UMT5EncoderModel(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, 256384, (2, 512), device=DEV)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ms = timed(lambda: t5(input_ids=ids, attention_mask=mask).last_hidden_state, args.repeats)
    log(dict(section="t5", impl="transformers UMT5EncoderModel (engine and diffusers alike)", batch=2, tokens=512,
             ms=ms, params_b=sum(p.numel() for p in t5.parameters()) / 1e9))
    del t5
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------


def summary() -> None:
    """A short table last (the device tool returns the end of the output)."""
    print("\n| section | model | res | impl | mode | what | ms | x diffusers | TFLOP/s | peak GiB | weights GiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r.get("section") in ("dit", "vae", "t5") and "ms" in r:
            err = r.get("rel_err_vs_bf16", r.get("rel_err_vs_diffusers_bf16", r.get("rel_err_vs_diffusers", "")))
            print(f"| {r['section']} | {r.get('model', '')} | {r.get('res', '')} | {r.get('impl', '')[:12]} | "
                  f"{r.get('mode', '')} | {r.get('what', '')} | {r['ms']:.1f} | "
                  f"{r.get('speedup_vs_diffusers', 0):.2f} | {r.get('tflops', 0):.0f} | {r.get('peak_gib', 0):.1f} | "
                  f"{r.get('weight_gib', 0):.1f} | {err if err == '' else f'{err:.4f}'} |")
        elif "rel_err_vs_bf16" in r:
            print(f"| {r['section']} | {r.get('model')} | {r.get('res')} | engine | {r['mode']} | {r['what']} | "
                  f"| | | | | {r['rel_err_vs_bf16']:.4f} |")
        elif "error" in r:
            print(f"| ERROR | {r.get('model', '')} | {r.get('res', '')} | | {r.get('mode', r.get('op', ''))} | "
                  f"{r['error'][:150]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="kernels,dit,vae,t5")
    p.add_argument("--models", default="1.3b,14b")
    p.add_argument("--res", default="480p")
    p.add_argument("--modes", default="bf16,bf16+compile,fp8,int8,fp8+sage")
    p.add_argument("--quick-models", default="",
                   help="models run after --models: forward only, no accuracy (name or name@res)")
    p.add_argument("--quick-modes", default="bf16,bf16+compile,fp8+sage+compile")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--no-step", action="store_true", help="skip the CFG step timing")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--profile-modes", default="", help="modes to profile one forward of (comma list)")
    p.add_argument("--kernel-ops", default="linear,attention", help="kernels section: linear and/or attention")
    p.add_argument("--sage-configs", type=int, default=0, help="sweep only the first N SAGE_CONFIGS (0: all)")
    p.add_argument("--batched-cfg-modes", default="",
                   help="modes whose CFG step is also timed as one batch-2 forward (cfg_batch)")
    p.add_argument("--vae-cudnn-benchmark", action="store_true", help="also time decode with optimize_vae")
    p.add_argument("--no-sage-variants", dest="sage_variants", action="store_false",
                   help="skip the Hopper variants of the FP8 P·V sage kernel in the sweep")
    p.add_argument("--vae-profile", action="store_true", help="profile one channels-last decode")
    p.add_argument("--quick-res", default="", help="resolutions of the quick models (default: --res)")
    p.add_argument("--quick-repeats", type=int, default=0, help="repeats of the quick runs (default: --repeats)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for smoke runs (--models tiny --res tiny)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    args = p.parse_args()
    global DEV
    DEV = args.device
    args.modes = [m for m in args.modes.split(",") if m]
    args.res = args.res.split(",")
    args.profile_modes = set(filter(None, args.profile_modes.split(",")))
    args.batched_cfg_modes = set(filter(None, args.batched_cfg_modes.split(",")))
    args.kernel_ops = set(args.kernel_ops.split(","))
    quick_res = args.quick_res.split(",") if args.quick_res else args.res
    args.keep_weights = bool(args.quick_models)
    args.out_dir = os.environ.get("OUT")
    if "bf16" not in args.modes and args.accuracy:
        args.modes.insert(0, "bf16")  # the accuracy reference
    torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps(dict(gpu=torch.cuda.get_device_name() if DEV == "cuda" else DEV, torch=torch.__version__,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:])), flush=True)
    sections = args.sections.split(",")
    steps = []
    if "kernels" in sections:
        steps.append(("kernels", lambda: section_kernels(args)))
    if "dit" in sections:
        for name in args.models.split(","):
            for res in args.res:
                steps.append((f"dit {name} {res}", lambda n=name, r=res: section_dit(args, n, r)))
    if "vae" in sections:
        steps.append(("vae", lambda: section_vae(args)))
    if "dit" in sections and args.quick_models:
        quick = argparse.Namespace(**{**vars(args), "modes": args.quick_modes.split(","), "accuracy": False,
                                      "no_step": True, "profile_modes": set(), "batched_cfg_modes": set(),
                                      "repeats": args.quick_repeats or args.repeats})
        for entry in args.quick_models.split(","):
            name, _, only_res = entry.partition("@")  # "14b@720p": that model at that resolution only
            for res in [only_res] if only_res else quick_res:
                steps.append((f"dit {name} {res} (quick)", lambda n=name, r=res: section_dit(quick, n, r)))
    if "t5" in sections:
        steps.append(("t5", lambda: section_t5(args)))
    try:
        for label, fn in steps:
            t0 = time.time()
            try:
                fn()
            except Exception as e:
                log(dict(section=label, error=f"{type(e).__name__}: {e}"[:500]))
                traceback.print_exc()
            print(f"# {label}: {time.time() - t0:.0f} s", flush=True)
            with open(args.json, "w") as fh:
                json.dump(RESULTS, fh, indent=1)
    finally:
        summary()


if __name__ == "__main__":
    main()
