"""`lightx2v serve`'s service flags (derived from serving.settings.ServiceSettings) reach the
settings; a bad key ends the command with a one-line error before Ray starts."""
from __future__ import annotations

from lightx2v.cli import build_parser
from serving.settings import ServiceSettings


def test_service_flags_set_the_settings():
    ns = build_parser().parse_args([
        "serve", "--api-key", "k" * 20, "k" * 21, "--cors-origins", "https://app.example",
        "--max-body-bytes", "2048", "--max-image-pixels", "1000000", "--ingress-replicas", "3",
        "--job-lease-s", "5"])
    settings = ServiceSettings.from_flags(ns)
    assert settings == ServiceSettings(api_keys=("k" * 20, "k" * 21), cors_origins=("https://app.example",),
                                       max_body_bytes=2048, max_image_pixels=1_000_000,
                                       ingress_replicas=3, job_lease_s=5.0)
    assert ServiceSettings.from_flags(build_parser().parse_args(["serve"])) == ServiceSettings()


def test_a_short_key_is_refused_before_anything_starts(capsys):
    ns = build_parser().parse_args(["serve", "--api-key", "short"])
    assert ns.func(ns) == 2
    assert "an API key must be at least 16" in capsys.readouterr().err
