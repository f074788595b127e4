"""Stage plumbing with small fake components: contracts, CFG batching, noise, progress, cancel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.guidance import CFGPredictor
from engine.options import EngineOptions
from stages.base import Cancelled, StageError
from stages.decode import DecodeFramesStage, DecodeStage
from engine.conditioning import image_to_tensor
from engine.models.wan.adapter import first_frame_mask
from stages.denoise import initial_noise
from stages.payloads import EncodedVideo, ImageCond, Latents, TextEmbeds, VideoFrames
from stages.request import GenerationRequest
from stages.text_encode import TextEncodeStage
from stages.video import read_mp4
from tests.stages.fakes import (IMAGE_DIM, SPEC, TEXT_DIM, TEXT_LEN, FakeImageEncoder, FakeTextEncoder,
                                FakeTransformer, FakeVAE, denoise_stage, fake_pipeline, image_stage)

torch.set_num_threads(1)
CPU = EngineOptions(device="cpu", dtype="float32")
IMAGE = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))


def resolve(**kw):
    return GenerationRequest(**{"prompt": "a red fox", "seed": 3, **kw}).resolve(SPEC)


# ------------------------------------------------------------------ guidance

@pytest.mark.parametrize("batched,calls", [(False, [1, 1]), (True, [2])])
def test_cfg_two_batch1_forwards_or_one_batch2_forward(batched, calls):
    dit = FakeTransformer(in_channels=16, image_dim=None)
    x = torch.randn(1, 16, 2, 4, 6)
    t = torch.tensor([700.0])
    ctx, neg = torch.randn(1, TEXT_LEN, TEXT_DIM), torch.randn(1, TEXT_LEN, TEXT_DIM)
    guided = CFGPredictor(dit, batched)(x, t, ctx, neg, 4.0)
    assert dit.batch_sizes == calls
    cond, uncond = dit(x, t, ctx), dit(x, t, neg)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond))
    dit.batch_sizes.clear()
    off = CFGPredictor(dit, batched)(x, t, ctx, None, 4.0)
    assert dit.batch_sizes == [1]
    torch.testing.assert_close(off, cond)


def test_cfg_passes_image_tokens_to_both_branches():
    dit = FakeTransformer()
    x, t = torch.randn(1, 36, 2, 4, 6), torch.tensor([500.0])
    ctx, neg, img = torch.randn(1, 8, 4), torch.randn(1, 8, 4), torch.randn(1, 5, IMAGE_DIM)
    cond, uncond = dit(x, t, ctx, img), dit(x, t, neg, img)
    for batched in (False, True):
        guided = CFGPredictor(dit, batched)(x, t, ctx, neg, 2.5, img)
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond))


# ------------------------------------------------------------------ stage contract

def test_stage_needs_resolved_request():
    with pytest.raises(TypeError, match="ResolvedRequest"):
        TextEncodeStage(FakeTextEncoder())(GenerationRequest(prompt="a"))


def test_text_stage_encodes_negative_only_with_guidance():
    enc = FakeTextEncoder()
    stage, timings = TextEncodeStage(enc), {}
    out = stage(resolve(), timings=timings)
    assert enc.calls == [["a red fox", "bad"]]
    assert isinstance(out, TextEmbeds) and out.context.shape == (TEXT_LEN, TEXT_DIM)
    assert not torch.equal(out.context, out.negative_context)
    assert list(timings) == ["text_encode"] and timings["text_encode"] >= 0
    off = stage(resolve(guidance_scale=1.0))
    assert enc.calls[-1] == ["a red fox"] and off.negative_context is None
    torch.testing.assert_close(off.context, out.context)


def test_output_contract_violation_is_a_stage_error():
    vae = FakeVAE()
    vae.decode_shape_bug = True
    latents = Latents(torch.zeros(16, 2, 4, 6))
    with pytest.raises(StageError, match="frames have shape"):
        DecodeFramesStage(vae, CPU)(resolve(), latents)


# ------------------------------------------------------------------ image encode

def test_image_to_tensor_matches_diffusers_preprocess():
    from diffusers.video_processor import VideoProcessor

    ref = VideoProcessor(vae_scale_factor=8).preprocess(IMAGE, height=32, width=48)
    ours = image_to_tensor(IMAGE, 32, 48)
    assert ours.shape == (1, 3, 32, 48)
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)


def test_first_frame_mask_matches_diffusers_construction():
    num_frames, ts, h, w = 9, 4, 3, 5
    f_lat = (num_frames - 1) // ts + 1
    # diffusers WanImageToVideoPipeline.prepare_latents, verbatim in logic:
    m = torch.ones(1, 1, num_frames, h, w)
    m[:, :, list(range(1, num_frames))] = 0
    first = torch.repeat_interleave(m[:, :, 0:1], dim=2, repeats=ts)
    m = torch.concat([first, m[:, :, 1:, :]], dim=2).view(1, -1, ts, h, w).transpose(1, 2)
    torch.testing.assert_close(first_frame_mask(ts, f_lat, h, w), m[0])


def test_image_stage_builds_conditioning():
    vae = FakeVAE()
    req = resolve(image=IMAGE, height=32, width=48)   # without a size it would follow the image's aspect
    out = image_stage(FakeImageEncoder(), vae, CPU)(req)
    assert isinstance(out, ImageCond)
    assert out.latent_cond.shape == (20, 2, 4, 6) and out.clip_tokens.shape == (5, IMAGE_DIM)
    assert out.latent_cond[:4, 0].eq(1).all() and out.latent_cond[:4, 1:].eq(0).all()
    video = torch.cat([image_to_tensor(IMAGE, 32, 48)[:, :, None], torch.zeros(1, 3, 4, 32, 48)], 2)
    torch.testing.assert_close(out.latent_cond[4:], vae.encode(video)[0])
    no_clip = image_stage(None, vae, CPU)(req)
    assert no_clip.clip_tokens is None


# ------------------------------------------------------------------ denoise

def test_initial_noise_is_cpu_seeded_float32():
    req = resolve(seed=1234)
    expected = torch.randn((16, 2, 4, 6), generator=torch.Generator("cpu").manual_seed(1234))
    torch.testing.assert_close(initial_noise(req), expected, atol=0, rtol=0)
    given = torch.randn(16, 2, 4, 6)
    torch.testing.assert_close(initial_noise(resolve(latents=given)), given, atol=0, rtol=0)


def test_denoise_cfg_batch_option_runs_one_batch2_forward_per_step():
    dit = FakeTransformer(in_channels=16, image_dim=None)
    req = resolve()
    a = denoise_stage(dit, CPU.with_(cfg_batch=True))(req, _text(req))
    assert dit.batch_sizes == [2, 2, 2]
    b = denoise_stage(dit, CPU)(req, _text(req))
    torch.testing.assert_close(a.latents, b.latents)


def _text(req):
    return TextEncodeStage(FakeTextEncoder())(req)


def test_denoise_progress_and_determinism():
    dit = FakeTransformer(in_channels=16, image_dim=None)
    stage = denoise_stage(dit, CPU)
    req = resolve()
    seen = []
    a = stage(req, _text(req), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert dit.batch_sizes == [1, 1] * 3  # CFG: two batch-1 forwards per step (cfg_batch=False)
    b = stage(req, _text(req))
    torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    c = stage(resolve(seed=4), _text(req))
    assert not torch.allclose(a.latents, c.latents)
    # Passing the same noise explicitly gives the same result.
    d = stage(resolve(latents=initial_noise(req)), _text(req))
    torch.testing.assert_close(a.latents, d.latents, atol=0, rtol=0)


def test_denoise_without_guidance_runs_batch1():
    dit = FakeTransformer(in_channels=16, image_dim=None)
    req = resolve(guidance_scale=0.5)
    denoise_stage(dit, CPU)(req, _text(req))
    assert dit.batch_sizes == [1, 1, 1]


def test_denoise_cancel_between_steps():
    stage = denoise_stage(FakeTransformer(in_channels=16, image_dim=None), CPU)
    req = resolve()
    asked, seen = [], []

    def should_cancel():
        asked.append(1)
        return len(asked) == 2

    with pytest.raises(Cancelled, match="before step 2 of 3"):
        stage(req, _text(req), progress=lambda i, n: seen.append(i), should_cancel=should_cancel)
    assert seen == [1]


def test_denoise_refuses_cfg_without_negative():
    stage = denoise_stage(FakeTransformer(in_channels=16, image_dim=None), CPU)
    req = resolve()
    with pytest.raises(ValueError, match="negative_context"):
        stage(req, TextEmbeds(torch.zeros(TEXT_LEN, TEXT_DIM), None))


def test_t2v_on_image_capable_dit_uses_zero_conditioning():
    dit = FakeTransformer(in_channels=36, image_dim=IMAGE_DIM)
    req = resolve()
    out = denoise_stage(dit, CPU)(req, _text(req))  # the fake asserts 36 channels and image tokens
    assert out.latents.shape == (16, 2, 4, 6)


# ------------------------------------------------------------------ decode + pipeline

def test_decode_to_frames_and_mp4():
    vae = FakeVAE()
    req = resolve()
    latents = Latents(torch.randn(16, 2, 4, 6))
    frames = DecodeFramesStage(vae, CPU)(req, latents)
    assert isinstance(frames, VideoFrames) and frames.frames.shape == (5, 32, 48, 3)
    assert frames.frames.dtype == np.float32 and 0 <= frames.frames.min() and frames.frames.max() <= 1
    ref = (vae.decode(latents.latents[None])[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(frames.frames, ref, atol=1e-6)
    video = DecodeStage(vae, CPU)(req, latents)
    assert isinstance(video, EncodedVideo) and (video.num_frames, video.height, video.width, video.fps) == (5, 32, 48, 8)
    back = read_mp4(video.data)
    assert back.frames.shape == (5, 32, 48, 3) and back.fps == 8
    # The MP4 holds these frames (lossy: a few levels of error, no channel or frame mix-up).
    err = np.abs(back.frames.astype(np.float32) - frames.frames * 255.0).mean()
    assert err < 6, err


@pytest.mark.parametrize("output_type", ["mp4", "np", "latent"])
@pytest.mark.parametrize("with_image", [False, True])
def test_local_pipeline_with_fakes(output_type, with_image):
    pipe, dit, _, _ = fake_pipeline()
    kw = {"image": IMAGE} if with_image else {}
    result = pipe.run(GenerationRequest(prompt="a fox", seed=5, output_type=output_type, **kw))
    assert result.request.seed == 5 and result.request.task == ("i2v" if with_image else "t2v")
    expected_stages = ["text_encode"] + (["image_encode"] if with_image else []) + ["denoise"]
    expected_stages += [] if output_type == "latent" else ["decode"]
    assert list(result.timings) == expected_stages
    kind = {"mp4": EncodedVideo, "np": VideoFrames, "latent": Latents}[output_type]
    assert isinstance(result.output, kind)
    # The latents of all output types agree: decode the latent result and compare frames.
    if output_type == "np":
        lat = pipe.run(GenerationRequest(prompt="a fox", seed=5, output_type="latent", **kw)).output
        frames = pipe.decode_frames(result.request, lat).frames
        np.testing.assert_allclose(result.output.frames, frames, atol=0)


def test_pipeline_cancel_after_the_last_step_skips_the_decode():
    pipe, *_ = fake_pipeline()
    asked: list[int] = []

    def should_cancel() -> bool:  # False before each of the 3 steps, True after the last one
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Cancelled, match="before decode"):
        pipe.run(GenerationRequest(prompt="a fox", seed=5), should_cancel=should_cancel)
    assert len(asked) == 4
    # nothing left to cancel for the latents: they are returned
    asked.clear()
    out = pipe.run(GenerationRequest(prompt="a fox", seed=5, output_type="latent"), should_cancel=should_cancel)
    assert isinstance(out.output, Latents) and len(asked) == 3


def test_pipeline_refuses_request_resolved_for_another_model():
    pipe, *_ = fake_pipeline()
    from tests.stages.test_request import T2V

    with pytest.raises(ValueError, match="resolved for"):
        pipe.run(GenerationRequest(prompt="a").resolve(T2V))


def test_decode_honours_vae_tiling(tiny_wan_dir, monkeypatch):
    """The loader sets the VAE up to decode in tiles for options.vae_tiling (one tile here: equal)."""
    import engine.models.wan.vae as wan_vae
    from engine.families import get_family
    from engine.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint("tiny-wan")
    vae = get_family(ckpt.spec.family).load_vae(ckpt, CPU)
    calls = []
    real = wan_vae.tiled_decode
    monkeypatch.setattr(wan_vae, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    req = GenerationRequest(prompt="a", num_frames=5, height=32, width=48).resolve(ckpt.spec)
    latents = Latents(torch.randn(req.latent_shape, generator=torch.Generator().manual_seed(0)))
    plain = DecodeFramesStage(vae, CPU)(req, latents).frames
    assert calls == []
    tiled_vae = get_family(ckpt.spec.family).load_vae(ckpt, CPU.with_(vae_tiling=True))
    tiled = DecodeFramesStage(tiled_vae, CPU.with_(vae_tiling=True))(req, latents).frames
    assert calls == [1]
    np.testing.assert_allclose(tiled, plain, atol=1e-5)
