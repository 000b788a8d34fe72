"""Decoder feature capture: channel lists, equality with a reference computation, hook hygiene, autograd."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from diffusers_innercontrol import DecoderFeatureExtractor, decoder_feature_channels, split_guidance_batch
from diffusers_innercontrol.toy.tiny import TINY_UNET_CONFIG, build_sd15_unet


def _inputs(batch=2, seed=0, width=16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, width, generator=g)
    timesteps = torch.tensor([10, 600][:batch])
    text = torch.randn(batch, 77, 32, generator=g)
    return latents, timesteps, text


def _all_hooked_modules(unet):
    mods = [unet]
    for block in unet.up_blocks:
        for resnet in block.resnets:
            mods += [resnet.conv2]
        for attention in getattr(block, "attentions", None) or []:
            mods += [attention, attention.transformer_blocks[0].attn1]
    return mods


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in _all_hooked_modules(unet))


def test_sd15_channels():
    sd15 = build_sd15_unet("meta")
    assert decoder_feature_channels(sd15, "resnet") == [1280] * 6 + [640] * 3 + [320] * 3
    assert decoder_feature_channels(sd15, "attention") == [1280] * 3 + [640] * 3 + [320] * 3
    with pytest.raises(ValueError, match="resnet.*attention"):
        decoder_feature_channels(sd15, "mlp")


def test_resnet_features_equal_reference(tiny_components):
    """Each captured map is conv2's output, recomputed here by hand from the ResnetBlock2D's input and temb."""
    unet = tiny_components["unet"]
    latents, timesteps, text = _inputs(width=24)  # not square: H and W must not be swapped
    resnets = [r for block in unet.up_blocks for r in block.resnets]
    seen = []

    def grab(module, args, kwargs, output):
        x = args[0] if args else kwargs["input_tensor"]
        temb = args[1] if len(args) > 1 else kwargs["temb"]
        seen.append((module, x, temb, output))

    handles = [r.register_forward_hook(grab, with_kwargs=True) for r in resnets]
    try:
        with torch.no_grad(), DecoderFeatureExtractor(unet, "resnet") as extractor:
            unet(latents, timesteps, encoder_hidden_states=text)
            features = extractor.pop()
    finally:
        for h in handles:
            h.remove()
    assert len(features) == len(seen) == 6
    assert [f.shape[1] for f in features] == decoder_feature_channels(unet, "resnet") == [64, 64, 64, 32, 32, 32]
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 12)] * 3 + [(16, 24)] * 3
    with torch.no_grad():
        for feature, (r, x, temb, output) in zip(features, seen):
            h = F.silu(r.norm1(x))
            h = r.conv1(h)
            h = h + r.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = F.silu(r.norm2(h))  # dropout is the identity in eval mode
            reference = r.conv2(h)
            assert torch.allclose(feature, reference, atol=1e-5)
            # and it is the residual branch: output * scale - shortcut(input)
            shortcut = r.conv_shortcut(x) if r.conv_shortcut is not None else x
            assert torch.allclose(feature, output * r.output_scale_factor - shortcut, atol=1e-4)


def test_attention_features_equal_reference(tiny_components):
    """Each captured map is attn1's output on norm1(hidden), by a hand-written attention, as B x C x H x W."""
    unet = tiny_components["unet"]
    latents, timesteps, text = _inputs(width=24)  # not square: H and W must not be swapped
    owners = [a for block in unet.up_blocks for a in (getattr(block, "attentions", None) or [])]
    seen = []

    def grab_owner(module, args, kwargs):
        seen.append({"spatial": (args[0] if args else kwargs["hidden_states"]).shape})

    def grab_block(module, args, kwargs):
        seen[-1]["tokens"] = args[0] if args else kwargs["hidden_states"]
        seen[-1]["block"] = module

    handles = []
    for a in owners:
        handles.append(a.register_forward_pre_hook(grab_owner, with_kwargs=True))
        handles.append(a.transformer_blocks[0].register_forward_pre_hook(grab_block, with_kwargs=True))
    try:
        with torch.no_grad(), DecoderFeatureExtractor(unet, "attention") as extractor:
            unet(latents, timesteps, encoder_hidden_states=text)
            features = extractor.pop()
    finally:
        for h in handles:
            h.remove()
    assert len(features) == len(seen) == 3
    assert [f.shape[1] for f in features] == decoder_feature_channels(unet, "attention") == [64, 64, 64]
    with torch.no_grad():
        for feature, rec in zip(features, seen):
            block, tokens = rec["block"], rec["tokens"]
            b, c, height, width = rec["spatial"]
            attn = block.attn1
            x = block.norm1(tokens)
            n, d = x.shape[1], c // attn.heads

            def heads(t):
                return t.view(b, n, attn.heads, d).transpose(1, 2)

            q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
            weights = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
            out = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(b, n, c))
            reference = out.reshape(b, height, width, c).permute(0, 3, 1, 2)  # token index = row * W + col
            assert feature.shape == (b, c, height, width) == (2, 64, 8, 12)
            assert torch.allclose(feature, reference, atol=1e-5)


