#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Stage 2 of InnerControl: train a ControlNet with Eq. 8,

    L = L_diffusion + alpha * L_reward(t in reward window) + beta * L_alignment(t in alignment window).

alpha = beta = 0 is plain ControlNet fine-tuning, beta = 0 is ControlNet++, alpha = 0 is alignment only.
Run it with `accelerate launch train_innercontrol.py --task depth ...` (see README.md). The script is thin:
the step is `diffusers_innercontrol.training.controlnet_step`; data, arguments, checkpoints and the model
card live in the package (`data`, `cli`, `checkpointing`, `hub`).
"""

import argparse
import logging
import os
import statistics
import time
from typing import List, Optional

# torch, diffusers, transformers and the models are imported inside the functions: argparse checks the arguments
# (and --task) before those heavy imports.

logger = logging.getLogger("train_innercontrol")

LORA_TARGET_MODULES = (
    r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$|.*\.(proj_in|proj_out|conv1|conv2|conv_shortcut)$"
    r"|.*controlnet_down_blocks\.\d+$|.*controlnet_mid_block$|.*controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+)$"
)


_TRAINING_STARTED = False  # ValueErrors before this are bad input (one line); after it, bugs (traceback)


# --------------------------------------------------------------------------------------------- arguments
def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    from diffusers_innercontrol import cli
    from diffusers_innercontrol.tasks import PRESETS, TASK_NAMES

    parser = argparse.ArgumentParser(description="Train a ControlNet with InnerControl's reward and alignment losses (Eq. 8).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", type=str, required=True, choices=TASK_NAMES, help="The control task: selects every default.")
    parser.add_argument("--preset", type=str, default="paper", choices=PRESETS,
                        help="The paper's settings, or the released InnerControl launchers'.")
    cli.add_common_args(parser, learning_rate=1e-5, train_batch_size=4, validation_steps=100)
    g = parser.add_argument_group("innercontrol")
    g.add_argument("--alpha", type=float, default=None, help="Reward weight (default: the task's). 0 turns the reward off.")
    g.add_argument("--beta", type=float, default=None, help="Alignment weight (default: the task's). 0 turns it off.")
    g.add_argument("--reward_window", type=cli.parse_window, default=None, help="Inclusive timesteps 'lo,hi' of the reward.")
    g.add_argument("--alignment_window", type=cli.parse_window, default=None, help="Inclusive timesteps 'lo,hi' of the alignment.")
    g.add_argument("--reward_loss", type=str, default=None, help="mse or ce (default: the task's).")
    g.add_argument("--alignment_loss", type=str, default=None, help="mse, sparse_mse or ce (default: the task's).")
    g.add_argument("--reward_decode", type=str, default="masked", choices=("masked", "full"),
                   help="'masked': VAE decode + reward only on samples inside the reward window; 'full': whole batch (released code).")
    g.add_argument("--combined_backward", action="store_true",
                   help="One backward through everything. By default the reward's decode and the probe backpropagate to "
                        "their inputs a few samples at a time inside the step, which frees their activations early (a "
                        "lower peak memory, the same gradients); fp16 always uses one backward.")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="ControlNet to start from (e.g. the task's ControlNet v1.1); default: initialised from the UNet.")
    g.add_argument("--probe_model_name_or_path", type=str, default=None,
                   help="The stage-1 ReadoutProbe (train_probe.py); required when beta > 0.")
    g.add_argument("--probe_revision", type=str, default=None, help="Hub revision of --probe_model_name_or_path.")
    g.add_argument("--reward_model_name_or_path", type=str, default=None,
                   help="Reward model id or local dir (default: the task's, listed in docs/method.md); used when alpha > 0.")
    g.add_argument("--reward_model_filename", type=str, default=None, help="Weights file inside it (HED/LineArt .pth).")
    g.add_argument("--reward_model_revision", type=str, default=None, help="Hub revision of the reward model.")
    g.add_argument("--reward_model_variant", type=str, default=None, help="Weights variant of a transformers reward model (e.g. fp16).")
    g.add_argument("--use_lora", action="store_true", help="Train LoRA adapters on the ControlNet instead of all weights.")
    g.add_argument("--lora_rank", type=int, default=16, help="Rank of the LoRA adapters (--use_lora).")
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA scaling alpha (default: the rank).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout of the LoRA adapters.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights; the EMA weights are saved.")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="Decay of the EMA (--use_ema).")
    g.add_argument("--num_validation_readouts", type=int, default=3,
                   help="Denoising steps at which the probe's readouts are shown during validation.")
    # no model and no data: the bundled ShapesWorld (toy SD, ControlNet, probe, reward) as defaults; else SD1.5
    from diffusers_innercontrol.toy.quickstart import parse_with_default_world

    return parse_with_default_world(parser, input_args, "controlnet", resolve_task)



def resolve_task(args):
    """The `Task` with the command line's overrides; raises `ValueError` naming the bad value."""
    from diffusers_innercontrol.tasks import get_task

    task = get_task(args.task, args.preset)
    changes = {}
    for name in ("alpha", "beta", "reward_window", "alignment_window", "reward_loss", "alignment_loss"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = tuple(value) if name.endswith("window") else value
    return task.replace(**changes) if changes else task


def validate_args(args):
    """Every check that needs no model weights. Returns the `Task`. Raises `ValueError` / `OfflineModelError`."""
    from diffusers_innercontrol import cli
    from diffusers_innercontrol.hub_utils import check_model_available

    task = resolve_task(args)
    cli.validate_common_args(args)
    if task.beta > 0 and not args.probe_model_name_or_path:
        raise ValueError(
            f"beta = {task.beta} > 0 needs a trained readout probe: pass --probe_model_name_or_path (train one with "
            "train_probe.py), or --beta 0 for ControlNet++ / plain ControlNet training."
        )
    if args.use_lora and args.lora_rank < 1:
        raise ValueError("--lora_rank must be >= 1.")
    for image in args.validation_image or []:
        if not os.path.isfile(image):
            raise ValueError(f"--validation_image {image!r} does not exist.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        from diffusers_innercontrol.checkpointing import resolve_resume_path

        resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    # offline: fail fast, one line per model id, before anything is built
    check_model_available(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", revision=args.revision)
    if args.tokenizer_name:
        check_model_available(args.tokenizer_name, "--tokenizer_name")
    check_model_available(args.controlnet_model_name_or_path, "--controlnet_model_name_or_path", required="config.json")
    check_model_available(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path", required="config.json")
    if args.annotator_model_name_or_path:
        check_model_available(args.annotator_model_name_or_path, "--annotator_model_name_or_path")
    if task.beta > 0:
        check_model_available(args.probe_model_name_or_path, "--probe_model_name_or_path", revision=args.probe_revision,
                              required="config.json")
    if task.alpha > 0:
        check_model_available(
            args.reward_model_name_or_path or task.reward_model_id, "--reward_model_name_or_path",
            filename=args.reward_model_filename or (None if args.reward_model_name_or_path else task.reward_model_file),
            revision=args.reward_model_revision,
        )
    return task


# --------------------------------------------------------------------------------------------- models
def check_probe(probe, unet, task):
    """The probe must read the features this UNet gives: same feature kind present, same channels, right outputs."""
    from diffusers_innercontrol.features import check_probe_fits_unet
    from diffusers_innercontrol.tasks import check_probe_task

    check_probe_task(probe.config, task)
    kind = probe.config.feature_kind
    check_probe_fits_unet(unet, kind, probe.config.feature_channels, "The probe",
                          "Train a probe on --pretrained_model_name_or_path with train_probe.py.")
    if task.is_segmentation and probe.config.out_channels != task.num_classes:
        raise ValueError(f"A segmentation probe needs {task.num_classes} outputs (classes), this one has {probe.config.out_channels}.")
    if not task.is_segmentation and probe.config.out_channels not in (1, 3):
        raise ValueError(f"A '{task.name}' probe predicts a 1- or 3-channel map, this one has {probe.config.out_channels} outputs.")
    if kind != task.feature_kind:
        logger.warning(f"The probe reads '{kind}' features; the task's preset uses '{task.feature_kind}'. Using the probe's.")


def add_lora(controlnet, args):
    from peft import LoraConfig

    config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES,
    )
    controlnet.requires_grad_(False)
    controlnet.add_adapter(config)  # diffusers' PeftAdapterMixin: only the LoRA weights require grad
    return controlnet


# --------------------------------------------------------------------------------------------- validation
def log_validation(models, tokenizers, controlnet, probe, task, args, accelerator, weight_dtype, step,
                   is_final_validation=False):
    """
    Images from the ControlNet for each (prompt, control) pair and, with a probe, what it reads out of the UNet at
    a few denoising steps of the first image (`StableDiffusionControlNetReadoutPipeline`, or its SDXL sibling;
    rendered per task). `models`: `training_utils.load_base_models`' dict; `tokenizers`: `(tokenizer, tokenizer_2)`.
    """
    import torch
    from diffusers import UniPCMultistepScheduler

    from diffusers_innercontrol.cli import pair_validation
    from diffusers_innercontrol.data import load_control_image
    from diffusers_innercontrol.pipeline_readout import (
        StableDiffusionControlNetReadoutPipeline,
        StableDiffusionXLControlNetReadoutPipeline,
    )

    prompts, images = pair_validation(args)
    if not prompts:
        return []
    logger.info(f"Running validation at step {step}")
    if controlnet.dtype != weight_dtype:  # the trained fp32 weights, in the frozen models' precision for inference
        import copy

        controlnet = copy.deepcopy(controlnet).to(dtype=weight_dtype)
        # drop accelerate's mixed-precision forward wrapper (autocast + outputs cast to fp32) on the copy
        vars(controlnet).pop("forward", None)
        vars(controlnet).pop("_original_forward", None)
    scheduler = UniPCMultistepScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                        revision=args.revision)
    common = dict(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizers[0], unet=models["unet"],
                  controlnet=controlnet, scheduler=scheduler, readout_probe=probe)
    if models["sdxl"]:
        pipeline = StableDiffusionXLControlNetReadoutPipeline(
            text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizers[1], add_watermarker=False, **common)
    else:
        pipeline = StableDiffusionControlNetReadoutPipeline(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    generator = None if args.seed is None else torch.Generator(device=accelerator.device).manual_seed(args.seed)
    # the pipeline's own default (SD1.5 7.5, SDXL 5) unless the user or the ShapesWorld defaults set one
    guidance = {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}
    n_steps = args.num_validation_inference_steps
    readout_steps = []
    if probe is not None and args.num_validation_readouts > 0:
        k = min(args.num_validation_readouts, n_steps)
        readout_steps = sorted({round(i * (n_steps - 1) / max(k - 1, 1)) for i in range(k)})
    logs = []
    for prompt, image_path in zip(prompts, images):
        control = load_control_image(image_path, args.resolution, task)
        generated, readouts = [], []
        for i in range(args.num_validation_images):
            with_readouts = bool(readout_steps) and i == 0
            out = pipeline(
                prompt, image=control, num_inference_steps=n_steps, generator=generator, height=args.resolution,
                width=args.resolution, return_readouts=with_readouts, readout_steps=readout_steps or None,
                readout_task=task if with_readouts else None, **guidance,
            )
            generated.append(out.images[0])
            if with_readouts:
                readouts = [(t, per_sample[0]) for t, per_sample in zip(out.readout_timesteps, out.readout_images)]
        logs.append({"prompt": prompt, "control": control, "images": generated, "readouts": readouts})

    tag = "test" if is_final_validation else "validation"
    for tracker in accelerator.trackers:
        import numpy as np

        for i, log in enumerate(logs):
            control = (log["control"][0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            if tracker.name == "tensorboard":
                stack = np.stack([control] + [np.asarray(im) for im in log["images"]])
                tracker.writer.add_images(f"{tag}/{i}: {log['prompt']}", stack, step, dataformats="NHWC")
                if log["readouts"]:
                    ro = np.stack([np.asarray(im.convert("RGB")) for _, im in log["readouts"]])
                    tracker.writer.add_images(f"{tag}/{i}: readouts at t={[t for t, _ in log['readouts']]}", ro, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                items = [wandb.Image(control, caption="control")]
                items += [wandb.Image(im, caption=log["prompt"]) for im in log["images"]]
                items += [wandb.Image(im, caption=f"probe readout t={t}") for t, im in log["readouts"]]
                tracker.log({tag: items}, step=step)
    del pipeline
    return logs


def validation_grid(logs, tile: int = 128):
    """
    One labelled image per validation pair (for the model card): control | generated images | the probe's readouts
    of the first image, each labelled with its denoising timestep (`render.labeled_grid`).
    """
    from PIL import Image

    from diffusers_innercontrol.render import labeled_grid

    grids = []
    for log in logs:
        control = Image.fromarray((log["control"][0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        tiles = [control] + list(log["images"]) + [im.convert("RGB") for _, im in log["readouts"]]
        labels = ["control"] + [f"image {i + 1}" for i in range(len(log["images"]))]
        labels += [f"readout\nt = {int(t)}" for t, _ in log["readouts"]]
        grids.append(labeled_grid([tiles], labels, tile_size=(tile, tile)))
    return grids


# --------------------------------------------------------------------------------------------- training
def main(args):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from diffusers_innercontrol import checkpointing, cli, data, hub
    from diffusers_innercontrol.hub_utils import load_pretrained

    # ---- everything that can be checked without training, first
    global _TRAINING_STARTED
    _TRAINING_STARTED = False
    cli.check_training_dependencies(args)  # before the ShapesWorld folders are rendered
    from diffusers_innercontrol.toy.quickstart import prepare_default_world
    from diffusers_innercontrol.training import conditioning_channels_for, controlnet_step, encode_images
    from diffusers_innercontrol.training_utils import (
        is_sdxl_model,
        load_base_models,
        load_tokenizers,
        move_frozen,
        optimizer_step,
        plan_steps,
        resolve_resolution,
        sdxl_conditioning,
        setup_accelerator,
        step_generator,
        train_batches,
        vae_dtype_for,
        weight_dtype_of,
        where_saved,
    )

    prepare_default_world(args)  # renders the ShapesWorld folders of a run with no model and no data
    task = validate_args(args)
    sdxl = is_sdxl_model(args)  # SD1.5 or SDXL, from the UNet's config: one script for both families
    resolve_resolution(args, sdxl)  # default: 512 px for SD1.5, 1024 px for SDXL
    if args.pretrained_vae_model_name_or_path:
        vae_config = AutoencoderKL.load_config(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    else:
        vae_config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                               cache_dir=args.cache_dir)
    vae_scale_factor = data.vae_scale_factor_of(vae_config)
    data.check_resolution(args.resolution, vae_scale_factor)

    accelerator = setup_accelerator(args, find_unused_parameters=args.use_lora)

    tokenizer, tokenizer_2 = load_tokenizers(args, sdxl)
    train_dataset, columns = data.build_train_dataset(data.DataConfig.from_args(args), task, tokenizer, tokenizer_2=tokenizer_2)
    data.check_samples(train_dataset, args.check_data_samples)
    logger.info(f"Data columns: {columns}")

    # ---- models
    models = load_base_models(args, sdxl)
    noise_scheduler, text_encoder, vae, unet = (models[k] for k in ("noise_scheduler", "text_encoder", "vae", "unet"))
    task.validate(noise_scheduler.config.num_train_timesteps)
    probe = None
    if task.beta > 0:
        from diffusers_innercontrol.models.readout_probe import ReadoutProbe

        probe = load_pretrained(ReadoutProbe, args.probe_model_name_or_path, "--probe_model_name_or_path",
                                revision=args.probe_revision, cache_dir=args.cache_dir)
        check_probe(probe, unet, task)
    if args.controlnet_model_name_or_path:
        logger.info(f"Loading the ControlNet {args.controlnet_model_name_or_path}")
        controlnet = load_pretrained(ControlNetModel, args.controlnet_model_name_or_path, "--controlnet_model_name_or_path",
                                     cache_dir=args.cache_dir)
    else:
        logger.info("Initialising the ControlNet from the UNet")
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(vae_scale_factor))
    reward_model = None
    if task.alpha > 0:
        from diffusers_innercontrol.rewards import load_reward_model

        reward_model = load_reward_model(
            task, args.reward_model_name_or_path, filename=args.reward_model_filename, revision=args.reward_model_revision,
            variant=args.reward_model_variant, device=accelerator.device, dtype=torch.float32,
        )
        reward_model.requires_grad_(False)
        reward_model.eval()

    if probe is not None:
        probe.requires_grad_(False)
        probe.eval()
    controlnet.train()
    if args.use_lora:
        add_lora(controlnet, args)
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers.")
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()  # the alignment/reward gradients go back through the UNet
        if probe is not None:
            probe.enable_gradient_checkpointing()  # one probe block's activations at a time in backward
        if reward_model is not None:
            vae.enable_gradient_checkpointing()  # the reward's VAE decode at full resolution holds the most activations

    params = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = cli.build_optimizer(params, args, accelerator)

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
        accelerator.register_for_checkpointing(ema)

    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=False,  # shuffled by the dataset (set_epoch)
        collate_fn=data.collate_fn, num_workers=args.dataloader_num_workers,
    )
    plan = plan_steps(train_dataset, args, accelerator.num_processes)
    max_train_steps = plan.max_train_steps
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    controlnet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, train_dataloader, lr_scheduler)

    weight_dtype = weight_dtype_of(accelerator)
    for frozen in (unet, text_encoder, models["text_encoder_2"]):
        if frozen is not None:
            move_frozen(frozen, accelerator.device, weight_dtype)
    move_frozen(vae, accelerator.device, vae_dtype_for(models, args, weight_dtype))
    if probe is not None:
        probe.to(accelerator.device)  # fp32; autocast handles the fp16/bf16 features
    if ema is not None:
        ema.to(accelerator.device)

    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
                  if v is not None and not isinstance(v, list)}
        accelerator.init_trackers(args.tracker_project_name or "train_innercontrol", config=config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    mode = "ControlNet" if task.alpha == 0 and task.beta == 0 else ("ControlNet++" if task.beta == 0 else (
        "alignment only" if task.alpha == 0 else "InnerControl"))
    logger.info("***** Running training *****")
    logger.info(f"  Task = {task.name} ({task.preset}), mode = {mode}: alpha = {task.alpha} (t in {list(task.reward_window)}), "
                f"beta = {task.beta} (t in {list(task.alignment_window)})")
    logger.info(f"  Num examples = {'streamed' if plan.streaming else len(train_dataset)}, epochs = "
                f"{'-' if plan.streaming else plan.num_train_epochs}, total batch size = {total_batch_size}, steps = {max_train_steps}")

    state = checkpointing.resume_from_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir, plan.num_update_steps_per_epoch)
    if ema is not None:
        ema.to(accelerator.device)  # accelerate loads custom states on the CPU (map_location="cpu")
    global_step = state.global_step
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    step_times = []
    image_logs = []
    validated_step = None
    last_logs = {}

    _TRAINING_STARTED = True
    t_start = time.perf_counter()
    batches = train_batches(accelerator, train_dataloader, plan, state, args.gradient_accumulation_steps)
    for epoch, batch_index, batch in batches if global_step < max_train_steps else ():
        gen = step_generator(args.seed, accelerator.device, accelerator.process_index, epoch, batch_index)
        with accelerator.accumulate(controlnet):
            with torch.no_grad():
                latents = encode_images(vae, batch["pixel_values"], generator=gen).to(weight_dtype)
                if sdxl:  # both text encoders, the pooled embedding and the size / crop ids
                    encoder_hidden_states, added_cond_kwargs = sdxl_conditioning(models, batch, args, accelerator.device,
                                                                                 weight_dtype)
                else:
                    encoder_hidden_states, added_cond_kwargs = text_encoder(batch["input_ids"], return_dict=False)[0], None
            with accelerator.autocast():
                out = controlnet_step(
                    task=task, unet=unet, controlnet=controlnet, noise_scheduler=noise_scheduler, latents=latents,
                    encoder_hidden_states=encoder_hidden_states, control=batch["conditioning_pixel_values"],
                    control_classes=batch.get("control_classes"), vae=vae, reward_model=reward_model, probe=probe,
                    reward_decode=args.reward_decode, weight_dtype=weight_dtype, generator=gen,
                    added_cond_kwargs=added_cond_kwargs, early_branch_backward=not args.combined_backward,
                )
            optimizer_step(
                accelerator, out.loss, params, optimizer, lr_scheduler, args, step=global_step + 1, epoch=epoch,
                terms={"diffusion": out.diffusion, "reward": out.reward, "alignment": out.alignment, "total": out.loss},
                hint="lowering --learning_rate or the weight of that term, or checking the probe / reward model / data.",
            )

        logs = out.logs()
        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(params)
            global_step += 1
            progress_bar.update(1)
            now = time.perf_counter()
            step_times.append(now - t_start)
            t_start = now
            logs.update(lr=lr_scheduler.get_last_lr()[0], step_time_s=step_times[-1])
            if global_step % args.checkpointing_steps == 0:
                checkpointing.save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if accelerator.is_main_process and args.validation_prompt and global_step % args.validation_steps == 0:
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                image_logs = log_validation(models, (tokenizer, tokenizer_2), unwrap(accelerator, controlnet), probe,
                                            task, args, accelerator, weight_dtype, global_step)
                validated_step = global_step
                if ema is not None:
                    ema.restore(params)
            accelerator.log(logs, step=global_step)
        last_logs = logs
        short = {"diff": f"{logs['loss_diffusion']:.4f}"}
        if "loss_reward" in logs:
            short["rew"] = f"{logs['loss_reward']:.4f}"
        if "loss_alignment" in logs:
            short["align"] = f"{logs['loss_alignment']:.4f}"
        short["lr"] = f"{lr_scheduler.get_last_lr()[0]:.2e}"
        progress_bar.set_postfix(**short)
        if global_step >= max_train_steps:
            break

    # ---- save
    accelerator.wait_for_everyone()
    print(f"[process {accelerator.process_index}/{accelerator.num_processes}] trained {global_step} steps; "
          f"last losses { {k: round(v, 6) for k, v in last_logs.items() if k.startswith('loss')} }", flush=True)
    if step_times:
        timed = step_times[1:] or step_times  # the first step includes warm-up
        accelerator.print(f"step time: median {statistics.median(timed):.4f} s over {len(timed)} steps ({mode}, {task.name})")
    if accelerator.is_main_process:
        controlnet = unwrap(accelerator, controlnet, keep_fp32_wrapper=False)
        if ema is not None:
            ema.copy_to(params)
        if args.use_lora:
            lora_dir = os.path.join(args.output_dir, "lora")
            controlnet.save_lora_adapter(lora_dir, safe_serialization=True)
            controlnet.fuse_lora()
            controlnet.unload_lora()  # keeps the fused weights: a plain ControlNetModel
        controlnet.save_pretrained(args.output_dir, safe_serialization=True)
        # The final weights equal those just validated unless EMA or a LoRA fuse changed them: don't run it twice.
        if args.validation_prompt and (validated_step != global_step or ema is not None or args.use_lora):
            image_logs = log_validation(models, (tokenizer, tokenizer_2), controlnet, probe, task, args, accelerator,
                                        weight_dtype, global_step, is_final_validation=True)
        card = dict(
            base_model=args.pretrained_model_name_or_path, task=task, probe=args.probe_model_name_or_path if probe is not None else None,
            reward_model=(args.reward_model_name_or_path or task.reward_model_id) if reward_model is not None else None,
            controlnet=args.controlnet_model_name_or_path, dataset=args.dataset_name or task.dataset_name if not args.train_data_dir else args.train_data_dir,
            images=validation_grid(image_logs), validation_prompts=[log["prompt"] for log in image_logs],
            use_lora=args.use_lora, train_args=dict(
                steps=global_step, learning_rate=args.learning_rate, total_batch_size=total_batch_size,
                resolution=args.resolution, mixed_precision=accelerator.mixed_precision, ema=args.use_ema,
                reward_decode=args.reward_decode, preset=task.preset,
                validation_guidance_scale=args.validation_guidance_scale if image_logs else None,
            ), sdxl=sdxl,
        )
        hub.save_model_card(args.output_dir, repo_id=args.hub_model_id, **card)
        if args.push_to_hub:
            try:
                hub.push_folder(args.output_dir, repo_id=args.hub_model_id, token=args.hub_token, private=args.hub_private)
            except hub.HubUploadError as err:
                accelerator.end_training()
                raise SystemExit(f"error: {err}")
        accelerator.print(where_saved(args.output_dir, "The ControlNet", args.logging_dir))
    accelerator.end_training()
    return global_step


def unwrap(accelerator, model, keep_fp32_wrapper=True):
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=keep_fp32_wrapper)
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def cli_main(argv=None):
    """Entry point: bad input ends with one line on stderr and exit status 1, before any training."""
    from diffusers_innercontrol import cli

    args = parse_args(argv)  # argparse first: nothing heavy is imported before the arguments are checked
    from diffusers_innercontrol.training_utils import NonFiniteLossError

    return cli.run_main(main, args, training_started=lambda: _TRAINING_STARTED, extra_errors=(NonFiniteLossError,))


if __name__ == "__main__":
    cli_main()
