"""Model resolution (engine.checkpoint.resolve_checkpoint, engine.hub): a local folder, a registry
name or alias, $LIGHTX2V_MODEL_ROOT/<name>, the Hugging Face hub cache (a fake one laid out as
huggingface_hub lays it out), a download only when allowed; one error listing every place looked.
No test touches the network: endpoints are loopback addresses."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: the fake hub cache writer
from hub_cache import repo_folder, write_snapshot  # noqa: E402

from engine import hub  # noqa: E402
from engine.checkpoint import resolve_checkpoint  # noqa: E402

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
TINY_REPO = "test-org/tiny-wan-diffusers"
WAN14B_REPO = "Wan-AI/Wan2.1-T2V-14B-Diffusers"   # an alias (hub id) of the entry wan2.1-t2v-14b
T2V_14B = dict(num_attention_heads=40, attention_head_dim=128, num_layers=40, ffn_dim=13824,
               in_channels=16, out_channels=16)
"""The DiT config of Wan2.1 T2V 14B (variant detection reads configs only, never weights)."""


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """Every test starts with an empty hub cache and model root of its own, online settings
    pointing at a dead loopback port, and the process-wide variables cleared."""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", hub.MODEL_ROOT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.chdir(tmp_path)


def wan14b_configs(path) -> str:
    """A diffusers-layout folder of Wan2.1 T2V 14B holding only its configs."""
    os.makedirs(os.path.join(path, "transformer"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}, f)
    with open(os.path.join(path, "transformer", "config.json"), "w") as f:
        json.dump({"_class_name": "WanTransformer3DModel", **T2V_14B}, f)
    return str(path)


# --------------------------------------------------------------------------- the hub cache


def test_hub_id_in_the_cache_resolves_to_its_snapshot_and_loads(tiny_wan_dir, tmp_path):
    from lightx2v import LightX2V

    snapshot = write_snapshot(tmp_path / "hf-cache", TINY_REPO, tiny_wan_dir, COMMIT_A)
    assert os.path.islink(os.path.join(snapshot, "transformer", "config.json"))  # the real layout
    ckpt = resolve_checkpoint(TINY_REPO)
    assert ckpt.path == snapshot and ckpt.spec.name == "tiny-wan" and ckpt.layout == "diffusers"
    model = LightX2V.from_pretrained(TINY_REPO, device="cpu", dtype="float32")   # the facade resolves so
    frames = model.generate("a fox", video_length=5, resolution=(32, 32), steps=1, seed=0, output_type="np")
    assert frames.shape == (5, 32, 32, 3)


def test_cache_folder_follows_hf_home_and_hf_hub_cache(tiny_wan_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == str(tmp_path / "home" / "hub")
    snapshot = write_snapshot(tmp_path / "home" / "hub", TINY_REPO, tiny_wan_dir, COMMIT_A)
    assert resolve_checkpoint(TINY_REPO).path == snapshot
    # HF_HUB_CACHE wins over HF_HOME, read when resolving (not when huggingface_hub was imported)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"Hugging Face cache .*other: test-org/tiny-wan-diffusers at revision main: not cached"):
        resolve_checkpoint(TINY_REPO)


def test_revision_picks_the_snapshot(tmp_path):
    cache = tmp_path / "hf-cache"
    a = write_snapshot(cache, WAN14B_REPO, wan14b_configs(tmp_path / "a"), COMMIT_A, refs=("main",))
    b = write_snapshot(cache, WAN14B_REPO, wan14b_configs(tmp_path / "b"), COMMIT_B, refs=("v2",))
    assert resolve_checkpoint(WAN14B_REPO).path == a                        # main
    assert resolve_checkpoint(WAN14B_REPO, revision="v2").path == b         # a tag
    assert resolve_checkpoint(WAN14B_REPO, revision=COMMIT_A).path == a     # a commit hash
    assert resolve_checkpoint("Wan2.1-T2V-14B", revision="v2").path == b    # by name, same revision
    with pytest.raises(ValueError, match="at revision v3: not cached"):
        resolve_checkpoint(WAN14B_REPO, revision="v3")


def test_registry_names_find_the_entrys_hub_ids_in_the_cache(tmp_path):
    snapshot = write_snapshot(tmp_path / "hf-cache", WAN14B_REPO, wan14b_configs(tmp_path / "src"), COMMIT_A)
    for name in ("Wan2.1-T2V-14B", "wan2.1-t2v-14b", "WAN2.1-T2V-14B", WAN14B_REPO, WAN14B_REPO.lower()):
        ckpt = resolve_checkpoint(name)
        assert (ckpt.path, ckpt.spec.name) == (snapshot, "wan2.1-t2v-14b"), name


def test_a_folder_found_for_an_entry_must_hold_that_variant(tiny_wan_dir, tmp_path):
    write_snapshot(tmp_path / "hf-cache", WAN14B_REPO, tiny_wan_dir, COMMIT_A)
    with pytest.raises(ValueError, match=r"found in Hugging Face cache \(Wan-AI/Wan2.1-T2V-14B-Diffusers\).*"
                                         r"spec_name='wan2.1-t2v-14b' does not fit"):
        resolve_checkpoint("Wan2.1-T2V-14B")


def test_an_interrupted_download_is_not_taken_for_a_snapshot(tmp_path):
    """huggingface_hub 2.x keeps the repo's file list (trees/<commit>.json, written by its own
    writer here) and refuses a snapshot that misses files: listed as incomplete, not loaded."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache", reason="this huggingface_hub keeps no file list")
    write_snapshot(tmp_path / "hf-cache", WAN14B_REPO, wan14b_configs(tmp_path / "src"), COMMIT_A)
    files = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    tree_cache.write_tree_cache(repo_folder(tmp_path / "hf-cache", WAN14B_REPO), COMMIT_A,
                                {p: tree_cache.TreeCacheEntry(size=1, blob_id="0" * 40) for p in files})
    with pytest.raises(ValueError, match=r"at revision main: incomplete snapshot .*1 file\(s\) are missing"):
        resolve_checkpoint(WAN14B_REPO)


