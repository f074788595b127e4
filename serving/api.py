"""The OpenAI-compatible Videos API surface: request fields -> `ResolvedRequest`, job records ->
video objects, and errors in OpenAI's shape (`{"error": {message, type, param, code}}`).

Request fields (JSON body, multipart form, or a dict through a handle):
  OpenAI's `prompt`, `model`, `size` ("WIDTHxHEIGHT"), `seconds`, `input_reference` (image),
  plus ours: `negative_prompt`, `num_frames`, `steps`, `guidance_scale`, `shift`, `sampler`,
  `seed`, `fps`, `target_fps` (frame interpolation). `seconds` becomes a frame count at the
  request's `fps` (or the model's), rounded to the nearest valid `temporal_stride * k + 1`. Everything else is checked by the
  one request type, `stages.request.GenerationRequest`, and its `resolve(spec)`.

Text must be valid Unicode (a lone surrogate, which JSON's `\\ud800` escapes can carry, is a
400 naming the field). Input images are checked from their header (at most
`ServiceSettings.max_image_pixels`), decoded once here, and shrunk to what the request can use
(`fit_image`): the stages never receive a larger picture than that, and only the image encoder
receives it at all (`without_image`).

Every error message that leaves the service goes through `public_message`: no memory addresses,
node IPs or process ids (the full text stays in the logs).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from typing import Any

from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError

from engine.registry import ModelSpec
from serving.jobstore import JobRecord
from stages.request import MAX_FRAMES, GenerationRequest, RequestError, ResolvedRequest

OPENAI_FIELDS = ("prompt", "model", "size", "seconds", "input_reference")
HTTP_SPELLINGS = {"prompt": "prompt", "image": "input_reference", "height": "size", "width": "size",
                  "images": None, "latents": None, "output_type": None}
"""Request fields the Videos API spells its own way (OpenAI's names), or not at all (None: library
only; the API returns MP4)."""
OUR_FIELDS = tuple(name for name in GenerationRequest.model_fields if name not in HTTP_SPELLINGS)
"""Every other request field, accepted under its own name (derived: a new request field is an API
field with no edit here)."""
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_MARGIN = 2
"""An input image is kept at up to this many times the output's width and height."""
IMAGE_MIN_SIDE = 512
"""... and never shrunk below this shorter side (image encoders such as CLIP read 224-448 px)."""

_STATUS_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "too_large",
                 415: "unsupported_media_type", 422: "invalid_value", 500: "internal_error",
                 503: "server_busy"}


