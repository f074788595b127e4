"""The built-in tiny random-weight Qwen-Image checkpoints (diffusers layout), generated locally.

Their images are noise: tiny instances of the real architectures (MMDiT, Wan2.1 VAE, Qwen2.5-VL
with its vision tower, a byte-level BPE tokenizer with the Qwen special tokens), so the whole
system runs anywhere, in seconds, on a CPU. Deterministic (fixed seeds), a few MB each:

    tiny-qwen-image        QwenImagePipeline (text-to-image)
    tiny-qwen-image-edit   QwenImageEditPlusPipeline with zero_cond_t (as Qwen-Image-Edit-2511)

The tokenizer is a BPE trained here on the pipelines' templates and a small word list, so that
every template word is one token, as in the real Qwen2 tokenizer: the templates' system parts
tokenize to the real counts (34 for text-to-image, 64 for the edit pipelines), which is what the
pipelines' dropped-token counts assume (tests/engine/models/qwen_image checks it).

Written once into `$LIGHTX2V_CACHE/<name>-v1` (default `~/.cache/lightx2v/...`) through a
temporary folder and an atomic rename; a `lightx2v_tiny.json` records a fingerprint of the
generator and of the module layouts, and a stale folder is regenerated.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from engine.models.qwen_image.pipelines import (
    EDIT_PLUS_PIPELINE, EDIT_PLUS_TEMPLATE, EDIT_TEMPLATE, PICTURE_PROMPT, PIPELINES, T2I_PIPELINE, T2I_TEMPLATE,
)
from engine.tiny import MARKER, materialize, randomize_, save_diffusers_module

VERSION = "v1"
SEED = 0

TINY_DIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                temperal_downsample=(False, True, True))
TINY_VL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6})
TINY_VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                      fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
_WORDS = (
    "a an the of and in on at with to from by is are it this that for as red blue green white black yellow "
    "cat dog man woman child bird fish horse car tree sky sea city street room house forest mountain river "
    "snow rain sun moon light night day fox runs sits stands blurry static low quality make hat turn into "
    "picture photo painting style add remove replace background text sign says hello world"
).split()

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""The Qwen-Image releases' scheduler config."""


@dataclass(frozen=True)
class TinyVariant:
    """One tiny checkpoint: its pipeline and whether references are at timestep 0."""

    name: str
    pipeline: str
    zero_cond_t: bool = False

    @property
    def version(self) -> str:
        return f"{self.name}-{VERSION}"


VARIANTS: dict[str, TinyVariant] = {v.name: v for v in (
    TinyVariant("tiny-qwen-image", T2I_PIPELINE),
    TinyVariant("tiny-qwen-image-edit", EDIT_PLUS_PIPELINE, zero_cond_t=True),
)}


def _variant(name: "str | TinyVariant") -> TinyVariant:
    return name if isinstance(name, TinyVariant) else VARIANTS[name]


# --------------------------------------------------------------------------- components


def make_tokenizer():
    """A Qwen2Tokenizer whose BPE merges are trained on the templates and a few words (every
    template word one token) plus the Qwen special tokens; ~600 tokens."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2Tokenizer's own
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = [t.format("") for t in (T2I_TEMPLATE, EDIT_TEMPLATE, EDIT_PLUS_TEMPLATE)]
    corpus += [PICTURE_PROMPT.format(1), " ".join(_WORDS)]
    trainer = BpeTrainer(vocab_size=2000, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def vl_config(tokenizer):
    """The tiny Qwen2.5-VL config, its special token ids from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={**TINY_VL_TEXT, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=TINY_VL_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def dit_config(name: "str | TinyVariant"):
    from engine.models.qwen_image.transformer import QwenImageDiTConfig

    return QwenImageDiTConfig(**TINY_DIT, zero_cond_t=_variant(name).zero_cond_t)


def vae_config():
    from engine.models.wan.vae import WanVAEConfig

    return WanVAEConfig(**TINY_VAE)


def _qwen_vae_config() -> dict:
    """The tiny VAE's config as an `AutoencoderKLQwenImage` config.json holds it."""
    c = vae_config()
    return dict(base_dim=c.base_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
                attn_scales=[], temperal_downsample=list(c.temperal_downsample), dropout=0.0, input_channels=3,
                latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))


