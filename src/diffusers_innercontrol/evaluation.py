# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Evaluation with the paper's protocol (docs/method.md, "Evaluation"; Table 1): generation, evaluator models, reports.

- `load_eval_dataset(...)` -> `EvalDataset`: the evaluation conditions (caption, image, control), read with
  `data.py`'s loading and column resolution; HED/LineArt controls missing from the data are computed from the
  image by the evaluator annotator itself (as the released evaluation does).
- `load_generation_pipeline(...)`: `StableDiffusionControlNetPipeline` with `UniPCMultistepScheduler`.
- `generate_images(...)`: for every condition, one image per seed (4 seeds, 20 steps, guidance 7.5, negative
  prompt "worst quality, low quality", 512 px by default) saved as `images/{index:06d}_{seed}.png`. Existing
  files are skipped, so a stopped run resumes where it was; files are written atomically.
- `load_control_evaluator(task, ...)`: HED/LineArt: the task's annotator (`rewards.load_reward_model`);
  depth: DPT-Large (`Intel/dpt-large`); segmentation: Mask2Former (`facebook/mask2former-swin-large-ade-semantic`)
  or any transformers semantic-segmentation model (UperNet, SegFormer) given by path.
- `compute_metrics(...)`: control fidelity (`metrics.ControlFidelity`), FID and CLIP score over the saved images.
- `probe_bucket_errors(...)`: a readout probe's error against the control per timestep bucket (`probe_eval`).
- `write_results(...)`: `results.json` and `results.md`, the latter in the layout of the paper's Table 1.
"""

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    DPTForDepthEstimation,
)

from .data import DataConfig, DataError, ExampleTransform, _column_names, load_train_dataset, resolve_columns
from .hub_utils import check_model_available
from .metrics import CONTROL_METRICS, ControlFidelity, to_uint8
from .probe_eval import evaluate_probe
from .rewards import IMAGENET_MEAN, IMAGENET_STD, load_reward_model
from .training import encode_images

DEFAULT_NEGATIVE_PROMPT = "worst quality, low quality"
DEFAULT_SEEDS = (0, 1, 2, 3)
DEFAULT_NUM_INFERENCE_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_RESOLUTION = 512
IMAGES_SUBDIR = "images"

# The evaluation sets of ControlNet++ / InnerControl: (dataset id, split). HED and LineArt controls are
# computed from the images of the canny evaluation set by the annotator.
EVAL_DATASETS = {
    "hed": ("limingcv/MultiGen-20M_canny_eval", "validation"),
    "lineart": ("limingcv/MultiGen-20M_canny_eval", "validation"),
    "depth": ("limingcv/MultiGen-20M_depth_eval", "validation"),
    "segmentation": ("limingcv/Captioned_ADE20K", "validation"),
}
DEFAULT_EVAL_MODELS = {
    "hed": "lllyasviel/Annotators",
    "lineart": "lllyasviel/Annotators",
    "depth": "Intel/dpt-large",
    "segmentation": "facebook/mask2former-swin-large-ade-semantic",
}

# The paper's Table 1 (SD1.5, guidance 7.5): control metric per task (mIoU in %), FID where reported.
PAPER_TABLE1 = {
    "ControlNet": {"hed": 0.762, "lineart": 0.705, "depth": 35.90, "segmentation": 32.60},
    "ControlNet++": {"hed": 0.822, "lineart": 0.840, "depth": 27.63, "segmentation": 38.08},
    "InnerControl": {"hed": 0.826, "lineart": 0.850, "depth": 26.09, "segmentation": 40.22},
}
PAPER_FID = {"InnerControl": {"hed": 13.0, "lineart": 13.5, "depth": 18.29, "segmentation": 37.65}}
TASK_TITLES = {"hed": "HED", "lineart": "LineArt", "depth": "Depth", "segmentation": "Seg."}


# --- files -----------------------------------------------------------------------------------------
def image_path(output_dir: str, index: int, seed: int) -> str:
    """Where the image of condition `index` and `seed` is saved: `output_dir/images/{index:06d}_{seed}.png`."""
    return os.path.join(output_dir, IMAGES_SUBDIR, f"{int(index):06d}_{int(seed)}.png")


def missing_seeds(output_dir: str, index: int, seeds: Sequence[int]) -> List[int]:
    """The seeds of condition `index` whose image is not saved yet."""
    return [s for s in seeds if not os.path.isfile(image_path(output_dir, index, s))]


def save_image_atomic(image, path: str):
    """Save a PIL image through a temporary file and `os.replace`, so that a killed run leaves no half file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)


