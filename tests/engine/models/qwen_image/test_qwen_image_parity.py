"""Qwen-Image whole-pipeline parity with diffusers 0.42.1 (float32, CPU) on the same tiny random
weights, through the shared `FamilyParityMixin` (meta build, parity, deliberate mistakes).

Each checkpoint is written by `engine.models.qwen_image.tiny.write_tiny` (diffusers layout: our
DiT and VAE with fan-in-scaled random weights and sharpened attention, a seeded tiny Qwen2.5-VL,
a BPE tokenizer whose templates tokenize as the real one's, the releases' scheduler config) and
loaded both by diffusers' pipelines and by our loader. The initial noise is given unpacked,
(1, C, 1, h, w), to both (packed for diffusers); sizes are not square. Neither side is told the
schedule: both read the checkpoint's scheduler config (dynamic shift from the image token count,
shift_terminal 0.02).

The tiny edit models VAE-encode their references at `TINY_REFERENCE_AREA` pixels instead of one
megapixel (a megapixel takes a minute on the CPU); diffusers' pipelines get the same area by
patching their module constant (Edit-Plus: `VAE_IMAGE_SIZE`; the original Edit: its
`calculate_dimensions` for the 1024 * 1024 area).

Qwen-Image ships only the diffusers layout: there are no key maps and no official layout to test.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.guidance import combine
from engine.models.qwen_image import tiny
from engine.models.qwen_image.pipelines import (
    EDIT_PIPELINE, EDIT_PLUS_PIPELINE, EDIT_PLUS_TEMPLATE, EDIT_TEMPLATE, REFERENCE_AREA, T2I_TEMPLATE,
)
from engine.models.qwen_image.specs import TINY_REFERENCE_AREA, TINY_VL_AREA
from engine.models.qwen_image.transformer import pack, unpack
from tests.engine.models.parity import NEGATIVE, PROMPT, FamilyParityMixin, our_latents, rel_err

diffusers = pytest.importorskip("diffusers")

QK_GAIN = 1.0
TEXT_GAIN = 3.0
HEIGHT, WIDTH = 48, 80           # not square: 6 x 10 latents, 3 x 5 tokens


def noise(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """Initial noise, unpacked: (1, C, 1, h, w)."""
    return torch.randn(1, 16, 1, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def diffusers_transformer(ckpt_dir: str):
    """diffusers' DiT from `transformer/` (config + strict state dict, without accelerate)."""
    from diffusers import QwenImageTransformer2DModel

    path = os.path.join(ckpt_dir, "transformer")
    model = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(path))
    model.load_state_dict(load_file(os.path.join(path, "diffusion_pytorch_model.safetensors")), strict=True)
    return model.eval()


