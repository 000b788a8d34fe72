# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Command-line arguments shared by the two training scripts (`train_innercontrol.py`, `train_probe.py`).

Each `add_*_args(parser)` adds one argument group and returns it, so a script can add its own options to
the same group. The names follow diffusers' `examples/controlnet/train_controlnet.py` so that its users
find what they know. `validate_common_args(args)` checks what can be checked without loading anything and
raises `ValueError` with the problem and the fix; scripts call it right after parsing.

```py
parser = argparse.ArgumentParser()
add_model_args(parser); add_data_args(parser); add_training_args(parser)
add_precision_args(parser); add_checkpointing_args(parser); add_logging_args(parser); add_hub_args(parser)
args = parser.parse_args(argv)
validate_common_args(args)
```

API (stable; `train_probe.py` imports it):
    add_model_args(parser, default_model=None) -> group  (None: resolved by toy.quickstart.parse_with_default_world)
    add_data_args(parser) -> group
    add_training_args(parser, learning_rate=1e-5, train_batch_size=4, max_train_steps=None) -> group
    add_precision_args(parser) -> group
    add_checkpointing_args(parser) -> group
    add_logging_args(parser, validation_steps=100) -> group
    add_hub_args(parser) -> group
    add_common_args(parser, **defaults) -> parser  (all of the above)
    validate_common_args(args) -> args
    parse_window(text) -> (lo, hi)
