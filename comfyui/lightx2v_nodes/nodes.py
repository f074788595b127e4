"""The LightX2V nodes (ComfyUI's V3 node API: `io.ComfyNode` classes, exported by
`comfy_entrypoint` in __init__.py).

- LightX2VModelLoader: a model (registry name, folder or hub id) with the engine options, one
  input per `EngineOptions` field (derived: a new option is a new input), and an optional LoRA
  chain merged into the weights at load -> LIGHTX2V_MODEL.
- LightX2VLoRA: one LoRA file of ComfyUI's `models/loras` with a strength and an expert,
  chainable -> LIGHTX2V_LORA (for the loader: merged at load; for a sampler: this request only).
- LightX2VSampler: the model and one input per request field (derived from `GenerationRequest`
  like the page's forms: lightx2v/web/forms.py) -> IMAGE (the frames, [F, H, W, 3] float in
  [0, 1]) and the video's fps, for the core CreateVideo -> SaveVideo. ComfyUI's progress bar
  follows the denoising steps; ComfyUI's Cancel stops the run at the next step.
- LightX2VRemoteSampler: the same request sent to a running `lightx2v serve` (URL, API key)
  instead of a model in ComfyUI's process.

Inputs left at their "unset" value take the model's default: 0 for whole numbers, -1 for
guidance and shift, "default" for choices, empty text (the negative prompt included).
"""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from engine.options import EngineOptions, default_dtype, field_docs, option_fields
from lightx2v.arguments import ARGUMENTS, literal_choices, strip_optional
from lightx2v.web.forms import FormField, generic_form

CATEGORY = "LightX2V"
LIGHTX2V_MODEL = io.Custom("LIGHTX2V_MODEL")
LIGHTX2V_LORA = io.Custom("LIGHTX2V_LORA")
DEFAULT = "default"
"""A choice input's value for "the model's default"."""
UNSET = {"int": 0, "float": -1.0, "choice": DEFAULT, "text": "", "parsed": ""}
"""Each kind's input value that leaves the request field unset (the model's default)."""
LOADED_BY_CHAIN = ("lora_path", "lora_strength", "lora_expert")
"""Engine options the loader takes from its LoRA chain input, not from widgets."""


# ----------------------------------------------------------------------------- request inputs


def request_inputs() -> list[FormField]:
    """The request fields a sampler node takes as inputs (lora comes as a LIGHTX2V_LORA chain)."""
    return [f for f in generic_form() if f.name != "lora"]


def _tooltip(f: FormField) -> str:
    unset = {"int": "0", "float": "-1", "choice": f"'{DEFAULT}'", "text": "empty", "parsed": "empty"}.get(f.kind)
    if f.optional:
        return f"{f.info} 0: off."
    return f"{f.info} {unset.capitalize()}: the model's default." if unset and f.name != "prompt" else f.info


def request_input(f: FormField) -> io.Input:
    """The ComfyUI input of one request field."""
    tip = _tooltip(f)
    if f.kind in ("image", "images"):
        several = " A batch: each image one input." if f.kind == "images" else ""
        return io.Image.Input(f.name, optional=True, tooltip=tip + several)
    if f.kind == "seed":  # ComfyUI's convention: a concrete seed, changed after each run if asked
        return io.Int.Input(f.name, default=0, min=0, max=int(f.maximum), control_after_generate=True, tooltip=tip)
    if f.kind == "int":
        return io.Int.Input(f.name, default=0, min=0, max=int(f.maximum), step=int(f.step or 1), tooltip=tip)
    if f.kind == "float":
        return io.Float.Input(f.name, default=-1.0, min=-1.0, max=float(f.maximum), step=0.05, round=0.001, tooltip=tip)
    if f.kind == "choice":
        return io.Combo.Input(f.name, options=[DEFAULT, *map(str, f.choices)], default=DEFAULT, tooltip=tip)
    if f.kind == "bool":
        return io.Boolean.Input(f.name, default=False, tooltip=tip)
    return io.String.Input(f.name, multiline=f.multiline, default="", placeholder=f.placeholder or None, tooltip=tip)