@pytest.mark.parametrize("kind", ["resnet", "attention"])
def test_hooks_removed_on_exit_and_on_exception(tiny_components, kind):
    unet = tiny_components["unet"]
    before = _hook_count(unet)
    with DecoderFeatureExtractor(unet, kind) as extractor:
        assert extractor.active and _hook_count(unet) > before
    assert _hook_count(unet) == before and not extractor.active
    with pytest.raises(RuntimeError, match="boom"):
        with DecoderFeatureExtractor(unet, kind):
            assert _hook_count(unet) > before
            raise RuntimeError("boom")
    assert _hook_count(unet) == before
    # register / remove by hand
    extractor = DecoderFeatureExtractor(unet, kind).register()
    extractor.register()  # idempotent: no second set of hooks
    registered = _hook_count(unet) - before
    extractor.remove()
    assert _hook_count(unet) == before
    expected = 2 + (6 if kind == "resnet" else 2 * 3)  # unet pre + post, then one (resnet) or two hooks per layer
    assert registered == expected


def test_features_keep_autograd_graph(tiny_components):
    unet = tiny_components["unet"].requires_grad_(False)
    latents, timesteps, text = _inputs()
    latents.requires_grad_(True)
    with DecoderFeatureExtractor(unet, "resnet") as extractor:
        unet(latents, timesteps, encoder_hidden_states=text)
    features = extractor.features
    assert all(f.requires_grad for f in features)
    sum(f.square().mean() for f in features).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    # detach=True (stage 1) cuts the graph
    with DecoderFeatureExtractor(unet, "resnet", detach=True) as extractor:
        unet(latents, timesteps, encoder_hidden_states=text)
    assert not any(f.requires_grad for f in extractor.features)


def test_one_capture_per_forward_and_none_outside(tiny_components):
    unet = tiny_components["unet"]
    a, timesteps, text = _inputs(seed=0)
    b, _, _ = _inputs(seed=1)
    calls = []
    with torch.no_grad():
        with DecoderFeatureExtractor(unet, "resnet", on_forward=lambda f: calls.append(len(f))) as extractor:
            # a hooked layer called outside a UNet forward is ignored
            resnet = unet.up_blocks[1].resnets[0]
            temb = unet.time_embedding(unet.time_proj(timesteps))
            resnet(torch.randn(2, 96, 16, 16), temb)
            assert extractor.features == []
            unet(a, timesteps, encoder_hidden_states=text)
            unet(b, timesteps, encoder_hidden_states=text)
            last = extractor.features
            resnet(torch.randn(2, 96, 16, 16), temb)
            assert extractor.features is last and len(last) == 6
        with DecoderFeatureExtractor(unet, "resnet") as single:
            unet(b, timesteps, encoder_hidden_states=text)
    assert calls == [6, 6]
    assert all(torch.equal(x, y) for x, y in zip(last, single.features))
    assert extractor.pop() is last and extractor.features == []