class ApiError(ValueError):
    """An error for the client: HTTP status, message, the request field it concerns."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _STATUS_CODES.get(status, "error")
        self.headers = headers or {}

    def __reduce__(self):  # picklable: a several-model service's router gets it from a model's ingress
        return _api_error, (self.status, self.message, self.param, self.code, self.headers)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object; the message and param made safe to show (`public_message`)."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        param = None if self.param is None else public_message(self.param)
        return {"error": {"message": public_message(self.message), "type": kind, "param": param,
                          "code": self.code}}

    def response(self) -> "OpenAIJSONResponse":
        return OpenAIJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _api_error(status: int, message: str, param: str | None, code: str, headers: dict[str, str]) -> ApiError:
    return ApiError(status, message, param=param, code=code, headers=headers)


class OpenAIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: any Python string can be sent (a lone
    surrogate cannot be encoded as UTF-8, so Starlette's default response would fail with a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


_ADDRESS = re.compile(r"\s*\bobject at 0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]{6,}\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b")
_PID = re.compile(r"\b(pid)(\s*[=:]?\s*)\d+", re.IGNORECASE)


def public_message(text: str) -> str:
    """`text` fit for a client: memory addresses, IPv4 addresses and process ids replaced, and
    lone surrogates escaped (the full text belongs in the service's logs, not in responses)."""
    text = _ADDRESS.sub("", text)
    text = _IPV4.sub("<address>", text)
    text = _PID.sub(lambda m: f"{m.group(1)}{m.group(2)}<n>", text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_text(value: Any, field: str) -> None:
    """Refuse strings that are not valid Unicode (lone surrogates) anywhere in `value`, keys
    of mappings included (400, naming the field)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = value[err.start].encode("utf-8", "backslashreplace").decode()
            raise ApiError(400, f"{field}: must be valid Unicode text; it holds a lone surrogate "
                                f"({bad}) at index {err.start}", param=field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{field}.{public_message(str(key))}" if field else "field name")
            check_text(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{field}[{i}]")


def parse_size(size: Any) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height)."""
    m = _SIZE.match(str(size))
    if m is None:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '832x480'), got {size!r}", param="size")
    return int(m.group(1)), int(m.group(2))


def seconds_to_frames(seconds: Any, fps: int, temporal_stride: int) -> int:
    """Clip length in seconds -> the nearest valid frame count `temporal_stride * k + 1`."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ApiError(400, f"seconds must be a number > 0, got {seconds!r}", param="seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ApiError(400, f"seconds must be a number > 0, got {seconds!r}", param="seconds")
    k = max(0, round((value * fps - 1) / temporal_stride))
    frames = temporal_stride * k + 1
    if frames > MAX_FRAMES:
        raise ApiError(400, f"seconds must give at most {MAX_FRAMES} frames at {fps} fps "
                            f"(<= {MAX_FRAMES / fps:.1f} s), got {seconds!r}", param="seconds")
    return frames


def _image_from_reference(value: Any) -> Any:
    """OpenAI's `input_reference`: an uploaded file (bytes), or {"image_url": "data:..."}."""
    if isinstance(value, dict):
        if "file_id" in value:
            raise ApiError(400, "input_reference.file_id is not supported: upload the image as a "
                                "file or give input_reference.image_url as a base64 data URL",
                           param="input_reference")
        url = value.get("image_url")
        if not isinstance(url, str) or not url.startswith("data:"):
            raise ApiError(400, "input_reference.image_url must be a base64 data URL "
                                "('data:image/png;base64,...'); remote URLs are not fetched",
                           param="input_reference")
        return url
    return value


def decode_image(value: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """Encoded image bytes or a base64 string / data URL -> an RGB PIL image, decoded once, after
    checking its size from the header (422 naming input_reference beyond `max_pixels`). Other
    values (a PIL image or array from a handle caller) are left to the request type."""
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "input_reference: must be an image file, or a base64 string or data "
                                "URL of one; the string given is not base64", param="input_reference") from None
    if isinstance(value, Image.Image):
        if value.width * value.height > max_pixels:
            raise _too_many_pixels(value.width, value.height, max_pixels)
        return value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value
    try:
        image = Image.open(io.BytesIO(bytes(value)))
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad data
        raise ApiError(422, f"input_reference: the data could not be read as an image "
                            f"({type(err).__name__})", param="input_reference") from None
    with image:
        if image.width * image.height > max_pixels:  # from the header: nothing decoded yet
            raise _too_many_pixels(image.width, image.height, max_pixels)
        try:
            image.load()
            return image.convert("RGB")  # a new image: the decoded original is freed on exit
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            raise ApiError(422, f"input_reference: the image could not be decoded "
                                f"({type(err).__name__})", param="input_reference") from None


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ApiError:
    side = int(math.isqrt(max_pixels))
    return ApiError(422, f"input_reference: the image is {width}x{height} ({width * height / 1e6:.1f} "
                         f"megapixels); at most {max_pixels / 1e6:.1f} megapixels (e.g. {side}x{side}) "
                         "are accepted", param="input_reference")


def fit_image(request: ResolvedRequest) -> ResolvedRequest:
    """The request with its image shrunk (aspect ratio kept, Lanczos) to what the model can use:
    at most `IMAGE_MARGIN` times the output's width and height, never below a shorter side of
    `IMAGE_MIN_SIDE`. Smaller images are left untouched."""
    image = getattr(request, "image", None)
    if image is None:
        return request
    w0, h0 = image.size
    scale = max(IMAGE_MARGIN * request.width / w0, IMAGE_MARGIN * request.height / h0,
                IMAGE_MIN_SIDE / min(w0, h0))
    if scale >= 1:
        return request
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    return request.model_copy(update={"image": image.resize(size, Image.Resampling.LANCZOS)})


def without_image(request: ResolvedRequest) -> ResolvedRequest:
    """The request as the stages that do not read the image get it (text encoder, DiT,
    decoder): the image(s), their largest field by far, left out."""
    if getattr(request, "image", None) is None and not getattr(request, "images", ()):
        return request
    return request.model_copy(update={"image": None, "images": ()})


def build_request(fields: dict[str, Any], spec: ModelSpec, served_names: tuple[str, ...], *,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ResolvedRequest:
    """Validate the API fields and resolve them against the served model. Raises `ApiError`
    (400/422) naming the field. The image (if any) is decoded once and fitted (`fit_image`)."""
    check_text(fields, "")
    fields = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(OUR_FIELDS))
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 64 else unknown[0][:64] + "..."
        raise ApiError(400, f"unknown field {name!r}; accepted fields: "
                            f"{', '.join(OPENAI_FIELDS + OUR_FIELDS)}", param=name)
    if "prompt" not in fields:
        raise ApiError(400, "prompt is required", param="prompt")

    # 1. model: the one this app serves.
    model = fields.pop("model", None)
    if model is not None and model not in served_names:
        raise ApiError(400, f"model must be {served_names[0]!r} (the model this service runs), "
                            f"got {model!r}", param="model")

    # 2. size -> width, height.
    values: dict[str, Any] = {k: fields[k] for k in ("prompt",) + OUR_FIELDS if k in fields}
    if "size" in fields:
        values["width"], values["height"] = parse_size(fields["size"])

    # 3. seconds -> num_frames at the request's fps (else the model's).
    if "seconds" in fields:
        if "num_frames" in fields:
            raise ApiError(400, "give either seconds or num_frames, not both", param="seconds")
        fps = _int_or_error(fields["fps"], "fps") if "fps" in fields else spec.defaults.fps
        values["num_frames"] = seconds_to_frames(fields["seconds"], fps, spec.temporal_stride)

    # 4. image: checked from its header, decoded once.
    if "input_reference" in fields:
        values["image"] = decode_image(_image_from_reference(fields["input_reference"]), max_image_pixels)

    # 5. LoRAs by name only (in the service's lora_dir): a request never names a file of the host.
    for i, lora in enumerate(values.get("lora") or ()):
        if (lora.get("path") if isinstance(lora, dict) else getattr(lora, "path", None)) is not None:
            raise ApiError(400, f"lora[{i}].path: not accepted by the service; name a LoRA of its LoRA "
                                'folder instead ({"name": ..., "strength": ...})', param="lora")

    # 6. The one request type: generic rules (422), then the model's rules (400).
    try:
        request = GenerationRequest(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = _api_field(str(first["loc"][0]) if first["loc"] else None, fields)
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(422, f"{field}: {message}" if field else message, param=field) from None
    try:
        resolved = request.resolve(spec)
    except RequestError as err:
        field = _api_field(err.field, fields)
        raise ApiError(400, f"{field}: {err.message}", param=field) from None
    # 7. The image at the size the model can use.
    return fit_image(resolved)


def _int_or_error(value: Any, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{field}: must be an integer, got {value!r}", param=field) from None


def _api_field(field: str | None, given: dict[str, Any]) -> str | None:
    """Name the field the client actually sent (size for width/height, seconds for frames...)."""
    if field in ("width", "height") and "size" in given:
        return "size"
    if field == "num_frames" and "seconds" in given:
        return "seconds"
    if field == "image" and "input_reference" in given:
        return "input_reference"
    return field


def request_params(request: ResolvedRequest) -> dict[str, Any]:
    """What the job store keeps of a request (no image, no tensors)."""
    return {"negative_prompt": request.negative_prompt, "num_frames": request.kept_frames,
            "width": request.width, "height": request.height, "steps": request.steps,
            "guidance_scale": request.guidance_scale, "shift": request.shift,
            "sampler": request.sampler, "seed": request.seed, "fps": request.fps,
            "task": request.task,
            **({"target_fps": request.target_fps} if request.target_fps is not None else {})}


def format_seconds(num_frames: int, fps: int) -> str:
    if fps <= 0:  # an image
        return "0"
    return f"{num_frames / fps:.2f}".rstrip("0").rstrip(".")


def video_object(job: JobRecord) -> dict[str, Any]:
    """A job as OpenAI's video object (plus our request fields)."""
    error = ({"code": job.error_code or "error", "message": job.error_message or ""}
             if job.status == "failed" else None)
    return {
        "id": job.id, "object": "video", "created_at": job.created_at,
        "completed_at": job.completed_at, "status": job.status, "progress": job.progress,
        "model": job.model, "size": job.size, "seconds": job.seconds, "prompt": job.prompt,
        "error": error, "expires_at": None, "remixed_from_video_id": None,
        **{k: job.params[k] for k in ("num_frames", "fps", "target_fps", "steps", "seed", "task")
           if k in job.params},
    }


def model_object(spec: ModelSpec) -> dict[str, Any]:
    d = spec.defaults
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": "lightx2v",
            "tasks": sorted(spec.tasks),
            "defaults": {"size": f"{d.width}x{d.height}", "num_frames": d.num_frames, "fps": d.fps,
                         "steps": d.steps, "guidance_scale": d.guidance_scale, "shift": d.shift,
                         "sampler": d.sampler}}