def vl_processor(ckpt_dir: str):
    """transformers' own Qwen2VLProcessor on the checkpoint's `processor/` (the PIL image processor;
    its constructor's class check would need torchvision for the video processor, so it is skipped)."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = os.path.join(ckpt_dir, "processor")
    with mock.patch.object(Qwen2VLProcessor, "check_argument_for_proper_class", lambda self, name, arg: type(arg)):
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
                                tokenizer=AutoTokenizer.from_pretrained(path), video_processor=None)


class QwenParity(FamilyParityMixin):
    """The Qwen hooks; subclasses name the variant, the diffusers pipeline and the cases."""

    variant: "str | tiny.TinyVariant"

    def write_checkpoint(self, root: str) -> str:
        return tiny.write_tiny(root, self.variant, qk_gain=QK_GAIN, text_gain=TEXT_GAIN)

    def skeletons(self, ckpt_dir: str):
        from engine.models.qwen_image.loader import read_dit_config
        from engine.models.qwen_image.transformer import QwenImageTransformer

        with torch.device("meta"):
            return {"transformer": QwenImageTransformer(read_dit_config(ckpt_dir))}

    def pipeline(self, ckpt_dir: str, cls, **components):
        pipe = cls.from_pretrained(ckpt_dir, transformer=diffusers_transformer(ckpt_dir), **components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def patches(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def call(self, pipe, **kw) -> torch.Tensor:
        """diffusers' latents, unpacked to (C, 1, h, w)."""
        images = kw.get("images") or ([kw["image"]] if "image" in kw else None)
        extra = {"image": images if len(images or ()) > 1 else images[0]} if images else {}
        latents = kw["latents"]
        with self.patches():
            out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=kw["guidance_scale"],
                       height=kw["height"], width=kw["width"], num_inference_steps=kw["steps"],
                       latents=pack(latents, 2), output_type="latent", **extra).images
        return unpack(out, latents.shape[3], latents.shape[4], 2)[0]

    # -- what the diffusers layout alone cannot show -------------------------------------------
    def test_key_maps_both_ways(self, ckpt_dir):
        pytest.skip("Qwen-Image ships only the diffusers layout: no key maps")

    def test_official_layout_loads_to_the_same_output(self, ckpt_dir, ours, tmp_path):
        pytest.skip("Qwen-Image ships only the diffusers layout")

    # -- deliberate mistakes the request cannot express ----------------------------------------
    def test_a_missing_norm_rescale_would_fail(self, ours, ref_latents):
        """Plain CFG instead of true CFG with the per-token norm rescale: far from diffusers."""
        case = next(iter(self.cases))
        predictor = ours.denoise.predictors["transformer"]
        with mock.patch.object(predictor, "combine", combine):
            err = rel_err(our_latents(ours, **self.cases[case]), ref_latents[case])
        assert err > self.margin * self.tol, f"moved only {err:.2e}"

    @pytest.mark.parametrize("off_by", [-1, 1])
    def test_a_wrong_template_crop_would_fail(self, ours, ref_latents, off_by):
        """One template token more or less dropped from the text states: far from diffusers."""
        case = next(iter(self.cases))
        encoder = ours.text.encoder
        wrong = dataclasses.replace(encoder.pipeline, drop_tokens=encoder.pipeline.drop_tokens + off_by)
        with mock.patch.object(encoder, "pipeline", wrong):
            err = rel_err(our_latents(ours, **self.cases[case]), ref_latents[case])
        assert err > self.margin * self.tol, f"moved only {err:.2e}"

    def test_the_schedule_comes_from_the_scheduler_config(self, ours):
        d = ours.spec.defaults
        assert (d.sampler, d.shift_terminal, d.spacing) == ("euler", 0.02, "linear")
        assert d.dynamic_shift is not None and d.dynamic_shift.max_image_seq_len == 8192
        assert ours.spec.guidance == "cfg_renorm"


# --------------------------------------------------------------------------- text-to-image


class TestQwenImage(QwenParity):
    variant = "tiny-qwen-image"
    cases = {"t2i": dict(height=HEIGHT, width=WIDTH, steps=4, guidance_scale=4.0, latents=noise(0)),
             "t2i tall": dict(height=80, width=32, steps=3, guidance_scale=2.5, latents=noise(1, 80, 32))}
    could_fail = {"guidance off": ("t2i", dict(guidance_scale=1.0)),
                  "another noise": ("t2i", dict(latents=noise(5)))}

    def reference(self, ckpt_dir):
        from diffusers import QwenImagePipeline

        pipe = self.pipeline(ckpt_dir, QwenImagePipeline)
        return lambda **kw: self.call(pipe, **kw)

    def test_the_tokenizer_drops_exactly_the_system_part(self, ours):
        """The tiny tokenizer splits the templates as the real Qwen2 tokenizer does: the 34 (64)
        dropped tokens are the system part and `<|im_start|>user\\n`; the prompt follows."""
        tok = ours.text.encoder.tokenizer
        for template, drop in ((T2I_TEMPLATE, 34), (EDIT_TEMPLATE, 64), (EDIT_PLUS_TEMPLATE, 64)):
            prefix = template.split("{}")[0]
            if "<|vision_start|>" in prefix:
                prefix = prefix.split("<|vision_start|>")[0]
            assert prefix.endswith("<|im_start|>user\n")
            assert len(tok(prefix).input_ids) == drop, template[:40]

    def test_the_image_matches_diffusers(self, ckpt_dir, ours):
        """Decoded pixels too (the VAE on one frame), as PNG-ready floats."""
        from diffusers import QwenImagePipeline

        kw = self.cases["t2i"]
        pipe = self.pipeline(ckpt_dir, QwenImagePipeline)
        want = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=HEIGHT, width=WIDTH,
                    num_inference_steps=kw["steps"], latents=pack(kw["latents"], 2), output_type="np").images[0]
        from stages.request import GenerationRequest

        got = ours.run(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=0, output_type="np",
                                         **kw)).output.frames[0]
        assert got.shape == want.shape == (HEIGHT, WIDTH, 3) and want.std() > 1e-3
        assert rel_err(got, want) < self.tol


# --------------------------------------------------------------------------- edit


def _plus_area() -> contextlib.ExitStack:
    """diffusers' Edit-Plus pipeline at the tiny models' image areas."""
    stack = contextlib.ExitStack()
    module = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"
    stack.enter_context(mock.patch(f"{module}.VAE_IMAGE_SIZE", TINY_REFERENCE_AREA))
    stack.enter_context(mock.patch(f"{module}.CONDITION_IMAGE_SIZE", TINY_VL_AREA))
    return stack


