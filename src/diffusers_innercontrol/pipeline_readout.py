# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""A ControlNet pipeline that shows what a readout probe reads out of the UNet at each denoising step, and
that can steer sampling with the probe (readout guidance, after Luo et al., CVPR 2024).

[`StableDiffusionControlNetReadoutPipeline`] subclasses diffusers' `StableDiffusionControlNetPipeline` and
does not copy its `__call__`: the parent's denoising loop runs unchanged, and the readout machinery is
attached to it for one call only, with

- the forward hooks of a [`~diffusers_innercontrol.DecoderFeatureExtractor`] on the UNet (the features of
  every UNet forward),
- a forward pre-hook on the ControlNet that records its inputs (the control image the probe is compared
  with, and what readout guidance needs to run the ControlNet again),
- `callback_on_step_end`, chained with the user's own callback, where the probe reads the features of the
  step (the conditional half under classifier-free guidance),
- for readout guidance, a forward hook on the UNet that adds the guidance term to its noise prediction (under
  PNDM, `callback_on_step_end` adds it to the latents after the step instead).

Without `return_readouts` and with `readout_guidance_scale=0`, nothing is registered and the call is the
parent's call.
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, ControlNetModel, MultiControlNetModel, UNet2DConditionModel
from diffusers.pipelines.controlnet.pipeline_controlnet import retrieve_timesteps
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers, PNDMScheduler
from diffusers.utils import logging
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .features import DecoderFeatureExtractor, check_probe_fits_unet, split_guidance_batch
from .losses import alignment_loss_per_sample
from .models.readout_probe import ReadoutProbe
from .palette import control_to_classes
from .render import render_readout
from .tasks import Task, check_probe_task, get_task

logger = logging.get_logger(__name__)


@dataclass
class ReadoutPipelineOutput(StableDiffusionPipelineOutput):
    """
    Output of [`StableDiffusionControlNetReadoutPipeline`].

    Args:
        images (`List[PIL.Image.Image]` or `np.ndarray`): The generated images (as the parent pipeline returns them).
        nsfw_content_detected (`List[bool]`, *optional*): As the parent pipeline.
        readouts (`List[torch.Tensor]`, *optional*):
            The probe's output at every recorded step, each `(batch, channels, h, w)` in float32 on the CPU:
            `tanh` values for regression tasks, logits for segmentation. Conditional half only under
            classifier-free guidance, so `batch` is the number of generated images.
        readout_images (`List[List[PIL.Image.Image]]`, *optional*):
            The readouts rendered in the task's own way (`readout_images[step][sample]`): depth as greyscale,
            HED and LineArt as white lines on black, segmentation through the ADE20K palette.
        readout_timesteps (`List[int]`, *optional*): The timestep of every recorded step.
        readout_step_indices (`List[int]`, *optional*): The index of every recorded step in the denoising loop.
        readout_losses (`List[torch.Tensor]`, *optional*):
            The probe's disagreement with the control at every recorded step, `(batch,)`: the task's
            alignment loss (Eq. 7, `alignment_loss_per_sample`) between the readout and the control.
        readout_task (`str`, *optional*): The task whose rendering and loss were used.
    """

    readouts: Optional[List[torch.Tensor]] = None
    readout_images: Optional[List[List[PIL.Image.Image]]] = None
    readout_timesteps: Optional[List[int]] = None
    readout_step_indices: Optional[List[int]] = None
    readout_losses: Optional[List[torch.Tensor]] = None
    readout_task: Optional[str] = None


def default_readout_task(probe: ReadoutProbe):
    """
    The task assumed when none is given: the one the probe records (with its preset), else `segmentation`
    for a probe that outputs logits and `depth` otherwise.
    """
    recorded = getattr(probe.config, "task", None)
    if recorded is not None:
        return get_task(recorded, getattr(probe.config, "task_preset", None) or "paper")
    if probe.config.output_activation == "none":
        return "segmentation"
    return "depth"


def resolve_readout_task(task: Union[None, str, Task], probe: ReadoutProbe) -> Task:
    """A `Task` from a name, a `Task`, or `None` (see `default_readout_task`); checked against the probe."""
    if task is None:
        task = default_readout_task(probe)
    if isinstance(task, str):
        # A probe trained with the released preset maps its readout as that preset does.
        same = getattr(probe.config, "task", None) == task
        task = get_task(task, (getattr(probe.config, "task_preset", None) if same else None) or "paper")
    if not isinstance(task, Task):
        raise TypeError(f"readout_task must be a task name or a `Task`, got {type(task).__name__}.")
    if getattr(probe.config, "task", None) is not None:
        check_probe_task(probe.config, task)  # a probe that records its task reads out that task only
    wants_logits = task.is_segmentation
    has_logits = probe.config.output_activation == "none"
    if wants_logits != has_logits:
        raise ValueError(
            f"readout_task '{task.name}' does not fit this probe (output_activation="
            f"'{probe.config.output_activation}'): segmentation probes output logits (activation 'none'), the "
            "others tanh values. Pass the task the probe was trained for."
        )
    return task


