# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Controls computed on the fly from the image, for data without a control column (HED and LineArt).

`load_annotator("hed")` returns a callable `PIL.Image -> PIL.Image` that draws the control the way the
ControlNet v1.1 annotators (controlnet_aux's `HEDdetector`, `LineartDetector`) do: white lines on black,
RGB, the size of the input image. The networks and weights are those of the reward models
(`rewards.load_edge_network`: same files, same offline check); the image handling (cv2 resizing, uint8
output) is controlnet_aux's own, so that controls match the ones of the datasets made with it.
"""

from typing import Optional, Union

import torch
from PIL import Image

from .rewards import import_controlnet_aux, load_edge_network

ANNOTATOR_OPTION = "--annotator_model_name_or_path"
ANNOTATOR_TASKS = ("hed", "lineart")


def default_detect_resolution(width: int, height: int) -> int:
    """The short side of the image rounded up to a multiple of 64 (at least 64): what controlnet_aux's
    `resize_image` then keeps unchanged for images whose sides are multiples of 64, such as 512 x 512."""
    short = min(width, height)
    return max(64, -(-short // 64) * 64)


class ControlAnnotator:
    """
    A controlnet_aux detector as a `PIL.Image -> PIL.Image` control annotator.

    Args:
        detector: a controlnet_aux `HEDdetector` or `LineartDetector`.
        task_name: `hed` or `lineart`.
        detect_resolution: the short side the detector works at (controlnet_aux rounds both sides to
            multiples of 64). Default: `default_detect_resolution` of each image (its own size for 512 x 512).

    Calling it on an image returns the control as an RGB image of the input's size (white lines on black).
    Deterministic; runs under `no_grad` (controlnet_aux's detectors do).
    """

    def __init__(self, detector, task_name: str, detect_resolution: Optional[int] = None):
        self.detector = detector
        self.task_name = task_name
        self.detect_resolution = detect_resolution

    def to(self, device: Union[str, torch.device]) -> "ControlAnnotator":
        self.detector.to(device)
        return self

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"The {self.task_name} annotator takes a PIL image; got {type(image).__name__}.")
        image = image.convert("RGB")
        width, height = image.size
        resolution = self.detect_resolution or default_detect_resolution(width, height)
        control = self.detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="pil")
        if control.size != (width, height):
            control = control.resize((width, height), Image.BILINEAR)
        return control.convert("RGB")

    def __repr__(self):
        return f"ControlAnnotator(task_name={self.task_name!r}, detect_resolution={self.detect_resolution})"


def load_annotator(
    task_name: str,
    name_or_path: Optional[str] = None,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    detect_resolution: Optional[int] = None,
    option: str = ANNOTATOR_OPTION,
) -> ControlAnnotator:
    """
    The annotator that computes a task's control from an image (`hed` or `lineart`).

    Args:
        task_name: `hed` or `lineart` (a `Task` is accepted too).
        name_or_path: a Hub id, a directory holding the weights file, or the file itself. Default: the task's
            `reward_model_id` (`lllyasviel/Annotators`).
        filename: the weights file (default: the task's `reward_model_file`, `ControlNetHED.pth` /
            `sk_model.pth`). Only LineArt's fine model is used (controlnet_aux's `coarse=False` default), so
            `sk_model2.pth` is not needed.
        revision: the Hub revision.
        device: where the detector runs (default CPU; keep it on the CPU inside data-loader workers).
        detect_resolution: see `ControlAnnotator`.
        option: the command-line option named in error messages.

    Raises:
        OfflineModelError: a Hub id while offline and not cached (one line naming the id and `option`).
        FileNotFoundError / ValueError: as `rewards.load_reward_model`.
    """
    task_name = getattr(task_name, "name", task_name)
    if task_name not in ANNOTATOR_TASKS:
        raise ValueError(
            f"No on-the-fly annotator for task {task_name!r} (only {', '.join(ANNOTATOR_TASKS)}): "
            "give the control images in the dataset's conditioning column."
        )
    network = load_edge_network(task_name, name_or_path, filename=filename, revision=revision, option=option)
    if task_name == "hed":
        detector = import_controlnet_aux("hed").HEDdetector(network)
    else:
        # LineartDetector(model, coarse_model): the coarse model is only used with coarse=True, never here.
        detector = import_controlnet_aux("lineart").LineartDetector(network, network)
    annotator = ControlAnnotator(detector, task_name, detect_resolution=detect_resolution)
    if device is not None:
        annotator.to(device)
    return annotator


__all__ = ["ANNOTATOR_OPTION", "ControlAnnotator", "default_detect_resolution", "load_annotator"]