def request_fields(inputs: dict[str, Any], lora: list[dict] | None, *, remote: bool) -> dict[str, Any]:
    """A sampler node's input values -> request fields (unset values left out; images as arrays;
    the LoRA chain as the request's lora list: paths here, file names for a service)."""
    from lightx2v.web.forms import request_values

    form = [f for f in request_inputs() if f.name in inputs]
    values: dict[str, Any] = {}
    for f in form:
        value = inputs[f.name]
        if value is None or (f.kind in UNSET and value == UNSET[f.kind] and not f.optional and f.name != "prompt"):
            continue
        if f.kind == "float" and value < 0:
            continue
        if f.kind == "image":
            value = value[0].cpu().numpy()  # the first image of the batch: (H, W, 3) in [0, 1]
        elif f.kind == "images":
            value = [image.cpu().numpy() for image in value]
        values[f.name] = value
    fields = request_values(form, values)
    if lora:
        fields["lora"] = [{("name" if remote else "path"): item["name" if remote else "path"],
                           "strength": item["strength"], **({"expert": item["expert"]} if item["expert"] else {})}
                          for item in lora]
    return fields


def _frames(array) -> torch.Tensor:
    """(F, H, W, 3) float in [0, 1] -> ComfyUI's IMAGE (a float32 tensor, the frames as the batch)."""
    return torch.from_numpy(array).float().clamp(0, 1).contiguous()


def _interrupted() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def _raise_if_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _request_error(error: Exception) -> ValueError:
    from stages.request import describe_error

    return ValueError(f"LightX2V request: {describe_error(error)}")


# ----------------------------------------------------------------------------- loader


def _option_input(f) -> io.Input | None:
    """The loader's input for one engine option (None for those the LoRA chain gives)."""
    if f.name in LOADED_BY_CHAIN:
        return None
    tip = f.doc
    override = ARGUMENTS.get(f.name)
    annotation = strip_optional(f.annotation)
    choices = override.choices() if override is not None and override.choices else literal_choices(annotation)
    if f.name == "device":
        import comfy.model_management

        devices = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return io.Combo.Input(f.name, options=devices, default="auto",
                              tooltip=f"{tip} auto: ComfyUI's device ({comfy.model_management.get_torch_device()}).")
    if f.name == "dtype":
        return io.Combo.Input(f.name, options=["auto", *choices], default="auto",
                              tooltip=f"{tip} auto: bfloat16 on a GPU, float32 on the CPU.")
    if choices:
        return io.Combo.Input(f.name, options=list(choices), default=f.default, tooltip=tip)
    if annotation is bool:
        return io.Boolean.Input(f.name, default=f.default, tooltip=tip)
    if annotation is int:
        return io.Int.Input(f.name, default=f.default, min=0, max=1 << 16, tooltip=tip)
    if annotation is float:
        return io.Float.Input(f.name, default=f.default, tooltip=tip)
    if annotation is str:
        return io.String.Input(f.name, default=f.default or "",
                               tooltip=tip + (" Empty: none." if f.default is None else ""))
    return None  # a type no widget fits: the option keeps its default


