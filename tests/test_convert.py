"""Import of Readout Guidance / InnerControl probe checkpoints, on checkpoints written by hand in that format."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from diffusers_innercontrol import ReadoutProbe, load_readout_guidance_checkpoint
from diffusers_innercontrol.convert import main as convert_main

DIMS = [64, 64, 64, 32, 32, 32]  # the tiny UNet's up-block resnet channels
P, B, GROUPS, EMB = 32, 8, 4, 128  # projection, bottleneck (P // 4), GroupNorm groups, tiny UNet t_emb width


def _rg_checkpoint(sequential=False, seed=0, act=True, out_channels=3, dims=DIMS):
    """A checkpoint in Readout Guidance's format (train_helpers.save_model), with the original key names."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {}
    for layer, c in enumerate(dims):
        pre = f"bottleneck_layers.{layer}.0." if sequential else f"bottleneck_layers.{layer}."
        convs = {"conv1": (B, c, 1), "conv2": (B, B, 3), "conv3": (P, B, 1)}
        if c != P:
            convs["shortcut"] = (P, c, 1)
        for name, (o, i, k) in convs.items():
            state[pre + f"{name}.weight"] = rnd(o, i, k, k)
            state[pre + f"{name}.norm.weight"] = 1.0 + rnd(o, scale=0.1)
            state[pre + f"{name}.norm.bias"] = rnd(o, scale=0.1)
        state[pre + "emb_layers.weight"] = rnd(B, EMB, scale=0.1)
        state[pre + "emb_layers.bias"] = rnd(B, scale=0.1)
    state["mixing_weights"] = rnd(len(dims), scale=1.0)
    for idx, (o, i, k) in zip((0, 2, 4), ((128, P, 3), (32, 128, 3), (out_channels, 32, 1))):
        state[f"output_head.{idx}.weight"] = rnd(o, i, k, k, scale=0.1)
        state[f"output_head.{idx}.bias"] = rnd(o, scale=0.1)
    config = {
        "model_id": "runwayml/stable-diffusion-v1-5",
        "projection_dim": P,
        "save_timestep": [0],
        "num_timesteps": 1000,
        "dims": list(dims),
        "output_resolution": 16,
        "load_resolution": 32,
        "aggregation_kwargs": {
            "use_output_head": True,
            "output_head_channels": out_channels,
            "output_head_act": act,
            "bottleneck_sequential": sequential,
            "num_norm_groups": GROUPS,
        },
        "dataset_args": {"sparse_loss": True, "control_range": (-0.5, 0.5)},
    }
    return {"step": 5000, "config": config, "aggregation_network": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}


def _save(tmp_path, checkpoint, name="probe.pt"):
    path = os.path.join(tmp_path, name)
    torch.save(checkpoint, path)
    return path


def _reference_forward(checkpoint, features, emb):
    """The original AggregationNetwork's forward, written out from the raw dict (no ReadoutProbe involved)."""
    state, config = checkpoint["aggregation_network"], checkpoint["config"]
    sequential = config["aggregation_kwargs"]["bottleneck_sequential"]
    size = features[-1].shape[-2:]  # every layer resized (bilinear) to the output resolution
    batch = torch.cat([F.interpolate(f, size=size, mode="bilinear") for f in features], dim=1)
    mixing = torch.softmax(state["mixing_weights"], dim=0)

    def conv_gn(x, pre, name, padding=0):
        x = F.conv2d(x, state[f"{pre}{name}.weight"], padding=padding)
        return F.group_norm(x, GROUPS, state[f"{pre}{name}.norm.weight"], state[f"{pre}{name}.norm.bias"])

    output, start = None, 0
    for layer, c in enumerate(config["dims"]):
        x = batch[:, start : start + c]
        start += c
        pre = f"bottleneck_layers.{layer}.0." if sequential else f"bottleneck_layers.{layer}."
        out = F.relu(conv_gn(x, pre, "conv1"))
        if not sequential:  # a Sequential-wrapped block is called without the embedding
            e = F.relu(F.linear(emb, state[pre + "emb_layers.weight"], state[pre + "emb_layers.bias"]))
            out = out + e[:, :, None, None]
        out = F.relu(conv_gn(out, pre, "conv2", padding=1))
        out = conv_gn(out, pre, "conv3")
        shortcut = conv_gn(x, pre, "shortcut") if pre + "shortcut.weight" in state else x
        out = F.relu(out + shortcut)
        output = mixing[layer] * out if output is None else output + mixing[layer] * out
    h = F.silu(F.conv2d(output, state["output_head.0.weight"], state["output_head.0.bias"], padding=1))
    h = F.silu(F.conv2d(h, state["output_head.2.weight"], state["output_head.2.bias"], padding=1))
    h = F.conv2d(h, state["output_head.4.weight"], state["output_head.4.bias"])
    return torch.tanh(h) if config["aggregation_kwargs"]["output_head_act"] else h


