# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""One training step of each stage, shared by the example scripts, the benchmarks and the tests.

Stage 2 (`controlnet_step`): one ControlNet + UNet forward gives the diffusion loss (Eq. 3-4), the one-step
x0 of the reward (Eq. 5-6) and the decoder features of the alignment loss (Eq. 7); the total is Eq. 8.
The VAE decode and the reward model run only on the samples inside the reward window (`reward_decode=
"masked"`, the default); `"full"` decodes the whole batch and masks afterwards, as the released
ControlNet++/InnerControl code does (kept for the benchmarks). The probe runs only on the samples inside
the alignment window.

Stage 1 (`probe_step`): the frozen UNet (optionally ControlNet-conditioned) under `no_grad`, features
captured, the probe's loss against the control.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .features import DecoderFeatureExtractor
from .losses import (
    alignment_loss_per_sample,
    diffusion_loss,
    diffusion_target,
    masked_mean,
    one_step_x0,
    reward_loss_per_sample,
    timestep_mask,
    total_loss,
)

REWARD_DECODE_MODES = ("masked", "full")
# Samples per chunk of the early branch backward (`branch_backward`). One VAE decode at full resolution holds the
# most activations of a step, so the reward goes one sample at a time. The probe's activations per sample are about a
# sixth of that, and smaller probe calls cost more probe time (small preset, CPU, forward + backward of 7 samples: all
# at once 83 ms, 4 at a time 81, 2 at a time 99, one at a time 123): four at a time, which costs no time and still
# keeps InnerControl's peak at the reward branch's.
REWARD_CHUNK = 1
ALIGNMENT_CHUNK = 4


@dataclass
class StepOutput:
    """
    Losses of one step; `loss` is what to backpropagate. `reward` / `alignment` are `None` when the term is off
    (weight 0 or no model); with `controlnet_step(early_branch_backward=True)` (the default) they are values without
    a graph, their gradients already inside `loss`.
    """

    loss: torch.Tensor
    diffusion: torch.Tensor
    reward: Optional[torch.Tensor] = None
    alignment: Optional[torch.Tensor] = None
    reward_share: float = 0.0  # share of the batch inside the reward window
    alignment_share: float = 0.0  # share of the batch inside the alignment window
    timesteps: Optional[torch.Tensor] = None
    extras: Dict = field(default_factory=dict)

    def logs(self) -> Dict[str, float]:
        out = {"loss": self.loss.item(), "loss_diffusion": self.diffusion.item()}
        if self.reward is not None:
            out["loss_reward"] = self.reward.item()
            out["reward_share"] = self.reward_share
        if self.alignment is not None:
            out["loss_alignment"] = self.alignment.item()
            out["alignment_share"] = self.alignment_share
        return out


def conditioning_channels_for(vae_scale_factor: int):
    """ControlNet conditioning-embedding widths whose downsampling matches the VAE (SD1.5: 8 -> (16, 32, 96, 256))."""
    widths = (16, 32, 96, 256)
    steps = max(int(round(torch.log2(torch.tensor(float(vae_scale_factor))).item())), 0)
    return widths[: steps + 1]


