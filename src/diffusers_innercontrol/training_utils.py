# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The training skeleton both trainers share, as small stateless helpers (the way `diffusers.training_utils` serves
diffusers' examples): set up the accelerator, plan the steps, iterate over `(epoch, batch_index, batch)` with resume,
and take one optimizer step with the all-reduced non-finite check. Each script keeps its loop visible: it loads its
models, calls its step function (`training.controlnet_step` / `training.probe_step`) and validates inline.

    accelerator = setup_accelerator(args)
    plan = plan_steps(train_dataset, args, accelerator.num_processes)
    state = checkpointing.resume_from_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir,
                                                 plan.num_update_steps_per_epoch)
    for epoch, batch_index, batch in train_batches(accelerator, train_dataloader, plan, state, args.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            out = step(...)
            optimizer_step(accelerator, out.loss, params, optimizer, lr_scheduler, args, terms=..., ...)
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import diffusers
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from .checkpointing import ResumeState, latest_checkpoint, resume_dataloader

STREAMED_EPOCHS = 10**9  # a streamed dataset is re-read (with set_epoch) until max_train_steps


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stopped (the last checkpoint is kept)."""


FP16_ON_CPU = ("--mixed_precision fp16 needs a GPU, and this machine has none: pass --mixed_precision no (or bf16), "
               "or launch on a GPU.")


def _has_accelerator_device() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())


def setup_accelerator(args, find_unused_parameters: bool = False) -> Accelerator:
    """The `Accelerator` of a training script, with logging, the seed, the output folder and TF32 set from `args`
    (`add_common_args`' options). Logging is INFO on the local main process, WARNING elsewhere."""
    if args.mixed_precision == "fp16" and not _has_accelerator_device():
        raise ValueError(FP16_ON_CPU)
    kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=kwargs_handlers,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # set by accelerate's config
        raise ValueError(FP16_ON_CPU)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:

        diffusers.utils.logging.set_verbosity_error()
    if torch.backends.mps.is_available():
        accelerator.native_amp = False
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype of the frozen models under the accelerator's mixed precision (the trained weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass(frozen=True)
class StepPlan:
    max_train_steps: int
    num_train_epochs: int
    num_update_steps_per_epoch: Optional[int]  # None for a streamed dataset (one endless epoch)

    @property
    def streaming(self) -> bool:
        return self.num_update_steps_per_epoch is None


def plan_steps(dataset, args, num_processes: int = 1) -> StepPlan:
    """How many optimizer steps and epochs: `--max_train_steps`, else `--num_train_epochs` over the dataset.

    One epoch is the dataset split over the processes in batches of `--train_batch_size`, one optimizer step per
    `--gradient_accumulation_steps` batches (what accelerate's prepared loader gives each process).
    """
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if not args.max_train_steps:
            raise ValueError("A streamed dataset has no length: pass --max_train_steps.")
        return StepPlan(args.max_train_steps, STREAMED_EPOCHS, None)
    batches_per_process = math.ceil(math.ceil(len(dataset) / args.train_batch_size) / num_processes)
    per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * per_epoch
    return StepPlan(max_train_steps, math.ceil(max_train_steps / per_epoch), per_epoch)


def train_batches(accelerator, dataloader, plan: StepPlan, state: ResumeState,
                  gradient_accumulation_steps: int = 1) -> Iterator[Tuple[int, int, dict]]:
    """`(epoch, batch_index, batch)` from the resumed epoch on: the only place that sets the epoch (of the dataset
    and of accelerate's loader, whose own counter restarts at 0 after a resume) and skips the batches a resumed run
    already consumed. `batch_index` counts from the start of the epoch, skipped batches included, so that per-batch
    random draws (`step_generator`) are the same after a resume. The caller stops at `plan.max_train_steps`."""
    for epoch in range(state.first_epoch, plan.num_train_epochs):
        loader = resume_dataloader(accelerator, dataloader, epoch, state, gradient_accumulation_steps)
        skipped = state.skip_batches_in_epoch * gradient_accumulation_steps if (
            state.path is not None and epoch == state.first_epoch) else 0
        for index, batch in enumerate(loader):
            yield epoch, skipped + index, batch


def step_generator(seed: Optional[int], device, process_index: int, epoch: int, batch_index: int):
    """A generator for the noise, timesteps and latent sampling of one batch, the same after a resume (`None`
    without a seed: the global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + process_index * 100_003 + epoch * 10_007 + batch_index) % (2**63 - 1))
    return g


def move_frozen(model, device, dtype: torch.dtype):
    """Move a frozen model to `device`, casting it only when its dtype differs (diffusers warns at every cast to a
    dtype, even to the one a model already has)."""
    model.to(device)
    if model.dtype != dtype:
        model.to(dtype=dtype)
    return model


def where_saved(output_dir: str, what: str, logging_dir: Optional[str] = None) -> str:
    """The run's last line: where the weights, the model card, the validation grids and the logs are (those present)."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    weights = [n for n in names if n.endswith(".safetensors")]
    grids = [n for n in names if n.endswith(".png")]
    parts = [f"{what} saved in {os.path.abspath(output_dir)}: {', '.join(weights + ['config.json'] if weights else ['nothing'])}"]
    if "README.md" in names:
        parts.append("model card README.md")
    if grids:
        parts.append(f"grids {', '.join(grids)}")
    logs = os.path.join(output_dir, logging_dir) if logging_dir else None
    if logs and os.path.isdir(logs):
        parts.append(f"logs in {os.path.abspath(logs)}")
    return "; ".join(parts) + "."


def first_nonfinite(terms: Dict[str, Optional[torch.Tensor]]) -> Optional[str]:
    """The name of the first loss term that is NaN or inf (`None` terms are skipped), or `None`."""
    for name, value in terms.items():
        if value is not None and not torch.isfinite(value.detach()).all():
            return name
    return None


def nonfinite_message(terms: Dict[str, Optional[torch.Tensor]], bad: Optional[str], step: int, epoch: int,
                      output_dir: str, hint: str) -> str:
    """One line: which term (or another process), where, what is kept, and `hint` (what to change)."""
    what = "A loss on another process is not finite" if bad is None else f"The {bad} loss is {terms[bad].item()}"
    last = latest_checkpoint(output_dir)
    kept = (f"The last checkpoint, {last}, is kept: resume from it with --resume_from_checkpoint latest "
            if last else "No checkpoint was written yet; start again ")
    return f"{what} at step {step} (epoch {epoch}); training stopped. {kept}after {hint}"


def optimizer_step(accelerator, loss: torch.Tensor, params, optimizer, lr_scheduler, args, *,
                   terms: Dict[str, Optional[torch.Tensor]], step: int, epoch: int, hint: str) -> None:
    """Inside `accelerator.accumulate`: stop every process if any loss term is not finite on any of them
    (`NonFiniteLossError`, before the weights change), else backward, clip to `--max_grad_norm` (when > 0, on the
    steps that sync gradients), step the optimizer and the scheduler and zero the gradients.

    `terms` names the loss terms to check (the total included); `step` is the step being taken (1-based)."""
    bad = first_nonfinite(terms)
    flag = torch.tensor([0.0 if bad is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:  # every process stops, not only the one that saw it
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() > 0:
        raise NonFiniteLossError(nonfinite_message(terms, bad, step, epoch, args.output_dir, hint))
    accelerator.backward(loss)
    if accelerator.sync_gradients and args.max_grad_norm and args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=args.set_grads_to_none)


def is_sdxl_model(args) -> bool:
    """Whether `--pretrained_model_name_or_path` is an SDXL-style model, from its UNet's config alone (no weights):
    its UNet adds the pooled text embedding and the size / crop ids to the timestep embedding."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision,
                                              cache_dir=args.cache_dir)
    return config.get("addition_embed_type") == "text_time"


def resolve_resolution(args, sdxl: bool) -> int:
    """`--resolution`, or when it is not given the base model's native size (`tasks.default_resolution`), set on
    `args`."""
    from .tasks import default_resolution

    if args.resolution is None:
        args.resolution = default_resolution(sdxl)
    return args.resolution


def load_tokenizers(args, sdxl: bool):
    """`(tokenizer, tokenizer_2)`: the model's tokenizer (or `--tokenizer_name`) and, on SDXL, its second one (else
    `None`). Cheap: the data are tokenised, and checked, before the models are loaded."""
    from transformers import AutoTokenizer

    path = args.pretrained_model_name_or_path
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir, model_max_length=77)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision, cache_dir=args.cache_dir,
                                                  model_max_length=77)
    tokenizer_2 = None
    if sdxl:
        tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=args.revision,
                                                    cache_dir=args.cache_dir, model_max_length=77)
    return tokenizer, tokenizer_2


def load_base_models(args, sdxl: bool) -> Dict:
    """
    The frozen base model both trainers condition on, from `--pretrained_model_name_or_path`: `text_encoder`, `vae`
    (`--pretrained_vae_model_name_or_path` when given), `unet`, the DDPM `noise_scheduler` and, on SDXL
    (`is_sdxl_model`), `text_encoder_2` (else `None`), as diffusers' `train_controlnet_sdxl.py` loads them. Every
    model is frozen and in eval mode, on the CPU in its stored precision (`move_frozen` places it); `sdxl` is kept.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .hub_utils import check_model_available

    path = args.pretrained_model_name_or_path
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    check_model_available(vae_path, "--pretrained_vae_model_name_or_path", required="config.json")
    models = dict(
        sdxl=sdxl,
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common),
        text_encoder_2=(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=args.variant,
                                                                    **common) if sdxl else None),
        vae=(AutoencoderKL.from_pretrained(vae_path, cache_dir=args.cache_dir) if vae_path else
             AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common),
    )
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if models[name] is not None:
            models[name].requires_grad_(False)
            models[name].eval()
    return models


