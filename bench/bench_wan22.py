"""Wan2.2 on one GPU against diffusers 0.42.1, in one run, random weights at the real sizes
(issue 12, "GPU"). Helpers (timing, peak memory, model builders, modes) are bench_dit.py's.

Sections (pick with --sections; each runs alone):
  a14b         a14b_step then a14b_phased
  a14b_step    Wan2.2-T2V-A14B: one denoising step with CFG (two batch-1 forwards, as diffusers'
               WanPipeline runs them) at 480x832, 81 frames. A step runs ONE expert (the high-noise
               one for t >= 875, the low-noise one below; both are Wan2.1-T2V-14B-shaped), so this
               is the 14B step: diffusers' WanTransformer3DModel (bf16, its default attention)
               against each engine mode of --modes; the guided velocity's error against diffusers'
  a14b_phased  a whole phased denoise (engine.denoise.run_phases) of --phased-steps steps whose
               timesteps cross the boundary once (checked: both experts serve), both experts built
               at the real size in --phased-mode: offload="none" (both resident) against
               offload="expert" (the idle expert in pinned CPU memory, swapped in for its phase):
               wall time per request and per step, peak GPU memory, the swap cost, pinned host memory
  ti2v         Wan2.2-TI2V-5B: one step with CFG at 704x1280, 121 frames. diffusers is fed as its
               WanPipeline feeds it with expand_timesteps (a (1, L) per-token timestep tensor); the
               engine as its text-to-video path runs (one timestep per sample, which the per-token
               path equals when every token is at t); --per-token-modes also time the engine on the
               (1, L) tensor (its image-to-video path)
  vae22        the Wan2.2 VAE decode of 121 frames at 704x1280 (latents (1, 48, 31, 44, 80)):
               diffusers' AutoencoderKLWan (Wan2.2 config) against the engine's WanVAE on the same
               random weights, as built and as its loader applies `engine.kernels.optimize_vae`
               (then diffusers again with the cuDNN autotuning that turns on); time, peak memory,
               and how far the two outputs differ

Modes are bench_dit.py's ("+"-joined: bf16 | fp8 | int8, then compile, sage, cudnn_fp8, ...).
Weights: each module's parameters initialised on the device in float32 and cast at once (bf16;
the float32 keep-list stays float32), so no float32 copy of a whole 14B model ever exists.

    python bench/bench_wan22.py --sections a14b --json $OUT/wan22_a14b.json
    python bench/bench_wan22.py --sections ti2v,vae22 --json $OUT/wan22_ti2v_vae.json
    python bench/bench_wan22.py --tiny                                   # smoke run on the CPU

Needs diffusers importable (dev dependency; on the GPU machine carried as a wheel).
Times: CUDA events after warm-up, the median of --repeats runs (the phased requests: synchronised
wall clock). Peak memory: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_dit as bd  # noqa: E402
from bench_dit import GIB, Peak, diffusers_model, dit_flops, engine_model, log, rel, timed  # noqa: E402
from dit_sizes import DIT_SIZES  # noqa: E402
from engine.options import EngineOptions  # noqa: E402
from engine.registry import LatentGeometry, get_spec  # noqa: E402

A14B = "wan2.2-t2v-a14b"
TI2V = "wan2.2-ti2v-5b"
SECTIONS = ("a14b", "a14b_step", "a14b_phased", "ti2v", "vae22")


@dataclass(frozen=True)
class Sizes:
    """What each section runs at (real sizes, or tiny ones for a CPU smoke run)."""

    a14b_dit: str
    """DIT_SIZES key of one A14B expert."""
    a14b_hwf: tuple[int, int, int]
    """(height, width, frames) in pixels."""
    ti2v_dit: str
    ti2v_hwf: tuple[int, int, int]
    vae_hwf: tuple[int, int, int]
    text_len: int
    """Text tokens (umT5: prompts padded to 512)."""
    tiny_vae: bool


REAL = Sizes("14b", (480, 832, 81), "ti2v-5b", (704, 1280, 121), (704, 1280, 121), 512, False)
TINY = Sizes("tiny", (32, 48, 9), "ti2v-tiny", (64, 96, 9), (64, 96, 9), 16, True)


# ----------------------------------------------------------------------------------------------
# helpers


def on_cuda() -> bool:
    return bd.DEV == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def free() -> None:
    """Drop what the last part left: compiled graphs, Python garbage, cached GPU blocks."""
    torch._dynamo.reset()
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def free_cached() -> None:
    """Python garbage and cached GPU blocks (compiled graphs kept)."""
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


def latent_shape(geometry: LatentGeometry, height: int, width: int, frames: int) -> tuple[int, ...]:
    """(1, C, F_lat, H_lat, W_lat) of a video as the model's VAE encodes it."""
    return (1, geometry.channels, (frames - 1) // geometry.temporal + 1, height // geometry.spatial,
            width // geometry.spatial)


def tokens_of(shape: tuple[int, ...]) -> int:
    """DiT tokens of a latent (patch 1 x 2 x 2)."""
    return shape[2] * (shape[3] // 2) * (shape[4] // 2)


def host_memory() -> dict:
    """Host memory in GiB: this process's resident set, the machine's available memory, and the
    pinned allocator's bytes (block sizes rounded as requested from CUDA)."""
    out = {}
    for path, key, field in (("/proc/self/status", "host_rss_gib", "VmRSS:"),
                             ("/proc/meminfo", "host_available_gib", "MemAvailable:")):
        try:
            with open(path) as fh:
                for line in fh:
                    if line.startswith(field):
                        out[key] = int(line.split()[1]) * 1024 / GIB
        except OSError:
            pass
    if on_cuda():
        try:
            out["host_pinned_gib"] = torch.cuda.host_memory_stats()["allocated_bytes.current"] / GIB
        except (AttributeError, KeyError, RuntimeError):  # a torch without these statistics
            pass
    return out


def pinned_bytes(modules) -> int:
    """Bytes that pinning every parameter and buffer of `modules` takes from the host
    (engine.offload.HostArena: 256-byte slices of page-locked chunks)."""
    seen, total = set(), 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += -(-t.numel() * t.element_size() // 256) * 256
    return total


def random_weights(cfg_kwargs: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a WanTransformer at the modules' default init (nn.Linear, Conv3d, norms;
    the modulation tables N(0, 1/D) as diffusers draws them), on bd.DEV: bf16, the float32
    keep-list float32. Module by module: each module's parameters are made in float32, initialised
    and cast at once, so at most one module exists in float32 (2 x 14B in bf16 are 2 x 26.7 GiB;
    bench_dit.random_state_dict's whole-model float32 copy would not fit beside them)."""
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanTransformer(WanDiTConfig(**cfg_kwargs))
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            module.to_empty(device=bd.DEV, recurse=False)  # float32 storage for this module only
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:  # scale_shift_table: randn / sqrt(D), as diffusers
                for _, p in module.named_parameters(recurse=False):
                    p.normal_(0.0, p.shape[-1] ** -0.5)
            for name, p in module.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                sd[key] = p.detach().to(torch.float32 if WanTransformer.keeps_fp32(key) else torch.bfloat16)
            module.to_empty(device="meta", recurse=False)  # the float32 values go
    return sd


# ----------------------------------------------------------------------------------------------
# one denoising step with CFG: diffusers and the engine's modes


def step_cfg(args, base: dict, cfgk: dict, sd: dict, lat: torch.Tensor, ctx: torch.Tensor, neg: torch.Tensor,
             guidance: float, diffusers_t: torch.Tensor, engine_t: torch.Tensor,
             per_token_t: torch.Tensor | None = None) -> None:
    """Times one step with CFG (two batch-1 forwards, the guidance, one sampler update) for
    diffusers (fed `diffusers_t`) and each of args.modes (fed `engine_t`; also `per_token_t` for
    args.per_token_modes). The first call of each is the warm-up (compile, autotuning): its guided
    velocity is compared with diffusers'."""
    from engine.guidance import CFGPredictor
    from engine.quant import weight_bytes
    from engine.samplers import make_sampler

    dim, layers = cfgk["num_attention_heads"] * cfgk["attention_head_dim"], cfgk["num_layers"]
    nparams = sum(v.numel() for v in sd.values())
    flops = dit_flops(nparams, base["tokens"], dim, layers, text=ctx.shape[1])
    base = dict(base, what="step_cfg", params_b=nparams / 1e9)
    ref = None
    ms_diffusers = None

    # 1. diffusers: cond + uncond forwards, guidance, an Euler update (bench_dit's step)
    if not args.no_diffusers:
        try:
            dm = diffusers_model(cfgk, sd)

            def velocity() -> torch.Tensor:
                c = dm(hidden_states=lat, timestep=diffusers_t, encoder_hidden_states=ctx, return_dict=False)[0]
                u = dm(hidden_states=lat, timestep=diffusers_t, encoder_hidden_states=neg, return_dict=False)[0]
                return u.float() + guidance * (c.float() - u.float())

            def dstep() -> torch.Tensor:
                return (lat.float() - 0.02 * velocity()).to(lat.dtype)

            with torch.no_grad():
                t0 = time.time()
                ref = velocity()  # warm-up
                sync()
                setup_s = time.time() - t0
                with Peak() as pk:
                    ms_diffusers = timed(dstep, args.repeats, warmup=0)
            wb = weight_bytes(dm)
            log(dict(base, impl="diffusers", mode="bf16", attention="diffusers default (SDPA)",
                     timestep_input=f"{tuple(diffusers_t.shape)} {diffusers_t.dtype}", ms=ms_diffusers,
                     tflops=2 * flops / ms_diffusers / 1e9, peak_gib=(pk.extra + wb) / GIB, weight_gib=wb / GIB,
                     setup_s=setup_s))
        except Exception as e:
            log(dict(base, impl="diffusers", mode="bf16", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
        finally:
            dm = None
            free()

    # 2. the engine, mode by mode (the same weight tensors; quantized copies are new)
    for mode in args.modes:
        model = pred = None
        try:
            t0 = time.time()
            model = engine_model(cfgk, sd, mode)
            pred = CFGPredictor(model)
            wb = weight_bytes(model)
            attn = next((m.backend.name for m in model.modules() if hasattr(m, "backend")), "?")
            inputs = [("per-sample", engine_t)]
            if per_token_t is not None and mode in args.per_token_modes:
                inputs.append(("per-token", per_token_t))
            for label, t in inputs:

                def step() -> torch.Tensor:
                    sampler = make_sampler("unipc", 50, shift=5.0)
                    return sampler.step(pred(lat, t, ctx, neg, guidance), 0, lat.float())

                with torch.no_grad():
                    v = pred(lat, t, ctx, neg, guidance)  # warm-up: compile / autotune
                    sync()
                    setup_s = time.time() - t0
                    with Peak() as pk:
                        ms = timed(step, args.repeats, warmup=0)
                rec = dict(base, impl="engine", mode=mode, attention=attn,
                           timestep_input=f"{tuple(t.shape)} {t.dtype} ({label})", ms=ms,
                           tflops=2 * flops / ms / 1e9, peak_gib=(pk.extra + wb) / GIB, weight_gib=wb / GIB,
                           setup_s=setup_s)
                if ms_diffusers is not None:
                    rec["speedup_vs_diffusers"] = ms_diffusers / ms
                if ref is not None:
                    rec["rel_err_vs_diffusers"] = rel(v, ref)  # guided velocity, vs diffusers bf16
                log(rec)
                v = None
                t0 = time.time()
        except Exception as e:
            log(dict(base, impl="engine", mode=mode, error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
        finally:
            model = pred = None
            free()


# ----------------------------------------------------------------------------------------------
# A14B


def section_a14b_step(args, sizes: Sizes) -> None:
    spec = get_spec(A14B)
    h, w, frames = sizes.a14b_hwf
    shape = latent_shape(spec.latent, h, w, frames)
    cfgk = DIT_SIZES[sizes.a14b_dit]
    torch.manual_seed(1)
    lat = torch.randn(shape, device=bd.DEV, dtype=torch.bfloat16)
    ctx = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)
    neg = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)
    t = torch.tensor([900.0], device=bd.DEV)  # a high-noise-expert timestep (t >= 875)
    base = dict(section="a14b", part="step", model=f"{A14B} (one expert)", size=sizes.a14b_dit,
                res=f"{h}x{w}", frames=frames, tokens=tokens_of(shape), guidance=spec.defaults.guidance_scale,
                note="a Wan2.2-A14B step runs one 14B expert (high-noise for t >= 875, low-noise below; "
                     "both Wan2.1-T2V-14B-shaped): this is the 14B step")
    sd = random_weights(cfgk, seed=0)
    try:
        step_cfg(args, base, cfgk, sd, lat, ctx, neg, spec.defaults.guidance_scale, t, t)
    finally:
        sd.clear()
        free()


def section_a14b_phased(args, sizes: Sizes) -> None:
    """Both experts at the real size, a whole request with offload="none" then offload="expert"."""
    from engine.denoise import make_phases, phase_at, run_phases
    from engine.families import get_family
    from engine.guidance import CFGPredictor
    from engine.offload import apply_offload, get_offloader
    from engine.quant import weight_bytes
    from engine.samplers import make_sampler

    spec = get_spec(A14B)
    phases = make_phases(spec, spec.defaults.guidance_scale, spec.defaults.guidance_scale_2)
    adapter = get_family(spec.family).adapter(spec)

    def new_sampler():
        return make_sampler("unipc", args.phased_steps, shift=args.phased_shift)

    # 1. the schedule must cross the boundary once: both experts serve
    timesteps = new_sampler().timesteps.to(torch.float32)
    experts = [phase_at(phases, ts).expert for ts in timesteps]
    switches = sum(a != b for a, b in zip(experts, experts[1:]))
    if len(set(experts)) != 2 or switches != 1:
        raise ValueError(
            f"--phased-steps {args.phased_steps} with --phased-shift {args.phased_shift} gives timesteps "
            f"{timesteps.tolist()} served by {experts}; the boundary ({spec.boundary_ratio} * 1000) must be "
            "crossed exactly once so that both experts serve (e.g. 4 steps at shift 3.0)")
    h, w, frames = sizes.a14b_hwf
    shape = latent_shape(spec.latent, h, w, frames)
    cfgk = DIT_SIZES[sizes.a14b_dit]
    base = dict(section="a14b", part="phased", model=A14B, size=sizes.a14b_dit, res=f"{h}x{w}", frames=frames,
                tokens=tokens_of(shape), mode=args.phased_mode, sampler="unipc", steps=args.phased_steps,
                shift=args.phased_shift, timesteps=timesteps.tolist(), experts_per_step=experts)
    dits: dict[str, torch.nn.Module] = {}
    predictors: dict[str, CFGPredictor] = {}

    def request() -> dict:
        """One whole request (fresh sampler, the same noise): wall time, per-step times, peaks."""
        marks: list[float] = []

        def progress(done: int, total: int) -> None:
            sync()
            marks.append(time.perf_counter())

        sync()
        if on_cuda():
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if on_cuda() else 0
        start = time.perf_counter()
        with torch.no_grad():
            out = run_phases(phases, predictors, dits, adapter, new_sampler(), noise.clone(), ctx, neg, None,
                             torch.bfloat16, progress=progress)
        sync()
        wall = time.perf_counter() - start
        return dict(out=out, wall=wall, steps=[b - a for a, b in zip([start] + marks, marks)], before=before,
                    peak=torch.cuda.max_memory_allocated() if on_cuda() else 0,
                    reserved=torch.cuda.max_memory_reserved() if on_cuda() else 0)

    def measure(offload: str) -> tuple[dict, torch.Tensor]:
        runs = [request() for _ in range(args.phased_repeats)]
        per_step = [statistics.median(r["steps"][i] for r in runs) for i in range(len(timesteps))]
        rec = dict(base, what="request", offload=offload, request_s=statistics.median(r["wall"] for r in runs),
                   request_s_all=[round(r["wall"], 3) for r in runs], step_s=[round(s, 3) for s in per_step],
                   mean_step_s=sum(per_step) / len(per_step),
                   resident_gib_before=runs[-1]["before"] / GIB, peak_gib_per_gpu=max(r["peak"] for r in runs) / GIB,
                   peak_reserved_gib=max(r["reserved"] for r in runs) / GIB,
                   expert_weight_gib=max(expert_bytes.values()) / GIB, **host_memory())
        return rec, runs[-1]["out"]

    try:
        # 2. both experts on the device, optimised as the loader does (engine_model: optimize_transformer)
        for i, expert in enumerate(spec.experts):
            sd = random_weights(cfgk, seed=10 + i)
            dits[expert.name] = engine_model(cfgk, sd, args.phased_mode)
            sd.clear()  # the unfused originals go; the model holds what it uses
            free_cached()
        expert_bytes = {name: weight_bytes(dit) for name, dit in dits.items()}
        predictors.update({name: CFGPredictor(dit) for name, dit in dits.items()})
        torch.manual_seed(5)
        noise = torch.randn(shape, device=bd.DEV, dtype=torch.float32)
        ctx = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)
        neg = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)

        # 3. warm-up: one guided velocity per expert (kernels, autotuning; compile when the mode has it)
        t0 = time.time()
        with torch.no_grad():
            for name, dit in dits.items():
                x, ts, img = adapter.model_input(noise, timesteps[0].to(bd.DEV), None, dit, torch.bfloat16)
                predictors[name](x, ts, ctx, neg, phases[0].guidance_scale, img)
        sync()
        log(dict(base, what="warm-up (one guided velocity per expert)", setup_s=time.time() - t0))

        # 4. offload="none": both experts resident for the whole request
        rec_none, out_none = measure("none")
        log(rec_none)

        # 5. offload="expert": each expert's weights to pinned CPU memory (apply_offload, as the
        #    loader applies it after optimize_transformer), swapped in by run_phases for its phase
        options = EngineOptions(device=bd.DEV, dtype="bfloat16", offload="expert",
                                compile="compile" in args.phased_mode.split("+"))
        need = pinned_bytes(dits.values())
        available = host_memory().get("host_available_gib")
        if on_cuda() and available is not None and need / GIB > available - 4:
            raise MemoryError(f"offload='expert' would pin about {need / GIB:.1f} GiB of host memory and "
                              f"{available:.1f} GiB are available: skipped")
        t0 = time.time()
        for dit in dits.values():
            apply_offload(dit, options)
        free_cached()
        arena_gib = sum(d.offloader.arena.nbytes for d in dits.values() if getattr(d.offloader, "arena", None)) / GIB
        log(dict(base, what="offload='expert' applied (weights to pinned CPU memory)", setup_s=time.time() - t0,
                 pinned_estimate_gib=need / GIB, pinned_arena_gib=arena_gib, weights_gib=sum(expert_bytes.values()) / GIB,
                 gpu_allocated_gib=(torch.cuda.memory_allocated() if on_cuda() else 0) / GIB, **host_memory()))

        # 6. one expert's copy in and out, alone
        first = spec.experts[0].name
        offloader = get_offloader(dits[first])
        if offloader is not None:
            sync()
            t0 = time.perf_counter()
            offloader.onload()
            sync()
            t1 = time.perf_counter()
            offloader.offload()
            sync()
            t2 = time.perf_counter()
            log(dict(base, what="one expert onload / offload", expert_weight_gib=expert_bytes[first] / GIB,
                     onload_s=t1 - t0, h2d_gbps=expert_bytes[first] / (t1 - t0) / 1e9, offload_s=t2 - t1))
        else:
            log(dict(base, what="offload='expert' is a no-op on this device (weights already in host memory)"))

        # 7. the same request with the experts swapped at the boundary
        rec_expert, out_expert = measure("expert")
        rec_expert["swap_overhead_s"] = rec_expert["request_s"] - rec_none["request_s"]
        rec_expert["peak_saved_gib"] = rec_none["peak_gib_per_gpu"] - rec_expert["peak_gib_per_gpu"]
        rec_expert["rel_err_vs_offload_none"] = rel(out_expert, out_none)
        log(rec_expert)
    finally:
        dits.clear()
        predictors.clear()
        free()


# ----------------------------------------------------------------------------------------------
# TI2V-5B


def section_ti2v(args, sizes: Sizes) -> None:
    spec = get_spec(TI2V)
    h, w, frames = sizes.ti2v_hwf
    shape = latent_shape(spec.latent, h, w, frames)
    cfgk = DIT_SIZES[sizes.ti2v_dit]
    torch.manual_seed(1)
    lat = torch.randn(shape, device=bd.DEV, dtype=torch.bfloat16)
    ctx = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)
    neg = torch.randn(1, sizes.text_len, cfgk["text_dim"], device=bd.DEV, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=bd.DEV)
    # diffusers' WanPipeline with expand_timesteps: mask of ones (text-to-video), one value per token
    mask = torch.ones(shape, dtype=torch.float32, device=bd.DEV)
    per_token = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)  # (1, L) float32
    del mask
    base = dict(section="ti2v", model=TI2V, size=sizes.ti2v_dit, res=f"{h}x{w}", frames=frames,
                tokens=tokens_of(shape), guidance=spec.defaults.guidance_scale,
                note="diffusers gets a (1, L) per-token timestep (WanPipeline, expand_timesteps=True); the "
                     "engine's text-to-video path one timestep per sample (equal: every token is at t)")
    sd = random_weights(cfgk, seed=0)
    try:
        step_cfg(args, base, cfgk, sd, lat, ctx, neg, spec.defaults.guidance_scale, per_token, t, per_token)
    finally:
        sd.clear()
        free()


# ----------------------------------------------------------------------------------------------
# Wan2.2 VAE


def randomize_norms_(vae: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Norm gammas 1 + 0.2 N and biases 0.05 N (the inits are ones and zeros), so that the
    comparison with diffusers sees every norm and bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return vae


def section_vae22(args, sizes: Sizes) -> None:
    from diffusers import AutoencoderKLWan

    from engine.kernels import optimize_vae
    from engine.models.wan.vae import WanVAE, tiny_vae22_config, wan22_vae_config

    config = tiny_vae22_config() if sizes.tiny_vae else wan22_vae_config()
    torch.manual_seed(2)
    with torch.device(bd.DEV):
        ours = WanVAE(config)
    ours = randomize_norms_(ours).to(torch.bfloat16).eval().requires_grad_(False)
    with torch.device("meta"):
        theirs = AutoencoderKLWan(**config.to_dict())
    theirs.load_state_dict(ours.state_dict(), assign=True, strict=True)  # the same tensors
    theirs.eval().requires_grad_(False)
    h, w, frames = sizes.vae_hwf
    shape = latent_shape(get_spec(TI2V).latent, h, w, frames)
    z = torch.randn(shape, device=bd.DEV)  # normalised latents, as the engine's decode takes them
    mean = torch.tensor(config.latents_mean, device=bd.DEV).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=bd.DEV).view(1, -1, 1, 1, 1)
    raw = (z * std + mean).to(torch.bfloat16)  # what diffusers' pipeline hands its decode
    base = dict(section="vae22", model="Wan2.2 VAE (TI2V-5B)", res=f"{h}x{w}", frames=frames, latents=list(shape),
                params_m=sum(p.numel() for p in ours.parameters()) / 1e6)
    vae_repeats = max(1, args.repeats - 1)

    def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
        diff = (out.float() - ref.float()).abs_().max().item()
        return dict(rel_err_vs_diffusers=rel(out, ref), max_abs_diff_vs_diffusers=diff,
                    max_rel_diff_vs_diffusers=diff / ref.float().abs().max().item())

    torch.backends.cudnn.benchmark = False
    try:
        with torch.no_grad():
            # 1. diffusers (cuDNN autotuning off, its default)
            with Peak() as pk:
                ms_d = timed(lambda: theirs.decode(raw).sample, vae_repeats)
            ref = theirs.decode(raw).sample
            log(dict(base, impl="diffusers", mode="bf16", ms=ms_d, peak_gib=pk.extra / GIB,
                     output=list(ref.shape)))
            # 2. the engine's WanVAE as built (contiguous, no fused kernels)
            with Peak() as pk:
                ms = timed(lambda: ours.decode(z), vae_repeats)
            log(dict(base, impl="engine", mode="bf16 as built", ms=ms, peak_gib=pk.extra / GIB,
                     speedup_vs_diffusers=ms_d / ms, **compare(ours.decode(z), ref)))
            # 3. as the engine's loader applies it (optimize_vae: on CUDA channels-last, the fused
            #    RMS norm + SiLU, cudnn.benchmark; on the CPU nothing)
            optimize_vae(ours, EngineOptions(device=bd.DEV, dtype="bfloat16"))
            with Peak() as pk:
                ms = timed(lambda: ours.decode(z), vae_repeats)
            log(dict(base, impl="engine", mode="bf16 + optimize_vae (the loader's)", ms=ms, peak_gib=pk.extra / GIB,
                     speedup_vs_diffusers=ms_d / ms, **compare(ours.decode(z), ref)))
            # 4. diffusers again with cudnn.benchmark on (optimize_vae set it process-wide), for fairness
            if torch.backends.cudnn.benchmark:
                with Peak() as pk:
                    ms_db = timed(lambda: theirs.decode(raw).sample, vae_repeats)
                log(dict(base, impl="diffusers", mode="bf16 + cudnn.benchmark", ms=ms_db, peak_gib=pk.extra / GIB,
                         speedup_of_engine_optimized_vs_this=ms_db / ms))
    finally:
        torch.backends.cudnn.benchmark = False
        ours = theirs = ref = None
        free()


# ----------------------------------------------------------------------------------------------


def summary() -> None:
    """A short table last (the device tool returns the end of the output)."""
    print("\n| section | impl | mode | what | ms | x diffusers | TFLOP/s | peak GiB | err vs diffusers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in bd.RESULTS:
        if "error" in r:
            print(f"| ERROR {r.get('section', '')} | {r.get('impl', '')} | {r.get('mode', '')} | | "
                  f"{r['error'][:150]} |")
        elif "ms" in r:
            err, speedup = r.get("rel_err_vs_diffusers"), r.get("speedup_vs_diffusers")
            what = r.get("what", "decode") + (" per-token t" if "per-token" in r.get("timestep_input", "") else "")
            print(f"| {r['section']} | {r['impl']} | {r['mode']} | {what} | {r['ms']:.1f} | "
                  f"{'' if speedup is None else f'{speedup:.2f}'} | {r.get('tflops', 0):.0f} | {r.get('peak_gib', 0):.1f} | "
                  f"{'' if err is None else f'{err:.4f}'} |")
    print("\n| phased A14B | mode | request s | per step s | peak GiB per GPU | swap overhead s | pinned GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in bd.RESULTS:
        if r.get("what") == "request":
            print(f"| offload={r['offload']} | {r['mode']} | {r['request_s']:.2f} | {r['step_s']} | "
                  f"{r['peak_gib_per_gpu']:.1f} | {r.get('swap_overhead_s', 0):.2f} | "
                  f"{r.get('host_pinned_gib', 0):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a14b,ti2v,vae22", help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--modes", default=None,
                   help="engine modes of the step sections (default bf16,bf16+compile,fp8+cudnn_fp8+compile; "
                        "--tiny: bf16)")
    p.add_argument("--per-token-modes", default="bf16",
                   help="ti2v: modes also timed on the (1, L) per-token timestep (comma list; '' for none)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up (VAE: repeats - 1)")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--phased-mode", default="bf16", help="engine mode of both experts in a14b_phased")
    p.add_argument("--phased-steps", type=int, default=4)
    p.add_argument("--phased-shift", type=float, default=3.0,
                   help="flow shift of the phased request (3.0: diffusers' A14B scheduler_config.json)")
    p.add_argument("--phased-repeats", type=int, default=1, help="timed requests per offload mode")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a smoke run)")
    p.add_argument("--device", default=None, help="cuda (default), or cpu (the default with --tiny)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_wan22.json"))
    args = p.parse_args()
    bd.DEV = args.device or ("cpu" if args.tiny else "cuda")
    sizes = TINY if args.tiny else REAL
    if args.modes is None:
        args.modes = "bf16" if args.tiny else "bf16,bf16+compile,fp8+cudnn_fp8+compile"
    args.modes = [m for m in args.modes.split(",") if m]
    args.per_token_modes = set(filter(None, args.per_token_modes.split(",")))
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps(dict(gpu=torch.cuda.get_device_name() if on_cuda() else bd.DEV, torch=torch.__version__,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:],
                          sizes="tiny" if args.tiny else "real")), flush=True)
    runners: dict[str, Callable[[], None]] = {
        "a14b_step": lambda: section_a14b_step(args, sizes),
        "a14b_phased": lambda: section_a14b_phased(args, sizes),
        "ti2v": lambda: section_ti2v(args, sizes),
        "vae22": lambda: section_vae22(args, sizes),
    }
    steps = [part for s in sections for part in (("a14b_step", "a14b_phased") if s == "a14b" else (s,))]
    try:
        for label in steps:
            t0 = time.time()
            try:
                runners[label]()
            except Exception as e:
                log(dict(section=label, error=f"{type(e).__name__}: {e}"[:500]))
                traceback.print_exc()
            free()
            print(f"# {label}: {time.time() - t0:.0f} s", flush=True)
            with open(args.json, "w") as fh:
                json.dump(bd.RESULTS, fh, indent=1)
    finally:
        summary()


if __name__ == "__main__":
    main()
