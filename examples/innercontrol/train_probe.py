#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Stage 1 of InnerControl: train a readout probe (`ReadoutProbe`) on the frozen UNet's decoder features.

    accelerate launch examples/innercontrol/train_probe.py \
        --task depth --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir ./depth_data --validation_split 0.02 --output_dir probe-depth

What a step does (docs/method.md; the math is `diffusers_innercontrol.training.probe_step`): VAE-encode the
images, draw t ~ U[0, 1000) per sample, noise the latents, one frozen UNet forward (optionally conditioned by
a frozen ControlNet on the control) under `no_grad` with the decoder features captured, the probe's prediction
and the task's loss against the control (MSE for depth and LineArt, sparse MSE for HED, cross-entropy for
segmentation). Only the probe is trained; its copy of the UNet's timestep embedding stays frozen, so that
the probe embeds t exactly as the UNet does, here and in stage 2 (where the whole probe is frozen).

Validation (every --validation_steps and at the end): a grid of the probe's predictions at several t next to
the control (PNG under output_dir/validation and in the trackers) and the probe's error per timestep bucket
on held-out data (JSON). The trained probe is saved with `save_pretrained` (safetensors + config.json).

Options beyond diffusers' ControlNet example (`--help` lists all):
    --task {hed,lineart,depth,segmentation} [--preset paper|released]   every default below comes from the task
    --controlnet_model_name_or_path     frozen ControlNet conditioning the UNet (ControlNet-conditioned features)
    --init_probe                        continue training a saved ReadoutProbe (checked against the UNet)
    --feature_kind --feature_scale --upsample_head --out_channels --projection_dim --norm_num_groups
    --use_captions                      condition the UNet on the captions (default: the empty prompt)
    --validation_split | --validation_data_dir | --validation_dataset_name [--validation_dataset_split]
    --validation_timesteps 100 300 500 700 900   --num_grid_samples 4   --num_error_buckets 10
    --max_validation_samples 64
Defaults follow the paper's recipe: AdamW lr 1e-3 constant, no weight decay, no clipping, batch 8,
--max_train_steps = the task's probe_train_steps (10 000 for edges, 5 000 for depth and segmentation).

