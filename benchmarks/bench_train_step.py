# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
Benchmark of one stage-2 training step (forward + backward + optimizer step of the ControlNet) in every mode:

| mode | what `training.controlnet_step` runs |
|---|---|
| controlnet | diffusion loss only (alpha = beta = 0) |
| controlnet++_full | + reward, the whole batch VAE-decoded, loss masked afterwards (the released code) |
| controlnet++_masked | + reward, only the samples inside the reward window decoded |
| innercontrol | reward (masked) + alignment (Eq. 8) |
| alignment_only | diffusion + alignment (alpha = 0) |

All modes run in one process on the same models, interleaved (every iteration runs every mode once, in
an order rotated per iteration), after warm-up. Every iteration draws one set of timesteps (uniform over
[0, 1000), stratified by default so that each batch holds the expected share of the reward window: 20 %
for a window of 200) and one noise tensor that all modes share. Reported per mode: the median step time,
images/s, the peak memory, and the ratio to ControlNet (the median of the per-iteration ratios, which
cancels most of the noise of a shared machine; the ratio of the medians is in the JSON too).

Clock: wall time on CUDA (after `torch.cuda.synchronize`); on the CPU by default the CPU time of the process
(`time.process_time`), which is what a step costs when other processes share the cores (run it with
`--num_threads 1`, so that no OpenMP thread spins while it waits for another). Both are in the JSON.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (weights, gradients and optimizer state
included); on the CPU, where torch keeps no allocator statistics, two extra rounds of one step per mode under
`torch.profiler(profile_memory=True)` at fixed timesteps (the middle of every stratum): the peak of the running sum of a step's allocation events (the
smaller of the two) plus the bytes that live across steps (weights, buffers, optimizer state).

    python benchmarks/bench_train_step.py --preset small --iters 10 --num_threads 1 --json small.json
    python benchmarks/bench_train_step.py --preset sd15 --resolution 512 --batch_size 8 --precision bf16 --device cuda