def _features(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, 8 if c == 64 else 16, 8 if c == 64 else 16, generator=g) for c in DIMS]


@pytest.mark.parametrize("sequential", [False, True])
def test_import_matches_original(tiny_components, tmp_path, sequential):
    unet = tiny_components["unet"]
    checkpoint = _rg_checkpoint(sequential=sequential)
    path = _save(tmp_path, checkpoint)
    probe = load_readout_guidance_checkpoint(path, unet)
    assert isinstance(probe, ReadoutProbe) and not probe.training
    cfg = probe.config
    assert list(cfg.feature_channels) == DIMS and cfg.feature_kind == "resnet"
    assert (cfg.projection_dim, probe.bottleneck_layers[0].conv1.out_channels, cfg.out_channels) == (P, B, 3)
    assert (cfg.feature_scale, cfg.upsample_head, cfg.output_activation, cfg.norm_num_groups) == (1.0, False, "tanh", GROUPS)

    # (a) every probe tensor equals its source tensor
    state = checkpoint["aggregation_network"]
    ours = probe.state_dict()
    for layer in range(len(DIMS)):
        src = f"bottleneck_layers.{layer}.0." if sequential else f"bottleneck_layers.{layer}."
        dst = f"bottleneck_layers.{layer}."
        pairs = {"conv1.weight": "conv1.weight", "conv1.norm.weight": "norm1.weight", "conv1.norm.bias": "norm1.bias",
                 "conv2.weight": "conv2.weight", "conv2.norm.weight": "norm2.weight", "conv2.norm.bias": "norm2.bias",
                 "conv3.weight": "conv3.weight", "conv3.norm.weight": "norm3.weight", "conv3.norm.bias": "norm3.bias"}
        if DIMS[layer] != P:
            pairs.update({"shortcut.weight": "shortcut.weight", "shortcut.norm.weight": "shortcut_norm.weight",
                          "shortcut.norm.bias": "shortcut_norm.bias"})
        else:
            assert probe.bottleneck_layers[layer].shortcut is None
        for s, d in pairs.items():
            assert torch.equal(ours[dst + d], state[src + s]), (src + s, dst + d)
        for s, d in (("emb_layers.weight", "time_emb_proj.weight"), ("emb_layers.bias", "time_emb_proj.bias")):
            if sequential:  # unused by the original: zeros, so that ReLU(0) = 0 adds nothing
                assert torch.count_nonzero(ours[dst + d]) == 0
            else:
                assert torch.equal(ours[dst + d], state[src + s])
    assert torch.equal(ours["mixing_weights"], state["mixing_weights"])
    for i in (0, 2, 4):
        assert torch.equal(ours[f"head.{i}.weight"], state[f"output_head.{i}.weight"])
        assert torch.equal(ours[f"head.{i}.bias"], state[f"output_head.{i}.bias"])
    for key, value in unet.time_embedding.state_dict().items():
        assert torch.equal(ours["time_embedding." + key], value)

    # (b) the output equals the original architecture's forward on the raw dict, whose trainer embedded the
    # step index 999 - t (flip_timesteps, the default; sequential blocks ignore the timestep anyway)
    feats, t = _features(), torch.tensor([30, 870])
    assert probe.config.flip_timesteps == (not sequential)
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(999 - t))
        expected = _reference_forward(checkpoint, feats, emb)
        got = probe(feats, t).sample
    assert got.shape == (2, 3, 16, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    if not sequential:  # without the flip the probe embeds t itself
        unflipped = load_readout_guidance_checkpoint(path, unet, flip_timesteps=False, task="depth")
        assert unflipped.config.task == "depth" and not unflipped.config.flip_timesteps
        assert unflipped.config.task_preset == "released"  # imported probes get the released readout mapping
        assert probe.config.task is None and probe.config.task_preset is None
        with torch.no_grad():
            expected_t = _reference_forward(checkpoint, feats, unet.time_embedding(unet.time_proj(t)))
            assert torch.allclose(unflipped(feats, t).sample, expected_t, atol=1e-5)
            assert not torch.allclose(expected_t, expected, atol=1e-3)


def test_import_without_tanh_and_roundtrip(tiny_components, tmp_path):
    unet = tiny_components["unet"]
    checkpoint = _rg_checkpoint(act=False, out_channels=5, seed=2)
    probe = load_readout_guidance_checkpoint(_save(tmp_path, checkpoint), unet)
    assert probe.config.output_activation == "none" and probe.config.out_channels == 5
    feats, t = _features(batch=1), torch.tensor([500])
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(999 - t))
        assert torch.allclose(probe(feats, t).sample, _reference_forward(checkpoint, feats, emb), atol=1e-5)
    probe.save_pretrained(os.path.join(tmp_path, "saved"))
    loaded = ReadoutProbe.from_pretrained(os.path.join(tmp_path, "saved"))
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), loaded.state_dict().values()))


