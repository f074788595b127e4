"""The one request type, validated at every entrance (Python API, CLI, HTTP, UI).

`GenerationRequest` holds what a caller asked for; unset fields are None. Rules that hold for
every model are checked when it is built (pydantic). `resolve(spec)` fills the model's defaults,
checks the rules that depend on the model, and returns a frozen `ResolvedRequest`: the only
request type the stages see.

Every error names the field and the allowed values. Errors from `GenerationRequest(...)` are
pydantic `ValidationError`s (a `ValueError`, the field in its location); errors from
`resolve` are `RequestError`s (a `ValueError` with `.field`).

Images: the request holds a PIL image. Encoded bytes, base64 strings (optionally a
`data:image/...;base64,` URL) and uint8/float arrays are converted when the request is built.
File paths are *not* accepted here (a request from the network must never reach the file
system); the library facade and the CLI open paths themselves (`load_image_file`).
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import secrets
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from engine.registry import ModelSpec

log = logging.getLogger(__name__)

OutputType = Literal["mp4", "png", "np", "latent"]
TASK_NAMES = {"t2v": "text-to-video", "i2v": "image-to-video", "t2i": "text-to-image", "edit": "image-edit"}
OUTPUT_TYPES = {"video": ("mp4", "np", "latent"), "image": ("png", "np", "latent")}
"""Output types by the model's modality, the default first."""

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
FPS_RANGE = (1, 120)
SHIFT_RANGE = (0.01, 100.0)
"""Allowed sigma shift. Far outside it the shifted sigmas round to 0 or 1 in float32 and the
samplers divide by zero (NaN latents, or a math domain error mid-request)."""
MAX_SIDE = 4096
"""Largest height or width in pixels."""
MAX_FRAMES = 1025
"""Largest frame count."""
MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest input image (width * height), checked from the header before decoding."""


class RequestError(ValueError):
    """A request value that the model cannot take. `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # picklable (Ray sends a stage's errors between processes)
        return type(self), (self.field, self.message)


def describe_error(error: Exception) -> str:
    """One line per problem, "field: message", for a ValidationError or RequestError."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        lines = []
        for e in error.errors():
            field = ".".join(str(p) for p in e["loc"]) or "request"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(msg if msg.startswith(field) else f"{field}: {msg}")
        return "\n".join(lines)
    return str(error)


# ----------------------------------------------------------------------------- images


def to_pil_image(value: Any) -> Image.Image:
    """PIL image from a PIL image, encoded bytes, a base64 string / data URL, or an array.

    Arrays are (H, W, 3) or (H, W, 4): uint8 in 0..255 or float in [0, 1].
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = _open_image_bytes(bytes(value))
    elif isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image must be a PIL image, image bytes, a base64 string or an array; "
                             "a string was given that is not base64 (file paths are opened by the "
                             "caller, not by the request)") from None
        image = _open_image_bytes(raw)
    elif isinstance(value, np.ndarray):
        image = _array_to_pil(value)
    else:
        raise ValueError("image must be a PIL image, image bytes, a base64 string or an (H, W, 3) "
                         f"array; got {type(value).__name__}")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image_file(path: str) -> Image.Image:
    """Open an image file (used by the library facade and the CLI, never for network input)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _open_image_bytes(raw: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(raw))
    except Exception as e:  # PIL raises several types for bad data
        raise ValueError(f"image bytes could not be decoded as an image ({e})") from None
    with im:
        if im.width * im.height > MAX_IMAGE_PIXELS:  # from the header, before decoding
            raise ValueError(f"image must have at most {MAX_IMAGE_PIXELS} pixels, got {im.width}x{im.height}")
        try:
            im.load()
        except Exception as e:
            raise ValueError(f"image bytes could not be decoded as an image ({e})") from None
        return im.copy()


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image array must have shape (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"image array must be uint8 (0..255) or float ([0, 1]), got {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError("image array must be finite (no NaN or inf)")
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


# ----------------------------------------------------------------------------- helpers


def latent_shape(spec: ModelSpec, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F_lat, H_lat, W_lat) of the model's latents for a video (or image: 1 frame) of this size."""
    g = spec.latent
    return (g.channels, (num_frames - 1) // g.temporal + 1, height // g.spatial, width // g.spatial)


def valid_frame_count(spec: ModelSpec, num_frames: int) -> int:
    """The smallest frame count the model can generate that is >= `num_frames`:
    temporal_stride*k+1 (4k+1 for Wan: 16 -> 17, 24 -> 25, 81 -> 81)."""
    ts = spec.temporal_stride
    return (max(num_frames, 1) - 1 + ts - 1) // ts * ts + 1


def image_video_size(spec: ModelSpec, image: Image.Image) -> tuple[int, int]:
    """(height, width) of an image-to-video request that gives no size: the image's aspect ratio
    at the model's default area (defaults.height * defaults.width), each side rounded down to the
    spatial stride (at least one stride, at most MAX_SIDE). This is the size diffusers' Wan I2V
    example computes (diffusers/pipelines/wan/pipeline_wan_i2v.py, EXAMPLE_DOC_STRING:
    `max_area = 480 * 832; aspect_ratio = image.height / image.width; mod_value =
    vae_scale_factor_spatial * patch_size[1]; height = round(np.sqrt(max_area * aspect_ratio))
    // mod_value * mod_value`, width with `/ aspect_ratio`). A model whose defaults name their own
    rule (`SamplingDefaults.image_size`, e.g. HunyuanVideo-1.5's size buckets) uses that."""
    if spec.defaults.image_size is not None:
        return spec.defaults.image_size(image.width, image.height)
    d, mod_value = spec.defaults, spec.spatial_stride
    max_area, aspect_ratio = d.height * d.width, image.height / image.width
    height = round(np.sqrt(max_area * aspect_ratio)) // mod_value * mod_value
    width = round(np.sqrt(max_area / aspect_ratio)) // mod_value * mod_value
    top = MAX_SIDE // mod_value * mod_value
    return min(max(height, mod_value), top), min(max(width, mod_value), top)


_warned_frames = False
"""Whether the "frame count rounded up" warning was logged (it is logged once per process)."""


def _warn_frames_once(spec: ModelSpec, asked: int, generated: int) -> None:
    global _warned_frames
    if not _warned_frames:
        _warned_frames = True
        log.warning("num_frames=%d is not %d*k+1 for %s: %d frames are generated and the first %d kept "
                    "(logged once per process)", asked, spec.temporal_stride, spec.name, generated, asked)


def _list_samplers() -> list[str]:
    from engine.samplers import list_samplers

    return list_samplers()


# ----------------------------------------------------------------------------- requests


class LoRARequest(BaseModel):
    """One LoRA for one request (engine/lora.py reads the file): `path` (library and CLI) or
    `name` (a file in the service's lora_dir; the HTTP API takes names only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    """A LoRA file (.safetensors)."""
    name: str | None = None
    """A file name inside the engine's lora_dir (".safetensors" may be left out); no folders, no ".."."""
    strength: float = 1.0
    """Scale of the LoRA's delta (diffusers' adapter weight)."""
    expert: str | None = None
    """Two-expert models: "high_noise" or "low_noise" (or the component name); None = every expert."""

    @model_validator(mode="after")
    def _check(self) -> "LoRARequest":
        from engine.lora import check_lora_name

        if (self.path is None) == (self.name is None):
            raise ValueError("a LoRA needs exactly one of path (a file) and name (in the LoRA folder)")
        if self.name is not None:
            check_lora_name(self.name)
        if self.path is not None and not self.path.strip():
            raise ValueError("lora path must be a non-empty file path")
        if not math.isfinite(self.strength) or abs(self.strength) > 100:
            raise ValueError(f"lora strength must be a finite number in -100..100, got {self.strength}")
        return self


class GenerationRequest(BaseModel):
    """What a caller asks for. None means "the model's default"."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    prompt: str
    """What to generate (non-empty; at most the model's max_prompt_chars characters)."""
    negative_prompt: str | None = None
    """What to steer away from (the unconditional branch of guidance); None = the model's default."""
    image: Any = None
    """Input image (image-to-video, image edit): PIL image, encoded bytes, base64 string or array
    (see module doc)."""
    images: list[Any] | None = None
    """Several input images, each as `image`, for models that take more than one (the model's
    max_images, e.g. 3 for Qwen-Image-Edit-2509 / 2511); give `image` or `images`, not both."""
    num_frames: int | None = None
    """Frames of the video (>= 1); video models only. The model generates temporal_stride*k+1
    frames (4k+1 for Wan, e.g. 81): any other count is generated at the next such count and cut
    to the frames asked (16 -> 17 generated, 16 delivered)."""
    height: int | None = None
    """Pixels; a multiple of the model's spatial stride (16 for Wan2.1, 32 for Wan2.2 TI2V). With
    an image and neither height nor width: the image's aspect ratio at the model's default area."""
    width: int | None = None
    """Pixels; a multiple of the model's spatial stride."""
    steps: int | None = None
    """Denoising steps (1..1000)."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (of the high-noise expert, for two-expert models); <= 1 turns
    guidance off (no negative branch)."""
    guidance_scale_2: float | None = None
    """Guidance of the second (low-noise) expert of a two-expert model (Wan2.2 A14B); None = the
    model's default (or guidance_scale). Refused for one-expert models."""
    shift: float | None = None
    """Flow-matching sigma shift (higher spends more steps at high noise); None = the model's
    default (for a diffusers-layout checkpoint: its scheduler config's)."""
    sampler: str | None = None
    """Sampler name (unipc, euler, euler_a, dpmpp_2m, or an alias); None = the model's default."""
    seed: int | None = None
    """0 .. 2**63-1; None draws a random seed (recorded in the resolved request)."""
    fps: int | None = None
    """Frames per second of the output video; video models only."""
    target_fps: int | None = None
    """Frame rate after frame interpolation (RIFE, applied after the VAE decode): at least the
    video's fps, e.g. 32 for a 16 fps model (17 frames -> 33); video models only. None: no
    interpolation. Needs an interpolator configured (the engine option `interpolator`)."""
    output_type: OutputType | None = None
    """"mp4" (video models' default), "png" (image models' default), "np" pixels, or "latent"."""
    latents: Any = None
    """Initial noise, a tensor of the latent shape (C, F_lat, H/8, W/8) (a leading 1 is allowed)."""
    lora: list[LoRARequest] | None = None
    """LoRAs for this request only: [{"path" or "name", "strength", "expert"}] (engine/lora.py;
    the service takes names in its lora_dir, never paths). Gone after the request."""
    cache: Literal["none", "teacache", "magcache"] | None = None
    """Feature caching across steps (engine/cache.py): "teacache", "magcache", or None / "none" (off)."""
    cache_options: dict[str, Any] | None = None
    """Options of the cache over the model's calibrated defaults: MagCache mag_ratios, threshold,
    max_skip_steps, retention_ratio; TeaCache coefficients, threshold, ret_steps."""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must be a non-empty string")
        return v

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, v: Any) -> Image.Image | None:
        return None if v is None else to_pil_image(v)

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, v: Any) -> list[Image.Image] | None:
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("images must be a non-empty list of images (or leave it unset and give image)")
        return [to_pil_image(item) for item in v]

    @model_validator(mode="after")
    def _image_or_images(self) -> "GenerationRequest":
        if self.image is not None and self.images is not None:
            raise ValueError("images: give either image (one) or images (several), not both")
        return self

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_FRAMES:
            raise ValueError(f"num_frames must be in 1..{MAX_FRAMES}, got {v}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _side(cls, v: int | None, info) -> int | None:
        if v is not None and not 1 <= v <= MAX_SIDE:
            raise ValueError(f"{info.field_name} must be in 1..{MAX_SIDE} pixels, got {v}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {v}")
        return v

    @field_validator("guidance_scale", "guidance_scale_2")
    @classmethod
    def _guidance(cls, v: float | None, info) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ValueError(f"{info.field_name} must be a finite number >= 0 (<= 1 turns guidance off), got {v}")
        return v

    @field_validator("shift")
    @classmethod
    def _shift(cls, v: float | None) -> float | None:
        lo, hi = SHIFT_RANGE
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"shift must be a number in {lo}..{hi:g}, got {v}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str | None) -> str | None:
        if v is not None:
            from engine.samplers import canonical_sampler

            try:
                canonical_sampler(v)   # accepts aliases too ("dpmpp2m" for "dpmpp_2m")
            except ValueError:
                known = _list_samplers()
                raise ValueError(f"sampler must be one of {', '.join(known)}; got {v!r}") from None
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {v}")
        return v

    @field_validator("fps", "target_fps")
    @classmethod
    def _fps(cls, v: int | None, info) -> int | None:
        if v is not None and not FPS_RANGE[0] <= v <= FPS_RANGE[1]:
            raise ValueError(f"{info.field_name} must be in {FPS_RANGE[0]}..{FPS_RANGE[1]}, got {v}")
        return v

    @field_validator("latents", mode="before")
    @classmethod
    def _latents(cls, v: Any) -> torch.Tensor | None:
        if v is None:
            return None
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"latents must be a tensor of the latent shape, got {type(v).__name__}")
        if not v.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor, got {v.dtype}")
        if v.dim() == 5 and v.shape[0] == 1:
            v = v[0]
        if v.dim() != 4:
            raise ValueError(f"latents must have shape (C, F_lat, H_lat, W_lat), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError("latents must be finite (no NaN or inf)")
        return v.detach().to("cpu", torch.float32).contiguous()

    def resolve(self, spec: ModelSpec) -> "ResolvedRequest":
        """Fill defaults from the model's spec and check the model-dependent rules."""
        d = spec.defaults
        video = spec.modality == "video"

        # 1. Prompt length.
        if len(self.prompt) > spec.max_prompt_chars:
            raise RequestError("prompt", f"must be at most {spec.max_prompt_chars} characters for "
                                         f"{spec.name}, got {len(self.prompt)}")
        negative = d.negative_prompt if self.negative_prompt is None else self.negative_prompt
        if len(negative) > spec.max_prompt_chars:
            raise RequestError("negative_prompt", f"must be at most {spec.max_prompt_chars} characters "
                                                  f"for {spec.name}, got {len(negative)}")
        # 2. Frames (video models only) and size against the model's strides.
        if not video:
            for name in ("num_frames", "fps", "target_fps"):
                if getattr(self, name) is not None:
                    raise RequestError(name, f"is not accepted: {spec.name} makes images (leave {name} unset)")
        # Input images: at most the model's max_images.
        images = tuple(self.images) if self.images is not None else \
            ((self.image,) if self.image is not None else ())
        if len(images) > spec.max_images:
            raise RequestError("images", f"at most {spec.max_images} input image(s) for {spec.name}, got {len(images)}")
        # Any count >= 1: the next temporal_stride*k+1 is generated, the decode keeps the asked ones.
        kept_frames = (d.num_frames if self.num_frames is None else self.num_frames) if video else 1
        num_frames = valid_frame_count(spec, kept_frames)
        if num_frames != kept_frames:
            _warn_frames_once(spec, kept_frames, num_frames)
        # Image-to-video without a size: the image's aspect ratio at the model's default area.
        if video and images and self.height is None and self.width is None:
            height, width = image_video_size(spec, images[0])
        elif images and d.image_size is not None and self.height is None and self.width is None:
            height, width = d.image_size(images[-1].width, images[-1].height)  # e.g. Qwen-Image-Edit: 1 MP
        else:
            height = d.height if self.height is None else self.height
            width = d.width if self.width is None else self.width
        ss = spec.spatial_stride
        for name, value in (("height", height), ("width", width)):
            if value % ss != 0 or not ss <= value <= MAX_SIDE:
                raise RequestError(name, f"must be a multiple of {ss} in {ss}..{MAX_SIDE} for {spec.name}, "
                                         f"got {value}")
        # 3. Task: image required / refused.
        image_task, text_task = ("i2v", "t2v") if video else ("edit", "t2i")
        does = " and ".join(TASK_NAMES[t] for t in sorted(spec.tasks))
        if not images and text_task not in spec.tasks:
            raise RequestError("image", f"is required: {spec.name} is an {does} model")
        if images and image_task not in spec.tasks:
            raise RequestError("image", f"is not accepted: {spec.name} is a {does} model (leave image unset)")
        # 4. Initial noise shape.
        shape = latent_shape(spec, num_frames, height, width)
        if self.latents is not None and tuple(self.latents.shape) != shape:
            raise RequestError("latents", f"must have shape {shape} (C, F_lat, H_lat, W_lat) for "
                                          f"{num_frames} frames at {height}x{width}, got "
                                          f"{tuple(self.latents.shape)}")
        # 5. Sampler and schedule: the default must exist too; fixed timesteps fix the step count.
        sampler = d.sampler if self.sampler is None else self.sampler
        if self.sampler is None and sampler not in _list_samplers():
            raise RequestError("sampler", f"default {sampler!r} of {spec.name} is not registered; "
                                          f"choose one of {', '.join(_list_samplers())}")
        steps = d.steps if self.steps is None else self.steps
        if d.timesteps is not None and steps != len(d.timesteps):
            raise RequestError("steps", f"must be {len(d.timesteps)} for {spec.name} (a step-distilled "
                                        f"model sampled at timesteps {list(d.timesteps)}), got {steps}")
        if d.shift_terminal is not None and d.timesteps is None and steps < 2:
            raise RequestError("steps", f"must be at least 2 for {spec.name}: its schedule stretches the last "
                                        f"noise level to {d.shift_terminal}, which one step from 1 cannot do "
                                        f"(diffusers' scheduler divides by zero there), got {steps}")
        # 6. Guidance: off for guidance-distilled models; a second scale only for two experts.
        guidance = d.guidance_scale if self.guidance_scale is None else self.guidance_scale
        if spec.guidance == "none" and guidance > 1.0:
            raise RequestError("guidance_scale", f"must be <= 1 for {spec.name} (guidance-distilled: it "
                                                 f"runs without classifier-free guidance), got {guidance}")
        if self.guidance_scale_2 is not None and len(spec.experts) < 2:
            raise RequestError("guidance_scale_2", f"is not accepted: {spec.name} has one DiT (it applies "
                                                   "to the low-noise expert of two-expert models)")
        guidance_2 = None
        if len(spec.experts) > 1:
            guidance_2 = self.guidance_scale_2
            if guidance_2 is None:  # the entry's default when guidance_scale was left to it too
                guidance_2 = d.guidance_scale_2 if self.guidance_scale is None else guidance
            if guidance_2 is None:
                guidance_2 = guidance
        # 7. Output type by modality.
        allowed = OUTPUT_TYPES[spec.modality]
        output_type = allowed[0] if self.output_type is None else self.output_type
        if output_type not in allowed:
            raise RequestError("output_type", f"must be one of {', '.join(allowed)} for {spec.name} "
                                              f"({spec.modality} model), got {output_type!r}")
        # 8. Frame interpolation: only up, and only on decoded frames.
        fps = (d.fps if self.fps is None else self.fps) if video else 0
        if self.target_fps is not None:
            if self.target_fps < fps:
                raise RequestError("target_fps", f"must be at least the video's fps ({fps}): frame "
                                                 f"interpolation only adds frames, got {self.target_fps}")
            if output_type == "latent":
                raise RequestError("target_fps", "is applied to the decoded frames: not accepted with "
                                                 "output_type 'latent'")
        # 9. LoRA experts; the cache's options over the model's calibrated defaults.
        from engine.cache import cache_config, config_options
        from engine.lora import check_expert

        for i, lora in enumerate(self.lora or ()):
            try:
                check_expert(lora.expert, spec.experts, "expert")
            except ValueError as e:
                raise RequestError(f"lora[{i}].expert", str(e).removeprefix("expert ")) from None
        try:
            cache = cache_config(self.cache, self.cache_options, spec.name)
        except ValueError as e:
            field = "cache" if str(e).startswith("cache must") else "cache_options"
            raise RequestError(field, str(e).removeprefix("cache_options").lstrip(".: ")) from None

        return ResolvedRequest(
            model=spec.name,
            prompt=self.prompt,
            negative_prompt=negative,
            image=images[0] if images else None,
            images=images,
            num_frames=num_frames,
            kept_frames=kept_frames,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance,
            guidance_scale_2=guidance_2,
            shift=d.shift if self.shift is None else self.shift,
            sampler=sampler,
            timesteps=d.timesteps,
            dynamic_shift=d.dynamic_shift is not None and self.shift is None,
            seed=secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed,
            fps=fps,
            target_fps=self.target_fps,
            output_type=output_type,
            latents=self.latents,
            latent_shape=shape,
            modality=spec.modality,
            lora=tuple(self.lora or ()),
            cache="none" if cache is None else cache.method,
            cache_options=None if cache is None else config_options(cache),
        )


class ResolvedRequest(BaseModel):
    """A request with every value decided (defaults filled, seed drawn). Frozen."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    model: str
    """Registry name of the model it was resolved against."""
    prompt: str
    negative_prompt: str
    image: Image.Image | None
    """The (first) input image, or None."""
    images: tuple[Image.Image, ...] = ()
    """Every input image (`image` first); defaults to (image,)."""
    num_frames: int
    """Frames generated: temporal_stride*k+1 (the latents hold them); 1 for image models."""
    kept_frames: int
    """Frames kept after the VAE decode: the count asked for (<= num_frames; the decode stages
    drop the rest). Defaults to num_frames."""
    height: int
    width: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None = None
    """The second expert's scale (two-expert models), else None."""
    shift: float
    sampler: str
    timesteps: tuple[float, ...] | None = None
    """Fixed training timesteps (step-distilled models), else None."""
    dynamic_shift: bool = False
    """The model's resolution-dependent shift applies (the request left `shift` unset)."""
    seed: int
    fps: int
    """0 for image models."""
    target_fps: int | None = None
    """Frame rate after frame interpolation (>= fps), or None: no interpolation."""
    output_type: OutputType
    latents: torch.Tensor | None
    latent_shape: tuple[int, int, int, int]
    """(C, F_lat, H_lat, W_lat) of the initial noise and the result."""
    modality: Literal["video", "image"] = "video"
    lora: tuple[LoRARequest, ...] = ()
    """This request's LoRAs (applied for it only)."""
    cache: Literal["none", "teacache", "magcache"] = "none"
    cache_options: dict[str, Any] | None = None
    """The cache's full options (the model's calibrated defaults with the request's over them)."""

    @model_validator(mode="before")
    @classmethod
    def _kept_frames_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kept_frames") is None and "num_frames" in data:
            data = {**data, "kept_frames": data["num_frames"]}
        if isinstance(data, dict) and not data.get("images") and data.get("image") is not None:
            data = {**data, "images": (data["image"],)}
        return data

    @model_validator(mode="after")
    def _kept_frames_range(self) -> "ResolvedRequest":
        if not 1 <= self.kept_frames <= self.num_frames:
            raise ValueError(f"kept_frames must be in 1..num_frames ({self.num_frames}), got {self.kept_frames}")
        return self

    @property
    def output_fps(self) -> int:
        """The delivered video's frame rate: target_fps when interpolating, else fps."""
        return self.fps if self.target_fps is None else self.target_fps

    @property
    def output_num_frames(self) -> int:
        """Frames of the delivered video: kept_frames, or more after frame interpolation (the
        kept frames' first to last at target_fps; engine.models.rife.frame_plan)."""
        if self.target_fps is None:
            return self.kept_frames
        from engine.models.rife.interpolator import output_count

        return output_count(self.kept_frames, self.fps, self.target_fps)

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs (with the negative branch) only when guidance > 1 (as
        diffusers decides it: from the first expert's scale)."""
        return self.guidance_scale > 1.0

    @property
    def task(self) -> str:
        """"t2v" / "i2v" for video models, "t2i" / "edit" for image models."""
        if self.modality == "image":
            return "edit" if self.image is not None else "t2i"
        return "i2v" if self.image is not None else "t2v"
