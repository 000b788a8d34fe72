"""StableDiffusionXLControlNetReadoutPipeline on a tiny SDXL-shaped pipeline (32 px images, 16 px latents): the
parent's images with readouts off, readouts and guidance with SDXL's added conditioning, the signature."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline

from diffusers_innercontrol import ReadoutProbe, StableDiffusionXLControlNetReadoutPipeline
from diffusers_innercontrol.toy.tiny import build_tiny_sdxl_components

STEPS = 3


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return build_tiny_sdxl_components(seed=0, tokenizer_dir=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def base(components):
    pipe = StableDiffusionXLControlNetPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def probe(components):
    torch.manual_seed(0)
    return ReadoutProbe.from_unet(components["unet"], "resnet", projection_dim=32, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def pipe(base, probe):
    p = StableDiffusionXLControlNetReadoutPipeline.from_pipe(base, readout_probe=probe)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def control():
    c = torch.zeros(1, 3, 32, 32)
    c[:, :, :, :16] = 1.0
    return c


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _call(p, control, **extra):
    return p("a cat", image=control, height=32, width=32, num_inference_steps=STEPS, generator=_gen(), output_type="np",
             **extra)


def test_readouts_off_is_the_parents_call(base, pipe, control):
    assert np.array_equal(_call(pipe, control).images, _call(base, control).images)


def test_readouts_at_every_step_with_sdxl_conditioning(base, pipe, control):
    out = _call(pipe, control, return_readouts=True, readout_task="depth")
    assert len(out.readouts) == len(pipe.scheduler.timesteps) == STEPS
    assert out.readout_step_indices == list(range(STEPS)) and all(r.shape == (1, 3, 16, 16) for r in out.readouts)
    assert np.array_equal(out.images, _call(base, control).images)  # reading out changes nothing
    assert out.nsfw_content_detected is None and len(out.readout_losses) == STEPS
    images, readouts = _call(pipe, control, return_readouts=True, readout_task="depth", return_dict=False)[:2]
    assert np.array_equal(images, out.images) and len(readouts) == STEPS  # the parent's (images,), then the readouts


def test_guidance_acts_and_stays_finite(pipe, control):
    plain = _call(pipe, control)
    guided = _call(pipe, control, readout_guidance_scale=0.5, readout_task="depth", readout_guidance_window=(0, 999))
    assert np.isfinite(guided.images).all() and np.abs(guided.images - plain.images).max() > 1e-3


def test_call_signature_is_the_parents_then_the_readout_parameters():
    parent = inspect.signature(StableDiffusionXLControlNetPipeline.__call__).parameters
    ours = inspect.signature(StableDiffusionXLControlNetReadoutPipeline.__call__).parameters
    parent_names = [n for n, p in parent.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = list(ours)
    assert names[: len(parent_names)] == parent_names
    for name in parent_names:
        assert ours[name].default == parent[name].default, name
    assert names[len(parent_names):] == [
        "return_readouts", "readout_steps", "readout_probe", "readout_task", "readout_control", "readout_control_index",
        "readout_guidance_scale", "readout_guidance_window", "kwargs"]
    init_parent = list(inspect.signature(StableDiffusionXLControlNetPipeline.__init__).parameters)
    assert list(inspect.signature(StableDiffusionXLControlNetReadoutPipeline.__init__).parameters) == init_parent + ["readout_probe"]


def test_save_and_load_with_the_probe(pipe, tmp_path, control):
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLControlNetReadoutPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.readout_probe, ReadoutProbe)
    a = _call(pipe, control, return_readouts=True, readout_task="depth")
    b = _call(loaded, control, return_readouts=True, readout_task="depth")
    torch.testing.assert_close(a.readouts[-1], b.readouts[-1])
