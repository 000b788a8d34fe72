"""The offline tiny SD1.5-shaped models: saved with save_pretrained, loaded and run with no network."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from diffusers_innercontrol.toy.tiny import build_sd15_unet, build_tiny_components
from diffusers_innercontrol.training import conditioning_channels_for


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_saved_layout(tiny_pipeline_path):
    index = json.load(open(os.path.join(tiny_pipeline_path, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    for name in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_pipeline_path, name)), name
        assert index[name][0] is not None, name
    weights = []
    for root, _, files in os.walk(tiny_pipeline_path):
        weights += [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth"))]
    assert weights and all(f.endswith(".safetensors") for f in weights)
    assert not os.path.exists(os.path.join(tiny_pipeline_path, "_tokenizer_src"))


def test_pipeline_loads_offline_and_generates(tiny_pipeline_path, no_network):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_pipeline_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    assert list(pipe.unet.config.block_out_channels) == [32, 64]
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = pipe(
        "a red square", image=control, height=32, width=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    # the ControlNet alone loads from its subfolder, as scripts' --controlnet_model_name_or_path does
    controlnet = ControlNetModel.from_pretrained(os.path.join(tiny_pipeline_path, "controlnet"))
    for (name, a), (_, b) in zip(controlnet.state_dict().items(), pipe.controlnet.state_dict().items()):
        assert torch.equal(a, b), name


def test_tokenizer_and_text_encoder(tiny_pipeline_path, no_network):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tiny_pipeline_path, "tokenizer"))
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    # byte-level BPE without merges: one token per character, "</w>" closing each word
    assert tokenizer.convert_ids_to_tokens(ids[:6]) == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "<|endoftext|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat"
    long = tokenizer("x" * 200, truncation=True, max_length=77).input_ids
    assert len(long) == 77
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(tiny_pipeline_path, "text_encoder"))
    assert max(ids) < text_encoder.config.vocab_size
    with torch.no_grad():
        hidden = text_encoder(torch.tensor([ids]))[0]
    assert hidden.shape == (1, 77, 32)


def test_components_are_deterministic_and_consistent(tiny_components):
    a, b = build_tiny_components(seed=3), build_tiny_components(seed=3)
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert not torch.equal(a["unet"].conv_in.weight, tiny_components["unet"].conv_in.weight)  # seed 0 differs
    # latents 16 px from 32 px images; the ControlNet's conditioning embedding brings a 32 px control to 16 px
    assert a["unet"].config.cross_attention_dim == a["text_encoder"].config.hidden_size == 32
    with torch.no_grad():
        latents = a["vae"].encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        cond = a["controlnet"].controlnet_cond_embedding(torch.zeros(1, 3, 32, 32))
    assert latents.shape == (1, 4, 16, 16) and cond.shape[-2:] == (16, 16)
    # ControlNet output convs are not zero (so tests see its effect and gradients)
    assert any(p.abs().sum() > 0 for p in a["controlnet"].controlnet_down_blocks.parameters())


def test_conditioning_channels_for():
    assert conditioning_channels_for(8) == (16, 32, 96, 256)  # SD1.5: 512 px control -> 64 px latent
    assert conditioning_channels_for(2) == (16, 32)
    assert conditioning_channels_for(1) == (16,)


def test_sd15_unet_config_is_sd15():
    unet = build_sd15_unet("meta")
    assert next(unet.parameters()).is_meta
    # the published SD1.5 UNet has 859,520,964 parameters
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
