# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Model presets of the benchmarks: random weights, built from configs (no download).

| preset | UNet | VAE | default resolution | reward stand-in |
|---|---|---|---|---|
| tiny  | `tiny.TINY_UNET_CONFIG` (32, 64), 2 levels | (16, 32), scale factor 2 | 32 px | HED architecture, widths / 16 |
| small | SD1.5 layout scaled down: (64, 128, 256), 3 levels, ~18 M parameters | (24, 48, 96, 96), scale 8 | 128 px | HED architecture, widths / 5 |
| sd15  | `tiny.SD15_UNET_CONFIG` (860 M) | the SD1.5 VAE config (83 M) | 512 px | `ControlNetHED_Apache2` (14.7 M) |
| sdxl  | `tiny.SDXL_UNET_CONFIG` (2.6 B) | SDXL's VAE: SD1.5's layout, scaling factor 0.13025 | 1024 px | `ControlNetHED_Apache2` (14.7 M) |
| tiny_sdxl | `tiny.TINY_SDXL_UNET_CONFIG` (32, 64), SDXL's conditioning | as tiny | 32 px | as tiny |

The SDXL presets add SDXL's conditioning to every UNet and ControlNet call: a random pooled text embedding and the
size / crop ids of the resolution (`added_cond_kwargs`); tiny_sdxl is there to test that path on a CPU.

The small preset keeps the cost ratios of SD1.5 at 512 px that decide the benchmark's ratios: one VAE
decode costs about 3x one UNet forward (3.1x for SD1.5), the reward network about 0.2x (counted with
`torch.utils.flop_counter`, see docs/performance.md). Its probe is scaled like its UNet
(`projection_dim=64, head_channels=(32, 8)`).

The reward stand-in is `rewards.HEDReward` (the same differentiable wrapper training uses) around the HED
network architecture. For sd15 it is controlnet_aux's `ControlNetHED_Apache2` itself when controlnet_aux is
installed; `ScaledHEDNetwork` below is the same architecture with configurable widths, written here because
controlnet_aux's class has fixed widths (the smaller presets need narrower ones to keep the ratio) and the
GPU machine may not have controlnet_aux. Text encoding is outside the timed step: the text embeddings are
random tensors of the UNet's cross-attention width, so no text encoder is built.
"""

import importlib
import os
import sys
import warnings
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = ("tiny", "small", "sd15", "sdxl", "tiny_sdxl")
HED_WIDTHS = (64, 128, 256, 512, 512)  # ControlNetHED_Apache2
HED_LAYERS = (2, 2, 3, 3, 3)

SMALL_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(64, 128, 256),
    cross_attention_dim=256,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=16,
)

SD15_VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SMALL_VAE_CONFIG = dict(SD15_VAE_CONFIG, block_out_channels=(24, 48, 96, 96), norm_num_groups=8, sample_size=128)
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025)

PRESET_SETTINGS = {
    "tiny": dict(resolution=32, hed_widths=(4, 8, 16, 32, 32), probe_kwargs=dict(projection_dim=32, norm_num_groups=8)),
    "small": dict(
        resolution=128,
        hed_widths=(12, 24, 48, 96, 96),
        probe_kwargs=dict(projection_dim=64, norm_num_groups=8, head_channels=(32, 8)),
    ),
    "sd15": dict(resolution=512, hed_widths=HED_WIDTHS, probe_kwargs={}),
    "sdxl": dict(resolution=1024, hed_widths=HED_WIDTHS, probe_kwargs={}),
}
PRESET_SETTINGS["tiny_sdxl"] = PRESET_SETTINGS["tiny"]


def _src_on_path():
    """Let `python benchmarks/x.py` run from a checkout where the package is not installed."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    if os.path.isdir(src) and src not in sys.path:
        try:
            importlib.import_module("diffusers_innercontrol")
        except ImportError:
            sys.path.insert(0, src)


_src_on_path()


class _HEDStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, side_channels: int):
        super().__init__()
        convs = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
        convs += [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(num_layers - 1)]
        self.convs = nn.ModuleList(convs)
        self.projection = nn.Conv2d(out_channels, side_channels, 1)

    def forward(self, x, down_sampling: bool = False):
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ScaledHEDNetwork(nn.Module):
    """
    The HED network architecture of ControlNet (`ControlNetHED_Apache2`: five VGG stages of 2, 2, 3, 3, 3
    3x3 convolutions, max-pooling between stages, a 1x1 side projection per stage) with configurable widths.
    Returns the five side outputs, as `ControlNetHED_Apache2` does, so that `rewards.HEDReward` wraps it.

    Args:
        widths (`Sequence[int]`): Channels of the five stages ((64, 128, 256, 512, 512) for the real one).
        side_channels (`int`): Channels of each side output (1 for edges; the class count for a
            segmentation stand-in).
    """

    def __init__(self, widths: Sequence[int] = HED_WIDTHS, side_channels: int = 1):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        stages, previous = [], 3
        for width, layers in zip(widths, HED_LAYERS):
            stages.append(_HEDStage(previous, width, layers, side_channels))
            previous = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        h = x - self.norm
        sides = []
        for i, stage in enumerate(self.stages):
            h, side = stage(h, down_sampling=i > 0)
            sides.append(side)
        return tuple(sides)


