#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
Does the alignment loss make a ControlNet learn its control sooner when it is trained from scratch?

The paper fine-tunes ControlNets that already follow their controls. Here every ControlNet starts from the toy
SD's UNet (`ControlNetModel.from_unet`: its zero-initialised output convolutions add nothing at step 0, so the
first evaluation is the toy SD alone), where the reward can help little because the one-step x0 is poor. For each
task, mode and seed, `train_innercontrol.py` runs in its own process with a checkpoint every `--eval_every` steps
(`run_experiment.train_run`; a run started again resumes from its latest checkpoint, and a finished run is
extended by a larger `--max_train_steps` the same way where that gives the longer run: `check_existing_runs`). Then every checkpoint
generates the same held-out scenes (20 UniPC steps, guidance 7.5) and the task's separately trained evaluation
model scores them against the exact controls. Each value becomes a closure of the fidelity gap
(`metrics.fidelity_closure`) between the real images (the floor) and the toy SD without ControlNet (the ceiling),
measured on the same scenes.

Reported per task: the learning curves (closure against steps, mean and standard deviation over seeds: a band per
mode, with Welch's test of each mode against the diffusion-loss baseline at every evaluated step), and the steps
each run needs to reach every `--target_closure` level (`metrics.steps_to_reach`, interpolated between evaluations),
with mean, standard deviation and Welch's test of each mode against the baseline. With `--level_from STEP`, also
where the curves level off: per seed the mean closure over the evaluations from STEP on and its slope
(`metrics.curve_level`), with Welch's test of each mode's levels against the baseline's.

Modes are those of `run_experiment.py` (default: `controlnet`, `alignment`, `reward200_alignment`, the last being
InnerControl). The defaults are the recipe of the shipped toy ControlNets (lr 5e-4 after 100 warm-up steps, here
held constant so that a curve does not depend on the run's length) at batch 8.

    A=src/diffusers_innercontrol/toy/assets/shapesworld
    python examples/innercontrol/shapesworld/from_scratch.py --tasks depth,hed --seeds 0,1,2 \\
      --pretrained_model_name_or_path $A/toy-sd --train_data_dir shapes64 --num_train_samples 8000 \\
      --depth_probe $A/probe-depth --depth_reward_model $A/reward-depth \\
      --hed_probe $A/probe-hed --hed_reward_model $A/reward-hed --output_dir from-scratch --jobs 2

Output in `--output_dir`: `results.json`, `from_scratch.md`, `plots/<task>_curves.png`, `grids/<task>.png`
(control | real | each mode's image after the last step) and `runs/<task>/<mode>/seed<seed>` (the ControlNet,
its checkpoints and the images of every evaluated step). `--quick` shrinks every count for the tests.
"""

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fidelity_scale  # noqa: E402  (sibling scripts: the real-image floor, the training runs and the evaluators)
import run_experiment as experiment  # noqa: E402

logger = logging.getLogger("from_scratch")

DEFAULT_MODES = ["controlnet", "alignment", "reward200_alignment"]
CHECKPOINT_WEIGHTS = "model.safetensors"  # what accelerate's save_state writes for the ControlNet


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ShapesWorld: ControlNets trained from scratch, fidelity against steps.",
                                     allow_abbrev=False)  # --quick keeps the options given, found by their full names
    g = parser.add_argument_group("protocol")
    g.add_argument("--tasks", type=experiment._csv(str), default=["depth", "hed"], help="Comma-separated tasks.")
    g.add_argument("--modes", type=experiment._csv(str), default=DEFAULT_MODES,
                   help=f"Comma-separated modes of run_experiment.py: {', '.join(experiment.MODES)}.")
    g.add_argument("--seeds", type=experiment._csv(int), default=[0, 1, 2], help="Training seeds (one ControlNet each).")
    g.add_argument("--eval_every", type=int, default=250, help="Steps between the evaluated checkpoints.")
    g.add_argument("--target_closure", type=experiment._csv(float), default=[0.5],
                   help="The fixed fidelities whose steps are reported (comma-separated, e.g. 0.15,0.25): shares of the "
                        "gap between no ControlNet and the real images.")
    g.add_argument("--level_from", type=int, default=None,
                   help="Also report where the curves level off: per seed the mean closure over the evaluations from "
                        "this step on and its slope, with Welch's test of each mode against the ControlNet.")
    g.add_argument("--scenes_per_batch", type=int, default=8, help="Held-out scenes per pipeline call.")
    g.add_argument("--quick", action="store_true", help="Tiny counts (tests): 4 steps, 2 conditions, except options given.")
    g.add_argument("--output_dir", type=str, default="shapesworld-from-scratch")
    g.add_argument("--skip_training", action="store_true", help="Only evaluate the runs already in --output_dir.")
    g.add_argument("--jobs", type=int, default=1, help="Training runs at once (separate processes; see run_experiment.py).")
    experiment.add_model_args(parser, continue_controlnets=False)
    experiment.add_training_args(parser)
    experiment.add_generation_args(parser)
    parser.set_defaults(max_train_steps=1000, learning_rate=5e-4, lr_scheduler="constant_with_warmup", lr_warmup_steps=100)
    args = parser.parse_args(input_args)
    if args.quick:  # tiny counts, except where an option is given
        given = {a.split("=")[0] for a in (sys.argv[1:] if input_args is None else input_args)}
        tiny = dict(max_train_steps=4, eval_every=2, train_batch_size=2, lr_warmup_steps=0, num_eval_conditions=2,
                    num_inference_steps=2, num_train_samples=min(args.num_train_samples, 8))
        for name, value in tiny.items():
            if f"--{name}" not in given:
                setattr(args, name, value)
    experiment.set_eval_models(args)
    validate_args(args)
    check_existing_runs(args)
    return args


def validate_args(args):
    """Every check that needs no model weights; raises `ValueError` naming the option and the fix."""
    experiment.check_tasks_modes_seeds(args)
    experiment.check_run_models(args)
    for name in ("jobs", "max_train_steps", "train_batch_size", "eval_every", "num_inference_steps", "scenes_per_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    if args.eval_every > args.max_train_steps:
        raise ValueError(f"--eval_every {args.eval_every} is beyond --max_train_steps {args.max_train_steps}: "
                         "lower it to evaluate during training.")
    if args.num_eval_conditions < 2:
        raise ValueError("--num_eval_conditions must be >= 2.")
    extra = set(shlex.split(args.extra_train_args))
    for option, why in (("--use_ema", "the checkpoints hold the raw weights, the final save the EMA ones"),
                        ("--use_lora", "the checkpoints hold LoRA weights, not a ControlNet's"),
                        ("--checkpoints_total_limit", "the curve needs every checkpoint")):
        if option in extra:
            raise ValueError(f"--extra_train_args {option}: not with learning curves ({why}); remove it.")
    if not args.target_closure or not all(0.0 < level <= 1.0 for level in args.target_closure):
        raise ValueError(f"--target_closure {','.join(map(str, args.target_closure)) or '(empty)'}: give shares of the "
                         "fidelity gap in (0, 1], comma-separated.")
    if len(set(args.target_closure)) != len(args.target_closure):
        raise ValueError(f"--target_closure {','.join(map(str, args.target_closure))}: a level is repeated; give each once.")
    check_level_from(args.level_from, [0] + evaluated_steps(args.max_train_steps, args.eval_every))  # a curve's steps


def check_level_from(level_from: Optional[int], steps: Sequence[int]):
    """
    `--level_from` needs 2 evaluated training steps at or after it (a mean and a slope), step 0 (the toy SD alone)
    not counted; raises `ValueError` naming the fix.
    """
    if level_from is None:
        return
    if level_from < 1:
        raise ValueError(f"--level_from {level_from}: give a training step >= 1 (step 0 is the toy SD alone).")
    trained = sorted(s for s in steps if s > 0)
    if sum(s >= level_from for s in trained) < 2:
        fix = f"give --level_from {trained[-2]} or lower" if len(trained) > 1 else "evaluate more often (--eval_every)"
        last = f"the last is {trained[-1]}" if trained else "none was evaluated"
        raise ValueError(f"--level_from {level_from}: fewer than 2 evaluated steps from there on ({last}); {fix}.")


def _options(train_args: Sequence[str]) -> Dict[str, object]:
    """`train_innercontrol.py` options of a command line (`--name value` or a flag; the last one given wins)."""
    out = {}
    for i, token in enumerate(train_args):
        if token.startswith("--"):
            nxt = train_args[i + 1] if i + 1 < len(train_args) else None
            out[token] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


def check_existing_runs(args):
    """
    Every run already in `--output_dir` must serve this call's curve, checked before anything is trained:

    - a run trained to more steps than `--max_train_steps`, or with a checkpoint beyond it, would be read as if it
      had stopped there;
    - every evaluated step up to a run's latest checkpoint needs its checkpoint (the same `--eval_every`);
    - a finished run trained to fewer steps is extended by resuming it (`run_experiment.train_run`), which gives
      the run `--max_train_steps` asks for only with the settings it was trained with and a learning rate that does
      not depend on the run's length; `--skip_training` cannot extend it.

    Every images folder already there must have been made with this call's scenes and generation settings (its
    `generation.json`, `evaluation.check_images_record`), or the report would mix two protocols after hours of
    training.

    Raises `ValueError` naming the run and the fix.
    """
    from diffusers_innercontrol.checkpointing import list_checkpoints

    check_existing_images(args)
    # --output_dir is the run's own folder, where it was found: a run moved or renamed since is the same run
    ignored = {"--max_train_steps", "--resume_from_checkpoint", "--output_dir"}
    for task in args.tasks:
        for mode in args.modes:
            for seed in args.seeds:
                out = experiment.run_dir(args, task, mode, seed)
                found = [step for step, _ in list_checkpoints(out)]
                before = experiment.run_record(out)
                steps = before["max_train_steps"] if before else None
                if (steps or 0) > args.max_train_steps or (found and found[-1] > args.max_train_steps):
                    have = steps if (steps or 0) > args.max_train_steps else found[-1]
                    raise ValueError(f"{out} was trained to step {have}, beyond --max_train_steps {args.max_train_steps}: "
                                     f"give --max_train_steps {have}, or a new --output_dir.")
                missing = [s for s in evaluated_steps(args.max_train_steps, args.eval_every)
                           if found and s <= found[-1] and s not in found]
                if missing:
                    raise ValueError(f"{out} has no checkpoint-{missing[0]}, which --eval_every {args.eval_every} "
                                     "evaluates: give the --eval_every it was trained with, or a new --output_dir.")
                if steps is None or steps >= args.max_train_steps:
                    continue
                if args.skip_training:
                    raise ValueError(f"{out} was trained to {steps} steps: drop --skip_training to extend it to "
                                     f"--max_train_steps {args.max_train_steps}, or give --max_train_steps {steps}.")
                now = _options(experiment.train_args_for(args, task, mode, seed, checkpointing_steps=args.eval_every))
                if before.get("train_args") is not None:
                    then = _options(before["train_args"])
                    differ = sorted(k for k in set(now) | set(then) if k not in ignored and now.get(k) != then.get(k))
                    if differ:
                        raise ValueError(f"{out} was trained with other settings ({', '.join(differ)}): extending it to "
                                         f"{args.max_train_steps} steps would mix two recipes. Give the options it was "
                                         "trained with, or a new --output_dir.")
                scheduler = now.get("--lr_scheduler", "constant")
                if scheduler not in ("constant", "constant_with_warmup"):
                    raise ValueError(f"{out} was trained to {steps} steps and --lr_scheduler {scheduler} depends on the "
                                     f"run's length: resuming it would not give the curve of a run trained to "
                                     f"{args.max_train_steps} steps from the start. Give a new --output_dir.")


def check_existing_images(args):
    """`DataError` (a `ValueError`) for an images folder in `--output_dir` made with other scenes or settings than
    `evaluate_task` would make them with now."""
    import glob

    from diffusers_innercontrol.evaluation import check_images_record, images_record
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    for task in args.tasks:
        dataset = ShapesWorldEvalSet(task, args.resolution, args.world_seed, args.eval_start_index, args.num_eval_conditions)
        made = images_record(dataset, args.num_inference_steps, args.guidance_scale, None, args.resolution)
        check_images_record(os.path.join(args.output_dir, task, "no-controlnet"), dict(made, with_control=False), write=False)
        check_images_record(os.path.join(args.output_dir, task, "real"), fidelity_scale.reference_record(dataset), write=False)
        for folder in sorted(glob.glob(os.path.join(glob.escape(args.output_dir), "runs", task, "*", "seed*", "eval*"))):
            check_images_record(folder, made, write=False)


# --------------------------------------------------------------------------------------------- evaluation
def evaluated_steps(max_train_steps: int, eval_every: int) -> List[int]:
    """The training steps whose ControlNet is evaluated: every `eval_every`, and the last one."""
    steps = list(range(eval_every, max_train_steps + 1, eval_every))
    return steps if steps and steps[-1] == max_train_steps else steps + [max_train_steps]


def weights_at(run_dir: str, step: int, max_train_steps: int) -> str:
    """The ControlNet weights of a run after `step` steps: its checkpoint, or the final save after the last step."""
    if step == max_train_steps:
        return os.path.join(run_dir, experiment.WEIGHTS_FILE)
    return os.path.join(run_dir, f"checkpoint-{step}", CHECKPOINT_WEIGHTS)


def images_at(run_dir: str, step: int, max_train_steps: int) -> str:
    """Where the images of a run after `step` steps go (`eval` for the last step, as in run_experiment.py)."""
    return os.path.join(run_dir, "eval" if step == max_train_steps else f"eval-step{step}")


def score(task, dataset, images_dir: str, evaluator, device) -> float:
    from diffusers_innercontrol.evaluation import compute_metrics
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    metrics = compute_metrics(task, dataset, range(len(dataset)), images_dir, seeds=[0], control_evaluator=evaluator,
                              device=device, progress=False)
    return float(metrics[CONTROL_METRICS[task.name][0]])


def no_controlnet_pipeline(pipe):
    """The toy SD alone, from the components of a ControlNet pipeline (the fidelity scale's ceiling)."""
    from diffusers import StableDiffusionPipeline

    parts = {k: v for k, v in pipe.components.items() if k not in ("controlnet", "safety_checker", "feature_extractor")}
    plain = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    return plain


def evaluate_task(args, task_name: str, runs: Sequence[Dict], device) -> Dict:
    """Floor, ceiling and every run's curve of one task; fills each record's `curve`."""
    from safetensors.torch import load_file

    from diffusers_innercontrol.evaluation import generate_images, load_generation_pipeline
    from diffusers_innercontrol.metrics import fidelity_closure
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    task = get_task(task_name)
    dataset = ShapesWorldEvalSet(task, args.resolution, args.world_seed, args.eval_start_index, args.num_eval_conditions)
    evaluator = experiment.fidelity_evaluator(args, task_name).to(device)
    gen = dict(seeds=[0], num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
               negative_prompt=None, resolution=args.resolution, progress=False, conditions_per_call=args.scenes_per_batch)
    base = os.path.join(args.output_dir, task_name)
    fidelity_scale.save_reference_images(dataset, os.path.join(base, "real"))
    floor = score(task, dataset, os.path.join(base, "real"), evaluator, device)
    steps = evaluated_steps(args.max_train_steps, args.eval_every)
    ceiling = None
    for record in runs:
        if record["train"] == "missing":
            continue
        pipe = load_generation_pipeline(args.pretrained_model_name_or_path, record["dir"]).to(device)
        if ceiling is None:
            generate_images(no_controlnet_pipeline(pipe), dataset, range(len(dataset)), os.path.join(base, "no-controlnet"),
                            with_control=False, **gen)
            ceiling = score(task, dataset, os.path.join(base, "no-controlnet"), evaluator, device)
        values = [ceiling]  # step 0: the zero-initialised ControlNet adds nothing
        for step in steps:
            weights = weights_at(record["dir"], step, args.max_train_steps)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"{weights} is missing: the run saves a checkpoint every --eval_every steps; "
                                        "train it again with the same --eval_every.")
            pipe.controlnet.load_state_dict(load_file(weights))
            out = images_at(record["dir"], step, args.max_train_steps)
            generate_images(pipe, dataset, range(len(dataset)), out, **gen)
            values.append(score(task, dataset, out, evaluator, device))
            logger.info(f"{task_name}/{record['mode']}/seed{record['seed']} step {step}: {values[-1]:.4f}")
        record["curve"] = {"steps": [0] + steps, "values": values,
                           "closures": [fidelity_closure(v, floor, ceiling) for v in values]}
        record["metrics"] = {"control": values[-1]}  # what run_experiment.sample_grid looks for
        del pipe
    return {"floor": floor, "ceiling": ceiling, "steps": [0] + steps, "num_conditions": len(dataset)}


# --------------------------------------------------------------------------------------------- reports
def target_key(level: float) -> str:
    """The key of a `--target_closure` level in the summary (`0.25` -> `"0.25"`)."""
    return repr(float(level))


def welch_or_none(values: Sequence[float], baseline: Sequence[float]) -> Optional[Dict]:
    """`metrics.welch_test`, or None where a side has fewer than 2 seeds or neither side varies (no test to make)."""
    from diffusers_innercontrol.metrics import welch_test

    if len(values) < 2 or len(baseline) < 2 or (len(set(values)) == 1 and len(set(baseline)) == 1):
        return None
    return welch_test(values, baseline)


def closure_tests(closures: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> List[Optional[Dict]]:
    """
    Welch's test of a mode's closures against the baseline's at every evaluated step (`closures[seed][step]`):
    `welch_or_none` per step (None at step 0, where every run is the toy SD alone).
    """
    return [welch_or_none([c[i] for c in closures], [c[i] for c in baseline]) for i in range(len(closures[0]) if closures else 0)]


def summarize_level(closures: Sequence[Sequence[float]], seeds: Sequence[int], steps: Sequence[int], level_from: int,
                    baseline: Optional[Dict] = None) -> Dict:
    """
    Where a mode's curves level off (`closures[seed][step]`): per seed `metrics.curve_level` from step `level_from`
    on (the mean closure and its slope, given per 1000 steps), their mean and standard deviation over seeds, and
    Welch's test of the per-seed means against `baseline` (the `controlnet` mode's own summary) where there is one.
    """
    from diffusers_innercontrol.metrics import curve_level

    levels = [curve_level(steps, c, level_from) for c in closures]
    per_seed = [{"seed": seed, "closure": lv["mean"], "slope_per_1000_steps": 1000 * lv["slope"]}
                for seed, lv in zip(seeds, levels)]
    out = {"from": level_from, "evaluations": levels[0]["n"], "per_seed": per_seed,
           "closure": experiment.mean_std([r["closure"] for r in per_seed]),
           "slope_per_1000_steps": experiment.mean_std([r["slope_per_1000_steps"] for r in per_seed])}
    out["vs_controlnet"] = (welch_or_none([r["closure"] for r in per_seed], [r["closure"] for r in baseline["per_seed"]])
                            if baseline else None)
    return out


def summarize_task(runs: Sequence[Dict], task: str, modes: Sequence[str], targets: Sequence[float],
                   level_from: Optional[int] = None) -> Dict:
    """
    Per mode: the closure at every evaluated step (mean and standard deviation over seeds), Welch's test of it
    against the `controlnet` mode at every step (`closure_vs_controlnet`, `closure_tests`), and for every level in
    `targets`, under `targets[target_key(level)]`, the steps to reach it (per seed, their mean and standard
    deviation when every seed reached it, and Welch's test against the `controlnet` mode when every seed of both
    modes reached it). With `level_from`, also `level`: where the curves level off from that step on
    (`summarize_level`; the `controlnet` mode first, the others tested against it).
    """
    from diffusers_innercontrol.metrics import steps_to_reach

    rows = {mode: sorted((r for r in runs if r["task"] == task and r["mode"] == mode and "curve" in r),
                         key=lambda r: r["seed"]) for mode in modes}
    base_rows = rows.get("controlnet", [])
    out = {}
    for mode in modes:
        if not rows[mode]:
            out[mode] = {"seeds": []}
            continue
        steps = rows[mode][0]["curve"]["steps"]
        closures = [r["curve"]["closures"] for r in rows[mode]]
        out[mode] = {
            "seeds": [r["seed"] for r in rows[mode]],
            "steps": steps,
            "closure": [experiment.mean_std([c[i] for c in closures]) for i in range(len(steps))],
            "closure_vs_controlnet": (closure_tests(closures, [r["curve"]["closures"] for r in base_rows])
                                      if mode != "controlnet" and base_rows else None),
            "targets": {},
        }
        for level in targets:
            per_seed = [steps_to_reach(steps, c, level) for c in closures]
            reached = [s for s in per_seed if s is not None]
            out[mode]["targets"][target_key(level)] = {
                "level": level,
                "steps_to_target": per_seed,
                "stats": experiment.mean_std(reached) if len(reached) == len(per_seed) else None,
                "reached": len(reached),
            }
    # Welch's test only where every seed of both modes reached the target: dropping the seeds that did not (the
    # slowest) would bias the comparison; such a mode is reported by how many seeds reached it.
    for mode, entry in out.items():
        for key, mine in entry.get("targets", {}).items():
            base = out.get("controlnet", {}).get("targets", {}).get(key, {}).get("steps_to_target", [])
            complete = all(s is not None for s in mine["steps_to_target"] + base)
            mine["vs_controlnet"] = welch_or_none(mine["steps_to_target"], base) if mode != "controlnet" and complete else None
    if level_from is not None:
        for mode in sorted((m for m in modes if rows[m]), key=lambda m: m != "controlnet"):  # the baseline first
            base = out.get("controlnet", {}).get("level") if mode != "controlnet" else None
            out[mode]["level"] = summarize_level([r["curve"]["closures"] for r in rows[mode]], out[mode]["seeds"],
                                                 out[mode]["steps"], level_from, base)
    return out


def results_markdown(result: Dict) -> str:
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    a = result["args"]
    targets = a["target_closure"]
    lines = ["# ShapesWorld: ControlNets trained from scratch", "",
             f"Every ControlNet starts from the toy SD's UNet; {a['max_train_steps']} steps at batch {a['train_batch_size']}, "
             f"lr {a['learning_rate']} ({a['lr_scheduler']}, {a['lr_warmup_steps']} warm-up steps), seeds {a['seeds']}. "
             f"Evaluated every {a['eval_every']} steps on {a['num_eval_conditions']} held-out scenes (from "
             f"{a['eval_start_index']}), {a['num_inference_steps']} UniPC steps, guidance {a['guidance_scale']}. Closure: "
             "(no ControlNet - value) / (no ControlNet - real images), mean ± standard deviation over seeds.", ""]
    for task, info in result["tasks"].items():
        name = CONTROL_METRICS[task][1]
        if info["ceiling"] is None:
            lines += [f"## {task}", "", "No trained run to evaluate.", ""]
            continue
        lines += [f"## {task}", "",
                  f"{name}: real images (floor) {info['floor']:.4f}, toy SD without ControlNet (ceiling) {info['ceiling']:.4f}.", ""]
        summary = {mode: entry for mode, entry in result["summary"][task].items() if entry["seeds"]}
        steps = info["steps"]
        lines += ["| mode | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for mode, entry in summary.items():
            cells = [f"{100 * c['mean']:.0f} ± {100 * c['std']:.0f} %" if c["mean"] is not None else "-" for c in entry["closure"]]
            lines.append(f"| {result['mode_labels'][mode]} | " + " | ".join(cells) + " |")
        lines += ["", "Steps to reach each closure level (mean ± standard deviation over seeds; the difference to the "
                  "ControlNet with its 95 % interval and Welch's p):", "",
                  "| mode | " + " | ".join(f"steps to {100 * level:g} % closure" for level in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        for mode, entry in summary.items():
            cells = []
            for level in targets:
                reach = entry["targets"][target_key(level)]
                stats, test = reach["stats"], reach["vs_controlnet"]
                cell = (f"{stats['mean']:.0f} ± {stats['std']:.0f}" if stats else
                        f"{reach['reached']} of {len(entry['seeds'])} seeds reached it")
                cells.append(cell + (f": {experiment.format_difference(test, digits=0)}, p = {experiment.format_p(test)}"
                                     if test else ""))
            lines.append(f"| {result['mode_labels'][mode]} | " + " | ".join(cells) + " |")
        lines += level_markdown(result, summary)
        tested = {mode: entry for mode, entry in summary.items() if any(entry.get("closure_vs_controlnet") or [])}
        if tested:
            lines += ["", "Closure difference to the ControlNet per step, in points (Welch's p, one test per step, not "
                      "corrected for multiple comparisons):", "",
                      "| mode | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
            for mode, entry in tested.items():
                cells = ["-" if t is None else f"{100 * t['diff']:+.1f} ({experiment.format_p(t)})"
                         for t in entry["closure_vs_controlnet"]]
                lines.append(f"| {result['mode_labels'][mode]} | " + " | ".join(cells) + " |")
        lines.append("")
        if task in result.get("plots", {}):
            lines += [f"![{task}: closure against steps]({result['plots'][task]})", ""]
        if task in result.get("grids", {}):
            lines += [f"![{task}: control | real | each mode after the last step]({result['grids'][task]})", ""]
    lines.append(f"Wall time: {result['seconds']} s.")
    return "\n".join(lines) + "\n"


def level_markdown(result: Dict, summary: Dict) -> List[str]:
    """The `--level_from` table of a task (no lines without it): per mode the level and slope over seeds, the
    difference to the ControlNet, and each seed's level."""
    with_level = {mode: entry for mode, entry in summary.items() if entry.get("level")}
    if not with_level:
        return []
    first = next(iter(with_level.values()))["level"]
    lines = ["", f"Level from step {first['from']}: per seed the mean closure over the {first['evaluations']} evaluations "
             "from there on and its least-squares slope; mean ± standard deviation over seeds, and the difference to "
             "the ControlNet in points with its 95 % interval and Welch's p:", "",
             "| mode | level | slope (points per 1000 steps) | difference to ControlNet | p | per seed |", "|---|---|---|---|---|---|"]
    for mode, entry in with_level.items():
        lv = entry["level"]
        c, sl = lv["closure"], lv["slope_per_1000_steps"]
        seeds = ", ".join(f"{r['seed']}: {100 * r['closure']:.1f}" for r in lv["per_seed"])
        lines.append(f"| {result['mode_labels'][mode]} | {100 * c['mean']:.1f} ± {100 * c['std']:.1f} % | "
                     f"{100 * sl['mean']:+.2f} ± {100 * sl['std']:.2f} | "
                     f"{experiment.format_difference(lv['vs_controlnet'], 100, 1)} | {experiment.format_p(lv['vs_controlnet'])} | "
                     f"{seeds} |")
    return lines


def write_plots(result: Dict, output_dir: str) -> Dict[str, str]:
    """Closure against steps with a mean ± standard deviation band per mode; {} (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plots_note"] = "Plots skipped: matplotlib is not installed (pip install matplotlib)."
        return {}
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    paths = {}
    for task, summary in result["summary"].items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for mode, entry in summary.items():
            if not entry["seeds"]:
                continue
            mean = [c["mean"] for c in entry["closure"]]
            std = [c["std"] for c in entry["closure"]]
            ax.plot(entry["steps"], mean, marker="o", label=result["mode_labels"][mode])
            ax.fill_between(entry["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        for level in result["args"]["target_closure"]:
            ax.axhline(level, color="grey", linestyle="--", linewidth=1)
        paths[task] = experiment.save_plot(fig, ax, output_dir, f"{task}_curves", "training steps (from the UNet)",
                                           "closure of the fidelity gap",
                                           f"{task}: ControlNets from scratch (mean ± std over seeds)")
    return paths


# --------------------------------------------------------------------------------------------- main
def main(args) -> Dict:
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    device, t0 = experiment.start(args)
    experiment.ensure_train_data(args)
    runs = experiment.train_runs(args, checkpointing_steps=args.eval_every)

    tasks, summary, grids = {}, {}, {}
    for task in args.tasks:
        task_runs = [r for r in runs if r["task"] == task]
        tasks[task] = evaluate_task(args, task, task_runs, device)
        summary[task] = summarize_task(runs, task, args.modes, args.target_closure, args.level_from)
        dataset = ShapesWorldEvalSet(task, args.resolution, args.world_seed, args.eval_start_index, args.num_eval_conditions)
        grid = experiment.sample_grid(dataset, task_runs, args.modes, min(4, len(dataset)), 0)
        if grid is not None:
            os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
            grids[task] = os.path.join("grids", f"{task}.png")
            grid.save(os.path.join(args.output_dir, grids[task]))
    result = {"args": dict(vars(args)), "runs": runs, "tasks": tasks, "summary": summary, "grids": grids,
              "mode_labels": {m: experiment.MODES[m][0] for m in args.modes}}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return experiment.write_results(result, args.output_dir, write_plots, results_markdown, "from_scratch.md")


def cli_main(argv=None):
    return experiment.run_cli(parse_args, main, argv)


if __name__ == "__main__":
    cli_main()