def encode_images(vae, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
    """VAE latents of images in `[-1, 1]`, times the VAE's scaling factor."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in `[0, 1]` from scaled latents (differentiable)."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_timesteps(batch_size: int, num_train_timesteps: int, device, generator=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, one per sample."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator).long()


def noise_latents(noise_scheduler, latents: torch.Tensor, noise=None, timesteps=None, generator=None):
    """Draw the noise and t ~ U{0, ..., T-1} where not given, and noise the latents (DDPM forward process)."""
    if noise is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, latents.device, generator)
    return noise, timesteps, noise_scheduler.add_noise(latents, noise, timesteps)


def probe_config(probe):
    """The config of a probe, also when accelerate / DDP wraps it (`.module`)."""
    return getattr(probe, "module", probe).config


def _controlnet_unet_forward(unet, controlnet, noisy_latents, timesteps, encoder_hidden_states, control, weight_dtype,
                             added_cond_kwargs=None):
    down, mid = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=control.to(weight_dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=[r.to(weight_dtype) for r in down],
        mid_block_additional_residual=mid.to(weight_dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]


def branch_backward(inputs: Sequence[torch.Tensor], per_sample_losses: Callable, weight: float, chunk_size: int = 1):
    """
    Backpropagate a loss branch (the reward's decode and reward model, or the probe) to its inputs a few samples at a
    time, right away, so that only one chunk's activations are alive at once instead of the whole branch's until the
    step's backward.

    `per_sample_losses(chunk, rows)` maps detached copies of `inputs[k][rows]` (leaves that require grad) to the
    per-sample losses of those rows. The branch's loss is their mean over the `n` samples. Returns `(value,
    surrogate)`: the mean (detached) and `sum_k <g_k, inputs[k]>`, where `g_k` is the gradient of `weight * mean` with
    respect to `inputs[k]`, so that `surrogate.backward()` gives every parameter upstream of the inputs exactly the
    gradient of `weight * mean` (the chain rule, cut at the inputs). Nothing of the branch is recomputed.
    """
    n = inputs[0].shape[0]
    total = inputs[0].new_zeros((), dtype=torch.float32)
    surrogate = total
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        leaves = [x[rows].detach().requires_grad_(True) for x in inputs]
        with torch.enable_grad():
            losses = per_sample_losses(leaves, rows)
            grads = torch.autograd.grad(losses.sum() * (weight / n), leaves)
        total = total + losses.detach().float().sum()
        surrogate = surrogate + sum((g.detach() * x[rows]).sum().float() for g, x in zip(grads, inputs))
    return total / n, surrogate


def _fp16_in_use(weight_dtype: torch.dtype, device: torch.device) -> bool:
    """fp16 weights, or fp16 autocast on `device`: where a GradScaler scales the loss (the early branch backward's
    gradients would miss that scaling)."""
    if weight_dtype == torch.float16:
        return True
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def controlnet_step(
    *,
    task,
    unet,
    controlnet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    control: torch.Tensor,
    control_classes: Optional[torch.Tensor] = None,
    vae=None,
    reward_model=None,
    probe=None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    reward_decode: str = "masked",
    weight_dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    early_branch_backward: bool = True,
) -> StepOutput:
    """
    One stage-2 step (Eq. 8). Returns the losses; the caller runs `backward`.

    Args:
        task: a `Task`; its windows and loss kinds are used, and `alpha` / `beta` when not given.
        unet, controlnet, noise_scheduler: the frozen UNet, the trained ControlNet, a DDPM scheduler.
        latents: scaled VAE latents of the images. encoder_hidden_states: text embeddings.
        control: the control image `(B, C, H, W)` in `[0, 1]` (the ControlNet input).
        control_classes: for segmentation, class indices `(B, H, W)` (255 = ignored) the losses compare with.
        vae, reward_model: needed when `alpha > 0`. probe: needed when `beta > 0`.
        noise, timesteps: drawn here when not given.
        reward_decode: `"masked"` (decode only the samples inside the reward window) or `"full"`.
        added_cond_kwargs: SDXL's added conditioning for the UNet and the ControlNet (`text_embeds`: the pooled
            text embedding, `time_ids`: original size, crop and target size); `None` for SD1.5.
        early_branch_backward: backpropagate the reward's decode and reward model, and the probe, to their inputs
            a few samples at a time inside the step (`branch_backward`, the default; `REWARD_CHUNK`,
            `ALIGNMENT_CHUNK`), so that their activations are freed before the next chunk's instead of living until
            the caller's backward: a lower peak memory, the same gradients and loss values, nothing recomputed. Only
            with `reward_decode="masked"`, and not under fp16 weights or fp16 autocast (the branches' gradients
            would miss the caller's loss scaling): there the step keeps one backward through everything, as with
            `False`.
    """
    if reward_decode not in REWARD_DECODE_MODES:
        raise ValueError(f"reward_decode must be one of {REWARD_DECODE_MODES}, got {reward_decode!r}.")
    alpha = task.alpha if alpha is None else alpha
    beta = task.beta if beta is None else beta
    use_reward = alpha > 0
    use_alignment = beta > 0
    if use_reward and (reward_model is None or vae is None):
        raise ValueError("alpha > 0 needs a reward model and the VAE (or pass alpha=0).")
    if use_alignment and probe is None:
        raise ValueError("beta > 0 needs a trained readout probe (or pass beta=0).")
    target_control = control_classes if task.is_segmentation else control
    if task.is_segmentation and control_classes is None and (use_reward or use_alignment):
        raise ValueError("Segmentation losses need `control_classes` (class indices of the control).")

    bsz = latents.shape[0]
    early = early_branch_backward and reward_decode == "masked" and not _fp16_in_use(weight_dtype, latents.device)
    early = early and torch.is_grad_enabled()
    surrogates = {}
    noise, timesteps, noisy_latents = noise_latents(noise_scheduler, latents, noise, timesteps, generator)

    extractor = DecoderFeatureExtractor(unet, probe_config(probe).feature_kind) if use_alignment else None
    if extractor is not None:
        extractor.register()
    try:
        model_pred = _controlnet_unet_forward(
            unet, controlnet, noisy_latents, timesteps, encoder_hidden_states, control, weight_dtype, added_cond_kwargs
        )
    finally:
        features = extractor.pop() if extractor is not None else None
        if extractor is not None:
            extractor.remove()

    target = diffusion_target(noise, latents, timesteps, noise_scheduler)
    l_diff = diffusion_loss(model_pred, target)

    l_reward = None
    reward_mask = timestep_mask(timesteps, task.reward_window)
    reward_share = reward_mask.mean().item()
    if use_reward:
        prediction_type = noise_scheduler.config.prediction_type
        alphas_cumprod = noise_scheduler.alphas_cumprod
        if reward_decode == "full":
            x0 = one_step_x0(noisy_latents, model_pred, timesteps, alphas_cumprod, prediction_type)
            images = decode_latents(vae, x0)
            losses = reward_loss_per_sample(task, reward_model(images), target_control)
            l_reward = masked_mean(losses, reward_mask)
        else:
            idx = reward_mask.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                l_reward = model_pred.sum() * 0.0
            else:
                x0 = one_step_x0(noisy_latents[idx], model_pred[idx], timesteps[idx], alphas_cumprod, prediction_type)
                reward_target = target_control[idx]
                if early:
                    l_reward, surrogates["reward"] = branch_backward(
                        [x0], lambda leaves, rows: reward_loss_per_sample(
                            task, reward_model(decode_latents(vae, leaves[0])), reward_target[rows]), alpha, REWARD_CHUNK)
                else:
                    losses = reward_loss_per_sample(task, reward_model(decode_latents(vae, x0)), reward_target)
                    l_reward = masked_mean(losses, torch.ones_like(losses))

    l_align = None
    align_mask = timestep_mask(timesteps, task.alignment_window)
    alignment_share = align_mask.mean().item()
    if use_alignment:
        idx = align_mask.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            l_align = model_pred.sum() * 0.0
        else:
            subset = features if idx.numel() == bsz else [f[idx] for f in features]
            align_t, align_target = timesteps[idx], target_control[idx]
            if early:
                l_align, surrogates["alignment"] = branch_backward(
                    subset, lambda leaves, rows: alignment_loss_per_sample(
                        task, probe(leaves, align_t[rows], return_dict=False)[0], align_target[rows]), beta, ALIGNMENT_CHUNK)
            else:
                readout = probe(subset, align_t, return_dict=False)[0]
                losses = alignment_loss_per_sample(task, readout, align_target)
                l_align = masked_mean(losses, torch.ones_like(losses))

    loss = total_loss(l_diff, l_reward, l_align, alpha, beta)
    for surrogate in surrogates.values():  # the branches' gradients, already computed; their values are in `loss`
        loss = loss + (surrogate - surrogate.detach())
    return StepOutput(
        loss=loss,
        diffusion=l_diff,
        reward=l_reward,
        alignment=l_align,
        reward_share=reward_share,
        alignment_share=alignment_share,
        timesteps=timesteps,
    )


def probe_features(
    unet,
    feature_kind: str,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    controlnet=None,
    control: Optional[torch.Tensor] = None,
    weight_dtype: torch.dtype = torch.float32,
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
):
    """Decoder features of one frozen (optionally ControlNet-conditioned) UNet forward, under `no_grad`."""
    with torch.no_grad(), DecoderFeatureExtractor(unet, feature_kind, detach=True) as extractor:
        if controlnet is not None:
            _controlnet_unet_forward(unet, controlnet, noisy_latents, timesteps, encoder_hidden_states, control, weight_dtype,
                                     added_cond_kwargs)
        else:
            unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                 return_dict=False)
        return extractor.pop()


def probe_step(
    *,
    task,
    unet,
    probe,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    control: torch.Tensor,
    control_classes: Optional[torch.Tensor] = None,
    controlnet=None,
    noise: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    weight_dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    reduce: bool = True,
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
):
    """
    One stage-1 step: t ~ U[0, T), noise the latents, one frozen UNet forward, the probe's loss
    (`alignment_loss_per_sample`, the same function as Eq. 7) against the control. Returns the mean loss,
    or the per-sample losses and the timesteps with `reduce=False` (per-t evaluation). `added_cond_kwargs`: SDXL's
    added conditioning (see `controlnet_step`).
    """
    noise, timesteps, noisy_latents = noise_latents(noise_scheduler, latents, noise, timesteps, generator)
    features = probe_features(
        unet, probe_config(probe).feature_kind, noisy_latents, timesteps, encoder_hidden_states, controlnet, control, weight_dtype,
        added_cond_kwargs,
    )
    readout = probe(features, timesteps, return_dict=False)[0]
    target = control_classes if task.is_segmentation else control
    losses = alignment_loss_per_sample(task, readout, target)
    if reduce:
        return losses.mean()
    return losses, timesteps


# --- SDXL ------------------------------------------------------------------------------------------
def encode_prompt_sdxl(text_encoders, tokenizers, prompts, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    SDXL's text conditioning, as its pipelines compute it: each encoder's penultimate hidden states, concatenated
    along the channels (`encoder_hidden_states`), and the last encoder's projected pooled output (`text_embeds`).
    """
    ids = [tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device) for tokenizer in tokenizers]
    return encode_token_ids_sdxl(text_encoders, ids)


def encode_token_ids_sdxl(text_encoders, input_ids) -> Tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompt_sdxl` from token ids already computed (one `(B, L)` tensor per text encoder, in the same order):
    the training data tokenises its captions once, for both encoders (`input_ids`, `input_ids_2`)."""
    hidden, pooled = [], None
    for ids, text_encoder in zip(input_ids, text_encoders):
        out = text_encoder(ids, output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(batch_size: int, height: int, width: int, device=None, dtype=torch.float32,
                  crops_coords_top_left: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's size / crop ids of the training images, as diffusers' `train_controlnet_sdxl.py` gives them: (original
    height, width, crop top, left, target height, width) = (height, width, top, left, height, width) for every sample
    (the images are resized to the training resolution, so the original and target sizes are the same)."""
    top, left = crops_coords_top_left
    return torch.tensor([[height, width, top, left, height, width]], device=device, dtype=dtype).repeat(batch_size, 1)
