# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
Benchmark of sampling with `StableDiffusionControlNetReadoutPipeline` against diffusers' plain
`StableDiffusionControlNetPipeline` on the same modules:

| mode | call |
|---|---|
| plain | `StableDiffusionControlNetPipeline(...)(prompt, image)` |
| readouts_off | the readout pipeline without `return_readouts` (must cost nothing) |
| readouts_every_step | `return_readouts=True` (the probe on every step, readouts rendered) |
| readouts_every_5th | `return_readouts=True, readout_steps=[0, 5, 10, ...]` |
| guidance_every_step | readouts on every step and readout guidance on every step (scale 0.1, window [0, 999]): its cost against `readouts_every_step` is one extra ControlNet + UNet forward and backward per step |

The modes run interleaved (one call of each per iteration, the order rotated), with the same seed, after
warm-up; reported: the median time per call (wall time on CUDA; the process's CPU time on the CPU by
default, see bench_train_step.py), images/s and the ratio to the plain pipeline (the median of
the per-iteration ratios). Models: the presets of `presets.py` (random weights) with a small CLIP text
encoder of the UNet's cross-attention width; UniPC with 20 steps and guidance 7.5 (the evaluation protocol).

    python benchmarks/bench_sampling.py --preset small --iters 10 --json sampling.json
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import PRECISIONS, environment  # noqa: E402
from presets import PRESETS, build_preset, write_report  # noqa: E402

from diffusers_innercontrol.tasks import get_task  # noqa: E402