"""

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from presets import PRESETS, build_preset, write_report  # noqa: E402

from diffusers_innercontrol.tasks import get_task  # noqa: E402
from diffusers_innercontrol.training import controlnet_step  # noqa: E402

MODES = {
    "controlnet": dict(label="ControlNet", reward=False, alignment=False, reward_decode="masked"),
    "controlnet++_full": dict(label="ControlNet++ (full-batch decode)", reward=True, alignment=False, reward_decode="full"),
    "controlnet++_masked": dict(label="ControlNet++ (masked decode)", reward=True, alignment=False, reward_decode="masked"),
    "innercontrol": dict(label="InnerControl (reward + alignment)", reward=True, alignment=True, reward_decode="masked"),
    "alignment_only": dict(label="alignment only", reward=False, alignment=True, reward_decode="masked"),
}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = (
    # (name, numerator mode, denominator mode, quantity, limit)
    ("alignment_only_time", "alignment_only", "controlnet", "time", 1.08),
    ("innercontrol_vs_full_decode_time", "innercontrol", "controlnet++_full", "time", 0.70),
    ("innercontrol_peak_memory", "innercontrol", "controlnet", "memory", 1.25),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time one stage-2 training step of each mode (see the module docstring).")
    parser.add_argument("--preset", default="small", choices=PRESETS)
    parser.add_argument("--resolution", type=int, default=None, help="Image size in pixels (the preset's by default).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--device", default=None, help="cpu or cuda (cuda when available).")
    parser.add_argument("--iters", type=int, default=10, help="Timed iterations (each runs every mode once).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed iterations first.")
    parser.add_argument("--task", default="hed", help="Task whose losses, windows and probe are used.")
    parser.add_argument("--task_preset", default="paper", choices=("paper", "released"))
    parser.add_argument("--alignment_resize", default=None, choices=("nearest", "area", "readout"),
                        help="How the alignment loss sizes the control and the readout (default: the task's).")
    parser.add_argument("--reward_window", type=int, default=200, help="T_reward: the reward window is [0, T_reward].")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {', '.join(MODES)}.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="On the UNet, the ControlNet and the VAE.")
    parser.add_argument("--checkpoint_reward_and_probe", action="store_true",
                        help="Gradient checkpointing on the reward's VAE decode and on the probe only (not on the "
                             "UNet and the ControlNet): what InnerControl adds to a ControlNet step, recomputed in backward.")
    parser.add_argument("--combined_backward", action="store_true",
                        help="One backward through the whole step, as before 2026-12-04 (controlnet_step("
                             "early_branch_backward=False)); by default the reward's decode and the probe backpropagate "
                             "a few samples at a time inside the step: the same gradients, a lower peak.")
    parser.add_argument("--timestep_sampling", default="stratified", choices=("stratified", "uniform"),
                        help="stratified: one t per 1/B of [0, 1000), shuffled (each t still uniform; the "
                             "reward-window share of every batch close to its expectation).")
    parser.add_argument("--memory", default="auto", choices=("auto", "cuda", "profiler", "none"),
                        help="Peak memory: cuda allocator statistics, torch.profiler memory events (CPU), or none.")
    parser.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                        help="What the ratios and the table use: wall time, or the process's CPU time (auto: CPU "
                             "time on the CPU, wall time on CUDA). CPU time is what a step costs when other "
                             "processes share the cores; use it with --num_threads 1.")
    parser.add_argument("--no_flops", action="store_true", help="Skip counting each component's FLOPs.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write the results here.")
    parser.add_argument("--markdown", default=None, help="Also write the table here.")
    args = parser.parse_args(argv)

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}.")
    if "controlnet" not in args.modes:
        args.modes.insert(0, "controlnet")  # the reference of every ratio
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch_size and --iters must be >= 1 and --warmup >= 0.")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu.")
    if args.clock == "auto":
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu measures host CPU time only; use --clock wall with --device cuda.")
    if args.memory == "auto":
        args.memory = "cuda" if args.device.startswith("cuda") else "profiler"
    if args.memory == "cuda" and not args.device.startswith("cuda"):
        parser.error("--memory cuda needs --device cuda.")
    return args


# --- inputs -------------------------------------------------------------------------------------
def draw_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator, stratified: bool) -> torch.Tensor:
    """`batch_size` timesteps, each uniform over [0, T); stratified: one per stratum of width T / B, shuffled."""
    if not stratified:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    t = ((torch.arange(batch_size, dtype=torch.float64) + u) * num_train_timesteps / batch_size).floor().long()
    return t[torch.randperm(batch_size, generator=generator)].clamp_(0, num_train_timesteps - 1)


def quantile_timesteps(batch_size: int, num_train_timesteps: int) -> torch.Tensor:
    """`floor((k + 1/2) T / B)` for k = 0..B-1: the middle of every stratum (8 samples: 62, 187, ..., 937)."""
    return ((torch.arange(batch_size, dtype=torch.float64) + 0.5) * num_train_timesteps / batch_size).floor().long()


def make_batch(task, models, batch_size, resolution, device, weight_dtype, generator):
    latent = resolution // models["vae_scale_factor"]
    latents = torch.randn(batch_size, 4, latent, latent, generator=generator).to(device, weight_dtype)
    encoder_hidden_states = torch.randn(batch_size, 77, models["cross_attention_dim"], generator=generator)
    added_cond_kwargs = None
    if models.get("pooled_text_dim"):  # SDXL: the pooled text embedding and the size / crop ids
        from diffusers_innercontrol.training import sdxl_time_ids

        pooled = torch.randn(batch_size, models["pooled_text_dim"], generator=generator)
        added_cond_kwargs = {"text_embeds": pooled.to(device, weight_dtype),
                             "time_ids": sdxl_time_ids(batch_size, resolution, resolution, device, weight_dtype)}
    if task.is_segmentation:
        classes = torch.randint(0, task.num_classes, (batch_size, resolution, resolution), generator=generator)
        control = (classes[:, None].float() / task.num_classes).expand(-1, 3, -1, -1).contiguous()
        classes = classes.to(device)
    else:
        # sparse white edges on black, like a HED / LineArt control
        control = (torch.rand(batch_size, 1, resolution, resolution, generator=generator) > 0.9).float().expand(-1, 3, -1, -1)
        control = control.contiguous()
        classes = None
    return dict(
        latents=latents,
        encoder_hidden_states=encoder_hidden_states.to(device, weight_dtype),
        control=control.to(device),
        control_classes=classes,
        added_cond_kwargs=added_cond_kwargs,
    )


# --- one step ----------------------------------------------------------------------------------
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _autocast(device, weight_dtype):
    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=weight_dtype)


def run_step(mode, task, models, optimizer, batch, timesteps, noise, weight_dtype, device, scaler=None,
             early_branch_backward=True):
    """One optimizer step of the ControlNet in `mode`; returns the `StepOutput`."""
    spec = MODES[mode]
    controlnet = models["controlnet"]
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, weight_dtype):
        out = controlnet_step(
            task=task,
            unet=models["unet"],
            controlnet=controlnet,
            noise_scheduler=models["noise_scheduler"],
            latents=batch["latents"],
            encoder_hidden_states=batch["encoder_hidden_states"],
            control=batch["control"],
            control_classes=batch["control_classes"],
            vae=models["vae"],
            reward_model=models["reward_model"],
            probe=models["probe"],
            alpha=task.alpha if spec["reward"] else 0.0,
            beta=task.beta if spec["alignment"] else 0.0,
            noise=noise,
            timesteps=timesteps,
            reward_decode=spec["reward_decode"],
            weight_dtype=weight_dtype,
            added_cond_kwargs=batch["added_cond_kwargs"],
            early_branch_backward=early_branch_backward,
        )
    loss = out.loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return out


def timed_step(step_fn, device, cuda_memory: bool):
    """(wall seconds, CPU seconds of this process, peak bytes or None, bytes allocated before or None, StepOutput)."""
    _sync(device)
    base = None
    if cuda_memory:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = step_fn()
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) if cuda_memory else None
    return seconds, cpu_seconds, peak, base, out


def resident_bytes(models, optimizer) -> int:
    """Bytes that live across steps: the parameters and buffers of every model and the optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for key in ("unet", "controlnet", "vae", "reward_model", "probe"):
        module = models.get(key)
        if module is not None:
            for t in list(module.parameters()) + list(module.buffers()):
                add(t)
    for state in optimizer.state.values():
        for t in state.values():
            add(t)
    return total


