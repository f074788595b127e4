"""The form of a model: which request fields a page (or a ComfyUI node) shows, with which widget,
default and limits. Derived, not listed:

- the fields and their help texts come from `GenerationRequest.model_fields` and the docstring
  under each field (stages/request.py), in declaration order; a new field is a new input;
- the widget comes from the field's type (str, int, float, bool, a Literal's choices, an image
  input where lightx2v/arguments.py opens files);
- the defaults come from resolving an empty request against the model's spec (so they are the
  model's own, a diffusers checkpoint's scheduler values included), the limits from the request
  module's bounds and the spec (strides, fixed timesteps, guidance-distilled models);
- whether the model takes a field at all is asked of the request type too: a field the spec
  refuses ("is not accepted", e.g. guidance_scale_2 for a one-expert model, num_frames for an
  image model) is left off.

`NOT_ON_FORMS` is the one table of request fields that are never inputs, with the reason.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from PIL import Image

from engine.options import field_docs
from engine.registry import ModelSpec
from lightx2v.arguments import ARGUMENTS, literal_choices, strip_optional
from stages.request import (FPS_RANGE, MAX_FRAMES, MAX_SEED, MAX_SIDE, MAX_STEPS, SHIFT_RANGE, TASK_NAMES,
                            GenerationRequest, RequestError)

Kind = Literal["text", "image", "images", "int", "float", "choice", "bool", "seed", "parsed"]
"""The widgets: "image" one input image, "images" several; "parsed" a text input read by the CLI's
parser of the field (lora: `PATH[:STRENGTH[:EXPERT]][,...]`, cache_options: JSON)."""

NOT_ON_FORMS: dict[str, str] = {
    "output_type": "the page and the nodes show the result (video, or image for image models)",
    "latents": "initial noise is a tensor: the library only",
}
"""Request fields that are never form inputs, and why."""

KINDS: dict[str, Kind] = {"images": "images"}
"""Request fields whose widget their type does not tell (`images` is a plain list)."""

RANDOM_SEED = -1
"""A seed input's value for "draw a random seed", besides empty (the seed used is shown after the
run). Seeds go up to 2**63-1, beyond a browser's exact integers: pages show them as text."""
OFF = 0
"""The value of an optional input that is off (target_fps: no frame interpolation)."""

_LIMITS: dict[str, tuple[float, float]] = {
    "num_frames": (1, MAX_FRAMES),
    "steps": (1, MAX_STEPS),
    "guidance_scale": (0.0, 100.0),
    "guidance_scale_2": (0.0, 100.0),
    "shift": SHIFT_RANGE,
    "fps": FPS_RANGE,
    "target_fps": FPS_RANGE,
    "seed": (0, MAX_SEED),
}
"""The bounds the request type enforces (stages/request.py's validators), by field; the size
fields' bounds depend on the model's stride (`_field`). Guidance has no upper bound in the
request; 100 bounds the input."""

_OPTIONAL: set[str] = {"target_fps"}
"""Fields whose unset value means "off" rather than "the model's default": the input has an
`OFF` value that leaves them unset."""

def _samplers() -> list[str]:
    from engine.samplers import list_samplers

    return list_samplers()


_CHOICES = {"sampler": _samplers}
"""Fields whose allowed values a registry lists (not their type)."""


TASK_ORDER = ("t2v", "i2v", "t2i", "edit")
IMAGE_TASKS = {"i2v", "edit"}


@dataclass(frozen=True)
class FormField:
    """One input of a form."""

    name: str
    """The request field (GenerationRequest)."""
    kind: Kind
    default: Any
    """The model's default (None for the seed: random; `OFF` for an optional field)."""
    info: str
    """The field's docstring."""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    multiline: bool = False
    fixed: bool = False
    """The model allows only the default (a step-distilled model's step count)."""
    optional: bool = False
    """The value `OFF` leaves the field unset (and means off, not the model's default)."""
    placeholder: str = ""
    """The syntax of a "parsed" input (the CLI's metavar)."""

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()


def field_kind(name: str, annotation: Any) -> Kind | None:
    """The widget for a request field's type; None when no widget fits (never on a form)."""
    if name == "seed":
        return "seed"
    if name in KINDS:
        return KINDS[name]
    override = ARGUMENTS.get(name)
    if override is not None and override.opens_files:
        return "image"
    annotation = strip_optional(annotation)
    if literal_choices(annotation):
        return "choice"
    plain = {str: "text", int: "int", float: "float", bool: "bool"}.get(annotation)
    if plain is None and override is not None and override.parse is not None:
        return "parsed"
    return plain