Output folder: config.json + diffusion_pytorch_model.safetensors (`ReadoutProbe.from_pretrained(output_dir)`),
probe_error.json, validation_grid.png, README.md (model card), checkpoint-N/, validation/, logs/.
"""

import argparse
import logging
import os
from typing import TYPE_CHECKING, Dict, List, Optional

# Only light imports here: argparse checks the arguments (and --task) before torch, diffusers and the models load,
# which happens in the functions below.
from diffusers_innercontrol import cli
from diffusers_innercontrol.cli import (
    add_checkpointing_args,
    add_data_args,
    add_hub_args,
    add_logging_args,
    add_model_args,
    add_precision_args,
    add_training_args,
    validate_common_args,
)
from diffusers_innercontrol.tasks import DEFAULT_GRID_TIMESTEPS, PRESETS, TASK_NAMES, get_task
from diffusers_innercontrol.toy.quickstart import parse_with_default_world

if TYPE_CHECKING:
    import torch

    from diffusers_innercontrol import ReadoutProbe

logger = logging.getLogger("train_probe")

PROBE_ERROR_FILE = "probe_error.json"
GRID_FILE = "validation_grid.png"


# ------------------------------------------------------------------------------------------------ arguments
def _true_or_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an InnerControl readout probe (stage 1).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", type=str, required=True, choices=TASK_NAMES,
                        help=f"Control task: one of {', '.join(TASK_NAMES)}. Sets every default below.")
    parser.add_argument("--preset", type=str, default="paper", choices=PRESETS,
                        help="Task settings of the paper, or of the released InnerControl launchers.")

    add_model_args(parser)
    models = parser.add_argument_group("probe")
    models.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                        help="A frozen ControlNet conditioning the UNet on the control (ControlNet-conditioned features). "
                             "Default: the plain UNet.")
    models.add_argument("--init_probe", type=str, default=None,
                        help="Continue training a saved ReadoutProbe (local folder or Hub id) instead of a new one.")
    models.add_argument("--feature_kind", type=str, default=None, choices=("resnet", "attention"),
                        help="Decoder features the probe reads. Default: the task's.")
    models.add_argument("--feature_scale", type=float, default=None,
                        help="Common feature size relative to the latent size (2.0: the paper's HED/LineArt). Default: the task's.")
    models.add_argument("--upsample_head", type=_true_or_false, default=None, metavar="{true,false}",
                        help="2x transposed convolution in the output head. Default: the task's.")
    models.add_argument("--projection_dim", type=int, default=384, help="Width of the projected features (384 in the paper).")
    models.add_argument("--norm_num_groups", type=int, default=32, help="GroupNorm groups of the probe (divides projection_dim / 4).")
    models.add_argument("--out_channels", type=int, default=None,
                        help="Predicted channels (number of classes for segmentation). Default: the task's.")
    models.add_argument("--alignment_loss", type=str, default=None, choices=("mse", "sparse_mse", "ce"),
                        help="The probe's training loss against the control. Default: the task's (its alignment loss).")

    data = add_data_args(parser)
    data.add_argument("--use_captions", action="store_true",
                      help="Condition the UNet on the captions (default: the empty prompt, as Readout Guidance).")
    data.add_argument("--validation_split", type=float, default=None,
                      help="Hold out this share (0 < x < 1) or this number (x >= 1) of the training samples (after "
                           "--max_train_samples; a seeded random choice) for the probe's error per timestep bucket.")
    data.add_argument("--validation_data_dir", type=str, default=None,
                      help="A separate held-out folder with metadata.jsonl (same columns as the training data).")
    data.add_argument("--validation_dataset_name", type=str, default=None,
                      help="A separate held-out Hub dataset (same columns), e.g. limingcv/MultiGen-20M_depth_eval.")
    data.add_argument("--validation_dataset_split", type=str, default="train", help="Split of --validation_dataset_name.")

    train = add_training_args(parser, learning_rate=1e-3, train_batch_size=8)
    parser.set_defaults(adam_weight_decay=0.0, max_grad_norm=0.0)  # Readout Guidance: AdamW, no decay, no clipping
    add_precision_args(parser)
    add_checkpointing_args(parser)
    val = add_logging_args(parser, validation_steps=500)
    val.add_argument("--validation_timesteps", type=int, nargs="+", default=list(DEFAULT_GRID_TIMESTEPS),
                     help="Timesteps of the columns of the validation grid.")
    val.add_argument("--num_grid_samples", type=int, default=4, help="Rows (held-out samples) of the validation grid.")
    val.add_argument("--num_error_buckets", type=int, default=10, help="Timestep buckets of the probe's error (10 x 100 steps).")
    val.add_argument("--max_validation_samples", type=int, default=64,
                     help="Held-out samples the error is computed on (each once per bucket).")
    train.add_argument("--validation_batch_size", type=int, default=None, help="Default: --train_batch_size.")
    add_hub_args(parser)

    # no model and no data: the bundled ShapesWorld toy SD and data as defaults; else SD1.5
    return parse_with_default_world(parser, input_args, "probe", resolve_task)


def validate_args(args) -> None:
    """Checks that need no model: raise `ValueError` naming the problem and the fix."""
    validate_common_args(args)
    if args.task not in TASK_NAMES:
        raise ValueError(f"Unknown task {args.task!r}: choose one of {', '.join(TASK_NAMES)} (--task).")
    if args.validation_prompt or args.validation_image:
        raise ValueError(
            "train_probe.py validates on held-out samples (images and their controls), not on --validation_prompt/"
            "--validation_image: pass --validation_split, --validation_data_dir or --validation_dataset_name."
        )
    held_out = [o for o in ("validation_split", "validation_data_dir", "validation_dataset_name") if getattr(args, o) is not None]
    if len(held_out) > 1:
        raise ValueError(f"Pass one source of held-out data, got {', '.join('--' + o for o in held_out)}.")
    if args.validation_split is not None:
        if args.validation_split <= 0 or (args.validation_split >= 1 and args.validation_split != int(args.validation_split)):
            raise ValueError(f"--validation_split is a share in (0, 1) or a whole number of samples, got {args.validation_split}.")
        if args.streaming:
            raise ValueError("A streamed dataset cannot be split: pass --validation_data_dir or --validation_dataset_name.")
    if args.validation_data_dir is not None and not os.path.isfile(os.path.join(args.validation_data_dir, "metadata.jsonl")):
        raise ValueError(f"--validation_data_dir {args.validation_data_dir!r} has no metadata.jsonl.")
    if args.feature_scale is not None and args.feature_scale <= 0:
        raise ValueError(f"--feature_scale must be > 0, got {args.feature_scale}.")
    if args.out_channels is not None and args.out_channels < 1:
        raise ValueError(f"--out_channels must be >= 1, got {args.out_channels}.")
    if args.projection_dim % 4 or (args.projection_dim // 4) % args.norm_num_groups:
        raise ValueError(
            f"--projection_dim {args.projection_dim} / 4 must be divisible by --norm_num_groups {args.norm_num_groups}."
        )
    bad = [t for t in args.validation_timesteps if not 0 <= t < 1000]
    if bad:
        raise ValueError(f"--validation_timesteps {bad} are outside [0, 1000).")
    for name in ("num_grid_samples", "num_error_buckets", "max_validation_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")


def resolve_task(args):
    """The task with the probe options given on the command line (validated by `Task.replace`)."""
    task = get_task(args.task, args.preset)
    changes = {}
    for option, field in (("feature_kind", "feature_kind"), ("feature_scale", "feature_scale"),
                          ("upsample_head", "upsample_head"), ("out_channels", "probe_out_channels"),
                          ("alignment_loss", "alignment_loss")):
        value = getattr(args, option)
        if value is not None:
            changes[field] = value
    task = task.replace(**changes) if changes else task
    if task.is_segmentation and task.num_classes and task.probe_out_channels < task.num_classes:
        raise ValueError(
            f"--out_channels {task.probe_out_channels} is fewer than the {task.num_classes} segmentation classes the "
            "controls are mapped to: the probe needs one output channel per class."
        )
    return task


# ------------------------------------------------------------------------------------------------ models
def load_models(args, weight_dtype):
    from diffusers import ControlNetModel

    from diffusers_innercontrol.hub_utils import check_model_available, load_pretrained
    from diffusers_innercontrol.training_utils import (
        is_sdxl_model,
        load_base_models,
        load_tokenizers,
        resolve_resolution,
    )

    check_model_available(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", subfolder="unet",
                          revision=args.revision)
    if args.controlnet_model_name_or_path:
        check_model_available(args.controlnet_model_name_or_path, "--controlnet_model_name_or_path", required="config.json")
    if args.init_probe:
        check_model_available(args.init_probe, "--init_probe", required="config.json")
    sdxl = is_sdxl_model(args)  # SDXL: the second text encoder gives the pooled embedding the UNet adds to t's
    resolve_resolution(args, sdxl)  # default: 512 px for SD1.5, 1024 px for SDXL
    models = load_base_models(args, sdxl)
    models["tokenizer"], models["tokenizer_2"] = load_tokenizers(args, sdxl)
    models["controlnet"] = None
    if args.controlnet_model_name_or_path:
        models["controlnet"] = load_pretrained(ControlNetModel, args.controlnet_model_name_or_path,
                                               "--controlnet_model_name_or_path", cache_dir=args.cache_dir)
        models["controlnet"].requires_grad_(False)
        models["controlnet"].eval()
    return models


def check_models(args, task, models) -> None:
    """Shapes that must fit before anything is trained: resolution vs VAE/UNet, ControlNet vs UNet."""
    from diffusers_innercontrol import decoder_feature_channels
    from diffusers_innercontrol.data import check_resolution, vae_scale_factor_of

    unet = models["unet"]
    check_resolution(args.resolution, vae_scale_factor_of(models["vae"].config))
    controlnet = models["controlnet"]
    if controlnet is not None:
        if controlnet.config.block_out_channels != unet.config.block_out_channels:
            raise ValueError(
                f"--controlnet_model_name_or_path has block_out_channels {tuple(controlnet.config.block_out_channels)}, "
                f"the UNet {tuple(unet.config.block_out_channels)}: pass the ControlNet of this base model."
            )
        if controlnet.config.conditioning_channels != task.control_channels:
            raise ValueError(
                f"The ControlNet takes {controlnet.config.conditioning_channels}-channel controls; task '{task.name}' "
                f"controls have {task.control_channels}."
            )
    try:
        decoder_feature_channels(unet, task.feature_kind)
    except ValueError as err:
        raise ValueError(f"{err} Pass --feature_kind {'resnet' if task.feature_kind == 'attention' else 'attention'}.") from None


def build_probe(args, task, unet) -> "ReadoutProbe":
    """A new probe for `unet`'s features (the task's configuration), or `--init_probe`, checked against the UNet."""
    from diffusers_innercontrol import ReadoutProbe
    from diffusers_innercontrol.features import check_probe_fits_unet
    from diffusers_innercontrol.hub_utils import load_pretrained

    if args.init_probe:
        probe = load_pretrained(ReadoutProbe, args.init_probe, "--init_probe", cache_dir=args.cache_dir)
        cfg = probe.config
        for option, field, wanted in (("feature_kind", "feature_kind", args.feature_kind),
                                      ("feature_scale", "feature_scale", args.feature_scale),
                                      ("upsample_head", "upsample_head", args.upsample_head),
                                      ("out_channels", "out_channels", args.out_channels)):
            if wanted is not None and getattr(cfg, field) != wanted:
                raise ValueError(
                    f"--init_probe has {field}={getattr(cfg, field)!r} but --{option} {wanted!r} was given: leave "
                    f"--{option} out to continue the saved probe, or train a new probe without --init_probe."
                )
        check_probe_fits_unet(unet, cfg.feature_kind, cfg.feature_channels, "--init_probe",
                              f"Pass the probe of {args.pretrained_model_name_or_path}, or leave --init_probe out.")
        if task.is_segmentation and task.num_classes and cfg.out_channels < task.num_classes:
            raise ValueError(f"--init_probe predicts {cfg.out_channels} classes; task segmentation needs {task.num_classes}.")
        return probe
    return ReadoutProbe.from_unet(
        unet, **task.probe_kwargs(), projection_dim=args.projection_dim, norm_num_groups=args.norm_num_groups
    )


# ------------------------------------------------------------------------------------------------ data
def build_datasets(args, task, tokenizer, tokenizer_2=None):
    """(train dataset, held-out dataset or None) from the shared data module; `tokenizer_2`: SDXL's second one."""
    from diffusers_innercontrol.data import DataConfig, build_train_dataset, split_held_out

    config = DataConfig.from_args(args)
    train_dataset, columns = build_train_dataset(config, task, tokenizer, tokenizer_2=tokenizer_2)
    val_dataset = None
    if args.validation_split is not None:
        train_dataset, val_dataset = split_held_out(train_dataset, args.validation_split, seed=args.seed or 0)
    elif args.validation_data_dir or args.validation_dataset_name:
        held_out = config.held_out(args.validation_data_dir, args.validation_dataset_name,
                                   args.validation_dataset_split, args.max_validation_samples)
        val_dataset, _ = build_train_dataset(held_out, task, tokenizer, tokenizer_2=tokenizer_2)
        val_dataset.shuffle = False
        val_dataset.set_epoch(0)
    return train_dataset, val_dataset, columns


