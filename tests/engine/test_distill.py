"""Step-distilled Wan entries (engine/models/wan/specs.py): 4 fixed timesteps shifted by 5, Euler
without fresh noise, guidance off, Wan2.2-Lightning's two experts 2 steps each; their defaults make
a bare request do the right thing."""
from __future__ import annotations

import pytest
import torch

import engine.models.wan.family  # noqa: F401  (registers the Wan entries)
from engine.denoise import make_phases, phase_at
from engine.registry import _REGISTRY
from engine.samplers import make_sampler
from stages.request import GenerationRequest, RequestError

SIGMAS = [1.0, 0.9375, 0.8333333, 0.625, 0.0]   # shift 5 on linspace(1, 0, 1001)[1000 - t] (LightX2V)


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b-distill", "wan2.1-i2v-14b-480p-distill",
                                  "wan2.2-t2v-a14b-lightning", "wan2.2-i2v-a14b-lightning"])
def test_defaults_are_the_distilled_schedule(name):
    spec = _REGISTRY[name]
    image = None if "t2v" in name else torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    request = GenerationRequest(prompt="a fox", image=image).resolve(spec)
    assert (request.steps, request.timesteps, request.shift, request.sampler) == (4, (1000.0, 750.0, 500.0, 250.0), 5.0, "euler")
    assert not request.do_cfg
    sampler = make_sampler(request.sampler, request.steps, request.shift, timesteps=request.timesteps)
    assert torch.allclose(sampler.sigmas.float(), torch.tensor(SIGMAS), atol=1e-6)
    assert torch.allclose(sampler.timesteps.float(), 1000 * torch.tensor(SIGMAS[:-1]), atol=1e-3)
    # Euler without fresh noise: x0 = x - sigma v, next = x0 + sigma' v (LightX2V's step-distill update)
    x, v = torch.randn(4), torch.randn(4)
    assert torch.allclose(sampler.step(v, 0, x), x + (SIGMAS[1] - SIGMAS[0]) * v, atol=1e-6)
    assert torch.allclose(sampler.step(v, 1, x), x + (SIGMAS[2] - SIGMAS[1]) * v, atol=1e-6)
    if len(spec.experts) == 2:     # Lightning: two steps per expert (LightX2V boundary_step_index 2)
        phases = make_phases(spec, request.guidance_scale, request.guidance_scale_2)
        assert [phase_at(phases, t).expert for t in sampler.timesteps] == \
            ["transformer", "transformer", "transformer_2", "transformer_2"]
    with pytest.raises(RequestError, match="guidance_scale: must be <= 1"):
        GenerationRequest(prompt="a fox", image=image, guidance_scale=5.0).resolve(spec)
    with pytest.raises(RequestError, match="steps: must be 4"):
        GenerationRequest(prompt="a fox", image=image, steps=50).resolve(spec)


def test_a_folder_is_still_its_base_entry():
    """Same architectures: detection picks the base entry first (the distilled one by name)."""
    from engine.models.wan.specs import SPECS

    names = [spec.name for spec, _ in SPECS]
    assert names.index("wan2.1-t2v-14b") < names.index("wan2.1-t2v-14b-distill")
    assert names.index("wan2.2-t2v-a14b") < names.index("wan2.2-t2v-a14b-lightning")
