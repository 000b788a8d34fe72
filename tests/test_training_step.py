"""`training.py` beyond the reward term (tests/test_reward_term.py): the small helpers, the step's errors, the
alignment window at its edges, the total of Eq. 8 by hand, v-prediction, which samples the VAE decodes, and the
seeded generator. Written against the mutants that `mutmut run` left alive in `training.py` (docs/testing.md)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_innercontrol import ReadoutProbe, get_task
from diffusers_innercontrol.losses import alignment_loss_per_sample
from diffusers_innercontrol.training import (
    StepOutput,
    controlnet_step,
    decode_latents,
    encode_images,
    noise_latents,
    probe_config,
    probe_features,
    probe_step,
    sample_timesteps,
)


class GreyReward(torch.nn.Module):
    def forward(self, images):
        return images.mean(1, keepdim=True)


class DecodeSpy:
    """The VAE as `decode_latents` sees it, recording the batch size of every decode."""

    def __init__(self, vae):
        self.vae, self.batches = vae, []
        self.dtype, self.config = vae.dtype, vae.config

    def decode(self, latents):
        self.batches.append(latents.shape[0])
        return self.vae.decode(latents)


@pytest.fixture
def c(tiny_components):
    tiny_components["unet"].requires_grad_(False)
    tiny_components["vae"].requires_grad_(False)
    return tiny_components


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(5)
    return dict(
        latents=torch.randn(2, 4, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 77, 32, generator=g),
        control=torch.rand(2, 3, 32, 32, generator=g),
        noise=torch.randn(2, 4, 16, 16, generator=g),
    )


def _probe(unet, kind="resnet", task="hed"):
    return ReadoutProbe.from_unet(unet, kind, projection_dim=32, norm_num_groups=8, **_probe_head(task)).requires_grad_(False).eval()


def _probe_head(task):
    t = get_task(task)
    return dict(upsample_head=t.upsample_head, out_channels=t.probe_out_channels, output_activation=t.output_activation)


def _forward(c, batch, timesteps, scheduler=None):
    """The ControlNet + UNet prediction of one step, written out."""
    sched = scheduler or c["scheduler"]
    noisy = sched.add_noise(batch["latents"], batch["noise"], timesteps)
    down, mid = c["controlnet"](noisy, timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
                                controlnet_cond=batch["control"], return_dict=False)
    pred = c["unet"](noisy, timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
                     down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return noisy, pred


# ------------------------------------------------------------------ helpers


def test_step_output_logs_by_hand():
    out = StepOutput(loss=torch.tensor(1.5), diffusion=torch.tensor(0.25), reward=torch.tensor(2.0),
                     alignment=torch.tensor(0.5), reward_share=0.75, alignment_share=0.125)
    assert out.logs() == {"loss": 1.5, "loss_diffusion": 0.25, "loss_reward": 2.0, "reward_share": 0.75,
                          "loss_alignment": 0.5, "alignment_share": 0.125}
    assert StepOutput(loss=torch.tensor(1.0), diffusion=torch.tensor(1.0)).logs() == {"loss": 1.0, "loss_diffusion": 1.0}


def test_encode_images_samples_with_the_generator_and_scales(c):
    vae = c["vae"]
    pixels = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1  # another dtype than the VAE's: cast inside
    scaled = SimpleNamespace(encode=vae.encode, dtype=vae.dtype, config=SimpleNamespace(scaling_factor=0.5))
    torch.manual_seed(1)
    got = encode_images(scaled, pixels, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)  # the global RNG moved: only the generator decides the sample
    want = vae.encode(pixels.float()).latent_dist.sample(torch.Generator().manual_seed(3)) * 0.5
    torch.testing.assert_close(got, want)


def test_decode_latents_casts_scales_and_maps_to_unit_range(c):
    vae = c["vae"]
    latents = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    got = decode_latents(vae, latents)
    want = ((vae.decode(latents.float() / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_sample_timesteps_device_range_and_generator():
    assert sample_timesteps(3, 1000, "meta").device.type == "meta"
    t = sample_timesteps(256, 2, "cpu", torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {0, 1} and t.dtype == torch.long
    torch.manual_seed(0)
    a = sample_timesteps(64, 1000, "cpu", torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    assert torch.equal(a, sample_timesteps(64, 1000, "cpu", torch.Generator().manual_seed(7)))


def test_noise_latents_follows_the_latents_and_the_generator(c):
    sched = c["scheduler"]
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noise, t, noisy = noise_latents(sched, latents)
    assert noise.dtype == torch.float64 and noisy.dtype == torch.float64 and t.shape == (2,)
    # on another device (meta: shapes only), the noise and timesteps are drawn there
    adder = SimpleNamespace(config=sched.config, add_noise=lambda x, n, t: x + n)
    noise, t, noisy = noise_latents(adder, torch.zeros(2, 4, 8, 8, device="meta"))
    assert noise.device.type == t.device.type == noisy.device.type == "meta"
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(noise_latents(sched, latents, generator=torch.Generator().manual_seed(4)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    # given noise and timesteps are used as they are
    noise, t = torch.randn_like(latents), torch.tensor([0, 999])
    out = noise_latents(sched, latents, noise, t)
    assert out[0] is noise and out[1] is t


def test_probe_config_unwraps_a_ddp_module(c):
    probe = _probe(c["unet"])
    wrapper = SimpleNamespace(module=probe)  # what accelerate's DDP wrapper looks like from outside
    assert probe_config(wrapper) is probe.config
    assert probe_config(probe) is probe.config


# ------------------------------------------------------------------ controlnet_step: errors


def _cn_step(c, batch, task="hed", **kwargs):
    args = dict(task=get_task(task), unet=c["unet"], controlnet=c["controlnet"], noise_scheduler=c["scheduler"])
    args.update(batch)
    args.update(kwargs)
    return controlnet_step(**args)


def test_controlnet_step_errors_name_the_fix(c, batch):
    with pytest.raises(ValueError, match=r"reward_decode must be one of \('masked', 'full'\), got 'half'"):
        _cn_step(c, batch, alpha=0, beta=0, reward_decode="half")
    # the reward needs both models: either missing is refused
    with pytest.raises(ValueError, match=r"^alpha > 0 needs a reward model and the VAE \(or pass alpha=0\)\.$"):
        _cn_step(c, batch, alpha=1.0, beta=0, vae=c["vae"])
    with pytest.raises(ValueError, match=r"^alpha > 0 needs a reward model and the VAE"):
        _cn_step(c, batch, alpha=1.0, beta=0, reward_model=GreyReward())
    with pytest.raises(ValueError, match=r"^beta > 0 needs a trained readout probe \(or pass beta=0\)\.$"):
        _cn_step(c, batch, alpha=0, beta=1.0)
    # segmentation without class indices: refused for the reward alone and for the alignment alone
    with pytest.raises(ValueError, match=r"^Segmentation losses need `control_classes` \(class indices of the control\)\.$"):
        _cn_step(c, batch, task="segmentation", alpha=1.0, beta=0, vae=c["vae"], reward_model=GreyReward())
    with pytest.raises(ValueError, match="^Segmentation losses need"):
        _cn_step(c, batch, task="segmentation", alpha=0, beta=1.0, probe=_probe(c["unet"], task="segmentation"))


def test_segmentation_losses_compare_with_the_class_indices(c, batch):
    task = get_task("segmentation")
    probe = _probe(c["unet"], task="segmentation")
    classes = torch.randint(0, 150, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 600])  # inside segmentation's alignment window [450, 980]
    out = _cn_step(c, batch, task="segmentation", alpha=0, beta=1.0, probe=probe, control_classes=classes, timesteps=t)
    from diffusers_innercontrol.features import DecoderFeatureExtractor

    noisy = c["scheduler"].add_noise(batch["latents"], batch["noise"], t)
    with DecoderFeatureExtractor(c["unet"], "resnet") as ex:
        down, mid = c["controlnet"](noisy, t, encoder_hidden_states=batch["encoder_hidden_states"],
                                    controlnet_cond=batch["control"], return_dict=False)
        c["unet"](noisy, t, encoder_hidden_states=batch["encoder_hidden_states"], down_block_additional_residuals=down,
                  mid_block_additional_residual=mid)
        features = ex.pop()
    want = alignment_loss_per_sample(task, probe(features, t).sample, classes).mean()
    assert out.alignment.item() == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------ controlnet_step: the terms


def test_total_loss_is_eq8_by_hand_and_the_timesteps_come_back(c, batch):
    t = torch.tensor([100, 300])
    out = _cn_step(c, batch, alpha=0.7, beta=0.3, vae=c["vae"], reward_model=GreyReward(), probe=_probe(c["unet"]),
                   timesteps=t)
    want = out.diffusion + 0.7 * out.reward + 0.3 * out.alignment
    assert out.reward.item() > 0 and out.alignment.item() > 0
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(out.timesteps, t)
    assert out.reward_share == 1.0 and out.alignment_share == 1.0


def test_alignment_window_edges(c, batch):
    probe = _probe(c["unet"])
    # HED aligns on t in [0, 800]: no sample inside -> exactly 0, finite, still part of the graph
    none = _cn_step(c, batch, alpha=0, beta=1.0, probe=probe, timesteps=torch.tensor([900, 950]))
    assert none.alignment.item() == 0.0 and none.alignment.requires_grad and none.alignment_share == 0.0
    assert torch.isfinite(none.loss) and none.loss.item() == pytest.approx(none.diffusion.item())
    # one sample inside: its own loss, not 0
    one = _cn_step(c, batch, alpha=0, beta=1.0, probe=probe, timesteps=torch.tensor([100, 900]))
    both = _cn_step(c, batch, alpha=0, beta=1.0, probe=probe, timesteps=torch.tensor([100, 100]),
                    noise=batch["noise"][[0, 0]], latents=batch["latents"][[0, 0]],
                    encoder_hidden_states=batch["encoder_hidden_states"][[0, 0]], control=batch["control"][[0, 0]])
    assert one.alignment_share == 0.5 and one.alignment.item() > 0
    assert one.alignment.item() == pytest.approx(both.alignment.item(), rel=1e-5)
    # beta = 0: no alignment term, nothing logged for it
    off = _cn_step(c, batch, alpha=0, beta=0, timesteps=torch.tensor([100, 900]))
    assert off.alignment is None and "loss_alignment" not in off.logs()


def test_attention_probe_reads_attention_features(c, batch):
    """Depth's probe reads the attention outputs: the step must hook those, not the default resnet outputs."""
    probe = _probe(c["unet"], kind="attention", task="depth")
    out = _cn_step(c, batch, task="depth", alpha=0, beta=1.0, probe=probe, timesteps=torch.tensor([100, 200]))
    assert torch.isfinite(out.alignment) and out.alignment.item() > 0