def _num_prompts(prompt, prompt_embeds) -> int:
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    return prompt_embeds.shape[0] if prompt_embeds is not None else 1


def _check_control_batch(n: int, prompts: int, per_prompt: int) -> None:
    """A `readout_control` holds one control, one per prompt, or one per generated image."""
    images = prompts * per_prompt
    if n not in (1, prompts, images):
        allowed = sorted({1, prompts, images})
        raise ValueError(
            f"readout_control holds {n} controls for {prompts} prompt(s) x {per_prompt} image(s) per prompt: pass "
            f"{' or '.join(map(str, allowed))} (one for all, one per prompt, or one per image)."
        )


def _map_batch(value, full: int, keep: int):
    """The last `keep` rows of every tensor in `value` (nested lists / tuples / dicts) whose batch is `full`."""
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == full and keep != full:
            return value[full - keep :]
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_map_batch(v, full, keep) for v in value)
    if isinstance(value, dict):
        return {k: _map_batch(v, full, keep) for k, v in value.items()}
    return value


def _normalise_per_sample(grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`grad / RMS(grad)` for every sample: a unit-RMS direction (0 where the gradient vanishes)."""
    rms = grad.float().pow(2).flatten(1).mean(1).sqrt()
    return grad / (rms.view(-1, *([1] * (grad.ndim - 1))) + eps).to(grad.dtype)


def _timestep_value(timestep) -> float:
    """The timestep of one denoising step as a number (the pipeline passes a 0-d tensor)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def _clean_latent_factor(scheduler, timestep) -> float:
    """
    How far the one-step clean-latent estimate moves per unit change of the model output at `timestep`:
    `sqrt((1 - abar_t) / abar_t)` for epsilon prediction (`x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`,
    and `x0 = x - sigma eps` with the same `sigma` for the sigma-parametrised schedulers), `sqrt(1 - abar_t)`
    for v-prediction, 1 for sample prediction or a scheduler without `alphas_cumprod`.
    """
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if prediction_type == "sample" or alphas_cumprod is None:
        return 1.0
    t = int(round(min(max(_timestep_value(timestep), 0.0), len(alphas_cumprod) - 1)))
    abar = float(alphas_cumprod[t])
    if prediction_type == "v_prediction":
        return max((1.0 - abar) ** 0.5, 1e-4)
    return max(((1.0 - abar) / abar) ** 0.5, 1e-4)


def _guides_after_step(scheduler) -> bool:
    """
    PNDM extrapolates its last four noise predictions (`(55 e_k - 59 e_k-1 + 37 e_k-2 - 9 e_k-3) / 24`), so a
    correction added to one prediction reaches the latents up to 55/24 times, and echoes with alternating signs in
    the next steps. For it, readout guidance is added to the latents after the step instead, as DDIM integrates it.
    """
    return isinstance(scheduler, PNDMScheduler)


def _ddim_response(scheduler, timestep, next_timestep) -> float:
    """
    How much one DDIM step (eta 0) from `timestep` to `next_timestep` (`None`: the end) moves the latents per unit
    change of the model output: `sqrt(1 - abar_prev) - sqrt(abar_prev) * sqrt((1 - abar_t) / abar_t)` for a noise
    prediction, `sqrt(abar_t)` times that for a v-prediction (`eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`).
    """
    alphas_cumprod = scheduler.alphas_cumprod
    abar = float(alphas_cumprod[int(round(_timestep_value(timestep)))])
    if next_timestep is None:
        abar_prev = float(getattr(scheduler, "final_alpha_cumprod", alphas_cumprod[0]))
    else:
        abar_prev = float(alphas_cumprod[int(round(_timestep_value(next_timestep)))])
    response = (1.0 - abar_prev) ** 0.5 - abar_prev ** 0.5 * ((1.0 - abar) / abar) ** 0.5
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        return abar ** 0.5 * response
    return response


class _ReadoutSession:
    """The hooks and the step callback of one pipeline call (see the module docstring)."""

    def __init__(
        self,
        pipe: "StableDiffusionControlNetReadoutPipeline",
        probe: ReadoutProbe,
        task: Task,
        record: bool,
        steps: Optional[Sequence[int]],
        guidance_scale: float,
        guidance_window: Tuple[int, int],
        control: Optional[torch.Tensor],
        control_index: int,
        user_callback,
    ):
        self.pipe = pipe
        self.probe = probe
        self.task = task
        self.record = record
        self.steps = None if steps is None else list(steps)
        self.guidance_scale = float(guidance_scale)
        self.guidance_window = guidance_window
        self.control = control
        self.control_index = control_index
        self.user_callback = user_callback  # called with the tensor inputs it asked for (the parent collects them)

        self.extractor = DecoderFeatureExtractor(pipe.unet, probe.config.feature_kind, on_forward=self._on_features)
        self._handles = []
        self._guiding = False  # inside the extra forward of readout guidance
        self._features = None  # features of the last normal UNet forward
        self._controlnet_call = None  # (args, kwargs) of the last normal ControlNet forward
        self._selected = None
        self._targets: Dict[int, Optional[torch.Tensor]] = {}

        self.readouts: List[torch.Tensor] = []
        self.timesteps: List[int] = []
        self.step_indices: List[int] = []
        self.losses: List[torch.Tensor] = []
        self.guided_timesteps: List[int] = []
        # PNDM: the guidance term of the current step, added to the latents after the scheduler's step
        self.after_step = guidance_scale > 0 and _guides_after_step(pipe.scheduler)
        self._pending: Optional[Tuple[Any, torch.Tensor]] = None

    # registration --------------------------------------------------------------------------------
    def register(self) -> "_ReadoutSession":
        try:
            self.extractor.register()
            self._handles.append(
                self.pipe.controlnet.register_forward_pre_hook(self._record_controlnet, with_kwargs=True)
            )
            if self.guidance_scale > 0:
                # registered after the extractor's hooks, so it runs after them (the features are stashed first)
                self._handles.append(self.pipe.unet.register_forward_hook(self._guide, with_kwargs=True))
        except Exception:
            self.remove()
            raise
        return self

    def remove(self):
        self.extractor.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = None
        self._controlnet_call = None

    # hooks ---------------------------------------------------------------------------------------
    def _on_features(self, features):
        if not self._guiding and self.record:
            self._features = features

    def _record_controlnet(self, module, args, kwargs):
        if not self._guiding:
            self._controlnet_call = (args, kwargs)

    def _control_target(self, batch: int) -> Optional[torch.Tensor]:
        """The control the probe is compared with, for `batch` samples: what the losses take (cached)."""
        if batch in self._targets:
            return self._targets[batch]
        control = self.control
        if control is None and self._controlnet_call is not None:
            args, kwargs = self._controlnet_call
            control = kwargs.get("controlnet_cond", args[3] if len(args) > 3 else None)
            if isinstance(control, (list, tuple)):
                control = control[self.control_index]
        target = None
        if control is not None:
            target = self._match_batch(control, batch, from_controlnet=self.control is None)
            if self.task.is_segmentation and target.is_floating_point():

                target = control_to_classes(target)
        self._targets[batch] = target
        return target

    @staticmethod
    def _match_batch(control: torch.Tensor, batch: int, from_controlnet: bool = False) -> torch.Tensor:
        n = control.shape[0]
        if n == batch:
            return control
        if from_controlnet and n == 2 * batch:  # the ControlNet's [uncond, cond] input: both halves hold the same control
            return control[batch:]
        if batch % n == 0:  # one control per prompt, several images per prompt (as the parent repeats it)
            return control.repeat_interleave(batch // n, dim=0)
        raise ValueError(
            f"The readout control has {n} samples for {batch} generated images: pass one control, one per "
            "prompt, or one per image."
        )

    def _in_window(self, t) -> bool:
        lo, hi = self.guidance_window
        return lo <= _timestep_value(t) <= hi

    def _guide(self, module, args, kwargs, output):
        """
        Adds the readout-guidance term to the UNet's noise prediction (both halves under classifier-free
        guidance, so that the guided prediction moves by exactly that term): the gradient of the probe's
        disagreement with the control w.r.t. the conditional latents, normalised to unit RMS per sample and
        sized so that the one-step clean latent moves by `guidance_scale` (RMS).
        """
        if self._guiding:
            return None
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not self._in_window(timestep):
            return None
        if self._controlnet_call is None:
            raise RuntimeError("Readout guidance found no ControlNet forward before the UNet forward.")

        sample = args[0] if args else kwargs["sample"]
        full = sample.shape[0]
        batch = full // 2 if self.pipe.do_classifier_free_guidance else full
        target = self._control_target(batch)
        if target is None:
            raise ValueError("Readout guidance needs a control to compare with: pass `readout_control`.")

        latents = sample[full - batch :].detach().requires_grad_(True)
        cn_args, cn_kwargs = self._controlnet_call
        cn_full = (cn_args[0] if cn_args else cn_kwargs["sample"]).shape[0]

        with torch.enable_grad():
            self._guiding = True
            try:
                # The ControlNet's input rows of the conditional batch equal the UNet's (the parent scales one
                # latent tensor for both, in guess mode too), so both are run again on `latents`.
                cn_args_c = _map_batch(tuple(cn_args[1:]), cn_full, batch)
                cn_kwargs_c = _map_batch(dict(cn_kwargs), cn_full, batch)
                if cn_args:
                    cn_args_c = (latents,) + tuple(cn_args_c)
                else:
                    cn_kwargs_c["sample"] = latents
                down, mid = self.pipe.controlnet(*cn_args_c, **cn_kwargs_c)[:2]

                unet_args_c = _map_batch(tuple(args[1:]), full, batch)
                unet_kwargs_c = _map_batch(dict(kwargs), full, batch)
                unet_kwargs_c["down_block_additional_residuals"] = down
                unet_kwargs_c["mid_block_additional_residual"] = mid
                if args:
                    unet_args_c = (latents,) + tuple(unet_args_c)
                else:
                    unet_kwargs_c["sample"] = latents
                module(*unet_args_c, **unet_kwargs_c)
                features = self.extractor.pop()
                readout = self.probe(features, timestep, return_dict=False)[0]
                loss = alignment_loss_per_sample(self.task, readout, target).sum()
                (grad,) = torch.autograd.grad(loss, latents)
            finally:
                self._guiding = False

        # unit-RMS direction, scaled so that the predicted clean latent moves by `guidance_scale` (RMS)
        self.guided_timesteps.append(int(round(_timestep_value(timestep))))
        factor = _clean_latent_factor(self.pipe.scheduler, timestep)
        delta = (self.guidance_scale / factor) * _normalise_per_sample(grad.detach())
        if self.after_step:
            self._pending = (timestep, delta)  # added to the latents after the scheduler's step (`__call__`)
            return None
        if isinstance(output, tuple):
            noise_pred = output[0]
            delta = delta.to(noise_pred.dtype).repeat(full // batch, 1, 1, 1)
            return (noise_pred + delta,) + tuple(output[1:])
        noise_pred = output.sample
        delta = delta.to(noise_pred.dtype).repeat(full // batch, 1, 1, 1)
        output.sample = noise_pred + delta
        return output

    # the step callback ---------------------------------------------------------------------------
    def _is_selected(self, i: int, num_steps: int) -> bool:
        if self.steps is None:
            return True
        if self._selected is None:
            for s in self.steps:
                if not -num_steps <= s < num_steps:
                    raise ValueError(
                        f"readout_steps holds {s}, but the denoising loop has {num_steps} steps "
                        f"(valid indices: {-num_steps}..{num_steps - 1})."
                    )
            self._selected = {s % num_steps for s in self.steps}
        return i in self._selected

    def _guide_after_step(self, pipe, i, callback_kwargs) -> Dict[str, torch.Tensor]:
        """PNDM: the latents after the step move by the guidance term times the DDIM response of this step."""
        if self._pending is None:
            return {}
        timestep, delta = self._pending
        self._pending = None
        timesteps = pipe.scheduler.timesteps
        next_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = callback_kwargs["latents"]
        response = _ddim_response(pipe.scheduler, timestep, next_timestep)
        return {"latents": latents + response * delta.to(latents.dtype).repeat(latents.shape[0] // delta.shape[0], 1, 1, 1)}

    def __call__(self, pipe, i, t, callback_kwargs):
        guided = self._guide_after_step(pipe, i, callback_kwargs) if self.after_step else {}
        callback_kwargs = {**callback_kwargs, **guided}
        if self.record and self._is_selected(i, pipe.num_timesteps):
            features = self._features
            if features is None:
                raise RuntimeError("No UNet features were captured at this step.")
            if pipe.do_classifier_free_guidance:
                features = split_guidance_batch(features)
            readout = self.probe(features, t, return_dict=False)[0]
            self.readouts.append(readout.float().cpu())
            self.timesteps.append(int(round(_timestep_value(t))))
            self.step_indices.append(int(i))
            target = self._control_target(readout.shape[0])
            if target is not None:
                self.losses.append(alignment_loss_per_sample(self.task, readout, target).float().cpu())
        self._features = None
        if self.user_callback is not None:
            return {**guided, **(self.user_callback(pipe, i, t, callback_kwargs) or {})}
        return guided


class ReadoutPipelineMixin:
    """
    The readout machinery shared by the readout pipelines (SD1.5 and SDXL): the probe as an optional component
    recorded in `model_index.json`, the checks that run before any model, and `_readout_call`, which runs the
    parent pipeline's `__call__` once with a `_ReadoutSession` attached. A pipeline class lists it before the
    diffusers pipeline it extends and writes out that pipeline's `__call__` signature, then the readout parameters.
    """

    _returns_nsfw_flags = True  # the parent returns (images, nsfw_content_detected) with return_dict=False

    # model_index.json ------------------------------------------------------------------------------
    @staticmethod
    def _probe_entry(probe) -> Tuple[Optional[str], Optional[str]]:
        """
        The `(library, class)` recorded for the probe. diffusers records a custom class by its full module path
        (`diffusers_innercontrol.models.readout_probe`); a class the package exports at top level is recorded as
        `["diffusers_innercontrol", "ReadoutProbe"]` instead, which survives moves inside the package (the loader
        then finds `ReadoutProbe` and `ModelMixin` in the package's namespace).
        """
        if probe is None:
            return (None, None)

        library, class_name = _fetch_class_library_tuple(probe)
        if type(probe) is ReadoutProbe:  # exported by the package's __init__
            library = __name__.split(".")[0]
        return (library, class_name)

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        if "readout_probe" in kwargs:
            self.register_to_config(readout_probe=self._probe_entry(kwargs["readout_probe"]))

    def __setattr__(self, name: str, value: Any):
        super().__setattr__(name, value)
        # `pipe.readout_probe = probe` records the probe too (the parent's `__setattr__` keeps `(None, None)`
        # when the pipeline was built without one).
        config = self.__dict__.get("_internal_dict")
        if name == "readout_probe" and config is not None and "readout_probe" in config:
            self.register_to_config(readout_probe=self._probe_entry(value))

    # ----------------------------------------------------------------------------------------------
    def _check_probe(self, probe: ReadoutProbe):
        if not isinstance(probe, ReadoutProbe):
            raise TypeError(f"readout_probe must be a ReadoutProbe, got {type(probe).__name__}.")
        check_probe_fits_unet(self.unet, probe.config.feature_kind, probe.config.feature_channels, "The readout probe",
                              "Use a probe trained on this pipeline's UNet (train_probe.py, ReadoutProbe.from_unet).")

    def _prepare_readout_control(self, control) -> Optional[torch.Tensor]:
        """A user-given control on the execution device: `(B, C, H, W)` in `[0, 1]`, or classes `(B, H, W)`."""
        if control is None:
            return None
        device = self._execution_device
        if torch.is_tensor(control) and not control.is_floating_point():
            classes = control if control.ndim == 3 else control[None]
            return classes.to(device=device, dtype=torch.long)
        if torch.is_tensor(control):
            control = control if control.ndim == 4 else control[None]
            if control.min() < 0 or control.max() > 1:
                raise ValueError("readout_control as a float tensor must hold values in [0, 1] (B, C, H, W).")
            return control.to(device=device, dtype=torch.float32)
        # PIL images / numpy arrays / lists of them: the ControlNet's own preprocessing ([0, 1], no resize)
        return self.control_image_processor.preprocess(control).to(device=device, dtype=torch.float32)

    def _num_loop_steps(self, call: Dict[str, Any]) -> int:
        """
        How many steps the denoising loop will run for this call: the length of the timesteps that a copy of the
        scheduler sets (the parent's own `retrieve_timesteps`). It differs from `num_inference_steps` for some
        schedulers: PNDM repeats a timestep (21 steps for 20), Heun evaluates twice per step.
        """
        scheduler = copy.deepcopy(self.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, call.get("num_inference_steps"), "cpu",
                                          call.get("timesteps"), call.get("sigmas"))
        return len(timesteps)

    def _readout_call(
        self,
        parent_call: Callable,
        call: Dict[str, Any],
        return_readouts: bool,
        readout_steps: Optional[List[int]],
        readout_probe: Optional[ReadoutProbe],
        readout_task: Union[None, str, Task],
        readout_control,
        readout_control_index: int,
        readout_guidance_scale: float,
        readout_guidance_window: Optional[Tuple[int, int]],
    ) -> Union[ReadoutPipelineOutput, Tuple]:
        """`parent_call(**call)` with readouts and / or readout guidance (the parameters of `__call__`)."""
        prompt, prompt_embeds = call.get("prompt"), call.get("prompt_embeds")
        num_images_per_prompt = call.get("num_images_per_prompt")
        readout_guidance_scale = float(readout_guidance_scale)
        if not math.isfinite(readout_guidance_scale) or readout_guidance_scale < 0:
            raise ValueError(f"readout_guidance_scale must be a finite number >= 0, got {readout_guidance_scale}.")
        if not return_readouts and readout_guidance_scale == 0:
            out = parent_call(**call)
            if isinstance(out, tuple):
                return out
            return ReadoutPipelineOutput(images=out.images, nsfw_content_detected=getattr(out, "nsfw_content_detected", None))

        # Check everything before any model runs.
        probe = readout_probe if readout_probe is not None else self.readout_probe
        if probe is None:
            raise ValueError(
                "return_readouts / readout guidance need a readout probe: pass `readout_probe=` to the call, or "
                "build the pipeline with one (`from_pipe(pipe, readout_probe=probe)`)."
            )
        self._check_probe(probe)
        task = resolve_readout_task(readout_task, probe)
        if readout_steps is not None:
            if isinstance(readout_steps, int) or not all(isinstance(s, (int, np.integer)) for s in readout_steps):
                raise TypeError(f"readout_steps must be a list of step indices, got {readout_steps!r}.")
            n = self._num_loop_steps(call)
            for s in readout_steps:
                if not -n <= s < n:
                    raise ValueError(
                        f"readout_steps holds {s}, but {type(self.scheduler).__name__}'s denoising loop has {n} steps "
                        f"here (indices 0..{n - 1}, or {-n}..-1 from the end; -1 is the last step)."
                    )
        window = tuple(readout_guidance_window) if readout_guidance_window is not None else task.alignment_window
        if len(window) != 2 or window[0] > window[1]:
            raise ValueError(f"readout_guidance_window must be (lo, hi) timesteps with lo <= hi, got {window}.")
        if isinstance(self.controlnet, MultiControlNetModel):
            if not 0 <= readout_control_index < len(self.controlnet.nets):
                raise ValueError(
                    f"readout_control_index {readout_control_index} is out of range for "
                    f"{len(self.controlnet.nets)} ControlNets."
                )
        elif readout_control_index != 0:
            raise ValueError("readout_control_index only applies to several ControlNets; leave it at 0.")
        control = self._prepare_readout_control(readout_control)
        if control is not None:
            _check_control_batch(control.shape[0], _num_prompts(prompt, prompt_embeds), num_images_per_prompt or 1)
        if not hasattr(probe, "_hf_hook") and probe.device != self._execution_device:
            probe.to(self._execution_device)  # a per-call probe follows the pipeline (offloaded ones move themselves)

        # The user's callback stays in the chain, with the tensor inputs it asked for.
        user_callback = call.get("callback_on_step_end")
        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(user_callback.tensor_inputs)
        else:
            user_inputs = list(call.get("callback_on_step_end_tensor_inputs") or ["latents"])

        session = _ReadoutSession(
            self,
            probe,
            task,
            record=return_readouts,
            steps=readout_steps,
            guidance_scale=readout_guidance_scale,
            guidance_window=window,
            control=control,
            control_index=readout_control_index,
            user_callback=user_callback,
        )
        if return_readouts or session.after_step:
            call["callback_on_step_end"] = session
            call["callback_on_step_end_tensor_inputs"] = user_inputs + (["latents"] if "latents" not in user_inputs else [])
        return_dict = call.pop("return_dict", True)
        call["return_dict"] = True

        session.register()
        try:
            out = parent_call(**call)
        finally:
            session.remove()
        if readout_guidance_scale > 0 and not session.guided_timesteps:
            logger.warning(
                f"Readout guidance was on, but no timestep fell in readout_guidance_window {window}: no step "
                "was guided."
            )

        fields = {}
        if return_readouts:

            fields = dict(
                readouts=session.readouts,
                readout_images=[render_readout(r, task) for r in session.readouts],
                readout_timesteps=session.timesteps,
                readout_step_indices=session.step_indices,
                readout_losses=session.losses if len(session.losses) == len(session.readouts) else None,
                readout_task=task.name,
            )
        output = ReadoutPipelineOutput(images=out.images, nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
                                        **fields)
        if not return_dict:
            # the parent's tuple (SD1.5: images and the safety checker's flags; SDXL: images), then the readouts
            result = (output.images, output.nsfw_content_detected) if self._returns_nsfw_flags else (output.images,)
            if return_readouts:
                result += (output.readouts, output.readout_images, output.readout_timesteps)
            return result
        return output


class StableDiffusionControlNetReadoutPipeline(ReadoutPipelineMixin, StableDiffusionControlNetPipeline):
    r"""
    `StableDiffusionControlNetPipeline` with a readout probe: returns what the probe reads out of the UNet's
    decoder features at every (or a chosen) denoising step, and optionally steers sampling with it (readout
    guidance).

    All arguments of the parent are kept (same type hints, so `from_pipe` carries every module over):

    ```py
    >>> pipe = StableDiffusionControlNetPipeline.from_pretrained(...)
    >>> readout_pipe = StableDiffusionControlNetReadoutPipeline.from_pipe(pipe, readout_probe=probe)
    >>> out = readout_pipe(prompt, image=control, return_readouts=True, readout_task="depth")
    >>> grid = make_readout_grid(out, control, sample_index=0)
    ```

    Args:
        vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker, feature_extractor,
        image_encoder, requires_safety_checker: As [`~diffusers.StableDiffusionControlNetPipeline`].
        readout_probe ([`ReadoutProbe`], *optional*):
            The probe used when a call passes no probe of its own. Saved with `save_pretrained` (recorded as
            `["diffusers_innercontrol", "ReadoutProbe"]` in `model_index.json`) and loaded back by
            `from_pretrained`.
    """

    _optional_components = StableDiffusionControlNetPipeline._optional_components + ["readout_probe"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        readout_probe: Optional[ReadoutProbe] = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(readout_probe=readout_probe)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        image: PipelineImageInput = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: List[int] = None,
        sigmas: List[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image: Optional[PipelineImageInput] = None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[
            Union[Callable[[int, int, Dict], None], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (the parent's default)
        return_readouts: bool = False,
        readout_steps: Optional[List[int]] = None,
        readout_probe: Optional[ReadoutProbe] = None,
        readout_task: Union[None, str, Task] = None,
        readout_control: Union[None, torch.Tensor, PIL.Image.Image, np.ndarray, List] = None,
        readout_control_index: int = 0,
        readout_guidance_scale: float = 0.0,
        readout_guidance_window: Optional[Tuple[int, int]] = None,
        **kwargs,
    ) -> Union[ReadoutPipelineOutput, Tuple]:
        r"""
        The parent's call, with its parameters and defaults (see [`~diffusers.StableDiffusionControlNetPipeline.__call__`]
        for `prompt` ... `callback_on_step_end_tensor_inputs`; `**kwargs` are passed on to it), then:

        Args:
            return_readouts (`bool`, defaults to `False`):
                Run the probe on the UNet's decoder features at the chosen steps and return its readouts.
            readout_steps (`List[int]`, *optional*):
                Indices of the steps of the denoising loop to read out, `0 .. N - 1` where `N` is the number of
                timesteps the scheduler runs (`len(pipe.scheduler.timesteps)` after the call: `num_inference_steps`
                for most schedulers, one more for PNDM, about twice as many for Heun); negative indices count from
                the end, `[-1]` is the last step. `None` reads every step. The output lists each step's index and
                timestep (`readout_step_indices`, `readout_timesteps`).
            readout_probe ([`ReadoutProbe`], *optional*): A probe for this call; defaults to the pipeline's.
            readout_task (`str` or `Task`, *optional*):
                The probe's task (`"hed"`, `"lineart"`, `"depth"`, `"segmentation"` or a `Task`, e.g. a
                `released` preset): how readouts are rendered and compared with the control. Defaults to
                `"segmentation"` for a probe that outputs logits, else `"depth"`.
            readout_control (`torch.Tensor` or `PIL.Image.Image` or list, *optional*):
                The control the probe is compared with (readout losses and guidance): images or a float tensor
                `(B, C, H, W)` in `[0, 1]`, or class indices `(B, H, W)` for segmentation. Defaults to the
                ControlNet's own control image (colour maps are mapped to ADE20K classes for segmentation).
            readout_control_index (`int`, defaults to 0):
                With several ControlNets, which one's control image the probe is compared with.
            readout_guidance_scale (`float`, defaults to 0.0):
                Readout guidance: at every step whose timestep lies in `readout_guidance_window`, the gradient
                of the probe's disagreement with the control (the task's alignment loss, summed over samples)
                w.r.t. the latents is taken through one extra ControlNet + UNet forward and backward on the
                conditional batch, normalised to unit RMS per sample, and sized so that the one-step estimate of
                the clean latent moves by `readout_guidance_scale` (RMS) along the negative gradient. The term is
                added to the noise prediction (the classifier-guidance form: DDIM, Euler, UniPC and DPM-Solver++
                integrate it; a multistep solver's corrector would undo an edit of the latents between steps).
                PNDM is the exception: it extrapolates its last four noise predictions, which would amplify the
                term up to 55/24 times and echo it with alternating signs, so under PNDM the same term is added
                to the latents after each step, as one DDIM step integrates it. Measured on ShapesWorld's depth
                models (64 held-out scenes, paired by seed, an independent depth evaluator): 0.05 and 0.1 lower the
                depth error under PNDM, DDIM, UniPC, Euler and DPM-Solver++ (p < 0.05 each) without more clipped
                pixels; 0.2 still does under PNDM and DDIM only (the table: `examples/innercontrol/README.md`,
                "Readout guidance"). Cost: one extra ControlNet + UNet forward and backward per guided step, on the
                conditional half of the batch.
            readout_guidance_window (`Tuple[int, int]`, *optional*):
                Inclusive timestep window of readout guidance; defaults to the task's alignment window.

        Returns:
            [`ReadoutPipelineOutput`] or `tuple`: with `return_dict=False`, `(images, nsfw_content_detected)`
            and, with `return_readouts=True`, also `(readouts, readout_images, readout_timesteps)`.
        """
        call = dict(
            prompt=prompt, image=image, height=height, width=width, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds, output_type=output_type, return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs, controlnet_conditioning_scale=controlnet_conditioning_scale,
            guess_mode=guess_mode, control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )
        return self._readout_call(
            super().__call__, call, return_readouts, readout_steps, readout_probe, readout_task, readout_control,
            readout_control_index, readout_guidance_scale, readout_guidance_window,
        )


class StableDiffusionXLControlNetReadoutPipeline(ReadoutPipelineMixin, StableDiffusionXLControlNetPipeline):
    r"""
    `StableDiffusionXLControlNetPipeline` with a readout probe: the SDXL counterpart of
    [`StableDiffusionControlNetReadoutPipeline`], with the same readout and guidance parameters. The parent's
    denoising loop runs unchanged (SDXL's pooled text embeddings and size / crop ids included: readout guidance
    runs the ControlNet and the UNet again with the recorded inputs of the conditional half).

    ```py
    >>> pipe = StableDiffusionXLControlNetPipeline.from_pretrained(...)
    >>> readout_pipe = StableDiffusionXLControlNetReadoutPipeline.from_pipe(pipe, readout_probe=probe)
    >>> out = readout_pipe(prompt, image=control, return_readouts=True, readout_task="depth")
    ```

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
        force_zeros_for_empty_prompt, add_watermarker, feature_extractor, image_encoder:
            As [`~diffusers.StableDiffusionXLControlNetPipeline`].
        readout_probe ([`ReadoutProbe`], *optional*): As in [`StableDiffusionControlNetReadoutPipeline`].
    """

    _optional_components = StableDiffusionXLControlNetPipeline._optional_components + ["readout_probe"]
    _returns_nsfw_flags = False  # SDXL's pipelines return (images,) with return_dict=False

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | tuple[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        readout_probe: Optional[ReadoutProbe] = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_modules(readout_probe=readout_probe)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        image: PipelineImageInput = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: List[int] = None,
        sigmas: List[float] = None,
        denoising_end: Optional[float] = None,
        guidance_scale: float = 5.0,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt_2: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image: Optional[PipelineImageInput] = None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        controlnet_conditioning_scale: Union[float, List[float]] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: Union[float, List[float]] = 0.0,
        control_guidance_end: Union[float, List[float]] = 1.0,
        original_size: Tuple[int, int] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Tuple[int, int] = None,
        negative_original_size: Optional[Tuple[int, int]] = None,
        negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
        negative_target_size: Optional[Tuple[int, int]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[
            Union[Callable[[int, int, Dict], None], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (the parent's default)
        return_readouts: bool = False,
        readout_steps: Optional[List[int]] = None,
        readout_probe: Optional[ReadoutProbe] = None,
        readout_task: Union[None, str, Task] = None,
        readout_control: Union[None, torch.Tensor, PIL.Image.Image, np.ndarray, List] = None,
        readout_control_index: int = 0,
        readout_guidance_scale: float = 0.0,
        readout_guidance_window: Optional[Tuple[int, int]] = None,
        **kwargs,
    ) -> Union[ReadoutPipelineOutput, Tuple]:
        r"""
        The parent's call, with its parameters and defaults (see
        [`~diffusers.StableDiffusionXLControlNetPipeline.__call__`] for `prompt` ...
        `callback_on_step_end_tensor_inputs`; `**kwargs` are passed on to it), then the readout parameters, as in
        [`StableDiffusionControlNetReadoutPipeline.__call__`].

        Returns:
            [`ReadoutPipelineOutput`] (`nsfw_content_detected` is `None`: SDXL has no safety checker) or `tuple`:
            with `return_dict=False`, `(images,)` and, with `return_readouts=True`, also `(readouts,
            readout_images, readout_timesteps)`.
        """
        call = dict(
            prompt=prompt, prompt_2=prompt_2, image=image, height=height, width=width,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, denoising_end=denoising_end,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            controlnet_conditioning_scale=controlnet_conditioning_scale, guess_mode=guess_mode,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )
        return self._readout_call(
            super().__call__, call, return_readouts, readout_steps, readout_probe, readout_task, readout_control,
            readout_control_index, readout_guidance_scale, readout_guidance_window,
        )