class LightX2VModelLoader(io.ComfyNode):
    """Loads a LightX2V model into ComfyUI's process."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        options = [i for i in map(_option_input, option_fields(EngineOptions)) if i is not None]
        return io.Schema(
            node_id="LightX2VModelLoader", display_name="LightX2V Model Loader", category=CATEGORY,
            description="A LightX2V video model (Wan2.1 / Wan2.2; the built-in tiny-wan* models have random "
                        "weights: their videos are noise) with its engine options.",
            inputs=[io.String.Input("model", default="tiny-wan",
                                    tooltip="A registry name or alias (tiny-wan, Wan2.1-T2V-14B, ...), a checkpoint "
                                            "folder, or a Hugging Face hub id."),
                    *options,
                    io.Boolean.Input("download", default=False,
                                     tooltip="Download the model from the Hugging Face Hub when it is not "
                                             "found locally."),
                    LIGHTX2V_LORA.Input("lora", optional=True, tooltip="LoRAs merged into the weights at load.")],
            outputs=[LIGHTX2V_MODEL.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model: str, download: bool = False, lora: list[dict] | None = None, **options) -> io.NodeOutput:
        import comfy.model_management

        from lightx2v import LightX2V

        device = options.pop("device")
        device = str(comfy.model_management.get_torch_device()) if device == "auto" else device
        dtype = options.pop("dtype")
        dtype = default_dtype(device) if dtype == "auto" else dtype
        options = {k: (None if v == "" and k in _NONE_WHEN_EMPTY else v) for k, v in options.items()}
        flat_names = {f.name: f.path for f in option_fields(EngineOptions)}
        parallel = {flat_names[k][1]: options.pop(k) for k in list(options) if len(flat_names.get(k, ())) == 2}
        if lora:
            options.update(lora_path=tuple(i["path"] for i in lora), lora_strength=tuple(i["strength"] for i in lora),
                           lora_expert=tuple(i["expert"] or "" for i in lora))
        loaded = LightX2V.from_pretrained(model, device, dtype, download=download, parallel=parallel, **options)
        return io.NodeOutput(loaded)


_NONE_WHEN_EMPTY = {f.name for f in option_fields(EngineOptions) if f.default is None}
"""Options whose empty text input means None (interpolator, lora_dir)."""


# ----------------------------------------------------------------------------- LoRA


def expert_roles() -> list[str]:
    """The expert roles of the registered two-expert models ("high_noise", "low_noise")."""
    from engine.registry import list_specs

    return sorted({e.role for s in list_specs() if len(s.experts) > 1 for e in s.experts})


class LightX2VLoRA(io.ComfyNode):
    """One LoRA (a file of ComfyUI's models/loras) in a chain."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        docs = field_docs(_lora_request_cls())
        return io.Schema(
            node_id="LightX2VLoRA", display_name="LightX2V LoRA", category=CATEGORY,
            description="Adds a LoRA to a chain: into a loader (merged at load) or a sampler (this request only; a "
                        "remote sampler sends the file's name, looked up in the service's lora_dir).",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A LoRA file in ComfyUI's models/loras."),
                    io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.05,
                                   tooltip=docs.get("strength", "")),
                    io.Combo.Input("expert", options=["all", *expert_roles()], default="all",
                                   tooltip=docs.get("expert", "") + " all: every expert."),
                    LIGHTX2V_LORA.Input("lora", optional=True, tooltip="LoRAs before this one.")],
            outputs=[LIGHTX2V_LORA.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, lora_name: str, strength: float, expert: str, lora: list[dict] | None = None) -> io.NodeOutput:
        import folder_paths

        item = {"path": folder_paths.get_full_path_or_raise("loras", lora_name), "name": lora_name,
                "strength": float(strength), "expert": None if expert == "all" else expert}
        return io.NodeOutput([*(lora or []), item])


def _lora_request_cls():
    from stages.request import LoRARequest

    return LoRARequest


# ----------------------------------------------------------------------------- samplers


def _sampler_outputs() -> list[io.Output]:
    return [io.Image.Output(display_name="frames", tooltip="The video's frames (the batch), RGB in [0, 1]."),
            io.Float.Output(display_name="fps", tooltip="Frames per second of the video (for CreateVideo).")]


