"""The facade's keywords and the CLI's flags, derived from `GenerationRequest` and `EngineOptions`.

Every request field (stages/request.py) is a keyword of `LightX2V.generate` and a flag of
`lightx2v generate`; every engine option (engine/options.py) is a keyword of
`LightX2V.from_pretrained` and a flag of `lightx2v generate` and `lightx2v serve`. The name, the
type (a `Literal` gives the choices), the default and the help text (the docstring under the
field) come from the declarations. `ARGUMENTS` below is the one table of what differs from a
plain field: the names people use today (`video_length`, `resolution` / `--size WxH`), values the
CLI cannot pass (a tensor), image fields opened from files, and defaults decided at run time.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import types
from dataclasses import dataclass
from typing import (Annotated, Any, Callable, Iterable, Literal, Union, get_args, get_origin,
                    get_type_hints)

from PIL import Image

from engine.options import OptionField, field_docs
from stages.request import GenerationRequest, load_image_file


@dataclass(frozen=True)
class Override:
    """How one argument differs from the field it is keyed by; what is left unset is derived."""

    name: str | None = None
    """The facade keyword, and with dashes the CLI flag (default: the field's name)."""
    fields: tuple[str, ...] = ()
    """The fields one value sets, when several (resolution -> height, width)."""
    split: Callable[[Any], dict[str, Any]] | None = None
    """The facade's value -> {field: value}, for an argument of several fields."""
    flags: tuple[str, ...] | None = None
    """The CLI flags (default: "--" + name with dashes); () = the library only."""
    parse: Callable[[str], Any] | None = None
    """The CLI text -> the facade's value (default: by the field's type)."""
    metavar: str | None = None
    help: str | None = None
    """Help text in place of the field's docstring."""
    opens_files: bool = False
    """An image input: a path given to the facade or the CLI is opened there (the request never
    opens paths). Fields typed with `PIL.Image.Image` get this without an entry."""
    choices: Callable[[], list[str]] | None = None
    """The allowed values where a registry, not the type, lists them."""
    run_time_default: str | None = None
    """The CLI leaves the value unset and the command decides it when it runs; the text says how."""


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (the CLI's `--size 832x480`) -> (height, width), the facade's resolution."""
    try:
        w, h = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 832x480; got {text!r}") from None


def split_resolution(resolution: Any) -> dict[str, Any]:
    """The facade's `resolution=(height, width)` -> the request's height and width."""
    if resolution is None:
        return {"height": None, "width": None}
    try:
        height, width = resolution
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be (height, width), got {resolution!r}") from None
    return {"height": height, "width": width}


def parse_lora(text: str) -> list[dict[str, Any]]:
    """The CLI's `--lora PATH[:STRENGTH[:EXPERT]][,PATH...]` (or a JSON list of LoRA objects) ->
    the request's lora list."""
    import json

    if text.lstrip().startswith(("[", "{")):
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        path, strength, expert = item, 1.0, None
        head, _, last = item.rpartition(":")
        if head and not _is_number(last):                    # ...:STRENGTH:EXPERT
            head2, _, mid = head.rpartition(":")
            if head2 and _is_number(mid):
                path, strength, expert = head2, float(mid), last
        elif head and _is_number(last):                      # ...:STRENGTH
            path, strength = head, float(last)
        out.append({"path": path, "strength": strength, **({"expert": expert} if expert else {})})
    return out


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object from the CLI (`--cache-options '{"threshold": 0.1}'`)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON object, e.g. '{{\"threshold\": 0.1}}': {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def attention_backends() -> list[str]:
    """The registered attention backends (the quantized ones register when engine.kernels loads)."""
    import engine.kernels  # noqa: F401
    from engine.attention import list_backends

    return list_backends()


ARGUMENTS: dict[str, Override] = {
    # -- request fields (GenerationRequest) --
    "num_frames": Override(name="video_length"),
    "height": Override(name="resolution", fields=("height", "width"), split=split_resolution,
                       flags=("--size",), parse=parse_size, metavar="WIDTHxHEIGHT",
                       help="output size: resolution=(height, width) in the library, "
                            "--size WIDTHxHEIGHT (e.g. 832x480) on the CLI"),
    "image": Override(opens_files=True),
    "images": Override(opens_files=True),
    "latents": Override(flags=()),      # a tensor: the library only
    "output_type": Override(flags=()),  # the CLI writes the file named by -o
    "lora": Override(parse=parse_lora, metavar="PATH[:STRENGTH[:EXPERT]][,...]"),
    "cache_options": Override(parse=parse_json_object, metavar="JSON"),
    # -- engine options (EngineOptions, flat names as engine.options.FLAT_NAMES gives them) --
    "device": Override(run_time_default="generate: cuda when available, else cpu; serve: cpu"),
    "dtype": Override(run_time_default="bfloat16 on cuda, float32 on cpu"),
    "attention": Override(choices=attention_backends),
    # -- serve-config fields (AppArgs) --
    "replica_cpus": Override(run_time_default="1 on cuda, 0 on cpu so that the graph fits small machines"),
}
"""Keyed by the field (the first of a group). A field without an entry is an argument of its
own name, type, default and docstring."""


@dataclass(frozen=True)
class Argument:
    """One user-facing argument: a facade keyword and, unless `flags` is empty, a CLI flag."""

    name: str
    fields: tuple[str, ...]
    annotation: Any
    default: Any
    """The declared default (None on a request field: the model's default)."""
    required: bool
    doc: str
    override: Override
    none_means: str = ""
    """What leaving it unset (None) means, for help texts: "the model's" for request fields."""

    @property
    def flags(self) -> tuple[str, ...]:
        o = self.override.flags
        return ("--" + self.name.replace("_", "-"),) if o is None else o

    @property
    def opens_files(self) -> bool:
        return self.override.opens_files or _mentions(self.annotation, Image.Image)

    def to_fields(self, value: Any) -> dict[str, Any]:
        """The facade's value -> {field: value} (image paths opened)."""
        if self.opens_files:
            value = _open_images(value)
        return self.override.split(value) if self.override.split else {self.fields[0]: value}


def request_arguments(request_cls: type = GenerationRequest) -> tuple[Argument, ...]:
    """Every field of the request model, in declaration order, as arguments (`ARGUMENTS` applied;
    None means the model's default)."""
    return model_arguments(request_cls, none_means="the model's")


def model_arguments(model_cls: type, none_means: str = "") -> tuple[Argument, ...]:
    """Every field of a pydantic model (GenerationRequest, AppArgs) as arguments, in declaration
    order, `ARGUMENTS` applied (renames, groups). Help: the docstring under the field, else its
    description."""
    docs = field_docs(model_cls)
    taken: set[str] = set()
    out = []
    for name, info in model_cls.model_fields.items():
        if name in taken:
            continue
        o = ARGUMENTS.get(name, Override())
        group = o.fields or (name,)
        taken.update(group)
        grouped = len(group) > 1
        out.append(Argument(
            name=o.name or name, fields=group, annotation=Any if grouped else info.annotation,
            default=None if info.is_required() or grouped else info.get_default(call_default_factory=True),
            required=info.is_required(), doc=o.help or docs.get(name) or info.description or "",
            override=o, none_means=none_means))
    return tuple(out)


def option_arguments(fields: Iterable[OptionField]) -> tuple[Argument, ...]:
    """Engine options (`engine.options.option_fields`: flat, cfg_parallel for parallel.cfg) as
    arguments (`ARGUMENTS` applied)."""
    out = []
    for f in fields:
        o = ARGUMENTS.get(f.name, Override())
        out.append(Argument(name=f.name, fields=(f.name,), annotation=f.annotation, default=f.default,
                            required=False, doc=o.help or f.doc, override=o))
    return tuple(out)


def build_request(prompt: str, **values: Any) -> GenerationRequest:
    """The request for the facade's arguments (`video_length=`, `resolution=`, ...; image paths
    opened); validated. An unknown name raises TypeError listing the known ones."""
    args = {a.name: a for a in request_arguments(GenerationRequest)}
    unknown = sorted(set(values) - set(args))
    if unknown:
        raise TypeError(f"unknown request argument(s) {', '.join(unknown)}; known: {', '.join(args)}")
    fields: dict[str, Any] = {}
    for name, value in values.items():
        fields.update(args[name].to_fields(value))
    return GenerationRequest(prompt=prompt, **fields)


def facade_option_arguments(options_cls: type) -> tuple[Argument, ...]:
    """The top-level fields of the options dataclass (EngineOptions) as the facade's keywords; a
    nested options dataclass (parallel) also takes a dict of its fields and, lacking a docstring
    of its own, is described by its class's."""
    hints, docs = get_type_hints(options_cls), field_docs(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        annotation = hints[f.name]
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(annotation):
            doc = doc or " ".join((inspect.getdoc(annotation) or "").split())
            annotation = annotation | dict
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Argument(name=f.name, fields=(f.name,), annotation=annotation, default=default,
                            required=False, doc=doc, override=Override()))
    return tuple(out)


def parameters(arguments: Iterable[Argument], kind=inspect.Parameter.KEYWORD_ONLY) -> list[inspect.Parameter]:
    """`inspect.Parameter`s for the arguments (a required one has no default)."""
    return [inspect.Parameter(a.name, kind, annotation=a.annotation,
                              default=inspect.Parameter.empty if a.required else a.default)
            for a in arguments]


def request_signature(positional: Iterable[str], after_positional: Iterable[inspect.Parameter] = ()
                      ) -> inspect.Signature:
    """The request arguments as a signature: those named in `positional` first, in that order
    (positional-or-keyword), then `after_positional`, then every other one keyword-only in
    declaration order (so a new request field is a new keyword)."""
    args = {a.name: a for a in request_arguments(GenerationRequest)}
    positional = list(positional)
    missing = [name for name in positional if name not in args]
    if missing:
        raise RuntimeError(f"positional parameter(s) {', '.join(missing)} are no longer request arguments "
                           f"(stages/request.py); known: {', '.join(args)}")
    return inspect.Signature(
        parameters([args[n] for n in positional], inspect.Parameter.POSITIONAL_OR_KEYWORD)
        + list(after_positional)
        + parameters([a for n, a in args.items() if n not in positional]))


def describe(arguments: Iterable[Argument], indent: str = "    ") -> str:
    """"name: doc" lines (for the facade's docstrings)."""
    return "".join(f"{indent}{a.name}: {a.doc}\n" if a.doc else f"{indent}{a.name}\n" for a in arguments)


# ----------------------------------------------------------------------------- types


def strip_optional(annotation: Any) -> Any:
    """`int | None` -> int; `Annotated[T, ...]` -> T; anything else as is."""
    if get_origin(annotation) is Annotated:
        return strip_optional(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return strip_optional(rest[0])
    return annotation


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    annotation = strip_optional(annotation)
    return get_args(annotation) if get_origin(annotation) is Literal else None


def _mentions(annotation: Any, target: type) -> bool:
    return annotation is target or any(_mentions(a, target) for a in get_args(annotation))


def _open_images(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return load_image_file(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return [_open_images(v) for v in value]
    return value
