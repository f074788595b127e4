"""The page's and the nodes' forms are derived from the request type and the model's spec
(lightx2v/web/forms.py): fields, widgets, defaults, limits, what a model refuses. No UI library."""
from __future__ import annotations

import dataclasses

import pytest

from engine.registry import get_spec, list_specs
from lightx2v.web.forms import (NOT_ON_FORMS, OFF, RANDOM_SEED, form_for, model_defaults, request_fields,
                                request_values, tasks_of)
from stages.request import MAX_FRAMES, MAX_SEED, MAX_SIDE, GenerationRequest


def names(form):
    return [f.name for f in form]


def test_every_request_field_has_a_widget_or_a_reason():
    """A new request field is a new input (or gets a reason in NOT_ON_FORMS): nothing is dropped
    silently."""
    kinds = request_fields()
    assert list(kinds) == list(GenerationRequest.model_fields)
    assert {n for n, k in kinds.items() if k is None} == set(NOT_ON_FORMS)
    assert kinds["image"] == "image" and kinds["seed"] == "seed" and kinds["prompt"] == "text"


def test_t2v_form_of_tiny_wan_follows_the_request_and_the_spec():
    spec = get_spec("tiny-wan")
    d = spec.defaults
    form = {f.name: f for f in form_for(spec, "t2v")}
    # Declaration order, minus what this model refuses (one expert: no guidance_scale_2) or what
    # a text-to-video tab does not take (an image).
    expected = [n for n in GenerationRequest.model_fields if n not in NOT_ON_FORMS
                and n not in ("image", "images", "guidance_scale_2")]
    assert list(form) == expected
    defaults = {name: f.default for name, f in form.items()}
    for name in ("num_frames", "height", "width", "steps", "guidance_scale", "shift"):
        assert defaults[name] == getattr(d, name), name
    assert form["sampler"].kind == "choice" and form["sampler"].default == d.sampler
    assert set(form["sampler"].choices) >= {"unipc", "euler", "euler_a", "dpmpp_2m"}
    assert (form["height"].minimum, form["height"].maximum, form["height"].step) == (16, MAX_SIDE, 16)
    assert (form["num_frames"].minimum, form["num_frames"].maximum) == (1, MAX_FRAMES)
    assert form["seed"].default is None and form["seed"].maximum == MAX_SEED
    assert form["target_fps"].optional and form["target_fps"].default == OFF
    assert "temporal_stride*k+1" in form["num_frames"].info  # the field's docstring is the help text
    assert form["prompt"].maximum == spec.max_prompt_chars and form["prompt"].multiline


def test_tasks_make_tabs_and_image_tasks_take_an_image():
    spec = get_spec("tiny-wan")
    assert tasks_of(spec) == ["t2v", "i2v"]
    assert "image" in names(form_for(spec, "i2v")) and "image" not in names(form_for(spec, "t2v"))
    with pytest.raises(ValueError, match="task must be one of t2v, i2v"):
        form_for(spec, "t2i")
    assert tasks_of(get_spec("wan2.1-i2v-14b-480p")) == ["i2v"]


def test_two_expert_model_gets_the_second_guidance_and_its_default():
    spec = get_spec("tiny-wan2.2-a14b")
    form = {f.name: f for f in form_for(spec, "t2v")}
    assert form["guidance_scale_2"].default == spec.defaults.guidance_scale_2 == 3.0


