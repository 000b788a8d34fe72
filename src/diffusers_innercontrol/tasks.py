# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The task registry: every per-task default of the paper (Table 4, Section 5.1, Appendix A.1).

A `Task` is the one place scripts read a task's settings from. `get_task(name)` returns the paper's
settings; `get_task(name, preset="released")` the settings of the released InnerControl launchers
(docs/method.md, "Per-task defaults"); any field can be overridden with `dataclasses.replace` or `task.replace(...)`.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

TASK_NAMES = ("hed", "lineart", "depth", "segmentation")
PRESETS = ("paper", "released")
REWARD_LOSSES = ("mse", "ce")
ALIGNMENT_LOSSES = ("mse", "sparse_mse", "ce")
# How the alignment loss brings the control and the probe's output to one size (losses.alignment_target):
# "nearest" / "area": the control downsampled to the readout's size; "readout": the readout upsampled (bilinear)
# to the control's size, as the released stage-2 code compares at 512 px.
ALIGNMENT_RESIZE = ("nearest", "area", "readout")
# How a regression probe's channels meet the (grey, one-channel) control: "mean" compares their mean with it; "each"
# compares every channel with it (the released HED alignment, a per-channel MSE against the 3-channel grey control).
ALIGNMENT_CHANNELS = ("mean", "each")
# The one default that differs between the base-model families: the native resolution (SDXL is trained at 1024 px).
# Every per-task setting above and below holds for both.
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}


def default_resolution(sdxl: bool) -> int:
    """The training resolution when `--resolution` is not given: the base model's native size."""
    return NATIVE_RESOLUTION["sdxl" if sdxl else "sd15"]


# the timesteps at which a probe's readouts are shown by default (validation grids)
DEFAULT_GRID_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class Task:
    """Settings of one control task. Timestep windows are inclusive: `lo <= t <= hi`."""

    name: str
    alpha: float  # weight of the reward loss (Eq. 8)
    beta: float  # weight of the alignment loss (Eq. 8)
    reward_window: Tuple[int, int]  # (0, T_reward)
    alignment_window: Tuple[int, int]  # (T_lo, T_hi)
    reward_loss: str
    alignment_loss: str
    # probe
    feature_kind: str
    feature_scale: float
    upsample_head: bool
    probe_out_channels: int
    output_activation: str
    # what the control is
    num_classes: Optional[int] = None  # segmentation only
    control_channels: int = 3
    # models and data (real ids for real users; tests pass local paths)
    controlnet_id: str = ""
    reward_model_id: str = ""
    reward_model_file: Optional[str] = None
    eval_model_id: str = ""
    dataset_name: str = ""
    image_column: str = "image"
    caption_column: str = "text"
    conditioning_column: str = ""
    annotator_computes_control: bool = False  # the control can be computed from the image on the fly
    # how the alignment loss reads the probe (the released code's choices; see losses.py)
    alignment_minmax: bool = False
    alignment_invert: bool = False
    # thin lines: nearest-neighbour downsampling drops most 1-px lines, area keeps each as a fainter one
    alignment_resize: str = "nearest"
    alignment_channels: str = "mean"
    probe_train_steps: int = 10_000
    preset: str = "paper"

    @property
    def is_segmentation(self) -> bool:
        return self.name == "segmentation"

    def replace(self, **changes) -> "Task":
        task = dataclasses.replace(self, **changes)
        task.validate()
        return task

    def validate(self, num_train_timesteps: int = 1000) -> "Task":
        for label, window in (("reward", self.reward_window), ("alignment", self.alignment_window)):
            lo, hi = window
            if not (0 <= lo <= hi < num_train_timesteps):
                raise ValueError(
                    f"The {label} window [{lo}, {hi}] must satisfy 0 <= lo <= hi < num_train_timesteps "
                    f"({num_train_timesteps}); give it as two timesteps, smallest first."
                )
        if self.reward_loss not in REWARD_LOSSES:
            raise ValueError(f"reward_loss {self.reward_loss!r} is not one of {REWARD_LOSSES}.")
        if self.alignment_loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"alignment_loss {self.alignment_loss!r} is not one of {ALIGNMENT_LOSSES}.")
        if (self.alignment_loss == "ce") != self.is_segmentation:
            raise ValueError("The cross-entropy alignment loss belongs to segmentation and only to it.")
        if (self.reward_loss == "ce") != self.is_segmentation:
            raise ValueError(
                "The reward loss is cross-entropy for segmentation (class logits) and MSE for the other tasks "
                f"(maps): got reward_loss={self.reward_loss!r} for '{self.name}'."
            )
        if self.alignment_resize not in ALIGNMENT_RESIZE:
            raise ValueError(f"alignment_resize {self.alignment_resize!r} is not one of {ALIGNMENT_RESIZE}.")
        if self.alignment_channels not in ALIGNMENT_CHANNELS:
            raise ValueError(f"alignment_channels {self.alignment_channels!r} is not one of {ALIGNMENT_CHANNELS}.")
        if self.is_segmentation and self.alignment_channels != "mean":
            raise ValueError("Segmentation compares class logits with class indices: alignment_channels must be 'mean'.")
        if self.is_segmentation and self.alignment_resize == "area":
            raise ValueError("Class maps cannot be area-averaged: use alignment_resize 'nearest' or 'readout' for segmentation.")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}.")
        return self

    def probe_kwargs(self) -> Dict:
        """Arguments for `ReadoutProbe.from_unet` that this task's probe needs (the task and preset are recorded)."""
        return dict(
            feature_kind=self.feature_kind,
            feature_scale=self.feature_scale,
            upsample_head=self.upsample_head,
            out_channels=self.probe_out_channels,
            output_activation=self.output_activation,
            task=self.name,
            task_preset=self.preset,
        )