class TestQwenImageEdit2511(QwenParity):
    variant = "tiny-qwen-image-edit"   # Edit-Plus with zero_cond_t, as Qwen-Image-Edit-2511
    one, two = picture(3, (56, 40)), picture(4, (40, 64))
    cases = {"edit": dict(image=one, height=HEIGHT, width=WIDTH, steps=4, guidance_scale=4.0, latents=noise(0)),
             "two images": dict(images=[one, two], height=64, width=48, steps=3, guidance_scale=4.0,
                                 latents=noise(2, 64, 48))}
    could_fail = {"guidance off": ("edit", dict(guidance_scale=1.0)),
                  "images swapped": ("two images", dict(images=[two, one]))}

    def reference(self, ckpt_dir):
        from diffusers import QwenImageEditPlusPipeline

        pipe = self.pipeline(ckpt_dir, QwenImageEditPlusPipeline, processor=vl_processor(ckpt_dir))
        assert pipe.transformer.config.zero_cond_t
        return lambda **kw: self.call(pipe, **kw)

    def patches(self):
        return _plus_area()

    def test_references_at_the_step_timestep_would_fail(self, ours, ref_latents):
        """zero_cond_t off (the references modulated at t, as 2509): far from diffusers' 2511."""
        dit = ours.denoise.transformer
        with mock.patch.object(dit, "config", dataclasses.replace(dit.config, zero_cond_t=False)):
            err = rel_err(our_latents(ours, **self.cases["edit"]), ref_latents["edit"])
        assert err > self.margin * self.tol, f"moved only {err:.2e}"

    def test_the_reference_tokens_matter(self, ours, ref_latents):
        """The references dropped from the DiT's sequence (the prompt still sees the image)."""
        from engine.models.qwen_image.adapter import QwenImageAdapter

        original = QwenImageAdapter.model_input

        def without_references(self, latents, t, image, dit, dtype):
            x, timestep, _ = original(self, latents, t, image, dit, dtype)
            return x, timestep, None

        with mock.patch.object(QwenImageAdapter, "model_input", without_references):
            err = rel_err(our_latents(ours, **self.cases["edit"]), ref_latents["edit"])
        assert err > self.margin * self.tol, f"moved only {err:.2e}"

    def test_at_most_three_images(self, ours):
        from stages.request import GenerationRequest, RequestError

        with pytest.raises(RequestError, match="images: at most 3"):
            GenerationRequest(prompt="x", images=[self.one] * 4).resolve(ours.spec)


class TestQwenImageEdit2509(QwenParity):
    variant = tiny.TinyVariant("parity-qwen-image-edit-2509", EDIT_PLUS_PIPELINE)
    cases = {"edit": dict(image=picture(3, (56, 40)), height=HEIGHT, width=WIDTH, steps=3, guidance_scale=4.0,
                          latents=noise(0))}

    def reference(self, ckpt_dir):
        from diffusers import QwenImageEditPlusPipeline

        pipe = self.pipeline(ckpt_dir, QwenImageEditPlusPipeline, processor=vl_processor(ckpt_dir))
        assert not pipe.transformer.config.zero_cond_t
        return lambda **kw: self.call(pipe, **kw)

    def patches(self):
        return _plus_area()

    def test_is_read_as_2509(self, ours):
        assert ours.spec.name == "qwen-image-edit-2509-custom" and ours.spec.max_images == 3


class TestQwenImageEdit(QwenParity):
    variant = tiny.TinyVariant("parity-qwen-image-edit", EDIT_PIPELINE)
    cases = {"edit": dict(image=picture(3, (56, 40)), height=HEIGHT, width=WIDTH, steps=3, guidance_scale=4.0,
                          latents=noise(0))}

    def reference(self, ckpt_dir):
        from diffusers import QwenImageEditPipeline

        pipe = self.pipeline(ckpt_dir, QwenImageEditPipeline, processor=vl_processor(ckpt_dir))
        return lambda **kw: self.call(pipe, **kw)

    def patches(self):
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

        original = module.calculate_dimensions
        def small(area, ratio):
            return original(TINY_REFERENCE_AREA if area == REFERENCE_AREA else area, ratio)

        return mock.patch.object(module, "calculate_dimensions", small)

    def test_is_read_as_the_original_edit(self, ours):
        assert ours.spec.name == "qwen-image-edit-custom" and ours.spec.max_images == 1
