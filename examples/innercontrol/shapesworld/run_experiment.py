#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The protocol of the paper's Table 2 and Fig. 2 in ShapesWorld (issue 5).

For every task (default depth and hed) and seed (default 0, 1, 2), a ControlNet is continued from the task's
toy ControlNet (or initialised from the UNet) with `train_innercontrol.py` in each mode:

| mode | alpha | beta | reward window |
|---|---|---|---|
| `controlnet` | 0 | 0 | - (the diffusion loss alone) |
| `alignment` | 0 | task's | - |
| `reward200` | task's | 0 | 0..199 |
| `reward_all` | task's | 0 | 0..999 |
| `reward200_alignment` | task's | task's | 0..199 |

Each run is a separate `accelerate launch` process (isolation: no state leaks between runs; a run that
finished is skipped when the driver is started again). Then every ControlNet is evaluated on held-out
ShapesWorld scenes (indices after the training ones):

- control fidelity with the *evaluation* models (wider and trained separately from the reward models,
  `train_toy_evaluators.py --model_kind eval`; default: the bundled `eval-<task>`): HED and LineArt SSIM
  (`metrics.edge_ssim`) of the evaluator's edge map against the exact control, depth RMSE (`metrics.depth_rmse`),
  segmentation mIoU;
- FID with the toy evaluator's features (`EvaluatorFeatures`: the depth evaluation model's mean-pooled ViT
  tokens by default; `metrics.build_fid` with an `nn.Module`);
- KID (`metrics.build_kid`, torchmetrics) of every mode's images pooled over its seeds against `--num_kid_real`
  real held-out images, on the features of a ShapesWorld model that is neither the task's reward nor its fidelity
  evaluator (default: the segmentation evaluation UperNet, and the depth evaluation DPT for segmentation);
- each mode against the diffusion-loss baseline, and reward t < 200 + alignment against reward t < 200 alone:
  the difference of the means over seeds with its 95 % interval and Welch's t-test (`metrics.welch_test`);
- per timestep bucket, on one reference ControlNet per task (the first evaluated run), the error against the
  control of (a) the readout probe on the UNet's decoder features and (b) the evaluator on the VAE decode of
  the one-step x0 estimate (`losses.one_step_x0`, Eq. 5), both from the same noisy latents and measured with
  the same per-sample loss (`losses.reward_loss_per_sample`: MSE against the control for hed/depth, the probe
  mapped by `losses.probe_to_unit`; cross-entropy for segmentation): the paper's Fig. 2.

Output in `--output_dir`: `results.json` (every run, every number), `shapesworld.md` (mean +- std over seeds
in markdown tables; the layout of docs/shapesworld.md), `plots/*.png` (matplotlib, skipped with a note if it
is not installed) and the per-run folders `runs/{task}/{mode}/seed{seed}` (ControlNet, train.log, images).

    python run_experiment.py --pretrained_model_name_or_path toy-sd --train_data_dir shapes64 \
      --depth_controlnet toy-cn-depth --hed_controlnet toy-cn-hed --depth_probe probe-depth --hed_probe probe-hed \
      --depth_reward_model toy-depth-reward --hed_reward_model toy-hed-reward --output_dir shapesworld-experiment --jobs 2