_MULTIGEN = "limingcv/MultiGen-20M_train"

_PAPER: Dict[str, Task] = {
    "hed": Task(
        name="hed", alpha=1.0, beta=0.1, reward_window=(0, 400), alignment_window=(0, 800),
        reward_loss="mse", alignment_loss="sparse_mse",
        feature_kind="resnet", feature_scale=2.0, upsample_head=True, probe_out_channels=3, output_activation="tanh",
        controlnet_id="lllyasviel/control_v11p_sd15_softedge",
        reward_model_id="lllyasviel/Annotators", reward_model_file="ControlNetHED.pth",
        eval_model_id="lllyasviel/Annotators",
        dataset_name=_MULTIGEN, caption_column="text", conditioning_column="hed",
        annotator_computes_control=True, probe_train_steps=10_000, alignment_resize="area",
    ),
    "lineart": Task(
        name="lineart", alpha=10.0, beta=2.0, reward_window=(0, 200), alignment_window=(0, 700),
        reward_loss="mse", alignment_loss="mse",
        feature_kind="resnet", feature_scale=2.0, upsample_head=True, probe_out_channels=3, output_activation="tanh",
        controlnet_id="lllyasviel/control_v11p_sd15_lineart",
        reward_model_id="lllyasviel/Annotators", reward_model_file="sk_model.pth",
        eval_model_id="lllyasviel/Annotators",
        dataset_name=_MULTIGEN, caption_column="text", conditioning_column="lineart",
        annotator_computes_control=True, probe_train_steps=10_000, alignment_resize="area",
    ),
    "depth": Task(
        name="depth", alpha=0.5, beta=1.0, reward_window=(0, 400), alignment_window=(0, 920),
        reward_loss="mse", alignment_loss="mse",
        feature_kind="attention", feature_scale=1.0, upsample_head=False, probe_out_channels=3,
        output_activation="tanh",
        controlnet_id="lllyasviel/control_v11f1p_sd15_depth",
        reward_model_id="Intel/dpt-hybrid-midas", eval_model_id="Intel/dpt-large",
        dataset_name="limingcv/MultiGen-20M_depth", caption_column="text", conditioning_column="control_depth",
        probe_train_steps=5_000,
    ),
    "segmentation": Task(
        name="segmentation", alpha=0.5, beta=0.05, reward_window=(0, 200), alignment_window=(450, 980),
        reward_loss="ce", alignment_loss="ce",
        feature_kind="resnet", feature_scale=1.0, upsample_head=False, probe_out_channels=150,
        output_activation="none", num_classes=150,
        controlnet_id="lllyasviel/control_v11p_sd15_seg",
        # The paper's reward is mmseg's UperNet-R50; transformers' Hub checkpoints of UperNet on ADE20K are
        # ConvNeXt/Swin-backed, so the smallest of them stands in (any UperNet folder can be passed instead).
        reward_model_id="openmmlab/upernet-convnext-small",
        eval_model_id="facebook/mask2former-swin-large-ade-semantic",
        dataset_name="limingcv/Captioned_ADE20K", caption_column="prompt", conditioning_column="control_seg",
        probe_train_steps=5_000,
    ),
}