def request_fields() -> dict[str, Kind | None]:
    """Every request field in declaration order, with its widget kind (None: none fits)."""
    return {name: (None if name in NOT_ON_FORMS else field_kind(name, info.annotation))
            for name, info in GenerationRequest.model_fields.items()}


def tasks_of(spec: ModelSpec) -> list[str]:
    """The model's tasks in page order (text-to-video, image-to-video, text-to-image, image edit)."""
    return [t for t in TASK_ORDER if t in spec.tasks]


def task_label(task: str) -> str:
    return TASK_NAMES[task].capitalize()


def is_random_weights(spec: ModelSpec) -> bool:
    """A built-in generated model (tiny-wan, ...): random weights, its outputs are noise."""
    return spec.materialize is not None


def model_defaults(spec: ModelSpec, task: str) -> dict[str, Any]:
    """Every request field's value when a request for `task` leaves it unset: the request
    resolved against the spec (image tasks with a stand-in image of the default size, which
    resolves to the default size). The drawn seed is dropped."""
    d = spec.defaults
    image = Image.new("RGB", (d.width, d.height)) if task in IMAGE_TASKS else None
    resolved = GenerationRequest(prompt="defaults", image=image).resolve(spec)
    values = {name: getattr(resolved, name) for name in GenerationRequest.model_fields
              if hasattr(resolved, name)}
    values["num_frames"] = resolved.kept_frames
    values.pop("seed", None)
    return values


def _probe_image(spec: ModelSpec) -> Image.Image:
    return Image.new("RGB", (spec.defaults.width, spec.defaults.height))


def _resolve_error(spec: ModelSpec, task: str, name: str, value: Any, image: bool = True) -> RequestError | None:
    """The model's objection to a request for `task` with field `name` = `value` (None: none;
    a problem with the probe's other values is not an objection to this field)."""
    values = {"prompt": "probe", name: value}
    if task in IMAGE_TASKS and image and name != "image":
        values["image"] = _probe_image(spec)
    try:
        GenerationRequest(**values).resolve(spec)
    except RequestError as e:
        return e if e.field == name else None
    except ValueError:
        return None
    return None


def takes(spec: ModelSpec, task: str, name: str, value: Any, image: bool = True) -> bool:
    """Whether the model takes field `name` for `task`: False when resolving a request with it
    set says the field "is not accepted" (or, for `images`, refuses the count)."""
    error = _resolve_error(spec, task, name, value, image)
    return error is None or not ("not accepted" in error.message or name == "images")


def allows(spec: ModelSpec, task: str, name: str, value: Any) -> bool:
    """Whether the model takes this value of field `name` (a choice it refuses is left off)."""
    return _resolve_error(spec, task, name, value) is None


def form_for(spec: ModelSpec, task: str, accepted: Iterable[str] | None = None) -> list[FormField]:
    """The inputs of `task` (t2v, i2v, t2i, edit) for the model, in the request's field order.
    `accepted`: the request fields a remote service takes (None: all)."""
    if task not in spec.tasks:
        raise ValueError(f"task must be one of {', '.join(tasks_of(spec))} for {spec.name}, got {task!r}")
    accepted = None if accepted is None else set(accepted)
    defaults = model_defaults(spec, task)
    docs = field_docs(GenerationRequest)
    out: list[FormField] = []
    for name, kind in request_fields().items():
        if kind is None or (accepted is not None and name not in accepted):
            continue
        if kind in ("image", "images"):
            # One image for image tasks; several only where the model takes more than one.
            if task not in IMAGE_TASKS or (kind == "images" and not takes(spec, task, name, [_probe_image(spec)] * 2,
                                                                          image=False)):
                continue
            out.append(FormField(name, kind, None, docs.get(name, "")))
            continue
        default = defaults.get(name)
        probe = _LIMITS[name][0] if name in _LIMITS else default
        if name != "prompt" and not takes(spec, task, name, probe):
            continue
        field = _field(spec, name, kind, default, docs.get(name, ""))
        if field.choices is not None:  # the values this model takes (asked of the request type)
            field = dataclasses.replace(field, choices=tuple(c for c in field.choices if allows(spec, task, name, c)))
        out.append(field)
    if any(f.kind == "images" for f in out):  # a model of several input images: one input for them all
        out = [f for f in out if f.kind != "image"]
    return out


