#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Does readout guidance help, under every scheduler? A paired measurement on held-out ShapesWorld scenes.

For each scheduler and each `readout_guidance_scale`, the bundled toy SD + ControlNet + probe of a task draw one
image per held-out scene (seed = scene index, so scale 0 and every scale > 0 start from the same noise), and the
task's separately trained evaluator (`eval-<task>`, not the probe and not the reward model) scores each image
against the scene's exact control. Every scale is compared with scale 0 of the same scheduler, scene by scene:
the mean change, how many scenes improved, and a two-sided Wilcoxon signed-rank p-value. Image quality: the share
of decoded pixels outside [-1, 1] before the pipeline clips them (guidance that pushes latents off the data
manifold shows up there first), against scale 0.

    python examples/innercontrol/shapesworld/readout_guidance_study.py --output_dir guidance-study
    python examples/innercontrol/shapesworld/readout_guidance_study.py --output_dir pilot --num_scenes 16 \\
        --schedulers pndm,ddim --scales 0,0.2

Output: `guidance.json` (every per-scene value) and `guidance.md` (a table per scheduler).
"""

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional

logger = logging.getLogger("readout_guidance_study")

SCHEDULERS = {  # name: (diffusers class, extra config)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    from diffusers_innercontrol.toy.quickstart import ASSETS_DIR

    p = argparse.ArgumentParser(description="Readout guidance under several schedulers, paired by seed on held-out "
                                            "ShapesWorld scenes.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", type=str, required=True, help="Where guidance.json and guidance.md go.")
    p.add_argument("--task", type=str, default="depth", choices=("depth",),
                   help="Which bundled ControlNet, probe and evaluator (depth: the task with a per-image RMSE here).")
    p.add_argument("--assets_dir", type=str, default=ASSETS_DIR,
                   help="A folder with toy-sd, controlnet-<task>, probe-<task> and eval-<task> (default: the bundled one).")
    p.add_argument("--schedulers", type=lambda s: [v for v in s.split(",") if v], default=list(SCHEDULERS),
                   help=f"Comma-separated, from {', '.join(SCHEDULERS)}.")
    p.add_argument("--scales", type=_floats, default=[0.0, 0.05, 0.1, 0.2, 0.4],
                   help="Comma-separated readout_guidance_scale values; 0 (the unguided reference) is always run.")
    p.add_argument("--num_scenes", type=int, default=64, help="Held-out scenes.")
    p.add_argument("--start_index", type=int, default=100_000, help="First held-out scene (training used 0-7999).")
    p.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps.")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    p.add_argument("--batch_size", type=int, default=16, help="Scenes per pipeline call.")
    p.add_argument("--resolution", type=int, default=64, help="ShapesWorld's image size.")
    args = p.parse_args(input_args)
    unknown = [s for s in args.schedulers if s not in SCHEDULERS]
    if unknown:
        p.error(f"--schedulers {unknown} are not among {', '.join(SCHEDULERS)}.")
    if args.num_scenes < 2 or args.batch_size < 1 or any(s < 0 for s in args.scales):
        p.error("--num_scenes must be >= 2, --batch_size >= 1 and every --scales value >= 0.")
    if 0.0 not in args.scales:
        args.scales = [0.0] + args.scales
    return args


def paired_summary(reference, guided, lower_is_better: bool = True) -> Dict:
    """Mean change, scenes improved, and the two-sided Wilcoxon signed-rank p-value of `guided` against `reference`."""
    import numpy as np
    from scipy.stats import wilcoxon

    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(guided, dtype=np.float64)
    diff = new - ref
    better = diff < 0 if lower_is_better else diff > 0
    p_value = float(wilcoxon(new, ref).pvalue) if np.any(diff != 0) else 1.0
    return {"mean": float(new.mean()), "mean_change": float(diff.mean()), "improved": int(better.sum()),
            "n": int(diff.size), "p_value": p_value}


def study_markdown(result: Dict) -> str:
    lines = [f"Task `{result['task']}`, {result['num_scenes']} held-out scenes (from {result['start_index']}), "
             f"{result['num_inference_steps']} steps, CFG {result['guidance_scale']}; metric: {result['metric']} "
             "(lower is better) from the separately trained evaluator; p: two-sided Wilcoxon signed-rank test "
             "against scale 0 of the same scheduler, paired by scene and seed.", ""]
    lines += ["| scheduler | scale | metric | change vs 0 | scenes improved | p | clipped pixels |", "|---|---|---|---|---|---|---|"]
    for name, rows in result["schedulers"].items():
        for row in rows:
            s = row["summary"]
            change = "" if row["scale"] == 0 else f"{s['mean_change']:+.2f}"
            improved = "" if row["scale"] == 0 else f"{s['improved']} of {s['n']}"
            p = "" if row["scale"] == 0 else f"{s['p_value']:.2g}"
            lines.append(f"| {name} | {row['scale']:g} | {s['mean']:.2f} | {change} | {improved} | {p} | "
                         f"{100 * row['clipped_share']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(args) -> Dict:
    import diffusers
    import torch
    from diffusers import ControlNetModel

    from diffusers_innercontrol import ReadoutProbe, StableDiffusionControlNetReadoutPipeline
    from diffusers_innercontrol.evaluation import load_control_evaluator
    from diffusers_innercontrol.metrics import depth_rmse
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    task = get_task(args.task)
    assets = args.assets_dir
    pipe = StableDiffusionControlNetReadoutPipeline.from_pretrained(
        os.path.join(assets, "toy-sd"), controlnet=ControlNetModel.from_pretrained(os.path.join(assets, f"controlnet-{task.name}")),
        readout_probe=ReadoutProbe.from_pretrained(os.path.join(assets, f"probe-{task.name}")), safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_control_evaluator(task, os.path.join(assets, f"eval-{task.name}"), option="--assets_dir")
    scenes = ShapesWorldEvalSet(task.name, resolution=args.resolution, start=args.start_index, n=args.num_scenes)
    base_config = pipe.scheduler.config

    result = {"task": task.name, "metric": "depth RMSE (0-255)", "num_scenes": args.num_scenes,
              "start_index": args.start_index, "num_inference_steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "schedulers": {}}
    for name in args.schedulers:
        cls_name, extra = SCHEDULERS[name]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)
        rows = []
        for scale in sorted(set(args.scales)):
            start = time.time()
            errors, clipped = [], []
            for lo in range(0, args.num_scenes, args.batch_size):
                batch = [scenes[i] for i in range(lo, min(lo + args.batch_size, args.num_scenes))]
                controls = torch.stack([s.control for s in batch])
                seeds = [args.start_index + lo + k for k in range(len(batch))]
                out = pipe([s.caption for s in batch], image=controls, height=args.resolution, width=args.resolution,
                           num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                           generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
                           readout_guidance_scale=scale, readout_task=task)
                with torch.no_grad():
                    decoded = pipe.vae.decode(out.images / pipe.vae.config.scaling_factor, return_dict=False)[0]
                    clipped += (decoded.abs() > 1).float().flatten(1).mean(1).tolist()
                    images = ((decoded + 1) / 2).clamp(0, 1)
                    errors += depth_rmse(evaluator(images), controls).tolist()
            rows.append({"scale": scale, "errors": errors, "clipped": clipped,
                         "clipped_share": sum(clipped) / len(clipped), "seconds": round(time.time() - start, 1)})
            logger.info(f"{name} scale {scale:g}: RMSE {sum(errors) / len(errors):.2f} ({rows[-1]['seconds']} s)")
        reference = rows[0]
        for row in rows:
            row["summary"] = paired_summary(reference["errors"], row["errors"])
            row["clipped_summary"] = paired_summary(reference["clipped"], row["clipped"])
        result["schedulers"][name] = rows

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "guidance.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output_dir, "guidance.md"), "w") as f:
        f.write(study_markdown(result))
    print(study_markdown(result))
    return result


if __name__ == "__main__":
    main(parse_args())
