"""Denoise stage: initial noise -> sampler loop with classifier-free guidance -> Latents.

Initial noise (when the request brings none): `torch.randn((C, F_lat, H_lat, W_lat),
generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`, drawn on the CPU so a
seed gives the same video on every device. diffusers' Wan pipelines draw the same numbers for
`generator=torch.Generator("cpu").manual_seed(seed)` (their batch-1 shape has the same count).
Latents stay float32 through the loop; the transformer sees them cast to the engine dtype.

Text-to-video on a DiT built for image conditioning too (tiny-wan: 36 input channels with an
image branch): the conditioning channels are zeros (an all-zero frame mask: no frame is given)
and the image tokens are one zero token. Real Wan2.1 checkpoints are T2V-only or I2V-only, and
the request type refuses the other task for them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from engine.guidance import CFGPredictor, GuidedPredictor
from engine.offload import resident
from stages.base import Cancelled, Stage, StageError, expect_finite, expect_shape
from stages.payloads import ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from engine.options import EngineOptions

ProgressFn = Callable[[int, int], None]
"""progress(step_done, total_steps), called after every denoising step."""
CancelFn = Callable[[], bool]
"""should_cancel(), asked before every step; True stops the request with `Cancelled`."""

__all__ = ["Cancelled", "DenoiseStage", "initial_noise"]


def initial_noise(request: ResolvedRequest) -> torch.Tensor:
    """(C, F_lat, H_lat, W_lat) float32 CPU: the request's latents, or seeded Gaussian noise."""
    if request.latents is not None:
        return request.latents.to(torch.float32)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return torch.randn(request.latent_shape, generator=generator, dtype=torch.float32)


class DenoiseStage(Stage):
    """The sampler loop around the DiT. One instance serves many requests (no per-request state)."""

    name = "denoise"
    output_type = Latents

    def __init__(self, transformer: nn.Module, options: "EngineOptions",
                 predictor: GuidedPredictor | None = None) -> None:
        self.transformer = transformer
        self.options = options
        self.predictor = predictor if predictor is not None else CFGPredictor(transformer, options.cfg_batch)

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions") -> "DenoiseStage":
        from engine.families import get_family

        return cls(get_family(ckpt.spec.family).load_transformer(ckpt, options), options)

    def forward(self, request: ResolvedRequest, text: TextEmbeds, image: ImageCond | None = None,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Latents:
        from engine.samplers import make_sampler

        device, dtype = self.options.torch_device, self.options.torch_dtype
        if request.do_cfg and text.negative_context is None:
            raise ValueError("denoise: guidance is on but the text embeddings have no negative_context")

        # 1. Initial noise, float32 on the device.
        latents = initial_noise(request).to(device)[None]                    # (1, C, F_lat, H_lat, W_lat)

        # 2. Conditioning in the model dtype.
        context = text.context.to(device, dtype)[None]                       # (1, L, D)
        negative = text.negative_context.to(device, dtype)[None] if request.do_cfg else None
        if image is None:
            image = self._no_image(request)
        cond = clip = None
        if image is not None:
            cond = image.latent_cond.to(device, dtype)[None]                 # (1, C_cond, F_lat, H_lat, W_lat)
            if image.clip_tokens is not None:
                clip = image.clip_tokens.to(device, dtype)[None]             # (1, 257, D_img)

        # 3. Sampler loop: velocity with guidance, then one sampler step.
        sampler = make_sampler(request.sampler, request.steps, request.shift)
        timesteps = sampler.timesteps.to(device, torch.float32)          # (steps,), one copy to the device
        with resident(self.transformer):  # offload='model': the weights go to the GPU once per request
            for i in range(request.steps):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"request cancelled before step {i + 1} of {request.steps}")
                x = latents.to(dtype)
                if cond is not None:
                    x = torch.cat([x, cond], dim=1)                          # (1, C + C_cond, F_lat, H_lat, W_lat)
                t = timesteps[i:i + 1]                                       # (1,)
                velocity = self.predictor(x, t, context, negative, request.guidance_scale, clip)
                latents = sampler.step(velocity, i, latents).to(torch.float32)
                if progress is not None:
                    progress(i + 1, request.steps)

        return Latents(latents=latents[0].cpu())

    def _no_image(self, request: ResolvedRequest) -> ImageCond | None:
        """Zero conditioning for text-to-video on a DiT that also takes an image (see module doc)."""
        config = getattr(self.transformer, "config", None)
        extra = getattr(config, "in_channels", request.latent_shape[0]) - request.latent_shape[0]
        image_dim = getattr(config, "image_dim", None)
        if extra <= 0 and image_dim is None:
            return None
        _, f_lat, h_lat, w_lat = request.latent_shape
        return ImageCond(clip_tokens=None if image_dim is None else torch.zeros(1, image_dim),
                         latent_cond=torch.zeros(max(extra, 0), f_lat, h_lat, w_lat))

    def check_output(self, request: ResolvedRequest, out: Latents) -> None:
        expect_shape(self.name, "latents", out.latents, request.latent_shape)
        expect_finite(self.name, "latents", out.latents)
        if out.latents.dtype != torch.float32:
            raise StageError(f"denoise: latents are {out.latents.dtype}, expected float32")