MODES = {
    "plain": "StableDiffusionControlNetPipeline",
    "readouts_off": "readout pipeline, readouts off",
    "readouts_every_step": "readouts on every step",
    "readouts_every_5th": "readouts on every fifth step",
    "guidance_every_step": "readout guidance on every step (scale 0.1), readouts on",
}
TARGETS = (("readouts_off", 1.02), ("readouts_every_step", 1.15))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time the readout pipeline against the plain ControlNet pipeline.")
    parser.add_argument("--preset", default="small", choices=[p for p in PRESETS if "sdxl" not in p],
                        help="Model preset (SD1.5 layouts: the SDXL presets are for the training benchmark).")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="Prompts per call.")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--task", default="hed")
    parser.add_argument("--task_preset", default="paper", choices=("paper", "released"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                        help="wall time, or the process's CPU time (auto: CPU time on the CPU, wall on CUDA).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}.")
    if "plain" not in args.modes:
        args.modes.insert(0, "plain")
    if args.iters < 1 or args.warmup < 0 or args.num_inference_steps < 1 or args.batch_size < 1:
        parser.error("--iters, --num_inference_steps and --batch_size must be >= 1, --warmup >= 0.")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu.")
    if args.clock == "auto":
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    return args


def build_pipelines(args, task):
    from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffusers_innercontrol.pipeline_readout import StableDiffusionControlNetReadoutPipeline
    from diffusers_innercontrol.toy.tiny import SD15_SCHEDULER_CONFIG, write_tiny_tokenizer

    weight_dtype = PRECISIONS[args.precision]
    models = build_preset(args.preset, task, args.device, weight_dtype, args.seed, with_probe=True, with_reward=False)
    controlnet = models["controlnet"].eval()
    if weight_dtype != torch.float32:
        controlnet.to(dtype=weight_dtype)
    width = models["cross_attention_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )
        ).to(args.device)
    if weight_dtype != torch.float32:
        text_encoder.to(dtype=weight_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tempfile.mkdtemp(prefix="bench_tok_")), model_max_length=77)
    scheduler = UniPCMultistepScheduler.from_config(DDPMScheduler(**SD15_SCHEDULER_CONFIG).config)
    components = dict(
        vae=models["vae"], text_encoder=text_encoder, tokenizer=tokenizer, unet=models["unet"], controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    plain = StableDiffusionControlNetPipeline(**components)
    readout = StableDiffusionControlNetReadoutPipeline(**components, readout_probe=models["probe"])
    for pipe in (plain, readout):
        pipe.set_progress_bar_config(disable=True)
    return plain, readout, models


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    task = get_task(args.task, args.task_preset)
    plain, readout, models = build_pipelines(args, task)
    resolution = args.resolution or models["resolution"]
    rng = np.random.default_rng(args.seed)
    edges = (rng.random((resolution, resolution)) > 0.9).astype(np.uint8) * 255
    control = PIL.Image.fromarray(np.stack([edges] * 3, -1))
    prompts = ["a photo of a house"] * args.batch_size
    steps = args.num_inference_steps
    every_5th = list(range(0, steps, 5))

    def call(mode):
        common = dict(
            prompt=prompts, image=control, num_inference_steps=steps, guidance_scale=args.guidance_scale,
            height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(args.seed),
        )
        if mode == "plain":
            return plain(**common)
        if mode == "readouts_off":
            return readout(**common)
        if mode == "readouts_every_step":
            return readout(**common, return_readouts=True, readout_task=task)
        if mode == "guidance_every_step":  # one extra ControlNet + UNet forward and backward per step
            return readout(**common, return_readouts=True, readout_task=task, readout_guidance_scale=0.1,
                           readout_guidance_window=(0, 999))
        return readout(**common, return_readouts=True, readout_steps=every_5th, readout_task=task)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    env = environment(args)
    print(f"# sampling: {args.preset} preset, {resolution} px, batch {args.batch_size}, {steps} UniPC steps, "
          f"guidance {args.guidance_scale}, {args.precision}, {env.get('gpu', env['cpu'])} ({env['num_threads']} threads)",
          flush=True)
    modes = list(args.modes)
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    times = cpu if args.clock == "cpu" else wall
    readout_counts = {}
    for iteration in range(args.warmup + args.iters):
        shift = iteration % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = call(mode)
            sync()
            readout_counts[mode] = len(getattr(out, "readouts", None) or [])
            if iteration >= args.warmup:
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - cpu_start)
        if iteration >= args.warmup:
            print(f"  iter {iteration - args.warmup + 1}/{args.iters}: "
                  + " ".join(f"{m}={times[m][-1] * 1e3:.0f}ms" for m in modes), flush=True)

    results = {}
    for mode in modes:
        median = statistics.median(times[mode])
        results[mode] = dict(
            label=MODES[mode],
            median_ms=median * 1e3,
            times_ms=[t * 1e3 for t in times[mode]],
            images_per_s=args.batch_size / median,
            ratio_to_plain=statistics.median([t / p for t, p in zip(times[mode], times["plain"])]),
            ratio_of_medians=median / statistics.median(times["plain"]),
            clock=args.clock,
            median_wall_ms=statistics.median(wall[mode]) * 1e3,
            median_cpu_ms=statistics.median(cpu[mode]) * 1e3,
            readouts_per_call=readout_counts[mode],
        )
    targets = {
        mode: dict(ratio=results[mode]["ratio_to_plain"], limit=limit, met=results[mode]["ratio_to_plain"] <= limit)
        for mode, limit in TARGETS
        if mode in results
    }
    lines = [f"| mode | median {'CPU ' if args.clock == 'cpu' else ''}ms | images/s | readouts per call | ratio to plain |", "|---|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r['label']} | {r['median_ms']:.1f} | {r['images_per_s']:.3f} | {r['readouts_per_call']} | {r['ratio_to_plain']:.3f} |")
    table = "\n".join(lines)
    print()
    print(table)
    for mode, check in targets.items():
        print(f"target {mode}: {check['ratio']:.3f} (limit {check['limit']}) -> {'met' if check['met'] else 'MISSED'}")
    report = dict(
        benchmark="sampling",
        config=dict(
            preset=args.preset, resolution=resolution, batch_size=args.batch_size, num_inference_steps=steps,
            guidance_scale=args.guidance_scale, precision=args.precision, iters=args.iters, warmup=args.warmup,
            task=task.name, task_preset=task.preset, modes=modes, clock=args.clock, num_threads=torch.get_num_threads(), readout_steps_every_5th=every_5th, seed=args.seed,
        ),
        environment=env,
        modes=results,
        targets=targets,
        table=table,
    )
    write_report(report, table, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