IMAGES_RECORD = "generation.json"


def images_record(dataset, num_inference_steps: int, guidance_scale: float, negative_prompt: Optional[str],
                  resolution: Optional[int], with_control: bool = True) -> Dict:
    """What `generate_images` makes a folder's images with: the generation settings and, where the dataset names
    them (`dataset.fingerprint`, e.g. a ShapesWorld eval set's first scene), the conditions. Not which model made
    them: each ControlNet gets its own folder."""
    return {"conditions": getattr(dataset, "fingerprint", None), "num_inference_steps": int(num_inference_steps),
            "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt,
            "resolution": None if resolution is None else int(resolution), "with_control": bool(with_control)}


def check_images_record(output_dir: str, record: Dict, write: bool = True) -> None:
    """
    Saved images are named by the condition's position in the dataset and the seed (`image_path`), and a run that
    finds them makes only the missing ones, so a folder serves only the conditions and settings its images were
    made with. The first call writes `record` (JSON values) to `output_dir/generation.json` (`write=False`: only
    compares, for a caller that scores without generating); a later call with another record raises `DataError`
    naming what differs, before any image is made. A folder of images from before records were kept has none: it
    is taken as it is, and gets this record.
    """
    path = os.path.join(output_dir, IMAGES_RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for key in sorted(set(old) | set(record)):
            if old.get(key) != record.get(key):
                raise DataError(f"{output_dir} holds images made with {key} = {old.get(key)!r}, not {record.get(key)!r}: "
                                "remove that folder to make them again, or write to another folder.")
        return
    if not write:
        return
    os.makedirs(output_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=f".{IMAGES_RECORD}.")  # several processes may write it at once
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_image01(path: str) -> torch.Tensor:
    """A saved image as `(3, H, W)` float in `[0, 1]`."""

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def tensor_to_pil(x: torch.Tensor):
    """`(C, H, W)` in `[0, 1]` -> PIL (L for one channel, RGB for three)."""

    arr = (x.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], "L")
    return Image.fromarray(arr.transpose(1, 2, 0), "RGB")


# --- data ------------------------------------------------------------------------------------------
@dataclass
class EvalSample:
    index: int
    caption: str
    image: torch.Tensor  # (3, R, R) in [0, 1]: the real image (FID)
    control: torch.Tensor  # (3, R, R) in [0, 1]: the ControlNet input
    control_classes: Optional[torch.Tensor] = None  # (R, R) segmentation


class EvalDataset:
    """Indexable evaluation conditions; `dataset[i]` -> `EvalSample` (decoded and transformed on access)."""

    def __init__(self, raw, transform):
        self.raw = raw
        self.transform = transform

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, index: int) -> EvalSample:
        example = self.raw[int(index)]
        out = self.transform(example, int(index))
        return EvalSample(
            index=int(index),
            caption=self.transform.caption(example, int(index)),
            image=(out["pixel_values"] + 1.0) / 2.0,
            control=out["conditioning_pixel_values"],
            control_classes=out.get("control_classes"),
        )


