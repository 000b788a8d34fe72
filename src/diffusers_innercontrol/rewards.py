# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Differentiable reward models for stage-2 training (ControlNet++'s cycle-consistency loss, docs/method.md, "Per-task defaults").

Each reward model is a frozen `nn.Module` that maps images `(B, 3, H, W)` in `[0, 1]` (float, with a
gradient) to what `losses.reward_loss_per_sample` takes:

- hed: controlnet_aux `ControlNetHED_Apache2` (`lllyasviel/Annotators` ControlNetHED.pth) -> `(B, 1, H, W)`
  edges in `[0, 1]`, white on black.
- lineart: controlnet_aux `lineart.Generator(3, 1, 3)` (`lllyasviel/Annotators` sk_model.pth) -> `(B, 1, H, W)`
  `1 - generator`, white lines on black.
- depth: transformers `DPTForDepthEstimation` (`Intel/dpt-hybrid-midas`) -> `(B, 1, h, w)` relative inverse
  depth (>= 0).
- segmentation: transformers `UperNetForSemanticSegmentation` -> logits `(B, 150, H, W)`.

`load_reward_model(task)` builds one from the task's Hub id or a local path (`toy.tiny.save_tiny_reward_model`
writes small random weights in the same format for offline tests and demos).

The networks come from the libraries that define them (controlnet_aux, transformers). What is written here
is only the part those libraries do not offer differentiably: controlnet_aux's detectors take PIL/numpy
images, run under `no_grad`, resize with cv2 and quantise to uint8 (the released ControlNet++/InnerControl
HED wrapper keeps that uint8 step, which silently zeroes the reward's gradient); transformers' image
processors work on numpy arrays. The wrappers redo the same preprocessing with torch operations.
"""

import importlib
import os
import warnings
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

from .hub_utils import check_model_available
from .tasks import get_task

REWARD_MODEL_OPTION = "--reward_model_name_or_path"
HED_FILENAME = "ControlNetHED.pth"
LINEART_FILENAME = "sk_model.pth"
LINEART_COARSE_FILENAME = "sk_model2.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EDGE_TASKS = ("hed", "lineart")
_TRANSFORMERS_TASKS = {"depth": "dpt", "segmentation": "upernet"}
_WHAT = {
    "hed": "the ControlNet HED network (controlnet_aux ControlNetHED_Apache2; "
    "ControlNetHED.pth of lllyasviel/Annotators)",
    "lineart": "the ControlNet LineArt generator (controlnet_aux lineart.Generator(3, 1, 3); "
    "sk_model.pth of lllyasviel/Annotators)",
    "depth": "a transformers DPTForDepthEstimation model (e.g. Intel/dpt-hybrid-midas)",
    "segmentation": "a transformers UperNetForSemanticSegmentation model trained on ADE20K "
    "(e.g. openmmlab/upernet-convnext-small)",
}


def _get_task(task):

    return get_task(task) if isinstance(task, str) else task


def import_controlnet_aux(submodule: str):
    """
    Import `controlnet_aux.<submodule>` on first use.

    controlnet_aux's package `__init__` imports every detector (timm, cv2, skimage, ...; about 3 s) and
    warns about optional packages and timm deprecations that have nothing to do with HED or LineArt: those
    import-time warnings are silenced here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(f"controlnet_aux.{submodule}")
    except ImportError as error:
        raise ImportError(
            f"The hed and lineart reward models and annotators need controlnet_aux ({error}): "
            "pip install controlnet_aux"
        ) from error


# --- the wrappers ---------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """
    Base of the reward models: a frozen network in eval mode, called on images `(B, 3, H, W)` in `[0, 1]`.

    The wrapped network stays in eval mode even if `.train()` is called on it (a reward model is never
    trained, and UperNet's BatchNorm layers must not update their statistics on generated images).
    """

    task_name: str = ""

    def __init__(self):
        super().__init__()

    def train(self, mode: bool = True):
        return super().train(False)

    def freeze(self) -> "RewardModel":
        self.requires_grad_(False)
        return self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"The {self.task_name} reward model takes images (B, 3, H, W) in [0, 1]; got {shape}.")
        return images.to(self.dtype)


class HEDReward(RewardModel):
    """
    The ControlNet HED soft-edge detector, differentiable.

    `sigmoid(mean_k(resize(side_k)))` over the five side outputs of `ControlNetHED_Apache2` run on the image
    in `[0, 255]`, each side output resized (bilinear, half-pixel centres as cv2's INTER_LINEAR) to the input
    size: controlnet_aux's `HEDdetector` without its no_grad, cv2 and uint8 steps.

    Args:
        network: a `controlnet_aux.hed.ControlNetHED_Apache2` (built with random weights when None).
    """

    task_name = "hed"

    def __init__(self, network: Optional[nn.Module] = None):
        super().__init__()
        self.network = network if network is not None else build_hed_network()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in `[0, 1]` -> edges `(B, 1, H, W)` in `[0, 1]` (white edges on black)."""
        x = self._check(images) * 255.0
        size = x.shape[-2:]
        # ControlNetHED_Apache2 overrides __call__ (not forward): it returns the 5 side-output logits.
        sides = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in self.network(x)]
        return torch.sigmoid(torch.stack(sides, dim=0).mean(dim=0))


class LineartReward(RewardModel):
    """
    The ControlNet LineArt detector, differentiable: `1 - Generator(image)` on the image in `[0, 1]`.

    The generator draws dark lines on white; ControlNet's lineart controls (and controlnet_aux's
    `LineartDetector`, `255 - line`) are white lines on black, hence `1 - x`.

    Args:
        network: a `controlnet_aux.lineart.Generator(3, 1, 3)` (built with random weights when None).
    """

    task_name = "lineart"

    def __init__(self, network: Optional[nn.Module] = None):
        super().__init__()
        self.network = network if network is not None else build_lineart_network()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in `[0, 1]` -> lines `(B, 1, H, W)` in `[0, 1]` (white lines on black)."""
        x = self._check(images)
        line = self.network(x)
        if line.shape[-2:] != x.shape[-2:]:  # sizes that are not multiples of 4
            line = F.interpolate(line, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return 1.0 - line


class DepthReward(RewardModel):
    """
    DPT depth, differentiable: resize to `image_size` (bilinear), normalise with mean = std = 0.5, predict.

    Args:
        model: a transformers `DPTForDepthEstimation`.
        image_size: the side the image is resized to (default: the model's `config.image_size`, 384 for
            `Intel/dpt-hybrid-midas`).

    The output is the model's `predicted_depth` (relative inverse depth, larger is nearer, as ControlNet's
    depth controls) `(B, 1, h, w)`, at the model's output resolution; the reward loss resizes it and divides
    it by its per-sample maximum.
    """

    task_name = "depth"

    def __init__(self, model: nn.Module, image_size: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        self.model = model
        size = image_size if image_size is not None else getattr(model.config, "image_size", 384)
        self.image_size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._check(images)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        return self.model(pixel_values=x).predicted_depth.unsqueeze(1)


class EdgeMapReward(DepthReward):
    """
    An edge map (HED soft edges or LineArt lines) drawn by a transformers `DPTForDepthEstimation` trained on
    that task's controls: ShapesWorld's toy edge rewards (`examples/innercontrol/shapesworld/train_toy_evaluators.py`).

    controlnet_aux's HED and LineArt networks have fixed widths (59 MB and 17 MB of weights); a small DPT
    with the regression head `DepthReward` already wraps draws the same one-channel map in a few hundred KB,
    so the toy world can ship its edge rewards. Same preprocessing as `DepthReward`; the output
    `(B, 1, h, w)` is the map in the control's polarity (white edges on black), at the model's resolution.

    Args:
        model: a transformers `DPTForDepthEstimation` trained on the task's controls.
        task_name: `hed` or `lineart`.
        image_size: as `DepthReward`.
    """

    def __init__(self, model: nn.Module, task_name: str = "hed", image_size: Optional[Union[int, Sequence[int]]] = None):
        if task_name not in _EDGE_TASKS:
            raise ValueError(f"EdgeMapReward draws edges for {_EDGE_TASKS}, not {task_name!r}.")
        super().__init__(model, image_size=image_size)
        self.task_name = task_name


class SegmentationReward(RewardModel):
    """
    UperNet semantic segmentation, differentiable: ImageNet mean/std normalisation, then the model's logits.

    Args:
        model: a transformers `UperNetForSemanticSegmentation` (150 ADE20K classes).
        image_size: if set, the image is resized (bilinear) to this size first; by default it is used as is.
        mean, std: the normalisation (ImageNet's, as the ADE20K UperNet image processors).

    Returns logits `(B, K, h, w)` at the (resized) input resolution (the model upsamples them).
    """

    task_name = "segmentation"

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[Union[int, Sequence[int]]] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.model = model
        if isinstance(image_size, (int, float)):
            image_size = (int(image_size), int(image_size))
        self.image_size = tuple(image_size) if image_size is not None else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._check(images)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(pixel_values=x).logits


_WRAPPERS = {"hed": HEDReward, "lineart": LineartReward, "depth": DepthReward, "segmentation": SegmentationReward}


# --- networks and weights ------------------------------------------------------------------------
def build_hed_network() -> nn.Module:
    """controlnet_aux's `ControlNetHED_Apache2` with random weights."""
    return import_controlnet_aux("hed").ControlNetHED_Apache2()


def build_lineart_network() -> nn.Module:
    """controlnet_aux's LineArt `Generator(3, 1, 3)` (the architecture of sk_model.pth) with random weights."""
    return import_controlnet_aux("lineart").Generator(3, 1, 3)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_weights_file(
    name_or_path: str, filename: str, revision: Optional[str] = None, option: str = REWARD_MODEL_OPTION
) -> str:
    """
    The local path of a third-party weights file: `name_or_path` itself when it is a file, `filename` inside
    it when it is a directory, else `filename` downloaded from the Hub repo `name_or_path` (offline: a
    cached copy, or an `OfflineModelError` naming the id and `option`).
    """
    path = os.path.expanduser(str(name_or_path))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            present = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"{path} ({option}) has no {filename}; it holds {present[:10]}{' ...' if len(present) > 10 else ''}. "
                f"Pass the directory that holds {filename}, or the path of the weights file itself."
            )
        return file
    if _looks_like_local_path(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} ({option}): no such file or directory.")
    check_model_available(name_or_path, option, filename=filename, revision=revision)

    return hf_hub_download(str(name_or_path), filename, revision=revision)


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """
    Read a third-party state dict: `.safetensors`, or a `.pth` with `torch.load(weights_only=True)` (no
    pickled code runs). A `{"state_dict": ...}` wrapper and a DataParallel `module.` prefix are removed.
    """
    try:
        if path.endswith(".safetensors"):

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} could not be read as a PyTorch state dict (torch.load with weights_only=True): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors).")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_weights_into(network: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, what: str) -> nn.Module:
    """`network.load_state_dict(state_dict)` (strict), with an error that names the missing/unexpected keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError(f"{source} does not hold the weights of {what}: {'; '.join(parts)}.")
    network.load_state_dict(state_dict, strict=True)
    return network


def load_edge_network(
    task_name: str,
    name_or_path: Optional[str] = None,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    option: str = REWARD_MODEL_OPTION,
) -> nn.Module:
    """
    The controlnet_aux network of an edge task (`hed` or `lineart`) with its pretrained weights, on the CPU,
    frozen, in eval mode. Defaults: the task's `reward_model_id` and `reward_model_file`.
    """
    if task_name not in _EDGE_TASKS:
        raise ValueError(f"{task_name!r} has no controlnet_aux edge network; choose one of {_EDGE_TASKS}.")
    task = _get_task(task_name)
    name_or_path = name_or_path or task.reward_model_id
    filename = filename or task.reward_model_file
    path = resolve_weights_file(name_or_path, filename, revision=revision, option=option)
    network = build_hed_network() if task_name == "hed" else build_lineart_network()
    load_weights_into(network, load_state_dict_file(path), path, _WHAT[task_name])
    network.float().eval().requires_grad_(False)
    return network


def _is_transformers_dir(name_or_path) -> bool:
    local = os.path.expanduser(str(name_or_path))
    return os.path.isdir(local) and os.path.isfile(os.path.join(local, "config.json"))


def _load_transformers_model(task, name_or_path: str, revision, variant, option: str) -> nn.Module:
    """depth / segmentation: the task's transformers model; hed / lineart: a DPT edge model (`EdgeMapReward`)."""

    local = os.path.expanduser(str(name_or_path))
    if os.path.isfile(local):
        raise ValueError(
            f"{name_or_path} ({option}) is a file; the {task.name} reward model is a transformers model: pass its "
            "directory (config.json and weights) or its Hub id."
        )
    if not os.path.isdir(local) and _looks_like_local_path(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} ({option}): no such directory.")
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(
            f"{name_or_path} ({option}) has no config.json: it is not a transformers model directory "
            f"({_WHAT[task.name]})."
        )
    check_model_available(name_or_path, option, revision=revision)
    expected_type = _TRANSFORMERS_TASKS.get(task.name, "dpt")
    what = _WHAT[task.name] if task.name in _TRANSFORMERS_TASKS else "a DPTForDepthEstimation edge model (EdgeMapReward)"
    config_dict, _ = transformers.PretrainedConfig.get_config_dict(str(name_or_path), revision=revision)
    model_type = config_dict.get("model_type")
    if model_type != expected_type:
        raise ValueError(
            f"{name_or_path} ({option}) is a {model_type!r} model; the {task.name} reward model must be "
            f"{what} (model_type {expected_type!r})."
        )
    cls = transformers.UperNetForSemanticSegmentation if task.name == "segmentation" else transformers.DPTForDepthEstimation
    model, info = cls.from_pretrained(str(name_or_path), revision=revision, variant=variant, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        raise ValueError(
            f"{name_or_path} ({option}) does not hold complete weights of {what}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(mismatched)} with wrong shapes "
            f"(e.g. {mismatched[:3]}); they would be random."
        )
    if task.name == "segmentation" and task.num_classes and model.config.num_labels != task.num_classes:
        raise ValueError(
            f"{name_or_path} ({option}) predicts {model.config.num_labels} classes; the segmentation task has "
            f"{task.num_classes} (ADE20K). Pass a model trained on ADE20K."
        )
    return model


def load_reward_model(
    task,
    name_or_path: Optional[str] = None,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    option: str = REWARD_MODEL_OPTION,
) -> RewardModel:
    """
    Load the reward model of a task: frozen (`requires_grad=False`), in eval mode, differentiable w.r.t. its input.

    Args:
        task: a `Task` or a task name (`hed`, `lineart`, `depth`, `segmentation`).
        name_or_path: a Hub id, a local directory, or (hed/lineart) the path of a `.pth` file, or a local
            transformers DPT directory trained on the edge maps (`EdgeMapReward`, ShapesWorld's toy rewards). Default:
            `task.reward_model_id` (`lllyasviel/Annotators`, `Intel/dpt-hybrid-midas`, ...).
        filename: hed/lineart: the weights file inside the repo or directory (default
            `task.reward_model_file`: `ControlNetHED.pth`, `sk_model.pth`).
        revision: the Hub revision (branch, tag or commit).
        variant: depth/segmentation: the transformers weights variant (e.g. `fp16`). The hed/lineart
            weights are single `.pth` files with no variants: pass `filename` instead.
        device, dtype: where and in which precision the model runs (inputs are cast to its dtype). In
            float16 without loss scaling the gradient that reaches the image can underflow (seen with the
            tiny HED model); fp16 training scales the loss (accelerate's GradScaler), bf16 needs nothing.
        option: the command-line option named in error messages.

    Raises:
        OfflineModelError: a Hub id while offline and not cached (one line naming the id and `option`).
        FileNotFoundError: a local path that does not exist or lacks the weights file.
        ValueError: a file or model that does not hold the task's network (names the keys or model type).
    """
    task = _get_task(task)
    if task.name not in _WRAPPERS:
        raise ValueError(f"No reward model for task {task.name!r}.")
    name_or_path = name_or_path or task.reward_model_id
    if not name_or_path:
        raise ValueError(f"The {task.name} task has no default reward model: pass {option}.")
    if task.name in _EDGE_TASKS and _is_transformers_dir(name_or_path):
        # a transformers DPT trained on the task's edge maps (ShapesWorld's toy HED / LineArt rewards)
        if filename is not None:
            raise ValueError(
                f"{name_or_path} ({option}) is a transformers model directory; filename={filename!r} applies to "
                "controlnet_aux .pth weights only."
            )
        model = EdgeMapReward(_load_transformers_model(task, name_or_path, revision, variant, option), task.name)
    elif task.name in _EDGE_TASKS:
        if variant is not None:
            raise ValueError(
                f"The {task.name} reward model is a single .pth file without variants (variant={variant!r}); "
                "pass its file name instead (filename / --reward_model_filename)."
            )
        network = load_edge_network(task.name, name_or_path, filename=filename, revision=revision, option=option)
        model = _WRAPPERS[task.name](network)
    else:
        if filename is not None:
            raise ValueError(
                f"filename={filename!r} applies to the hed/lineart .pth weights; the {task.name} reward model is a "
                "transformers model directory or Hub id."
            )
        model = _WRAPPERS[task.name](_load_transformers_model(task, name_or_path, revision, variant, option))
    model.to(device=device, dtype=dtype)
    return model.freeze()


__all__ = [
    "REWARD_MODEL_OPTION",
    "RewardModel",
    "HEDReward",
    "LineartReward",
    "DepthReward",
    "EdgeMapReward",
    "SegmentationReward",
    "build_hed_network",
    "build_lineart_network",
    "load_edge_network",
    "load_reward_model",
    "load_state_dict_file",
    "resolve_weights_file",
]
