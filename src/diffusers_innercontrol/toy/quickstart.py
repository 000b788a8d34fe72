# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""ShapesWorld as the scripts' default world: what `train_innercontrol.py --task hed` runs on with no model or data.

The package ships a toy Stable Diffusion trained on ShapesWorld (`assets/shapesworld/toy-sd`, SD1.5's classes
at 64 px) and, per task, what InnerControl needs on top of it: a ControlNet trained with the diffusion loss
(`controlnet-<task>`), a stage-1 readout probe (`probe-<task>`) and a reward model (`reward-<task>`). They are
all produced by the scripts in `examples/innercontrol/shapesworld/` (see its README for the commands).

The training scripts parse with `parse_with_default_world`. When neither `--pretrained_model_name_or_path` nor
data (`--dataset_name` / `--train_data_dir`) is given, the defaults of the parser become `shapesworld_defaults(task,
script)` (a pure function): the bundled ShapesWorld models, held-out validation controls, and sizes and lengths
that 2 CPU cores finish in a few minutes; options the user set keep their values by construction. `main` then
calls `prepare_default_world(args)`, which renders the ShapesWorld folders into the cache (once) and says in one
line what the run trains on and how to train on SD1.5 instead. With a model or data given, the base model
defaults to SD1.5.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

from ..cli import DEFAULT_BASE_MODEL
from ..tasks import get_task
from .shapesworld import ShapesWorld

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapesworld")
RESOLUTION = 64
NUM_SCENES = 1000
# classifier-free guidance for sampling the toy SD: 7.5 (SD1.5's) over-saturates it and draws wavy background
# textures; at 3 its edge ControlNets close about 20 more points of the fidelity gap (docs/shapesworld.md)
GUIDANCE_SCALE = 3.0
VALIDATION_START = 900_000  # held-out scene indices (the training folder uses 0 .. NUM_SCENES - 1)
CACHE_ENV = "DIFFUSERS_INNERCONTROL_CACHE"