def profiler_step_peak(step_fn) -> int:
    """Peak of the running sum of the allocation / free events of one step, in bytes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# --- FLOPs -------------------------------------------------------------------------------------
def count_flops(task, models, batch, timesteps, weight_dtype, device) -> Dict[str, float]:
    """GMACs per sample of each component's forward (torch.utils.flop_counter), on one sample at t=100."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_innercontrol.features import DecoderFeatureExtractor
    from diffusers_innercontrol.training import decode_latents

    def gmacs(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2e9

    unet, controlnet, vae = models["unet"], models["controlnet"], models["vae"]
    x = batch["latents"][:1]
    t = torch.full((1,), 100, device=device, dtype=torch.long)
    ehs = batch["encoder_hidden_states"][:1]
    control = batch["control"][:1].to(weight_dtype)
    added = batch["added_cond_kwargs"]
    added = None if added is None else {k: v[:1] for k, v in added.items()}
    out = {}
    with torch.no_grad(), _autocast(device, weight_dtype):
        out["controlnet"] = gmacs(lambda: controlnet(x, t, encoder_hidden_states=ehs, controlnet_cond=control,
                                                     added_cond_kwargs=added, return_dict=False))
        if models["probe"] is not None:
            with DecoderFeatureExtractor(unet, models["probe"].config.feature_kind) as extractor:
                out["unet"] = gmacs(lambda: unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False))
                features = extractor.pop()
            out["probe"] = gmacs(lambda: models["probe"](features, t, return_dict=False))
        else:
            out["unet"] = gmacs(lambda: unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False))
        images = []
        out["vae_decode"] = gmacs(lambda: images.append(decode_latents(vae, x)))
        if models["reward_model"] is not None:
            out["reward_model"] = gmacs(lambda: models["reward_model"](images[0]))
    return {k: round(v, 4) for k, v in out.items()}