# --------------------------------------------------------------------------- $LIGHTX2V_MODEL_ROOT


def test_model_root_by_name_alias_and_last_component(tiny_wan_dir, tmp_path, monkeypatch):
    root = tmp_path / "models"
    os.makedirs(root)
    os.symlink(tiny_wan_dir, root / "my-finetune")
    wan14b_configs(root / "Wan2.1-T2V-14B-Diffusers")
    monkeypatch.setenv(hub.MODEL_ROOT_ENV, f"{tmp_path / 'empty'}{os.pathsep}{root}")
    assert resolve_checkpoint("my-finetune").spec.name == "tiny-wan"                 # a name no entry knows
    for name in ("wan2.1-t2v-14b", "Wan2.1-T2V-14B", WAN14B_REPO):                   # the alias's last component
        ckpt = resolve_checkpoint(name)
        assert (ckpt.path, ckpt.spec.name) == (str(root / "Wan2.1-T2V-14B-Diffusers"), "wan2.1-t2v-14b")
    # the model root comes before the hub cache
    write_snapshot(tmp_path / "hf-cache", WAN14B_REPO, wan14b_configs(tmp_path / "src"), COMMIT_A)
    assert resolve_checkpoint(WAN14B_REPO).path == str(root / "Wan2.1-T2V-14B-Diffusers")


def test_a_local_folder_comes_first(tmp_path, monkeypatch):
    wan14b_configs(tmp_path / "Wan2.1-T2V-14B")   # in the working directory, named like an alias
    root = tmp_path / "models"
    wan14b_configs(root / "Wan2.1-T2V-14B")
    monkeypatch.setenv(hub.MODEL_ROOT_ENV, str(root))
    assert resolve_checkpoint("Wan2.1-T2V-14B").path == str(tmp_path / "Wan2.1-T2V-14B")


def test_generated_entries_need_no_search(monkeypatch):
    monkeypatch.setenv(hub.MODEL_ROOT_ENV, "/nonexistent")
    assert resolve_checkpoint("TINY-WAN").spec.name == "tiny-wan"   # case-insensitive, materialised


# --------------------------------------------------------------------------- nowhere: the error