def annotator_from_evaluator(evaluator: Callable, device=None) -> Callable:
    """PIL image -> PIL control (grey RGB) from an edge evaluator (`(B, 3, H, W)` -> `(B, 1, H, W)` in `[0, 1]`)."""

    def annotate(image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = evaluator(x.to(device) if device is not None else x)
        y = y.float().cpu()
        if y.ndim == 3:
            y = y[:, None]
        return tensor_to_pil(y[0, :1].clamp(0, 1)).convert("RGB")

    return annotate


def load_eval_dataset(args, task, annotator: Optional[Callable] = None) -> EvalDataset:
    """
    The evaluation conditions of `task` (reusing `data.py`).

    `args` fields read: `eval_data_dir` (a folder with `metadata.jsonl`) or `dataset_name` (+ `dataset_config_name`,
    `dataset_split`; default: the task's evaluation set `EVAL_DATASETS`), `image_column`, `caption_column`,
    `conditioning_image_column`, `num_samples`, `resolution`, `cache_dir`. `annotator` (PIL -> PIL) computes
    HED/LineArt controls when the data has no control column.
    """

    default_name, default_split = EVAL_DATASETS[task.name]
    name = getattr(args, "dataset_name", None) or default_name
    split = getattr(args, "dataset_split", None) or (default_split if name == default_name else "train")
    config = DataConfig(
        resolution=args.resolution, train_data_dir=getattr(args, "eval_data_dir", None), dataset_name=name,
        dataset_config_name=getattr(args, "dataset_config_name", None), split=split,
        image_column=getattr(args, "image_column", None), caption_column=getattr(args, "caption_column", None),
        conditioning_image_column=getattr(args, "conditioning_image_column", None),
        max_samples=getattr(args, "num_samples", None), cache_dir=getattr(args, "cache_dir", None),
    )
    raw = load_train_dataset(config, task)
    if len(raw) == 0:
        raise DataError("The evaluation dataset is empty.")
    columns = resolve_columns(_column_names(raw), task, config)
    if columns.compute_control and annotator is None:
        raise DataError(
            f"The evaluation data has no '{task.name}' control column; pass the annotator (the task's evaluator) "
            "to compute the controls, or --conditioning_image_column NAME."
        )
    transform = ExampleTransform(
        task, args.resolution, None, columns, base_dir=getattr(args, "eval_data_dir", None), annotator=annotator
    )
    return EvalDataset(raw, transform)


# --- generation ------------------------------------------------------------------------------------
def load_generation_pipeline(
    pretrained_model_name_or_path: str,
    controlnet_model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: Optional[str] = None,
):
    """
    `StableDiffusionControlNetPipeline` (no safety checker) with `UniPCMultistepScheduler`, the paper's sampler.
    The ControlNet comes from `controlnet_model_name_or_path` or, if None, the pipeline's own `controlnet` folder.
    """

    check_model_available(pretrained_model_name_or_path, "--pretrained_model_name_or_path", revision=revision)
    kwargs = dict(revision=revision, variant=variant, dtype=torch_dtype, cache_dir=cache_dir)
    if controlnet_model_name_or_path is not None:
        check_model_available(controlnet_model_name_or_path, "--controlnet_model_name_or_path")
        kwargs["controlnet"] = ControlNetModel.from_pretrained(controlnet_model_name_or_path, dtype=torch_dtype, cache_dir=cache_dir)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False, **kwargs
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class GenerationStats:
    generated: int = 0
    skipped: int = 0

    def to_dict(self):
        return {"generated": self.generated, "skipped": self.skipped}


def generate_images(
    pipe,
    dataset,
    indices: Iterable[int],
    output_dir: str,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    negative_prompt: Optional[str] = DEFAULT_NEGATIVE_PROMPT,
    resolution: Optional[int] = None,
    progress: bool = True,
    desc: str = "generating",
    with_control: bool = True,
    conditions_per_call: int = 1,
) -> GenerationStats:
    """
    Generate one image per seed for every condition in `indices` and save it (`image_path`).

    The seeds of one condition go through the pipeline as one batch, each with its own CPU generator, so the
    image of (condition, seed) is the same whether it is made alone or with the others: a resumed run that
    makes only the missing seeds gets the images an uninterrupted run would.

    Args:
        pipe: a `StableDiffusionControlNetPipeline` (or anything with its call signature).
        dataset: `dataset[i]` -> `EvalSample` (read only for conditions with missing images).
        indices: the conditions of this process.
        seeds, num_inference_steps, guidance_scale, negative_prompt: the protocol (docs/method.md, "Evaluation").
        resolution: height and width (default: the control's size).
        with_control: pass the condition's control as `image` (a ControlNet pipeline); False for a plain
            text-to-image pipeline (`StableDiffusionPipeline`), the no-control reference of a fidelity scale.
        conditions_per_call: conditions whose images go through the pipeline in one call (a larger batch: much
            faster for small models). Every image keeps its own seeded generator, so it is the same image up to
            float rounding of the batched kernels, whatever the grouping.

    Returns:
        `GenerationStats` (images generated / already there).
    """

    if conditions_per_call < 1:
        raise ValueError(f"conditions_per_call must be >= 1, got {conditions_per_call}.")
    stats = GenerationStats()
    indices = list(indices)
    check_images_record(output_dir, images_record(dataset, num_inference_steps, guidance_scale, negative_prompt, resolution,
                                                  with_control))
    group = []  # (index, sample, missing seeds) of the conditions that go through the pipeline together

    def flush():
        if not group:
            return
        jobs = [(index, sample, seed) for index, sample, todo in group for seed in todo]
        size = resolution or group[0][1].control.shape[-1]
        control = {"image": torch.stack([sample.control.float() for _, sample, _ in jobs])} if with_control else {}
        images = pipe(
            prompt=[sample.caption for _, sample, _ in jobs],
            negative_prompt=[negative_prompt] * len(jobs) if negative_prompt is not None else None,
            **control,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for _, _, seed in jobs],
            output_type="pil",
        ).images
        if len(images) != len(jobs):
            raise RuntimeError(f"The pipeline returned {len(images)} images for {len(jobs)} (condition, seed) pairs.")
        for (index, _, seed), image in zip(jobs, images):
            save_image_atomic(image, image_path(output_dir, index, seed))
        stats.generated += len(jobs)
        group.clear()

    for index in tqdm(indices, desc=desc, disable=not progress):
        todo = missing_seeds(output_dir, index, seeds)
        stats.skipped += len(seeds) - len(todo)
        if not todo:
            continue
        sample = dataset[index]
        if group and (len(group) >= conditions_per_call or sample.control.shape != group[0][1].control.shape):
            flush()
        group.append((index, sample, todo))
    flush()
    return stats