# unset options -> ShapesWorld values, per script: small enough for a few minutes on 2 CPU cores
_SCRIPT_DEFAULTS = {
    "controlnet": dict(resolution=RESOLUTION, max_train_steps=200, learning_rate=1e-4, validation_steps=100,
                       validation_guidance_scale=GUIDANCE_SCALE),
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
    path = _folder_path(num_samples, resolution, seed, start)
    return _atomic_folder(path, lambda tmp: ShapesWorld(size=resolution, seed=seed).save_imagefolder(tmp, num_samples, start=start))


def validation_pairs(task_name: str, n: int = 2, resolution: int = RESOLUTION, seed: int = 0) -> Tuple[List[str], List[str]]:
    """`(prompts, control image paths)` of `n` held-out ShapesWorld scenes for `task_name`'s validation."""
    folder = shapesworld_folder(n, resolution, seed, start=VALIDATION_START)
    prompts, images = [], []
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    key = get_task(task_name).conditioning_column + "_file_name"  # ShapesWorld's columns carry the tasks' names
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


def _folder_path(num_samples: int, resolution: int, seed: int = 0, start: int = 0) -> str:
    return os.path.join(cache_dir(), f"shapesworld-{resolution}px-seed{seed}-{start}-{start + num_samples}")


def shapesworld_defaults(task, script: str = "controlnet", resolution: int = RESOLUTION,
                         validation_pairs: bool = True) -> Dict:
    """
    The argparse defaults of a training script on ShapesWorld for `task`, a pure function (nothing is written):
    the bundled models the task needs (toy SD; for `controlnet`: its ControlNet, and its probe / reward model
    when beta / alpha > 0), sizes and lengths for a few minutes on 2 CPU cores, the cached ShapesWorld folder
    (`--train_data_dir`, rendered by `prepare_default_world` in `main`) and, with `validation_pairs`, held-out
    validation controls with their captions. The scripts apply them with `parser.set_defaults`, so every option
    the user sets keeps its value by construction.

    Raises:
        ValueError: the bundled toy SD is missing (a source checkout without the assets).
    """
    if script not in _SCRIPT_DEFAULTS:
        raise ValueError(f"script must be one of {sorted(_SCRIPT_DEFAULTS)}, got {script!r}.")
    sd = bundled_path("toy-sd")
    if sd is None:
        raise ValueError(
            f"No model or data given, and the bundled ShapesWorld toy SD is missing ({os.path.join(ASSETS_DIR, 'toy-sd')}): "
            f"pass --pretrained_model_name_or_path {DEFAULT_BASE_MODEL} (and data), or reinstall diffusers-innercontrol."
        )
    defaults = dict(_SCRIPT_DEFAULTS[script], resolution=resolution, pretrained_model_name_or_path=sd)
    wanted = {"controlnet_model_name_or_path": f"controlnet-{task.name}"} if script == "controlnet" else {}
    if script == "controlnet" and task.beta > 0:
        wanted["probe_model_name_or_path"] = f"probe-{task.name}"
    if script == "controlnet" and task.alpha > 0:
        wanted["reward_model_name_or_path"] = f"reward-{task.name}"
    defaults.update({option: bundled_path(name) for option, name in wanted.items() if bundled_path(name)})
    defaults["train_data_dir"] = _folder_path(NUM_SCENES, resolution)
    folders = [(NUM_SCENES, resolution, 0, 0)]
    if script == "controlnet" and validation_pairs and resolution % 8 == 0 and resolution >= 32:  # else main says why
        n = 2
        folder = _folder_path(n, resolution, 0, VALIDATION_START)
        world = ShapesWorld(size=resolution, seed=0)
        column = task.conditioning_column  # ShapesWorld's columns carry the tasks' MultiGen names
        width = max(6, len(str(VALIDATION_START + n - 1)))  # save_imagefolder's file names
        defaults["validation_prompt"] = [world.sample(VALIDATION_START + i, with_controls=False)["text"] for i in range(n)]
        defaults["validation_image"] = [os.path.join(folder, column, f"{VALIDATION_START + i:0{width}d}.png") for i in range(n)]
        folders.append((n, resolution, 0, VALIDATION_START))
    defaults["shapesworld_folders"] = folders  # what prepare_default_world renders
    return defaults


def parse_with_default_world(parser, input_args, script: str, resolve_task):
    """
    The scripts' `parse_args`: parse; with no model and no data, set the ShapesWorld defaults of the task
    (`shapesworld_defaults`) with `parser.set_defaults` and parse again; with a model or data, default the base
    model to SD1.5. Bad task options are left for the script's validation to report (one line, with the other bad
    input); missing bundled models end the run with one line (`parser.exit`).
    """
    args = parser.parse_args(input_args)
    if not is_default_world(args):
        if args.pretrained_model_name_or_path is None:
            parser.set_defaults(pretrained_model_name_or_path=DEFAULT_BASE_MODEL)
            args = parser.parse_args(input_args)
        return args
    try:
        task = resolve_task(args)
    except (ValueError, KeyError):
        return args  # the script's validation reports the bad task
    resolution = args.resolution if args.resolution != parser.get_default("resolution") else RESOLUTION
    pairs = not (getattr(args, "validation_image", None) or getattr(args, "validation_prompt", None))
    try:
        parser.set_defaults(**shapesworld_defaults(task, script, resolution, validation_pairs=pairs))
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")
    return parser.parse_args(input_args)


def prepare_default_world(args) -> List[str]:
    """
    In `main`: render the ShapesWorld folders the defaults point at (once, into the cache) and say in one line
    what the run trains on. Returns the folders; nothing happens for a run with a model or data of its own.
    """
    specs = getattr(args, "shapesworld_folders", None) or []
    if specs and (args.resolution % 8 or args.resolution < 32):
        raise ValueError(
            f"--resolution {args.resolution}: ShapesWorld renders multiples of 8 from 32 px; pass --resolution 64 (the "
            "bundled toy SD's size) or leave it out."
        )
    folders = [shapesworld_folder(*spec) for spec in specs]
    if folders and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"No model or data given: training on ShapesWorld (bundled toy SD at {args.pretrained_model_name_or_path}, "
            f"{args.resolution} px, {NUM_SCENES} scenes in {args.train_data_dir}); for SD1.5 pass "
            f"--pretrained_model_name_or_path {DEFAULT_BASE_MODEL} (data: the task's MultiGen-20M set, or --dataset_name / "
            "--train_data_dir).",
            flush=True,
        )
    return folders


__all__ = [
    "ASSETS_DIR",
    "bundled_path",
    "cache_dir",
    "is_default_world",
    "parse_with_default_world",
    "prepare_default_world",
    "shapesworld_defaults",
    "shapesworld_folder",
    "validation_pairs",
]