def test_a_name_found_nowhere_lists_every_place(tmp_path, monkeypatch):
    root = tmp_path / "models"
    os.makedirs(root)
    monkeypatch.setenv(hub.MODEL_ROOT_ENV, str(root))
    with pytest.raises(hub.ModelNotFoundError) as err:
        resolve_checkpoint("Wan2.1-T2V-14B")
    text = str(err.value)
    assert isinstance(err.value, ValueError)
    assert text.startswith("model 'Wan2.1-T2V-14B' (registry entry wan2.1-t2v-14b) has no local weights")
    places = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(places) == 6, text
    assert f"local folder {tmp_path / 'Wan2.1-T2V-14B'}: no such directory" in places[0]
    assert "model registry: entry wan2.1-t2v-14b" in places[1]
    assert f"$LIGHTX2V_MODEL_ROOT={root}: no sub-folder Wan2.1-T2V-14B or wan2.1-t2v-14b" in places[2]
    assert "Wan2.1-T2V-14B-Diffusers" in places[2]
    cache = tmp_path / "hf-cache"
    assert f"Hugging Face cache {cache}: Wan-AI/Wan2.1-T2V-14B at revision main: not cached" in places[3]
    assert f"Hugging Face cache {cache}: {WAN14B_REPO} at revision main: not cached" in places[4]
    assert "download: not allowed (pass download=True, or --download" in places[5]


def test_an_unknown_name_lists_the_places_and_the_registry(monkeypatch):
    with pytest.raises(ValueError) as err:
        resolve_checkpoint("no-such-model")
    text = str(err.value)
    assert "neither a registered model name or alias (" in text and "tiny-wan," in text
    assert "$LIGHTX2V_MODEL_ROOT: not set" in text
    assert "not looked: 'no-such-model' is not a hub id (org/name)" in text
    with pytest.raises(ValueError, match="no-org/no-model at revision main: not cached"):
        resolve_checkpoint("no-org/no-model")


# --------------------------------------------------------------------------- downloads


def test_download_without_network_fails_fast(monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(hub.DownloadError) as err:
        resolve_checkpoint("Wan2.1-T2V-14B", download=True)
    assert time.monotonic() - t0 < 10
    text = str(err.value)
    assert text.startswith("could not download Wan-AI/Wan2.1-T2V-14B (revision main) from http://127.0.0.1:9: "
                           "the Hub could not be reached")
    assert "Not found locally either; looked in:" in text and "not cached" in text


def test_download_from_a_hub_that_never_answers_times_out(monkeypatch):
    """A host that accepts the connection and never answers: the HF_HUB_ETAG_TIMEOUT, not a hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)   # connections wait in the backlog, never accepted, never answered
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        t0 = time.monotonic()
        with pytest.raises(hub.DownloadError, match=r"could not be reached \(.*Timeout.*timeout 1 s"):
            resolve_checkpoint(WAN14B_REPO, download=True)
        assert time.monotonic() - t0 < 10


def test_download_is_refused_offline_without_asking_the_network(monkeypatch):
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("the network was asked")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DownloadError, match="HF_HUB_OFFLINE is set"):
        resolve_checkpoint(WAN14B_REPO, download=True)


def test_download_of_an_unknown_repo_says_so(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=_response(404))

    monkeypatch.setattr(HfApi, "model_info", not_found)
    with pytest.raises(hub.DownloadError, match="no such repository"):
        resolve_checkpoint(WAN14B_REPO, download=True)


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "http://127.0.0.1:9/api/models/x"))


def test_download_fills_the_cache_and_only_when_allowed(tiny_wan_dir, tmp_path, monkeypatch):
    """The Hub replaced by a fake that writes the snapshot as huggingface_hub would: the download
    runs only with download=True, for the id given, and the next resolution finds it offline."""
    import huggingface_hub
    from huggingface_hub import HfApi

    real_snapshot_download = huggingface_hub.snapshot_download
    asked = []

    def model_info(self, repo_id, revision=None, timeout=None, **kwargs):
        asked.append(("info", repo_id, revision, timeout))

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, **kwargs):
        if local_files_only:
            return real_snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        asked.append(("download", repo_id, revision, cache_dir))
        return write_snapshot(cache_dir, repo_id, tiny_wan_dir, COMMIT_A, refs=(revision or "main",))

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(hub.ModelNotFoundError, match="download: not allowed"):
        resolve_checkpoint(TINY_REPO)
    assert asked == []
    ckpt = resolve_checkpoint(TINY_REPO, download=True)
    cache = str(tmp_path / "hf-cache")
    assert asked == [("info", TINY_REPO, None, hub.DEFAULT_TIMEOUT_S), ("download", TINY_REPO, None, cache)]
    assert ckpt.spec.name == "tiny-wan" and ckpt.path.startswith(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint(TINY_REPO).path == ckpt.path   # now in the cache: no download
    assert len(asked) == 2
    shutil.rmtree(cache)