`--quick` shrinks every count (2 steps, 2 conditions, 2 inference steps, 2 buckets) for the tests.
"""

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("run_experiment")

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.normpath(os.path.join(HERE, "..", "train_innercontrol.py"))
TASKS = ("hed", "lineart", "depth", "segmentation")
# mode -> (label, overrides of the task's alpha / beta / reward window; None keeps the task's value)
MODES = {
    "controlnet": ("ControlNet (diffusion loss only)", dict(alpha=0.0, beta=0.0)),
    "alignment": ("Alignment only", dict(alpha=0.0)),
    "reward200": ("Reward, t < 200", dict(beta=0.0, reward_window="0,199")),
    "reward_all": ("Reward, all t", dict(beta=0.0, reward_window="0,999")),
    "reward200_alignment": ("Reward t < 200 + alignment", dict(reward_window="0,199")),
}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _csv(kind):
    def parse(value: str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        return [kind(v) for v in items]

    return parse


def add_model_args(parser: argparse.ArgumentParser, continue_controlnets: bool = True):
    """The "models and data" options (shared with `from_scratch.py`, which starts every ControlNet from the UNet)."""
    g = parser.add_argument_group("models and data")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="The toy SD pipeline folder.")
    g.add_argument("--train_data_dir", type=str, required=True,
                   help="ShapesWorld image folder (ShapesWorld(...).save_imagefolder); written with --num_train_samples scenes if missing.")
    g.add_argument("--num_train_samples", type=int, default=2000, help="Scenes written when --train_data_dir is missing.")
    g.add_argument("--world_seed", type=int, default=0, help="ShapesWorld seed of the data (and the held-out scenes).")
    g.add_argument("--resolution", type=int, default=64)
    for task in TASKS:
        if continue_controlnets:
            g.add_argument(f"--{task}_controlnet", type=str, default=None,
                           help=f"The toy {task} ControlNet to continue (default: from the UNet).")
        g.add_argument(f"--{task}_probe", type=str, default=None, help=f"The {task} readout probe (train_probe.py).")
        g.add_argument(f"--{task}_reward_model", type=str, default=None, help=f"The {task} reward model (train_toy_evaluators.py).")
    g.add_argument("--hed_reward_model_filename", type=str, default=None,
                   help="Weights file inside --hed_reward_model when it holds controlnet_aux HED weights (the toy HED reward is a DPT folder: none).")
    for task in TASKS:
        g.add_argument(f"--{task}_eval_model", type=str, default=None,
                       help=f"The {task} evaluation model (train_toy_evaluators.py --model_kind eval; default: the bundled eval-{task}).")
    return g


def add_training_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("training (each run)")
    g.add_argument("--max_train_steps", type=int, default=300)
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", type=str, default="constant", help="train_innercontrol.py's --lr_scheduler.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    g.add_argument("--extra_train_args", type=str, default="", help="More train_innercontrol.py arguments (one shell-quoted string).")
    return g


def add_generation_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("evaluation")
    g.add_argument("--num_eval_conditions", type=int, default=64, help="Held-out scenes (after the training ones).")
    g.add_argument("--eval_start_index", type=int, default=None, help="First held-out scene (default: after the training scenes: --num_train_samples, or the scenes already in "
                   "--train_data_dir where it holds more; scenes that overlap those are refused).")
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--device", type=str, default=None, help="Evaluation device (default: cuda if available).")
    return g


def training_scenes(train_data_dir: str) -> Optional[Tuple[int, int]]:
    """`(first, last + 1)` of the scenes in a ShapesWorld `--train_data_dir` (`ShapesWorld.save_imagefolder` names
    each image by its scene); None where the folder is not written yet or its images are not named so."""
    path = os.path.join(train_data_dir, "metadata.jsonl")
    if not os.path.isfile(path):
        return None
    scenes = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                stem = os.path.splitext(os.path.basename(json.loads(line).get("file_name", "")))[0]
                if not stem.isdigit():
                    return None
                scenes.append(int(stem))
    return (min(scenes), max(scenes) + 1) if scenes else None


def set_eval_models(args):
    """
    The held-out scenes: by default they start after the training ones (after `--num_train_samples`, or after the
    scenes already in `--train_data_dir` where it holds more); given ones that overlap the training scenes (those
    of `--train_data_dir`, or the `--num_train_samples` it will be written with) are refused, and so is a start
    other than that of the `results.json` already in `--output_dir` (its images are named by position). Raises
    `ValueError` naming the fix. The bundled `eval-<task>` evaluates every task whose `--<task>_eval_model` is not
    given.
    """
    from diffusers_innercontrol.toy.quickstart import bundled_path

    held = training_scenes(args.train_data_dir) or (0, args.num_train_samples)  # ensure_train_data writes 0 .. N - 1
    # every held-out set starts at --eval_start_index: the scored scenes, Fig. 2's and KID's real images
    n = max(args.num_eval_conditions, getattr(args, "num_bucket_conditions", 0), getattr(args, "num_kid_real", 0))
    given = args.eval_start_index is not None
    if not given:
        args.eval_start_index = max(args.num_train_samples, held[1])
    elif args.eval_start_index < held[1] and args.eval_start_index + n > held[0]:
        raise ValueError(f"--eval_start_index {args.eval_start_index}: the held-out scenes {args.eval_start_index}-"
                         f"{args.eval_start_index + n - 1} overlap the training scenes {held[0]}-{held[1] - 1} of "
                         f"--train_data_dir {args.train_data_dir}; give --eval_start_index {held[1]} or more.")
    earlier = os.path.join(args.output_dir, "results.json")
    if os.path.isfile(earlier):
        with open(earlier) as f:
            start = json.load(f).get("args", {}).get("eval_start_index")
        if start is not None and start != args.eval_start_index:
            raise ValueError(f"--output_dir {args.output_dir} was evaluated on held-out scenes from {start} (its results.json), "
                             f"this call {'asks for' if given else 'would start at'} {args.eval_start_index}: give "
                             f"--eval_start_index {start}, or another --output_dir.")
    for task in TASKS:
        if getattr(args, f"{task}_eval_model") is None:
            setattr(args, f"{task}_eval_model", bundled_path(f"eval-{task}"))


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ShapesWorld: the paper's Table 2 / Fig. 2 protocol.")
    g = parser.add_argument_group("protocol")
    g.add_argument("--tasks", type=_csv(str), default=["depth", "hed"], help="Comma-separated tasks (hed, depth, segmentation).")
    g.add_argument("--modes", type=_csv(str), default=list(MODES), help=f"Comma-separated modes: {', '.join(MODES)}.")
    g.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="Training seeds (one ControlNet per task x mode x seed).")
    g.add_argument("--quick", action="store_true", help="Tiny counts everywhere (tests): 2 steps, 2 conditions, 2 buckets.")
    g.add_argument("--output_dir", type=str, default="shapesworld-experiment")
    g.add_argument("--skip_training", action="store_true", help="Only evaluate the runs already in --output_dir.")
    g.add_argument("--fig2_only", action="store_true",
                   help="Only Fig. 2: the probe's and the evaluator's errors per timestep bucket on each task's "
                        "--<task>_controlnet (no training, no generation).")
    g.add_argument("--jobs", type=int, default=1,
                   help="Training runs at once (separate processes; each gets cpu_count / jobs threads unless "
                        "OMP_NUM_THREADS is set). On a 2-core CPU, 2 single-threaded runs beat one with 2 threads.")
    g = add_model_args(parser, continue_controlnets=True)
    g.add_argument("--kid_feature_model", type=str, default=None,
                   help="ShapesWorld model (a DPT or UperNet folder) whose features KID uses; default: the segmentation "
                        "evaluation model, or the depth one for segmentation (neither the task's reward nor its evaluator).")
    g.add_argument("--fid_feature_model", type=str, default=None,
                   help="Toy evaluator whose features FID uses (a DPT or UperNet folder); default: the depth evaluation model.")
    add_training_args(parser)
    g = add_generation_args(parser)
    g.add_argument("--generation_seeds", type=_csv(int), default=[0], help="Images per condition (one per seed).")
    g.add_argument("--num_kid_real", type=int, default=1000, help="Real held-out images KID compares each mode's images with.")
    g.add_argument("--kid_subset_size", type=int, default=1000,
                   help="Images per side in each of KID's subsets (at most the smaller side's count).")
    g.add_argument("--kid_subsets", type=int, default=100, help="KID's random subsets (its mean and spread are over them).")
    g.add_argument("--num_buckets", type=int, default=10, help="Timestep buckets of the probe / one-step-x0 errors.")
    g.add_argument("--num_bucket_conditions", type=int, default=32, help="Held-out scenes for the bucket errors.")
    g.add_argument("--eval_batch_size", type=int, default=8)
    g.add_argument("--num_grid_rows", type=int, default=4, help="Held-out conditions shown in each task's sample grid.")
    args = parser.parse_args(input_args)
    if args.quick:
        args.max_train_steps, args.train_batch_size = 2, 2
        args.num_eval_conditions, args.num_bucket_conditions = 2, 2
        args.num_inference_steps, args.num_buckets, args.eval_batch_size = 2, 2, 2
        args.num_kid_real, args.kid_subsets = 4, 5
        args.generation_seeds = args.generation_seeds[:1]
        if args.num_train_samples > 8:
            args.num_train_samples = 8
    set_eval_models(args)
    validate_args(args)
    return args


def validate_args(args):
    """Every check that needs no model weights; raises `ValueError` naming the option and the fix."""
    check_tasks_modes_seeds(args)
    for task in args.tasks if args.fig2_only else ():
        for option in ("controlnet", "probe"):
            if not getattr(args, f"{task}_{option}"):
                raise ValueError(f"--fig2_only reads {task}'s ControlNet and probe: pass --{task}_{option}.")
    if not args.fig2_only:
        check_run_models(args)
    for name in ("jobs", "max_train_steps", "train_batch_size", "num_eval_conditions", "num_inference_steps", "num_buckets",
                 "num_bucket_conditions", "eval_batch_size", "kid_subsets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    if args.num_kid_real < 2 or args.kid_subset_size < 2:
        raise ValueError("--num_kid_real and --kid_subset_size must be >= 2 (KID compares sets of images).")
    if args.num_eval_conditions < 2:
        raise ValueError("--num_eval_conditions must be >= 2 (FID needs two images on each side).")
    if not args.generation_seeds:
        raise ValueError("--generation_seeds: give at least one seed.")


def check_tasks_modes_seeds(args):
    """Known tasks and modes, at least one seed, and the toy SD pipeline folder (`ValueError` naming the option)."""
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        raise ValueError(f"--tasks {bad or args.tasks}: choose from {', '.join(TASKS)}.")
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise ValueError(f"--modes {bad or args.modes}: choose from {', '.join(MODES)}.")
    if not args.seeds:
        raise ValueError("--seeds: give at least one seed.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {','.join(map(str, args.seeds))}: a seed is repeated (the same run twice); give each once.")
    if not os.path.isdir(args.pretrained_model_name_or_path):
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is not a folder "
                         "(the toy SD pipeline: pretrain_toy_sd.py --output_dir).")


def check_run_models(args):
    """Every task has the reward model, probe and evaluation model its `--modes` need (`ValueError` naming the option)."""
    for task in args.tasks:
        alpha_modes = [m for m in args.modes if MODES[m][1].get("alpha", None) != 0.0]
        beta_modes = [m for m in args.modes if MODES[m][1].get("beta", None) != 0.0]
        if alpha_modes and not getattr(args, f"{task}_reward_model"):
            raise ValueError(f"Modes {alpha_modes} use the reward: pass --{task}_reward_model (train_toy_evaluators.py).")
        if beta_modes and not getattr(args, f"{task}_probe"):
            raise ValueError(f"Modes {beta_modes} use the alignment: pass --{task}_probe (train_probe.py).")
        if not getattr(args, f"{task}_eval_model"):
            raise ValueError(f"--{task}_eval_model is needed to evaluate {task} (train_toy_evaluators.py --model_kind eval).")


# --------------------------------------------------------------------------------------------- math
def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the numbers that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(xs)}


def format_difference(test: Optional[Dict], scale: float = 1.0, digits: int = 3) -> str:
    """`"+d [lo, hi]"` of a `metrics.welch_test` (times `scale`), `"-"` without one."""
    if not test:
        return "-"
    d, lo, hi = (test[k] * scale for k in ("diff", "ci_low", "ci_high"))
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def format_p(test: Optional[Dict]) -> str:
    return "-" if not test else (f"{test['p']:.3f}" if test["p"] >= 0.001 else f"{test['p']:.1e}")


def format_test(test: Optional[Dict], scale: float = 1.0, digits: int = 3) -> str:
    """`"+d [lo, hi], p"` of a `metrics.welch_test`, `"-"` without one."""
    return "-" if not test else f"{format_difference(test, scale, digits)}, {format_p(test)}"


def format_kid(kid: Optional[Dict]) -> str:
    """KID x 1000 ± its spread over subsets, `"-"` without one."""
    return "-" if not kid else f"{kid['mean'] * 1000:.2f} ± {kid['std'] * 1000:.2f}"


def format_mean_std(stats: Dict[str, Optional[float]], digits: int = 3) -> str:
    """`"m ± s"` with `digits` decimals, `"m"` alone for a single value, `"-"` without values."""
    if stats.get("mean") is None:
        return "-"
    if stats.get("n", 2) <= 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


# --------------------------------------------------------------------------------------------- data
def ensure_train_data(args):
    """Write the ShapesWorld image folder when it does not exist yet."""
    if os.path.isfile(os.path.join(args.train_data_dir, "metadata.jsonl")):
        return
    from diffusers_innercontrol.toy.shapesworld import ShapesWorld

    logger.info(f"Writing {args.num_train_samples} ShapesWorld scenes to {args.train_data_dir}")
    ShapesWorld(size=args.resolution, seed=args.world_seed).save_imagefolder(args.train_data_dir, args.num_train_samples)


# --------------------------------------------------------------------------------------------- training
def run_dir(args, task: str, mode: str, seed: int) -> str:
    return os.path.join(args.output_dir, "runs", task, mode, f"seed{seed}")


def train_args_for(args, task: str, mode: str, seed: int, checkpointing_steps: Optional[int] = None) -> List[str]:
    """The `train_innercontrol.py` command line of one run (a checkpoint every `checkpointing_steps`; default: none)."""
    overrides = MODES[mode][1]
    out = [
        "--task", task, "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
        "--train_data_dir", args.train_data_dir, "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate), "--seed", str(seed), "--output_dir", run_dir(args, task, mode, seed),
        "--report_to", "none", "--checkpointing_steps", str(checkpointing_steps or args.max_train_steps + 1),
        "--mixed_precision", args.mixed_precision, "--lr_scheduler", args.lr_scheduler,
        "--lr_warmup_steps", str(args.lr_warmup_steps),
    ]
    for name in ("alpha", "beta"):
        if name in overrides:
            out += [f"--{name}", str(overrides[name])]
    if "reward_window" in overrides:
        out += ["--reward_window", overrides["reward_window"]]
    uses_reward = overrides.get("alpha", None) != 0.0
    uses_alignment = overrides.get("beta", None) != 0.0
    if getattr(args, f"{task}_controlnet", None):  # else from the UNet (zero-initialised outputs)
        out += ["--controlnet_model_name_or_path", getattr(args, f"{task}_controlnet")]
    if uses_alignment:
        out += ["--probe_model_name_or_path", getattr(args, f"{task}_probe")]
    if uses_reward:
        out += ["--reward_model_name_or_path", getattr(args, f"{task}_reward_model")]
        if task == "hed" and args.hed_reward_model_filename:
            out += ["--reward_model_filename", args.hed_reward_model_filename]
    return out + shlex.split(args.extra_train_args)


def launch_command(train_args: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1",
           "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        cmd += ["--cpu"]
    return cmd + [TRAIN_SCRIPT] + train_args


RUN_RECORD = "run.json"  # what train_run trained: the steps and the command line, for extending a finished run


def run_record(out: str) -> Optional[Dict]:
    """
    What a finished run was trained with: `{"max_train_steps", "train_args"}` from its `run.json`, or for a run
    trained before that file existed, the steps of the last "trained N steps" line of its `train.log`
    (`train_args` None). None when neither says.
    """
    import re

    path = os.path.join(out, RUN_RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    log = os.path.join(out, "train.log")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            found = re.findall(r"\] trained (\d+) steps", f.read())
        if found:
            return {"max_train_steps": int(found[-1]), "train_args": None}
    return None


def train_run(args, task: str, mode: str, seed: int, checkpointing_steps: Optional[int] = None) -> Dict:
    """
    Train one ControlNet in its own process (skipped when its weights exist). Returns the run's record.

    With `checkpointing_steps`, the run saves a checkpoint every so many steps and, started again after an
    interruption, resumes from its latest one; a finished run trained to fewer steps than `--max_train_steps`
    (`run_record`) is resumed from its latest checkpoint too, its final weights (with their config) and `eval`
    images moved to `superseded-<steps>/` first (record: `extended_from`). Whether extending it gives the run that
    `--max_train_steps` asks for is the caller's check (`from_scratch.check_existing_runs`).
    """
    out = run_dir(args, task, mode, seed)
    record = {"task": task, "mode": mode, "seed": seed, "dir": out}
    finished = os.path.isfile(os.path.join(out, WEIGHTS_FILE))
    before = run_record(out)  # an interrupted extension has moved the weights, not the record
    shorter = bool(checkpointing_steps and before and before["max_train_steps"] < args.max_train_steps)
    if finished and not shorter:
        record["train"] = "reused"
        return record
    if getattr(args, "skip_training", False):
        record["train"] = "reused" if finished else "missing"
        return record
    if shorter:
        record["extended_from"] = before["max_train_steps"]
    if shorter and finished:  # the weights last: they mark the run finished, an interruption in between redoes it
        keep = os.path.join(out, f"superseded-{before['max_train_steps']}")
        os.makedirs(keep, exist_ok=True)
        shutil.copy(os.path.join(out, "config.json"), keep)
        for name in ("eval", WEIGHTS_FILE):
            if os.path.exists(os.path.join(out, name)):
                os.replace(os.path.join(out, name), os.path.join(keep, name))
    os.makedirs(out, exist_ok=True)
    train_args = train_args_for(args, task, mode, seed, checkpointing_steps)
    if checkpointing_steps:
        train_args += ["--resume_from_checkpoint", "latest"]
    cmd = launch_command(train_args)
    logger.info(f"training {task}/{mode}/seed{seed}: {shlex.join(cmd)}")
    t0 = time.perf_counter()
    with open(os.path.join(out, "train.log"), "a") as log:  # a resumed run keeps the interrupted attempt's log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    record["train_seconds"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        with open(os.path.join(out, "train.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"Training {task}/{mode}/seed{seed} failed ({proc.returncode}); {out}/train.log ends:\n{tail}")
    tmp = os.path.join(out, RUN_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"max_train_steps": args.max_train_steps, "train_args": train_args}, f, indent=1)
    os.replace(tmp, os.path.join(out, RUN_RECORD))
    record["train"] = "trained"
    return record


def train_runs(args, checkpointing_steps: Optional[int] = None) -> List[Dict]:
    """`train_run` for every task x mode x seed, `--jobs` at once (independent processes); records in that order."""
    jobs = [(task, mode, seed) for task in args.tasks for mode in args.modes for seed in args.seeds]
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            return list(pool.map(lambda job: train_run(args, *job, checkpointing_steps=checkpointing_steps), jobs))
    return [train_run(args, *job, checkpointing_steps=checkpointing_steps) for job in jobs]


# --------------------------------------------------------------------------------------------- evaluation
class EvaluatorFeatures(nn.Module):
    """
    FID features from a toy evaluation model: `(B, 3, H, W)` in `[0, 1]` -> `(B, D)`.

    DPT: the mean of the ViT's last hidden states (its input preprocessing: resize to `config.image_size`,
    mean = std = 0.5). UperNet: the global average of the last ConvNext stage (ImageNet normalisation).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind = model.config.model_type
        if self.kind not in ("dpt", "upernet"):
            raise ValueError(f"EvaluatorFeatures takes a DPT or UperNet model, got {self.kind!r}.")
        with torch.no_grad():
            size = getattr(model.config, "image_size", 64) if self.kind == "dpt" else 64
            self.num_features = int(self(torch.zeros(1, 3, size, size)).shape[-1])

    @classmethod
    def from_pretrained(cls, path: str) -> "EvaluatorFeatures":
        from transformers import AutoConfig, DPTForDepthEstimation, UperNetForSemanticSegmentation

        kind = AutoConfig.from_pretrained(path).model_type
        model_cls = DPTForDepthEstimation if kind == "dpt" else UperNetForSemanticSegmentation
        return cls(model_cls.from_pretrained(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = x.to(next(self.model.parameters()).device)
        if self.kind == "dpt":
            size = int(self.model.config.image_size)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return self.model.dpt(pixel_values=(x - 0.5) / 0.5).last_hidden_state.mean(1).float()
        from diffusers_innercontrol.rewards import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self.model.backbone((x - mean) / std).feature_maps[-1].mean((2, 3)).float()


def fidelity_evaluator(args, task: str):
    """The evaluator of `compute_metrics`: the task's evaluation model (`evaluation.load_control_evaluator`)."""
    from diffusers_innercontrol.evaluation import load_control_evaluator
    from diffusers_innercontrol.tasks import get_task

    return load_control_evaluator(get_task(task), getattr(args, f"{task}_eval_model"), option=f"--{task}_eval_model")


def bucket_evaluator(args, task: str) -> nn.Module:
    """The evaluator of the bucket errors, in what `losses.reward_loss_per_sample` takes (maps, or logits)."""
    from transformers import DPTForDepthEstimation, UperNetForSemanticSegmentation

    from diffusers_innercontrol.rewards import DepthReward, EdgeMapReward, SegmentationReward

    if task in ("hed", "lineart"):
        return EdgeMapReward(DPTForDepthEstimation.from_pretrained(getattr(args, f"{task}_eval_model")), task).freeze()
    if task == "depth":
        return DepthReward(DPTForDepthEstimation.from_pretrained(args.depth_eval_model)).freeze()
    return SegmentationReward(UperNetForSemanticSegmentation.from_pretrained(args.segmentation_eval_model)).freeze()


def fid_feature_path(args) -> Optional[str]:
    return args.fid_feature_model or args.depth_eval_model


def kid_feature_path(args, task: str) -> str:
    """The model whose features KID uses for `task`: `--kid_feature_model`, else an evaluation model of another task
    (neither the task's reward nor its fidelity evaluator)."""
    return args.kid_feature_model or (args.depth_eval_model if task == "segmentation" else args.segmentation_eval_model)


def pooled_kid(args, task: str, runs: Sequence[Dict], real_dataset, features: nn.Module, device) -> Dict:
    """
    KID of the images of `runs` (one mode: every seed's ControlNet, every held-out scene and generation seed) against
    the first `--num_kid_real` real images of `real_dataset`, on `features`. Returns `{"mean", "std", "num_generated",
    "num_real", "subset_size", "subsets"}` (`std`: over KID's subsets), or `{}` when a side has fewer than 2 images.
    """
    from diffusers_innercontrol.evaluation import image_path, load_image01
    from diffusers_innercontrol.metrics import build_kid

    paths = [image_path(os.path.join(r["dir"], "eval"), i, seed) for r in runs
             for i in range(args.num_eval_conditions) for seed in args.generation_seeds]
    paths = [p for p in paths if os.path.isfile(p)]
    num_real = min(args.num_kid_real, len(real_dataset))
    subset_size = min(args.kid_subset_size, len(paths), num_real)
    if subset_size < 2:
        return {}
    kid = build_kid(features, subset_size=subset_size, subsets=args.kid_subsets).to(device)
    batch = max(args.eval_batch_size, 32)
    for start in range(0, num_real, batch):
        kid.update(torch.stack([real_dataset[i].image for i in range(start, min(start + batch, num_real))]).to(device),
                   real=True)
    for start in range(0, len(paths), batch):
        kid.update(torch.stack([load_image01(p) for p in paths[start : start + batch]]).to(device), real=False)
    mean, std = kid.compute()
    return {"mean": float(mean), "std": float(std), "num_generated": len(paths), "num_real": num_real,
            "subset_size": subset_size, "subsets": args.kid_subsets}


@torch.no_grad()
def x0_and_probe_bucket_errors(task, pipe, evaluator, probe, dataset, indices, num_buckets=10, batch_size=8, seed=0,
                               device=None):
    """
    Fig. 2: per timestep bucket, the error against the control of the evaluator on the decoded one-step x0 and
    of the probe on the decoder features, from the same noisy latents (one UNet + ControlNet forward each).

    Every held-out sample is noised once per bucket (`probe_eval.stratified_timesteps`, seeded). Both errors are
    `losses.reward_loss_per_sample` (the probe's output through `losses.probe_to_unit` for regression tasks).

    Returns:
        `{"x0_evaluator": BucketErrors, "probe": BucketErrors or None}`.
    """
    from diffusers import DDPMScheduler

    from diffusers_innercontrol.features import DecoderFeatureExtractor
    from diffusers_innercontrol.losses import one_step_x0, probe_to_unit, reward_loss_per_sample
    from diffusers_innercontrol.probe_eval import BucketErrors, stratified_timesteps
    from diffusers_innercontrol.training import decode_latents, encode_images

    device = device or pipe.unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n_t = scheduler.config.num_train_timesteps
    x0_errors = BucketErrors(num_buckets, n_t, loss_name=task.reward_loss)
    probe_errors = BucketErrors(num_buckets, n_t, loss_name=task.reward_loss) if probe is not None else None
    generator = torch.Generator().manual_seed(seed)
    evaluator = evaluator.to(device)
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start : start + batch_size]]
        pixels = torch.stack([s.image for s in samples]).to(device) * 2.0 - 1.0
        ids = pipe.tokenizer([s.caption for s in samples], max_length=pipe.tokenizer.model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
        hidden = pipe.text_encoder(ids)[0]
        control = torch.stack([s.control for s in samples]).to(device)
        target = torch.stack([s.control_classes for s in samples]).to(device) if task.is_segmentation else control
        latents = encode_images(pipe.vae, pixels)
        for row in stratified_timesteps(len(samples), num_buckets, n_t, generator):
            noise = torch.randn(latents.shape, generator=generator).to(device)
            t = row.to(device)
            noisy = scheduler.add_noise(latents, noise, t)
            down, mid = pipe.controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=control, return_dict=False)
            kind = probe.config.feature_kind if probe is not None else None
            with DecoderFeatureExtractor(pipe.unet, kind, detach=True) if probe is not None else _null() as extractor:
                eps = pipe.unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid, return_dict=False)[0]
                features = extractor.pop() if probe is not None else None
            x0 = one_step_x0(noisy, eps, t, scheduler.alphas_cumprod, scheduler.config.prediction_type)
            images = decode_latents(pipe.vae, x0).clamp(0, 1)
            x0_errors.update(reward_loss_per_sample(task, evaluator(images), target).cpu(), t.cpu())
            if probe is not None:
                out = probe(features, t, return_dict=False)[0].float()
                reading = out if task.is_segmentation else probe_to_unit(task, out)
                probe_errors.update(reward_loss_per_sample(task, reading, target).cpu(), t.cpu())
    return {"x0_evaluator": x0_errors, "probe": probe_errors}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def evaluate_run(args, task_name: str, record: Dict, dataset, fidelity, features, device) -> Dict:
    """Generate the held-out images of one ControlNet and score them (control fidelity, FID)."""
    from diffusers_innercontrol.evaluation import compute_metrics, generate_images, load_generation_pipeline
    from diffusers_innercontrol.metrics import build_fid
    from diffusers_innercontrol.tasks import get_task

    task = get_task(task_name)
    pipe = load_generation_pipeline(args.pretrained_model_name_or_path, record["dir"]).to(device)
    images_dir = os.path.join(record["dir"], "eval")
    indices = range(args.num_eval_conditions)
    generate_images(pipe, dataset, indices, images_dir, seeds=args.generation_seeds,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    negative_prompt=None, resolution=args.resolution, progress=False)
    fid = build_fid(features) if features is not None else None
    metrics = compute_metrics(task, dataset, indices, images_dir, seeds=args.generation_seeds, control_evaluator=fidelity,
                              fid=fid, device=device, progress=False)
    return {"metrics": metrics, "pipe": pipe}


