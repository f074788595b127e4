"""The OpenAI Images API on the service, for image models (Qwen-Image, Qwen-Image-Edit):

    POST /v1/images/generations   JSON: prompt, model, n, size, response_format, + our fields
    POST /v1/images/edits         multipart: image (one file) or image[] (several), prompt, ...;
                                  or JSON with `image` as a base64 string / data URL (or a list)
    GET  /v1/images/{id}/content  the PNG of one image (what `response_format: "url"` points at)

`n` images are `n` durable jobs in the job store (ids `image_...`, PNG artifacts), with seeds
seed, seed + 1, .., seed + n - 1 (`seed` given, else drawn once); the call waits for all of them
and answers OpenAI's images object: `data[i].b64_json`, or `data[i].url` (then the images stay
fetchable, and listed/deletable through /v1/videos/{id} like every job). A client that drops the
connection does not stop the jobs.

Fields: OpenAI's `prompt`, `model`, `n` (1..`MAX_N`), `size` ("WIDTHxHEIGHT" or "auto": the
model's default, or the last input image's for edits), `response_format` ("b64_json", the
default, or "url"), `output_format` ("png" only), `background` ("auto"/"opaque"), `user`,
`quality`, `style`, `moderation`, `input_fidelity` (accepted, no effect); `mask` and `stream`
are refused. Ours: every request field the Videos API takes under its own name
(`serving.api.OUR_FIELDS`: negative_prompt, steps, guidance_scale, shift, sampler, seed, ...);
video-only ones (num_frames, fps) get the request type's 400. A video model asked for images, or
an image model on /v1/videos, is a 400 naming the right endpoint.

Input images are checked from their header (`ServiceSettings.max_image_pixels`), decoded once,
and shrunk to at most `MAX_INPUT_SIDE` on the longer side (the edit models read about one
megapixel), before they reach the stages.
"""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from engine.registry import ModelSpec
from serving.api import (OUR_FIELDS, ApiError, OpenAIJSONResponse, check_text, decode_image, parse_size)
from serving.auth import check_origin
from stages.request import MAX_SEED, GenerationRequest, RequestError, ResolvedRequest

if TYPE_CHECKING:
    from serving.settings import ServiceSettings

MAX_N = 10
"""Most images one call may ask for (OpenAI's bound)."""
MAX_INPUT_SIDE = 2048
"""Input images are shrunk (Lanczos, aspect kept) to at most this many pixels on the longer side."""
MAX_FILES = 8
IGNORED = ("user", "quality", "style", "moderation", "input_fidelity", "output_compression")
"""OpenAI fields accepted without effect (no such choice here)."""
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "background", "mask",
                 "stream", "image") + IGNORED
RESPONSE_FORMATS = ("b64_json", "url")


# ----------------------------------------------------------------------------- requests


