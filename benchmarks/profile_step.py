#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Where does a mode's extra time go? `torch.profiler` on two modes of `bench_train_step.py`, op by op.

Both modes run the same batch, timesteps and noise, `--iters` profiled steps each after `--warmup` unprofiled ones,
interleaved. For every operator the table lists its self time per step in each mode and the difference, sorted by
the difference: the top rows are what the extra mode (default: alignment only) adds over the base (ControlNet).

    python benchmarks/profile_step.py --preset small --num_threads 1
    python benchmarks/profile_step.py --preset sd15 --precision bf16 --device cuda   # on a GPU: CUDA kernel time

Output: a markdown table on stdout (and `--markdown`), every operator in `--json`.
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bench  # noqa: E402  (the benchmark's models, batch and step, shared)
from presets import PRESETS, build_preset  # noqa: E402

from diffusers_innercontrol.tasks import get_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Operator-level profile of one training mode against another.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=PRESETS)
    p.add_argument("--resolution", type=int, default=None, help="Image size (the preset's by default).")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=sorted(bench.PRECISIONS))
    p.add_argument("--device", default=None, help="cpu or cuda (cuda when available).")
    p.add_argument("--task", default="hed")
    p.add_argument("--base", default="controlnet", choices=list(bench.MODES), help="The reference mode.")
    p.add_argument("--mode", default="alignment_only", choices=list(bench.MODES), help="The mode whose extra cost is profiled.")
    p.add_argument("--iters", type=int, default=3, help="Profiled steps per mode.")
    p.add_argument("--warmup", type=int, default=2, help="Unprofiled steps per mode first.")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    p.add_argument("--top", type=int, default=20, help="Rows of the table.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def op_times(prof, device_type: str) -> Dict[str, float]:
    """Self time per operator in ms (CUDA kernel time on a GPU, CPU time otherwise), summed over the profile."""
    out = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if device_type == "cuda" else event.self_cpu_time_total
        out[event.key] += us / 1000.0
    return out


def difference_table(base: Dict[str, float], mode: Dict[str, float], steps: int, labels, top: int) -> str:
    keys = sorted(set(base) | set(mode), key=lambda k: mode.get(k, 0.0) - base.get(k, 0.0), reverse=True)
    total_base, total_mode = sum(base.values()) / steps, sum(mode.values()) / steps
    lines = [f"| operator | {labels[0]} (ms/step) | {labels[1]} (ms/step) | difference (ms/step) | share of the difference |",
             "|---|---:|---:|---:|---:|"]
    extra = total_mode - total_base
    for key in keys[:top]:
        b, m = base.get(key, 0.0) / steps, mode.get(key, 0.0) / steps
        share = f"{100 * (m - b) / extra:.0f} %" if extra > 0 else ""
        lines.append(f"| `{key}` | {b:.1f} | {m:.1f} | {m - b:+.1f} | {share} |")
    lines.append(f"| **all operators** | {total_base:.1f} | {total_mode:.1f} | {extra:+.1f} | 100 % |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    weight_dtype = bench.PRECISIONS[args.precision]
    task = get_task(args.task)
    need = {m: bench.MODES[m] for m in (args.base, args.mode)}
    models = build_preset(args.preset, task, device, weight_dtype, args.seed,
                          with_probe=any(s["alignment"] for s in need.values()),
                          with_reward=any(s["reward"] for s in need.values()))
    resolution = args.resolution or models["resolution"]
    optimizer = torch.optim.AdamW(models["controlnet"].parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(args.seed)
    batch = bench.make_batch(task, models, args.batch_size, resolution, device, weight_dtype, generator)
    num_t = models["noise_scheduler"].config.num_train_timesteps
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])

    totals = {args.base: defaultdict(float), args.mode: defaultdict(float)}
    for iteration in range(args.warmup + args.iters):
        timesteps = bench.draw_timesteps(args.batch_size, num_t, generator, True).to(device)
        noise = torch.randn(batch["latents"].shape, generator=generator).to(device, weight_dtype)
        for mode in (args.base, args.mode) if iteration % 2 == 0 else (args.mode, args.base):
            def step():
                bench.run_step(mode, task, models, optimizer, batch, timesteps, noise, weight_dtype, device)
                bench._sync(device)

            if iteration < args.warmup:
                step()
                continue
            with torch.profiler.profile(activities=activities) as prof:
                step()
            for key, ms in op_times(prof, device.type).items():
                totals[mode][key] += ms

    labels = (bench.MODES[args.base]["label"], bench.MODES[args.mode]["label"])
    table = difference_table(totals[args.base], totals[args.mode], args.iters, labels, args.top)
    env = bench.environment(args)
    header = (f"{args.preset} preset, {resolution} px, batch {args.batch_size}, {args.precision}, "
              f"{env.get('gpu', env['cpu'])} ({env['num_threads']} threads), task {task.name}, {args.iters} profiled steps per mode\n\n")
    print(header + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "steps": args.iters, "base": args.base, "mode": args.mode,
                       "ms_per_step": {m: {k: v / args.iters for k, v in t.items()} for m, t in totals.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
