#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Train ShapesWorld's toy reward models and evaluation models on the exact controls (issue 5).

The paper rewards with one model and evaluates with a stronger, separately trained one (ControlNet++'s
DPT-Hybrid reward vs DPT-Large evaluator; UperNet vs Mask2Former). In ShapesWorld the labels are exact (they
come from the scene), so both are trained here, in the transformers formats the project already reads:

- depth: `DPTForDepthEstimation` (`toy.tiny.tiny_depth_config` scaled), MSE of `predicted_depth` against the
  control's depth (brighter = nearer, in [0, 1]) at the model's output size;
- segmentation: `UperNetForSemanticSegmentation` with 150 ADE20K labels (`toy.tiny.tiny_segmentation_config`
  scaled), cross-entropy against ShapesWorld's class map;
- hed, lineart: a small `DPTForDepthEstimation` trained (MSE) to draw the exact soft edges / lines, loaded as
  `rewards.EdgeMapReward` (controlnet_aux's HED and LineArt networks have fixed widths: 59 MB and 17 MB of
  weights, too large to ship with the toy world). The evaluation model learns, like the control, to ignore
  background textures (stripes, checks, gradients), which a fixed edge operator such as Sobel counts as edges;
  it is scored with SSIM against the control, as the paper scores HED and LineArt.

`--model_kind reward` is the weaker model (the tiny widths, seed 0, fewer steps); `--model_kind eval` the
stronger one (twice the widths, more layers, seed 1, more steps by default). Both go through the same
wrappers that use them later (`rewards.DepthReward` / `SegmentationReward` / `EdgeMapReward`), so they are
trained on exactly the preprocessing they see at reward and evaluation time.

    python train_toy_evaluators.py --task depth --model_kind reward --output_dir toy-depth-reward
    python train_toy_evaluators.py --task depth --model_kind eval --output_dir toy-depth-eval

The result loads with `rewards.load_reward_model("depth", "toy-depth-reward")` and
`evaluation.DepthEvaluator.from_pretrained("toy-depth-eval")`.
"""

import argparse
import json
import logging
import os
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_toy_evaluators")

TASKS = ("depth", "segmentation", "hed", "lineart")
EDGE_TASKS = ("hed", "lineart")
KINDS = ("reward", "eval")
DEFAULT_STEPS = {"reward": 500, "eval": 1500}
DEFAULT_SEEDS = {"reward": 0, "eval": 1}


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train ShapesWorld's toy reward / evaluation models on exact controls.")
    parser.add_argument("--task", type=str, required=True, choices=TASKS)
    parser.add_argument("--model_kind", type=str, default="reward", choices=KINDS,
                        help="'reward': the weaker model used in training; 'eval': the stronger, separately trained evaluator.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default: 500 reward, 1500 eval).")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the weights and data order (default: 0 reward, 1 eval).")
    parser.add_argument("--resolution", type=int, default=64, help="ShapesWorld image size (the model's input size).")
    parser.add_argument("--world_seed", type=int, default=0, help="ShapesWorld seed (the same world as the toy SD's).")
    parser.add_argument("--num_train_samples", type=int, default=4000,
                        help="Distinct training scenes (indices [start, start + N)), rendered once and reused.")
    parser.add_argument("--start_index", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--width_multiplier", type=int, default=None, help="Widths x this (default: 1 reward, 2 eval).")
    parser.add_argument("--num_eval_samples", type=int, default=64,
                        help="Held-out scenes (after the training ones) scored at the end (written to metrics.json).")
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    args = parser.parse_args(input_args)
    for name in ("resolution", "num_train_samples", "train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    if args.resolution % 8:
        parser.error(f"--resolution {args.resolution} must be a multiple of 8 (the DPT patch size).")
    args.steps = DEFAULT_STEPS[args.model_kind] if args.steps is None else args.steps
    args.seed = DEFAULT_SEEDS[args.model_kind] if args.seed is None else args.seed
    args.width_multiplier = args.width_multiplier or (1 if args.model_kind == "reward" else 2)
    if args.steps < 0:
        parser.error("--steps must be >= 0.")
    return args


# --------------------------------------------------------------------------------------------- models
def depth_config(resolution: int, width_multiplier: int = 1, num_hidden_layers: Optional[int] = None):
    """`toy.tiny.tiny_depth_config()` at `resolution` px with every width times `width_multiplier`."""
    from diffusers_innercontrol.toy.tiny import tiny_depth_config

    m = int(width_multiplier)
    config = tiny_depth_config()
    config.image_size = resolution
    config.hidden_size *= m
    config.num_attention_heads *= m
    config.intermediate_size = 4 * config.hidden_size
    config.neck_hidden_sizes = [c * m for c in config.neck_hidden_sizes]
    config.fusion_hidden_size *= m
    config.initializer_range = 0.02 * (1 + 4 / m)  # a live ReLU head at init (see tiny_depth_config)
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    return config


def segmentation_config(width_multiplier: int = 1, num_labels: int = 150):
    """`toy.tiny.tiny_segmentation_config()` with every width times `width_multiplier` (2 blocks a stage when > 1)."""
    from diffusers_innercontrol.toy.tiny import tiny_segmentation_config

    m = int(width_multiplier)
    config = tiny_segmentation_config(num_labels)
    config.backbone_config.hidden_sizes = [c * m for c in config.backbone_config.hidden_sizes]
    if m > 1:
        config.backbone_config.depths = [2, 2, 2, 2]
    config.hidden_size *= m
    config.auxiliary_in_channels = config.backbone_config.hidden_sizes[2]
    config.auxiliary_channels *= m
    return config


def build_model(task: str, kind: str, resolution: int, width_multiplier: int):
    """The wrapper used at reward / evaluation time around a freshly initialised network (in the global RNG)."""
    from diffusers_innercontrol import rewards

    if task == "depth":
        from transformers import DPTForDepthEstimation

        layers = None if kind == "reward" else 6
        return rewards.DepthReward(DPTForDepthEstimation(depth_config(resolution, width_multiplier, layers)))
    if task == "segmentation":
        from transformers import UperNetForSemanticSegmentation

        return rewards.SegmentationReward(UperNetForSemanticSegmentation(segmentation_config(width_multiplier)))
    from transformers import DPTForDepthEstimation

    layers = None if kind == "reward" else 6
    return rewards.EdgeMapReward(DPTForDepthEstimation(depth_config(resolution, width_multiplier, layers)), task)


def network_of(wrapper):
    """The trainable network inside a reward wrapper (the wrapper itself stays in eval mode by design)."""
    return wrapper.network if hasattr(wrapper, "network") else wrapper.model


# --------------------------------------------------------------------------------------------- data
def render_set(task: str, resolution: int, world_seed: int, start: int, n: int):
    """`(images (N, 3, H, W) in [0, 1], targets)`: depth/hed/lineart `(N, 1, H, W)` in [0, 1], segmentation `(N, H, W)` long."""
    import numpy as np

    from diffusers_innercontrol.toy.shapesworld import ShapesWorld

    world = ShapesWorld(size=resolution, seed=world_seed)
    images, targets = [], []
    for i in range(start, start + n):
        s = world.sample(i)
        images.append(torch.from_numpy(np.asarray(s["image"], dtype=np.float32) / 255.0).permute(2, 0, 1))
        if task == "segmentation":
            targets.append(torch.from_numpy(np.asarray(s["classes"]).astype(np.int64)))
        else:
            control = s["control_depth"] if task == "depth" else s[task]
            targets.append(torch.from_numpy(np.asarray(control, dtype=np.float32) / 255.0).mean(-1)[None])
    return torch.stack(images), torch.stack(targets)


def task_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample training loss: MSE at the output's size (depth, edges), cross-entropy (segmentation)."""
    if task == "segmentation":
        logits = F.interpolate(output.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, reduction="none").mean((1, 2))
    target = F.interpolate(target, size=output.shape[-2:], mode="bilinear", align_corners=False)
    return (output.float() - target).pow(2).mean((1, 2, 3))


