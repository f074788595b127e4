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
import math
import secrets
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, field_validator

from engine.registry import ModelSpec

OutputType = Literal["mp4", "np", "latent"]

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
LATENT_CHANNELS_DEFAULT = 16
VAE_SPATIAL_STRIDE_DEFAULT = 8


class RequestError(ValueError):
    """A request value that the model cannot take. `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
    """(C, F_lat, H_lat, W_lat) of the model's latents for a video of this size.

    `ModelSpec` has no latent-channel count or VAE stride fields yet: every registered model
    (Wan2.1) has 16 latent channels and a VAE spatial stride of 8, the defaults here; a spec that
    defines `latent_channels` / `vae_spatial_stride` (e.g. Wan2.2-5B: 48, 16) overrides them."""
    channels = getattr(spec, "latent_channels", LATENT_CHANNELS_DEFAULT)
    stride = getattr(spec, "vae_spatial_stride", VAE_SPATIAL_STRIDE_DEFAULT)
    return (channels, (num_frames - 1) // spec.temporal_stride + 1, height // stride, width // stride)


def _list_samplers() -> list[str]:
    from engine.samplers import list_samplers

    return list_samplers()


# ----------------------------------------------------------------------------- requests


class GenerationRequest(BaseModel):
    """What a caller asks for. None means "the model's default"."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    image: Any = None
    """Image-to-video input: PIL image, encoded bytes, base64 string or array (see module doc)."""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    """<= 1 turns classifier-free guidance off (no negative branch)."""
    shift: float | None = None
    sampler: str | None = None
    seed: int | None = None
    """0 .. 2**63-1; None draws a random seed (recorded in the resolved request)."""
    fps: int | None = None
    output_type: OutputType = "mp4"
    latents: Any = None
    """Initial noise, a tensor of the latent shape (C, F_lat, H/8, W/8) (a leading 1 is allowed)."""

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

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got {v}")
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
            known = _list_samplers()
            if v not in known:
                raise ValueError(f"sampler must be one of {', '.join(known)}; got {v!r}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {v}")
        return v

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: int | None) -> int | None:
        if v is not None and not FPS_RANGE[0] <= v <= FPS_RANGE[1]:
            raise ValueError(f"fps must be in {FPS_RANGE[0]}..{FPS_RANGE[1]}, got {v}")
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
        num_frames = d.num_frames if self.num_frames is None else self.num_frames
        height = d.height if self.height is None else self.height
        width = d.width if self.width is None else self.width

        # 1. Prompt length.
        if len(self.prompt) > spec.max_prompt_chars:
            raise RequestError("prompt", f"must be at most {spec.max_prompt_chars} characters for "
                                         f"{spec.name}, got {len(self.prompt)}")
        negative = d.negative_prompt if self.negative_prompt is None else self.negative_prompt
        if len(negative) > spec.max_prompt_chars:
            raise RequestError("negative_prompt", f"must be at most {spec.max_prompt_chars} characters "
                                                  f"for {spec.name}, got {len(negative)}")
        # 2. Frames and size against the model's strides.
        ts = spec.temporal_stride
        if (num_frames - 1) % ts != 0:
            lo = (num_frames - 1) // ts * ts + 1
            raise RequestError("num_frames", f"must be {ts}*k+1 (e.g. {lo} or {lo + ts}) for {spec.name}, "
                                             f"got {num_frames}")
        ss = spec.spatial_stride
        for name, value in (("height", height), ("width", width)):
            if value % ss != 0 or not ss <= value <= MAX_SIDE:
                raise RequestError(name, f"must be a multiple of {ss} in {ss}..{MAX_SIDE} for {spec.name}, "
                                         f"got {value}")
        # 3. Task: image required / refused.
        if self.image is None and "t2v" not in spec.tasks:
            raise RequestError("image", f"is required: {spec.name} is an image-to-video model")
        if self.image is not None and "i2v" not in spec.tasks:
            raise RequestError("image", f"is not accepted: {spec.name} is a text-to-video model "
                                        "(leave image unset)")
        # 4. Initial noise shape.
        shape = latent_shape(spec, num_frames, height, width)
        if self.latents is not None and tuple(self.latents.shape) != shape:
            raise RequestError("latents", f"must have shape {shape} (C, F_lat, H_lat, W_lat) for "
                                          f"{num_frames} frames at {height}x{width}, got "
                                          f"{tuple(self.latents.shape)}")
        # 5. Sampler default must exist too.
        sampler = d.sampler if self.sampler is None else self.sampler
        if self.sampler is None and sampler not in _list_samplers():
            raise RequestError("sampler", f"default {sampler!r} of {spec.name} is not registered; "
                                          f"choose one of {', '.join(_list_samplers())}")

        return ResolvedRequest(
            model=spec.name,
            prompt=self.prompt,
            negative_prompt=negative,
            image=self.image,
            num_frames=num_frames,
            height=height,
            width=width,
            steps=d.steps if self.steps is None else self.steps,
            guidance_scale=d.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            shift=d.shift if self.shift is None else self.shift,
            sampler=sampler,
            seed=secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed,
            fps=d.fps if self.fps is None else self.fps,
            output_type=self.output_type,
            latents=self.latents,
            latent_shape=shape,
        )


class ResolvedRequest(BaseModel):
    """A request with every value decided (defaults filled, seed drawn). Frozen."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    model: str
    """Registry name of the model it was resolved against."""
    prompt: str
    negative_prompt: str
    image: Image.Image | None
    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    shift: float
    sampler: str
    seed: int
    fps: int
    output_type: OutputType
    latents: torch.Tensor | None
    latent_shape: tuple[int, int, int, int]
    """(C, F_lat, H_lat, W_lat) of the initial noise and the result."""

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs (with the negative branch) only when guidance > 1."""
        return self.guidance_scale > 1.0

    @property
    def task(self) -> Literal["t2v", "i2v"]:
        return "i2v" if self.image is not None else "t2v"
