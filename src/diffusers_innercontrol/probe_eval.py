# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""How well a readout probe reads a control back, per timestep: shared by the probe trainer, the evaluation
script and the benchmarks.

- `bucket_errors(losses, timesteps)`: the mean per-sample loss in each timestep bucket (10 buckets of 100
  steps by default), from per-sample losses, e.g. those of `training.probe_step(..., reduce=False)`.
- `BucketErrors`: the same as a running sum over batches (and over processes with `reduce(accelerator)`),
  written as JSON (`to_dict` / `save`) or as a Markdown table for a model card (`to_markdown`).
- `evaluate_probe(...)`: the probe's error per bucket on held-out data; every sample is evaluated once in
  every bucket, at a t drawn (seeded) inside the bucket, so that the buckets hold the same images.
- `predict_at_timesteps(...)`, `validation_grid(...)`: the probe's predictions of a few samples at several t
  (100, 300, 500, 700, 900 by default) next to the control, as one labelled image drawn with `render`.

The loss is the stage-1 loss itself (`training.probe_step`, i.e. `losses.alignment_loss_per_sample`); nothing
here re-implements it.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .render import labeled_grid, render_readout, to_pil
from .tasks import DEFAULT_GRID_TIMESTEPS
from .training import probe_features, probe_step


# --- buckets -----------------------------------------------------------------------------------
def timestep_buckets(num_buckets: int = 10, num_train_timesteps: int = 1000) -> List[Tuple[int, int]]:
    """The inclusive `(lo, hi)` timestep range of every bucket: `num_buckets` equal slices of `[0, T)`."""
    if num_buckets < 1 or num_buckets > num_train_timesteps:
        raise ValueError(f"num_buckets must be in [1, {num_train_timesteps}], got {num_buckets}.")
    edges = [(i * num_train_timesteps) // num_buckets for i in range(num_buckets + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(num_buckets)]


def bucket_index(timesteps: torch.Tensor, num_buckets: int = 10, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The bucket of every timestep (`timestep_buckets` order); raises if a timestep is outside `[0, T)`."""
    t = timesteps.detach().long().cpu()
    if t.numel() and (t.min() < 0 or t.max() >= num_train_timesteps):
        raise ValueError(f"Timesteps must lie in [0, {num_train_timesteps}), got min {t.min()} and max {t.max()}.")
    # bucket i holds [floor(i T / n), floor((i + 1) T / n)); ceil((t + 1) n / T) - 1 inverts that exactly.
    return ((t + 1) * num_buckets + num_train_timesteps - 1) // num_train_timesteps - 1


@dataclass
class BucketErrors:
    """
    Running per-timestep-bucket sums of per-sample losses (and of their squares, for the standard errors).

    Args:
        num_buckets (`int`, defaults to 10): Equal slices of `[0, num_train_timesteps)`.
        num_train_timesteps (`int`, defaults to 1000): The scheduler's `num_train_timesteps`.
        loss_name (`str`, *optional*): What the losses are (`"mse"`, `"sparse_mse"`, `"ce"`), for the reports.
    """

    num_buckets: int = 10
    num_train_timesteps: int = 1000
    loss_name: Optional[str] = None
    sums: torch.Tensor = field(default=None)
    counts: torch.Tensor = field(default=None)
    sq_sums: torch.Tensor = field(default=None)

    def __post_init__(self):
        self.buckets = timestep_buckets(self.num_buckets, self.num_train_timesteps)
        if self.sums is None:
            self.sums = torch.zeros(self.num_buckets, dtype=torch.float64)
        if self.counts is None:
            self.counts = torch.zeros(self.num_buckets, dtype=torch.float64)
        if self.sq_sums is None:
            self.sq_sums = torch.zeros(self.num_buckets, dtype=torch.float64)

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> "BucketErrors":
        """Add per-sample `losses` `(B,)` taken at `timesteps` `(B,)`."""
        losses = losses.detach().flatten().double().cpu()
        if losses.shape[0] != timesteps.numel():
            raise ValueError(f"Got {losses.shape[0]} losses for {timesteps.numel()} timesteps.")
        if not torch.isfinite(losses).all():
            raise ValueError("A per-sample probe loss is NaN or inf: the probe or its input diverged.")
        idx = bucket_index(timesteps.flatten(), self.num_buckets, self.num_train_timesteps)
        self.sums.index_add_(0, idx, losses)
        self.sq_sums.index_add_(0, idx, losses * losses)
        self.counts.index_add_(0, idx, torch.ones_like(losses))
        return self

    def reduce(self, accelerator) -> "BucketErrors":
        """Sum the buckets over all processes (`accelerator.reduce`); every process gets the total."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        stacked = torch.stack([self.sums, self.counts, self.sq_sums]).float().to(accelerator.device)
        total = accelerator.reduce(stacked, reduction="sum").double().cpu()
        self.sums, self.counts, self.sq_sums = total[0].clone(), total[1].clone(), total[2].clone()
        return self

    def means(self) -> List[Optional[float]]:
        """The mean loss of every bucket (`None` for an empty bucket)."""
        return [(s / c).item() if c > 0 else None for s, c in zip(self.sums, self.counts)]

    def stderrs(self) -> List[Optional[float]]:
        """The standard error of every bucket's mean: the samples' standard deviation (n - 1) over sqrt(n); `None`
        for a bucket with fewer than 2 samples."""
        out = []
        for s, q, c in zip(self.sums.tolist(), self.sq_sums.tolist(), self.counts.tolist()):
            if c < 2:
                out.append(None)
                continue
            variance = max(q - s * s / c, 0.0) / (c - 1)
            out.append((variance / c) ** 0.5)
        return out

    @property
    def overall(self) -> Optional[float]:
        """The mean over all samples (every sample weighs the same)."""
        n = self.counts.sum()
        return (self.sums.sum() / n).item() if n > 0 else None

    def to_dict(self) -> Dict:
        return {
            "loss": self.loss_name,
            "num_train_timesteps": self.num_train_timesteps,
            "overall": self.overall,
            "buckets": [
                {"t_min": lo, "t_max": hi, "error": m, "stderr": se, "count": int(c)}
                for (lo, hi), m, se, c in zip(self.buckets, self.means(), self.stderrs(), self.counts.tolist())
            ],
        }

    def save(self, path: str, extra: Optional[Dict] = None) -> str:
        """Write `to_dict()` (plus `extra`) as JSON to `path`."""
        data = self.to_dict()
        if extra:
            data.update(extra)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        return path

    def to_markdown(self) -> str:
        """A Markdown table `| t | error | samples |` for a model card."""
        name = self.loss_name or "error"
        lines = [f"| t | {name} | samples |", "|---|---|---|"]
        for (lo, hi), m, c in zip(self.buckets, self.means(), self.counts.tolist()):
            lines.append(f"| {lo}-{hi} | {'-' if m is None else f'{m:.4f}'} | {int(c)} |")
        if self.overall is not None:
            lines.append(f"| all | {self.overall:.4f} | {int(self.counts.sum())} |")
        return "\n".join(lines)

    def log_dict(self, prefix: str = "probe_error") -> Dict[str, float]:
        """Flat scalars for `accelerator.log` (empty buckets left out)."""
        out = {f"{prefix}/t{lo:03d}-{hi:03d}": m for (lo, hi), m in zip(self.buckets, self.means()) if m is not None}
        if self.overall is not None:
            out[f"{prefix}/all"] = self.overall
        return out


def bucket_errors(
    losses: torch.Tensor, timesteps: torch.Tensor, num_buckets: int = 10, num_train_timesteps: int = 1000
) -> List[Optional[float]]:
    """The mean of `losses` over the samples of every timestep bucket (`None` where a bucket is empty)."""
    return BucketErrors(num_buckets, num_train_timesteps).update(losses, timesteps).means()


def stratified_timesteps(
    batch_size: int, num_buckets: int = 10, num_train_timesteps: int = 1000, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """`(num_buckets, batch_size)` timesteps: row `i` drawn uniformly inside bucket `i`."""
    rows = []
    for lo, hi in timestep_buckets(num_buckets, num_train_timesteps):
        rows.append(torch.randint(lo, hi + 1, (batch_size,), generator=generator))
    return torch.stack(rows)


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_probe(
    *,
    task,
    probe,
    unet,
    noise_scheduler,
    batches: Iterable,
    prepare: Optional[Callable[[Dict], Dict]] = None,
    controlnet=None,
    num_buckets: int = 10,
    seed: int = 0,
    max_batches: Optional[int] = None,
    weight_dtype: torch.dtype = torch.float32,
    accelerator=None,
) -> BucketErrors:
    """
    The probe's error per timestep bucket on held-out data.

    Every sample is noised once per bucket, at a timestep drawn uniformly inside the bucket, with noise and
    timesteps from a generator seeded with `seed` (the same numbers at every call), and scored with the
    stage-1 loss (`probe_step(..., reduce=False)`).

    Args:
        task: the `Task` (its `alignment_loss` is the error reported).
        probe, unet, noise_scheduler, controlnet: as for `probe_step` (the probe unwrapped from DDP).
        batches: an iterable of dicts with `latents`, `encoder_hidden_states`, `control` and, for segmentation,
            `control_classes` (for SDXL, `added_cond_kwargs`); or of anything `prepare` maps to such a dict (e.g. a
            data loader's batches).
        num_buckets (`int`): Number of equal timestep buckets.
        seed (`int`): Seed of the noise and of the timesteps.
        max_batches (`int`, *optional*): Stop after this many batches.
        accelerator (*optional*): When given, the sums are added up over its processes.

    Returns:
        [`BucketErrors`].
    """
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    errors = BucketErrors(num_buckets, num_train_timesteps, loss_name=task.alignment_loss)
    was_training = probe.training
    probe.eval()
    generator = torch.Generator().manual_seed(seed)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs = prepare(batch) if prepare is not None else batch
            latents = inputs["latents"]
            bsz = latents.shape[0]
            all_t = stratified_timesteps(bsz, num_buckets, num_train_timesteps, generator)
            for row in all_t:
                noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
                timesteps = row.to(latents.device)
                losses, timesteps = probe_step(
                    task=task,
                    unet=unet,
                    probe=probe,
                    noise_scheduler=noise_scheduler,
                    latents=latents,
                    encoder_hidden_states=inputs["encoder_hidden_states"],
                    control=inputs["control"],
                    control_classes=inputs.get("control_classes"),
                    controlnet=controlnet,
                    noise=noise,
                    timesteps=timesteps,
                    weight_dtype=weight_dtype,
                    added_cond_kwargs=inputs.get("added_cond_kwargs"),
                    reduce=False,
                )
                errors.update(losses, timesteps)
    finally:
        probe.train(was_training)
    return errors.reduce(accelerator)


@torch.no_grad()
def predict_at_timesteps(
    *,
    probe,
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timesteps: Sequence[int] = DEFAULT_GRID_TIMESTEPS,
    controlnet=None,
    control: Optional[torch.Tensor] = None,
    seed: int = 0,
    weight_dtype: torch.dtype = torch.float32,
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """
    The probe's raw output for the same samples noised at each of `timesteps` (the same noise for all t).
    `added_cond_kwargs`: SDXL's added conditioning (`training.controlnet_step`).

    Returns:
        a list with one `(B, C_out, h, w)` tensor per timestep.
    """

    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= int(t) < num_train_timesteps]
    if bad:
        raise ValueError(f"Grid timesteps {bad} are outside [0, {num_train_timesteps}).")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    was_training = probe.training
    probe.eval()
    outputs = []
    try:
        for t in timesteps:
            ts = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, ts)
            features = probe_features(
                unet, probe.config.feature_kind, noisy, ts, encoder_hidden_states, controlnet, control, weight_dtype,
                added_cond_kwargs,
            )
            outputs.append(probe(features, ts, return_dict=False)[0].float())
    finally:
        probe.train(was_training)
    return outputs


def validation_grid(
    task,
    control: torch.Tensor,
    predictions: Sequence[torch.Tensor],
    control_classes: Optional[torch.Tensor] = None,
    image: Optional[torch.Tensor] = None,
    timesteps: Optional[Sequence[int]] = None,
):
    """
    One labelled PIL image (`render.labeled_grid`): a row per sample, columns `[image], control, readout at t_1, ...,
    readout at t_n`, every tile at the control's size (readouts enlarged with nearest). Controls and readouts are
    drawn as everywhere else in the package (`render.to_pil`, `render.render_readout`).

    Args:
        task: the `Task`.
        control: `(B, C, H, W)` in `[0, 1]`. control_classes: `(B, H, W)` for segmentation.
        predictions: raw probe outputs, one per timestep (`predict_at_timesteps`).
        image (*optional*): the source images `(B, 3, H, W)` in `[0, 1]`, shown first.
        timesteps (*optional*): the timestep of each prediction, for the column labels.
    """
    if timesteps is not None and len(timesteps) != len(predictions):
        raise ValueError(f"{len(timesteps)} timesteps for {len(predictions)} predictions.")
    rows = []
    for i in range(control.shape[0]):
        shown = control_classes[i] if task.is_segmentation and control_classes is not None else control[i]
        rows.append(([to_pil(image[i])] if image is not None else []) + [to_pil(shown)])
    for pred in predictions:
        for row, readout in zip(rows, render_readout(pred, task)):
            row.append(readout)
    labels = (["image"] if image is not None else []) + ["control"]
    labels += [f"t = {int(t)}" for t in timesteps] if timesteps is not None else [f"readout {k + 1}" for k in range(len(predictions))]
    width, height = control.shape[-1], control.shape[-2]
    return labeled_grid(rows, labels, tile_size=(width, height))
