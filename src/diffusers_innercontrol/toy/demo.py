# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Offline demo assets for the quickstart: `python -m diffusers_innercontrol.toy.demo ./demo`.

Writes, with no network:
- `tiny-sd/`: the tiny SD1.5-shaped ControlNet pipeline (`tiny.save_tiny_pipeline`, random weights);
- `shapes/`: a ShapesWorld image folder (image, caption, and an exact control for every task) for
  `--train_data_dir`;
- `reward-<task>/`: tiny reward models in the real models' file formats, for `--reward_model_name_or_path`.

The models are random: the demo shows the whole workflow runs end to end (probe training, InnerControl
training, validation readouts, model cards), not what the method achieves.
"""

import argparse
import os

from ..tasks import TASK_NAMES


def write_demo_assets(path: str, num_samples: int = 64, image_size: int = 64, seed: int = 0, tasks=TASK_NAMES) -> dict:
    """Write the demo assets under `path` and return their paths by name."""
    from .shapesworld import ShapesWorld
    from .tiny import save_tiny_pipeline, save_tiny_reward_model

    os.makedirs(path, exist_ok=True)
    out = {"pipeline": save_tiny_pipeline(os.path.join(path, "tiny-sd"), seed=seed)}
    out["data"] = ShapesWorld(size=image_size, seed=seed).save_imagefolder(os.path.join(path, "shapes"), num_samples)
    for task in tasks:
        out[f"reward-{task}"] = save_tiny_reward_model(task, os.path.join(path, f"reward-{task}"), seed=seed)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the offline demo assets of the quickstart.")
    parser.add_argument("path", help="Folder to write tiny-sd/, shapes/ and reward-<task>/ into.")
    parser.add_argument("--num_samples", type=int, default=64, help="ShapesWorld samples to write.")
    parser.add_argument("--image_size", type=int, default=64, help="ShapesWorld image size (multiple of 8, >= 32).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES,
                        help="Tasks to write tiny reward models for.")
    args = parser.parse_args(argv)
    for name, where in write_demo_assets(args.path, args.num_samples, args.image_size, args.seed, args.tasks).items():
        print(f"{name:>22}: {where}")


if __name__ == "__main__":
    main()