def test_v_prediction_targets_and_one_step_x0(c, batch):
    sched = DDPMScheduler.from_config(c["scheduler"].config, prediction_type="v_prediction")
    t = torch.tensor([100, 700])
    results = {}
    for mode in ("masked", "full"):
        results[mode] = _cn_step(c, batch, noise_scheduler=sched, alpha=1.0, beta=0, vae=c["vae"],
                                 reward_model=GreyReward(), timesteps=t, reward_decode=mode)
    noisy, pred = _forward(c, batch, t, sched)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * batch["noise"] - (1 - a).sqrt() * batch["latents"]
    assert results["masked"].diffusion.item() == pytest.approx(torch.mean((pred - v) ** 2).item(), rel=1e-5)
    x0 = a.sqrt() * noisy - (1 - a).sqrt() * pred  # the v-prediction one-step x0; only sample 0 is in the window
    image = decode_latents(c["vae"], x0[:1])
    want = ((image.mean(1) - batch["control"][:1].mean(1)) ** 2).mean()
    for mode in ("masked", "full"):
        assert results[mode].reward.item() == pytest.approx(want.item(), rel=1e-4), mode


def test_masked_decode_decodes_only_the_window(c, batch):
    sizes = {}
    for mode in ("masked", "full"):
        spy = DecodeSpy(c["vae"])
        _cn_step(c, batch, alpha=1.0, beta=0, vae=spy, reward_model=GreyReward(), timesteps=torch.tensor([50, 700]),
                 reward_decode=mode)
        sizes[mode] = spy.batches
    assert sizes == {"masked": [1], "full": [2]}


