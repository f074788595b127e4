"""Wan text and image encoders: parity with diffusers' pipeline methods, and the official key maps
checked against independent re-implementations of the official modules' forward passes."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.families import get_family
from engine.checkpoint import resolve_checkpoint
from engine.loading import read_pth
from engine.models.wan import keymap_clip, keymap_t5, tiny
from engine.models.wan.text_encoder import prompt_clean
from engine.options import EngineOptions

torch.set_num_threads(1)
OPTS = EngineOptions()
WAN = get_family("wan")

PROMPTS = [
    "A  cat &amp;amp; a dog\n\twalk   on the beach ",
    "schÃ¶n slow motion, close up of a red car",  # mojibake that ftfy repairs
    "",
    " ".join(["a cat walks on the beach"] * 120),  # longer than 512 tokens: truncated
]


@pytest.fixture(scope="module")
def ckpt(tiny_wan_dir):
    return resolve_checkpoint(tiny_wan_dir)


@pytest.fixture(scope="module")
def official_dir(tiny_wan_dir, tmp_path_factory):
    return tiny.write_official_layout(tiny_wan_dir, str(tmp_path_factory.mktemp("official_enc") / "ckpt"))


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir):
    """diffusers' I2V pipeline built from the tiny components, loaded by transformers itself."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from engine.models.wan.image_encoder import clip_image_processor_cls

    sub = lambda name: os.path.join(tiny_wan_dir, name)  # noqa: E731
    return WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(sub("tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(sub("text_encoder")).eval(),
        vae=AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(sub("vae"))),
        scheduler=UniPCMultistepScheduler.from_pretrained(sub("scheduler")),
        image_processor=clip_image_processor_cls().from_pretrained(sub("image_processor")),
        image_encoder=CLIPVisionModel.from_pretrained(sub("image_encoder")).eval(),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _images():
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(70, 120, 3, generator=gen) * 255).to(torch.uint8).numpy()
    b = (torch.rand(300, 200, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a), Image.fromarray(b)]


# --------------------------------------------------------------------------- text


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference

    for p in PROMPTS + ["&lt;b&gt;  bold&lt;/b&gt;", "  \u3000 full-width space\u00a0nbsp  "]:
        assert prompt_clean(p) == reference(p), p


def test_missing_ftfy_is_refused_at_start_up(monkeypatch, ckpt):
    """No silent fallback: without ftfy, prompts would differ from the reference pipeline's."""
    assert prompt_clean(" a &amp;amp; b \n c ") == "a & b c"
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
    with pytest.raises(ImportError, match="needs ftfy"):
        WAN.load_text_encoder(ckpt, OPTS)
    with pytest.raises(ImportError, match="needs ftfy"):
        prompt_clean("a cat")


def test_text_encoder_matches_diffusers(ckpt, pipe):
    enc = WAN.load_text_encoder(ckpt, OPTS)
    ours = enc.encode(PROMPTS)
    with torch.no_grad():
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=512, device=torch.device("cpu"))
    assert ours.shape == ref.shape == (4, 512, 32)
    assert rel_err(ours, ref) < 1e-5
    # zero padding after the valid tokens, and only there
    lengths = pipe.tokenizer([prompt_clean(p) for p in PROMPTS], padding="max_length", max_length=512,
                             truncation=True, return_tensors="pt").attention_mask.sum(1)
    assert lengths[3] == 512 and lengths[2] == 1  # truncated; empty prompt = just </s>
    for row, n in zip(ours, lengths.tolist()):
        assert (row[n:] == 0).all()
        assert (row[:n].abs().sum(-1) > 0).all()


def test_text_encoder_rejects_a_bare_string(ckpt):
    enc = WAN.load_text_encoder(ckpt, OPTS)
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("a cat")


def test_text_encoder_output_depends_on_the_prompt(ckpt):
    enc = WAN.load_text_encoder(ckpt, OPTS)
    a, b = enc.encode(["a cat walks on the beach", "a dog runs in the forest"])
    assert rel_err(a, b) > 0.1


# --------------------------------------------------------------------------- image