def test_unmapped_missing_and_misshaped_tensors_raise(tiny_components, tmp_path):
    unet = tiny_components["unet"]
    extra = _rg_checkpoint()
    extra["aggregation_network"]["bottleneck_layers.2.conv4.weight"] = torch.zeros(1)
    extra["aggregation_network"]["logit_scale"] = torch.zeros(())
    with pytest.raises(ValueError, match=r"no place in ReadoutProbe: \['bottleneck_layers.2.conv4.weight', 'logit_scale'\]"):
        load_readout_guidance_checkpoint(_save(tmp_path, extra), unet)

    missing = _rg_checkpoint()
    del missing["aggregation_network"]["bottleneck_layers.3.conv2.norm.bias"]
    with pytest.raises(ValueError, match=r"does not fill: \['bottleneck_layers.3.norm2.bias'\]"):
        load_readout_guidance_checkpoint(_save(tmp_path, missing), unet)

    # a shortcut where the probe has none (32 channels == projection): unmapped, not silently dropped
    stray = _rg_checkpoint()
    stray["aggregation_network"]["bottleneck_layers.4.shortcut.weight"] = torch.zeros(P, 32, 1, 1)
    with pytest.raises(ValueError, match="bottleneck_layers.4.shortcut.weight"):
        load_readout_guidance_checkpoint(_save(tmp_path, stray), unet)

    shaped = _rg_checkpoint()
    shaped["aggregation_network"]["bottleneck_layers.1.conv2.weight"] = torch.zeros(B, B, 1, 1)
    with pytest.raises(ValueError, match=r"'bottleneck_layers.1.conv2.weight' has shape \(8, 8, 1, 1\).*\(8, 8, 3, 3\)"):
        load_readout_guidance_checkpoint(_save(tmp_path, shaped), unet)

    emb = _rg_checkpoint()  # a checkpoint for a UNet with another embedding width
    emb["aggregation_network"]["bottleneck_layers.0.emb_layers.weight"] = torch.zeros(B, 1280)
    with pytest.raises(ValueError, match="'bottleneck_layers.0.emb_layers.weight' has shape"):
        load_readout_guidance_checkpoint(_save(tmp_path, emb), unet)

    mixed = _rg_checkpoint(sequential=True)
    mixed["config"]["aggregation_kwargs"]["bottleneck_sequential"] = False
    with pytest.raises(ValueError, match="bottleneck_sequential=False but its keys"):
        load_readout_guidance_checkpoint(_save(tmp_path, mixed), unet)