def first_samples(dataset, n: int):
    """The first `n` samples of a dataset, collated (the rows of the validation grid)."""
    import torch

    from diffusers_innercontrol.data import collate_fn

    if isinstance(dataset, torch.utils.data.IterableDataset):
        examples = []
        for example in dataset:
            examples.append(example)
            if len(examples) == n:
                break
    else:
        examples = [dataset[i] for i in range(min(n, len(dataset)))]
    return collate_fn(examples)


# ------------------------------------------------------------------------------------------------ validation
def log_validation(*, args, task, probe, models, batch_inputs, grid_batch, val_dataloader, accelerator, step,
                   weight_dtype, final: bool = False):
    """Grid of predictions at several t (PNG + trackers) and the error per t bucket on held-out data (JSON)."""
    import torch

    from diffusers_innercontrol.probe_eval import evaluate_probe, predict_at_timesteps, validation_grid

    logger.info(f"Running validation at step {step}")
    probe = accelerator.unwrap_model(probe)
    out_dir = os.path.join(args.output_dir, "validation")
    os.makedirs(out_dir, exist_ok=True)

    inputs = batch_inputs(grid_batch, generator=torch.Generator().manual_seed(args.seed or 0))
    predictions = predict_at_timesteps(
        probe=probe, unet=models["unet"], noise_scheduler=models["noise_scheduler"], latents=inputs["latents"],
        encoder_hidden_states=inputs["encoder_hidden_states"], timesteps=args.validation_timesteps,
        controlnet=models["controlnet"], control=inputs["control"], seed=args.seed or 0, weight_dtype=weight_dtype,
        added_cond_kwargs=inputs.get("added_cond_kwargs"),
    )
    classes = inputs.get("control_classes")
    grid = validation_grid(
        task, inputs["control"].cpu(), [p.cpu() for p in predictions], None if classes is None else classes.cpu(),
        image=(grid_batch["pixel_values"].float() + 1) / 2, timesteps=args.validation_timesteps,
    )
    grid.save(os.path.join(out_dir, f"grid_step{step:06d}.png"))
    if final:
        grid.save(os.path.join(args.output_dir, GRID_FILE))

    errors = None
    if val_dataloader is not None:
        eval_generator = torch.Generator().manual_seed(args.seed or 0)
        errors = evaluate_probe(
            task=task, probe=probe, unet=models["unet"], noise_scheduler=models["noise_scheduler"], batches=val_dataloader,
            prepare=lambda b: batch_inputs(b, generator=eval_generator), controlnet=models["controlnet"],
            num_buckets=args.num_error_buckets, seed=args.seed or 0, weight_dtype=weight_dtype,
        )
        extra = {"step": step, "task": task.name, "feature_kind": probe.config.feature_kind}
        errors.save(os.path.join(out_dir, f"probe_error_step{step:06d}.json"), extra=extra)
        if final:
            errors.save(os.path.join(args.output_dir, PROBE_ERROR_FILE), extra=extra)
        logger.info("Probe error per timestep bucket:\n" + errors.to_markdown())

    for tracker in accelerator.trackers:  # the grid carries its column labels
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation/grid", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/grid": wandb.Image(grid)}, step=step)
    if errors is not None:
        accelerator.log(errors.log_dict("probe_error"), step=step)
    return grid, errors


