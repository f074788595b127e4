"""`FamilyParityMixin`: the tests every model family runs against its reference (diffusers 0.42.1),
on tiny random-weight checkpoints it writes itself. A family's test class fills in the hooks:

    class TestWan22A14B(FamilyParityMixin):
        cases = {"t2v": dict(num_frames=5, height=32, width=48, steps=10)}
        could_fail = {"guidance off": dict(guidance_scale=1.0)}
        def write_checkpoint(self, root): ...          # a diffusers-layout folder
        def write_official(self, diffusers_dir, root): ...   # the same weights, official layout
        def reference(self, ckpt_dir): ...             # (case kwargs) -> latents, from diffusers
        def key_maps(self, ckpt_dir): ...              # [(label, diffusers-keyed dict, to_official, to_diffusers)]
        def skeletons(self, ckpt_dir): ...             # {folder: DiT built on the meta device}

and inherits:
- the meta build: each DiT built on the meta device has exactly the checkpoint's tensor names and
  shapes (loading assigns every tensor once, strictly; nothing is initialised twice);
- key maps both ways: diffusers -> official -> diffusers is the identity, and official keys differ;
- parity: our latents for every case within `tol` (relative) of the reference's;
- it could fail: each `could_fail` change moves our latents more than `margin * tol` from the
  reference (weights that hide mistakes would make the parity test meaningless);
- the official layout loads to the same latents as the diffusers layout (same weights).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from engine.checkpoint import resolve_checkpoint
from engine.options import EngineOptions
from stages.pipeline import LocalPipeline
from stages.request import GenerationRequest

PROMPT, NEGATIVE, SEED = "a red fox runs in the snow", "blurry, static", 42
CPU = EngineOptions(device="cpu", dtype="float32")


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def our_latents(pipe: LocalPipeline, **kwargs) -> torch.Tensor:
    request = GenerationRequest(**{"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED,
                                   "output_type": "latent", **kwargs})
    return pipe.run(request).output.latents


class FamilyParityMixin:
    cases: dict[str, dict] = {}
    """Request keyword arguments per case (the prompt, negative prompt and seed are fixed)."""
    could_fail: dict[str, tuple[str, dict]] = {}
    """name -> (case, changed request kwargs) that must move the result far from the reference."""
    tol: float = 1e-3
    margin: float = 10.0
    official_changes: dict = {}
    """Request changes that make the official layout (registry defaults) sample as the diffusers
    layout (its scheduler config) does, e.g. the shift."""

    # -- hooks ---------------------------------------------------------------------------------
    def write_checkpoint(self, root: str) -> str:
        raise NotImplementedError

    def write_official(self, diffusers_dir: str, root: str) -> str:
        raise NotImplementedError

    def reference(self, ckpt_dir: str) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def key_maps(self, ckpt_dir: str) -> list[tuple[str, dict, Callable, Callable]]:
        raise NotImplementedError

    def skeletons(self, ckpt_dir: str) -> dict[str, nn.Module]:
        raise NotImplementedError

    # -- fixtures (one checkpoint, pipeline and reference per test class) ----------------------
    @pytest.fixture(scope="class")
    def ckpt_dir(self, tmp_path_factory) -> str:
        torch.set_num_threads(1)
        return self.write_checkpoint(str(tmp_path_factory.mktemp(type(self).__name__)))

    @pytest.fixture(scope="class")
    def ours(self, ckpt_dir) -> LocalPipeline:
        return LocalPipeline.from_checkpoint(resolve_checkpoint(ckpt_dir), CPU)

    @pytest.fixture(scope="class")
    def ref(self, ckpt_dir) -> Callable[..., torch.Tensor]:
        return self.reference(ckpt_dir)

    @pytest.fixture(scope="class")
    def ref_latents(self, ref) -> dict[str, torch.Tensor]:
        return {name: ref(**kwargs) for name, kwargs in self.cases.items()}

    # -- the inherited tests -------------------------------------------------------------------
    def test_meta_build_matches_the_checkpoint(self, ckpt_dir):
        from engine.loading import lazy_safetensors

        for folder, skeleton in self.skeletons(ckpt_dir).items():
            assert all(p.device.type == "meta" for p in skeleton.parameters())
            ours = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
            stored = {k: v.shape for k, v in lazy_safetensors(f"{ckpt_dir}/{folder}").items()}
            assert ours == stored, folder

    def test_key_maps_both_ways(self, ckpt_dir):
        for label, state, to_official, to_diffusers in self.key_maps(ckpt_dir):
            official = to_official(state)
            assert set(official) != set(state), f"{label}: the official names should differ"
            back = to_diffusers(official)
            assert set(back) == set(state), label
            assert all(back[k] is state[k] for k in state), f"{label}: tensors must pass through untouched"

    def test_matches_the_reference(self, ours, ref_latents):
        for name, kwargs in self.cases.items():
            got, want = our_latents(ours, **kwargs), ref_latents[name]
            assert got.shape == want.shape, name
            assert want.abs().mean() > 0.1, f"{name}: degenerate reference"
            err = rel_err(got, want)
            assert err < self.tol, f"{name}: relative error {err:.2e}"

    def test_deliberate_mistakes_would_fail(self, ours, ref_latents):
        for label, (case, changes) in self.could_fail.items():
            err = rel_err(our_latents(ours, **{**self.cases[case], **changes}), ref_latents[case])
            assert err > self.margin * self.tol, f"{label}: moved only {err:.2e}"

    def test_official_layout_loads_to_the_same_output(self, ckpt_dir, ours, tmp_path):
        official = resolve_checkpoint(self.write_official(ckpt_dir, str(tmp_path / "official")))
        assert official.layout == "official"
        pipe = LocalPipeline.from_checkpoint(official, CPU)
        for name, kwargs in self.cases.items():
            a = our_latents(pipe, **{**kwargs, **self.official_changes})
            assert rel_err(a, our_latents(ours, **kwargs)) < 1e-5, name
