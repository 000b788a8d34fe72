"""The reward term inside `training.controlnet_step` (Eq. 5-6), checked against a recomputation written out here:
its value, the reward window, masked against full decode, and the gradient that reaches the ControlNet alone.

Each test would fail if the step detached the noise prediction before the one-step x0 (no reward gradient), or
scored the reward on samples outside the window."""

import pytest
import torch
from torch import nn

from diffusers_innercontrol import get_task
from diffusers_innercontrol.training import controlnet_step


class GreyReward(nn.Module):
    """A reward model with a known output: the channel mean of the image, `(B, 1, H, W)`, edges' polarity."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, to check that the reward model gets no gradient

    def forward(self, images):
        return self.scale * images.mean(1, keepdim=True)


@pytest.fixture
def setup(tiny_components):
    c = tiny_components
    c["unet"].requires_grad_(False)
    c["vae"].requires_grad_(False)
    c["controlnet"].train()
    g = torch.Generator().manual_seed(11)
    batch = dict(
        latents=torch.randn(2, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 77, 32, generator=g),
        control=torch.rand(2, 3, 32, 32, generator=g),
        noise=torch.randn(2, 4, 16, 16, generator=g),
    )
    return c, batch, GreyReward().requires_grad_(False)


def _step(c, batch, reward, timesteps, **kwargs):
    return controlnet_step(
        task=get_task("hed"), unet=c["unet"], controlnet=c["controlnet"], noise_scheduler=c["scheduler"], vae=c["vae"],
        reward_model=reward, alpha=1.0, beta=0.0, timesteps=torch.tensor(timesteps), **batch, **kwargs,
    )


def _reward_by_hand(c, batch, timesteps, in_window):
    """Eq. 5-6 written out: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), decoded, grey, MSE to the control's mean."""
    unet, controlnet, vae, sched = c["unet"], c["controlnet"], c["vae"], c["scheduler"]
    t = torch.tensor(timesteps)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * batch["latents"] + (1 - a).sqrt() * batch["noise"]
    down, mid = controlnet(noisy, t, encoder_hidden_states=batch["encoder_hidden_states"], controlnet_cond=batch["control"],
                           return_dict=False)
    eps = unet(noisy, t, encoder_hidden_states=batch["encoder_hidden_states"], down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
    images = ((vae.decode(x0 / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    per_sample = ((images.mean(1) - batch["control"].mean(1)) ** 2).flatten(1).mean(1)
    keep = torch.tensor(in_window)
    return per_sample[keep].mean()


def _cn_grads(controlnet):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in controlnet.parameters()]


def test_reward_value_and_gradient_match_the_recomputation(setup):
    c, batch, reward = setup
    # HED's reward window is t in [0, 400]: sample 0 (t = 50) counts, sample 1 (t = 700) does not
    assert get_task("hed").reward_window == (0, 400)
    # one backward (the reward term keeps its graph; the default early branch backward gives the same total gradient:
    # tests/test_training_step.py::test_early_branch_backward_gives_the_same_losses_and_gradients)
    out = _step(c, batch, reward, [50, 700], early_branch_backward=False)
    by_hand = _reward_by_hand(c, batch, [50, 700], [True, False])
    assert out.reward_share == 0.5
    assert out.reward.item() == pytest.approx(by_hand.item(), rel=1e-5)

    c["controlnet"].zero_grad(set_to_none=True)
    out.reward.backward()
    grads = _cn_grads(c["controlnet"])
    assert sum(g.abs().sum() for g in grads) > 0  # the reward trains the ControlNet ...
    assert all(p.grad is None for p in c["unet"].parameters())  # ... and nothing else
    assert all(p.grad is None for p in c["vae"].parameters()) and reward.scale.grad is None

    c["controlnet"].zero_grad(set_to_none=True)
    by_hand.backward()
    for got, want in zip(grads, _cn_grads(c["controlnet"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_only_samples_inside_the_window_count(setup):
    c, batch, reward = setup
    base = _step(c, batch, reward, [50, 700]).reward.item()
    # a white control for the out-of-window sample leaves the reward as it is; for the in-window one it moves it
    changed = dict(batch, control=batch["control"].clone())
    changed["control"][1] = 1.0
    assert _step(c, changed, reward, [50, 700]).reward.item() == pytest.approx(base, rel=1e-6)
    changed = dict(batch, control=batch["control"].clone())
    changed["control"][0] = 1.0
    assert _step(c, changed, reward, [50, 700]).reward.item() > base + 0.05
    # both samples in the window: the mean of both; none: 0 with no gradient
    both = _step(c, batch, reward, [50, 400]).reward.item()
    assert both == pytest.approx(_reward_by_hand(c, batch, [50, 400], [True, True]).item(), rel=1e-5)
    none = _step(c, batch, reward, [401, 999])
    assert none.reward.item() == 0.0 and none.reward_share == 0.0


def test_masked_decode_equals_full_decode_in_value_and_gradient(setup):
    c, batch, reward = setup
    results = {}
    for mode in ("masked", "full"):
        c["controlnet"].zero_grad(set_to_none=True)
        out = _step(c, batch, reward, [50, 700], reward_decode=mode, early_branch_backward=False)
        out.reward.backward()
        results[mode] = (out.reward.item(), _cn_grads(c["controlnet"]))
    assert results["masked"][0] == pytest.approx(results["full"][0], rel=1e-5)
    for masked, full in zip(results["masked"][1], results["full"][1]):
        torch.testing.assert_close(masked, full, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_step_is_finite_and_close_to_fp32(setup):
    """One stage-2 step with every term (diffusion, reward, alignment) under CPU bf16 autocast, as
    `--mixed_precision bf16` runs it: finite losses, and a ControlNet gradient close to the fp32 one."""
    from diffusers_innercontrol import ReadoutProbe

    c, batch, reward = setup
    probe = ReadoutProbe.from_unet(c["unet"], "resnet", projection_dim=32, norm_num_groups=8).requires_grad_(False).eval()
    grads, losses = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        c["controlnet"].zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = controlnet_step(
                task=get_task("hed"), unet=c["unet"], controlnet=c["controlnet"], noise_scheduler=c["scheduler"],
                vae=c["vae"], reward_model=reward, probe=probe, alpha=1.0, beta=1.0, timesteps=torch.tensor([50, 300]),
                **batch,
            )
        for term in (out.loss, out.diffusion, out.reward, out.alignment):
            assert torch.isfinite(term).all(), name
        out.loss.backward()
        losses[name] = out.loss.item()
        grads[name] = torch.cat([g.flatten().float() for g in _cn_grads(c["controlnet"])])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    # bf16 keeps 8 bits of mantissa (~3 significant digits): the gradient's direction and size agree to a few percent
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0).item()
    assert cosine > 0.98, cosine
    assert not torch.equal(grads["bf16"], grads["fp32"])  # autocast did run in bf16
    assert grads["bf16"].norm().item() == pytest.approx(grads["fp32"].norm().item(), rel=0.1)
