"""Options and request fields are declared once; the CLI flags, the serve-config arguments and the
facade's keywords are derived from them (lightx2v/arguments.py, engine/options.py)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.options import EngineOptions, ParallelConfig, option_fields, options_from_flat
from lightx2v import LightX2V
from lightx2v.arguments import request_arguments
from lightx2v.cli import add_generate_arguments, add_serve_arguments, main
from serving.config import AppArgs
from stages.request import GenerationRequest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "stages", "cluster", "serving", "lightx2v")


def _flags(add) -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser._option_string_actions


def test_every_engine_option_is_a_flag_an_app_arg_and_a_keyword():
    generate, serve = _flags(add_generate_arguments), _flags(add_serve_arguments)
    for f in option_fields(EngineOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in generate and flag in serve, flag
        assert generate[flag].help.startswith(f.doc[:40]), flag  # help = the field's docstring
        assert f.name in AppArgs.model_fields and AppArgs.model_fields[f.name].default == f.default, f.name
        if f.choices:
            assert tuple(generate[flag].choices) == f.choices, flag
    keywords = inspect.signature(LightX2V.from_pretrained).parameters
    for f in dataclasses.fields(EngineOptions):
        assert f.name in keywords, f.name
        assert f.name in LightX2V.from_pretrained.__doc__, f.name
    # today's names kept
    assert {"--cfg-parallel", "--ulysses-degree", "--cfg-batch", "--offload"} <= set(generate)
    assert "expert" in generate["--offload"].choices and "expert" in serve["--offload"].choices


def test_every_request_field_is_reachable_from_the_cli_and_the_facade():
    args = request_arguments()
    assert sorted(f for a in args for f in a.fields) == sorted(GenerationRequest.model_fields)
    keywords = inspect.signature(LightX2V.generate).parameters
    flags = _flags(add_generate_arguments)
    for a in args:
        assert a.name in keywords, a.name
        assert all(f in flags for f in a.flags), a.flags
    library_only = {f for a in args if not a.flags for f in a.fields}
    assert library_only == {"latents", "output_type"}  # a tensor; the CLI writes the file named by -o
    # today's names kept
    assert {"--prompt", "--video-length", "--size", "--image", "--seed", "-o"} <= set(flags)


def test_cli_flags_reach_the_facade(tiny_wan_dir, monkeypatch, tmp_path):
    """Every engine flag lands in from_pretrained, every request flag in generate (names mapped)."""
    seen = {}

    class Stop(Exception):
        pass

    class Model:
        def generate(self, **kwargs):
            seen["generate"] = kwargs
            raise Stop

        def close(self):
            pass

    def from_pretrained(model, device, dtype, **kwargs):
        seen["from_pretrained"] = (model, device, dtype, kwargs)
        return Model()

    monkeypatch.setattr(LightX2V, "from_pretrained", from_pretrained)
    out = str(tmp_path / "x.mp4")
    with pytest.raises(Stop):
        main(["generate", "--prompt", "a fox", "--negative-prompt", "blur", "--video-length", "5",
              "--size", "48x32", "--steps", "3", "--guidance-scale", "4.5", "--shift", "3",
              "--sampler", "euler", "--seed", "7", "--fps", "8", "--device", "cpu",
              "--attention", "sdpa", "--quantization", "int8", "--offload", "block", "--vae-tiling",
              "--compile", "--cfg-batch", "--cfg-parallel", "2", "--ulysses-degree", "1", "-o", out])
    model, device, dtype, options = seen["from_pretrained"]
    assert (model, device, dtype) == ("tiny-wan", "cpu", "float32")  # dtype from the device
    assert options == dict(attention="sdpa", quantization="int8", offload="block", vae_tiling=True,
                           compile=True, cfg_batch=True, interpolator=None, lora_path=(), lora_strength=(),
                           lora_expert=(), lora_dir=None, lora_cache=4, parallel=ParallelConfig(cfg=2, ulysses=1))
    assert seen["generate"].pop("progress") is not None
    assert seen["generate"] == dict(prompt="a fox", negative_prompt="blur", video_length=5,
                                    resolution=(32, 48), steps=3, guidance_scale=4.5, shift=3.0,
                                    sampler="euler", seed=7, fps=8, output_path=out)


def test_flat_option_errors_name_the_flat_field():
    with pytest.raises(ValueError, match="^cfg_parallel must be 1 or 2"):
        options_from_flat(EngineOptions, {"cfg_parallel": 3})
    with pytest.raises(TypeError, match="unknown option.*cfg_degree"):
        options_from_flat(EngineOptions, {"cfg_degree": 2})
    assert options_from_flat(EngineOptions, {"ulysses_degree": 2}).parallel == ParallelConfig(ulysses=2)


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--size", "832", "-o", "x.mp4"])
    assert info.value.code == 2 and "--size must be WIDTHxHEIGHT" in capsys.readouterr().err


NEW_FIELDS = textwrap.dedent('''
    import dataclasses, inspect, sys, typing

    import pydantic
    import engine.options as eo
    import stages.request as sr


    @dataclasses.dataclass(frozen=True)
    class Options(eo.EngineOptions):
        feature_cache: typing.Literal["none", "tea"] = "none"
        """Feature cache policy (declared by this test only)."""


    class Request(sr.GenerationRequest):
        motion_strength: float | None = None
        """How much the scene moves (declared by this test only)."""


    eo.EngineOptions, sr.GenerationRequest = Options, Request  # before any surface is imported

    from lightx2v import LightX2V
    from lightx2v.api import build_engine_options
    from lightx2v.cli import build_parser
    from serving.config import AppArgs
    from serving.launch import app_args_from

    # the engine option: a flag of generate and serve, an AppArgs field, a from_pretrained keyword
    parser = build_parser()
    gen = parser.parse_args(["generate", "--prompt", "x", "-o", "x.mp4", "--feature-cache", "tea",
                             "--motion-strength", "0.5"])
    assert gen.feature_cache == "tea" and gen.motion_strength == 0.5
    srv = parser.parse_args(["serve", "--feature-cache", "tea"])
    assert app_args_from(srv).engine_options().feature_cache == "tea"
    assert AppArgs.model_fields["feature_cache"].description.startswith("Feature cache policy")
    try:
        AppArgs(feature_cache="ice")
        raise AssertionError("a bad value was accepted")
    except pydantic.ValidationError as e:
        assert "feature_cache" in str(e)
    assert "feature_cache" in inspect.signature(LightX2V.from_pretrained).parameters
    assert build_engine_options("cpu", "float32", {"feature_cache": "tea"}).feature_cache == "tea"
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert "Feature cache policy" in help_text and "How much the scene moves" in help_text

    # the request field: a generate keyword (keyword-only) that reaches the request
    param = inspect.signature(LightX2V.generate).parameters["motion_strength"]
    assert param.kind is param.KEYWORD_ONLY

    class Pipeline:
        def run(self, request, progress=None, should_cancel=None):
            self.request = request
            return type("Result", (), {"request": type("R", (), {"output_type": "latent"}),
                                       "output": type("O", (), {"latents": "latents"})})

    model = LightX2V(Pipeline(), options=None)
    assert model.generate("x", motion_strength=0.5) == "latents"
    assert model.pipeline.request.motion_strength == 0.5
    print("ok")
''')


def test_a_new_option_and_a_new_request_field_appear_everywhere(tmp_path):
    """Declaring a field is the only edit: a subprocess declares one of each (subclasses put in
    place of EngineOptions / GenerationRequest before the surfaces are imported) and finds them
    on the CLI, in AppArgs and in the facade, with their docstrings as help."""
    script = tmp_path / "new_fields.py"
    script.write_text(NEW_FIELDS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _files_spelling(word: str, packages=PACKAGES) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pkg in packages for p in (ROOT / pkg).rglob("*.py")
                  if word in p.read_text())


def test_the_surfaces_do_not_spell_option_names():
    """The CLI, the serve config and the facade derive every option: none names cfg_batch."""
    assert _files_spelling("cfg_batch", ("lightx2v", "serving")) == []


def test_cfg_batch_is_spelled_in_at_most_two_source_files():
    """Its declaration and the one place that uses it (issue 12: it was in 10 files)."""
    files = _files_spelling("cfg_batch")
    assert len(files) <= 2, files


def test_serving_never_imports_the_cli_or_the_facade():
    """The cycle serving.cli <-> serving.launch is cut: serving imports nothing of lightx2v
    (module-level or inside functions); the CLI imports serving."""
    for path in sorted((ROOT / "serving").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "lightx2v" or n.startswith("lightx2v.") for n in names), path
