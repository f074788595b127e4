"""Denoise stage: initial noise -> the phased sampler loop (engine/denoise.py) -> Latents.

Initial noise (when the request brings none): `torch.randn((C, F_lat, H_lat, W_lat),
generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`, drawn on the CPU so a
seed gives the same video on every device. diffusers' Wan pipelines draw the same numbers for
`generator=torch.Generator("cpu").manual_seed(seed)` (their batch-1 shape has the same count).
Latents stay float32 through the loop; the DiT sees them cast to the engine dtype. How image
conditioning and timesteps enter the DiT is the family adapter's (engine/families.DiTAdapter).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from engine.denoise import CancelFn, ProgressFn, make_phases, run_phases
from engine.guidance import GuidedPredictor, combiner
from engine.parallel import guided_predictors
from stages.base import Cancelled, Stage, StageError, expect_finite, expect_shape
from stages.payloads import ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.families import DiTAdapter
    from engine.loading import Checkpoint
    from engine.options import EngineOptions
    from engine.registry import ModelSpec

__all__ = ["CancelFn", "Cancelled", "DenoiseStage", "ProgressFn", "initial_noise"]


def lora_keys(spec: "ModelSpec"):
    """The family's LoRA key map (engine.lora.LoRAKeys; None when it declares none)."""
    from engine.families import get_family

    try:
        return getattr(get_family(spec.family), "lora_keys", None)
    except KeyError:  # a spec of no registered family (test fakes)
        return None


def load_dits_with_loras(ckpt: "Checkpoint", options: "EngineOptions") -> dict[str, nn.Module]:
    """The family's DiTs with the engine options' LoRAs applied (engine.lora: merged into 16-bit
    weights, beside 8-bit linears)."""
    from engine.families import get_family
    from engine.lora import apply_load_time_loras

    dits = get_family(ckpt.spec.family).load_dits(ckpt, options)
    apply_load_time_loras(dits, options, ckpt.spec, lora_keys(ckpt.spec))
    return dits


def initial_noise(request: ResolvedRequest) -> torch.Tensor:
    """(C, F_lat, H_lat, W_lat) float32 CPU: the request's latents, or seeded Gaussian noise."""
    if request.latents is not None:
        return request.latents.to(torch.float32)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return torch.randn(request.latent_shape, generator=generator, dtype=torch.float32)


class DenoiseStage(Stage):
    """The sampler loop around the model's DiTs. One instance serves many requests (no
    per-request state): a request's LoRAs (engine/lora.py, read once and kept in `loras`, a
    bounded LRU) and feature cache (engine/cache.py) are applied for its loop only. `cache_group`:
    the process group whose ranks must take the same cache decisions (the DiT worker's world)."""

    name = "denoise"
    output_type = Latents

    def __init__(self, dits: Mapping[str, nn.Module], adapter: "DiTAdapter", spec: "ModelSpec",
                 options: "EngineOptions", predictors: Mapping[str, GuidedPredictor] | None = None,
                 cache_group=None) -> None:
        from engine.lora import LoRABank
        missing = [e.name for e in spec.experts if e.name not in dits]
        if missing:
            raise ValueError(f"{spec.name}: DiTs missing for experts {missing} (given: {sorted(dits)})")
        self.dits = dict(dits)
        self.adapter = adapter
        self.spec = spec
        self.options = options
        self.predictors = dict(predictors) if predictors is not None else guided_predictors(
            self.dits, options, combine_fn=combiner(spec.guidance, spec.latent.patch))
        self.loras = LoRABank(lora_keys(spec), options.torch_device, options.torch_dtype,
                              capacity=options.lora_cache, lora_dir=options.lora_dir)
        self.cache_group = cache_group

    @property
    def transformer(self) -> nn.Module:
        """The first (or only) expert's DiT."""
        return self.dits[self.spec.experts[0].name]

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions") -> "DenoiseStage":
        from engine.families import get_family

        family = get_family(ckpt.spec.family)
        dits = load_dits_with_loras(ckpt, options)
        return cls(dits, family.adapter(ckpt.spec), ckpt.spec, options)

    def forward(self, request: ResolvedRequest, text: TextEmbeds, image: ImageCond | None = None,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Latents:
        from engine.samplers import make_sampler

        device, dtype = self.options.torch_device, self.options.torch_dtype
        if request.do_cfg and text.negative_context is None:
            raise ValueError("denoise: guidance is on but the text embeddings have no negative_context")

        # 1. Initial noise, float32 on the device; conditioning in the model dtype.
        latents = initial_noise(request).to(device)[None]                    # (1, C, F_lat, H_lat, W_lat)
        context = self.adapter.text_input(text.context, device, dtype)       # Wan: (1, L, D)
        negative = self.adapter.text_input(text.negative_context, device, dtype) if request.do_cfg else None

        # 2. The phased sampler loop (the schedule as the model's pipeline builds it; euler_a draws
        #    its step noise from the request's seed).
        d = self.spec.defaults
        _, f_lat, h_lat, w_lat = request.latent_shape
        patch = self.spec.latent.patch
        sampler = make_sampler(
            request.sampler, request.steps, request.shift, timesteps=request.timesteps,
            dynamic=d.dynamic_shift if request.dynamic_shift else None, shift_terminal=d.shift_terminal,
            spacing=d.spacing, image_seq_len=f_lat * (h_lat // patch) * (w_lat // patch), seed=request.seed)
        phases = make_phases(self.spec, request.guidance_scale, request.guidance_scale_2)

        # 3. The request's LoRAs and feature cache, for this loop only.
        cache = self._feature_cache(request)
        with contextlib.ExitStack() as stack:
            if request.lora:
                stack.enter_context(self.loras.applied(self.dits, self.spec.experts, self._lora_uses(request)))
            if cache is not None:
                stack.enter_context(cache.applied(self.dits))
            latents = run_phases(phases, self.predictors, self.dits, self.adapter, sampler, latents, context,
                                 negative, image, dtype, progress=progress, should_cancel=should_cancel,
                                 on_step=cache.begin_step if cache is not None else None)
        return Latents(latents=latents[0].cpu())

    def _lora_uses(self, request: ResolvedRequest) -> list:
        from engine.lora import LoRAUse

        return [LoRAUse(self.loras.resolve_name(lora.name) if lora.name is not None else lora.path,
                        lora.strength, lora.expert) for lora in request.lora]

    def _feature_cache(self, request: ResolvedRequest):
        from engine.cache import FeatureCache, cache_config

        config = cache_config(request.cache, request.cache_options, self.spec.name)
        return None if config is None else FeatureCache(config, request.steps, self.cache_group)

    def check_output(self, request: ResolvedRequest, out: Latents) -> None:
        expect_shape(self.name, "latents", out.latents, request.latent_shape)
        expect_finite(self.name, "latents", out.latents)
        if out.latents.dtype != torch.float32:
            raise StageError(f"denoise: latents are {out.latents.dtype}, expected float32")
