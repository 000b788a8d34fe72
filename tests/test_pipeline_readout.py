"""StableDiffusionControlNetReadoutPipeline on the tiny SD1.5-shaped pipeline (32 px images, 16 px latents)."""

import copy
import inspect
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionControlNetPipeline
from diffusers.models import MultiControlNetModel

from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe, get_task
from diffusers_innercontrol.losses import alignment_loss_per_sample
from diffusers_innercontrol.palette import ade20k_palette, classes_to_control
from diffusers_innercontrol.pipeline_readout import ReadoutPipelineOutput, StableDiffusionControlNetReadoutPipeline
from diffusers_innercontrol.training import encode_images, probe_step

STEPS = 3
PROBE_CFG = dict(projection_dim=32, norm_num_groups=8)


@pytest.fixture(scope="module")
def base(tiny_pipeline_path):
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_pipeline_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def probe(base):
    torch.manual_seed(0)
    return ReadoutProbe.from_unet(base.unet, "resnet", **PROBE_CFG).eval()


@pytest.fixture(scope="module")
def pipe(base, probe):
    p = StableDiffusionControlNetReadoutPipeline.from_pipe(base, readout_probe=probe)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def control():
    c = torch.zeros(1, 3, 32, 32)
    c[:, :, :, :16] = 1.0
    return c


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _hook_counts(p):
    mods = [p.unet, p.controlnet] + list(p.unet.modules())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


# --- construction, from_pipe, save / load --------------------------------------------------------
def test_init_keeps_the_parent_signature_and_adds_the_probe():
    parent = inspect.signature(StableDiffusionControlNetPipeline.__init__).parameters
    ours = inspect.signature(StableDiffusionControlNetReadoutPipeline.__init__).parameters
    for name, param in parent.items():
        assert name in ours and ours[name].annotation == param.annotation, name
    assert ours["readout_probe"].default is None
    assert "readout_probe" in StableDiffusionControlNetReadoutPipeline._optional_components


def test_from_pipe_shares_modules(base, pipe, probe):
    for name in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(pipe, name) is getattr(base, name), name
    assert pipe.readout_probe is probe
    # and back: a plain ControlNet pipeline from the readout pipeline keeps the modules too
    plain = StableDiffusionControlNetPipeline.from_pipe(pipe)
    assert plain.unet is base.unet and plain.controlnet is base.controlnet


