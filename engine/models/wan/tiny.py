"""The built-in tiny random-weight Wan checkpoints (diffusers layout), generated locally.

Their outputs are noise: they are tiny instances of the real architectures, so the whole system
runs anywhere, in seconds, on a CPU. Each is deterministic (fixed seeds), a few MB:

    tiny-wan          Wan2.1: DiT with 36 input channels and CLIP tokens (T2V and I2V), 2.1 VAE
    tiny-wan2.2-a14b  Wan2.2 A14B: two experts (transformer, transformer_2), 36 input channels and
                      no CLIP (as the A14B I2V; T2V runs with zero conditioning), 2.1 VAE
    tiny-wan2.2-ti2v  Wan2.2 TI2V: 48 channels, per-token timesteps, a tiny Wan2.2 VAE

Generated once into `$LIGHTX2V_CACHE/<name>-v1` (tiny-wan: `tiny-wan-v1`) by `engine.tiny.materialize`
(atomic; regenerated when the fingerprint of the generator and module layouts changes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from engine.tiny import MARKER, cache_root, materialize, randomize_, save_diffusers_module  # noqa: F401

VERSION = "tiny-wan-v1"
"""Cache folder of tiny-wan (the others: `<name>-v1`)."""
SEED = 0
TEXT_LEN = 512

TINY_DIT = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16, ffn_dim=64,
    num_layers=2, text_dim=32, freq_dim=32, image_dim=32, added_kv_proj_dim=32,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                temperal_downsample=(False, True, True))
TINY_A14B_DIT = {**TINY_DIT, "image_dim": None, "added_kv_proj_dim": None}
TINY_TI2V_DIT = {**TINY_A14B_DIT, "in_channels": 48, "out_channels": 48}
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)

_WORDS = (
    "a an the of and in on at with to from by is are was be it this that for as his her their "
    "cat dog man woman child bird fish horse car tree sky sea city street room house forest "
    "mountain river beach snow rain sun moon light night day red blue green white black yellow "
    "walks runs flies swims jumps sits stands looks smiles dances plays eats drinks camera shot "
    "close up slow motion video high quality detailed realistic cinematic bright dark static"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\""

SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.42.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "WanImageToVideoPipeline",
    "_diffusers_version": "0.42.1",
    "boundary_ratio": None,
    "expand_timesteps": False,
    "image_encoder": ["transformers", "CLIPVisionModel"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": [None, None],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


@dataclass(frozen=True)
class TinyVariant:
    """One built-in tiny checkpoint: its DiT config(s), VAE config and pipeline index."""

    name: str
    dit: dict
    vae: dict | None
    """WanVAEConfig fields; None = the tiny Wan2.2 VAE (engine.models.wan.vae.tiny_vae22_config)."""
    experts: int = 1
    clip: bool = False
    model_index: dict = field(default_factory=dict)
    """Changes to MODEL_INDEX."""

    @property
    def version(self) -> str:
        return VERSION if self.name == "tiny-wan" else f"{self.name}-v1"


VARIANTS: dict[str, TinyVariant] = {v.name: v for v in (
    TinyVariant("tiny-wan", TINY_DIT, TINY_VAE, clip=True),
    TinyVariant("tiny-wan2.2-a14b", TINY_A14B_DIT, TINY_VAE, experts=2, model_index={
        "boundary_ratio": 0.875, "image_encoder": [None, None], "image_processor": [None, None],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]}),
    TinyVariant("tiny-wan2.2-ti2v", TINY_TI2V_DIT, None, model_index={
        "_class_name": "WanPipeline", "expand_timesteps": True,
        "image_encoder": [None, None], "image_processor": [None, None]}),
)}


# --------------------------------------------------------------------------- components


def tiny_vocab() -> list[tuple[str, float]]:
    """SentencePiece-style unigram vocabulary: specials, whole words, then single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{w}", -1.0 - i * 1e-3) for i, w in enumerate(_WORDS)]
    pieces += [(c, -5.0 - i * 1e-3) for i, c in enumerate(_CHARS)]
    pieces += [(f"\u2581{c}", -6.0 - i * 1e-3) for i, c in enumerate(_CHARS)]
    return pieces


def make_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tiny_vocab(), extra_ids=0, model_max_length=TEXT_LEN)


def _variant(name: "str | TinyVariant") -> TinyVariant:
    return name if isinstance(name, TinyVariant) else VARIANTS[name]