def generic_form() -> list[FormField]:
    """Every request field's input before a model is known (ComfyUI declares a sampler node's
    inputs before a model is wired to it): each default None (the model's), sizes in steps of the
    smallest stride of the registered models, prompts up to the longest any model takes. The
    model checks the rest when the request runs."""
    docs = field_docs(GenerationRequest)
    return [FormField(name, kind, None, docs.get(name, "")) if kind in ("image", "images")
            else _field(None, name, kind, None, docs.get(name, ""))
            for name, kind in request_fields().items() if kind is not None]


def _field(spec: ModelSpec | None, name: str, kind: Kind, default: Any, info: str) -> FormField:
    """The input of one field for `spec` (None: any model, see `generic_form`)."""
    from engine.registry import list_specs

    f = FormField(name, kind, "" if name == "prompt" else default, info)
    if name in _CHOICES:
        return dataclasses.replace(f, kind="choice", choices=tuple(_CHOICES[name]()))
    if kind == "text":
        longest = spec.max_prompt_chars if spec else max(s.max_prompt_chars for s in list_specs())
        return dataclasses.replace(f, multiline=name.endswith("prompt"), maximum=longest,
                                   default=f.default or ("" if spec or name == "prompt" else None))
    if kind == "choice":
        return dataclasses.replace(f, choices=literal_choices(GenerationRequest.model_fields[name].annotation))
    if kind == "parsed":
        return dataclasses.replace(f, default="", placeholder=ARGUMENTS[name].metavar or "")
    if kind == "seed":
        return dataclasses.replace(f, default=None, minimum=0, maximum=MAX_SEED, step=1)
    if name in ("height", "width"):
        stride = spec.spatial_stride if spec else min(s.spatial_stride for s in list_specs())
        return dataclasses.replace(f, minimum=stride, maximum=MAX_SIDE // stride * stride, step=stride)
    lo, hi = _LIMITS.get(name, (None, None))
    if spec is not None and name.startswith("guidance_scale") and spec.guidance == "none":
        hi = 1.0  # guidance-distilled: runs without classifier-free guidance
    step = 1 if kind == "int" else 0.1 if kind == "float" else None
    f = dataclasses.replace(f, minimum=lo, maximum=hi, step=step)
    if spec is not None and name == "steps" and spec.defaults.timesteps is not None:
        f = dataclasses.replace(f, fixed=True)
    if name in _OPTIONAL:
        f = dataclasses.replace(f, optional=True, default=OFF, minimum=OFF)
    return f


def request_values(form: list[FormField], values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> request fields: a random seed (empty, None or `RANDOM_SEED`) and optional
    inputs at `OFF` left unset, seeds given as text parsed, whole numbers as int, cleared number
    inputs left unset (the model's default). Values equal to the form's default are left unset
    too: the model decides them when the request runs, as it would for the library (a dynamic
    shift from the size, an image-to-video size from the image, the second expert's guidance
    following the first's)."""
    by_name = {f.name: f for f in form}
    out: dict[str, Any] = {}
    for name, value in values.items():
        f = by_name[name]
        if name != "prompt" and f.default is not None and _same(value, f.default):
            continue
        if f.kind == "seed" and isinstance(value, str):
            value = value.strip()
            try:
                value = int(value) if value else None
            except ValueError:
                raise ValueError(f"seed must be a whole number in 0..2**63-1 (empty or {RANDOM_SEED}: "
                                 f"random), got {value!r}") from None
        if f.kind == "parsed" and isinstance(value, str):
            try:
                value = ARGUMENTS[name].parse(value) if value.strip() else None
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if value is None or (f.kind == "seed" and value == RANDOM_SEED) or (f.kind == "images" and not value):
            continue
        if f.optional and value == OFF:
            continue
        if f.kind in ("int", "seed") and isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise ValueError(f"{name} must be a whole number, got {value}")
            value = int(value)
        out[name] = value
    return out


def _same(value: Any, default: Any) -> bool:
    """A plain form value equal to the default (images and lists never are)."""
    return isinstance(value, (str, int, float, bool)) and value == default