def test_wrapped_unet_is_unwrapped(tiny_components):
    unet = tiny_components["unet"]

    class Wrapper(nn.Module):  # like accelerate / DDP: the model lives in `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    latents, timesteps, text = _inputs()
    with torch.no_grad(), DecoderFeatureExtractor(Wrapper(unet), "attention") as extractor:
        Wrapper(unet)(latents, timesteps, encoder_hidden_states=text)
    assert len(extractor.features) == 3


def _controlnet_feature_grads(unet, controlnet, checkpointing):
    latents, timesteps, text = _inputs()
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    controlnet.zero_grad(set_to_none=True)
    conv2_calls = []
    counter = unet.up_blocks[1].resnets[2].conv2.register_forward_hook(lambda *a: conv2_calls.append(1))
    forwards = []
    try:
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        with DecoderFeatureExtractor(unet, "resnet", on_forward=lambda f: forwards.append(len(f))) as extractor:
            down, mid = controlnet(latents, timesteps, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
            unet(
                latents, timesteps, encoder_hidden_states=text,
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
            )
            features = extractor.features
            sum((f**2).mean() for f in features).backward()
            after_backward = len(extractor.features)
    finally:
        counter.remove()
        unet.disable_gradient_checkpointing()
        unet.eval()
    grads = {n: p.grad.clone() for n, p in controlnet.named_parameters() if p.grad is not None}
    return grads, len(features), forwards, after_backward, len(conv2_calls)


def test_gradient_checkpointing_captures_once_and_same_gradients(tiny_components):
    unet, controlnet = tiny_components["unet"], tiny_components["controlnet"]
    unet.requires_grad_(False)
    plain, n_plain, fw_plain, after_plain, calls_plain = _controlnet_feature_grads(unet, controlnet, False)
    ckpt, n_ckpt, fw_ckpt, after_ckpt, calls_ckpt = _controlnet_feature_grads(unet, controlnet, True)
    assert calls_plain == 1 and calls_ckpt == 2  # checkpointing re-ran the layer during backward ...
    assert n_plain == n_ckpt == 6 and fw_plain == fw_ckpt == [6]  # ... but features were captured once
    assert after_plain == after_ckpt == 6  # the recomputation did not append to or reset the list
    assert plain and plain.keys() == ckpt.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-4), name


def test_split_guidance_batch_keeps_conditional_half():
    uncond = torch.zeros(2, 3, 4, 4)
    cond = torch.ones(2, 3, 4, 4)
    feats = [torch.cat([uncond, cond]), torch.cat([uncond[:, :1], cond[:, :1] * 2])]
    kept = split_guidance_batch(feats)
    assert torch.equal(kept[0], cond) and torch.equal(kept[1], cond[:, :1] * 2)
    dropped = split_guidance_batch(feats, keep=0)
    assert torch.equal(dropped[0], uncond)


def test_attention_owner_called_with_keyword_hidden_states(tiny_components):
    """The attention block's spatial size is read from `hidden_states=` when it is passed by keyword."""
    from diffusers_innercontrol.features import decoder_feature_modules

    unet = tiny_components["unet"]
    module, owner = decoder_feature_modules(unet, "attention")[0]
    hidden = torch.randn(1, owner.config.in_channels, 4, 6)
    context = torch.randn(1, 77, 32)
    with DecoderFeatureExtractor(unet, "attention") as extractor, torch.no_grad():
        extractor._armed = True  # as inside a UNet forward
        owner(hidden_states=hidden, encoder_hidden_states=context)
        assert extractor.features[-1].shape[-2:] == (4, 6)


