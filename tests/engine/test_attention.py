"""Attention backend registry, AttentionCore and set_attention_backend."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.attention import (
    DEFAULT_BACKEND,
    AttentionBackend,
    AttentionCore,
    get_backend,
    list_backends,
    register_backend,
    sdpa_attention,
    set_attention_backend,
    unregister_backend,
)

torch.set_num_threads(1)


def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v on (B, L, H, D)."""
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


@pytest.fixture
def fake_backends():
    """Registers test backends and removes them afterwards (the registry is process-wide)."""
    names: list[str] = []

    def add(backend: AttentionBackend) -> AttentionBackend:
        register_backend(backend)
        names.append(backend.name)
        return backend

    yield add
    for name in names:
        unregister_backend(name)


def test_sdpa_is_registered_default_and_correct():
    assert DEFAULT_BACKEND == "sdpa" and "sdpa" in list_backends()
    assert AttentionCore().backend.name == "sdpa"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 8, generator=g)
    k = torch.randn(2, 11, 3, 8, generator=g)  # cross-attention: Lk != Lq
    v = torch.randn(2, 11, 3, 8, generator=g)
    out = get_backend("sdpa", "cpu").fn(q, k, v)
    assert out.shape == (2, 7, 3, 8)
    torch.testing.assert_close(out, naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(AttentionCore()(q, k, v), out)


def test_unknown_backend_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; known backends: .*sdpa"):
        get_backend("nope", "cpu")


def test_requirement_failure_gives_reason(fake_backends):
    fake_backends(AttentionBackend(
        "test-needs-cuda", sdpa_attention,
        requirement=lambda device: None if device.type == "cuda" else "needs a CUDA device",
    ))
    with pytest.raises(ValueError, match=r"'test-needs-cuda' cannot run on device 'cpu': needs a CUDA device"):
        get_backend("test-needs-cuda", "cpu")
    # the requirement is checked for the device asked about
    assert get_backend("test-needs-cuda", torch.device("cuda", 0)).name == "test-needs-cuda"


def test_duplicate_registration_refused(fake_backends):
    fake_backends(AttentionBackend("test-dup", sdpa_attention))
    with pytest.raises(ValueError, match="already registered"):
        register_backend(AttentionBackend("test-dup", naive_attention))
    register_backend(AttentionBackend("test-dup", naive_attention), replace=True)
    assert get_backend("test-dup").fn is naive_attention


class TwoLayers(nn.Module):
    """A model with cores at several depths, one inside a wrapper module (as a parallel wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.layers = nn.ModuleList([nn.ModuleDict({"core": AttentionCore()}) for _ in range(2)])
        self.wrapped = nn.Sequential(nn.Identity(), AttentionCore())


def test_set_attention_backend_swaps_every_core(fake_backends):
    calls: list[tuple[int, ...]] = []

    def recording(q, k, v):
        calls.append(tuple(q.shape))
        return sdpa_attention(q, k, v)

    fake_backends(AttentionBackend("test-recording", recording))
    model = TwoLayers()
    cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    assert len(cores) == 3
    set_attention_backend(model, "test-recording")
    assert all(core.backend.name == "test-recording" for core in cores)
    q = torch.randn(1, 5, 2, 4)
    for core in cores:
        torch.testing.assert_close(core(q, q, q), sdpa_attention(q, q, q))
    assert calls == [(1, 5, 2, 4)] * 3
    set_attention_backend(model, "sdpa")
    assert all(core.backend.name == "sdpa" for core in cores)


def test_set_attention_backend_checks_before_swapping(fake_backends):
    fake_backends(AttentionBackend("test-never", sdpa_attention, requirement=lambda d: "never available"))
    model = TwoLayers()
    with pytest.raises(ValueError, match="never available"):
        set_attention_backend(model, "test-never")
    with pytest.raises(ValueError, match="known backends"):
        set_attention_backend(model, "nope")
    assert all(m.backend.name == "sdpa" for m in model.modules() if isinstance(m, AttentionCore))
    # the device checked defaults to the model's; an explicit device overrides it
    fake_backends(AttentionBackend("test-cuda", sdpa_attention,
                                   requirement=lambda d: None if d.type == "cuda" else "needs CUDA"))
    with pytest.raises(ValueError, match="needs CUDA"):
        set_attention_backend(model, "test-cuda")
    set_attention_backend(model, "test-cuda", device="cuda")
    assert model.wrapped[1].backend.name == "test-cuda"


def test_set_attention_backend_without_cores_is_an_error():
    with pytest.raises(ValueError, match="has no AttentionCore"):
        set_attention_backend(nn.Linear(2, 2), "sdpa")
