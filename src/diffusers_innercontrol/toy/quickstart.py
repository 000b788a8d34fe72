# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""ShapesWorld as the scripts' default world: what `train_innercontrol.py --task hed` runs on with no model or data.

The package ships a toy Stable Diffusion trained on ShapesWorld (`assets/shapesworld/toy-sd`, SD1.5's classes
at 64 px) and, per task, what InnerControl needs on top of it: a ControlNet trained with the diffusion loss
(`controlnet-<task>`), a stage-1 readout probe (`probe-<task>`) and a reward model (`reward-<task>`). They are
all produced by the scripts in `examples/innercontrol/shapesworld/` (see its README for the commands).

`apply_shapesworld_defaults(args, parser, script)` is called by the training scripts right after parsing.
When neither `--pretrained_model_name_or_path` nor data (`--dataset_name` / `--train_data_dir`) is given it
points every unset model option at the bundled ShapesWorld models, renders a ShapesWorld image folder into
the cache (once), picks held-out validation controls, shrinks the unset size and length options to what
2 CPU cores finish in a few minutes, and says so in one line with how to train on SD1.5 instead. Options
the user set are never changed. With a model or data given, the base model defaults to SD1.5 as before.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

from ..cli import DEFAULT_BASE_MODEL

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapesworld")
RESOLUTION = 64
NUM_SCENES = 1000
VALIDATION_START = 900_000  # held-out scene indices (the training folder uses 0 .. NUM_SCENES - 1)
CACHE_ENV = "DIFFUSERS_INNERCONTROL_CACHE"

# unset options -> ShapesWorld values, per script: small enough for a few minutes on 2 CPU cores
_SCRIPT_DEFAULTS = {
    "controlnet": dict(resolution=RESOLUTION, max_train_steps=200, learning_rate=1e-4, validation_steps=100),
    # the toy UNet is about a tenth of SD1.5's width: a 64-wide probe (the paper's 384 on SD1.5), as the shipped ones
    "probe": dict(resolution=RESOLUTION, max_train_steps=300, validation_steps=300, projection_dim=64, norm_num_groups=16,
                  validation_split=32),
}


def bundled_path(name: str) -> Optional[str]:
    """Folder of a bundled ShapesWorld model (`toy-sd`, `controlnet-hed`, `probe-depth`, ...), or None if absent."""
    path = os.path.join(ASSETS_DIR, name)
    return path if os.path.isdir(path) else None


def cache_dir() -> str:
    """Where rendered ShapesWorld folders go: `$DIFFUSERS_INNERCONTROL_CACHE`, else `~/.cache/diffusers_innercontrol`."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "diffusers_innercontrol"))


def _atomic_folder(path: str, write) -> str:
    """Run `write(tmp_dir)` and rename the result to `path`, so an interrupted render never looks complete."""
    if os.path.isfile(os.path.join(path, "metadata.jsonl")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        write(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(path, "metadata.jsonl")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def shapesworld_folder(num_samples: int = NUM_SCENES, resolution: int = RESOLUTION, seed: int = 0, start: int = 0) -> str:
    """A ShapesWorld `--train_data_dir` folder (every control column) in the cache, rendered once."""
    from .shapesworld import ShapesWorld

    path = os.path.join(cache_dir(), f"shapesworld-{resolution}px-seed{seed}-{start}-{start + num_samples}")
    return _atomic_folder(path, lambda tmp: ShapesWorld(size=resolution, seed=seed).save_imagefolder(tmp, num_samples, start=start))


def validation_pairs(task_name: str, n: int = 2, resolution: int = RESOLUTION, seed: int = 0) -> Tuple[List[str], List[str]]:
    """`(prompts, control image paths)` of `n` held-out ShapesWorld scenes for `task_name`'s validation."""
    from ..tasks import get_task

    folder = shapesworld_folder(n, resolution, seed, start=VALIDATION_START)
    prompts, images = [], []
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    key = get_task(task_name).conditioning_column  # ShapesWorld's columns carry the tasks' MultiGen names
    for row in rows[:n]:
        prompts.append(row["text"])
        images.append(os.path.join(folder, row[key]))
    return prompts, images


def is_default_world(args) -> bool:
    """True when the command line names no base model and no data: the scripts then run on ShapesWorld."""
    return not (
        getattr(args, "pretrained_model_name_or_path", None)
        or getattr(args, "dataset_name", None)
        or getattr(args, "train_data_dir", None)
    )