# ------------------------------------------------------------------------------------------------ card
def save_model_card_for_probe(args, task, probe, grid, errors, repo_id=None, sdxl=False):
    """The probe's card: task, feature kind, channels, base model, loss, error per t bucket, the grid."""
    from diffusers_innercontrol.hub import save_model_card

    cfg = probe.config
    train_args = {  # the task, base model, feature kind and loss rows are written by hub.save_model_card
        "feature channels": list(cfg.feature_channels),
        "feature scale": cfg.feature_scale,
        "upsample head": cfg.upsample_head,
        "output channels": cfg.out_channels,
        "output activation": cfg.output_activation,
        "probe parameters (without the copied time embedding)": probe.num_probe_parameters,
        "UNet prompt": "captions" if args.use_captions else "empty prompt",
        "training steps": args.max_train_steps,
        "batch size": args.train_batch_size,
        "learning rate": args.learning_rate,
        "timesteps": "t ~ U[0, 1000)",
    }
    text = ["## Error per timestep bucket (held-out data)\n"]
    if errors is not None:
        text.append(f"Per-sample `{task.alignment_loss}` of the probe against the control, mean per bucket of t:\n")
        text.append(errors.to_markdown() + "\n")
    else:
        text.append("No held-out data was given (--validation_split / --validation_data_dir).\n")
    text.append(
        f"The validation grid shows, per row, the image, its control and the probe's readout at t = "
        f"{', '.join(map(str, args.validation_timesteps))}.\n"
    )
    return save_model_card(
        args.output_dir, base_model=args.pretrained_model_name_or_path, model_kind="probe", repo_id=repo_id,
        task=task, controlnet=args.controlnet_model_name_or_path,
        dataset=args.dataset_name or args.train_data_dir or task.dataset_name,
        images=[grid] if grid is not None else None, train_args=train_args, extra_text="\n".join(text), sdxl=sdxl,
    )