def test_strides_of_the_model_set_the_size_steps():
    spec = get_spec("tiny-wan2.2-ti2v")  # Wan2.2 VAE: 32-pixel multiples
    h = next(f for f in form_for(spec, "t2v") if f.name == "height")
    assert (h.minimum, h.step, h.maximum) == (32, 32, MAX_SIDE // 32 * 32)


def test_model_rules_become_limits():
    base = get_spec("tiny-wan")
    distilled = dataclasses.replace(base, name="x", guidance="none", defaults=dataclasses.replace(
        base.defaults, guidance_scale=1.0, steps=4, timesteps=(1000.0, 750.0, 500.0, 250.0)))
    form = {f.name: f for f in form_for(distilled, "t2v")}
    assert form["steps"].fixed and form["steps"].default == 4
    assert form["guidance_scale"].maximum == 1.0
    assert not {f.name: f for f in form_for(base, "t2v")}["steps"].fixed


def test_image_model_has_no_frame_fields():
    base = get_spec("tiny-wan")
    image_model = dataclasses.replace(base, name="img", modality="image", tasks=frozenset({"t2i", "edit"}))
    assert tasks_of(image_model) == ["t2i", "edit"]
    t2i = names(form_for(image_model, "t2i"))
    assert not {"num_frames", "fps", "target_fps", "image"} & set(t2i)
    assert "image" in names(form_for(image_model, "edit"))


def test_remote_service_fields_limit_the_form():
    spec = get_spec("tiny-wan")
    form = form_for(spec, "i2v", accepted={"prompt", "image", "height", "width", "seed"})
    assert names(form) == ["prompt", "image", "height", "width", "seed"]


def test_default_form_values_leave_the_model_its_defaults():
    """Values left at the form's defaults are not sent: the model decides them when it runs (a
    dynamic shift from the size, the second expert's guidance following the first's)."""
    spec = get_spec("tiny-wan2.2-a14b")
    form = form_for(spec, "t2v")
    defaults = {f.name: f.default for f in form}
    assert request_values(form, defaults | {"prompt": "a fox"}) == {"prompt": "a fox"}
    changed = request_values(form, defaults | {"prompt": "a fox", "guidance_scale": 2.0, "steps": 3.0})
    assert changed == {"prompt": "a fox", "guidance_scale": 2.0, "steps": 3}
    resolved = GenerationRequest(**changed).resolve(spec)
    expected = model_defaults(spec, "t2v")
    for name in ("height", "width", "shift"):
        assert getattr(resolved, name) == expected[name], name
    # The second expert's guidance follows the first when left alone, as in the library.
    assert resolved.guidance_scale_2 == GenerationRequest(prompt="x", guidance_scale=2.0).resolve(spec).guidance_scale_2


def test_several_image_models_take_them_in_one_input():
    spec = get_spec("tiny-qwen-image-edit") if "tiny-qwen-image-edit" in {s.name for s in list_specs()} else None
    if spec is None or spec.max_images < 2:
        pytest.skip("no registered model takes several input images")
    form = names(form_for(spec, "edit"))
    assert "images" in form and "image" not in form


def test_request_values_parse_seeds_and_whole_numbers():
    form = form_for(get_spec("tiny-wan"), "t2v")
    values = request_values(form, {"seed": "7", "steps": 3.0, "target_fps": 16})
    assert values == {"seed": 7, "steps": 3, "target_fps": 16}
    assert request_values(form, {"seed": "0"}) == {"seed": 0}
    assert request_values(form, {"seed": str(MAX_SEED)}) == {"seed": MAX_SEED}  # exact: text, not a float
    for random_seed in ("", " ", None, RANDOM_SEED, str(RANDOM_SEED)):
        assert request_values(form, {"seed": random_seed}) == {}
    assert request_values(form, {"target_fps": OFF, "height": None}) == {}
    with pytest.raises(ValueError, match="seed must be a whole number"):
        request_values(form, {"seed": "seven"})
    with pytest.raises(ValueError, match="steps must be a whole number"):
        request_values(form, {"steps": 2.5})


def test_fields_the_cli_parses_are_text_inputs_read_by_the_same_parser():
    form = {f.name: f for f in form_for(get_spec("tiny-wan"), "t2v")}
    assert form["lora"].kind == "parsed" and form["lora"].placeholder.startswith("PATH[:STRENGTH")
    values = request_values(list(form.values()), {"lora": "style.safetensors:0.5, other.safetensors",
                                                   "cache_options": '{"threshold": 0.2}', "cache": "teacache"})
    assert values["lora"] == [{"path": "style.safetensors", "strength": 0.5},
                              {"path": "other.safetensors", "strength": 1.0}]
    assert values["cache_options"] == {"threshold": 0.2}
    assert request_values(list(form.values()), {"lora": "  ", "cache_options": ""}) == {}
    with pytest.raises(ValueError, match="cache_options: expected a JSON object"):
        request_values(list(form.values()), {"cache_options": "{threshold"})
    # The cache's choices are those this model takes: tiny-wan needs its options for teacache,
    # which is an objection to cache_options, not to the choice.
    assert form["cache"].choices == ("none", "teacache", "magcache") and form["cache"].default == "none"
