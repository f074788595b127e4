"""Whole-pipeline parity with diffusers 0.42.1 (float32, CPU) on the same tiny random weights.

I2V: tiny-wan itself, loaded by `WanImageToVideoPipeline.from_pretrained` and by our loader.
T2V: a copy of tiny-wan whose DiT is a 16-channel text-to-video DiT (diffusers' `WanPipeline`
cannot drive the 36-channel one), written with diffusers' `save_pretrained`.
Both sides start from the same seed: our noise is drawn on a CPU generator exactly as diffusers
draws it for `generator=torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoint import resolve_checkpoint
from engine.options import EngineOptions
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest

diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

SETTINGS = dict(num_frames=5, height=32, width=48, steps=3, guidance_scale=4.0, shift=3.0)
PROMPT, NEGATIVE, SEED = "a red fox runs in the snow", "blurry, static", 42


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def diffusers_scheduler(ckpt_dir: str, shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_pretrained(os.path.join(ckpt_dir, "scheduler"), flow_shift=shift)


def diffusers_transformer(ckpt_dir: str):
    """diffusers' DiT from the checkpoint's transformer/ folder. (`from_pretrained` of this class
    needs `accelerate` for its keep-in-fp32 loading path; config + strict state dict is the same.)"""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    folder = os.path.join(ckpt_dir, "transformer")
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    model.load_state_dict(load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")), strict=True)
    return model.eval()


def diffusers_call(pipe, output_type: str, seed: int = SEED, **extra):
    return pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=SETTINGS["height"], width=SETTINGS["width"],
        num_frames=SETTINGS["num_frames"], num_inference_steps=SETTINGS["steps"],
        guidance_scale=SETTINGS["guidance_scale"], generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type, **extra,
    ).frames


def our_request(output_type: str, **extra) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler="unipc",
                             output_type=output_type, **SETTINGS, **extra)


@pytest.fixture(scope="module")
def t2v_dir(tiny_wan_dir, tmp_path_factory):
    """tiny-wan with a 16-channel T2V DiT (random, seeded) and a WanPipeline model_index."""
    from diffusers import WanTransformer3DModel

    from engine.models.wan.tiny import TINY_DIT, randomize_

    root = tmp_path_factory.mktemp("tiny-wan-t2v")
    for sub in ("text_encoder", "tokenizer", "vae", "scheduler"):
        os.symlink(os.path.join(tiny_wan_dir, sub), root / sub)
    config = {**TINY_DIT, "in_channels": 16, "image_dim": None, "added_kv_proj_dim": None}
    dit = WanTransformer3DModel(**config)
    randomize_(dit, seed=7)
    dit.save_pretrained(root / "transformer")
    with open(os.path.join(tiny_wan_dir, "model_index.json")) as f:
        index = json.load(f)
    index.update(_class_name="WanPipeline")
    for key in ("image_encoder", "image_processor"):
        index.pop(key)
    (root / "model_index.json").write_text(json.dumps(index))
    return str(root)


@pytest.fixture(scope="module")
def ours_t2v(t2v_dir):
    ckpt = resolve_checkpoint(t2v_dir)
    assert ckpt.spec.tasks == frozenset({"t2v"})
    return LocalPipeline.from_checkpoint(ckpt, EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def ref_t2v(t2v_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(t2v_dir, transformer=diffusers_transformer(t2v_dir),
                                       scheduler=diffusers_scheduler(t2v_dir, SETTINGS["shift"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours_i2v(tiny_wan_dir):
    return LocalPipeline.from_checkpoint(resolve_checkpoint("tiny-wan"),
                                         EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def ref_i2v(tiny_wan_dir):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(
        tiny_wan_dir, transformer=diffusers_transformer(tiny_wan_dir),
        scheduler=diffusers_scheduler(tiny_wan_dir, SETTINGS["shift"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t2v_latents_and_frames_match_diffusers(ours_t2v, ref_t2v):
    ours_lat = ours_t2v.run(our_request("latent")).output.latents
    ref_lat = diffusers_call(ref_t2v, "latent")[0]
    assert ours_lat.shape == ref_lat.shape == (16, 2, 4, 6)
    assert ref_lat.abs().mean() > 0.1  # not degenerate
    assert rel_err(ours_lat, ref_lat) < 1e-4

    ours_np = ours_t2v.run(our_request("np")).output.frames
    ref_np = diffusers_call(ref_t2v, "np")[0]
    assert ours_np.shape == ref_np.shape == (5, 32, 48, 3)
    assert ref_np.std() > 1e-3
    assert rel_err(ours_np, ref_np) < 1e-4


def test_t2v_without_guidance_matches_diffusers(ours_t2v, ref_t2v):
    ours = ours_t2v.run(our_request("latent").model_copy(update={"guidance_scale": 1.0})).output.latents
    ref = ref_t2v(prompt=PROMPT, height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames[0]
    assert rel_err(ours, ref) < 1e-4


def test_t2v_seed_changes_result(ours_t2v, ref_t2v):
    ours = ours_t2v.run(our_request("latent").model_copy(update={"seed": SEED + 1})).output.latents
    ref_same_seed = diffusers_call(ref_t2v, "latent", seed=SEED + 1)[0]
    ref_other_seed = diffusers_call(ref_t2v, "latent")[0]
    assert rel_err(ours, ref_same_seed) < 1e-4
    assert rel_err(ours, ref_other_seed) > 1e-2


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


def test_i2v_latents_and_frames_match_diffusers(ours_i2v, ref_i2v):
    image = _image()
    ours_lat = ours_i2v.run(our_request("latent", image=image)).output.latents
    ref_lat = diffusers_call(ref_i2v, "latent", image=image)[0]
    assert ours_lat.shape == ref_lat.shape == (16, 2, 4, 6)
    assert rel_err(ours_lat, ref_lat) < 1e-4

    ours_np = ours_i2v.run(our_request("np", image=image)).output.frames
    ref_np = diffusers_call(ref_i2v, "np", image=image)[0]
    assert ours_np.shape == ref_np.shape == (5, 32, 48, 3)
    assert rel_err(ours_np, ref_np) < 1e-4


def test_i2v_from_given_latents_matches_diffusers(ours_i2v, ref_i2v):
    image = _image()
    noise = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(11))
    ours = ours_i2v.run(our_request("latent", image=image, latents=noise)).output.latents
    ref = diffusers_call(ref_i2v, "latent", image=image, latents=noise[None].clone())[0]
    assert rel_err(ours, ref) < 1e-4