# ------------------------------------------------------------------------------------------------ main
def main(args):
    import torch
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from diffusers_innercontrol.checkpointing import resume_from_checkpoint, save_checkpoint
    from diffusers_innercontrol.data import check_samples, collate_fn
    from diffusers_innercontrol.hub import push_folder
    from diffusers_innercontrol.toy.quickstart import prepare_default_world
    from diffusers_innercontrol.training import encode_images, encode_prompt_sdxl, probe_step, sdxl_time_ids
    from diffusers_innercontrol.training_utils import (
        move_frozen,
        optimizer_step,
        plan_steps,
        sdxl_conditioning,
        setup_accelerator,
        step_generator,
        train_batches,
        vae_dtype_for,
        weight_dtype_of,
        where_saved,
    )

    cli.check_training_dependencies(args)  # before the ShapesWorld folders are rendered
    prepare_default_world(args)  # renders the ShapesWorld folders of a run with no model and no data
    validate_args(args)
    task = resolve_task(args)
    if args.max_train_steps is None:
        args.max_train_steps = task.probe_train_steps

    accelerator = setup_accelerator(args)
    logger.info(accelerator.state)
    weight_dtype = weight_dtype_of(accelerator)

    # Models, then every shape check, then the data (decoded up front): all before any training.
    models = load_models(args, weight_dtype)
    check_models(args, task, models)
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    probe = build_probe(args, task, unet)
    if probe.config.feature_kind != task.feature_kind or probe.config.out_channels != task.probe_out_channels:
        task = task.replace(feature_kind=probe.config.feature_kind, probe_out_channels=probe.config.out_channels,
                            feature_scale=probe.config.feature_scale, upsample_head=probe.config.upsample_head)
    probe.time_embedding.requires_grad_(False)  # the UNet's embedding of t, as in stage 2
    probe.train()

    train_dataset, val_dataset, columns = build_datasets(
        args, task, models["tokenizer"] if args.use_captions else None, models["tokenizer_2"] if args.use_captions else None)
    check_samples(train_dataset, args.check_data_samples)
    if val_dataset is not None:
        check_samples(val_dataset, args.check_data_samples)

    for model in (unet, text_encoder, models["text_encoder_2"], models["controlnet"]):
        if model is not None:
            move_frozen(model, accelerator.device, weight_dtype)
    move_frozen(vae, accelerator.device, vae_dtype_for(models, args, weight_dtype))
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        logger.info("--gradient_checkpointing has no effect here: the UNet runs under no_grad in stage 1.")

    sdxl = models["sdxl"]
    with torch.no_grad():
        if sdxl:  # both encoders' penultimate states, and the pooled projection of the second
            empty_embedding, empty_pooled = encode_prompt_sdxl(
                (text_encoder, models["text_encoder_2"]), (models["tokenizer"], models["tokenizer_2"]), [""],
                accelerator.device,
            )
        else:
            empty_ids = models["tokenizer"](
                [""], max_length=models["tokenizer"].model_max_length, padding="max_length", truncation=True,
                return_tensors="pt",
            ).input_ids.to(accelerator.device)
            empty_embedding = text_encoder(empty_ids, return_dict=False)[0]

    def batch_inputs(batch, generator=None) -> Dict[str, "torch.Tensor"]:
        """Latents, text embeddings and controls of a collated batch (frozen models, no_grad)."""
        with torch.no_grad():
            pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
            latents = encode_images(vae, pixels, generator=generator).float()
            added_cond_kwargs = None
            if args.use_captions and sdxl:  # both encoders on the captions, their pooled embedding, the size / crop ids
                tokens = {k: batch[k].to(accelerator.device) for k in ("input_ids", "input_ids_2")}
                ehs, added_cond_kwargs = sdxl_conditioning(models, tokens, args, accelerator.device, weight_dtype)
            elif args.use_captions:
                ehs = text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]
            else:
                ehs = empty_embedding.expand(latents.shape[0], -1, -1)
        out = {
            "latents": latents.to(weight_dtype),
            "encoder_hidden_states": ehs.to(weight_dtype),
            "control": batch["conditioning_pixel_values"].to(accelerator.device, dtype=torch.float32),
        }
        if "control_classes" in batch:
            out["control_classes"] = batch["control_classes"].to(accelerator.device)
        if added_cond_kwargs is not None:
            out["added_cond_kwargs"] = added_cond_kwargs
        elif sdxl:  # the pooled empty prompt and the size / crop ids (--crops_coords_top_left_h / _w)
            n, height, width = latents.shape[0], pixels.shape[-2], pixels.shape[-1]
            out["added_cond_kwargs"] = {
                "text_embeds": empty_pooled.expand(n, -1).to(weight_dtype),
                "time_ids": sdxl_time_ids(n, height, width, accelerator.device, weight_dtype,
                                          crops_coords_top_left=(args.crops_coords_top_left_h, args.crops_coords_top_left_w)),
            }
        return out

    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = cli.build_optimizer(params, args, accelerator)

    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, shuffle=False, collate_fn=collate_fn, batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # The loader draws a base seed at every `iter()`: from its own generator, not from the global RNG, so that
        # the extra `iter()` of a resumed run (after `load_state` restored the RNG) leaves the noise unchanged.
        generator=torch.Generator().manual_seed(args.seed or 0),
    )  # shuffled by the dataset per epoch (data.TrainDataset.set_epoch): exact resume
    val_dataloader = None
    if val_dataset is not None and accelerator.is_main_process:
        val_subset = torch.utils.data.Subset(val_dataset, range(min(args.max_validation_samples, len(val_dataset))))
        val_dataloader = torch.utils.data.DataLoader(
            val_subset, shuffle=False, collate_fn=collate_fn, batch_size=args.validation_batch_size or args.train_batch_size,
        )
    grid_batch = first_samples(val_dataset if val_dataset is not None else train_dataset, args.num_grid_samples)
    if val_dataset is None:
        logger.warning("No held-out data: the validation grid shows training samples and no error per t is computed.")

    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    probe, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(probe, optimizer, train_dataloader, lr_scheduler)

    plan = plan_steps(train_dataset, args, accelerator.num_processes)

    if accelerator.is_main_process:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name or "train_probe", config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running stage-1 probe training *****")
    logger.info(f"  Task = {task.name} ({task.preset}), feature kind = {task.feature_kind}, loss = {task.alignment_loss}")
    logger.info(f"  Probe parameters (without the copied time embedding) = {accelerator.unwrap_model(probe).num_probe_parameters}")
    logger.info(f"  Num examples = {'streamed' if plan.streaming else len(train_dataset)}")
    logger.info(f"  Total train batch size = {total_batch_size}, max steps = {args.max_train_steps}")

    state = resume_from_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir, plan.num_update_steps_per_epoch)
    global_step = state.global_step
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    batches = train_batches(accelerator, train_dataloader, plan, state, args.gradient_accumulation_steps)
    for epoch, batch_index, batch in batches if global_step < args.max_train_steps else ():
        gen = step_generator(args.seed, accelerator.device, accelerator.process_index, epoch, batch_index)
        with accelerator.accumulate(probe):
            inputs = batch_inputs(batch, generator=gen)
            loss = probe_step(
                task=task, unet=unet, probe=probe, noise_scheduler=models["noise_scheduler"],
                latents=inputs["latents"], encoder_hidden_states=inputs["encoder_hidden_states"],
                control=inputs["control"], control_classes=inputs.get("control_classes"),
                controlnet=models["controlnet"], weight_dtype=weight_dtype, generator=gen,
                added_cond_kwargs=inputs.get("added_cond_kwargs"),
            )
            optimizer_step(accelerator, loss, params, optimizer, lr_scheduler, args, terms={f"probe ({task.alignment_loss})": loss},
                           step=global_step + 1, epoch=epoch, hint="lowering --learning_rate or checking the controls.")

        if accelerator.sync_gradients:
            progress_bar.update(1)
            global_step += 1
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if accelerator.is_main_process and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                log_validation(args=args, task=task, probe=probe, models=models, batch_inputs=batch_inputs,
                               grid_batch=grid_batch, val_dataloader=val_dataloader, accelerator=accelerator,
                               step=global_step, weight_dtype=weight_dtype)
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
        progress_bar.set_postfix(**logs)
        accelerator.log(logs, step=global_step)
        if global_step >= args.max_train_steps:
            break

    print(f"[process {accelerator.process_index}/{accelerator.num_processes}] trained {global_step} steps", flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_probe = accelerator.unwrap_model(probe)
        final_probe.save_pretrained(args.output_dir, safe_serialization=True)
        grid, errors = log_validation(args=args, task=task, probe=final_probe, models=models, batch_inputs=batch_inputs,
                                      grid_batch=grid_batch, val_dataloader=val_dataloader, accelerator=accelerator,
                                      step=global_step, weight_dtype=weight_dtype, final=True)
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        save_model_card_for_probe(args, task, final_probe, grid, errors, repo_id=repo_id, sdxl=sdxl)
        if args.push_to_hub:
            push_folder(args.output_dir, repo_id=repo_id, token=args.hub_token, private=args.hub_private)
        accelerator.print(where_saved(args.output_dir, "The probe", args.logging_dir))
    accelerator.end_training()


if __name__ == "__main__":
    cli.run_main(main, parse_args())