def dit_config(name: "str | TinyVariant" = "tiny-wan"):
    from engine.models.wan.transformer import WanDiTConfig

    return WanDiTConfig(**_variant(name).dit)


def vae_config(name: "str | TinyVariant" = "tiny-wan"):
    from engine.models.wan.vae import WanVAEConfig, tiny_vae22_config

    fields = _variant(name).vae
    return tiny_vae22_config() if fields is None else WanVAEConfig(**fields)


def _hf_models():
    """Tiny umT5 encoder and CLIP vision tower (transformers' own init, seeded)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tiny_vocab()), **TINY_T5)).eval()
        torch.manual_seed(SEED + 1)
        clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    return t5, clip


def fingerprint(name: "str | TinyVariant" = "tiny-wan") -> str:
    """Hash of the generator version, sizes and our modules' parameter names and shapes."""
    from engine.models.wan.transformer import WanTransformer
    from engine.models.wan.vae import WanVAE

    variant = _variant(name)
    with torch.device("meta"):
        layout = {
            "dit": [(k, list(v.shape)) for k, v in WanTransformer(dit_config(name)).state_dict().items()],
            "vae": [(k, list(v.shape)) for k, v in WanVAE(vae_config(name)).state_dict().items()],
        }
    blob = json.dumps([variant.version, variant.dit, vae_config(name).to_dict(), variant.experts, variant.clip,
                       variant.model_index, TINY_T5, TINY_CLIP, layout], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def write_tiny(directory: str, name: "str | TinyVariant" = "tiny-wan", qk_gain: float = 1.0,
               scheduler: dict | None = None) -> None:
    """Write the tiny checkpoint `name` (a built-in name or a `TinyVariant`; diffusers layout)
    into a new folder `directory`. `scheduler` replaces entries of the scheduler config.
    `qk_gain` sharpens the DiTs' attention (`randomize_`; parity tests use > 1 so that real
    mistakes, e.g. guidance off, change outputs far beyond the tolerance)."""
    from engine.models.wan.loader import make_clip_processor
    from engine.models.wan.transformer import WanTransformer
    from engine.models.wan.vae import WanVAE

    variant = _variant(name)
    os.makedirs(directory, exist_ok=True)
    # 1. DiT(s) and VAE: our modules, deterministic weights (each expert its own seed)
    dit_cfg, vae_cfg = dit_config(name), vae_config(name)
    folders = ["transformer", "transformer_2"][:variant.experts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for i, folder in enumerate(folders):
            dit = randomize_(WanTransformer(dit_cfg), SEED + 2 * i, qk_gain=qk_gain)
            save_diffusers_module(dit, os.path.join(directory, folder), dit_cfg.to_dict(), "WanTransformer3DModel")
        vae = randomize_(WanVAE(vae_cfg), SEED + 1)
    save_diffusers_module(vae, os.path.join(directory, "vae"), vae_cfg.to_dict(), "AutoencoderKLWan")
    # 2. encoders, tokenizer, image processor (saved by transformers, without progress bars)
    from transformers.utils import logging as hf_logging

    t5, clip = _hf_models()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        t5.save_pretrained(os.path.join(directory, "text_encoder"))
        if variant.clip:
            clip.save_pretrained(os.path.join(directory, "image_encoder"))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    make_tokenizer().save_pretrained(os.path.join(directory, "tokenizer"))
    if variant.clip:
        make_clip_processor(TINY_CLIP["image_size"]).save_pretrained(os.path.join(directory, "image_processor"))
    # 3. scheduler, pipeline index, our marker
    os.makedirs(os.path.join(directory, "scheduler"))
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**SCHEDULER_CONFIG, **(scheduler or {})}, f, indent=2)
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, **variant.model_index}, f, indent=2)
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"version": variant.version, "fingerprint": fingerprint(name), "seed": SEED,
                   "qk_gain": qk_gain}, f)


def write_tiny_wan(directory: str) -> None:
    """Write tiny-wan (diffusers layout) into a new folder `directory`."""
    write_tiny(directory, "tiny-wan")


def materialize_tiny(name: str, root: str | None = None) -> str:
    """The folder of the built-in tiny checkpoint `name`, generated on first use (atomically)."""
    return materialize(VARIANTS[name].version, fingerprint(name), lambda folder: write_tiny(folder, name), root)


def materialize_tiny_wan(root: str | None = None) -> str:
    """The tiny-wan checkpoint folder, generated on first use (atomically). Returns its path."""
    return materialize_tiny("tiny-wan", root)