def fingerprint(name: "str | TinyVariant") -> str:
    """Hash of the generator version, sizes and our modules' parameter names and shapes."""
    from engine.models.qwen_image.transformer import QwenImageTransformer
    from engine.models.wan.vae import WanVAE

    variant = _variant(name)
    with torch.device("meta"):
        layout = {
            "dit": [(k, list(v.shape)) for k, v in QwenImageTransformer(dit_config(name)).state_dict().items()],
            "vae": [(k, list(v.shape)) for k, v in WanVAE(vae_config()).state_dict().items()],
        }
    blob = json.dumps([variant.version, variant.pipeline, variant.zero_cond_t, TINY_DIT, TINY_VAE, TINY_VL_TEXT,
                       TINY_VL_VISION, SCHEDULER_CONFIG, layout], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def write_tiny(directory: str, name: "str | TinyVariant" = "tiny-qwen-image", qk_gain: float = 1.0,
               text_gain: float = 1.0, scheduler: dict | None = None) -> str:
    """Write the tiny checkpoint `name` (a built-in name or a `TinyVariant`; diffusers layout)
    into `directory`. `qk_gain` sharpens the DiT's attention among image tokens, `text_gain`
    scales the text keys (the weight of the prompt in every image token's attention): parity
    tests raise it so that mistakes in the text conditioning change outputs far beyond the
    tolerance. `scheduler` replaces scheduler entries. Returns `directory`."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    from engine.models.qwen_image.transformer import QwenImageTransformer
    from engine.models.wan.vae import WanVAE

    variant = _variant(name)
    edits = PIPELINES[variant.pipeline].edits
    os.makedirs(directory, exist_ok=True)
    # 1. DiT and VAE: our modules, deterministic weights
    dit_cfg = dit_config(variant)
    dit = randomize_(QwenImageTransformer(dit_cfg), SEED, qk_gain=qk_gain)
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.attn.norm_added_k.weight.mul_(text_gain)
    save_diffusers_module(dit, os.path.join(directory, "transformer"), dit_cfg.to_dict(),
                          "QwenImageTransformer2DModel")
    vae = randomize_(WanVAE(vae_config()), SEED + 1)
    save_diffusers_module(vae, os.path.join(directory, "vae"), _qwen_vae_config(), "AutoencoderKLQwenImage")
    # 2. tokenizer, Qwen2.5-VL (transformers' own init, seeded), image processor (edit)
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        vl = Qwen2_5_VLForConditionalGeneration(vl_config(tokenizer)).eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        vl.save_pretrained(os.path.join(directory, "text_encoder"))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    if edits:
        processor_dir = os.path.join(directory, "processor")
        Qwen2VLImageProcessorPil().save_pretrained(processor_dir)
        tokenizer.save_pretrained(processor_dir)
    # 3. scheduler, pipeline index, our marker
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**SCHEDULER_CONFIG, **(scheduler or {})}, f, indent=2)
    index = {
        "_class_name": variant.pipeline, "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        **({"processor": ["transformers", "Qwen2VLProcessor"]} if edits else {}),
    }
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"version": variant.version, "fingerprint": fingerprint(variant), "seed": SEED,
                   "qk_gain": qk_gain}, f)
    return directory


def materialize_tiny(name: str, root: str | None = None) -> str:
    """The folder of the built-in tiny checkpoint `name`, generated on first use (atomically)."""
    return materialize(VARIANTS[name].version, fingerprint(name), lambda folder: write_tiny(folder, name), root)