# --------------------------------------------------------------------------------------------- reports
def sample_grid(dataset, runs: Sequence[Dict], modes: Sequence[str], num_rows: int, generation_seed: int):
    """
    One labelled PIL image per task (`render.labeled_grid`): a row per held-out condition (up to `num_rows`):
    control | real image | the image of each mode (the first seed's ControlNet, generation seed `generation_seed`).
    Missing images stay black.
    """
    from PIL import Image

    from diffusers_innercontrol.evaluation import image_path, tensor_to_pil
    from diffusers_innercontrol.render import labeled_grid

    first = {}
    for r in runs:
        if "metrics" in r and r["mode"] not in first:
            first[r["mode"]] = r
    rows = min(num_rows, len(dataset))
    if rows == 0:
        return None
    size = dataset[0].control.shape[-1]
    tiles = []
    for i in range(rows):
        sample = dataset[i]
        line = [tensor_to_pil(sample.control), tensor_to_pil(sample.image)]
        for mode in modes:
            path = image_path(os.path.join(first[mode]["dir"], "eval"), i, generation_seed) if mode in first else None
            line.append(Image.open(path).convert("RGB") if path and os.path.isfile(path) else Image.new("RGB", (size, size)))
        tiles.append(line)
    return labeled_grid(tiles, ["control", "real"] + list(modes), tile_size=(size, size))


