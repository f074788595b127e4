"""HunyuanVideo-1.5 whole-pipeline parity with diffusers 0.42.1 (float32, CPU), through the shared
`FamilyParityMixin` (meta build, key maps, parity, deliberate mistakes, official layout).

The checkpoint is `engine.models.hunyuan_video15.tiny.write_tiny` (diffusers layout) with sharper
DiT attention, a scheduler shift (7) and a guider scale (4.5) that differ from the registry's
defaults for the tiny entry: the parity runs leave both to the checkpoint, so ignoring either
fails. The prompt and the negative prompt quote text (straight and curly quotes), so both go
through the ByT5 glyph path. Text-to-video runs diffusers' HunyuanVideo15Pipeline, image-to-video
its HunyuanVideo15ImageToVideoPipeline without a size (the bucket it picks for the image), both
from the same folder.

The text encoders' mistakes that must fail: the Qwen2.5-VL state of the wrong layer (one layer
later), one template token too many cropped, the glyph tokens missing, the negative prompt's glyph
tokens missing (the official pipeline's choice, not diffusers').
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.models.hunyuan_video15 import keymaps, loader, text_encoder, tiny
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest
from tests.engine.models.parity import CPU, SEED, FamilyParityMixin, our_latents, rel_err

diffusers = pytest.importorskip("diffusers")

PROMPT = 'a neon sign says "OPEN 24h" above a “café” door, rain at night'
NEGATIVE = 'blurry, the word "CLOSED"'
SHIFT, GUIDANCE = 7.0, 4.5   # the checkpoint's scheduler and guider (the tiny entry's defaults: 5.0, 6.0)


def image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


class TestHunyuanVideo15(FamilyParityMixin):
    cases = {
        "t2v": dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, height=48, width=80, steps=4),
        "i2v": dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, steps=4, image=image()),
    }
    could_fail = {
        "guidance off": ("t2v", dict(guidance_scale=1.0)),
        "the registry's shift": ("t2v", dict(shift=5.0)),
        "the negative prompt's quotes dropped": ("t2v", dict(negative_prompt="blurry, the word CLOSED")),
        "the image ignored (its crop size, no image)": ("i2v", dict(image=None, height=48, width=64)),
    }
    official_changes = {"shift": SHIFT, "guidance_scale": GUIDANCE}

    # -- hooks ---------------------------------------------------------------------------------
    def write_checkpoint(self, root: str) -> str:
        return tiny.write_tiny(root, qk_gain=3.0, scheduler={"shift": SHIFT}, guider={"guidance_scale": GUIDANCE})

    def write_official(self, diffusers_dir: str, root: str) -> str:
        return tiny.write_official_layout(diffusers_dir, root)

    def reference(self, ckpt_dir: str):
        from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

        t2v = HunyuanVideo15Pipeline.from_pretrained(ckpt_dir)
        i2v = HunyuanVideo15ImageToVideoPipeline.from_pretrained(ckpt_dir)
        for pipe in (t2v, i2v):
            pipe.set_progress_bar_config(disable=True)
        assert t2v.guider.guidance_scale == GUIDANCE and t2v.scheduler.config.shift == SHIFT
        return functools.partial(self.call, t2v, i2v)

    @staticmethod
    def call(t2v, i2v, output_type: str = "latent", **kw):
        common = dict(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"], num_frames=kw["num_frames"],
                      num_inference_steps=kw["steps"], generator=torch.Generator("cpu").manual_seed(SEED),
                      output_type=output_type)
        if "image" in kw:
            return i2v(image=kw["image"], **common).frames[0]
        return t2v(height=kw["height"], width=kw["width"], **common).frames[0]

    def key_maps(self, ckpt_dir: str):
        # the VAE's names map one to one; the DiT's (with its split/swapped tensors) are tested in
        # test_transformer.py
        vae = load_file(os.path.join(ckpt_dir, "vae", "diffusion_pytorch_model.safetensors"))
        return [("vae", vae, keymaps.vae_diffusers_to_official, keymaps.vae_official_to_diffusers)]

    def skeletons(self, ckpt_dir: str):
        from engine.models.hunyuan_video15.transformer import HunyuanVideo15DiT
        from engine.models.hunyuan_video15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig

        config = loader.read_dit_config(ckpt_dir, "diffusers", None, 0)
        vae_config = HunyuanVideo15VAEConfig.from_dict(loader.read_json(os.path.join(ckpt_dir, "vae", "config.json")))
        with torch.device("meta"):
            return {"transformer": HunyuanVideo15DiT(config), "vae": HunyuanVideo15VAE(vae_config)}

    # -- family-specific -----------------------------------------------------------------------
    def test_the_checkpoint_sets_the_defaults(self, ours):
        spec = ours.spec
        assert spec.name == "tiny-hunyuanvideo-1.5" and spec.tasks == frozenset({"t2v", "i2v"})
        assert (spec.defaults.shift, spec.defaults.guidance_scale, spec.defaults.sampler) == (SHIFT, GUIDANCE, "euler")
        assert spec.defaults.spacing == "linear_to_zero"

    def test_image_to_video_size_is_diffusers_bucket(self, ours):
        request = GenerationRequest(prompt=PROMPT, image=image()).resolve(ours.spec)
        assert (request.height, request.width) == (48, 64)        # the 40x56 image's bucket at target 64
        request = GenerationRequest(prompt=PROMPT, image=image(), height=32, width=80).resolve(ours.spec)
        assert (request.height, request.width) == (32, 80)        # a given size wins

    def test_frames_match_diffusers(self, ours, ref):
        """Decoded pixels (the VAE decode after the loop)."""
        kw = self.cases["t2v"]
        want = ref(output_type="np", **kw)
        got = ours.run(GenerationRequest(seed=SEED, output_type="np", **kw)).output.frames
        assert got.shape == want.shape == (5, 48, 80, 3) and want.std() > 1e-3
        assert rel_err(got, want) < self.tol

    def test_the_template_crop_is_the_real_layout(self, ours):
        """The tiny tokenizer cuts like Qwen2.5-VL's: the first kept token is the prompt's first."""
        tok = ours.text.encoder.tokenizer
        ids = tok.apply_chat_template([text_encoder.chat("xyz")], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"][0]
        assert tok.convert_ids_to_tokens(ids[text_encoder.CROP_START - 2:text_encoder.CROP_START + 1]) == \
            ["r", "Ċ", "x"]

    def test_text_encoder_mistakes_would_fail(self, ckpt_dir, ours, ref_latents, monkeypatch):
        want, kw = ref_latents["t2v"], self.cases["t2v"]
        encoder = ours.text.encoder
        # 1. one template token too many cropped
        monkeypatch.setattr(encoder, "crop_start", text_encoder.CROP_START + 1)
        assert rel_err(our_latents(ours, **kw), want) > self.margin * self.tol, "crop + 1"
        monkeypatch.undo()
        # 2. no glyph tokens (the quoted text not read)
        monkeypatch.setattr(text_encoder, "glyph_text", lambda prompt: None)
        assert rel_err(our_latents(ours, **kw), want) > self.margin * self.tol, "no glyphs"
        monkeypatch.undo()
        # 3. the Qwen2.5-VL state one layer later (hidden_states[-2] instead of [-3])
        one_later = functools.partial(loader.build_qwen_text_model, skipped_layers=text_encoder.SKIPPED_LAYERS - 1)
        monkeypatch.setattr(loader, "build_qwen_text_model", one_later)
        from engine.checkpoint import resolve_checkpoint
        from stages.text_encode import TextEncodeStage

        wrong = TextEncodeStage.from_checkpoint(resolve_checkpoint(ckpt_dir), CPU)
        pipe = LocalPipeline(ours.spec, wrong, ours.denoise, ours.decode, ours.image)
        assert rel_err(our_latents(pipe, **kw), want) > self.margin * self.tol, "hidden_states[-2]"


# --------------------------------------------------------------------------- step-distilled (MeanFlow)


def test_step_distilled_image_to_video_matches_diffusers(tmp_path, monkeypatch):
    """A MeanFlow DiT (the 480p I2V step-distilled release's kind) with the checkpoint's guider at 1
    (no negative branch): each step also embeds the next step's timestep t_r (0 after the last),
    as diffusers' image-to-video pipeline; t_r left at 0 must fail."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    from engine.checkpoint import resolve_checkpoint
    from engine.models.hunyuan_video15.adapter import HunyuanVideo15Adapter

    ckpt_dir = tiny.write_tiny(str(tmp_path / "meanflow"), qk_gain=3.0, dit={"use_meanflow": True},
                               scheduler={"shift": SHIFT}, guider={"guidance_scale": 1.0})
    ckpt = resolve_checkpoint(ckpt_dir)
    assert ckpt.spec.guidance == "none" and ckpt.spec.defaults.guidance_scale == 1.0
    assert ckpt.spec.tasks == frozenset({"i2v"})
    ours = LocalPipeline.from_checkpoint(ckpt, CPU)
    ref = HunyuanVideo15ImageToVideoPipeline.from_pretrained(ckpt_dir)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_frames=5, steps=3, image=image())
    want = TestHunyuanVideo15.call(None, ref, negative_prompt=None, **kw)
    got = our_latents(ours, **kw)
    assert want.abs().mean() > 0.1 and rel_err(got, want) < 1e-3
    monkeypatch.setattr(HunyuanVideo15Adapter, "uses_next_timestep", False)
    assert rel_err(our_latents(ours, **kw), want) > 1e-2
