"""The OpenAI-compatible Videos API surface: request fields -> `ResolvedRequest`, job records ->
video objects, and errors in OpenAI's shape (`{"error": {message, type, param, code}}`).

Request fields (JSON body, multipart form, or a dict through a handle):
  OpenAI's `prompt`, `model`, `size` ("WIDTHxHEIGHT"), `seconds`, `input_reference` (image),
  plus ours: `negative_prompt`, `num_frames`, `steps`, `guidance_scale`, `shift`, `sampler`,
  `seed`, `fps`, `target_fps` (frame interpolation). `seconds` becomes a frame count at the
  request's `fps` (or the model's), rounded to the nearest valid `temporal_stride * k + 1`. Everything else is checked by the
  one request type, `stages.request.GenerationRequest`, and its `resolve(spec)`.
"""
from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError

from engine.registry import ModelSpec
from serving.jobstore import JobRecord
from stages.request import MAX_FRAMES, GenerationRequest, RequestError, ResolvedRequest

OUR_FIELDS = ("negative_prompt", "num_frames", "steps", "guidance_scale", "shift", "sampler",
              "seed", "fps", "target_fps")
OPENAI_FIELDS = ("prompt", "model", "size", "seconds", "input_reference")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ApiError(ValueError):
    """An error for the client: HTTP status, message, the request field it concerns."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {400: "invalid_request", 404: "not_found", 409: "conflict",
                             413: "too_large", 415: "unsupported_media_type", 422: "invalid_value",
                             503: "server_busy"}.get(status, "error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


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


def build_request(fields: dict[str, Any], spec: ModelSpec, served_names: tuple[str, ...]) -> ResolvedRequest:
    """Validate the API fields and resolve them against the served model. Raises `ApiError`
    (400/422) naming the field."""
    fields = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(OUR_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; accepted fields: "
                            f"{', '.join(OPENAI_FIELDS + OUR_FIELDS)}", param=unknown[0])
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

    # 4. image.
    if "input_reference" in fields:
        values["image"] = _image_from_reference(fields["input_reference"])

    # 5. The one request type: generic rules (422), then the model's rules (400).
    try:
        request = GenerationRequest(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = _api_field(str(first["loc"][0]) if first["loc"] else None, fields)
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(422, f"{field}: {message}" if field else message, param=field) from None
    try:
        return request.resolve(spec)
    except RequestError as err:
        field = _api_field(err.field, fields)
        raise ApiError(400, f"{field}: {err.message}", param=field) from None


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
