"""The request's lora / cache / cache_options and the lora engine options on the CLI (derived flags)."""
from __future__ import annotations

import argparse

import pytest

from lightx2v.arguments import parse_json_object, parse_lora
from lightx2v.cli import add_generate_arguments, add_serve_arguments


def _parser(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


def test_lora_flag_forms():
    assert parse_lora("a.safetensors") == [{"path": "a.safetensors", "strength": 1.0}]
    assert parse_lora("a.safetensors:0.7,dir/b.safetensors:0.5:high_noise") == [
        {"path": "a.safetensors", "strength": 0.7},
        {"path": "dir/b.safetensors", "strength": 0.5, "expert": "high_noise"}]
    assert parse_lora('[{"name": "style", "strength": 0.3}]') == [{"name": "style", "strength": 0.3}]
    assert parse_json_object('{"threshold": 0.1}') == {"threshold": 0.1}
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_json_object("[1, 2]")


def test_flags_exist_on_generate_and_serve():
    generate = _parser(add_generate_arguments)
    ns = generate.parse_args(["--prompt", "x", "-o", "x.mp4", "--lora", "a.safetensors:0.7", "--cache", "magcache",
                              "--cache-options", '{"threshold": 0.1}', "--lora-path", "a.safetensors",
                              "b.safetensors", "--lora-strength", "0.5", "--lora-expert", "high_noise",
                              "low_noise", "--lora-dir", "loras", "--lora-cache", "2"])
    assert ns.lora == [{"path": "a.safetensors", "strength": 0.7}] and ns.cache == "magcache"
    assert ns.cache_options == {"threshold": 0.1} and ns.lora_path == ["a.safetensors", "b.safetensors"]
    assert ns.lora_strength == [0.5] and ns.lora_expert == ["high_noise", "low_noise"] and ns.lora_cache == 2
    serve = _parser(add_serve_arguments).parse_args(["--lora-dir", "/srv/loras", "--lora-path", "a.safetensors"])
    assert serve.lora_dir == "/srv/loras" and serve.lora_path == ["a.safetensors"]