def test_save_pretrained_records_and_reloads_the_probe(pipe, probe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    with open(os.path.join(tmp_path, "model_index.json")) as f:
        index = json.load(f)
    assert index["readout_probe"] == ["diffusers_innercontrol", "ReadoutProbe"]
    loaded = StableDiffusionControlNetReadoutPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.readout_probe, ReadoutProbe)
    assert list(loaded.readout_probe.config.feature_channels) == list(probe.config.feature_channels)
    for (k, a), (_, b) in zip(probe.state_dict().items(), loaded.readout_probe.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_pretrained_without_probe_and_per_call_probe(tiny_pipeline_path, probe, control):
    p = StableDiffusionControlNetReadoutPipeline.from_pretrained(
        tiny_pipeline_path, safety_checker=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    assert p.readout_probe is None and p.config.readout_probe == (None, None)
    with pytest.raises(ValueError, match="readout_probe"):
        p("a", image=control, num_inference_steps=2, return_readouts=True)
    out = p("a", image=control, num_inference_steps=2, return_readouts=True, readout_probe=probe, output_type="np")
    assert len(out.readouts) == 2 and out.readouts[0].shape == (1, 3, 16, 16)
    # setting the attribute records the probe as a component (diffusers' own __setattr__ would keep None)
    p.readout_probe = probe
    assert tuple(p.config.readout_probe) == ("diffusers_innercontrol", "ReadoutProbe")
    assert p.components["readout_probe"] is probe


# --- readouts off: the parent's call, no hook ------------------------------------------------------
def test_readouts_off_equals_parent_and_registers_no_hook(base, pipe, control):
    seen = []

    def spy(p, i, t, kwargs):
        seen.append(_hook_counts(p))
        return kwargs

    before = _hook_counts(pipe)
    ref = base("a cat", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    out = pipe(
        "a cat", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np", callback_on_step_end=spy
    )
    assert isinstance(out, ReadoutPipelineOutput) and out.readouts is None
    assert np.array_equal(out.images, ref.images)
    assert seen == [before] * STEPS  # nothing was registered during the call
    tup = pipe(
        "a cat", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np", return_dict=False
    )
    assert len(tup) == 2 and np.array_equal(tup[0], ref.images)


# --- readouts --------------------------------------------------------------------------------------
def test_readouts_every_step(base, pipe, control):
    seen = []
    ref = base("a cat", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    before = _hook_counts(pipe)

    def spy(p, i, t, kwargs):
        seen.append(_hook_counts(p))
        return kwargs

    out = pipe(
        "a cat", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np",
        return_readouts=True, callback_on_step_end=spy,
    )
    assert np.array_equal(out.images, ref.images)  # reading does not change sampling
    assert all(n > before for n in seen) and _hook_counts(pipe) == before  # hooks during the call only
    assert out.readout_step_indices == list(range(STEPS))
    assert out.readout_timesteps == [int(t) for t in pipe.scheduler.timesteps]
    assert out.readout_task == "depth"  # default for a tanh probe
    for r, imgs, loss in zip(out.readouts, out.readout_images, out.readout_losses):
        assert r.shape == (1, 3, 16, 16) and r.dtype == torch.float32 and r.device.type == "cpu"
        assert r.abs().max() <= 1.0
        assert len(imgs) == 1 and imgs[0].size == (16, 16)
        # the loss is the depth alignment loss against the ControlNet's control image
        torch.testing.assert_close(loss, alignment_loss_per_sample(get_task("depth"), r, control))


def test_readout_is_the_probe_on_the_conditional_half(pipe, probe, control):
    latents = torch.randn(1, 4, 16, 16, generator=_gen(3))
    out = pipe(
        "a cat", image=control, num_inference_steps=2, latents=latents.clone(), output_type="latent",
        return_readouts=True, readout_steps=[0],
    )
    t0 = pipe.scheduler.timesteps[0]
    cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True)

    def manual(embeds):
        with torch.no_grad(), DecoderFeatureExtractor(pipe.unet, "resnet") as ex:
            down, mid = pipe.controlnet(
                latents, t0, encoder_hidden_states=embeds, controlnet_cond=control, return_dict=False
            )
            pipe.unet(
                latents, t0, encoder_hidden_states=embeds,
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
            )
            return probe(ex.pop(), t0).sample

    expected = manual(cond)
    torch.testing.assert_close(out.readouts[0], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out.readouts[0], manual(uncond), atol=1e-4)  # the halves do differ


def test_readout_steps_subset(pipe, control):
    full = pipe("a", image=control, num_inference_steps=STEPS, generator=_gen(), return_readouts=True)
    sub = pipe(
        "a", image=control, num_inference_steps=STEPS, generator=_gen(), return_readouts=True, readout_steps=[0, -1]
    )
    assert sub.readout_step_indices == [0, STEPS - 1]
    assert sub.readout_timesteps == [full.readout_timesteps[0], full.readout_timesteps[-1]]
    assert torch.equal(sub.readouts[0], full.readouts[0]) and torch.equal(sub.readouts[1], full.readouts[-1])
    with pytest.raises(ValueError, match="readout_steps"):
        pipe("a", image=control, num_inference_steps=STEPS, return_readouts=True, readout_steps=[STEPS])
    with pytest.raises(TypeError, match="readout_steps"):
        pipe("a", image=control, num_inference_steps=STEPS, return_readouts=True, readout_steps=1)


def test_readout_control_as_images(pipe, control):
    other = 1.0 - control  # not the ControlNet's control
    pil = PIL.Image.fromarray((other[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    out = pipe("a", image=control, num_inference_steps=2, return_readouts=True, readout_control=[pil])
    task = get_task("depth")
    for r, loss in zip(out.readouts, out.readout_losses):
        torch.testing.assert_close(loss, alignment_loss_per_sample(task, r, other))


def test_return_dict_false_with_readouts(pipe, control):
    images, nsfw, readouts, readout_images, timesteps = pipe(
        "a", image=control, num_inference_steps=2, return_readouts=True, return_dict=False
    )
    assert len(images) == 1 and nsfw is None and len(readouts) == len(readout_images) == len(timesteps) == 2


# --- every parent argument still works --------------------------------------------------------------
def test_prompt_batch_images_per_prompt_negative_prompts(base, pipe, control):
    kwargs = dict(
        prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], image=control, num_images_per_prompt=2,
        num_inference_steps=2, output_type="np",
    )
    ref = base(**kwargs, generator=_gen())
    out = pipe(**kwargs, generator=_gen(), return_readouts=True)
    assert np.array_equal(out.images, ref.images) and out.images.shape[0] == 4
    assert all(r.shape[0] == 4 for r in out.readouts)
    assert all(len(imgs) == 4 for imgs in out.readout_images)
    assert out.readout_losses[0].shape == (4,)


def test_guess_mode(base, pipe, control):
    ref = base("a", image=control, num_inference_steps=2, generator=_gen(), output_type="np", guess_mode=True)
    out = pipe(
        "a", image=control, num_inference_steps=2, generator=_gen(), output_type="np", guess_mode=True,
        return_readouts=True,
    )
    assert np.array_equal(out.images, ref.images)
    assert len(out.readouts) == 2 and out.readouts[0].shape[0] == 1
    guided = pipe(
        "a", image=control, num_inference_steps=2, generator=_gen(), output_type="np", guess_mode=True,
        readout_guidance_scale=0.2, readout_guidance_window=(0, 999),
    )
    assert not np.array_equal(guided.images, ref.images)


def test_no_classifier_free_guidance(pipe, control):
    out = pipe("a", image=control, num_inference_steps=2, guidance_scale=1.0, return_readouts=True)
    assert out.readouts[0].shape[0] == 1


def test_user_callback_is_chained_with_its_tensor_inputs(base, pipe, control):
    def make_callback(log):
        def callback(p, i, t, kwargs):
            log.append((i, sorted(kwargs)))
            return {"latents": kwargs["latents"] * 0.9}

        return callback

    ref_log, log = [], []
    inputs = ["latents", "prompt_embeds"]
    ref = base(
        "a", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np",
        callback_on_step_end=make_callback(ref_log), callback_on_step_end_tensor_inputs=inputs,
    )
    out = pipe(
        "a", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np",
        callback_on_step_end=make_callback(log), callback_on_step_end_tensor_inputs=inputs, return_readouts=True,
    )
    assert log == ref_log == [(i, inputs) for i in range(STEPS)]
    assert np.array_equal(out.images, ref.images)  # the callback's latents were used
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a", image=control, num_inference_steps=2, return_readouts=True,
             callback_on_step_end=make_callback([]), callback_on_step_end_tensor_inputs=["noise_pred"])


def test_pipeline_callback_object_keeps_its_tensor_inputs(base, pipe, control):
    from diffusers.callbacks import PipelineCallback

    class Recorder(PipelineCallback):
        tensor_inputs = ["latents", "prompt_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.log.append((step_index, sorted(callback_kwargs)))
            return callback_kwargs

    ref_cb, cb = Recorder(), Recorder()
    ref_cb.log, cb.log = [], []
    base("a", image=control, num_inference_steps=2, callback_on_step_end=ref_cb)
    out = pipe("a", image=control, num_inference_steps=2, callback_on_step_end=cb, return_readouts=True)
    assert cb.log == ref_cb.log == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert len(out.readouts) == 2


def test_multi_controlnet(base, probe, control):
    cn2 = copy.deepcopy(base.controlnet)
    components = {k: v for k, v in base.components.items() if k != "controlnet"}
    multi = StableDiffusionControlNetReadoutPipeline(
        **components, controlnet=[base.controlnet, cn2], readout_probe=probe
    )
    ref_pipe = StableDiffusionControlNetPipeline(**components, controlnet=[base.controlnet, cn2])
    multi.set_progress_bar_config(disable=True)
    ref_pipe.set_progress_bar_config(disable=True)
    assert isinstance(multi.controlnet, MultiControlNetModel)
    control2 = 1.0 - control
    kwargs = dict(
        image=[control, control2], num_inference_steps=2, output_type="np", controlnet_conditioning_scale=[1.0, 0.5]
    )
    ref = ref_pipe("a", generator=_gen(), **kwargs)
    out = multi("a", generator=_gen(), return_readouts=True, readout_control_index=1, **kwargs)
    assert np.array_equal(out.images, ref.images)
    assert len(out.readouts) == 2
    task = get_task("depth")
    torch.testing.assert_close(out.readout_losses[-1], alignment_loss_per_sample(task, out.readouts[-1], control2))
    guided = multi("a", generator=_gen(), readout_guidance_scale=0.2, readout_guidance_window=(0, 999),
                   readout_control_index=1, **kwargs)
    assert not np.array_equal(guided.images, ref.images)
    with pytest.raises(ValueError, match="readout_control_index"):
        multi("a", return_readouts=True, readout_control_index=2, **kwargs)


def test_model_cpu_offload_on_cpu(tiny_pipeline_path, probe, control):
    """accelerate's offload hooks and ours coexist (device 'cpu': no accelerator needed); results unchanged."""
    p = StableDiffusionControlNetReadoutPipeline.from_pretrained(
        tiny_pipeline_path, safety_checker=None, requires_safety_checker=False
    )
    p.register_modules(readout_probe=copy.deepcopy(probe))
    p.set_progress_bar_config(disable=True)
    kwargs = dict(image=control, num_inference_steps=2, output_type="np", return_readouts=True,
                  readout_guidance_scale=0.5, readout_guidance_window=(0, 999))
    ref = p("a", generator=_gen(), **kwargs)
    p.enable_model_cpu_offload(device="cpu")
    assert hasattr(p.readout_probe, "_hf_hook")  # the probe is offloaded like the other components
    out = p("a", generator=_gen(), **kwargs)
    # the same weights and inputs; offloading may move tensors to other addresses, and oneDNN's kernel choice
    # depends on alignment (seen on AVX-512 CPUs), so the results agree to float32 rounding, not bit for bit
    np.testing.assert_allclose(out.images, ref.images, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.readouts, ref.readouts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_model_cpu_offload_cuda(tiny_pipeline_path, probe, control):
    p = StableDiffusionControlNetReadoutPipeline.from_pretrained(
        tiny_pipeline_path, safety_checker=None, requires_safety_checker=False
    )
    p.register_modules(readout_probe=copy.deepcopy(probe))
    p.set_progress_bar_config(disable=True)
    kwargs = dict(image=control, num_inference_steps=2, output_type="np", return_readouts=True)
    guide = dict(readout_guidance_scale=0.5, readout_guidance_window=(0, 999))

    def run(**extra):
        return p("a", generator=torch.Generator("cuda").manual_seed(0), **kwargs, **extra)

    p.to("cuda")
    ref, ref_guided = run(), run(**guide)
    p.to("cpu")
    p.enable_model_cpu_offload()
    out = run()
    assert p.unet.device.type == "cpu" and p.readout_probe.device.type == "cpu"  # offloaded after the call
    np.testing.assert_allclose(out.images, ref.images, atol=1e-4)
    for a, b in zip(out.readouts, ref.readouts):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # guidance backpropagates through the offloaded modules; its backward is not bitwise deterministic on
    # GPUs (a run on an H200 differed by at most 1.6e-3 per pixel), hence the looser tolerance
    guided = run(**guide)
    np.testing.assert_allclose(guided.images, ref_guided.images, atol=1e-2)
    assert not np.allclose(guided.images, out.images, atol=1e-2)


# --- segmentation ---------------------------------------------------------------------------------
def test_segmentation_probe_palette_rendering_and_class_targets(base, control):
    torch.manual_seed(1)
    seg_probe = ReadoutProbe.from_unet(base.unet, "resnet", out_channels=5, output_activation="none", **PROBE_CFG)
    p = StableDiffusionControlNetReadoutPipeline.from_pipe(base, readout_probe=seg_probe)
    p.set_progress_bar_config(disable=True)
    classes = torch.zeros(1, 32, 32, dtype=torch.long)
    classes[:, :, 16:] = 3
    classes[:, :8] = 255  # unlabelled (black)
    seg_control = classes_to_control(classes)
    out = p("a", image=seg_control, num_inference_steps=2, return_readouts=True)
    assert out.readout_task == "segmentation"
    palette = {tuple(c) for c in ade20k_palette()[:5].tolist()}
    for img in out.readout_images[-1]:
        assert {tuple(c) for c in np.asarray(img).reshape(-1, 3).tolist()} <= palette
    # the colour control was read back as the class map (255 ignored) for the cross-entropy
    expected = alignment_loss_per_sample(get_task("segmentation"), out.readouts[-1], classes)
    torch.testing.assert_close(out.readout_losses[-1], expected)
    with pytest.raises(ValueError, match="does not fit this probe"):
        p("a", image=seg_control, num_inference_steps=2, return_readouts=True, readout_task="depth")


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input_fails_before_sampling(base, pipe, control):
    def must_not_run(*args, **kwargs):
        raise AssertionError("sampling started")

    wrong = ReadoutProbe(feature_channels=(8, 8), **PROBE_CFG)
    cases = [
        (dict(readout_probe=wrong), ValueError, "Use a probe trained on this pipeline's UNet"),
        (dict(readout_task="normals"), ValueError, "Unknown task"),
        (dict(readout_guidance_scale=-1.0), ValueError, "readout_guidance_scale"),
        (dict(readout_guidance_window=(500, 100)), ValueError, "readout_guidance_window"),
        (dict(readout_control_index=1), ValueError, "readout_control_index"),
        (dict(readout_control=torch.full((1, 3, 8, 8), 2.0)), ValueError, r"\[0, 1\]"),
        (dict(readout_guidance_scale=float("nan")), ValueError, "readout_guidance_scale must be a finite number"),
        (dict(readout_guidance_scale=float("inf")), ValueError, "readout_guidance_scale must be a finite number"),
        # two controls for one image are not an (unconditional, conditional) pair
        (dict(readout_control=torch.zeros(2, 3, 32, 32)), ValueError, r"readout_control holds 2 controls for 1 prompt"),
        (dict(readout_control=torch.zeros(3, 3, 32, 32), prompt=["a", "b"], num_images_per_prompt=2), ValueError,
         r"holds 3 controls for 2 prompt\(s\) x 2 image\(s\) per prompt: pass 1 or 2 or 4"),
    ]
    pipe.unet.forward = must_not_run  # an instance attribute shadowing the class's forward
    try:
        for extra, error, message in cases:
            extra = {"prompt": "a", **extra}
            with pytest.raises(error, match=message):
                pipe(image=control, num_inference_steps=2, return_readouts=True, **extra)
    finally:
        del pipe.unet.forward


def test_a_probe_that_records_its_task_reads_out_that_task_only(pipe, probe, control):
    recorded = copy.deepcopy(probe)
    recorded.register_to_config(task="depth", task_preset="paper")
    out = pipe("a", image=control, num_inference_steps=2, return_readouts=True, readout_probe=recorded)
    assert out.readout_task == "depth"  # its own task by default
    with pytest.raises(ValueError, match="The probe was trained for the 'depth' task, not 'hed'"):
        pipe("a", image=control, num_inference_steps=2, return_readouts=True, readout_probe=recorded, readout_task="hed")


def test_readout_steps_count_the_schedulers_own_loop(base, probe, control):
    """PNDM runs 21 loop steps for 20 inference steps: index 20 (= -1) is the last one, and an error names the count."""
    from diffusers import PNDMScheduler

    p = StableDiffusionControlNetReadoutPipeline.from_pipe(base, readout_probe=probe)
    p.scheduler = PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True)
    p.set_progress_bar_config(disable=True)
    kwargs = dict(image=control, num_inference_steps=4, return_readouts=True, output_type="np")
    last = p("a", generator=_gen(), readout_steps=[4], **kwargs)
    from_end = p("a", generator=_gen(), readout_steps=[-1], **kwargs)
    assert len(p.scheduler.timesteps) == 5 and last.readout_step_indices == from_end.readout_step_indices == [4]
    assert last.readout_timesteps == [int(p.scheduler.timesteps[-1])]
    torch.testing.assert_close(last.readouts[0], from_end.readouts[0])
    with pytest.raises(ValueError, match=r"PNDMScheduler's denoising loop has 5 steps here \(indices 0..4, or -5..-1"):
        p("a", readout_steps=[5], **kwargs)


# --- readout guidance -------------------------------------------------------------------------------
def _readout_pipe_with(base, probe, cls, **config):
    p = StableDiffusionControlNetReadoutPipeline.from_pipe(base, readout_probe=probe)
    p.scheduler = cls.from_config(base.scheduler.config, **config)
    p.set_progress_bar_config(disable=True)
    return p


def test_guidance_after_the_step_is_what_ddim_integrates(base, probe, control, monkeypatch):
    """The PNDM scheme (the term added to the latents after the step, times the DDIM response) gives DDIM's own
    result: under DDIM it equals adding the term to the noise prediction."""
    from diffusers import DDIMScheduler

    from diffusers_innercontrol import pipeline_readout

    p = _readout_pipe_with(base, probe, DDIMScheduler)
    kwargs = dict(image=control, num_inference_steps=4, output_type="latent", readout_guidance_scale=0.5,
                  readout_task="depth", readout_guidance_window=(0, 999))
    in_output = p("a", generator=_gen(), **kwargs).images
    monkeypatch.setattr(pipeline_readout, "_guides_after_step", lambda scheduler: True)
    after_step = p("a", generator=_gen(), **kwargs).images
    plain = p("a", generator=_gen(), **{**kwargs, "readout_guidance_scale": 0.0}).images
    assert (in_output - plain).abs().max() > 1e-2  # the guidance acted
    torch.testing.assert_close(after_step, in_output, atol=1e-4, rtol=1e-4)


def test_guidance_runs_under_bf16_autocast_on_the_cpu(pipe, control):
    """Readout guidance in bf16 autocast (the CPU stand-in for a bf16 / fp16 GPU run): finite, and it acts."""
    kwargs = dict(image=control, num_inference_steps=STEPS, output_type="np", readout_task="depth",
                  readout_guidance_window=(0, 999))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guided = pipe("a", generator=_gen(), readout_guidance_scale=0.5, return_readouts=True, **kwargs)
        plain = pipe("a", generator=_gen(), **kwargs)
    assert np.isfinite(guided.images).all() and all(torch.isfinite(r).all() for r in guided.readouts)
    assert np.abs(guided.images - plain.images).max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_guidance_in_half_precision_on_cuda(tiny_pipeline_path, probe, control, dtype):
    p = StableDiffusionControlNetReadoutPipeline.from_pretrained(
        tiny_pipeline_path, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    )
    p.register_modules(readout_probe=copy.deepcopy(probe).to(dtype))
    p.to("cuda").set_progress_bar_config(disable=True)
    out = p("a", image=control, num_inference_steps=STEPS, output_type="np", readout_task="depth", return_readouts=True,
            readout_guidance_scale=0.5, readout_guidance_window=(0, 999), generator=torch.Generator("cuda").manual_seed(0))
    assert np.isfinite(out.images).all() and all(torch.isfinite(r).all() for r in out.readouts)


def test_ddim_response_by_hand():
    """abar_t = 0.25, abar_prev = 0.64: 0.6 - 0.8 * sqrt(0.75 / 0.25) = 0.6 - 0.8 * 1.7320508 = -0.7856406; the end of
    the schedule uses `final_alpha_cumprod`; a v-prediction scales it by sqrt(abar_t) = 0.5."""
    from types import SimpleNamespace

    from diffusers_innercontrol.pipeline_readout import _ddim_response

    abar = torch.ones(1000)
    abar[500], abar[400] = 0.25, 0.64
    sched = SimpleNamespace(alphas_cumprod=abar, final_alpha_cumprod=torch.tensor(1.0),
                            config=SimpleNamespace(prediction_type="epsilon"))
    assert _ddim_response(sched, torch.tensor(500), torch.tensor(400)) == pytest.approx(0.6 - 0.8 * 3 ** 0.5)
    assert _ddim_response(sched, 500, None) == pytest.approx(-(3 ** 0.5))  # abar_prev = 1: x0 itself
    sched.config.prediction_type = "v_prediction"
    assert _ddim_response(sched, 500, 400) == pytest.approx(0.5 * (0.6 - 0.8 * 3 ** 0.5))


def test_pndm_takes_one_guided_step_as_ddim_does(base, probe, control):
    """Guidance on PNDM's last step only: the final latents move by scale * |response| / factor (RMS per sample),
    what one DDIM step gives, not the 55/24 x that PNDM's extrapolation would apply to a guided noise prediction."""
    from diffusers import PNDMScheduler

    from diffusers_innercontrol.pipeline_readout import _clean_latent_factor, _ddim_response

    p = _readout_pipe_with(base, probe, PNDMScheduler, skip_prk_steps=True)
    p.scheduler.set_timesteps(4)
    last = int(p.scheduler.timesteps[-1])
    scale = 0.3
    kwargs = dict(image=control, num_inference_steps=4, output_type="latent", readout_task="depth",
                  readout_guidance_window=(last, last))
    guided = p("a", generator=_gen(), readout_guidance_scale=scale, **kwargs).images
    plain = p("a", generator=_gen(), **kwargs).images
    moved = (guided - plain).pow(2).flatten(1).mean(1).sqrt()
    expected = scale * abs(_ddim_response(p.scheduler, last, None)) / _clean_latent_factor(p.scheduler, last)
    torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-3, atol=0)


def test_guidance_window_is_inclusive_and_without_readouts(base, pipe, control):
    ref = base("a", image=control, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    ts = [int(t) for t in pipe.scheduler.timesteps]
    kwargs = dict(image=control, num_inference_steps=STEPS, output_type="np", readout_guidance_scale=1.0)
    outside = pipe("a", generator=_gen(), readout_guidance_window=(ts[0] + 1, 999), **kwargs)
    assert np.array_equal(outside.images, ref.images) and outside.readouts is None  # no step guided
    only_first = pipe("a", generator=_gen(), readout_guidance_window=(ts[0], ts[0]), **kwargs)
    assert not np.array_equal(only_first.images, ref.images)


def _fit_probe(base, task, steps=30):
    """A few Adam steps of `probe_step`: the probe learns to read a smooth grey pattern (the control) out of
    the ControlNet-conditioned tiny UNet's features of images made of that pattern."""
    torch.manual_seed(0)
    kw = {k: v for k, v in task.probe_kwargs().items() if k != "feature_kind"}
    fitted = ReadoutProbe.from_unet(base.unet, task.feature_kind, **PROBE_CFG, **kw)
    g = _gen(0)
    with torch.no_grad():
        ids = base.tokenizer([""] * 8, padding="max_length", max_length=77, return_tensors="pt").input_ids
        embeds = base.text_encoder(ids)[0]
    optimizer = torch.optim.Adam(fitted.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        pattern = F.interpolate(torch.rand(8, 1, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
        images = pattern.expand(8, 3, 32, 32)
        with torch.no_grad():
            latents = encode_images(base.vae, images * 2 - 1, generator=g)
        loss = probe_step(
            task=task, unet=base.unet, probe=fitted, noise_scheduler=base.scheduler, latents=latents,
            encoder_hidden_states=embeds, control=images, controlnet=base.controlnet, generator=g,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learned something
    return fitted.eval()


@pytest.fixture(scope="module")
def fitted_probe(base):
    return _fit_probe(base, get_task("depth"))


@pytest.fixture(scope="module")
def four_controls(control):
    # vertical and horizontal halves, and their negatives
    return torch.cat([control, control.transpose(-1, -2), 1 - control, 1 - control.transpose(-1, -2)])


def _with_scheduler(base, probe, name):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = dict(ddpm=DDPMScheduler, unipc=UniPCMultistepScheduler, euler=EulerDiscreteScheduler, ddim=DDIMScheduler)
    cls = classes[name]
    p = StableDiffusionControlNetReadoutPipeline.from_pipe(
        base, readout_probe=probe, scheduler=cls.from_config(base.scheduler.config)
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("scheduler", ["ddpm", "unipc"])
def test_readout_guidance_lowers_the_disagreement(base, fitted_probe, four_controls, scheduler):
    p = _with_scheduler(base, fitted_probe, scheduler)
    prompts = [""] * 4
    kwargs = dict(image=four_controls, num_inference_steps=STEPS, output_type="np", return_readouts=True,
                  readout_task="depth", readout_guidance_window=(0, 999))
    plain = p(prompts, generator=_gen(), **kwargs)
    guided = p(prompts, generator=_gen(), readout_guidance_scale=0.2, **kwargs)
    # the first readout precedes any guidance; the last one comes after every guided step
    torch.testing.assert_close(guided.readout_losses[0], plain.readout_losses[0])
    assert (guided.readout_losses[-1] < plain.readout_losses[-1]).all(), (guided.readout_losses, plain.readout_losses)
    # a user-given control (here the same as the ControlNet's) gives the same guidance
    again = p(prompts, generator=_gen(), readout_guidance_scale=0.2, readout_control=four_controls, **kwargs)
    assert np.array_equal(again.images, guided.images)


def test_readout_guidance_is_sized_alike_for_every_scheduler(base, fitted_probe, four_controls):
    """DDIM (eta 0) and Euler are the same solver in two parametrisations (Euler scales its latents and feeds
    the UNet `scale_model_input(x)`): guidance, taken on the UNet's input and added to its output, must not
    depend on that, so the guided samples agree."""
    kwargs = dict(image=four_controls, num_inference_steps=STEPS, output_type="np", return_readouts=True,
                  readout_task="depth", readout_guidance_window=(0, 999), readout_guidance_scale=0.2)
    ddim = _with_scheduler(base, fitted_probe, "ddim")([""] * 4, generator=_gen(), **kwargs)
    euler = _with_scheduler(base, fitted_probe, "euler")([""] * 4, generator=_gen(), **kwargs)
    np.testing.assert_allclose(euler.images, ddim.images, atol=2e-3)
    torch.testing.assert_close(euler.readout_losses[-1], ddim.readout_losses[-1], atol=1e-4, rtol=1e-3)


def test_call_signature_is_the_parents_then_the_readout_parameters():
    """help(pipe), IDEs and diffusers' PipelineTesterMixin signature checks see every parameter of the parent's
    __call__, in its order and with its defaults, then the readout parameters."""
    import inspect

    from diffusers import StableDiffusionControlNetPipeline

    parent = inspect.signature(StableDiffusionControlNetPipeline.__call__).parameters
    ours = inspect.signature(StableDiffusionControlNetReadoutPipeline.__call__).parameters
    parent_names = [n for n, p in parent.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = list(ours)
    assert names[: len(parent_names)] == parent_names
    for name in parent_names:
        assert ours[name].default == parent[name].default, name
    assert names[len(parent_names):] == [
        "return_readouts", "readout_steps", "readout_probe", "readout_task", "readout_control", "readout_control_index",
        "readout_guidance_scale", "readout_guidance_window", "kwargs"]
    assert ours["kwargs"].kind is inspect.Parameter.VAR_KEYWORD


# The parameter sets that diffusers' own ControlNet pipeline tests give `PipelineTesterMixin` (its test suite is not
# part of the installed package, so its two signature checks are restated here with the same sets).
TEXT_TO_IMAGE_PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                        "negative_prompt_embeds", "cross_attention_kwargs"}
REQUIRED_OPTIONAL_PARAMS = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                            "return_dict"}


def test_passes_the_pipeline_tester_mixins_signature_checks():
    """`PipelineTesterMixin.test_pipeline_call_signature` (every `params` entry is a parameter of __call__, every
    `required_optional_params` entry one with a default) and `IPAdapterTesterMixin.test_pipeline_signature`."""
    import inspect

    from diffusers.loaders import IPAdapterMixin

    parameters = inspect.signature(StableDiffusionControlNetReadoutPipeline.__call__).parameters
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    names = set(parameters) - {"self", "kwargs"}
    assert TEXT_TO_IMAGE_PARAMS | {"image"} <= names
    assert REQUIRED_OPTIONAL_PARAMS | {"callback_on_step_end", "callback_on_step_end_tensor_inputs"} <= optional
    assert issubclass(StableDiffusionControlNetReadoutPipeline, IPAdapterMixin)
    assert {"ip_adapter_image", "ip_adapter_image_embeds"} <= names


def test_positional_prompt_and_image_still_work(pipe, control):
    out = pipe("a", control, num_inference_steps=2, output_type="np", return_readouts=True)
    assert len(out.readouts) == 2 and out.images.shape[0] == 1
