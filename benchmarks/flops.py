#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The cost model of a training step, from multiply-accumulates counted on the 'meta' device (no weights, no
download, seconds on a CPU): SD1.5 at 512 px and SDXL at 1024 px.

Each component's forward is counted once for one sample (`torch.utils.flop_counter.FlopCounterMode`): the
ControlNet, the UNet (with SDXL's pooled text embedding and size / crop ids), the VAE decode at full resolution,
the reward network (controlnet_aux's HED architecture) and the task's readout probe on the UNet's decoder
features. With a trained ControlNet (backward ~2x its forward) and a frozen UNet, VAE, reward network and probe
(backward ~1x forward: input gradients only), a step costs per sample `3 CN + 2 UNet`, plus `2 (decode + reward)`
per sample inside the reward window and `2 probe` per sample inside the alignment window:

    python benchmarks/flops.py --model sd15
    python benchmarks/flops.py --model sdxl --json flops_sdxl.json
"""

import argparse
import json
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe
from diffusers_innercontrol.rewards import build_hed_network
from diffusers_innercontrol.tasks import get_task
from diffusers_innercontrol.toy.tiny import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

# SD1.5's and SDXL's autoencoders have the same layout (SDXL's was retrained, not resized)
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
)
MODELS = {  # name: (UNet config, resolution, text width, pooled width)
    "sd15": (SD15_UNET_CONFIG, 512, 768, None),
    "sdxl": (SDXL_UNET_CONFIG, 1024, 2048, 1280),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The FLOP cost model of InnerControl's training step (meta device).")
    p.add_argument("--model", default="sdxl", choices=list(MODELS))
    p.add_argument("--task", default="hed", help="Whose probe (feature kind, scale, head) is counted.")
    p.add_argument("--task_preset", default="paper", choices=("paper", "released"))
    p.add_argument("--reward_share", type=float, default=0.2, help="Share of samples inside the reward window.")
    p.add_argument("--alignment_share", type=float, default=0.8, help="Share of samples inside the alignment window.")
    p.add_argument("--json", default=None, help="Write the numbers here.")
    return p.parse_args(argv)


def gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def count(model: str, task) -> Dict[str, float]:
    """GMACs per sample of each component's forward."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    unet_config, resolution, text_width, pooled_width = MODELS[model]
    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        reward = build_hed_network()
        probe = ReadoutProbe.from_unet(unet, **task.probe_kwargs())
        x = torch.zeros(1, 4, latent, latent)
        t = torch.full((1,), 100, dtype=torch.long)
        ehs = torch.zeros(1, 77, text_width)
        control = torch.zeros(1, 3, resolution, resolution)
        added = None
        if pooled_width is not None:  # SDXL: the pooled text embedding and (original size, crop, target size)
            added = {"text_embeds": torch.zeros(1, pooled_width), "time_ids": torch.zeros(1, 6)}
        out = {}
        with torch.no_grad():
            out["controlnet"] = gmacs(lambda: controlnet(x, t, encoder_hidden_states=ehs, controlnet_cond=control,
                                                         added_cond_kwargs=added, return_dict=False))
            with DecoderFeatureExtractor(unet, task.feature_kind) as extractor:
                out["unet"] = gmacs(lambda: unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False))
                features = extractor.pop()
            out["probe"] = gmacs(lambda: probe(features, t, return_dict=False))
            out["vae_decode"] = gmacs(lambda: vae.decode(x, return_dict=False))
            out["reward_model"] = gmacs(lambda: reward(control))
    return {k: round(v, 2) for k, v in out.items()}


def predicted_ratios(g: Dict[str, float], reward_share: float, alignment_share: float) -> Dict[str, float]:
    """The cost model's step ratios to plain ControlNet training (see the module docstring)."""
    base = 3 * g["controlnet"] + 2 * g["unet"]
    reward = 2 * (g["vae_decode"] + g["reward_model"])
    probe = 2 * g["probe"]
    return {
        "controlnet++_full": round((base + reward) / base, 2),
        "controlnet++_masked": round((base + reward_share * reward) / base, 2),
        "innercontrol": round((base + reward_share * reward + alignment_share * probe) / base, 2),
        "alignment_only": round((base + alignment_share * probe) / base, 2),
    }


def main(argv=None):
    args = parse_args(argv)
    task = get_task(args.task, args.task_preset)
    g = count(args.model, task)
    ratios = predicted_ratios(g, args.reward_share, args.alignment_share)
    print(f"# {args.model} at {MODELS[args.model][1]} px, task {task.name}/{task.preset} (probe: {task.feature_kind} "
          f"features, scale {task.feature_scale}); GMACs per sample, forward:")
    print("| " + " | ".join(g) + " |\n|" + "---:|" * len(g) + "\n| " + " | ".join(f"{v:g}" for v in g.values()) + " |")
    print(f"\npredicted step ratios to ControlNet (reward window {args.reward_share:.0%} of the samples, alignment "
          f"window {args.alignment_share:.0%}): " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "task": task.name, "preset": task.preset, "gmacs_per_sample": g,
                       "reward_share": args.reward_share, "alignment_share": args.alignment_share,
                       "predicted_ratio_to_controlnet": ratios}, f, indent=1)
    return g, ratios


if __name__ == "__main__":
    main()