# The released InnerControl launchers: attention features and a 64 px head for every task, beta 1,
# alignment on [0, 920], alpha 0.5/1.0/1.0 and reward t <= 400/200/200 for depth/HED/LineArt.
_RELEASED_CHANGES = {
    "depth": dict(alpha=0.5, reward_window=(0, 400), alignment_resize="readout"),
    "hed": dict(alpha=1.0, reward_window=(0, 200), alignment_loss="mse", alignment_resize="readout", alignment_channels="each"),
    # The released LineArt alignment compares 1 - minmax(readout) with the LineDrawing model's raw output (dark lines
    # on white) while the ControlNet gets 1 - that output: in effect minmax(readout) is fitted to the ControlNet's
    # control (white lines on black), so no inversion here.
    # its LineArt reward is the "Image-to-Line-Drawings" generator (same architecture as ControlNet's sk_model.pth)
    "lineart": dict(alpha=1.0, reward_window=(0, 200), alignment_minmax=True, alignment_resize="readout",
                    reward_model_id="awacke1/Image-to-Line-Drawings", reward_model_file="model.pth"),
}


def get_task(name: str, preset: str = "paper") -> Task:
    """The settings of task `name` (`hed`, `lineart`, `depth`, `segmentation`) under `preset` (`paper` or `released`)."""
    if name not in _PAPER:
        raise ValueError(f"Unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}.")
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    task = _PAPER[name]
    if preset == "released":
        if name not in _RELEASED_CHANGES:
            raise ValueError(f"The released InnerControl code has no '{name}' task; use preset='paper'.")
        task = dataclasses.replace(
            task,
            beta=1.0,
            alignment_window=(0, 920),
            feature_kind="attention",
            feature_scale=1.0,
            upsample_head=False,
            preset="released",
            **_RELEASED_CHANGES[name],
        )
    return task.validate()


def _mapping(task: "Task"):
    return (task.alignment_minmax, task.alignment_invert)


# tasks whose readout -> control mapping depends on the preset (LineArt: min-max under `released`)
_PRESET_DEPENDENT_MAPPING = tuple(
    name for name in _RELEASED_CHANGES if _mapping(_PAPER[name]) != _mapping(dataclasses.replace(_PAPER[name], **_RELEASED_CHANGES[name]))
)


def check_probe_task(probe_config, task: "Task") -> None:
    """
    Refuse a probe trained for another task, or with a preset that maps its readout differently (LineArt is
    min-max normalised under `released`, not under `paper`). A probe that records no preset is refused for such a
    task (it would pass silently under the wrong mapping); for the other tasks, probes that record no task
    (imported ones) are accepted as they are.
    """
    trained_for = getattr(probe_config, "task", None)
    preset = getattr(probe_config, "task_preset", None)
    if preset is None and task.name in _PRESET_DEPENDENT_MAPPING:
        raise ValueError(
            f"The probe records no task preset, and the '{task.name}' readout is mapped to the control differently "
            "under --preset paper and --preset released: record it (convert.py --preset ..., or "
            "probe.register_to_config(task=..., task_preset=...)) or train the probe with train_probe.py."
        )
    if trained_for is None:
        return
    if trained_for != task.name:
        raise ValueError(
            f"The probe was trained for the '{trained_for}' task, not '{task.name}': pass a '{task.name}' probe "
            "(train_probe.py --task ...)."
        )
    if preset is not None and preset != task.preset:
        trained = get_task(trained_for, preset)
        if _mapping(trained) != _mapping(task):
            raise ValueError(
                f"The probe was trained with --preset {preset}, whose '{task.name}' readout is mapped to the control "
                f"differently from --preset {task.preset}: pass --preset {preset}, or a probe trained with "
                f"--preset {task.preset}."
            )


def list_tasks():
    return list(TASK_NAMES)