class LightX2VSampler(io.ComfyNode):
    """Generates a video with a loaded model, in ComfyUI's process."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LightX2VSampler", display_name="LightX2V Sampler", category=CATEGORY,
            description="Text- or image-to-video with a LightX2V model: the frames (IMAGE) and the fps, for "
                        "CreateVideo -> SaveVideo.",
            inputs=[LIGHTX2V_MODEL.Input("model"), *map(request_input, request_inputs()),
                    LIGHTX2V_LORA.Input("lora", optional=True, tooltip="LoRAs for this request only.")],
            outputs=_sampler_outputs(),
        )

    @classmethod
    def validate_inputs(cls, prompt: str) -> bool | str:
        # Named inputs only: ComfyUI still checks the others against their min / max itself.
        return True if isinstance(prompt, str) and prompt.strip() else "prompt must be a non-empty string"

    @classmethod
    def execute(cls, model, lora: list[dict] | None = None, **inputs: Any) -> io.NodeOutput:
        import comfy.utils

        from stages.base import Cancelled
        from stages.request import GenerationRequest

        try:
            fields = request_fields(inputs, lora, remote=False)
            request = GenerationRequest(**fields, output_type="np").resolve(model.spec)
        except ValueError as e:
            raise _request_error(e) from None
        bar = comfy.utils.ProgressBar(request.steps)
        try:
            result = model.pipeline.run(request, progress=lambda step, total: bar.update_absolute(step, total),
                                        should_cancel=_interrupted)
        except Cancelled:
            _raise_if_interrupted()
            raise
        return io.NodeOutput(_frames(result.output.frames), float(result.request.output_fps))


_REMOTES: dict[tuple[str, str], Any] = {}
"""One client per (service URL, API key), kept between runs."""


class LightX2VRemoteSampler(io.ComfyNode):
    """Generates a video on a running `lightx2v serve` (its Videos API), not in ComfyUI."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LightX2VRemoteSampler", display_name="LightX2V Remote Sampler", category=CATEGORY,
            description="Sends the request to a running `lightx2v serve` (e.g. a GPU server) and returns its "
                        "video's frames and fps; no model is loaded in ComfyUI.",
            inputs=[io.String.Input("server_url", default="http://127.0.0.1:8000",
                                    tooltip="The service's base URL (its /v1/videos API)."),
                    io.String.Input("api_key", default="",
                                    tooltip="The service's API key (sent as Authorization: Bearer). Empty: the "
                                            "LIGHTX2V_API_KEY environment variable of ComfyUI's process (keeps the "
                                            "key out of saved workflows)."),
                    *map(request_input, request_inputs()),
                    LIGHTX2V_LORA.Input("lora", optional=True,
                                        tooltip="LoRAs for this request, sent by file name (the service looks "
                                                "them up in its lora_dir).")],
            outputs=_sampler_outputs(),
        )

    @classmethod
    def validate_inputs(cls, prompt: str, server_url: str) -> bool | str:
        if not (isinstance(server_url, str) and server_url.startswith(("http://", "https://"))):
            return f"server_url must be an http:// or https:// URL, got {server_url!r}"
        return LightX2VSampler.validate_inputs(prompt=prompt)

    @classmethod
    def execute(cls, server_url: str, api_key: str = "", lora: list[dict] | None = None,
                **inputs: Any) -> io.NodeOutput:
        import comfy.utils

        from lightx2v.web.backends import RemoteBackend
        from stages.video import read_mp4

        key = (server_url, api_key)
        if key not in _REMOTES:
            _REMOTES[key] = RemoteBackend(server_url, api_key=api_key or None)
        backend = _REMOTES[key]
        try:
            job = backend.start(request_fields(inputs, lora, remote=True))
        except ValueError as e:
            raise _request_error(e) from None
        bar = comfy.utils.ProgressBar(100)
        while not job.wait(0.2):
            bar.update_absolute(int(job.fraction * 100), 100)
            if _interrupted():
                job.cancel()
                job.wait(30)
                _raise_if_interrupted()
        outcome = job.outcome
        if outcome.status != "completed":
            raise RuntimeError(f"LightX2V service: job {job.id} {outcome.status}: {outcome.message}")
        bar.update_absolute(100, 100)
        video = read_mp4(outcome.path)
        return io.NodeOutput(_frames(video.frames.astype("float32") / 255.0), float(video.fps))


NODES = [LightX2VModelLoader, LightX2VLoRA, LightX2VSampler, LightX2VRemoteSampler]
