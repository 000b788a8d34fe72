# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The losses of InnerControl, one small function per equation of the paper.

Controls are tensors in `[0, 1]`, `(B, C, H, W)`, as diffusers' ControlNet examples feed them, except for
segmentation, whose loss functions take class-index maps `(B, H, W)` (see `palette.control_to_classes`).

    Eq. 3-4  diffusion_loss / diffusion_target
    Eq. 5    one_step_x0
    Eq. 6    reward_loss (per sample: reward_loss_per_sample)
    Eq. 7    alignment_loss (per sample: alignment_loss_per_sample; also the stage-1 probe loss)
    Eq. 8    total_loss
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


# --- reductions and windows --------------------------------------------------------------------
def timestep_mask(timesteps: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """1.0 for samples whose timestep lies in the inclusive `window = (lo, hi)`, else 0.0."""
    lo, hi = window
    return ((timesteps >= lo) & (timesteps <= hi)).float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`sum(mask * values) / (sum(mask) + eps)`: the mean over the samples inside a timestep window (0 if none)."""
    mask = mask.to(values.dtype)
    return (mask * values).sum() / (mask.sum() + eps)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, over all non-batch dimensions."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)


def per_sample_sparse_mse(prediction: torch.Tensor, target: torch.Tensor, background: float = 0.0) -> torch.Tensor:
    """
    The class-balanced ("sparse") MSE for edge maps: `0.5 * (MSE over background pixels + MSE over the others)`.

    Background pixels are those with `target <= background`. A sample without background (or without
    edges) contributes the mean of the part it has, so that the loss stays on the scale of the MSE.
    """
    sq = ((prediction.float() - target.float()) ** 2).flatten(1)
    bg = (target <= background).flatten(1).to(sq.dtype)
    fg = 1.0 - bg
    n_bg, n_fg = bg.sum(1), fg.sum(1)
    mse_bg = (sq * bg).sum(1) / n_bg.clamp(min=1)
    mse_fg = (sq * fg).sum(1) / n_fg.clamp(min=1)
    both = (n_bg > 0) & (n_fg > 0)
    return torch.where(both, 0.5 * (mse_bg + mse_fg), mse_bg + mse_fg)


def per_sample_cross_entropy(logits: torch.Tensor, classes: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of each sample, averaged over its pixels whose class is not `ignore_index` (0 if none)."""
    ce = F.cross_entropy(logits.float(), classes.long(), ignore_index=ignore_index, reduction="none").flatten(1)
    valid = (classes != ignore_index).flatten(1).to(ce.dtype)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def per_sample_max_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divide each sample by its maximum (the depth maps' scale invariance in ControlNet++ and InnerControl)."""
    peak = x.flatten(1).amax(1).clamp(min=eps)
    return x / peak.view(-1, *([1] * (x.ndim - 1)))


def per_sample_min_max(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map each sample to `[0, 1]` by its own minimum and maximum."""
    flat = x.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    shape = (-1, *([1] * (x.ndim - 1)))
    return (x - lo.view(shape)) / (hi - lo).clamp(min=eps).view(shape)


def resize_to(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize `(B, C, H, W)` (or class maps `(B, H, W)` with mode 'nearest') to `size`; a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.ndim == 3:
        return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)
    if mode in ("nearest", "area"):
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


# --- Eq. 3-5 ----------------------------------------------------------------------------------
def diffusion_target(noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """The target of the denoiser: the noise (`epsilon`) or the velocity (`v_prediction`) of the scheduler."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4: `|| target - model_pred ||^2`, averaged over all elements (computed in float32)."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _expand(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.ndim - 1)))


def one_step_x0(
    noisy_latents: torch.Tensor,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """
    Eq. 5: the one-step estimate of the clean latent,
    `x0 = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)` (or `sqrt(abar_t) x_t - sqrt(1 - abar_t) v` for v).
    """
    abar = alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps.long()]
    sqrt_a = _expand(abar.sqrt(), noisy_latents)
    sqrt_1ma = _expand((1.0 - abar).sqrt(), noisy_latents)
    x_t = noisy_latents.float()
    out = model_output.float()
    if prediction_type == "epsilon":
        x0 = (x_t - sqrt_1ma * out) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x_t - sqrt_1ma * out
    elif prediction_type == "sample":
        x0 = out
    else:
        raise ValueError(f"Unsupported prediction type {prediction_type!r}.")
    return x0.to(noisy_latents.dtype)


# --- Eq. 6: reward -----------------------------------------------------------------------------
def control_target(task, control: torch.Tensor) -> torch.Tensor:
    """The control as a one-channel map in `[0, 1]` that the losses of regression tasks compare with."""
    target = control.float().mean(1, keepdim=True)
    if task.name == "depth":
        target = per_sample_max_normalise(target)
    return target


def reward_loss_per_sample(task, prediction: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """
    Per-sample reward loss (Eq. 6) between the reward model's reading of the one-step image and the control.

    Args:
        task: a `Task`.
        prediction: regression tasks: `(B, 1, h, w)` or `(B, h, w)` in the control's polarity (`rewards.py`
            returns this); segmentation: logits `(B, K, h, w)`.
        control: regression tasks: the control image `(B, C, H, W)` in `[0, 1]`; segmentation: class
            indices `(B, H, W)` with `255` where ignored.
    """
    if task.reward_loss == "ce":
        logits = resize_to(prediction, control.shape[-2:])
        return per_sample_cross_entropy(logits, control)
    if prediction.ndim == 3:
        prediction = prediction[:, None]
    target = control_target(task, control)
    prediction = resize_to(prediction.float(), target.shape[-2:])
    if task.name == "depth":
        prediction = per_sample_max_normalise(prediction)
    return per_sample_mse(prediction, target)


def window_mean(losses: torch.Tensor, window, timesteps: Optional[torch.Tensor] = None, mask=None) -> torch.Tensor:
    """The mean of per-sample `losses` over the samples whose timestep lies in `window` (or over `mask`; over all
    samples when neither `mask` nor `timesteps` is given)."""
    if mask is None:
        mask = timestep_mask(timesteps, window) if timesteps is not None else torch.ones_like(losses)
    return masked_mean(losses, mask.to(losses.device))


def reward_loss(task, prediction, control, timesteps: Optional[torch.Tensor] = None, mask=None) -> torch.Tensor:
    """Eq. 6, averaged over the samples inside the reward window (pass `mask`, or `timesteps` to compute it)."""
    return window_mean(reward_loss_per_sample(task, prediction, control), task.reward_window, timesteps, mask)


# --- Eq. 7: alignment ---------------------------------------------------------------------------
def probe_to_unit(task, probe_output: torch.Tensor, keep_channels: bool = False) -> torch.Tensor:
    """
    Map a regression probe's `tanh` output to `[0, 1]` (the task's normalisation applied): a one-channel map (the
    channel mean), or every channel with `keep_channels=True` (the per-channel loss, `task.alignment_channels`).
    """
    x = probe_output.float()
    if not keep_channels:
        x = x.mean(1, keepdim=True)
    x = (x + 1.0) / 2.0
    if task.name == "depth":
        x = per_sample_max_normalise(x)
    if task.alignment_minmax:
        x = per_sample_min_max(x)
    if task.alignment_invert:
        x = 1.0 - x
    return x


def alignment_target(task, probe_output: torch.Tensor, control: torch.Tensor):
    """
    The probe's output and the control at one size, as `task.alignment_resize` says: `(output, target)`.

    - `"nearest"`: the control (one-channel map, or class indices) downsampled to the output's size by
      nearest-neighbour (Readout Guidance's stage 1);
    - `"area"`: downsampled by area averaging, so a 1-px line becomes a fainter line instead of vanishing;
    - `"readout"`: the output (tanh values or logits) upsampled bilinearly to the control's size, the target
      left as it is (the released stage-2 code compares at 512 px).
    The target is `control_target(task, control)` for regression tasks, the class map for segmentation.
    """
    target = control if task.alignment_loss == "ce" else control_target(task, control)
    if task.alignment_resize == "readout":
        return resize_to(probe_output.float(), control.shape[-2:], mode="bilinear"), target
    mode = "nearest" if task.alignment_loss == "ce" else task.alignment_resize
    return probe_output, resize_to(target, probe_output.shape[-2:], mode=mode)


def alignment_loss_per_sample(task, probe_output: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """
    Per-sample alignment loss (Eq. 7) between the probe's reading of the UNet features and the control.
    It is also the stage-1 probe loss. The two are brought to one size by `alignment_target`.

    Args:
        task: a `Task` (`alignment_loss` is `mse`, `sparse_mse` or `ce`).
        probe_output: the probe's output, `tanh` values `(B, C, h, w)` or logits `(B, K, h, w)`.
        control: `(B, C, H, W)` in `[0, 1]`, or class indices `(B, H, W)` for segmentation.
    """
    probe_output, target = alignment_target(task, probe_output, control)
    if task.alignment_loss == "ce":
        return per_sample_cross_entropy(probe_output, target)
    prediction = probe_to_unit(task, probe_output, keep_channels=task.alignment_channels == "each")
    # "each": every readout channel against the one-channel control (per-channel MSE against a grey control)
    target = target.expand_as(prediction)
    if task.alignment_loss == "sparse_mse":
        return per_sample_sparse_mse(prediction, target)
    return per_sample_mse(prediction, target)


def alignment_loss(task, probe_output, control, timesteps: Optional[torch.Tensor] = None, mask=None) -> torch.Tensor:
    """Eq. 7, averaged over the samples inside the alignment window (pass `mask`, or `timesteps` to compute it)."""
    return window_mean(alignment_loss_per_sample(task, probe_output, control), task.alignment_window, timesteps, mask)


# --- Eq. 8 --------------------------------------------------------------------------------------
def total_loss(diffusion: torch.Tensor, reward=None, alignment=None, alpha: float = 0.0, beta: float = 0.0):
    """Eq. 8: `L = L_diffusion + alpha * L_reward + beta * L_alignment` (a missing term counts as 0)."""
    loss = diffusion
    if reward is not None and alpha:
        loss = loss + alpha * reward
    if alignment is not None and beta:
        loss = loss + beta * alignment
    return loss