# --- report ------------------------------------------------------------------------------------
def _mib(n):
    return None if n is None else n / 2**20


def summarise(times: Dict[str, List[float]], memory: Dict[str, dict], batch_size: int, shares: Dict[str, dict], other_clock=None):
    """Per-mode statistics of `times` (seconds per iteration, the clock the ratios use); `other_clock`: the
    other clock's times, reported as `other_median_ms`."""
    ref = times["controlnet"]
    results = {}
    ref_peak = memory.get("controlnet", {}).get("peak")
    for mode, values in times.items():
        median = statistics.median(values)
        paired = [v / r for v, r in zip(values, ref)]
        peak = memory.get(mode, {}).get("peak")
        results[mode] = dict(
            label=MODES[mode]["label"],
            median_ms=median * 1e3,
            mean_ms=statistics.mean(values) * 1e3,
            min_ms=min(values) * 1e3,
            times_ms=[v * 1e3 for v in values],
            images_per_s=batch_size / median,
            ratio_to_controlnet=statistics.median(paired),
            ratio_of_medians=median / statistics.median(ref),
            peak_memory_mib=_mib(peak),
            step_memory_mib=_mib(memory.get(mode, {}).get("step")),
            step_memory_rounds_mib=[_mib(b) for b in memory.get(mode, {}).get("rounds", [])],
            memory_ratio=(peak / ref_peak) if (peak is not None and ref_peak) else None,
            reward_share=shares[mode]["reward"],
            alignment_share=shares[mode]["alignment"],
        )
        if other_clock is not None:
            results[mode]["other_median_ms"] = statistics.median(other_clock[mode]) * 1e3
    return results


def check_targets(times, results):
    checks = {}
    for name, num, den, quantity, limit in TARGETS:
        if num not in results or den not in results:
            continue
        if quantity == "time":
            value = statistics.median([a / b for a, b in zip(times[num], times[den])])
        else:
            a, b = results[num]["peak_memory_mib"], results[den]["peak_memory_mib"]
            if a is None or not b:
                continue
            value = a / b
        checks[name] = dict(numerator=num, denominator=den, quantity=quantity, ratio=value, limit=limit, met=value <= limit)
    return checks


def markdown_table(results, clock: str = "wall", failed=None) -> str:
    name = "median ms" if clock == "wall" else "median CPU ms"
    lines = [
        f"| mode | {name} | images/s | peak memory (MiB) | ratio to ControlNet | memory ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        mem_ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        lines.append(
            f"| {r['label']} | {r['median_ms']:.1f} | {r['images_per_s']:.2f} | {mem} | "
            f"{r['ratio_to_controlnet']:.2f} | {mem_ratio} |"
        )
    for mode, why in (failed or {}).items():
        lines.append(f"| {MODES[mode]['label']} | {why.split(':')[0]} | | | | |")
    return "\n".join(lines)


def environment(args) -> Dict:
    import diffusers

    env = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        python=platform.python_version(),
        device=args.device,
        num_threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
        env["cpu_count"] = os.cpu_count()
    except OSError:
        pass
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


