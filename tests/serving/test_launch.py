"""`lightx2v serve` flags -> AppArgs (the CLI, lightx2v/cli.py, derives the flags and calls serving.launch)."""
from __future__ import annotations

import argparse

import pytest

from lightx2v.cli import add_serve_arguments
from serving.launch import app_args_from


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_cpu_defaults_fit_a_small_machine(tmp_path):
    ns = _parse("--model", "tiny-wan", "--host", "127.0.0.1", "--port", "8765", "--data-dir", str(tmp_path))
    args = app_args_from(ns)
    assert (args.model, args.device, args.dtype, args.replica_cpus) == ("tiny-wan", "cpu", "float32", 0.0)
    assert args.data_dir == str(tmp_path) and ns.port == 8765


def test_gpu_flags():
    ns = _parse("--device", "cuda", "--cfg-parallel", "2", "--ulysses-degree", "2", "--max-pending-jobs", "9",
                "--quantization", "fp8", "--cfg-batch")
    args = app_args_from(ns)
    assert args.dtype == "bfloat16" and args.world_size == 4 and args.replica_cpus == 1.0
    assert args.ingress.max_pending_jobs == 9 and args.quantization == "fp8"
    assert args.engine_options().cfg_batch is True
    options = app_args_from(_parse("--device", "cuda", "--offload", "block")).engine_options()
    assert (options.offload, options.cfg_batch) == ("block", False)


def test_bad_flag_values_name_the_field():
    with pytest.raises(ValueError, match="cfg_parallel"):
        app_args_from(_parse("--cfg-parallel", "3"))


def test_cli_serve_subcommand_uses_these_flags():
    from lightx2v.cli import build_parser

    ns = build_parser().parse_args(["serve", "--model", "tiny-wan", "--port", "8765"])
    assert app_args_from(ns).model == "tiny-wan" and ns.port == 8765


@pytest.mark.parametrize("argv,field", [
    (("--cfg-parallel", "3"), "cfg_parallel"),
    (("--model", "/nonexistent/checkpoint"), "model"),
])
def test_serve_main_refuses_bad_flags_before_starting_ray(monkeypatch, capsys, argv, field):
    import serving.launch as launch

    def must_not_start(*_a, **_k):
        raise AssertionError("Ray must not be started for invalid flags")

    monkeypatch.setattr(launch, "start_service", must_not_start)
    assert launch.serve_main(_parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err, err
