#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Evaluate a ControlNet with the protocol of the paper's Table 1 (docs/method.md, "Evaluation").

    accelerate launch examples/innercontrol/evaluate_innercontrol.py \
        --task depth --controlnet_model_name_or_path innercontrol-depth \
        --method_name InnerControl --output_dir eval-depth

1. Generation: `StableDiffusionControlNetPipeline` with UniPC, 20 steps, guidance 7.5, negative prompt
   "worst quality, low quality", one image per seed (0 1 2 3) per condition, 512 px; saved as
   `output_dir/images/{index:06d}_{seed}.png`. Images already there are skipped: run the same command again
   to resume a stopped run. The conditions are split across processes (`accelerate launch --num_processes N`).
2. Metrics (main process): HED/LineArt SSIM (and MS-SSIM) of annotator(generated) vs the control, depth RMSE of
   max-normalised 0..255 DPT-Large maps, segmentation mIoU from Mask2Former; FID against the conditions' images;
   CLIP score (ViT-B/16) against the captions. With `--probe_model_name_or_path`, also the probe's error against
   the control per timestep bucket (the paper's Fig. 2).
3. `output_dir/results.json` and `output_dir/results.md` (Table-1 layout).

Every model is a Hub id or a local folder; offline (HF_HUB_OFFLINE=1), a Hub id that is not cached stops the
script at once with the option to use instead.
"""

import argparse
import logging
import os
from typing import List, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from diffusers_innercontrol import get_task
from diffusers_innercontrol.evaluation import (
    DEFAULT_EVAL_MODELS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_RESOLUTION,
    DEFAULT_SEEDS,
    annotator_from_evaluator,
    check_images_record,
    compute_metrics,
    generate_images,
    images_record,
    load_control_evaluator,
    load_eval_dataset,
    load_generation_pipeline,
    probe_bucket_errors,
    t2i_model_label,
    write_results,
)
from diffusers_innercontrol.hub_utils import check_model_available
from diffusers_innercontrol.metrics import DEFAULT_CLIP_MODEL, build_clip_score, build_fid
from diffusers_innercontrol.tasks import TASK_NAMES

logger = get_logger(__name__)


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a ControlNet with the protocol of InnerControl's Table 1.")
    parser.add_argument("--task", type=str, required=True, choices=TASK_NAMES)
    parser.add_argument("--method_name", type=str, default=None,
                        help="Name of the method in the results table (default: the ControlNet's path or id).")
    parser.add_argument("--t2i_model_name", type=str, default=None, help="T2I model name in the table (default: from the path).")

    g = parser.add_argument_group("models")
    g.add_argument("--pretrained_model_name_or_path", type=str, default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="The ControlNet to evaluate (default: the task's ControlNet v1.1).")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--variant", type=str, default=None)
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument("--probe_model_name_or_path", type=str, default=None,
                   help="A readout probe (save_pretrained folder): report its error per timestep bucket.")

    g = parser.add_argument_group("evaluator models")
    g.add_argument("--control_model_name_or_path", type=str, default=None,
                   help="HED/LineArt annotator (repo or folder holding the .pth; default lllyasviel/Annotators).")
    g.add_argument("--control_model_filename", type=str, default=None,
                   help="HED/LineArt weights file (default ControlNetHED.pth / sk_model.pth).")
    g.add_argument("--depth_model_name_or_path", type=str, default=DEFAULT_EVAL_MODELS["depth"],
                   help="DPT depth model (transformers DPTForDepthEstimation).")
    g.add_argument("--seg_model_name_or_path", type=str, default=DEFAULT_EVAL_MODELS["segmentation"],
                   help="Mask2Former (or any transformers semantic-segmentation model, e.g. UperNet) on ADE20K.")
    g.add_argument("--fid_feature_extractor", type=str, default="inception",
                   help="'inception' (torch-fidelity InceptionV3), its .pth weights file, or a local transformers "
                        "vision model folder.")
    g.add_argument("--clip_model_name_or_path", type=str, default=DEFAULT_CLIP_MODEL)
    g.add_argument("--skip_fid", action="store_true")
    g.add_argument("--skip_clip_score", action="store_true")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset (default: the task's evaluation set, e.g. limingcv/MultiGen-20M_depth_eval).")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--dataset_split", type=str, default=None, help="Default: 'validation' for the task's set.")
    g.add_argument("--eval_data_dir", type=str, default=None,
                   help="A local folder with metadata.jsonl (file names relative to it) instead of --dataset_name.")
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument("--caption_column", type=str, default=None)
    g.add_argument("--conditioning_image_column", type=str, default=None,
                   help="Control column; HED/LineArt controls are computed by the annotator when absent.")
    g.add_argument("--num_samples", type=int, default=None, help="Evaluate only the first N conditions.")

    g = parser.add_argument_group("protocol")
    g.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    g.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    g.add_argument("--negative_prompt", type=str, default=DEFAULT_NEGATIVE_PROMPT)
    g.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="One image per seed and condition.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    g.add_argument("--probe_num_samples", type=int, default=None, help="Conditions for the probe error (default all).")
    g.add_argument("--probe_batch_size", type=int, default=4)
    g.add_argument("--probe_num_buckets", type=int, default=10)
    g.add_argument("--skip_generation", action="store_true", help="Only compute metrics of the saved images.")

    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--no_paper_rows", action="store_true", help="Leave the paper's rows out of results.md.")
    parser.add_argument("--no_progress", action="store_true")

    args = parser.parse_args(input_args)
    if args.dataset_name and args.eval_data_dir:
        parser.error("Pass either --dataset_name or --eval_data_dir, not both.")
    if args.eval_data_dir and not os.path.isfile(os.path.join(args.eval_data_dir, "metadata.jsonl")):
        parser.error(f"--eval_data_dir {args.eval_data_dir!r} has no metadata.jsonl.")
    if args.resolution <= 0 or args.num_inference_steps <= 0:
        parser.error("--resolution and --num_inference_steps must be positive.")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}.")
    if args.num_samples is not None and args.num_samples <= 0:
        parser.error("--num_samples must be positive.")
    return args


def check_models(args, task):
    """Every Hub id this run needs is available (offline: cached) before any model is built."""
    check_model_available(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", revision=args.revision)
    check_model_available(args.controlnet_model_name_or_path, "--controlnet_model_name_or_path")
    check_model_available(args.probe_model_name_or_path, "--probe_model_name_or_path")
    if task.name == "depth":
        check_model_available(args.depth_model_name_or_path, "--depth_model_name_or_path")
    elif task.is_segmentation:
        check_model_available(args.seg_model_name_or_path, "--seg_model_name_or_path")
    else:
        check_model_available(args.control_model_name_or_path or DEFAULT_EVAL_MODELS[task.name],
                              "--control_model_name_or_path", filename=args.control_model_filename or task.reward_model_file)
    if not args.skip_clip_score:
        check_model_available(args.clip_model_name_or_path, "--clip_model_name_or_path")


def evaluator_path(args, task):
    return {"depth": args.depth_model_name_or_path, "segmentation": args.seg_model_name_or_path}.get(
        task.name, args.control_model_name_or_path
    )


def main(args):
    task = get_task(args.task)
    args.controlnet_model_name_or_path = args.controlnet_model_name_or_path or task.controlnet_id
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    check_models(args, task)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    progress = not args.no_progress and accelerator.is_local_main_process

    def control_evaluator():
        return load_control_evaluator(
            task, evaluator_path(args, task), filename=args.control_model_filename, device=accelerator.device
        )

    # HED/LineArt controls missing from the data are computed by the evaluator annotator itself (every process
    # needs it then); the depth and segmentation evaluators are only loaded by the main process, for the metrics.
    evaluator = control_evaluator() if task.name in ("hed", "lineart") else None
    annotator = annotator_from_evaluator(evaluator, accelerator.device) if evaluator is not None else None
    dataset = load_eval_dataset(args, task, annotator=annotator)
    indices = list(range(len(dataset)))

    pipe = None
    stats = {"generated": 0, "skipped": 0}
    if args.skip_generation:  # score the images there only if they were made with this call's settings
        check_images_record(args.output_dir, images_record(dataset, args.num_inference_steps, args.guidance_scale,
                                                           args.negative_prompt or None, args.resolution), write=False)
    else:
        pipe = load_generation_pipeline(
            args.pretrained_model_name_or_path, args.controlnet_model_name_or_path, revision=args.revision,
            variant=args.variant, torch_dtype=weight_dtype, cache_dir=args.cache_dir,
        ).to(accelerator.device)
        with accelerator.split_between_processes(indices) as my_indices:
            local = generate_images(
                pipe, dataset, my_indices, args.output_dir, seeds=args.seeds,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt or None, resolution=args.resolution, progress=progress,
                desc=f"generating (process {accelerator.process_index})",
            )
        counts = torch.tensor([local.generated, local.skipped], device=accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum").cpu().tolist()
        stats = {"generated": int(counts[0]), "skipped": int(counts[1])}
        accelerator.wait_for_everyone()

    if not accelerator.is_main_process:
        return None

    if evaluator is None:
        evaluator = control_evaluator()
    fid = None if args.skip_fid else build_fid(args.fid_feature_extractor)
    clip = None if args.skip_clip_score else build_clip_score(args.clip_model_name_or_path)
    metrics = compute_metrics(
        task, dataset, indices, args.output_dir, seeds=args.seeds, control_evaluator=evaluator, fid=fid,
        clip_score=clip, device=accelerator.device, progress=progress,
    )

    probe_errors = None
    if args.probe_model_name_or_path:
        from diffusers_innercontrol import ReadoutProbe

        if pipe is None:
            pipe = load_generation_pipeline(
                args.pretrained_model_name_or_path, args.controlnet_model_name_or_path, revision=args.revision,
                variant=args.variant, torch_dtype=weight_dtype, cache_dir=args.cache_dir,
            ).to(accelerator.device)
        probe = ReadoutProbe.from_pretrained(args.probe_model_name_or_path, dtype=weight_dtype).to(accelerator.device)
        n = args.probe_num_samples or len(indices)
        probe_errors = probe_bucket_errors(
            task, pipe, probe, dataset, indices[:n], batch_size=args.probe_batch_size,
            num_buckets=args.probe_num_buckets, device=accelerator.device,
        )

    result = {
        "method": args.method_name or args.controlnet_model_name_or_path,
        "t2i_model": args.t2i_model_name or t2i_model_label(args.pretrained_model_name_or_path),
        "task": task.name,
        "controlnet": args.controlnet_model_name_or_path,
        "pretrained_model": args.pretrained_model_name_or_path,
        "metrics": metrics,
        "generation": stats,
        "protocol": {
            "scheduler": "UniPCMultistepScheduler",
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "negative_prompt": args.negative_prompt,
            "seeds": list(args.seeds),
            "resolution": args.resolution,
        },
        "evaluators": {
            "control": evaluator_path(args, task) or DEFAULT_EVAL_MODELS[task.name],
            "fid": None if args.skip_fid else args.fid_feature_extractor,
            "clip": None if args.skip_clip_score else args.clip_model_name_or_path,
        },
        "probe_error": probe_errors.to_dict() if probe_errors is not None else None,
    }
    json_path, md_path = write_results(
        result, args.output_dir, include_paper=not args.no_paper_rows,
        probe_markdown=probe_errors.to_markdown() if probe_errors is not None else None,
    )
    logger.info(f"Wrote {json_path} and {md_path}: generated {stats['generated']}, skipped {stats['skipped']} images.")
    return result


if __name__ == "__main__":
    from diffusers_innercontrol import cli

    cli.run_main(main, parse_args())