def vae_dtype_for(models: Dict, args, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision: `weight_dtype`, except SDXL's own VAE under fp16, which overflows there and stays in fp32
    (as in diffusers' `train_controlnet_sdxl.py`; `--pretrained_vae_model_name_or_path` gives a VAE that does not)."""
    if models.get("sdxl") and weight_dtype == torch.float16 and not getattr(args, "pretrained_vae_model_name_or_path", None):
        return torch.float32
    return weight_dtype


def sdxl_conditioning(models: Dict, batch: Dict, args, device, dtype: torch.dtype) -> Tuple[torch.Tensor, Dict]:
    """SDXL's text conditioning of a training batch (`input_ids`, `input_ids_2`): `(encoder_hidden_states,
    added_cond_kwargs)` with the pooled embedding and the size / crop ids of `--resolution` and `--crops_coords_*`."""
    from .training import encode_token_ids_sdxl, sdxl_time_ids

    hidden, pooled = encode_token_ids_sdxl((models["text_encoder"], models["text_encoder_2"]),
                                           (batch["input_ids"], batch["input_ids_2"]))
    time_ids = sdxl_time_ids(hidden.shape[0], args.resolution, args.resolution, device, dtype,
                             crops_coords_top_left=(args.crops_coords_top_left_h, args.crops_coords_top_left_w))
    return hidden.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
