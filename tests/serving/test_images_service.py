"""The OpenAI Images API with the official `openai` client, on one service holding both tiny Qwen
models behind one HTTP entrance (serving/router.py, as `lightx2v serve --model tiny-qwen-image
--model tiny-qwen-image-edit` builds it): generations (n images, seeds seed..seed+n-1, b64_json
or url), edits (one or several images), durable jobs, /v1/models listing both, and the 4xx of
bad sizes, n=0, corrupt images, and a model asked for the other modality."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def images_url(served, tmp_path_factory):
    from ray import serve

    from serving.router import build_multi_app

    data = str(tmp_path_factory.mktemp("images-data"))
    app = build_multi_app([{"model": "tiny-qwen-image", "data_dir": data, "replica_cpus": 0},
                           {"model": "tiny-qwen-image-edit", "data_dir": data, "replica_cpus": 0}])
    serve.run(app, name="images", route_prefix="/images")
    yield f"{served.base_url}/images"
    serve.delete("images")


@pytest.fixture
def client(images_url):
    return openai.OpenAI(base_url=f"{images_url}/v1", api_key="unused", max_retries=0, timeout=120)


def png(seed: int, size=(56, 40)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_generations_n_images_of_the_asked_size(client, images_url):
    r = client.images.generate(model="tiny-qwen-image", prompt="a red fox", n=2, size="80x48",
                               extra_body={"steps": 2, "seed": 11})
    a, b = (pixels(d.b64_json) for d in r.data)
    assert a.shape == b.shape == (48, 80, 3) and np.abs(a.astype(int) - b).max() > 0  # distinct
    again = client.images.generate(prompt="a red fox", size="80x48", extra_body={"steps": 2, "seed": 12})
    assert np.array_equal(pixels(again.data[0].b64_json), b)  # image 2 had seed 12; model defaulted
    jobs = httpx.get(f"{images_url}/v1/videos", params={"limit": 3}).json()["data"]
    assert {j["id"][:6] for j in jobs} == {"image_"} and {j["seed"] for j in jobs} >= {11, 12}


def test_urls_point_at_durable_jobs(client, images_url):
    r = client.images.generate(model="tiny-qwen-image", prompt="a fox", size="64x32", response_format="url",
                               extra_body={"steps": 2})
    url = r.data[0].url
    assert url.startswith(f"{images_url}/v1/images/image_")
    got = httpx.get(url)
    assert got.headers["content-type"] == "image/png" and Image.open(io.BytesIO(got.content)).size == (64, 32)
    job_id = url.rsplit("/", 2)[1]
    assert httpx.get(f"{images_url}/v1/videos/{job_id}").json()["status"] == "completed"
    assert httpx.delete(f"{images_url}/v1/videos/{job_id}").json()["deleted"] is True
    assert httpx.get(url).status_code == 404


def test_edits_with_one_and_several_images(client):
    one = client.images.edit(model="tiny-qwen-image-edit", image=("a.png", png(1), "image/png"),
                             prompt="make it red", size="64x48", extra_body={"steps": 2, "seed": 5})
    two = client.images.edit(image=[("a.png", png(1), "image/png"), ("b.png", png(2, (40, 64)), "image/png")],
                             prompt="make it red", size="64x48", extra_body={"steps": 2, "seed": 5})
    a, b = pixels(one.data[0].b64_json), pixels(two.data[0].b64_json)
    assert a.shape == b.shape == (48, 64, 3) and np.abs(a.astype(int) - b).max() > 0


def test_models_lists_every_model(images_url):
    models = httpx.get(f"{images_url}/v1/models").json()["data"]
    assert [(m["id"], m["tasks"]) for m in models] == [("tiny-qwen-image", ["t2i"]),
                                                        ("tiny-qwen-image-edit", ["edit"])]


@pytest.mark.parametrize("call, status, message", [
    (dict(size="81x48"), 400, "size: must be a multiple of 16"),
    (dict(n=0), 400, "n must be an integer in 1..10"),
    (dict(model="tiny-wan"), 400, "model 'tiny-wan' is not served here"),
    (dict(response_format="webp"), 400, "response_format must be one of b64_json, url"),
    (dict(extra_body={"num_frames": 9}), 400, "num_frames: is not accepted"),
])
def test_bad_generations_are_4xx(client, call, status, message):
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(**{"model": "tiny-qwen-image", "prompt": "x", **call})
    assert err.value.status_code == status and message in str(err.value)


def test_bad_edits_are_4xx(client):
    with pytest.raises(openai.APIStatusError) as err:
        client.images.edit(model="tiny-qwen-image-edit", image=("a.png", b"not an image", "image/png"), prompt="x")
    assert err.value.status_code == 422 and "image: the data could not be read as an image" in str(err.value)
    with pytest.raises(openai.APIStatusError) as err:
        client.images.edit(model="tiny-qwen-image-edit", image=[("a.png", png(1), "image/png")] * 4, prompt="x")
    assert err.value.status_code == 400 and "image: at most 3 input image(s)" in str(err.value)
    with pytest.raises(openai.APIStatusError) as err:  # a text-to-image model takes no image
        client.images.edit(model="tiny-qwen-image", image=("a.png", png(1), "image/png"), prompt="x")
    assert err.value.status_code == 400 and "image: is not accepted" in str(err.value)


def test_the_wrong_modality_is_a_clear_400(client, served, images_url):
    with pytest.raises(openai.APIStatusError) as err:  # an image model on the Videos API
        client.videos.create(model="tiny-qwen-image", prompt="x")
    assert err.value.status_code == 400 and "makes images: use POST /v1/images/generations" in str(err.value)
    r = httpx.post(f"{images_url}/v1/videos", json={"prompt": "x"})  # no video model here
    assert r.status_code == 400 and "none of them does videos" in r.json()["error"]["message"]
    r = httpx.post(f"{served.wan_url}/v1/images/generations", json={"prompt": "x"})  # a video model
    assert r.status_code == 400 and "makes videos: use POST /v1/videos" in r.json()["error"]["message"]


def test_serve_takes_several_models(tmp_path):
    """`lightx2v serve --model A --model B`: one app args per model, the same flags and data dir."""
    from lightx2v.cli import build_parser
    from serving.launch import app_args_from, every_app_args

    ns = build_parser().parse_args(["serve", "--model", "tiny-qwen-image", "--model", "tiny-qwen-image-edit",
                                    "--data-dir", str(tmp_path)])
    every = every_app_args(ns)
    assert [a.model for a in every] == ["tiny-qwen-image", "tiny-qwen-image-edit"]
    assert {a.data_dir for a in every} == {str(tmp_path)} and {a.device for a in every} == {"cpu"}
    with pytest.raises(ValueError, match="model: 2 models given"):
        app_args_from(ns)
    assert every_app_args(build_parser().parse_args(["serve"]))[0].model == "tiny-wan"


def test_several_models_share_one_data_dir_and_serve_config_builder_checks_its_arguments(tmp_path):
    from serving.router import build_multi_app, build_service

    with pytest.raises(ValueError, match="data_dir: the models of one service share one job store"):
        build_multi_app([{"model": "tiny-qwen-image", "data_dir": str(tmp_path / "a")},
                         {"model": "tiny-qwen-image-edit", "data_dir": str(tmp_path / "b")}])
    with pytest.raises(ValueError, match="models: a non-empty list"):
        build_service({"models": []})
    with pytest.raises(ValueError, match="unknown argument"):
        build_service({"models": [{"model": "tiny-qwen-image"}], "model": "x"})