class SegmentationStandIn(nn.Module):
    """Logits `(B, K, H, W)`: the mean of the resized side outputs of a HED-architecture network with K channels."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images):
        x = images.to(next(self.parameters()).dtype) * 255.0
        size = x.shape[-2:]
        sides = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in self.network(x)]
        return torch.stack(sides, 0).mean(0)


def _hed_network(widths: Sequence[int], side_channels: int = 1) -> nn.Module:
    network = None
    if tuple(widths) == HED_WIDTHS and side_channels == 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                network = importlib.import_module("controlnet_aux.hed").ControlNetHED_Apache2()
        except ImportError:
            network = None
    if network is None:
        network = ScaledHEDNetwork(widths, side_channels)
    with torch.no_grad():
        # Random VGG weights on inputs in [0, 255] saturate the sigmoid: centre and scale the input as a
        # trained network would (the same step as rewards.save_tiny_reward_model).
        network.norm.fill_(127.5)
        first = network.block1.convs[0] if hasattr(network, "block1") else network.stages[0].convs[0]
        first.weight.div_(127.5)
    return network


def build_reward_model(task, widths: Sequence[int]) -> nn.Module:
    """A frozen reward stand-in for `task`: `rewards.HEDReward` around a HED-architecture network."""
    if task.is_segmentation:
        model = SegmentationStandIn(_hed_network(widths, side_channels=task.num_classes or 150))
    else:
        from diffusers_innercontrol.rewards import HEDReward

        model = HEDReward(_hed_network(widths))
    model.requires_grad_(False)
    return model.eval()


def count_parameters(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_preset(
    name: str,
    task,
    device="cpu",
    weight_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_probe: bool = True,
    with_reward: bool = True,
) -> Dict:
    """
    Build the models of a preset for the stage-2 benchmark.

    Returns a dict: unet, controlnet (float32, train mode, trainable), vae, reward_model, probe (frozen,
    `weight_dtype`), noise_scheduler, cross_attention_dim, pooled_text_dim (SDXL's pooled text embedding width;
    None without SDXL conditioning), vae_scale_factor, resolution (the preset's default), parameters (counts per
    model).
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from diffusers_innercontrol import ReadoutProbe
    from diffusers_innercontrol.toy.tiny import (
        SD15_SCHEDULER_CONFIG,
        SD15_UNET_CONFIG,
        SDXL_UNET_CONFIG,
        TINY_SDXL_UNET_CONFIG,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
        conditioning_channels_for,
    )

    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    unet_config = {"tiny": TINY_UNET_CONFIG, "small": SMALL_UNET_CONFIG, "sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG,
                   "tiny_sdxl": TINY_SDXL_UNET_CONFIG}[name]
    vae_config = {"tiny": TINY_VAE_CONFIG, "small": SMALL_VAE_CONFIG, "sd15": SD15_VAE_CONFIG, "sdxl": SDXL_VAE_CONFIG,
                  "tiny_sdxl": TINY_VAE_CONFIG}[name]
    settings = PRESET_SETTINGS[name]

    # Built directly on the device: random initialisation of the 1.3 B parameters of sd15 takes tens of
    # seconds on a CPU and a fraction of a second on a GPU.
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    conditioning_channels = conditioning_channels_for(vae_scale_factor)  # (outside the device context)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels)
        # from_unet zero-initialises the ControlNet's output convolutions: with zeros the UNet ignores the
        # ControlNet's residuals on the first steps. Small random values make every step a typical one.
        with torch.no_grad():
            for p in list(controlnet.controlnet_down_blocks.parameters()) + list(
                controlnet.controlnet_mid_block.parameters()
            ):
                p.normal_(0.0, 0.02)
        probe = None
        if with_probe:
            probe = ReadoutProbe.from_unet(unet, **task.probe_kwargs(), **settings["probe_kwargs"])
        reward_model = build_reward_model(task, settings["hed_widths"]) if with_reward else None

    for frozen in (unet, vae, probe, reward_model):
        if frozen is not None:
            frozen.requires_grad_(False)
            frozen.to(device=device)
            if weight_dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
                frozen.to(dtype=weight_dtype)
    controlnet.to(device=device)
    controlnet.train()
    noise_scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    return dict(
        unet=unet,
        controlnet=controlnet,
        vae=vae,
        reward_model=reward_model,
        probe=probe,
        noise_scheduler=noise_scheduler,
        cross_attention_dim=unet.config.cross_attention_dim,
        pooled_text_dim=(unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                         if unet.config.addition_embed_type == "text_time" else None),
        vae_scale_factor=vae_scale_factor,
        resolution=settings["resolution"],
        parameters={
            "unet": count_parameters(unet),
            "controlnet": count_parameters(controlnet),
            "vae": count_parameters(vae),
            "vae_decoder": count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv),
            "reward_model": count_parameters(reward_model),
            "probe": probe.num_probe_parameters if probe is not None else 0,
        },
    )


def write_report(report: Dict, table: str, json_path=None, markdown_path=None) -> None:
    """Write a benchmark's results as JSON and its markdown table (each when a path is given)."""
    import json
    import os

    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")