# --------------------------------------------------------------------------- official layout


def write_official_layout(diffusers_dir: str, directory: str, num_shards: int = 2) -> str:
    """Rewrite a Wan diffusers-layout checkpoint in the official release layout (for tests and for
    trying the official loaders without the real weights):

        config.json + diffusion_pytorch_model-0000i-of-0000n.safetensors + its index
                                          (official keys, no `text_dim`, as released; a two-expert
                                          model: the same in high_noise_model/ and low_noise_model/)
        Wan2.1_VAE.pth (Wan2.2 VAE: Wan2.2_VAE.pth, nested keys), models_t5_umt5-xxl-enc-bf16.pth,
        google/umt5-xxl/ (tokenizer)
        models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (CLIP; with a stand-in `textual.*`)

    Tensors keep their dtype. Returns `directory`.
    """
    from safetensors.torch import load_file

    from engine.loading import read_json
    from engine.models.wan import keymap_clip, keymap_t5, keymap_vae, loader

    os.makedirs(directory, exist_ok=True)
    src = lambda *parts: os.path.join(diffusers_dir, *parts)  # noqa: E731
    dst = lambda *parts: os.path.join(directory, *parts)  # noqa: E731

    # 1. DiT(s): official config + sharded safetensors with an index
    index = read_json(src("model_index.json"))
    two_experts = (index.get("transformer_2") or [None, None])[1] is not None
    if two_experts:
        for folder, expert_dir in zip(("transformer", "transformer_2"), loader.OFFICIAL_EXPERT_DIRS):
            _write_official_dit(src(folder), dst(expert_dir), num_shards)
    else:
        _write_official_dit(src("transformer"), directory, num_shards)
    if index.get("expand_timesteps"):  # TI2V: the official config says so with model_type
        with open(dst("config.json")) as f:
            config = json.load(f)
        with open(dst("config.json"), "w") as f:
            json.dump({**config, "model_type": "ti2v"}, f, indent=2)

    # 2. VAE and umT5 encoder as .pth state dicts, tokenizer folder
    vae = load_file(src("vae", "diffusion_pytorch_model.safetensors"))
    if read_json(src("vae", "config.json")).get("is_residual"):
        torch.save(keymap_vae.diffusers_to_official_vae22(vae), dst(loader.OFFICIAL_VAE22))
    else:
        torch.save(keymap_vae.diffusers_to_official(vae), dst(loader.OFFICIAL_VAE))
    t5 = load_file(src("text_encoder", "model.safetensors"))
    t5.setdefault("encoder.embed_tokens.weight", t5.get("shared.weight"))
    torch.save(keymap_t5.hf_to_official(t5), dst(loader.OFFICIAL_T5))
    shutil.copytree(src("tokenizer"), dst(loader.OFFICIAL_T5_TOKENIZER))

    # 3. CLIP (Wan2.1 I2V only): the vision tower plus stand-ins for the parts we ignore
    if os.path.isdir(src("image_encoder")):
        clip = keymap_clip.hf_to_official(load_file(src("image_encoder", "model.safetensors")))
        width = clip["visual.patch_embedding.weight"].shape[0]
        gen = torch.Generator().manual_seed(SEED)
        clip["visual.head"] = torch.randn(width, 16, generator=gen)
        clip["textual.token_embedding.weight"] = torch.randn(8, 16, generator=gen)
        clip["log_scale"] = torch.tensor(4.6)
        torch.save(clip, dst(loader.OFFICIAL_CLIP))
    return directory


def _write_official_dit(src_dir: str, directory: str, num_shards: int) -> None:
    """One DiT (a diffusers `transformer*/` folder) as the official release stores it."""
    from safetensors.torch import load_file, save_file

    from engine.models.wan import keymap_dit
    from engine.models.wan.transformer import WanDiTConfig

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(src_dir, "config.json")) as f:
        official_config = WanDiTConfig.from_dict(json.load(f)).to_official(text_len=TEXT_LEN)
    official_config.pop("text_dim", None)  # the released config.json has none; read from the weights
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(official_config, f, indent=2)
    dit = keymap_dit.diffusers_to_official(load_file(os.path.join(src_dir, "diffusion_pytorch_model.safetensors")))
    keys = sorted(dit)
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: dit[k].contiguous() for k in keys[i::num_shards]}
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in dit.values())
    with open(os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
