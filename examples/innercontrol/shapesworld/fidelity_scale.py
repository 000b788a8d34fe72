#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The fidelity scale of ShapesWorld: how far a ControlNet gets from "no control" towards "the real images".

A control metric alone (SSIM 0.6, RMSE 30) says little in a toy world: nobody knows what the evaluator scores
on perfect images, or on images that ignore the control. This script measures, for every task, on held-out
scenes that no shipped model was trained on, with the task's separately trained evaluation model:

| row | images scored against the scenes' exact controls |
|---|---|
| floor | the real images (the evaluator's own error: the best reachable) |
| VAE round trip | `decode(encode(real image))`: the best any ControlNet can do through this autoencoder |
| no ControlNet (ceiling) | the toy SD alone, same captions and seeds: what "not following the control" scores |
| ControlNet | the toy SD + the ControlNet, same captions and seeds |

and the closure of every ControlNet, `(ceiling - ControlNet) / (ceiling - floor)` (`metrics.fidelity_closure`;
the same formula for metrics where higher is better), so 1 is as faithful as the real images and 0 no better
than no control. HED and LineArt: SSIM of the evaluator's edge map against the control; depth: RMSE of 0-255
maps; segmentation: mIoU (the paper's metrics, `metrics.ControlFidelity`).

    python examples/innercontrol/shapesworld/fidelity_scale.py --output_dir fidelity
    python examples/innercontrol/shapesworld/fidelity_scale.py --output_dir fidelity \\
        --controlnet shipped=src/diffusers_innercontrol/toy/assets/shapesworld --controlnet new=bundle-work

With no model argument it scores the bundled models (toy SD, `controlnet-<task>`, `eval-<task>`). A
`--controlnet LABEL=DIR` folder holds `controlnet-<task>` sub-folders. Generated images are kept under
`--output_dir` and reused, so a stopped run resumes; they are found by label, so after retraining a model give it
a new label (or a new `--output_dir`), or its old images are scored again. Output: `fidelity.json` (every number), `fidelity.md` (a
table per task) and `grids/<task>.png` (labelled: control | real | VAE | no ControlNet | each ControlNet).
"""

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional

import torch

logger = logging.getLogger("fidelity_scale")

TASKS = ("hed", "lineart", "depth", "segmentation")
FLOOR, VAE, CEILING = "floor", "vae", "no_controlnet"
ROW_TITLES = {FLOOR: "floor: real images", VAE: "VAE round trip", CEILING: "ceiling: no ControlNet"}


def _labelled_dir(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    label, path = text.split("=", 1)
    if not label or label in ROW_TITLES:
        raise argparse.ArgumentTypeError(f"the label of {text!r} must be non-empty and not one of {sorted(ROW_TITLES)}")
    return label, path


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    from diffusers_innercontrol.toy.quickstart import ASSETS_DIR

    p = argparse.ArgumentParser(description="ShapesWorld's fidelity scale: floor, VAE round trip, no-ControlNet ceiling, "
                                            "ControlNets and their closure of the gap, per task.")
    p.add_argument("--output_dir", type=str, required=True, help="Where images, fidelity.json/.md and grids go.")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=list(TASKS),
                   help="Comma-separated tasks (default: all four).")
    p.add_argument("--pretrained_model_name_or_path", type=str, default=os.path.join(ASSETS_DIR, "toy-sd"),
                   help="The toy SD pipeline folder (default: the bundled one).")
    p.add_argument("--controlnet", type=_labelled_dir, action="append", default=None, metavar="LABEL=DIR",
                   help="A folder with controlnet-<task> sub-folders, scored as row LABEL; repeat to compare "
                        "(default: shipped=the bundled models).")
    p.add_argument("--vae", type=_labelled_dir, action="append", default=[], metavar="LABEL=DIR",
                   help="Another autoencoder (a pipeline folder with vae/, or an AutoencoderKL folder) whose round trip is "
                        "scored as an extra row: to compare autoencoders on the same scale before training a UNet on one.")
    p.add_argument("--eval_dir", type=str, default=ASSETS_DIR,
                   help="A folder with the evaluation models eval-<task> (train_toy_evaluators.py --model_kind eval; "
                        "default: the bundled ones).")
    p.add_argument("--num_scenes", type=int, default=256, help="Held-out scenes per task.")
    p.add_argument("--start_index", type=int, default=100_000,
                   help="First held-out scene (the shipped models train on scenes below 10 000).")
    p.add_argument("--world_seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="Generation seeds; every scene gets one image per seed (the same noise with and without ControlNet).")
    p.add_argument("--num_inference_steps", type=int, default=20, help="UniPC steps (the paper's protocol).")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--grid_scenes", type=int, default=6, help="Scenes shown in each task's grid.")
    p.add_argument("--scenes_per_batch", type=int, default=16,
                   help="Scenes generated in one pipeline call (each image keeps its own seeded generator).")
    p.add_argument("--bootstrap_resamples", type=int, default=1000,
                   help="Resamples of the scenes for the 95 %% interval of every closure (paired over the rows).")
    p.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    args = p.parse_args(input_args)
    args.controlnet = args.controlnet or [("shipped", ASSETS_DIR)]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        p.error(f"--tasks: unknown {bad}; choose from {', '.join(TASKS)}.")
    if args.num_scenes < 1 or args.scenes_per_batch < 1 or args.start_index < 0 or args.resolution % 8:
        p.error("--num_scenes and --scenes_per_batch must be >= 1, --start_index >= 0 and --resolution a multiple of 8.")
    labels = [label for label, _ in args.controlnet] + [label for label, _ in args.vae]
    if len(set(labels)) != len(labels):
        p.error(f"--controlnet and --vae labels must differ, got {labels}.")
    # every model must be there before anything is generated
    missing = [path for path in [args.pretrained_model_name_or_path] if not os.path.isfile(os.path.join(path, "model_index.json"))]
    missing += [path for _, path in args.vae if not os.path.isfile(os.path.join(path, "vae", "config.json"))
                and not os.path.isfile(os.path.join(path, "config.json"))]
    for task in args.tasks:
        missing += [os.path.join(d, f"controlnet-{task}") for _, d in args.controlnet
                    if not os.path.isfile(os.path.join(d, f"controlnet-{task}", "config.json"))]
        if not os.path.isfile(os.path.join(args.eval_dir, f"eval-{task}", "config.json")):
            missing.append(os.path.join(args.eval_dir, f"eval-{task}"))
    if missing:
        p.error(f"missing model folders: {', '.join(missing)} (train them with make_bundle.sh, or pass "
                "--pretrained_model_name_or_path / --controlnet / --eval_dir).")
    return args


# --------------------------------------------------------------------------------------------- images
def reference_record(dataset, vae=None) -> Dict:
    """What `save_reference_images` records of a folder (`evaluation.check_images_record`)."""
    return {"conditions": getattr(dataset, "fingerprint", None), "images": "real" if vae is None else "VAE round trip"}


@torch.no_grad()
def save_reference_images(dataset, out_dir: str, vae=None, batch_size: int = 32) -> None:
    """The real images (`vae=None`) or their VAE round trip `decode(encode(x))` (posterior mean), as seed-0 PNGs."""
    from diffusers_innercontrol.evaluation import check_images_record, image_path, save_image_atomic, tensor_to_pil

    check_images_record(out_dir, reference_record(dataset, vae))
    todo = [i for i in range(len(dataset)) if not os.path.isfile(image_path(out_dir, i, 0))]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images = torch.stack([dataset[i].image for i in chunk])
        if vae is not None:
            x = images.to(vae.device, vae.dtype) * 2.0 - 1.0
            images = ((vae.decode(vae.encode(x).latent_dist.mode()).sample.float() + 1.0) / 2.0).clamp(0, 1).cpu()
        for i, image in zip(chunk, images):
            save_image_atomic(tensor_to_pil(image), image_path(out_dir, i, 0))


def load_evaluator(task_name: str, eval_dir: str, device):
    from diffusers_innercontrol.evaluation import load_control_evaluator
    from diffusers_innercontrol.tasks import get_task

    path = os.path.join(eval_dir, f"eval-{task_name}")
    return load_control_evaluator(get_task(task_name), path, device=device, option="--eval_dir")


def grid_for(dataset, rows: Dict[str, Dict], n: int, size: int = 96):
    """A labelled grid: a row per scene, columns control | every row's image (seed of the first image)."""
    from PIL import Image

    from diffusers_innercontrol.evaluation import image_path
    from diffusers_innercontrol.render import labeled_grid, to_pil

    labels = ["control"] + [row["title"].replace(": ", ":\n", 1) for row in rows.values()]
    tiles = []
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        line = [to_pil(sample.control)]
        for row in rows.values():
            line.append(Image.open(image_path(row["images"], i, row["seeds"][0])).convert("RGB"))
        tiles.append(line)
    return labeled_grid(tiles, labels, [f"scene {dataset.start + i}" for i in range(len(tiles))], tile_size=(size, size))


# --------------------------------------------------------------------------------------------- report
def fidelity_markdown(result: Dict) -> str:
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    a = result["args"]
    lines = [
        "# ShapesWorld fidelity scale", "",
        f"{a['num_scenes']} held-out scenes (indices {a['start_index']}-{a['start_index'] + a['num_scenes'] - 1}, world seed "
        f"{a['world_seed']}), {len(a['seeds'])} image(s) each, {a['num_inference_steps']} UniPC steps, guidance "
        f"{a['guidance_scale']}. Closure = (ceiling - value) / (ceiling - floor): 1 = as faithful as the real images, "
        "0 = no better than no ControlNet.", "",
    ]
    for task, block in result["tasks"].items():
        key, name, higher = CONTROL_METRICS[task]
        lines += [f"## {task}: {name} ({'higher' if higher else 'lower'} is better)", "",
                  "| row | " + name + " | std over images | closure | 95 % interval (bootstrap over scenes) |",
                  "|---|---|---|---|---|"]
        for row in block["rows"].values():
            closure = "-" if row.get("closure") is None else f"{100 * row['closure']:.0f} %"
            ci = row.get("closure_ci")
            interval = "-" if not ci else f"{100 * ci['low']:.0f} - {100 * ci['high']:.0f} %"
            std = row.get("std")
            lines.append(f"| {row['title']} | {row['value']:.4f} | {'-' if std is None else f'{std:.4f}'} | {closure} | {interval} |")
        by_background = {n: r["closure_by_background"] for n, r in block["rows"].items() if r.get("closure_by_background")}
        if by_background:
            styles = list(next(iter(by_background.values())))
            counts = next(iter(by_background.values()))
            lines += ["", "Closure by the scene's background style (scenes in each):", "",
                      "| row | " + " | ".join(f"{s} ({counts[s]['scenes']})" for s in styles) + " |",
                      "|---|" + "---|" * len(styles)]
            for n, groups in by_background.items():
                cells = ["-" if groups[s]["closure"] is None else f"{100 * groups[s]['closure']:.0f} %" for s in styles]
                lines.append(f"| {block['rows'][n]['title']} | " + " | ".join(cells) + " |")
        by_region = {n: r["closure_by_region"] for n, r in block["rows"].items() if r.get("closure_by_region")}
        if by_region:
            lines += ["", f"Where the {name} is lost: the closure of its deficit (1 - {name} map) near the control's edges "
                      "(within 3 px) and on the background (everywhere else), and the share of the row's shortfall "
                      "against the real images that lies on the background:", "",
                      "| row | closure near the edges | closure on the background | shortfall on the background |",
                      "|---|---|---|---|"]
            for n, r in by_region.items():
                cells = ["-" if r[k] is None else f"{100 * r[k]:.0f} %" for k in ("near_edges", "background", "background_share")]
                lines.append(f"| {block['rows'][n]['title']} | " + " | ".join(cells) + " |")
        paired = {n: r["paired_difference"] for n, r in block["rows"].items() if r.get("paired_difference")}
        if paired:
            lines += ["", "Each ControlNet against the first, on the same scenes and noise (closure points, paired t-test "
                      "over scenes):", "", "| row | against | difference | 95 % interval | p |", "|---|---|---|---|---|"]
            for n, d in paired.items():
                lines.append(f"| {block['rows'][n]['title']} | {block['rows'][d['reference']]['title']} | "
                             f"{100 * d['diff']:+.1f} | {100 * d['ci_low']:+.1f} - {100 * d['ci_high']:+.1f} | {d['p']:.2g} |")
        lines += ["", f"Evaluator: `{block['evaluator']}`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def main(args) -> Dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UniPCMultistepScheduler

    from diffusers_innercontrol.evaluation import compute_metrics, generate_images, load_generation_pipeline
    from diffusers_innercontrol.metrics import (
        CONTROL_METRICS,
        ControlFidelity,
        bootstrap_closure,
        closure_by_group,
        closure_by_region,
        fidelity_closure,
        miou_from_confusion,
        paired_closure_difference,
    )
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae").to(device).eval()
    extra_vaes = {
        label: AutoencoderKL.from_pretrained(path, **({"subfolder": "vae"} if os.path.isdir(os.path.join(path, "vae")) else {}))
        .to(device).eval()
        for label, path in args.vae
    }
    plain = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None,
                                                    requires_safety_checker=False).to(device)
    plain.scheduler = UniPCMultistepScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    gen = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
               negative_prompt=None, resolution=args.resolution, progress=False, conditions_per_call=args.scenes_per_batch)
    result = {"args": dict(vars(args)), "tasks": {}}
    for task_name in args.tasks:
        task = get_task(task_name)
        key = CONTROL_METRICS[task_name][0]
        dataset = ShapesWorldEvalSet(task, args.resolution, args.world_seed, args.start_index, args.num_scenes)
        indices = range(len(dataset))
        base = os.path.join(args.output_dir, task_name)
        rows = {
            FLOOR: {"title": ROW_TITLES[FLOOR], "images": os.path.join(base, FLOOR), "seeds": [0]},
            VAE: {"title": ROW_TITLES[VAE], "images": os.path.join(base, VAE), "seeds": [0]},
        }
        t0 = time.time()
        save_reference_images(dataset, rows[FLOOR]["images"])
        save_reference_images(dataset, rows[VAE]["images"], vae=vae)
        for label, path in args.vae:
            row = {"title": f"VAE round trip: {label}", "images": os.path.join(base, f"vae-{label}"), "seeds": [0],
                   "vae": os.path.abspath(path)}
            save_reference_images(dataset, row["images"], vae=extra_vaes[label])
            rows[f"vae-{label}"] = row
        rows[CEILING] = {"title": ROW_TITLES[CEILING], "images": os.path.join(base, CEILING), "seeds": list(args.seeds)}
        generate_images(plain, dataset, indices, rows[CEILING]["images"], seeds=args.seeds, with_control=False, **gen)
        for label, folder in args.controlnet:
            path = os.path.join(folder, f"controlnet-{task_name}")
            row = {"title": f"ControlNet: {label}", "images": os.path.join(base, f"controlnet-{label}"),
                   "seeds": list(args.seeds), "controlnet": os.path.abspath(path)}
            pipe = load_generation_pipeline(args.pretrained_model_name_or_path, path).to(device)
            generate_images(pipe, dataset, indices, row["images"], seeds=args.seeds, **gen)
            rows[f"controlnet-{label}"] = row
            del pipe
        logger.info(f"{task_name}: images ready in {time.time() - t0:.0f} s")

        evaluator = load_evaluator(task_name, args.eval_dir, device)
        per_scene = {}
        for name, row in rows.items():
            fidelity = ControlFidelity(task_name, num_classes=getattr(evaluator, "num_classes", None) or task.num_classes,
                                       keep_confusion=True)
            metrics = compute_metrics(task, dataset, indices, row["images"], seeds=row["seeds"], control_evaluator=evaluator,
                                      device=device, progress=False, fidelity=fidelity)
            row["value"], row["std"], row["metrics"] = metrics[key], metrics.get(f"{key}_std"), metrics
            if task.is_segmentation:  # one confusion matrix per scene
                per_scene[name] = torch.stack(fidelity.confusions)
            else:  # the images of a scene (one per seed) averaged
                per_scene[name] = torch.tensor(fidelity.values[key], dtype=torch.float64).view(len(dataset), -1).mean(1)
        floor, ceiling = rows[FLOOR]["value"], rows[CEILING]["value"]
        backgrounds = [dataset.world.make_scene(dataset.start + i).background.style for i in indices]
        reduce = miou_from_confusion if task.is_segmentation else None
        for name, row in rows.items():
            row["closure"] = row["closure_ci"] = None
            if name not in (FLOOR, CEILING):
                row["closure"] = fidelity_closure(row["value"], floor, ceiling)
                if len(dataset) >= 2:
                    row["closure_ci"] = bootstrap_closure(per_scene[FLOOR], per_scene[CEILING], per_scene[name],
                                                          num_resamples=args.bootstrap_resamples, reduce=reduce)
                # where the missing fidelity is: textured backgrounds are the hardest to draw for the toy SD
                row["closure_by_background"] = closure_by_group(per_scene[FLOOR], per_scene[CEILING], per_scene[name],
                                                                backgrounds, reduce=reduce)
                if not task.is_segmentation and "ssim_deficit_background" in row["metrics"]:
                    row["closure_by_region"] = closure_by_region(row["metrics"], rows[FLOOR]["metrics"],
                                                                 rows[CEILING]["metrics"])
        # ControlNets compared on the same scenes and noise: each against the first, paired over scenes
        controlnet_rows = [n for n in rows if n.startswith("controlnet-")]
        if not task.is_segmentation and len(dataset) >= 2:
            for name in controlnet_rows[1:]:
                rows[name]["paired_difference"] = {"reference": controlnet_rows[0], **paired_closure_difference(
                    per_scene[FLOOR], per_scene[CEILING], per_scene[name], per_scene[controlnet_rows[0]])}
        os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
        grid_for(dataset, rows, args.grid_scenes).save(os.path.join(args.output_dir, "grids", f"{task_name}.png"))
        result["tasks"][task_name] = {"metric": key, "evaluator": os.path.abspath(os.path.join(args.eval_dir, f"eval-{task_name}")),
                                      "rows": rows}
        logger.info(f"{task_name}: " + ", ".join(f"{n} {r['value']:.4f}" for n, r in rows.items()))
    result["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.output_dir, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.output_dir, "fidelity.md"), "w") as f:
        f.write(fidelity_markdown(result))
    print(fidelity_markdown(result))
    return result


if __name__ == "__main__":
    from diffusers_innercontrol import cli

    cli.run_main(main, parse_args())