def _input_images(value: Any, max_pixels: int) -> list[Image.Image]:
    """The edit's `image` field (one file / base64 string, or a list of them) -> RGB images."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ApiError(400, "image: give at least one image", param="image")
    images = []
    for i, item in enumerate(items):
        try:
            image = decode_image(item, max_pixels)
        except ApiError as err:  # decode_image names the Videos API's field
            name = f"image[{i}]" if len(items) > 1 else "image"
            raise ApiError(err.status, name + err.message.removeprefix("input_reference"), param="image") from None
        if not isinstance(image, Image.Image):
            raise ApiError(422, "image: must be an image file, or a base64 string or data URL of one",
                           param="image")
        if max(image.size) > MAX_INPUT_SIDE:
            scale = MAX_INPUT_SIDE / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        images.append(image)
    return images


def build_image_requests(fields: dict[str, Any], spec: ModelSpec, served_names: tuple[str, ...], *,
                         edit: bool, max_image_pixels: int) -> tuple[list[ResolvedRequest], str]:
    """Validate an Images API call against the served model: (one resolved request per image,
    with seeds seed..seed+n-1; the response format). Raises `ApiError` naming the field."""
    check_text({k: v for k, v in fields.items() if k != "image"}, "")
    fields = {k: v for k, v in fields.items() if v is not None}
    accepted = OPENAI_FIELDS + OUR_FIELDS
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 64 else unknown[0][:64] + "..."
        raise ApiError(400, f"unknown field {name!r}; accepted fields: {', '.join(accepted)}", param=name)
    if "prompt" not in fields:
        raise ApiError(400, "prompt is required", param="prompt")

    # 1. the model: this one, and one that makes images
    model = fields.get("model")
    if model is not None and model not in served_names:
        raise ApiError(400, f"model must be {served_names[0]!r} (the model this service runs), got {model!r}",
                       param="model")
    if spec.modality != "image":
        raise ApiError(400, f"model {spec.name!r} makes videos: use POST /v1/videos, not the Images API",
                       param="model")
    # 2. OpenAI's options we cannot honour
    for name, allowed in (("output_format", ("png",)), ("background", ("auto", "opaque"))):
        if name in fields and fields[name] not in allowed:
            raise ApiError(400, f"{name} must be one of {', '.join(allowed)}, got {fields[name]!r}", param=name)
    if "mask" in fields:
        raise ApiError(400, "mask is not supported: the edit models change the image from the prompt", param="mask")
    if str(fields.get("stream", "false")).lower() not in ("false", "0"):
        raise ApiError(400, "stream is not supported: the answer comes when every image is done", param="stream")
    response_format = fields.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got "
                            f"{response_format!r}", param="response_format")
    try:
        n = int(fields.get("n", 1))
    except (TypeError, ValueError):
        raise ApiError(400, f"n must be an integer in 1..{MAX_N}, got {fields['n']!r}", param="n") from None
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in 1..{MAX_N}, got {n}", param="n")

    # 3. the request fields: ours, size, the input images (edits)
    values: dict[str, Any] = {k: fields[k] for k in ("prompt",) + OUR_FIELDS if k in fields}
    if fields.get("size", "auto") != "auto":
        values["width"], values["height"] = parse_size(fields["size"])
    if edit:
        if "image" not in fields:
            raise ApiError(400, "image is required: the image(s) to edit", param="image")
        images = _input_images(fields["image"], max_image_pixels)
        values["images" if len(images) > 1 else "image"] = images if len(images) > 1 else images[0]
    elif "image" in fields:
        raise ApiError(400, "image is not accepted by /v1/images/generations: use /v1/images/edits", param="image")

    # 4. one request per image, seeds seed .. seed + n - 1
    seed = values.pop("seed", None)
    try:
        seed = secrets.randbelow(MAX_SEED - MAX_N) if seed is None else int(seed)
    except (TypeError, ValueError):
        raise ApiError(422, f"seed: must be an integer, got {seed!r}", param="seed") from None
    if not 0 <= seed <= MAX_SEED - (n - 1):
        raise ApiError(400, f"seed must be in 0..{MAX_SEED - (n - 1)} for n={n} (the images take seed .. "
                            f"seed + n - 1), got {seed}", param="seed")
    requests = []
    for i in range(n):
        try:
            request = GenerationRequest(**values, seed=seed + i)
        except ValidationError as err:
            first = err.errors()[0]
            field = _field(str(first["loc"][0]) if first["loc"] else None, fields)
            message = first["msg"].removeprefix("Value error, ")
            raise ApiError(422, f"{field}: {message}" if field else message, param=field) from None
        try:
            requests.append(request.resolve(spec))
        except RequestError as err:
            field = _field(err.field, fields)
            raise ApiError(400, f"{field}: {err.message}", param=field) from None
    return requests, response_format


def _field(field: str | None, given: dict[str, Any]) -> str | None:
    """The field the client sent (size for width/height, image for the request's images)."""
    if field in ("width", "height") and "size" in given:
        return "size"
    if field in ("images", "image"):
        return "image"
    return field


# ----------------------------------------------------------------------------- running


async def run_images(ingress: Any, fields: dict[str, Any], owner: str | None, *, edit: bool,
                     base_url: str) -> dict[str, Any]:
    """Validate, start one job per image, wait for all, answer OpenAI's images object.
    `ingress`: the model's `serving.ingress.Ingress`."""
    requests, response_format = build_image_requests(
        fields, ingress.spec, ingress.served_names, edit=edit, max_image_pixels=ingress.settings.max_image_pixels)
    ingress.check_admission(len(requests))
    jobs = [ingress.start_job(r, owner) for r in requests]
    tasks = [ingress._tasks[j.id] for j in jobs if j.id in ingress._tasks]
    if tasks:
        await asyncio.wait(tasks)  # not cancelled with the caller: the jobs are durable
    data = []
    for job in (ingress._get(j.id, owner, param="image_id") for j in jobs):
        if job.status != "completed":
            detail = f"{job.error_code}: {job.error_message}" if job.error_message else job.status
            raise ApiError(500, f"image {job.id} {job.status} ({detail})", code="generation_failed")
        if response_format == "url":
            data.append({"url": f"{base_url}/v1/images/{job.id}/content", "revised_prompt": None})
        else:
            path = ingress.store.result_path(job.id)
            data.append({"b64_json": base64.b64encode(path.read_bytes()).decode("ascii"), "revised_prompt": None})
    first = requests[0]
    return {"created": int(time.time()), "data": data, "output_format": "png",
            "size": f"{first.width}x{first.height}"}


# ----------------------------------------------------------------------------- HTTP


async def image_fields(request: Request, settings: "ServiceSettings") -> dict[str, Any]:
    """JSON body, or multipart form whose `image` / `image[]` files make one list (form-encoded
    bodies are refused, as on /v1/videos: a browser sends them cross-site without a preflight)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type in ("application/json", ""):
        try:
            parsed = json.loads(await request.body())
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            why = "nested too deeply" if isinstance(err, RecursionError) else "not valid JSON"
            raise ApiError(400, f"the body is {why}") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "the body must be a JSON object")
        return parsed
    if media_type != "multipart/form-data":
        raise ApiError(415, f"content type {media_type!r} is not accepted: send application/json or "
                            "multipart/form-data")
    max_upload_bytes = settings.max_upload_bytes
    form = await request.form(max_files=MAX_FILES, max_fields=32, max_part_size=1024 * 1024)
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    raise ApiError(413, f"{key}: file larger than {max_upload_bytes} bytes", param=key)
                if key not in ("image", "image[]"):
                    raise ApiError(400, f"{key}: only image files are accepted (as image or image[])", param=key)
                images.append(data)
            elif key in fields or key in ("image", "image[]"):
                raise ApiError(400, f"{key}: given twice", param=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    if images:
        fields["image"] = images if len(images) > 1 else images[0]
    return fields


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def add_image_routes(app: FastAPI, ingress: Any) -> None:
    """The Images API routes on the service's FastAPI app (`serving.ingress.build_http_app`'s,
    with its error handlers, body limits and CORS). `ingress`: an `Ingress`, or the several-model
    router (`serving.router.Router`): anything with `images(...)`, `_get`, `store`, `settings`,
    `keys`."""
    settings = ingress.settings

    async def caller(request: Request) -> str | None:
        check_origin(request.method, request.headers, settings.cors_origins)
        return ingress.keys.owner(request.headers.get("authorization"))

    who = Depends(caller)

    @app.post("/v1/images/generations")
    async def create_images(request: Request, owner: str | None = who) -> OpenAIJSONResponse:
        fields = await image_fields(request, settings)
        return OpenAIJSONResponse(await ingress.images(fields, owner, edit=False, base_url=_base_url(request)))

    @app.post("/v1/images/edits")
    async def edit_images(request: Request, owner: str | None = who) -> OpenAIJSONResponse:
        fields = await image_fields(request, settings)
        return OpenAIJSONResponse(await ingress.images(fields, owner, edit=True, base_url=_base_url(request)))

    @app.get("/v1/images/{image_id}/content")
    async def image_content(image_id: str, owner: str | None = who) -> FileResponse:
        job = ingress._get(image_id, owner, param="image_id")
        if job.status != "completed" or job.result is None or not job.result.mime.startswith("image/"):
            raise ApiError(409 if job.status != "completed" else 404,
                           f"{image_id} is {job.status}: no image content", param="image_id")
        path = ingress.store.result_path(job.id)
        if path is None or not path.is_file():
            raise ApiError(404, f"the file of image {image_id} is missing", param="image_id")
        return FileResponse(path, media_type=job.result.mime, filename=f"{job.id}{job.result.ext}")