# (mode, baseline) pairs of the claims tested besides "every mode against the diffusion-loss baseline": (b)
COMPARISONS = (("reward200_alignment", "reward200"),)


def control_values(runs: Sequence[Dict], task: str, mode: str, metric: Optional[str] = None) -> List[float]:
    """The control-fidelity metric (or `metric`, such as "fid") of every evaluated seed of (task, mode), in seed order."""
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    key = metric or CONTROL_METRICS[task][0]
    rows = sorted((r for r in runs if r["task"] == task and r["mode"] == mode and "metrics" in r), key=lambda r: r["seed"])
    return [float(r["metrics"][key]) for r in rows if r["metrics"].get(key) is not None]


def compare(runs: Sequence[Dict], task: str, mode: str, baseline: str, metric: Optional[str] = None) -> Optional[Dict]:
    """`metrics.welch_test` of `mode`'s control fidelity (or `metric`) against `baseline`'s over seeds (None below 2
    seeds a side)."""
    from diffusers_innercontrol.metrics import welch_test

    values, base = control_values(runs, task, mode, metric), control_values(runs, task, baseline, metric)
    if len(values) < 2 or len(base) < 2:
        return None
    return dict(welch_test(values, base), baseline=baseline)


def aggregate(runs: Sequence[Dict], tasks: Sequence[str], modes: Sequence[str]) -> Dict:
    """`{task: {mode: {metric: mean_std, "vs_controlnet" / "fid_vs_controlnet": welch_test or None}}}` over the seeds of
    each (task, mode) (the control metric's and FID's test against the ControlNet baseline),
    and `{task: {"mode_vs_baseline": welch_test}}` for `COMPARISONS` under the key `"claims"` of each task."""
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    table = {}
    for task in tasks:
        key = CONTROL_METRICS[task][0]
        table[task] = {}
        for mode in modes:
            rows = [r for r in runs if r["task"] == task and r["mode"] == mode and "metrics" in r]
            table[task][mode] = {
                "control": mean_std([r["metrics"].get(key) for r in rows]),
                "fid": mean_std([r["metrics"].get("fid") for r in rows]),
                "vs_controlnet": compare(runs, task, mode, "controlnet") if mode != "controlnet" else None,
                # claim (d) is about image quality: FID per seed against the baseline's, as the fidelity is tested
                "fid_vs_controlnet": compare(runs, task, mode, "controlnet", "fid") if mode != "controlnet" else None,
            }
    return table


