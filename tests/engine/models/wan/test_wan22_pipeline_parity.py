"""Wan2.2 whole-pipeline parity with diffusers 0.42.1 (float32, CPU) on the same tiny random
weights, through the shared `FamilyParityMixin` (meta build, key maps both ways, parity, deliberate
mistakes, official layout).

Each checkpoint is written by `engine.models.wan.tiny.write_tiny` (diffusers layout; fan-in-scaled
random weights, attention sharpened with `qk_gain` so that what is attended matters) and loaded
both by diffusers' pipelines and by our loader. The solver and shift are left to the checkpoint's
own scheduler config on both sides (its flow_shift differs from the registry's default for the
variant, so ignoring it fails the test).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.denoise import make_phases, phase_at
from engine.models.wan import keymap_dit, keymap_t5, keymap_vae, tiny
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest
from tests.engine.models.parity import NEGATIVE, PROMPT, SEED, FamilyParityMixin, our_latents, rel_err

diffusers = pytest.importorskip("diffusers")

QK_GAIN = 3.0
FLOW_SHIFT = 3.0   # the diffusers Wan2.2 A14B releases' scheduler flow_shift (tiny entry: 3.0 too)
TI2V_SHIFT = 5.0   # the diffusers TI2V-5B release's (the tiny entry's default is 3.0)

A14B_T2V = tiny.TinyVariant(
    "parity-wan2.2-a14b-t2v", {**tiny.TINY_A14B_DIT, "in_channels": 16}, tiny.TINY_VAE, experts=2,
    model_index={"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                 "transformer_2": ["diffusers", "WanTransformer3DModel"],
                 "image_encoder": [None, None], "image_processor": [None, None]})


def diffusers_transformer(ckpt_dir: str, folder: str):
    """diffusers' DiT from a `transformer*/` folder (config + strict state dict: `from_pretrained`
    of this class would need `accelerate` for its keep-in-fp32 path)."""
    from diffusers import WanTransformer3DModel

    path = os.path.join(ckpt_dir, folder)
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    model.load_state_dict(load_file(os.path.join(path, "diffusion_pytorch_model.safetensors")), strict=True)
    return model.eval()


def image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


class WanParity(FamilyParityMixin):
    """The Wan hooks; subclasses name the variant, the diffusers pipeline and the cases."""

    variant: "str | tiny.TinyVariant"
    shift: float
    experts = ("transformer",)

    def write_checkpoint(self, root: str) -> str:
        tiny.write_tiny(root, self.variant, qk_gain=QK_GAIN, scheduler={"flow_shift": self.shift})
        return root

    def write_official(self, diffusers_dir: str, root: str) -> str:
        return tiny.write_official_layout(diffusers_dir, root)

    @property
    def official_changes(self) -> dict:  # the official layout samples at the registry's defaults
        return {"shift": self.shift, "sampler": "unipc"}

    def pipeline(self, ckpt_dir: str, cls):
        dits = {name: diffusers_transformer(ckpt_dir, name) for name in self.experts}
        pipe = cls.from_pretrained(ckpt_dir, **dits)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, pipe, **kw):
        extra = {k: kw[k] for k in ("image", "guidance_scale_2") if k in kw}
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=kw["height"], width=kw["width"],
                    num_frames=kw["num_frames"], num_inference_steps=kw["steps"],
                    guidance_scale=kw["guidance_scale"], generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="latent", **extra).frames[0]

    def key_maps(self, ckpt_dir: str):
        vae = load_file(os.path.join(ckpt_dir, "vae", "diffusion_pytorch_model.safetensors"))
        vae22 = "encoder.down_blocks.0.resnets.0.conv1.weight" in vae  # the 2.2 VAE nests its blocks
        t5 = load_file(os.path.join(ckpt_dir, "text_encoder", "model.safetensors"))
        t5.setdefault("encoder.embed_tokens.weight", t5["shared.weight"])  # tied: the official file has both
        maps = [("text encoder", t5, keymap_t5.hf_to_official, keymap_t5.official_to_hf),
                ("vae", vae, *((keymap_vae.diffusers_to_official_vae22, keymap_vae.official_vae22_to_diffusers)
                               if vae22 else (keymap_vae.diffusers_to_official, keymap_vae.official_to_diffusers)))]
        for name in self.experts:
            dit = load_file(os.path.join(ckpt_dir, name, "diffusion_pytorch_model.safetensors"))
            maps.append((name, dit, keymap_dit.diffusers_to_official, keymap_dit.official_to_diffusers))
        return maps

    def skeletons(self, ckpt_dir: str):
        from engine.loading import read_json
        from engine.models.wan.transformer import WanDiTConfig, WanTransformer

        out = {}
        for name in self.experts:
            config = WanDiTConfig.from_dict(read_json(os.path.join(ckpt_dir, name, "config.json")))
            with torch.device("meta"):
                out[name] = WanTransformer(config)
        return out


# --------------------------------------------------------------------------- A14B text-to-video


class TestWan22A14BT2V(WanParity):
    variant, shift = A14B_T2V, FLOW_SHIFT
    experts = ("transformer", "transformer_2")
    cases = {"t2v": dict(num_frames=5, height=32, width=48, steps=10, guidance_scale=4.0, guidance_scale_2=3.0)}
    could_fail = {"guidance off": ("t2v", dict(guidance_scale=1.0)),
                  "another low-noise scale": ("t2v", dict(guidance_scale_2=4.0))}

    def reference(self, ckpt_dir):
        from diffusers import WanPipeline

        pipe = self.pipeline(ckpt_dir, WanPipeline)
        return lambda **kw: self.call(pipe, **kw)

    def test_the_checkpoint_is_read_as_two_experts_with_its_scheduler(self, ours):
        spec = ours.spec
        assert [e.name for e in spec.experts] == ["transformer", "transformer_2"]
        assert spec.boundary_ratio == 0.875 and spec.tasks == frozenset({"t2v"})
        assert spec.defaults.shift == FLOW_SHIFT  # from the checkpoint's scheduler config

    def test_both_experts_serve_and_the_boundary_is_hit_exactly(self, ours):
        from engine.samplers import make_sampler

        spec = ours.spec
        timesteps = make_sampler(spec.defaults.sampler, 10, spec.defaults.shift).timesteps
        assert 875.0 in timesteps.tolist()  # the boundary 0.875 * 1000 is one of the timesteps
        phases = make_phases(spec, 4.0, 3.0)
        experts = [phase_at(phases, t).expert for t in timesteps]
        assert experts[timesteps.tolist().index(875.0)] == "transformer"  # equality -> high noise, as diffusers
        assert {"transformer", "transformer_2"} == set(experts)

    def test_boundary_equality_matters(self, ours, ref_latents):
        """Moving the boundary just above 875 sends that step to the low-noise expert: a visible change."""
        from stages.denoise import DenoiseStage

        d = ours.denoise
        moved = dataclasses.replace(d.spec, boundary_ratio=0.8751)
        pipe = LocalPipeline(moved, ours.text, DenoiseStage(d.dits, d.adapter, moved, d.options), ours.decode)
        assert rel_err(our_latents(pipe, **self.cases["t2v"]), ref_latents["t2v"]) > self.margin * self.tol


# --------------------------------------------------------------------------- TI2V-5B (48 channels)


class TestWan22TI2V(WanParity):
    variant, shift = "tiny-wan2.2-ti2v", TI2V_SHIFT
    cases = {"t2v": dict(num_frames=9, height=64, width=96, steps=4, guidance_scale=5.0),
             "i2v": dict(num_frames=9, height=64, width=96, steps=4, guidance_scale=5.0, image=image())}
    could_fail = {"guidance off": ("t2v", dict(guidance_scale=1.0))}

    def reference(self, ckpt_dir):
        from diffusers import WanImageToVideoPipeline, WanPipeline

        t2v, i2v = self.pipeline(ckpt_dir, WanPipeline), self.pipeline(ckpt_dir, WanImageToVideoPipeline)
        assert t2v.config.expand_timesteps and i2v.config.expand_timesteps
        return lambda **kw: self.call(i2v if "image" in kw else t2v, **kw)

    def test_frames_match_diffusers(self, ckpt_dir, ours, ref):
        """Decoded pixels too (the Wan2.2 VAE after the final frame-0 blend), T2V and I2V."""
        from diffusers import WanImageToVideoPipeline, WanPipeline

        for case, cls in (("t2v", WanPipeline), ("i2v", WanImageToVideoPipeline)):
            kw = self.cases[case]
            pipe = self.pipeline(ckpt_dir, cls)
            extra = {"image": kw["image"]} if "image" in kw else {}
            want = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=kw["height"], width=kw["width"],
                        num_frames=kw["num_frames"], num_inference_steps=kw["steps"],
                        guidance_scale=kw["guidance_scale"], generator=torch.Generator("cpu").manual_seed(SEED),
                        output_type="np", **extra).frames[0]
            got = ours.run(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, output_type="np",
                                             **kw)).output.frames
            assert got.shape == want.shape == (9, 64, 96, 3) and want.std() > 1e-3
            assert rel_err(got, want) < self.tol, case

    def test_mistimed_image_tokens_would_fail(self, ours, ref_latents, monkeypatch):
        """The image's tokens at the step's timestep instead of 0: far from diffusers."""
        from engine.models.wan.adapter import FirstFrameAdapter

        original = FirstFrameAdapter.model_input

        def mistimed(self, latents, t, image, dit, dtype):
            x, _, tokens = original(self, latents, t, image, dit, dtype)
            return x, t.reshape(1), tokens

        monkeypatch.setattr(FirstFrameAdapter, "model_input", mistimed)
        assert rel_err(our_latents(ours, **self.cases["i2v"]), ref_latents["i2v"]) > self.margin * self.tol