def test_steps_with_one_seeded_generator_repeat(c, batch):
    """Noise and timesteps drawn inside the step come from the generator passed, not the global RNG."""
    draws = {k: v for k, v in batch.items() if k != "noise"}
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        out = _cn_step(c, draws, alpha=0, beta=0, generator=torch.Generator().manual_seed(9))
        results.append((out.loss.item(), out.timesteps.tolist()))
    assert results[0] == results[1]


def test_controlnet_step_and_probe_features_in_float64(c, batch):
    """A float64 UNet and ControlNet (`weight_dtype`): the float32 control is cast to the models' dtype."""
    unet = copy.deepcopy(c["unet"]).double()
    controlnet = copy.deepcopy(c["controlnet"]).double()
    b64 = {k: (v.double() if k != "control" else v) for k, v in batch.items()}
    out = controlnet_step(task=get_task("hed"), unet=unet, controlnet=controlnet, noise_scheduler=c["scheduler"],
                          alpha=0, beta=0, timesteps=torch.tensor([10, 20]), weight_dtype=torch.float64, **b64)
    assert torch.isfinite(out.loss)  # the float32 control went into the float64 models cast, not as it was
    noisy = c["scheduler"].add_noise(b64["latents"], b64["noise"], torch.tensor([10, 20]))
    feats = probe_features(unet, "resnet", noisy, torch.tensor([10, 20]), b64["encoder_hidden_states"], controlnet,
                           batch["control"], torch.float64)
    assert all(f.dtype == torch.float64 for f in feats)


