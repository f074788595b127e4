"""What the page (and the ComfyUI nodes) run a request on: a model loaded in this process
(`LocalBackend`), or a running `lightx2v serve` reached over its Videos API (`RemoteBackend`).

Both start a `Job` from request fields (GenerationRequest names) and return at once; the job
runs in a thread and reports its progress (the denoising steps), can be cancelled, and ends with
an `Outcome` (the result file, the seed used). No UI library is imported here.
"""
from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.registry import ModelSpec, SamplingDefaults, get_spec
from lightx2v.web.forms import request_fields
from stages.base import Cancelled
from stages.request import GenerationRequest, describe_error

Status = Literal["completed", "failed", "cancelled"]

API_KEY_ENV = "LIGHTX2V_API_KEY"
"""The environment variable a client's API key is read from when none is given."""


@dataclass
class Outcome:
    """How a job ended."""

    status: Status
    path: str | None = None
    """The result file (MP4 for video models, PNG for image models) when completed."""
    seed: int | None = None
    """The seed the generation used (drawn by the backend when the request left it unset)."""
    message: str = ""
    """What happened, one line (the error for failed jobs)."""
    mime: str = "video/mp4"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    """num_frames, width, height, fps, steps, sampler of the result, where known."""


class Job:
    """A generation running in a thread: `progress()`, `cancel()`, `wait()`, then `outcome`."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.phase = "queued"
        """queued, encoding, denoising, decoding, done."""
        self.step = 0
        self.total = 0
        self.fraction = 0.0
        """0..1 of the whole job (the service's progress / 100, or the steps done)."""
        self.outcome: Outcome | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._on_cancel: list = []

    # -- progress, as the stages report it
    def on_step(self, step: int, total: int) -> None:
        self.phase = "decoding" if step >= total else "denoising"
        self.step, self.total = step, total
        self.fraction = step / total if total else 0.0

    def finish(self, outcome: Outcome) -> None:
        self.phase = "done"
        self.outcome = outcome
        self._done.set()

    # -- the caller's side
    def progress(self) -> tuple[str, int, int, float]:
        """(phase, step, total steps, fraction of the job)."""
        return self.phase, self.step, self.total, self.fraction

    def cancel(self) -> None:
        """Ask the job to stop (at the next denoising step); `wait()` then ends it `cancelled`."""
        self._cancel.set()
        for callback in self._on_cancel:
            callback()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the job has ended (`outcome` is set)."""
        return self._done.wait(timeout)


class Backend:
    """The interface of the backends (see the module docstring)."""

    mode: str
    name: str
    """The model's name as the page shows it."""
    spec: ModelSpec
    accepted: frozenset[str] | None
    """The request fields the backend takes (None: every field)."""
    history: bool = False
    """Whether `recent()` lists earlier jobs."""

    def start(self, fields: dict[str, Any]) -> Job:
        raise NotImplementedError

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        return []

    def result(self, job_id: str) -> Outcome:
        raise NotImplementedError(f"{type(self).__name__} keeps no earlier jobs")

    def close(self) -> None:
        pass


def _out_dir(path: str | os.PathLike | None) -> Path:
    out = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="lightx2v-ui-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- in process


class LocalBackend(Backend):
    """A model loaded in this process (`lightx2v.LightX2V`); one request at a time (later ones
    wait, in phase "queued")."""

    mode = "in-process"

    def __init__(self, model, name: str, out_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self.name = name
        self.spec = model.spec
        self.out_dir = _out_dir(out_dir)
        # target_fps needs a frame interpolator among the engine options, LoRA names a lora_dir.
        unavailable = {"target_fps": model.options.interpolator, "lora": model.options.lora_dir}
        self.accepted = frozenset(n for n in request_fields() if unavailable.get(n, True) is not None)
        self._lock = threading.Lock()

    def start(self, fields: dict[str, Any]) -> Job:
        """Validate now (ValueError naming the field), then run in a thread. LoRAs are names in
        the engine's lora_dir, as for the service: a page is a network entrance, and a request
        from the network never names a path."""
        if fields.get("lora"):
            fields = {**fields, "lora": [_by_name(lora) for lora in fields["lora"]]}
        try:
            request = GenerationRequest(**fields).resolve(self.spec)  # draws the seed when unset
        except ValueError as e:
            raise ValueError(describe_error(e)) from None
        job = Job(uuid.uuid4().hex[:12])
        threading.Thread(target=self._run, args=(job, request), daemon=True,
                         name=f"lightx2v-ui-{job.id}").start()
        return job

    def _run(self, job: Job, request) -> None:
        t0 = time.perf_counter()
        try:
            with self._lock:
                if job.cancelled:
                    raise Cancelled("cancelled while queued")
                job.phase = "encoding"
                result = self.model.pipeline.run(request, progress=job.on_step,
                                                 should_cancel=lambda: job.cancelled)
            suffix = ".png" if result.request.output_type == "png" else ".mp4"
            path = self.out_dir / f"{job.id}{suffix}"
            path.write_bytes(result.output.data)
            req = result.request
            job.finish(Outcome("completed", str(path), req.seed, f"{time.perf_counter() - t0:.1f} s",
                               mime="image/png" if suffix == ".png" else "video/mp4",
                               details=_details(req)))
        except Cancelled:
            job.finish(Outcome("cancelled", seed=request.seed, message="cancelled"))
        except Exception as e:  # noqa: BLE001 - shown on the page, one line
            job.finish(Outcome("failed", seed=request.seed, message=f"{type(e).__name__}: {e}"))


def _details(req) -> dict[str, Any]:
    return {"num_frames": req.output_num_frames, "width": req.width, "height": req.height,
            "fps": req.output_fps, "steps": req.steps, "sampler": req.sampler}


def load_local(model: str, device: str, dtype: str, out_dir: str | None = None, **options: Any) -> LocalBackend:
    """Load `model` (a name, folder or hub id) with engine options (`LightX2V.from_pretrained`)."""
    from lightx2v.api import LightX2V

    return LocalBackend(LightX2V.from_pretrained(model, device, dtype, **options), model, out_dir)


# ----------------------------------------------------------------------------- a service


class ServiceError(RuntimeError):
    """The service answered with an error: its message (and the field it concerns)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def api_spellings() -> dict[str, str | None]:
    """Request fields the Videos API spells its own way (size for height and width,
    input_reference for image), or not at all (None); the rest keep their names."""
    from serving.api import HTTP_SPELLINGS

    return HTTP_SPELLINGS


class RemoteBackend(Backend):
    """A running `lightx2v serve` (OpenAI Videos API): jobs are POSTed, polled for progress,
    cancelled with DELETE, downloaded when completed. `api_key` is sent as `Authorization:
    Bearer` (default: $LIGHTX2V_API_KEY)."""

    mode = "server"
    history = True
    poll_s = 0.25

    def __init__(self, url: str, api_key: str | None = None, out_dir: str | os.PathLike | None = None,
                 timeout: float = 30.0, model: str | None = None) -> None:
        import httpx

        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)
        self.out_dir = _out_dir(out_dir)
        model = self._pick_model(self._json("GET", "/v1/models")["data"], model)
        self.name = model["id"]
        self.spec = spec_from_service(model)
        self.accepted = frozenset(self._accepted_fields())

    def _pick_model(self, served: list[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
        """The served model the page runs: the one named, else the first video model. The page
        drives the Videos API (/v1/videos): image models are not offered in server mode."""
        names = ", ".join(m["id"] for m in served)
        if wanted is not None:
            chosen = [m for m in served if m["id"].casefold() == wanted.casefold()]
            if not chosen:
                raise ValueError(f"model {wanted!r} is not served at {self.url}; it serves {names}")
        else:
            chosen = [m for m in served if _modality(m) == "video"] or served
        if _modality(chosen[0]) != "video":
            raise ValueError(f"{chosen[0]['id']} is an image model: the page's server mode drives the Videos API; "
                             f"run the page on the model itself (--model) instead")
        return chosen[0]

    # -- HTTP
    def _call(self, method: str, path: str, **kwargs: Any):
        import httpx

        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ServiceError(0, f"the service at {self.url} cannot be reached ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                message, param = err.get("message") or r.reason_phrase, err.get("param")
            except (ValueError, KeyError, TypeError):
                message, param = f"{r.status_code} {r.reason_phrase}", None
            if r.status_code == 401:
                message = f"{message} (give the service's API key: --api-key or ${API_KEY_ENV})"
            raise ServiceError(r.status_code, message, param)
        return r

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call(method, path, **kwargs).json()

    def _accepted_fields(self) -> set[str]:
        """The request fields the service's create endpoint takes, from its OpenAPI document
        (request field names: size stands for height and width, input_reference for image)."""
        try:
            doc = self._json("GET", "/openapi.json")
            content = doc["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
            props = set(next(iter(content.values()))["schema"]["properties"])
        except (ServiceError, KeyError, StopIteration, TypeError):
            from serving.api import OPENAI_FIELDS, OUR_FIELDS

            props = set(OPENAI_FIELDS + OUR_FIELDS)
        spellings = api_spellings()
        return {name for name in request_fields() if spellings.get(name, name) in props}

    # -- jobs
    def start(self, fields: dict[str, Any]) -> Job:
        """POST the job (an error for the request is raised here, as ValueError), then poll it."""
        body = self.api_body(fields)
        try:
            video = self._json("POST", "/v1/videos", json=body)
        except ServiceError as e:
            if 400 <= e.status < 500 and e.status != 401:
                raise ValueError(str(e)) from None
            raise
        job = Job(video["id"])
        job._on_cancel.append(lambda: self._delete(job.id))
        threading.Thread(target=self._follow, args=(job,), daemon=True, name=f"lightx2v-ui-{job.id}").start()
        return job

    def api_body(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Request fields -> the Videos API's JSON body: size "WxH", the image as
        input_reference.image_url (a PNG data URL), LoRAs by name (the service takes the names
        of the files in its lora_dir, never paths)."""
        spellings = api_spellings()
        body = {"model": self.name, **{k: v for k, v in fields.items() if k not in spellings or spellings[k] == k}}
        unsent = sorted(k for k in fields if k in spellings and spellings[k] is None)
        if unsent:
            raise ValueError(f"{', '.join(unsent)}: not accepted by the service's API")
        if "height" in fields or "width" in fields:
            d = self.spec.defaults
            body["size"] = f"{fields.get('width', d.width)}x{fields.get('height', d.height)}"
        if fields.get("image") is not None:
            body["input_reference"] = {"image_url": _png_data_url(fields["image"])}
        if body.get("lora"):
            body["lora"] = [_by_name(lora) for lora in body["lora"]]
        return body

    def _delete(self, job_id: str) -> None:
        try:
            self._call("DELETE", f"/v1/videos/{job_id}")
        except ServiceError:
            pass  # already gone

    def _follow(self, job: Job) -> None:
        video: dict[str, Any] = {}
        try:
            while True:
                if job.cancelled:
                    job.finish(Outcome("cancelled", seed=video.get("seed"), message="cancelled"))
                    return
                video = self._json("GET", f"/v1/videos/{job.id}")
                status = video["status"]
                job.phase = {"queued": "queued", "in_progress": "denoising"}.get(status, job.phase)
                job.fraction = (video.get("progress") or 0) / 100
                if status == "completed":
                    job.finish(self._download(video))
                    return
                if status == "failed":
                    error = video.get("error") or {}
                    job.finish(Outcome("failed", seed=video.get("seed"),
                                       message=f"{error.get('code', 'failed')}: {error.get('message', '')}"))
                    return
                time.sleep(self.poll_s)
        except ServiceError as e:
            if job.cancelled:  # deleted by our own cancel
                job.finish(Outcome("cancelled", seed=video.get("seed"), message="cancelled"))
            else:
                job.finish(Outcome("failed", seed=video.get("seed"), message=str(e)))

    def _download(self, video: dict[str, Any]) -> Outcome:
        r = self._call("GET", f"/v1/videos/{video['id']}/content")
        mime = r.headers.get("content-type", "video/mp4").split(";")[0]
        path = self.out_dir / f"{video['id']}{'.png' if mime == 'image/png' else '.mp4'}"
        path.write_bytes(r.content)
        width, height = (int(v) for v in video["size"].split("x")) if video.get("size") else (None, None)
        details = {"num_frames": video.get("num_frames"), "width": width, "height": height,
                   "fps": video.get("target_fps") or video.get("fps"), "steps": video.get("steps")}
        return Outcome("completed", str(path), video.get("seed"), "", mime=mime, details=details)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The service's most recent jobs (this API key's), newest first."""
        return self._json("GET", "/v1/videos", params={"limit": limit})["data"]

    def result(self, job_id: str) -> Outcome:
        video = self._json("GET", f"/v1/videos/{job_id}")
        if video["status"] != "completed":
            return Outcome("failed", seed=video.get("seed"), message=f"{job_id} is {video['status']}")
        return self._download(video)

    def close(self) -> None:
        self.http.close()


def _modality(model: dict[str, Any]) -> str:
    """A /v1/models entry's modality (from its tasks: t2i / edit are image tasks)."""
    tasks = set(model.get("tasks") or ["t2v"])
    return "image" if tasks <= {"t2i", "edit"} else "video"


def _png_data_url(image: Any) -> str:
    import base64

    from stages.request import to_pil_image

    buf = io.BytesIO()
    to_pil_image(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _by_name(lora: Any) -> Any:
    """A LoRA given as {"path": X} (the page's and the CLI's syntax) -> {"name": X}."""
    if isinstance(lora, dict) and "path" in lora and "name" not in lora:
        lora = {("name" if k == "path" else k): v for k, v in lora.items()}
    return lora


def spec_from_service(model: dict[str, Any]) -> ModelSpec:
    """The served model's spec: the registry entry of its name with the defaults the service
    reports (a checkpoint's scheduler values may differ from the entry's). A model the registry
    does not know gets the service's tasks and defaults and Wan's strides; the service checks
    every request itself."""
    d = model.get("defaults", {})
    width, height = (int(v) for v in d["size"].split("x")) if "size" in d else (None, None)
    changes = {k: v for k, v in {"width": width, "height": height, "num_frames": d.get("num_frames"),
                                 "fps": d.get("fps"), "steps": d.get("steps"),
                                 "guidance_scale": d.get("guidance_scale"), "shift": d.get("shift"),
                                 "sampler": d.get("sampler")}.items() if v is not None}
    try:
        spec = get_spec(model["id"])
    except KeyError:
        defaults = SamplingDefaults(**{"num_frames": 81, "height": 480, "width": 832, "steps": 50,
                                       "guidance_scale": 5.0, "shift": 5.0, "sampler": "unipc", "fps": 16,
                                       **changes})
        return ModelSpec(name=model["id"], family="remote", tasks=frozenset(model.get("tasks", ["t2v"])),
                         defaults=defaults, description="served model (not in this registry)")
    return spec.with_defaults(**changes)