"""

import argparse
import importlib.util
import os
import shutil
import sys
from typing import Optional, Sequence, Tuple

from .hub_utils import OfflineModelError

# bitsandbytes (--use_8bit_adam) is imported where it is used: an optional dependency.

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


def parse_window(text: str) -> Tuple[int, int]:
    """`"0,400"` or `"0:400"` or `"0-400"` -> `(0, 400)` (inclusive timestep window)."""
    for sep in (",", ":", "-"):
        if sep in str(text):
            parts = [p.strip() for p in str(text).split(sep)]
            break
    else:
        parts = []
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"A timestep window is two integers 'lo,hi' (e.g. '0,400'), got {text!r}.")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"A timestep window is two integers 'lo,hi' (e.g. '0,400'), got {text!r}.")


def add_model_args(parser: argparse.ArgumentParser, default_model: Optional[str] = None):
    g = parser.add_argument_group("models")
    g.add_argument(
        "--pretrained_model_name_or_path", type=str, default=default_model,
        help="Stable Diffusion 1.5 or SDXL checkpoint (Hub id or local directory; the family is read from its UNet's config) "
             "with unet, vae, text_encoder(s), tokenizer(s), "
             f"scheduler. Default: {DEFAULT_BASE_MODEL} when data is given; with no model and no data, the bundled "
             "ShapesWorld toy SD (diffusers_innercontrol.toy.quickstart).",
    )
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model (branch, tag or commit).")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    g.add_argument("--tokenizer_name", type=str, default=None, help="Tokenizer id or path if not the model's own.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    g.add_argument(
        "--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE to use instead of the model's own (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's VAE "
             "overflows in fp16, so without this option an SDXL VAE is kept in fp32 under --mixed_precision fp16.",
    )
    g.add_argument("--crops_coords_top_left_h", type=int, default=0,
                   help="SDXL only: the crop's top coordinate in the size / crop ids the UNet is conditioned on.")
    g.add_argument("--crops_coords_top_left_w", type=int, default=0,
                   help="SDXL only: the crop's left coordinate in the size / crop ids the UNet is conditioned on.")
    return g


def add_data_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset id (or a local dataset script/folder for datasets.load_dataset). Default: the task's.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of the dataset.")
    g.add_argument("--dataset_split", type=str, default="train", help="Split to train on.")
    g.add_argument(
        "--train_data_dir", type=str, default=None,
        help="A local folder with metadata.jsonl (datasets' imagefolder layout, as diffusers' train_controlnet.py reads "
             "it): one JSON object per line with 'file_name' (the image column 'image'), '<name>_file_name' for more "
             "images (e.g. conditioning_image_file_name -> conditioning_image) and the caption; file names are "
             "relative to the folder.",
    )
    g.add_argument("--streaming", action="store_true",
                   help="Stream the Hub dataset instead of downloading it (MultiGen-20M is over 1 TB); needs --max_train_steps.")
    g.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Shuffle buffer of a streamed dataset.")
    g.add_argument("--image_column", type=str, default=None, help="Column of the target images. Default: the task's.")
    g.add_argument("--caption_column", type=str, default=None, help="Column of the captions. Default: the task's.")
    g.add_argument("--conditioning_image_column", type=str, default=None,
                   help="Column of the control images. Default: the task's; HED/LineArt are computed by the annotator if absent.")
    g.add_argument("--annotator_model_name_or_path", type=str, default=None,
                   help="Annotator weights (Hub id or local dir) used when HED/LineArt controls are computed on the fly.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N training samples.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Share of captions replaced by the empty string (classifier-free guidance training).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Images are resized and centre-cropped to this size; a multiple of the VAE's scale factor (8 for SD1.5 "
                        "and SDXL). Default: the base model's native size, 512 px for SD1.5 and 1024 px for SDXL.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loader worker processes.")
    g.add_argument("--check_data_samples", type=int, default=8,
                   help="Decode and transform the first N samples before any model is trained (errors name the index).")
    return g


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float = 1e-5, train_batch_size: int = 4,
                      max_train_steps: Optional[int] = None):
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="innercontrol-model", help="Where the model and checkpoints go.")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of the data order, noise, timesteps and validation images: a run is reproducible by "
                        "default; change it for another draw.")
    g.add_argument("--train_batch_size", type=int, default=train_batch_size, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the data (when --max_train_steps is unset).")
    g.add_argument("--max_train_steps", type=int, default=max_train_steps,
                   help="Total optimisation steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Batches whose gradients are summed before each optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help="AdamW learning rate (after warm-up).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by accumulation steps x batch size x number of processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                   help="diffusers.optimization scheduler of the learning rate.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of linear warm-up from 0 to --learning_rate.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip (0 or less: no clipping).")
    return g


def add_precision_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("precision")
    g.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
                   help="Overrides accelerate's config. Frozen models are cast to this dtype; trained weights stay fp32.")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers' memory-efficient attention (needs xformers).")
    g.add_argument("--set_grads_to_none", action="store_true", help="optimizer.zero_grad(set_to_none=True).")
    return g


def add_checkpointing_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save the training state (accelerator.save_state) every N steps, for --resume_from_checkpoint.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder from --checkpointing_steps, or 'latest' (no checkpoint yet: start fresh).")
    return g


def add_logging_args(parser: argparse.ArgumentParser, validation_steps: int = 100):
    g = parser.add_argument_group("logging and validation")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder (inside output_dir).")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO,
                   help="Where losses and validation images are logged (logs under --output_dir/--logging_dir).")
    g.add_argument("--tracker_project_name", type=str, default=None, help="Project name for the trackers.")
    g.add_argument("--validation_prompt", type=str, nargs="+", default=None,
                   help="Validation prompts; one, or as many as --validation_image.")
    g.add_argument("--validation_image", type=str, nargs="+", default=None,
                   help="Validation control images; one, or as many as --validation_prompt.")
    g.add_argument("--num_validation_images", type=int, default=2, help="Images per validation prompt.")
    g.add_argument("--num_validation_inference_steps", type=int, default=20, help="Denoising steps of the validation images.")
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="Classifier-free guidance of the validation images (default: the pipeline's, 7.5 for SD1.5 and 5 "
                        "for SDXL; 3 on ShapesWorld, whose toy SD over-saturates at 7.5).")
    g.add_argument("--validation_steps", type=int, default=validation_steps, help="Validate every N steps.")
    return g


def add_hub_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the final model and its card to the Hub.")
    g.add_argument("--hub_token", type=str, default=None, help="Token (default: the logged-in one).")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: the output_dir's name).")
    g.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    return g


def add_common_args(parser: argparse.ArgumentParser, learning_rate: float = 1e-5, train_batch_size: int = 4,
                    validation_steps: int = 100, default_model: Optional[str] = None):
    add_model_args(parser, default_model=default_model)
    add_data_args(parser)
    add_training_args(parser, learning_rate=learning_rate, train_batch_size=train_batch_size)
    add_precision_args(parser)
    add_checkpointing_args(parser)
    add_logging_args(parser, validation_steps=validation_steps)
    add_hub_args(parser)
    return parser


def _pair(prompts: Optional[Sequence[str]], images: Optional[Sequence[str]]):
    if prompts is None and images is None:
        return [], []
    if (prompts is None) != (images is None):
        missing = "--validation_image" if images is None else "--validation_prompt"
        raise ValueError(f"Validation needs both prompts and control images: also pass {missing}.")
    if len(prompts) == len(images):
        return list(prompts), list(images)
    if len(prompts) == 1:
        return list(prompts) * len(images), list(images)
    if len(images) == 1:
        return list(prompts), list(images) * len(prompts)
    raise ValueError(
        f"{len(prompts)} validation prompts and {len(images)} validation images do not pair: pass one of either, "
        "or as many prompts as images."
    )


def pair_validation(args) -> Tuple[list, list]:
    """The (prompt, control image) pairs of validation; raises `ValueError` if they do not pair."""
    return _pair(getattr(args, "validation_prompt", None), getattr(args, "validation_image", None))


def check_training_dependencies(args) -> None:
    """The optional packages this run needs (the `train` extra), checked before anything is rendered or loaded."""
    needed = ["datasets"]
    if getattr(args, "report_to", None) in ("tensorboard", "all"):
        needed.append("tensorboard")
    if getattr(args, "use_lora", False):
        needed.append("peft")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"This run needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'diffusers-innercontrol[train]' (or pip install {' '.join(missing)})."
        )


def validate_common_args(args):
    """Checks that need no model or data. Raises `ValueError` naming the problem and the fix."""
    if getattr(args, "dataset_name", None) and getattr(args, "train_data_dir", None):
        raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
    if getattr(args, "train_data_dir", None):
        if not os.path.isdir(args.train_data_dir):
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a directory.")
        if not os.path.isfile(os.path.join(args.train_data_dir, "metadata.jsonl")):
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} has no metadata.jsonl (one JSON object per sample).")
    if getattr(args, "streaming", False):
        if getattr(args, "train_data_dir", None):
            raise ValueError("--streaming is for Hub datasets (--dataset_name); a local folder is read directly.")
        if getattr(args, "max_train_steps", None) is None:
            raise ValueError("A streamed dataset has no length: pass --max_train_steps with --streaming.")
    p = getattr(args, "proportion_empty_prompts", 0.0)
    if p is not None and not 0.0 <= p <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {p}.")
    if getattr(args, "resolution", None) is not None and args.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {args.resolution}.")
    for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        if getattr(args, name, 0) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    for name in ("train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    if getattr(args, "max_train_steps", None) is not None and args.max_train_steps < 1:
        raise ValueError("--max_train_steps must be >= 1.")
    if getattr(args, "checkpointing_steps", 1) < 1:
        raise ValueError("--checkpointing_steps must be >= 1.")
    limit = getattr(args, "checkpoints_total_limit", None)
    if limit is not None and limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (or leave it out to keep every checkpoint).")
    if getattr(args, "validation_steps", 1) < 1:
        raise ValueError("--validation_steps must be >= 1.")
    if getattr(args, "use_8bit_adam", False):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or leave the flag out.")
    pair_validation(args)
    return args


def build_optimizer(params, args, accelerator=None):
    """
    AdamW (or bitsandbytes' 8-bit AdamW with `--use_8bit_adam`) from the `add_training_args` options; with
    `--scale_lr`, `args.learning_rate` is first multiplied by the accumulation steps, the per-device batch and
    the number of processes (as diffusers' examples do).
    """
    if getattr(args, "scale_lr", False):
        processes = accelerator.num_processes if accelerator is not None else 1
        args.learning_rate = args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        import torch  # here, not at the top: parsing the arguments must not load torch (scripts check --task first)

        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def run_main(main, args, training_started=None, extra_errors=()):
    """
    Run a script's `main(args)` so that bad input ends with one line on stderr and exit status 1 (no traceback):
    a model id that needs the network offline, unusable data, and (until `training_started()` says otherwise) the
    `ValueError`s of the argument checks, each of which names the problem and the fix.
    """

    from .data import DataError  # loads torch: after the arguments are parsed

    output_dir = getattr(args, "output_dir", None)
    existed = output_dir is None or os.path.exists(output_dir)
    try:
        return main(args)
    except (OfflineModelError, DataError, *extra_errors) as err:
        _remove_if_empty(output_dir, existed, training_started)
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    except ValueError as err:
        if training_started is None or training_started():
            raise
        _remove_if_empty(output_dir, existed, training_started)
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def _remove_if_empty(output_dir, existed: bool, training_started) -> None:
    """A run that failed before training leaves no output folder it created (only empty folders are removed)."""
    if existed or (training_started is not None and training_started()) or not os.path.isdir(output_dir):
        return
    if any(files for _, _, files in os.walk(output_dir)):
        return
    shutil.rmtree(output_dir, ignore_errors=True)