# ------------------------------------------------------------------ probe_step


def test_probe_step_uses_the_controlnet_and_the_generator(c, batch):
    probe = _probe(c["unet"])
    args = dict(task=get_task("hed"), unet=c["unet"], probe=probe, noise_scheduler=c["scheduler"],
                latents=batch["latents"], encoder_hidden_states=batch["encoder_hidden_states"], control=batch["control"])
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(probe_step(**args, generator=torch.Generator().manual_seed(2), reduce=False))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    fixed = dict(args, noise=batch["noise"], timesteps=torch.tensor([100, 200]))
    plain = probe_step(**fixed).item()
    conditioned = probe_step(**fixed, controlnet=c["controlnet"]).item()
    assert conditioned != pytest.approx(plain, rel=1e-6)  # the ControlNet's residuals reach the features


def test_probe_step_in_float64(c, batch):
    unet = copy.deepcopy(c["unet"]).double()
    controlnet = copy.deepcopy(c["controlnet"]).double()
    probe = _probe(c["unet"]).double()
    loss = probe_step(task=get_task("hed"), unet=unet, probe=probe, noise_scheduler=c["scheduler"], controlnet=controlnet,
                      latents=batch["latents"].double(), encoder_hidden_states=batch["encoder_hidden_states"].double(),
                      control=batch["control"], noise=batch["noise"].double(), timesteps=torch.tensor([10, 20]),
                      weight_dtype=torch.float64)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ early branch backward


def _cn_grads(c, batch, **kwargs):
    c["controlnet"].zero_grad(set_to_none=True)
    out = _cn_step(c, batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in c["controlnet"].named_parameters() if p.grad is not None}
    c["controlnet"].zero_grad(set_to_none=True)
    return out, grads