def claims(runs: Sequence[Dict], tasks: Sequence[str], modes: Sequence[str]) -> Dict:
    """`{task: {"<mode>_vs_<baseline>": welch_test}}` for the `COMPARISONS` whose two modes were run."""
    out = {}
    for task in tasks:
        out[task] = {f"{m}_vs_{b}": compare(runs, task, m, b) for m, b in COMPARISONS if m in modes and b in modes}
    return out


def results_markdown(result: Dict) -> str:
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    a = result["args"]
    lines = ["# ShapesWorld: the paper's Table 2 / Fig. 2 protocol", "",
             f"Toy SD `{a['pretrained_model_name_or_path']}`, {a['resolution']} px, {a['max_train_steps']} training steps a run "
             f"(batch {a['train_batch_size']}, lr {a['learning_rate']}), seeds {a['seeds']}; evaluated on "
             f"{a['num_eval_conditions']} held-out scenes x {len(a['generation_seeds'])} image(s), {a['num_inference_steps']} "
             f"UniPC steps, guidance {a['guidance_scale']}. Mean ± standard deviation over the seeds.", "",
             "HED and LineArt fidelity: SSIM between the toy evaluation model's edge map of the image and the exact "
             "control; depth: RMSE (0..255) of the toy evaluation DPT; segmentation: mIoU of the toy evaluation UperNet. FID: Fréchet "
             f"distance of the features of `{result.get('fid_feature_model')}`. KID x 1000 (± its standard deviation over "
             f"subsets): each mode's images pooled over its seeds against {a.get('num_kid_real')} real held-out images. "
             "Difference to the ControlNet baseline: mean over seeds, 95 % interval and Welch's t-test p-value.", ""]
    if result.get("merged_from"):
        lines += ["Merged from " + ", ".join(f"`{f}`" for f in result["merged_from"]) + " (merge_experiments.py)."
                  + "".join(f" {note}." for note in result.get("kid_notes", [])), ""]
    tasks = list(result["table"]) + [t for t in result.get("buckets", {}) if t not in result["table"]]
    for task in tasks:
        modes = result["table"].get(task, {})
        key, name, higher = CONTROL_METRICS[task]
        scale = 100.0 if key == "miou" else 1.0  # mIoU in percent, as the paper's tables
        unit = " (%)" if key == "miou" else ""
        digits = 4 if key == "ssim" else 2
        kid = result.get("kid", {}).get(task, {})
        lines += [f"## {task}", ""]
        if modes:
            lines += [f"| mode | {name}{unit} ({'higher' if higher else 'lower'} is better) | "
                      "difference to ControlNet [95 % interval] | p (Welch) | KID x 1000 | FID (toy features) | "
                      "FID difference to ControlNet [95 % interval], p |", "|---|---|---|---|---|---|---|"]
        for mode, stats in modes.items():
            control = {k: (v * scale if isinstance(v, float) and k != "n" else v) for k, v in stats["control"].items()}
            lines.append(f"| {MODES[mode][0]} | {format_mean_std(control, digits)} | "
                         f"{format_difference(stats.get('vs_controlnet'), scale, digits)} | "
                         f"{format_p(stats.get('vs_controlnet'))} | {format_kid(kid.get(mode))} | "
                         f"{format_mean_std(stats['fid'], 3)} | {format_test(stats.get('fid_vs_controlnet'), 1.0, 3)} |")
        lines.append("")
        if kid:
            k = next((v for v in kid.values() if v), None)
            if k:
                lines += [f"KID: {k['num_generated']} generated images per mode against {k['num_real']} real ones, "
                          f"{k['subsets']} subsets of {k['subset_size']}, features of "
                          f"`{os.path.basename(str(result.get('kid_feature_models', {}).get(task)))}`.", ""]
        for label, test in result.get("claims", {}).get(task, {}).items():
            if test:
                mode, baseline = label.split("_vs_")
                lines += [f"{MODES[mode][0]} against {MODES[baseline][0]}: {format_difference(test, scale, digits)}, "
                          f"p = {format_p(test)} (Welch, {test['n']} and {test['n_baseline']} seeds).", ""]
        buckets = result.get("buckets", {}).get(task)
        if buckets:
            lines += [f"Error against the control per timestep bucket (Fig. 2), ControlNet `{buckets['controlnet']}`: "
                      f"probe on decoder features vs evaluator on the decoded one-step x0 ({buckets['loss']}).", "",
                      "| t | probe (± standard error) | evaluator on one-step x0 (± standard error) |", "|---|---|---|"]
            none = [None] * len(buckets["buckets"])
            probe = buckets["probe"] or {}
            x0 = buckets["x0_evaluator"]
            rows = zip(buckets["buckets"], probe.get("means", none), probe.get("stderrs", none), x0["means"],
                       x0.get("stderrs", none))
            for (lo, hi), p, p_se, e, e_se in rows:
                fmt = lambda v, se: "-" if v is None else f"{v:.4f}" + ("" if se is None else f" ± {se:.4f}")  # noqa: E731
                lines.append(f"| {lo}-{hi} | {fmt(p, p_se)} | {fmt(e, e_se)} |")
            lines.append("")
    for task, grid in result.get("grids", {}).items():
        columns = ["control", "real image"] + [MODES[m][0] for m in result["table"][task]]
        lines += [f"Samples, {task} (columns: {' | '.join(columns)}; the first seed's ControlNets):", "",
                  f"![{task} samples]({grid})", ""]
    if result.get("plots_note"):
        lines += [result["plots_note"], ""]
    for plot in result.get("plots", []):
        lines += [f"![{os.path.basename(plot)}]({plot})", ""]
    return "\n".join(lines)