def test_text_encoder_serves_concurrent_threads(ckpt):
    """Serve calls a replica's sync methods from a thread pool: concurrent encodes (the first
    ones included, which set the tokenizer's padding) give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[f"a {w} walks in the snow"] for w in ("cat", "dog", "man", "bird", "horse", "fish")]
    sequential = WAN.load_text_encoder(ckpt, OPTS)
    expected = [sequential.encode(p) for p in prompts]
    enc = WAN.load_text_encoder(ckpt, OPTS)  # fresh: its tokenizer has not been called yet
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(enc.encode, prompts))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_image_encoder_matches_diffusers(ckpt, pipe):
    enc = WAN.load_image_encoder(ckpt, OPTS)
    images = _images()
    ours = enc.encode(images)
    with torch.no_grad():
        ref = pipe.encode_image(images, device=torch.device("cpu"))
    assert ours.shape == ref.shape == (2, 257, 32)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours[0], ours[1]) > 0.01


# --------------------------------------------------------------------------- official umT5


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _bucket(rel: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    """Wan's T5RelativeEmbedding._relative_position_bucket, bidirectional."""
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def official_t5_forward(sd: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan `wan/modules/t5.py` T5Encoder (shared_pos=False) written out on official keys."""
    b, length = ids.shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = sd["token_embedding.weight"][ids]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for n in range(num_layers):
        p = f"blocks.{n}."
        table = sd[p + "pos_embedding.embedding.weight"]              # (buckets, heads)
        heads = table.shape[1]
        bias = table[_bucket(rel, table.shape[0])].permute(2, 0, 1)[None]  # (1, H, L, L)
        bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        h = _rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{w}.weight"]).view(b, length, heads, -1) for w in "qkv")
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1), sd[p + "attn.o.weight"])
        h = _rms(x, sd[p + "norm2.weight"])
        gated = F.linear(h, sd[p + "ffn.fc1.weight"]) * _gelu_tanh(F.linear(h, sd[p + "ffn.gate.0.weight"]))
        x = x + F.linear(gated, sd[p + "ffn.fc2.weight"])
    return _rms(x, sd["norm.weight"])


def test_official_t5_loads_into_umt5_with_the_official_forward(official_dir):
    ckpt = resolve_checkpoint(official_dir)
    enc = WAN.load_text_encoder(ckpt, OPTS)
    official = read_pth(os.path.join(official_dir, "models_t5_umt5-xxl-enc-bf16.pth"))
    tokens = enc.tokenizer([prompt_clean(p) for p in PROMPTS[:2]], padding="max_length", max_length=512,
                           truncation=True, return_tensors="pt")
    expected = official_t5_forward(official, tokens.input_ids, tokens.attention_mask)
    got = enc.encode(PROMPTS[:2])
    for row_got, row_ref, n in zip(got, expected, tokens.attention_mask.sum(1).tolist()):
        assert rel_err(row_got[:n], row_ref[:n]) < 1e-5


def test_umt5_config_is_inferred_from_shapes(official_dir, tiny_wan_dir):
    from transformers import UMT5Config

    official = read_pth(os.path.join(official_dir, "models_t5_umt5-xxl-enc-bf16.pth"))
    inferred = keymap_t5.infer_umt5_config(official)
    saved = UMT5Config.from_pretrained(os.path.join(tiny_wan_dir, "text_encoder"))
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert inferred[key] == getattr(saved, key), key


def test_t5_keymap_round_trip_and_errors():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=40, **tiny.TINY_T5))
    hf = model.state_dict()
    back = keymap_t5.official_to_hf(keymap_t5.hf_to_official(hf))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        keymap_t5.official_to_hf({"blocks.0.attn.qkv.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- official CLIP


def official_clip_forward(sd: dict, pixels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Wan `wan/modules/clip.py` VisionTransformer(use_31_block=True) written out on official keys:
    every block but the last, no post-norm."""
    v = lambda name: sd["visual." + name]  # noqa: E731
    patch = v("patch_embedding.weight")
    x = F.conv2d(pixels, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)   # (B, N, D)
    b, _, d = x.shape
    x = torch.cat([v("cls_embedding").expand(b, -1, -1), x], dim=1) + v("pos_embedding")
    x = F.layer_norm(x, (d,), v("pre_norm.weight"), v("pre_norm.bias"), 1e-5)
    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    for n in range(num_layers - 1):
        p = f"transformer.{n}."
        h = F.layer_norm(x, (d,), v(p + "norm1.weight"), v(p + "norm1.bias"), 1e-5)
        qkv = F.linear(h, v(p + "attn.to_qkv.weight"), v(p + "attn.to_qkv.bias"))
        q, k, val = qkv.view(b, -1, 3, num_heads, d // num_heads).unbind(2)                 # (B, L, H, Dh)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2))
        x = x + F.linear(attn.transpose(1, 2).reshape(b, -1, d), v(p + "attn.proj.weight"), v(p + "attn.proj.bias"))
        h = F.layer_norm(x, (d,), v(p + "norm2.weight"), v(p + "norm2.bias"), 1e-5)
        h = F.gelu(F.linear(h, v(p + "mlp.0.weight"), v(p + "mlp.0.bias")))
        x = x + F.linear(h, v(p + "mlp.2.weight"), v(p + "mlp.2.bias"))
    return x


def test_official_clip_loads_into_clip_vision_with_the_official_forward(official_dir):
    ckpt = resolve_checkpoint(official_dir)
    enc = WAN.load_image_encoder(ckpt, OPTS)
    official = read_pth(os.path.join(official_dir, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))
    assert any(k.startswith("textual.") for k in official)  # ignored by the loader
    pixels = enc.processor(images=_images(), return_tensors="pt").pixel_values
    heads = keymap_clip.infer_clip_vision_config(official)["num_attention_heads"]
    expected = official_clip_forward(official, pixels, heads)
    with torch.no_grad():
        got = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert got.shape == expected.shape == (2, 257, 32)
    assert rel_err(got, expected) < 1e-5


def test_clip_config_is_inferred_from_shapes(official_dir):
    official = read_pth(os.path.join(official_dir, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))
    cfg = keymap_clip.infer_clip_vision_config(official)
    for key, value in tiny.TINY_CLIP.items():
        assert cfg[key] == value, key


def test_clip_keymap_round_trip_and_errors():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionModel(CLIPVisionConfig(**tiny.TINY_CLIP)).state_dict()
    official = keymap_clip.hf_to_official(hf)
    assert "visual.transformer.1.attn.to_qkv.weight" in official
    back = keymap_clip.official_to_hf(dict(official, **{"textual.x": torch.zeros(1), "log_scale": torch.zeros(())}))
    expected = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in hf.items()
                if not k.endswith("position_ids")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    with pytest.raises(KeyError, match="visual.transformer.0.attn.rotary"):
        keymap_clip.official_to_hf({"visual.transformer.0.attn.rotary.weight": torch.zeros(1)})
