"""SDXL in the package (issue "SDXL", part 1): decoder features, channel lists and the probe's timestep embedding on
SDXL's UNet (built from its config on 'meta') and on its layout scaled down (random weights)."""

import pytest
import torch

from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe, decoder_feature_channels
from diffusers_innercontrol.toy.tiny import TINY_SDXL_UNET_CONFIG, build_sdxl_unet


@pytest.fixture(scope="module")
def sdxl():
    return build_sdxl_unet("meta")


@pytest.fixture(scope="module")
def tiny_sdxl():
    return build_sdxl_unet("cpu", tiny=True).eval()


def test_channel_lists_of_sdxl(sdxl):
    # up blocks: 1280 (3 resnets, 3 attentions of 10 layers), 640 (3 and 3, 2 layers), 320 (3 resnets, no attention)
    assert decoder_feature_channels(sdxl, "resnet") == [1280] * 3 + [640] * 3 + [320] * 3
    assert decoder_feature_channels(sdxl, "attention") == [1280] * 3 + [640] * 3


@pytest.mark.parametrize("kind", ["resnet", "attention"])
def test_probe_from_sdxl_unet(sdxl, kind):
    probe = ReadoutProbe.from_unet(sdxl, kind)
    assert list(probe.config.feature_channels) == decoder_feature_channels(sdxl, kind)
    # SDXL embeds t like SD1.5: sinusoids of width 320 into a 1280-wide MLP
    assert (probe.config.timestep_input_dim, probe.config.time_embed_dim) == (320, 1280)


def _added_cond(batch):
    text = TINY_SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] - 6 * TINY_SDXL_UNET_CONFIG["addition_time_embed_dim"]
    return {"text_embeds": torch.randn(batch, text), "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)}


@pytest.mark.parametrize("kind", ["resnet", "attention"])
def test_features_of_a_tiny_sdxl_forward(tiny_sdxl, kind):
    """One forward with SDXL's added conditioning: one map per hooked layer, with the listed channels."""
    torch.manual_seed(0)
    latents, hidden = torch.randn(2, 4, 16, 16), torch.randn(2, 7, TINY_SDXL_UNET_CONFIG["cross_attention_dim"])
    with torch.no_grad(), DecoderFeatureExtractor(tiny_sdxl, kind) as extractor:
        tiny_sdxl(latents, torch.tensor([10, 900]), hidden, added_cond_kwargs=_added_cond(2))
    assert [f.shape[1] for f in extractor.features] == decoder_feature_channels(tiny_sdxl, kind)
    assert all(f.shape[0] == 2 and f.ndim == 4 for f in extractor.features)
    probe = ReadoutProbe.from_unet(tiny_sdxl, kind, projection_dim=16, norm_num_groups=4)
    assert probe(extractor.features, torch.tensor([10, 900])).sample.shape[:2] == (2, 3)


def test_probe_embeds_t_as_the_sdxl_unet(tiny_sdxl):
    """The probe's copy of the timestep embedding equals the UNet's own (before SDXL adds the text/size term)."""
    probe = ReadoutProbe.from_unet(tiny_sdxl, "resnet", projection_dim=16, norm_num_groups=4)
    t = torch.tensor([0, 37, 999])
    with torch.no_grad():
        expected = tiny_sdxl.time_embedding(tiny_sdxl.time_proj(t))
        ours = probe.embed_timesteps(t, 3, "cpu", torch.float32)
    torch.testing.assert_close(ours, expected)


def test_readout_guidance_sdxl_checkpoint_imports(tiny_sdxl, tmp_path):
    """A checkpoint in Readout Guidance's format for an SDXL UNet (its up-block resnets' channels) converts into a
    ReadoutProbe that reads the SDXL UNet's features and computes what the original network computes."""
    from test_convert import _features, _reference_forward, _rg_checkpoint, _save

    from diffusers_innercontrol import load_readout_guidance_checkpoint

    dims = decoder_feature_channels(tiny_sdxl, "resnet")
    checkpoint = _rg_checkpoint(dims=dims)
    checkpoint["config"]["model_id"] = "stabilityai/stable-diffusion-xl-base-1.0"
    probe = load_readout_guidance_checkpoint(_save(tmp_path, checkpoint), tiny_sdxl)
    assert list(probe.config.feature_channels) == dims
    feats, t = _features(), torch.tensor([30, 870])
    with torch.no_grad():
        expected = _reference_forward(checkpoint, feats, tiny_sdxl.time_embedding(tiny_sdxl.time_proj(999 - t)))
        torch.testing.assert_close(probe(feats, t).sample, expected, atol=1e-5, rtol=0)


def _sdxl_batch(components, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = components["unet"].config.cross_attention_dim
    return dict(latents=torch.randn(batch, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(batch, 7, width, generator=g),
                control=torch.rand(batch, 3, 32, 32, generator=g), added_cond_kwargs=_added_cond(batch))


def test_steps_take_sdxl_conditioning(tmp_path):
    """`controlnet_step` (diffusion + alignment) and `probe_step` run the SDXL UNet and ControlNet with SDXL's added
    conditioning, and the gradients reach what each trains."""
    from diffusers import DDPMScheduler

    from diffusers_innercontrol import get_task
    from diffusers_innercontrol.toy.tiny import build_tiny_sdxl_components
    from diffusers_innercontrol.training import controlnet_step, probe_step

    components = build_tiny_sdxl_components(seed=0, tokenizer_dir=str(tmp_path))
    unet, controlnet = components["unet"].requires_grad_(False), components["controlnet"]
    task = get_task("depth")
    probe = ReadoutProbe.from_unet(unet, task.feature_kind, projection_dim=16, norm_num_groups=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch = _sdxl_batch(components)
    out = controlnet_step(task=task, unet=unet, controlnet=controlnet, noise_scheduler=scheduler, probe=probe.requires_grad_(False),
                          alpha=0.0, beta=1.0, timesteps=torch.tensor([100, 300]), **batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.alignment is not None
    assert controlnet.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
    probe.requires_grad_(True)
    loss = probe_step(task=task, unet=unet, probe=probe, noise_scheduler=scheduler, latents=batch["latents"],
                      encoder_hidden_states=batch["encoder_hidden_states"], control=batch["control"],
                      added_cond_kwargs=batch["added_cond_kwargs"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and probe.head[0].weight.grad.abs().sum() > 0
