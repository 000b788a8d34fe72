"""Feature hooks and gradient checkpointing together (issue 6).

With `enable_gradient_checkpointing()` diffusers re-runs every checkpointed block during backward, so the
hooked layers fire a second time. The extractor must still capture each feature once per UNet forward, and
an InnerControl step (diffusion + reward + alignment) must give the ControlNet the same gradients with and
without checkpointing.
"""

import pytest
import torch
from torch import nn

from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe, get_task
from diffusers_innercontrol.features import decoder_feature_modules
from diffusers_innercontrol.training import controlnet_step


def _build(seed=0):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from diffusers_innercontrol.toy.tiny import SD15_SCHEDULER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # non-zero output convolutions, so that the UNet's features depend on the ControlNet
        for p in list(controlnet.controlnet_down_blocks.parameters()) + list(controlnet.controlnet_mid_block.parameters()):
            p.normal_(0.0, 0.05)
    reward = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
    for frozen in (unet, vae, reward):
        frozen.requires_grad_(False)
    unet.train()
    controlnet.train()
    return dict(unet=unet, vae=vae, controlnet=controlnet, reward=reward, scheduler=DDPMScheduler(**SD15_SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def models():
    return _build()


def _inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 77, 32, generator=g),
        control=(torch.rand(batch, 3, 32, 32, generator=g) > 0.8).float(),
        noise=torch.randn(batch, 4, 16, 16, generator=g),
        # two samples in the reward window (t <= 200), three in the alignment window [0, 800]
        timesteps=torch.tensor([50, 150, 600, 900]),
    )


def _set_checkpointing(models, on: bool):
    for name in ("unet", "controlnet"):
        if on:
            models[name].enable_gradient_checkpointing()
        else:
            models[name].disable_gradient_checkpointing()


@pytest.mark.parametrize("kind", ["resnet", "attention"])
def test_features_captured_once_per_forward_with_checkpointing(models, kind):
    unet, controlnet = models["unet"], models["controlnet"]
    x = _inputs()
    hooked = [module for module, _ in decoder_feature_modules(unet, kind)]
    raw_calls = []
    counters = [m.register_forward_hook(lambda *a: raw_calls.append(1)) for m in hooked]
    forwards = []
    _set_checkpointing(models, True)
    try:
        assert unet.is_gradient_checkpointing and controlnet.is_gradient_checkpointing
        with DecoderFeatureExtractor(unet, kind, on_forward=lambda f: forwards.append(len(f))) as extractor:
            noisy = models["scheduler"].add_noise(x["latents"], x["noise"], x["timesteps"])
            down, mid = controlnet(noisy, x["timesteps"], x["encoder_hidden_states"], x["control"], return_dict=False)
            out = unet(noisy, x["timesteps"], x["encoder_hidden_states"],
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            captured = list(extractor.features)
            assert len(captured) == len(hooked)
            assert len(raw_calls) == len(hooked)  # one firing per layer in the forward
            loss = out.pow(2).mean() + sum(f.float().pow(2).mean() for f in captured)
            loss.backward()
            # checkpointing recomputed the hooked layers during backward (the hooks fired again) ...
            assert len(raw_calls) == 2 * len(hooked)
            # ... but the extractor kept the features of the one forward, unchanged
            assert len(extractor.features) == len(hooked)
            assert all(a is b for a, b in zip(extractor.features, captured))
        assert forwards == [len(hooked)]
        assert all(f.requires_grad for f in captured)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in controlnet.parameters())
    finally:
        _set_checkpointing(models, False)
        for handle in counters:
            handle.remove()
        controlnet.zero_grad(set_to_none=True)


def _controlnet_grads(models, probe, task, checkpointing: bool, beta=None):
    controlnet = models["controlnet"]
    controlnet.zero_grad(set_to_none=True)
    x = _inputs()
    _set_checkpointing(models, checkpointing)
    try:
        out = controlnet_step(
            task=task,
            unet=models["unet"],
            controlnet=controlnet,
            noise_scheduler=models["scheduler"],
            latents=x["latents"],
            encoder_hidden_states=x["encoder_hidden_states"],
            control=x["control"],
            vae=models["vae"],
            reward_model=models["reward"],
            probe=probe,
            beta=beta,
            noise=x["noise"],
            timesteps=x["timesteps"],
        )
        out.loss.backward()
    finally:
        _set_checkpointing(models, False)
    grads = {n: p.grad.detach().clone() for n, p in controlnet.named_parameters() if p.grad is not None}
    controlnet.zero_grad(set_to_none=True)
    return out, grads


def test_innercontrol_gradients_equal_with_and_without_checkpointing(models):
    task = get_task("hed").replace(reward_window=(0, 200), alignment_window=(0, 800))
    torch.manual_seed(3)
    probe = ReadoutProbe.from_unet(models["unet"], **task.probe_kwargs(), projection_dim=32, norm_num_groups=8)
    probe.requires_grad_(False)

    out_plain, plain = _controlnet_grads(models, probe, task, checkpointing=False)
    out_ckpt, ckpt = _controlnet_grads(models, probe, task, checkpointing=True)
    # all three terms are on: 2 of 4 samples in the reward window, 3 of 4 in the alignment window
    assert out_plain.reward is not None and out_plain.alignment is not None
    assert out_plain.reward_share == 0.5 and out_plain.alignment_share == 0.75
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss, rtol=1e-6, atol=1e-7)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)

    # the alignment term really reaches the ControlNet (so the comparison above covers its path)
    _, no_alignment = _controlnet_grads(models, probe, task, checkpointing=True, beta=0.0)
    diff = max((plain[n] - no_alignment[n]).abs().max().item() for n in plain)
    assert diff > 1e-6
