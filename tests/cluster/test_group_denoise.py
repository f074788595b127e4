"""The library and the CLI on a DiT worker group: `LightX2V.from_pretrained(..., parallel=...)` and
`lightx2v generate --cfg-parallel/--ulysses-degree` (tiny-wan, CPU, gloo, Ray already running)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_facade_parallel_equals_plain(ray_session, tiny_wan_dir):
    from cluster.group_denoise import GroupDenoiseStage
    from lightx2v import LightX2V

    torch.set_num_threads(1)
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    plain = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32")
    group = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32",
                                     parallel={"cfg": 2, "ulysses": 1})
    try:
        assert isinstance(group.pipeline.denoise, GroupDenoiseStage)
        assert len(group.pipeline.denoise.group.ranks) == 2
        for img in (None, image):   # T2V, then I2V
            steps: list[tuple[int, int]] = []
            kwargs = dict(image=img, seed=5, steps=3, output_type="latent")
            want = plain.generate("a cat on a beach", **kwargs)
            got = group.generate("a cat on a beach", **kwargs, progress=lambda s, t: steps.append((s, t)))
            assert rel_err(got, want) < 1e-4
            assert steps and steps[-1] == (3, 3)
            assert group.last_result.timings["denoise"] > 0
    finally:
        group.close()
    with pytest.raises(Exception, match="shut down"):
        group.pipeline.denoise.check_health()


def test_cli_generate_with_parallel_flags(ray_session, tiny_wan_dir, tmp_path, capsys):
    from lightx2v.cli import main
    from stages.video import read_mp4

    out = tmp_path / "x.mp4"
    rc = main(["generate", "--model", "tiny-wan", "--prompt", "a dog", "--device", "cpu",
               "--steps", "2", "--video-length", "5", "--size", "64x48", "--seed", "1",
               "--ulysses-degree", "2", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert read_mp4(str(out)).frames.shape == (5, 48, 64, 3)


def test_cli_refuses_degree_the_heads_do_not_divide(ray_session, tiny_wan_dir, tmp_path, capsys):
    from lightx2v.cli import main

    rc = main(["generate", "--model", "tiny-wan", "--prompt", "a dog", "--device", "cpu",
               "--ulysses-degree", "3", "-o", str(tmp_path / "y.mp4")])
    assert rc == 2
    assert "parallel.ulysses=3 does not divide the model's 2 attention heads" in capsys.readouterr().err