def save_plot(fig, ax, output_dir: str, name: str, xlabel: str, ylabel: str, title: str, legend: bool = True) -> str:
    """Label, lay out and save a matplotlib figure as `plots/<name>.png` in `output_dir`; returns its relative path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    rel = os.path.join("plots", f"{name}.png")
    fig.savefig(os.path.join(output_dir, rel), dpi=100)
    plt.close(fig)
    return rel


def write_plots(result: Dict, output_dir: str) -> List[str]:
    """Bar charts of the control metric per mode and the bucket-error curves; [] (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plots_note"] = "Plots skipped: matplotlib is not installed (pip install matplotlib)."
        return []
    from diffusers_innercontrol.metrics import CONTROL_METRICS

    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    paths = []
    for task in list(result["table"]) + [t for t in result.get("buckets", {}) if t not in result["table"]]:
        modes = result["table"].get(task, {})
        if modes:
            names = list(modes)
            means = [modes[m]["control"]["mean"] or 0.0 for m in names]
            stds = [modes[m]["control"]["std"] or 0.0 for m in names]
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar(range(len(names)), means, yerr=stds, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
            paths.append(save_plot(fig, ax, output_dir, f"{task}_fidelity", "", CONTROL_METRICS[task][1],
                                   f"{task}: control fidelity by mode", legend=False))
        buckets = result.get("buckets", {}).get(task)
        if buckets:
            centres = [(lo + hi) / 2 for lo, hi in buckets["buckets"]]
            fig, ax = plt.subplots(figsize=(5, 3))
            for label, side in (("evaluator on one-step x0", buckets["x0_evaluator"]),
                                ("probe on features", buckets.get("probe") or {})):
                values = side.get("means")
                if values:
                    errors = [0.0 if e is None else e for e in side.get("stderrs") or [None] * len(values)]
                    ax.errorbar(centres, [math.nan if v is None else v for v in values], yerr=errors, marker="o",
                                capsize=3, label=label)
            paths.append(save_plot(fig, ax, output_dir, f"{task}_buckets", "timestep t", f"error ({buckets['loss']})",
                                   f"{task}: error vs control per timestep"))
    return paths


# --------------------------------------------------------------------------------------------- main
def fig2_buckets(args, task_name: str, pipe, dataset, controlnet_dir: str, device) -> Dict:
    """Fig. 2 of one task on `pipe`'s ControlNet: `x0_and_probe_bucket_errors` on the first `--num_bucket_conditions`
    scenes of `dataset`, with each bucket's mean and standard error, as stored in results.json."""
    from diffusers_innercontrol.models.readout_probe import ReadoutProbe
    from diffusers_innercontrol.probe_eval import timestep_buckets
    from diffusers_innercontrol.tasks import get_task

    task = get_task(task_name)
    probe_path = getattr(args, f"{task_name}_probe")
    probe = ReadoutProbe.from_pretrained(probe_path).to(device).eval() if probe_path else None
    errors = x0_and_probe_bucket_errors(
        task, pipe, bucket_evaluator(args, task_name), probe, dataset, range(args.num_bucket_conditions),
        num_buckets=args.num_buckets, batch_size=args.eval_batch_size, seed=0, device=device)

    def side(e):
        return None if e is None else dict(e.to_dict(), means=e.means(), stderrs=e.stderrs())

    return {"controlnet": controlnet_dir, "loss": task.reward_loss,
            "buckets": [list(b) for b in timestep_buckets(args.num_buckets, pipe.scheduler.config.num_train_timesteps)],
            "x0_evaluator": side(errors["x0_evaluator"]), "probe": side(errors["probe"])}


def fig2_only(args, device, t0) -> Dict:
    """`--fig2_only`: Fig. 2 of every task on its `--<task>_controlnet` (no training, no generation)."""
    from diffusers_innercontrol.evaluation import load_generation_pipeline
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    buckets = {}
    for task_name in args.tasks:
        controlnet = getattr(args, f"{task_name}_controlnet")
        logger.info(f"Fig. 2: {task_name} on {controlnet}")
        pipe = load_generation_pipeline(args.pretrained_model_name_or_path, controlnet).to(device)
        dataset = ShapesWorldEvalSet(task_name, args.resolution, args.world_seed, args.eval_start_index,
                                     args.num_bucket_conditions)
        buckets[task_name] = fig2_buckets(args, task_name, pipe, dataset, controlnet, device)
    result = {"args": dict(vars(args)), "runs": [], "table": {}, "claims": {}, "kid": {}, "buckets": buckets, "grids": {},
              "seconds": round(time.perf_counter() - t0, 1)}
    return result


def write_results(result: Dict, output_dir: str, plots=None, markdown=None, report: str = "shapesworld.md") -> Dict:
    """`results.json`, the markdown `report` (`markdown(result)`) and the plots (`plots(result, output_dir)`; by
    default this script's) in `output_dir`."""
    result["plots"] = (plots or write_plots)(result, output_dir)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(output_dir, report), "w") as f:
        f.write((markdown or results_markdown)(result))
    logger.info(f"wrote {output_dir}/results.json and {report} in {result['seconds']} s")
    return result


def start(args):
    """Logging, the evaluation device and `--output_dir`; returns `(device, t0)`."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    os.makedirs(args.output_dir, exist_ok=True)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), time.perf_counter()


def main(args) -> Dict:
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    device, t0 = start(args)
    if args.fig2_only:
        return write_results(fig2_only(args, device, t0), args.output_dir)
    ensure_train_data(args)

    runs = train_runs(args)

    fid_path = fid_feature_path(args)
    features = EvaluatorFeatures.from_pretrained(fid_path).to(device) if fid_path else None
    buckets, grids, kid = {}, {}, {}
    for task_name in args.tasks:
        dataset = ShapesWorldEvalSet(task_name, args.resolution, args.world_seed, args.eval_start_index,
                                     max(args.num_eval_conditions, args.num_bucket_conditions))
        fidelity = fidelity_evaluator(args, task_name)
        fidelity = fidelity.to(device)
        reference = None
        for record in runs:
            if record["task"] != task_name or record["train"] == "missing":
                continue
            logger.info(f"evaluating {task_name}/{record['mode']}/seed{record['seed']}")
            out = evaluate_run(args, task_name, record, dataset, fidelity, features, device)
            record["metrics"] = out["metrics"]
            if reference is None:
                reference = (record, out["pipe"])
            else:
                del out["pipe"]
        # KID per mode, pooled over its seeds, against real held-out images (neither the reward's nor the evaluator's
        # features)
        kid_features = EvaluatorFeatures.from_pretrained(kid_feature_path(args, task_name)).to(device)
        real = ShapesWorldEvalSet(task_name, args.resolution, args.world_seed, args.eval_start_index, args.num_kid_real)
        kid[task_name] = {mode: pooled_kid(args, task_name, [r for r in runs if r["task"] == task_name and r["mode"] == mode
                                                             and "metrics" in r], real, kid_features, device)
                          for mode in args.modes}
        if reference is not None:
            record, pipe = reference
            buckets[task_name] = fig2_buckets(args, task_name, pipe, dataset, record["dir"], device)
        grid = sample_grid(dataset, [r for r in runs if r["task"] == task_name], args.modes,
                           min(args.num_grid_rows, args.num_eval_conditions), args.generation_seeds[0])
        if grid is not None:
            os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
            grids[task_name] = os.path.join("grids", f"{task_name}.png")
            grid.save(os.path.join(args.output_dir, grids[task_name]))

    result = {
        "args": dict(vars(args)),
        "runs": runs,
        "table": aggregate(runs, args.tasks, args.modes),
        "claims": claims(runs, args.tasks, args.modes),
        "kid": kid,
        "kid_feature_models": {t: kid_feature_path(args, t) for t in args.tasks},
        "buckets": buckets,
        "grids": grids,
        "fid_feature_model": fid_path,
        "mode_labels": {m: MODES[m][0] for m in args.modes},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return write_results(result, args.output_dir)


def run_cli(parse, main_fn, argv=None):
    """A ShapesWorld script's entry point: `parse(argv)`'s `ValueError` (bad arguments), and offline model ids or
    unusable data in `main_fn`, end with one line and exit status 1."""
    from diffusers_innercontrol import cli

    try:
        args = parse(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return cli.run_main(main_fn, args, training_started=lambda: True)


def cli_main(argv=None):
    return run_cli(parse_args, main, argv)


if __name__ == "__main__":
    cli_main()