def apply_shapesworld_defaults(args, parser, script: str = "controlnet", task=None) -> Dict[str, str]:
    """
    Fill the unset options of `args` for ShapesWorld (see the module docstring); returns what was set.

    Args:
        args: the parsed arguments (changed in place).
        parser: the parser, to tell unset options (still at their default) from set ones.
        script: `controlnet` (train_innercontrol.py) or `probe` (train_probe.py).
        task: the resolved `Task` (its alpha / beta decide whether a probe and a reward model are needed);
            default: the task named by `args.task` with its preset.

    Raises:
        ValueError: the bundled toy models are missing (a source checkout without the assets).
    """
    if script not in _SCRIPT_DEFAULTS:
        raise ValueError(f"script must be one of {sorted(_SCRIPT_DEFAULTS)}, got {script!r}.")
    if not is_default_world(args):
        if getattr(args, "pretrained_model_name_or_path", None) is None:
            args.pretrained_model_name_or_path = DEFAULT_BASE_MODEL
        return {}
    from ..tasks import get_task

    if task is None:
        task = get_task(args.task, getattr(args, "preset", "paper"))
    sd = bundled_path("toy-sd")
    if sd is None:
        raise ValueError(
            f"No model or data given, and the bundled ShapesWorld toy SD is missing ({os.path.join(ASSETS_DIR, 'toy-sd')}): "
            f"pass --pretrained_model_name_or_path {DEFAULT_BASE_MODEL} (and data), or reinstall diffusers-innercontrol."
        )
    changed = {"pretrained_model_name_or_path": sd}
    wanted = {"controlnet_model_name_or_path": f"controlnet-{task.name}"} if script == "controlnet" else {}
    if script == "controlnet" and task.beta > 0:
        wanted["probe_model_name_or_path"] = f"probe-{task.name}"
    if script == "controlnet" and task.alpha > 0:
        wanted["reward_model_name_or_path"] = f"reward-{task.name}"
    for option, name in wanted.items():
        if getattr(args, option, None) is None and bundled_path(name):
            changed[option] = bundled_path(name)
    for option, value in _SCRIPT_DEFAULTS[script].items():
        if hasattr(args, option) and getattr(args, option) == parser.get_default(option):
            changed[option] = value
    resolution = changed.get("resolution", getattr(args, "resolution", RESOLUTION))
    changed["train_data_dir"] = shapesworld_folder(NUM_SCENES, resolution)
    if script == "controlnet" and not getattr(args, "validation_image", None) and not getattr(args, "validation_prompt", None):
        prompts, images = validation_pairs(task.name, 2, resolution)
        changed["validation_prompt"], changed["validation_image"] = prompts, images
    for option, value in changed.items():
        setattr(args, option, value)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        parts = ", ".join(n.split("_model")[0] for n in wanted if n in changed)
        print(
            f"No model or data given: training on ShapesWorld (bundled toy SD, {resolution} px"
            + (f", its {task.name} {parts}" if parts else "")
            + f", {NUM_SCENES} scenes in {changed['train_data_dir']}); for SD1.5 pass "
            f"--pretrained_model_name_or_path {DEFAULT_BASE_MODEL} (data: the task's MultiGen-20M set, or --dataset_name / --train_data_dir).",
            flush=True,
        )
    return changed


def use_default_world(args, parser, script: str, resolve_task) -> Dict[str, str]:
    """
    The scripts' hook, called right after parsing: `apply_shapesworld_defaults` with the task that
    `resolve_task(args)` gives. Bad task options are left for the script's validation to report (one line,
    with the other bad input); missing bundled models end the run with one line (`parser.exit`).
    """
    try:
        task = resolve_task(args)
    except (ValueError, KeyError):
        task = None
    if task is None:
        if is_default_world(args):
            return {}  # the script's validation reports the bad task
        return apply_shapesworld_defaults(args, parser, script)
    try:
        return apply_shapesworld_defaults(args, parser, script, task=task)
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")


__all__ = [
    "ASSETS_DIR",
    "apply_shapesworld_defaults",
    "bundled_path",
    "cache_dir",
    "is_default_world",
    "shapesworld_folder",
    "use_default_world",
    "validation_pairs",
]