def test_config_problems_raise(tiny_components, tmp_path):
    unet = tiny_components["unet"]
    multi = _rg_checkpoint()
    multi["config"]["save_timestep"] = [0, 10]
    with pytest.raises(ValueError, match="2 timesteps.*only single-timestep"):
        load_readout_guidance_checkpoint(_save(tmp_path, multi), unet)

    other_unet = _rg_checkpoint(dims=[1280] * 3)
    with pytest.raises(ValueError, match=r"channels \[1280, 1280, 1280\].*\[64, 64, 64, 32, 32, 32\]"):
        load_readout_guidance_checkpoint(_save(tmp_path, other_unet), unet)

    attention_dims = _rg_checkpoint(dims=[64, 64, 64])  # the tiny UNet's attention channels
    with pytest.raises(ValueError, match="feature_kind='attention'"):
        load_readout_guidance_checkpoint(_save(tmp_path, attention_dims), unet)
    probe = load_readout_guidance_checkpoint(_save(tmp_path, attention_dims), unet, feature_kind="attention")
    assert probe.config.feature_kind == "attention"

    no_head = _rg_checkpoint()
    no_head["config"]["aggregation_kwargs"]["use_output_head"] = False
    with pytest.raises(ValueError, match="no output head"):
        load_readout_guidance_checkpoint(_save(tmp_path, no_head), unet)

    with pytest.raises(ValueError, match="expected a dict with 'config' and 'aggregation_network'"):
        load_readout_guidance_checkpoint(_save(tmp_path, {"state_dict": {}}), unet)
    with pytest.raises(FileNotFoundError):
        load_readout_guidance_checkpoint(os.path.join(tmp_path, "absent.pt"), unet)


def test_file_needing_pickle_requires_opt_in(tiny_components, tmp_path):
    unet = tiny_components["unet"]
    checkpoint = _rg_checkpoint()
    checkpoint["config"]["args"] = argparse.Namespace(lr=1e-3)  # not loadable with weights_only=True
    path = _save(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_readout_guidance_checkpoint(path, unet)
    probe = load_readout_guidance_checkpoint(path, unet, trust_pickle=True)
    assert torch.equal(probe.mixing_weights.data, checkpoint["aggregation_network"]["mixing_weights"])


def test_command_line_writes_save_pretrained_folder(tiny_pipeline_path, tmp_path):
    path = _save(tmp_path, _rg_checkpoint(seed=4))
    out = os.path.join(tmp_path, "probe")
    convert_main(["--checkpoint", path, "--pretrained_model_name_or_path", tiny_pipeline_path, "--output_dir", out])
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    probe = ReadoutProbe.from_pretrained(out)
    assert torch.equal(probe.mixing_weights.data, _rg_checkpoint(seed=4)["aggregation_network"]["mixing_weights"])
    # an imported LineArt probe records the released preset, and so passes its check under it and not under paper
    from diffusers_innercontrol.tasks import check_probe_task, get_task

    lineart = os.path.join(tmp_path, "lineart")
    convert_main(["--checkpoint", path, "--pretrained_model_name_or_path", tiny_pipeline_path, "--output_dir", lineart,
                  "--task", "lineart"])
    config = ReadoutProbe.from_pretrained(lineart).config
    assert (config.task, config.task_preset) == ("lineart", "released")
    check_probe_task(config, get_task("lineart", "released"))
    with pytest.raises(ValueError, match="--preset released"):
        check_probe_task(config, get_task("lineart", "paper"))


def test_loader_builds_the_given_class_with_every_option(tiny_components, tmp_path):
    """`probe_class`, the pickle opt-in, the feature kind and the other keyword arguments all reach the probe."""
    from diffusers_innercontrol.features import decoder_feature_channels

    unet = tiny_components["unet"]

    class MyProbe(ReadoutProbe):
        pass

    pickled = _rg_checkpoint()
    pickled["config"]["args"] = argparse.Namespace(lr=1e-3)  # needs a full unpickling
    path = _save(tmp_path, pickled, "pickled.pt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_readout_guidance_checkpoint(path, unet)
    probe = load_readout_guidance_checkpoint(path, unet, trust_pickle=True, flip_timesteps=False, task="depth",
                                             probe_class=MyProbe)
    assert type(probe) is MyProbe
    assert probe.config.flip_timesteps is False and probe.config.task == "depth"
    attention = _rg_checkpoint(dims=decoder_feature_channels(unet, "attention"), seed=1)
    probe = load_readout_guidance_checkpoint(_save(tmp_path, attention, "attention.pt"), unet, feature_kind="attention")
    assert type(probe) is ReadoutProbe
    assert probe.config.feature_kind == "attention"