@torch.no_grad()
def score(task: str, wrapper, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 32) -> dict:
    """Held-out loss, and pixel accuracy for segmentation."""
    losses, correct, total = [], 0, 0
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], targets[i : i + batch_size]
        out = wrapper(x)
        losses.append(task_loss(task, out, y))
        if task == "segmentation":
            pred = F.interpolate(out.float(), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            correct += (pred == y).sum().item()
            total += y.numel()
    result = {"loss": torch.cat(losses).mean().item() if losses else None}
    if task == "segmentation" and total:
        result["pixel_accuracy"] = correct / total
    return result


def save(task: str, wrapper, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    network = network_of(wrapper)
    network.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


# --------------------------------------------------------------------------------------------- training
def main(args) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    wrapper = build_model(args.task, args.model_kind, args.resolution, args.width_multiplier).to(device)
    network = network_of(wrapper)
    network.train()
    n_params = sum(p.numel() for p in network.parameters())
    logger.info(f"{args.task} {args.model_kind} model: {n_params / 1e6:.2f} M parameters, seed {args.seed}, {args.steps} steps")

    t0 = time.perf_counter()
    images, targets = render_set(args.task, args.resolution, args.world_seed, args.start_index, args.num_train_samples)
    held_start = args.start_index + args.num_train_samples
    eval_images, eval_targets = render_set(args.task, args.resolution, args.world_seed, held_start, args.num_eval_samples)
    logger.info(f"rendered {len(images)} + {len(eval_images)} scenes in {time.perf_counter() - t0:.1f} s")

    optimizer = torch.optim.AdamW(network.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, min(100, args.steps // 10))))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor, last = 0, None
    for step in range(args.steps):
        if cursor + args.train_batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        idx = order[cursor : cursor + args.train_batch_size]
        cursor += args.train_batch_size
        x, y = images[idx].to(device), targets[idx].to(device)
        loss = task_loss(args.task, wrapper(x), y).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        last = loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            logger.info(f"step {step + 1}/{args.steps}: loss {last:.5f}")
    network.eval()
    metrics = score(args.task, wrapper.to("cpu"), eval_images, eval_targets)
    path = save(args.task, wrapper, args.output_dir)
    summary = dict(task=args.task, model_kind=args.model_kind, seed=args.seed, steps=args.steps, resolution=args.resolution,
                   width_multiplier=args.width_multiplier, parameters=n_params, last_train_loss=last,
                   held_out=metrics, held_out_indices=[held_start, held_start + args.num_eval_samples],
                   train_indices=[args.start_index, held_start], world_seed=args.world_seed,
                   seconds=round(time.perf_counter() - t0, 1), weights=path)
    with open(os.path.join(args.output_dir, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(f"saved {path}; held-out {metrics}")
    return summary


if __name__ == "__main__":
    main(parse_args())