# --- main --------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    weight_dtype = PRECISIONS[args.precision]
    task = get_task(args.task, args.task_preset)
    if args.alignment_resize is not None:
        task = task.replace(alignment_resize=args.alignment_resize)
    if args.reward_window is not None:
        task = task.replace(reward_window=(0, args.reward_window))
    need_probe = any(MODES[m]["alignment"] for m in args.modes)
    need_reward = any(MODES[m]["reward"] for m in args.modes)
    models = build_preset(args.preset, task, device, weight_dtype, args.seed, with_probe=need_probe, with_reward=need_reward)
    resolution = args.resolution or models["resolution"]
    unet = models["unet"]
    multiple = models["vae_scale_factor"] * 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} must be a multiple of {multiple} for the {args.preset} preset.")
    if args.checkpoint_reward_and_probe:
        models["vae"].enable_gradient_checkpointing()
        if models.get("probe") is not None:
            models["probe"].enable_gradient_checkpointing()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        models["controlnet"].enable_gradient_checkpointing()
        models["vae"].enable_gradient_checkpointing()  # the reward's decode (diffusers' Decoder supports it)
        if models.get("probe") is not None:
            models["probe"].enable_gradient_checkpointing()  # per probe block
    controlnet = models["controlnet"]
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type) if (args.precision == "fp16" and device.type == "cuda") else None

    env = environment(args)
    print(f"# {args.preset} preset, {resolution} px, batch {args.batch_size}, {args.precision}, {env.get('gpu', env['cpu'])}"
          f" ({env['num_threads']} threads), task {task.name}/{task.preset}, reward window {task.reward_window}, "
          f"alignment window {task.alignment_window}, gradient checkpointing {args.gradient_checkpointing}", flush=True)
    print("# parameters (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in models["parameters"].items()), flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    batch = make_batch(task, models, args.batch_size, resolution, device, weight_dtype, generator)
    num_t = models["noise_scheduler"].config.num_train_timesteps
    stratified = args.timestep_sampling == "stratified"

    flops = None
    if not args.no_flops:
        flops = count_flops(task, models, batch, None, weight_dtype, device)
        print("# GMACs per sample (forward): " + ", ".join(f"{k} {v:.2f}" for k, v in flops.items()), flush=True)

    modes = list(args.modes)
    times = {m: [] for m in modes}
    cpu_times = {m: [] for m in modes}
    cuda_peaks = {m: [] for m in modes}
    shares = {m: dict(reward=[], alignment=[]) for m in modes}
    timesteps_log = []
    failed = {}  # mode -> why it was dropped (out of memory)
    cuda_memory = args.memory == "cuda"
    for iteration in range(args.warmup + args.iters):
        timesteps = draw_timesteps(args.batch_size, num_t, generator, stratified).to(device)
        noise = torch.randn(batch["latents"].shape, generator=generator).to(device, weight_dtype)
        timed = iteration >= args.warmup
        if timed:
            timesteps_log.append(timesteps.tolist())
        shift = iteration % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            if mode in failed:
                continue
            step = lambda: run_step(mode, task, models, optimizer, batch, timesteps, noise, weight_dtype, device,  # noqa: E731
                                    scaler, not args.combined_backward)
            try:
                seconds, cpu_seconds, peak, base, out = timed_step(step, device, cuda_memory)
            except OUT_OF_MEMORY as error:
                # e.g. the full-batch decode at 512 px: drop this mode, keep measuring the others
                failed[mode] = f"out of memory: {str(error).splitlines()[0][:200]}"
            if mode in failed:
                # (outside the except block, so that the failed step's tensors are released first)
                optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"  {mode}: {failed[mode]} (dropped)", flush=True)
                if mode == "controlnet":
                    raise RuntimeError(
                        "The ControlNet step alone does not fit in memory: lower --batch_size or --resolution, "
                        "or add --gradient_checkpointing."
                    )
                continue
            if timed:
                times[mode].append(seconds)
                cpu_times[mode].append(cpu_seconds)
                shares[mode]["reward"].append(out.reward_share)
                shares[mode]["alignment"].append(out.alignment_share)
                if peak is not None:
                    cuda_peaks[mode].append((peak, peak - base))
        tag = "warm-up" if not timed else f"iter {iteration - args.warmup + 1}/{args.iters}"
        print(f"  {tag}: t={timesteps.tolist()} " + " ".join(
            f"{m}={times[m][-1] * 1e3:.0f}/{cpu_times[m][-1] * 1e3:.0f}ms" for m in modes if timed and times[m] and m not in failed)
            + (" (wall/CPU)" if timed else ""), flush=True)

    modes = [m for m in modes if m not in failed]
    for mode in failed:
        times.pop(mode), cpu_times.pop(mode), cuda_peaks.pop(mode), shares.pop(mode)
    memory = {}
    if cuda_memory:
        for mode in modes:
            memory[mode] = dict(peak=max(p for p, _ in cuda_peaks[mode]), step=max(s for _, s in cuda_peaks[mode]))
    elif args.memory == "profiler":
        # Two more rounds of one step per mode under the memory profiler (untimed), at the batch's timestep
        # quantiles, so that the windows hold their expected shares and runs compare; the smaller of a mode's
        # two peaks (a one-off allocation does not count).
        resident = resident_bytes(models, optimizer)
        timesteps = quantile_timesteps(args.batch_size, num_t).to(device)
        rounds = {m: [] for m in modes}
        for _ in range(2):
            for mode in modes:
                rounds[mode].append(profiler_step_peak(
                    lambda: run_step(mode, task, models, optimizer, batch, timesteps, noise, weight_dtype, device, scaler,
                                    not args.combined_backward)
                ))
        for mode in modes:
            memory[mode] = dict(peak=resident + min(rounds[mode]), step=min(rounds[mode]), rounds=rounds[mode])

    share_means = {m: {k: statistics.mean(v) for k, v in s.items()} for m, s in shares.items()}
    primary, other = (cpu_times, times) if args.clock == "cpu" else (times, cpu_times)
    results = summarise(primary, memory, args.batch_size, share_means, other_clock=other)
    for mode, r in results.items():
        r["clock"] = args.clock
        r["median_wall_ms"] = statistics.median(times[mode]) * 1e3
        r["median_cpu_ms"] = statistics.median(cpu_times[mode]) * 1e3
        r.pop("other_median_ms", None)
    targets = check_targets(primary, results)
    table = markdown_table(results, args.clock, failed)
    print()
    print(table)
    reward_share = statistics.mean(shares["controlnet"]["reward"])
    align_share = statistics.mean(shares["controlnet"]["alignment"])
    print(f"\nreward-window share {reward_share:.3f}, alignment-window share {align_share:.3f} (mean over timed iterations)")
    if args.clock == "cpu":
        print("times: CPU time of this process per step (other processes share the cores; wall-time medians in the JSON)")
    if args.memory == "profiler":
        print("peak memory: weights + optimizer state + the step's peak of live tensors (torch.profiler memory events)")
    for name, check in targets.items():
        print(f"target {name}: {check['ratio']:.3f} (limit {check['limit']}) -> {'met' if check['met'] else 'MISSED'}")

    report = dict(
        benchmark="train_step",
        config=dict(
            preset=args.preset, resolution=resolution, batch_size=args.batch_size, precision=args.precision,
            iters=args.iters, warmup=args.warmup, task=task.name, task_preset=task.preset,
            reward_window=list(task.reward_window), alignment_window=list(task.alignment_window),
            gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_reward_and_probe=args.checkpoint_reward_and_probe, timestep_sampling=args.timestep_sampling,
            memory=args.memory, memory_timesteps=(quantile_timesteps(args.batch_size, num_t).tolist()
                                                  if args.memory == "profiler" else None),
            clock=args.clock, num_threads=torch.get_num_threads(), seed=args.seed, modes=modes,
        ),
        environment=env,
        parameters=models["parameters"],
        gmacs_per_sample=flops,
        timesteps=timesteps_log,
        wall_times_ms={m: [t * 1e3 for t in v] for m, v in times.items()},
        cpu_times_ms={m: [t * 1e3 for t in v] for m, v in cpu_times.items()},
        reward_share=reward_share,
        alignment_share=align_share,
        modes=results,
        failed=failed,
        targets=targets,
        table=table,
    )
    write_report(report, table, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