def test_unwrap_compiled_and_ddp_wrappers_but_not_a_unet(tiny_components):
    from torch import nn

    from diffusers_innercontrol.features import _unwrap, decoder_feature_modules

    unet = tiny_components["unet"]

    class Compiled(nn.Module):  # what torch.compile returns: the model in `_orig_mod`
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

    class DDP(nn.Module):  # DistributedDataParallel: the model in `.module`
        def __init__(self, model):
            super().__init__()
            self.module = model

    assert _unwrap(Compiled(unet)) is unet
    assert _unwrap(DDP(Compiled(unet))) is unet
    assert DecoderFeatureExtractor(Compiled(unet)).unet is unet

    class UNetWithModule(nn.Module):  # a UNet that happens to own a submodule called `module`: not a wrapper
        def __init__(self):
            super().__init__()
            self.up_blocks = nn.ModuleList()
            self.module = nn.Identity()

    model = UNetWithModule()
    assert _unwrap(model) is model
    with pytest.raises(TypeError, match=r"^Linear has no `up_blocks`: decoder features need a UNet2DConditionModel\.$"):
        decoder_feature_modules(nn.Linear(2, 2), "resnet")


def test_default_kind_and_registering_again_after_remove(tiny_components):
    unet = tiny_components["unet"]
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 32)
    extractor = DecoderFeatureExtractor(unet)
    assert extractor.kind == "resnet"
    with torch.no_grad():
        with extractor:
            unet(latents, t, encoder_hidden_states=text)
        first = extractor.pop()
        extractor.register()  # a removed extractor can be registered again
        assert extractor.active
        unet(latents, t, encoder_hidden_states=text)
        assert len(extractor.pop()) == len(first)
        # a hooked layer called on its own, outside a UNet forward, is not captured
        resnet = unet.up_blocks[0].resnets[0]
        resnet(torch.randn(1, resnet.in_channels, 4, 4), torch.randn(1, resnet.time_emb_proj.in_features))
        assert extractor.features == []
        extractor.remove()
        extractor.register()
        resnet(torch.randn(1, resnet.in_channels, 4, 4), torch.randn(1, resnet.time_emb_proj.in_features))
        assert extractor.features == []
        extractor.remove()


def test_check_probe_fits_unet_names_what_differs(tiny_components):
    """The one probe-versus-UNet check (trainers, pipeline, conversion): the tiny UNet's decoder gives resnet
    channels [64, 64, 64, 32, 32, 32] and attention channels [64, 64, 64]."""
    from diffusers_innercontrol.features import check_probe_fits_unet

    unet = tiny_components["unet"]
    check_probe_fits_unet(unet, "resnet", [64, 64, 64, 32, 32, 32])
    check_probe_fits_unet(unet, "attention", (64, 64, 64))
    with pytest.raises(ValueError) as err:
        check_probe_fits_unet(unet, "resnet", [64, 64, 64], "The checkpoint", "Fix it.")
    assert str(err.value) == ("The checkpoint reads 'resnet' features with channels [64, 64, 64], but this UNet's are "
                              "[64, 64, 64, 32, 32, 32]. They are this UNet's 'attention' features: use "
                              "feature_kind='attention'. Fix it.")
    with pytest.raises(ValueError) as err:
        check_probe_fits_unet(unet, "attention", [48, 48, 48])
    assert str(err.value) == ("The probe reads 'attention' features with channels [48, 48, 48], but this UNet's are "
                              "[64, 64, 64]. It was trained on another UNet. Train a probe on this UNet (train_probe.py).")
    no_attention = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, up_block_types=("UpBlock2D", "UpBlock2D"),
                                               down_block_types=("DownBlock2D", "DownBlock2D")))
    with pytest.raises(ValueError) as err:
        check_probe_fits_unet(no_attention, "attention", [64, 64, 64], "--init_probe", "Leave it out.")
    assert str(err.value) == ("--init_probe reads 'attention' features but this UNet's decoder has no 'attention' "
                              "layers to read features from. Leave it out.")
    with pytest.raises(ValueError, match="It was trained on another UNet"):  # no attention layers to compare with
        check_probe_fits_unet(no_attention, "resnet", [64, 64, 64])