def test_early_branch_backward_gives_the_same_losses_and_gradients(c, batch):
    """InnerControl (reward + alignment) on 6 samples, 3 inside the reward window and 5 inside the alignment window:
    backpropagating each branch in chunks inside the step (the reward one sample at a time, the probe 4 + 1) gives the
    ControlNet the gradients of the one backward (fp32), the same loss values, and decodes one sample at a time."""
    from diffusers_innercontrol.training import ALIGNMENT_CHUNK

    assert ALIGNMENT_CHUNK < 5  # the probe runs in more than one chunk here
    g = torch.Generator().manual_seed(11)
    b4 = {k: torch.cat([v] + [torch.rand(v.shape, generator=g) if k == "control" else torch.randn(v.shape, generator=g)
                              for _ in range(2)]) for k, v in batch.items()}
    t = torch.tensor([20, 150, 700, 180, 790, 900])  # hed: reward window [0, 400], alignment [0, 800]: 3 and 5 samples
    probe = _probe(c["unet"])
    kw = dict(alpha=0.7, beta=0.3, reward_model=GreyReward(), probe=probe, timesteps=t)
    spy = DecodeSpy(c["vae"])
    early, early_grads = _cn_grads(c, b4, vae=spy, early_branch_backward=True, **kw)
    assert spy.batches == [1, 1, 1]
    plain, plain_grads = _cn_grads(c, b4, vae=c["vae"], early_branch_backward=False, **kw)
    assert early.reward_share == plain.reward_share == 0.5 and early.alignment_share == pytest.approx(5 / 6)
    for name in ("loss", "diffusion", "reward", "alignment"):
        assert getattr(early, name).item() == pytest.approx(getattr(plain, name).item(), rel=1e-5)
    assert set(early_grads) == set(plain_grads) and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(early_grads[name], grad, rtol=1e-4, atol=1e-7)
    # The branches' own share of the gradient (the total minus the diffusion loss's), compared on its own: it is small
    # next to the diffusion gradient here, so a branch that lost a chunk could hide inside the tolerance above.
    _, diffusion_only = _cn_grads(c, b4, alpha=0, beta=0, timesteps=t)
    flat = lambda grads: torch.cat([(grads[n] - diffusion_only[n]).flatten() for n in sorted(plain_grads)])  # noqa: E731
    branches_plain, branches_early = flat(plain_grads), flat(early_grads)
    assert branches_plain.norm() > 0
    assert (branches_early - branches_plain).norm() / branches_plain.norm() < 1e-3


def test_branch_backward_by_hand():
    """inputs x (3 samples), per-sample loss sum(w * x_i^2), weight 2: value = mean_i sum(w x_i^2); the surrogate's
    gradient with respect to x is 2 * 2 w x_i / 3, the gradient of 2 * mean."""
    from diffusers_innercontrol.training import branch_backward

    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], requires_grad=True)
    w = torch.tensor([1.0, 3.0])
    calls = []

    def losses(leaves, rows):
        calls.append(rows)
        return (w * leaves[0] ** 2).sum(1)

    value, surrogate = branch_backward([x], losses, weight=2.0, chunk_size=2)
    assert calls == [slice(0, 2), slice(2, 3)]
    assert value.item() == pytest.approx(((1 + 12) + (9 + 3) + 0.25) / 3)
    surrogate.backward()
    torch.testing.assert_close(x.grad, 2.0 * 2 * w * x.detach() / 3)


def test_early_branch_backward_falls_back_under_fp16(c, batch):
    """fp16 weights or fp16 autocast (a GradScaler scales the loss the caller backpropagates): one backward, the reward
    branch decoded as one batch with its graph kept; bf16 autocast keeps the early backward."""
    from diffusers_innercontrol.training import _fp16_in_use

    assert _fp16_in_use(torch.float16, torch.device("cpu"))
    assert not _fp16_in_use(torch.float32, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.float16):
        assert _fp16_in_use(torch.float32, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fp16_in_use(torch.float32, torch.device("cpu"))
    t = torch.tensor([50, 100])  # both inside the reward window
    spy = DecodeSpy(c["vae"])
    out = _cn_step(c, batch, alpha=1.0, beta=0, vae=spy, reward_model=GreyReward(), timesteps=t)
    assert spy.batches == [1, 1] and out.reward.grad_fn is None  # early: one sample at a time, a value
    with torch.autocast("cpu", dtype=torch.float16):
        spy = DecodeSpy(c["vae"])
        out = _cn_step(c, batch, alpha=1.0, beta=0, vae=spy, reward_model=GreyReward(), timesteps=t)
    assert spy.batches == [2] and out.reward.grad_fn is not None