# --- evaluator models ------------------------------------------------------------------------------
def _auto_image_processor(path: str):

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):  # a folder with only the model (e.g. a tiny test model)
        return None


class DepthEvaluator(nn.Module):
    """
    DPT depth estimation for evaluation (DPT-Large in the paper): images `(B, 3, H, W)` in `[0, 1]` -> relative
    inverse depth `(B, h, w)`. Inputs go through the model's own image processor (8-bit images, as the released
    evaluation feeds it PIL images); without one, they are resized to `config.image_size` and normalised with
    mean = std = 0.5 (DPT's processor defaults).
    """

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, option: str = "--depth_model_name_or_path") -> "DepthEvaluator":
        check_model_available(name_or_path, option)
        return cls(DPTForDepthEstimation.from_pretrained(name_or_path), _auto_image_processor(name_or_path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.processor is not None:
            inputs = self.processor(images=list(to_uint8(images).cpu()), return_tensors="pt")
            pixel_values = inputs["pixel_values"]
        else:
            size = getattr(self.model.config, "image_size", 384)
            x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
            pixel_values = (x - 0.5) / 0.5
        return self.model(pixel_values=pixel_values.to(device)).predicted_depth.float()


UNIVERSAL_SEGMENTATION_TYPES = ("mask2former", "maskformer", "oneformer")


class SegmentationEvaluator(nn.Module):
    """
    Semantic segmentation for evaluation: images `(B, 3, H, W)` in `[0, 1]` -> class maps `(B, H', W')` at
    `target_size` (default: the input's size).

    Mask2Former (the paper's evaluator) and other universal-segmentation models go through their image
    processor's `post_process_semantic_segmentation`; plain semantic-segmentation models (UperNet, SegFormer)
    through the same method when they have a processor, else their logits are upsampled and arg-maxed.
    """

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.num_classes = int(model.config.num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, option: str = "--seg_model_name_or_path") -> "SegmentationEvaluator":
        check_model_available(name_or_path, option)
        config = AutoConfig.from_pretrained(name_or_path)
        universal = config.model_type in UNIVERSAL_SEGMENTATION_TYPES
        auto = AutoModelForUniversalSegmentation if universal else AutoModelForSemanticSegmentation
        model = auto.from_pretrained(name_or_path)
        processor = _auto_image_processor(name_or_path)
        if universal and processor is None:
            raise FileNotFoundError(
                f"{name_or_path} ({option}) has no preprocessor_config.json: a {config.model_type} evaluator needs "
                "its image processor (save it next to the model with processor.save_pretrained)."
            )
        return cls(model, processor)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, target_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        size = tuple(target_size or images.shape[-2:])
        if self.processor is not None:
            inputs = self.processor(images=list(to_uint8(images).cpu()), return_tensors="pt")
            outputs = self.model(pixel_values=inputs["pixel_values"].to(device))
            maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[size] * images.shape[0])
            return torch.stack([m.long().cpu() for m in maps])

        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((images.float().cpu() - mean) / std).to(device)
        logits = self.model(pixel_values=x).logits
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(1).cpu()


def load_control_evaluator(task, name_or_path: Optional[str] = None, filename: Optional[str] = None,
                           device=None, option: Optional[str] = None) -> nn.Module:
    """
    The model that reads the control back from generated images (docs/method.md, "Evaluation").

    Args:
        task: a `Task`.
        name_or_path: Hub id or local path; default `DEFAULT_EVAL_MODELS[task]`.
        filename: HED/LineArt weights file (default the task's `reward_model_file`).

    Returns:
        an `nn.Module`: HED/LineArt `(B, 3, H, W)` -> `(B, 1, H, W)` in `[0, 1]` (the annotator, in the control's
        polarity); depth -> `(B, h, w)`; segmentation -> class maps `(B, H, W)` (`SegmentationEvaluator`).
    """
    name_or_path = name_or_path or DEFAULT_EVAL_MODELS[task.name]
    if task.name in ("hed", "lineart"):

        model = load_reward_model(task, name_or_path, filename=filename, device=device,
                                  option=option or "--control_model_name_or_path")
    elif task.name == "depth":
        model = DepthEvaluator.from_pretrained(name_or_path, option=option or "--depth_model_name_or_path")
    else:
        model = SegmentationEvaluator.from_pretrained(name_or_path, option=option or "--seg_model_name_or_path")
        if task.num_classes and model.num_classes != task.num_classes:
            raise ValueError(
                f"{name_or_path} predicts {model.num_classes} classes; the segmentation task has {task.num_classes} "
                "(ADE20K): pass an ADE20K model."
            )
    return model.to(device) if device is not None else model


# --- metrics over the saved images -----------------------------------------------------------------
@torch.no_grad()
def compute_metrics(
    task,
    dataset,
    indices: Sequence[int],
    output_dir: str,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    control_evaluator: Optional[Callable] = None,
    fid=None,
    clip_score=None,
    device=None,
    progress: bool = True,
    fidelity: Optional[ControlFidelity] = None,
) -> Dict:
    """
    Control fidelity, FID and CLIP score of the saved images of `indices` x `seeds`.

    Args:
        control_evaluator: from `load_control_evaluator` (None: no control metric).
        fid: a torchmetrics FID (`metrics.build_fid`); real images are the conditions' images at the
            generation resolution, fake ones all generated images.
        clip_score: a torchmetrics CLIPScore (`metrics.build_clip_score`), images against their captions.
        fidelity: the `metrics.ControlFidelity` to accumulate into (default: a new one); pass your own to read its
            per-image values afterwards (e.g. for a bootstrap over conditions).

    Returns:
        a dict with the control metrics (`ssim`, `ms_ssim`, `rmse` or `miou`, with `*_std`), `fid`, `clip_score`,
        `num_conditions`, `num_images`.
    """

    if fidelity is None:
        fidelity = ControlFidelity(task.name, num_classes=getattr(control_evaluator, "num_classes", None) or task.num_classes)
    if device is not None:  # metric states (and CLIP, FID's network) live where the images are sent
        fid = fid.to(device) if fid is not None else None
        clip_score = clip_score.to(device) if clip_score is not None else None
    for index in tqdm(list(indices), desc="metrics", disable=not progress):
        paths = [image_path(output_dir, index, s) for s in seeds]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} generated images are missing, e.g. {missing[0]}: generate them first.")
        sample = dataset[index]
        images = torch.stack([load_image01(p) for p in paths])
        if control_evaluator is not None:
            x = images.to(device) if device is not None else images
            control = sample.control[None].expand(len(paths), -1, -1, -1)
            if task.is_segmentation:
                prediction = control_evaluator(x, target_size=tuple(sample.control.shape[-2:]))
                classes = sample.control_classes[None].expand(len(paths), -1, -1)
                fidelity.update(prediction, control_classes=classes)
            else:
                fidelity.update(control_evaluator(x).float().cpu(), control)
        if fid is not None:
            real = F.interpolate(sample.image[None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            fid.update(real.clamp(0, 1).to(fid.device), real=True)
            fid.update(images.to(fid.device), real=False)
        if clip_score is not None:
            clip_score.update(to_uint8(images).to(clip_score.device), [sample.caption] * len(paths))
    results = fidelity.compute() if control_evaluator is not None else {}
    results["num_conditions"] = len(list(indices))
    results["num_images"] = len(list(indices)) * len(seeds)
    results["fid"] = None
    if fid is not None:
        if int(fid.real_features_num_samples) < 2:

            warnings.warn("FID needs at least 2 conditions (real images): not computed.")
        else:
            results["fid"] = float(fid.compute())
    results["clip_score"] = float(clip_score.compute()) if clip_score is not None else None
    return results


# --- probe error per timestep bucket (the paper's Fig. 2 for our model) ----------------------------
@torch.no_grad()
def probe_bucket_errors(task, pipe, probe, dataset, indices: Sequence[int], batch_size: int = 4,
                        num_buckets: int = 10, seed: int = 0, use_controlnet: bool = True, device=None):
    """
    The probe's error against the control in every timestep bucket, on the evaluation conditions
    (`probe_eval.evaluate_probe`: each sample noised once per bucket). The UNet runs with the pipeline's
    ControlNet (the model under evaluation) unless `use_controlnet=False`.

    Returns:
        `probe_eval.BucketErrors` (`.to_dict()`, `.to_markdown()`).
    """

    device = device or pipe.unet.device
    dtype = pipe.unet.dtype
    indices = list(indices)

    def batches():
        for start in range(0, len(indices), batch_size):
            samples = [dataset[i] for i in indices[start : start + batch_size]]
            pixels = torch.stack([s.image for s in samples]).to(device, dtype) * 2.0 - 1.0
            ids = pipe.tokenizer(
                [s.caption for s in samples], max_length=pipe.tokenizer.model_max_length, padding="max_length",
                truncation=True, return_tensors="pt",
            ).input_ids.to(device)
            batch = {
                "latents": encode_images(pipe.vae, pixels),
                "encoder_hidden_states": pipe.text_encoder(ids)[0],
                "control": torch.stack([s.control for s in samples]).to(device, dtype),
            }
            if task.is_segmentation:
                batch["control_classes"] = torch.stack([s.control_classes for s in samples]).to(device)
            yield batch

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return evaluate_probe(
        task=task, probe=probe.to(device), unet=pipe.unet, noise_scheduler=scheduler, batches=batches(),
        controlnet=pipe.controlnet if use_controlnet else None, num_buckets=num_buckets, seed=seed,
        weight_dtype=dtype,
    )


# --- reports ---------------------------------------------------------------------------------------
def t2i_model_label(name_or_path: str) -> str:
    """A short name for the text-to-image model: "SD1.5" for Stable Diffusion 1.5, else the folder/repo name."""
    name = str(name_or_path).rstrip("/").lower()
    if "stable-diffusion-v1-5" in name or "sd15" in name or "sd-1.5" in name:
        return "SD1.5"
    return os.path.basename(str(name_or_path).rstrip("/")) or str(name_or_path)


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def control_metric_value(task_name: str, metrics: Dict) -> Optional[float]:
    """The task's Table-1 number from a metrics dict: SSIM, RMSE, or mIoU in percent."""
    key = CONTROL_METRICS[task_name][0]
    value = metrics.get(key)
    if value is None:
        return None
    return 100.0 * value if key == "miou" else value


def table1_markdown(results: Sequence[Dict], include_paper: bool = False) -> str:
    """
    A markdown table in the layout of the paper's Table 1: one row per (method, T2I model), one column per task's
    control metric (HED/LineArt SSIM, depth RMSE, segmentation mIoU in %), then FID per task and CLIP score per task.

    Args:
        results: dicts with `method`, `t2i_model`, `task` and `metrics` (as `write_results` stores them).
        include_paper: add the paper's rows (ControlNet, ControlNet++, InnerControl on SD1.5) for these tasks.
    """
    tasks = [t for t in CONTROL_METRICS if any(r["task"] == t for r in results)]
    rows: Dict[Tuple[str, str], Dict[str, Dict]] = {}
    if include_paper:
        for method, values in PAPER_TABLE1.items():
            row = rows.setdefault((f"{method} (paper)", "SD1.5"), {})
            for t in tasks:
                row[t] = {"control": values.get(t), "fid": PAPER_FID.get(method, {}).get(t), "clip": None}
    for r in results:
        m = r.get("metrics", {})
        rows.setdefault((r["method"], r.get("t2i_model", "-")), {})[r["task"]] = {
            "control": control_metric_value(r["task"], m), "fid": m.get("fid"), "clip": m.get("clip_score"),
        }
    header = ["Method", "T2I Model"]
    for t in tasks:
        _, name, higher = CONTROL_METRICS[t]
        header.append(f"{TASK_TITLES[t]} {name}{' (%)' if t == 'segmentation' else ''} {'↑' if higher else '↓'}")
    header += [f"{TASK_TITLES[t]} FID ↓" for t in tasks] + [f"{TASK_TITLES[t]} CLIP ↑" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, t2i), cells in rows.items():
        values = [method, t2i]
        values += [_fmt(cells.get(t, {}).get("control"), 3 if t in ("hed", "lineart") else 2) for t in tasks]
        values += [_fmt(cells.get(t, {}).get("fid"), 2) for t in tasks]
        values += [_fmt(cells.get(t, {}).get("clip"), 2) for t in tasks]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: Dict, output_dir: str, include_paper: bool = True, probe_markdown: Optional[str] = None):
    """
    Write `output_dir/results.json` (the whole `result` dict) and `output_dir/results.md` (Table-1 layout, plus
    the MS-SSIM and the probe's per-bucket error when present). Returns the two paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    md = [f"# Evaluation: {result['method']} on {result['task']}\n", table1_markdown([result], include_paper=include_paper)]
    m = result.get("metrics", {})
    if m.get("ms_ssim") is not None:
        md.append(f"\nMS-SSIM (the released code's edge metric): {m['ms_ssim']:.4f}\n")
    proto = result.get("protocol", {})
    if proto:
        md.append(
            "\nProtocol: " + ", ".join(f"{k}={v}" for k, v in proto.items())
            + f"; {m.get('num_conditions', '?')} conditions, {m.get('num_images', '?')} images.\n"
        )
    if probe_markdown:
        md.append("\n## Probe error per timestep bucket\n\n" + probe_markdown + "\n")
    md_path = os.path.join(output_dir, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("".join(md))
    return json_path, md_path
