# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The metrics of the paper's Table 1 (docs/method.md, "Evaluation"), over maintained libraries.

Control fidelity, between what an evaluator model reads from a generated image and the control:
- HED / LineArt: SSIM and MS-SSIM (torchmetrics) between annotator(generated) and the control, both
  one-channel maps in `[0, 1]` in the control's polarity;
- depth: RMSE of 0..255 depth maps (`depth_rmse`): DPT-Large's prediction resized to the control's size,
  both maps divided by their own maximum and scaled to 0..255;
- segmentation: mIoU (torchmetrics `MulticlassJaccardIndex`, `ignore_index=255`, accumulated over the whole
  evaluation set; classes absent from both prediction and target are left out of the mean).
Image quality: FID (torchmetrics `FrechetInceptionDistance`, InceptionV3 of torch-fidelity by default, any
feature network on request) and CLIP score (torchmetrics `CLIPScore`, ViT-B/16 by default).

No SSIM, FID or IoU is computed here by hand: these are thin adapters that feed torchmetrics the maps in the
protocol's normalisation. Every evaluator model can be a local path, so that tests run offline.
"""

import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

from .hub_utils import OfflineModelError, check_model_available, is_offline

# torchmetrics is imported inside the functions that use it: an optional dependency (the `eval` extra).

IGNORE_INDEX = 255
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # torchmetrics' (and the original paper's) 5 scales

# The control metric of every task: (key in the results, name in the table, higher is better)
CONTROL_METRICS = {
    "hed": ("ssim", "SSIM", True),
    "lineart": ("ssim", "SSIM", True),
    "depth": ("rmse", "RMSE", False),
    "segmentation": ("miou", "mIoU", True),
}


# --- maps ------------------------------------------------------------------------------------------
def to_single_channel(x: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` or `(B, H, W)` -> `(B, 1, H, W)` float, averaging the channels (controls are grey RGB)."""
    x = x.float()
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"Expected maps of shape (B, C, H, W) or (B, H, W), got {tuple(x.shape)}.")
    return x.mean(1, keepdim=True)


def resize_map(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of `(B, 1, h, w)` maps to `size` (a no-op at that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def edge_maps(prediction: torch.Tensor, control: torch.Tensor):
    """The annotator's map resized to the control's size and the control, both `(B, 1, H, W)` in `[0, 1]`."""
    target = to_single_channel(control).clamp(0, 1)
    pred = resize_map(to_single_channel(prediction), target.shape[-2:]).clamp(0, 1)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"Got {pred.shape[0]} predicted maps for {target.shape[0]} controls.")
    return pred, target


# --- HED / LineArt --------------------------------------------------------------------------------
def edge_ssim(prediction: torch.Tensor, control: torch.Tensor, **kwargs) -> torch.Tensor:
    """
    Per-sample SSIM (torchmetrics, Gaussian 11x11, sigma 1.5, `data_range=1`) between the annotator's reading
    of the generated images and the controls.

    Args:
        prediction: `(B, 1, h, w)` (or `(B, C, h, w)`, `(B, h, w)`) in `[0, 1]`, in the control's polarity;
            resized (bilinear) to the control's size.
        control: `(B, C, H, W)` in `[0, 1]`; its channels are averaged.

    Returns:
        `(B,)` SSIM values (1 for identical maps).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = edge_maps(prediction, control)
    return structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none", **kwargs).reshape(-1)


def edge_ssim_deficit_by_region(prediction: torch.Tensor, control: torch.Tensor, near_px: int = 3,
                                threshold: float = 0.05) -> torch.Tensor:
    """
    Where an edge map's SSIM is lost: `1 - edge_ssim` split between the pixels near the control's edges (within
    `near_px` pixels of a control value above `threshold`, a square neighbourhood) and the rest (the background,
    where the control has no edge at all).

    Both parts are sums of the SSIM map's deficit `1 - ssim(x, y)` over their pixels divided by the number of all
    pixels, so that `near + background == 1 - edge_ssim` per sample: a model's SSIM shortfall against another's is
    the sum of the two parts' shortfalls. Background deficit on a generated image is the evaluator reading edges
    where the control has none (e.g. a background texture the model drew unevenly).

    Returns:
        `(B, 2)`: columns near the edges, background.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = edge_maps(prediction, control)
    _, ssim_map = structural_similarity_index_measure(pred.double(), target.double(), data_range=1.0,
                                                      reduction="none", return_full_image=True)
    deficit = 1.0 - ssim_map[:, 0]
    near = F.max_pool2d((target > threshold).double(), 2 * near_px + 1, stride=1, padding=near_px)[:, 0] > 0
    pixels = deficit[0].numel()
    return torch.stack([(deficit * near).sum((1, 2)), (deficit * ~near).sum((1, 2))], 1) / pixels


def ms_ssim_min_size(kernel_size: int = 11, num_scales: int = len(MS_SSIM_BETAS)) -> int:
    """MS-SSIM needs both sides larger than this (torchmetrics: `(kernel_size - 1) * 2 ** (scales - 1)`)."""
    return (kernel_size - 1) * 2 ** (num_scales - 1)


def edge_ms_ssim(prediction: torch.Tensor, control: torch.Tensor, kernel_size: int = 11) -> Optional[torch.Tensor]:
    """
    Per-sample MS-SSIM (torchmetrics, 5 scales, `data_range=1`), the released code's edge metric.

    Returns `None` (with a warning) when the maps are too small for 5 scales (`ms_ssim_min_size()`: 160 px for
    an 11x11 window), e.g. with tiny test models; the paper's 512 px maps are fine.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    pred, target = edge_maps(prediction, control)
    need = ms_ssim_min_size(kernel_size)
    if min(target.shape[-2:]) <= need:
        warnings.warn(f"MS-SSIM needs maps larger than {need} px (got {tuple(target.shape[-2:])}): not computed.")
        return None
    values = multiscale_structural_similarity_index_measure(
        pred, target, data_range=1.0, kernel_size=kernel_size, reduction="none"
    )
    return values.reshape(-1)


# --- depth ----------------------------------------------------------------------------------------
def depth_to_0_255(depth: torch.Tensor, size=None, quantize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """
    A depth map as the protocol's 0..255 image: `(resize(depth) / max(resize(depth))) * 255` per sample.

    Args:
        depth: `(B, h, w)`, `(B, 1, h, w)` or `(B, C, h, w)` (channels averaged), any positive scale.
        size: resize (bilinear) to this `(H, W)` first; default: keep the size.
        quantize: round to integers, as when the map is stored as an 8-bit image.

    Returns:
        `(B, 1, H, W)` float maps in `[0, 255]`.
    """
    x = to_single_channel(depth)
    if size is not None:
        x = resize_map(x, size)
    peak = x.flatten(1).amax(1).clamp(min=eps).view(-1, 1, 1, 1)
    x = (x / peak).clamp(min=0.0) * 255.0
    return x.round() if quantize else x


def depth_rmse(prediction: torch.Tensor, control: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """
    Per-sample RMSE of max-normalised 0..255 depth maps (the depth metric of Table 1):
    `sqrt(mean((D(pred) - D(control))^2))`, with `D(x) = 255 * x / max(x)` per sample (`depth_to_0_255`)
    and the prediction resized to the control's size first.

    Args:
        prediction: the evaluator's depth `(B, h, w)` or `(B, 1, h, w)` (DPT-Large: relative inverse depth).
        control: the depth control `(B, C, H, W)` in `[0, 1]` (or 0..255: only its shape relative to its
            maximum matters).
        quantize: compare 8-bit maps (integers 0..255), as the released evaluation stores them.

    Returns:
        `(B,)` RMSE values in 0..255 units (0 for identical maps).
    """
    target = depth_to_0_255(control, quantize=quantize)
    pred = depth_to_0_255(prediction, size=target.shape[-2:], quantize=quantize)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"Got {pred.shape[0]} depth predictions for {target.shape[0]} controls.")
    return ((pred - target) ** 2).flatten(1).mean(1).sqrt()


# --- segmentation ---------------------------------------------------------------------------------
def build_miou(num_classes: int, ignore_index: int = IGNORE_INDEX):
    """A torchmetrics `MulticlassJaccardIndex` that accumulates the confusion matrix over the dataset (macro mIoU)."""
    from torchmetrics.classification import MulticlassJaccardIndex

    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro")


def mean_iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
             per_class: bool = False) -> torch.Tensor:
    """
    mIoU of class maps (torchmetrics): pixels whose target is `ignore_index` are skipped, and classes absent
    from both maps are left out of the mean.

    Args:
        prediction: `(B, H, W)` class indices (or logits `(B, K, H, W)`, arg-maxed).
        target: `(B, H, W)` class indices, `ignore_index` where ignored.
        per_class: return the IoU of every class instead of the mean.
    """
    from torchmetrics.functional.classification import multiclass_jaccard_index

    if prediction.ndim == 4:
        prediction = prediction.argmax(1)
    if prediction.shape != target.shape:
        raise ValueError(f"Predicted class maps {tuple(prediction.shape)} and targets {tuple(target.shape)} differ in shape.")
    return multiclass_jaccard_index(
        prediction.long(), target.long(), num_classes=num_classes, ignore_index=ignore_index,
        average="none" if per_class else "macro",
    )


# --- one accumulator per task ---------------------------------------------------------------------
class ControlFidelity:
    """
    Running control-fidelity metric of a task over an evaluation set.

    `update(prediction, control, control_classes=None)` with the evaluator's output on a batch of generated
    images; `compute()` -> dict: `ssim`, `ms_ssim` (HED, LineArt), `rmse` (depth), `miou` (segmentation), each
    the mean over all generated images (mIoU: over the accumulated confusion matrix), plus `*_std` and
    `num_images`; HED and LineArt also `ssim_deficit_near_edges` and `ssim_deficit_background`
    (`edge_ssim_deficit_by_region`, summing to `1 - ssim`).
    """

    def __init__(self, task_name: str, num_classes: Optional[int] = None, quantize_depth: bool = True,
                 keep_confusion: bool = False):
        if task_name not in CONTROL_METRICS:
            raise ValueError(f"Unknown task {task_name!r}: choose one of {', '.join(CONTROL_METRICS)}.")
        self.task_name = task_name
        self.quantize_depth = quantize_depth
        self.values: Dict[str, List[float]] = {}
        self.num_images = 0
        self.miou = None
        # segmentation: one confusion matrix per `update` call (per condition in `compute_metrics`), for resampling
        self.confusions: Optional[List[torch.Tensor]] = [] if keep_confusion else None
        self.num_classes = num_classes
        if task_name == "segmentation":
            if not num_classes:
                raise ValueError("The segmentation metric needs num_classes (150 for ADE20K).")
            self.miou = build_miou(num_classes)

    def _add(self, key, values):
        if values is not None:
            self.values.setdefault(key, []).extend(float(v) for v in values.detach().cpu().reshape(-1))

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, control: Optional[torch.Tensor] = None,
               control_classes: Optional[torch.Tensor] = None) -> "ControlFidelity":
        """
        Args:
            prediction: HED/LineArt `(B, 1, h, w)` maps in `[0, 1]`; depth `(B, h, w)`; segmentation class
                maps `(B, H, W)` at the control's size.
            control: `(B, C, H, W)` in `[0, 1]` (regression tasks).
            control_classes: `(B, H, W)` class indices (segmentation).
        """
        prediction = prediction.detach().cpu()
        if self.task_name in ("hed", "lineart"):
            control = control.detach().cpu()
            # one SSIM map gives both the SSIM (1 - the deficits' sum) and where it is lost
            region = edge_ssim_deficit_by_region(prediction, control)
            self._add("ssim", 1.0 - region.sum(1))
            self._add("ssim_deficit_near_edges", region[:, 0])
            self._add("ssim_deficit_background", region[:, 1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._add("ms_ssim", edge_ms_ssim(prediction, control))
        elif self.task_name == "depth":
            self._add("rmse", depth_rmse(prediction, control.detach().cpu(), quantize=self.quantize_depth))
        else:
            if control_classes is None:
                raise ValueError("The segmentation metric needs control_classes (B, H, W).")
            self.miou.update(prediction.long(), control_classes.detach().cpu().long())
            if self.confusions is not None:
                from torchmetrics.functional.classification import multiclass_confusion_matrix

                self.confusions.append(multiclass_confusion_matrix(
                    prediction.long(), control_classes.detach().cpu().long(), self.num_classes, ignore_index=IGNORE_INDEX))
        self.num_images += prediction.shape[0]
        return self

    def compute(self) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {"num_images": self.num_images}
        for key, values in self.values.items():
            t = torch.tensor(values, dtype=torch.float64)
            out[key] = t.mean().item()
            out[f"{key}_std"] = t.std(unbiased=False).item()
        if self.task_name in ("hed", "lineart"):
            out.setdefault("ms_ssim", None)  # maps too small for MS-SSIM
        if self.miou is not None:
            out["miou"] = self.miou.compute().item() if self.num_images else None
        return out


# --- FID ------------------------------------------------------------------------------------------
class PretrainedImageFeatures(nn.Module):
    """
    FID features from a `transformers` vision model saved in a folder (e.g. a CLIP vision tower), for when
    InceptionV3 is not wanted or not available (tests build a tiny one). Input: `(B, 3, H, W)` in `[0, 1]`;
    output: `(B, D)` pooled (projected, for CLIP) embeddings.
    """

    def __init__(self, model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])

    @classmethod
    def from_pretrained(cls, path: str) -> "PretrainedImageFeatures":
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        try:
            processor = AutoImageProcessor.from_pretrained(path)
            mean, std = processor.image_mean, processor.image_std
        except Exception:  # no preprocessor_config.json: ImageNet statistics
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return cls(model, size, mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
        else:
            out = self.model(pixel_values=x)
        if not torch.is_tensor(out):
            pooled = getattr(out, "image_embeds", None)
            if pooled is None:
                pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out.last_hidden_state.mean(1)
        return out.flatten(1).float()


def _inception_cache_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)


def build_fid(feature_extractor: Union[None, str, nn.Module] = None, option: str = "--fid_feature_extractor"):
    """
    A torchmetrics `FrechetInceptionDistance` fed with images in `[0, 1]` (`normalize=True`).

    Args:
        feature_extractor:
            - `None` or `"inception"`: torch-fidelity's InceptionV3 (2048-d pool features), the standard FID;
              its weights are downloaded once into the torch hub cache (offline without them: `OfflineModelError`);
            - a `.pth` file: those InceptionV3 weights (`INCEPTION_WEIGHTS_FILE`), checked with
              `torch.load(weights_only=True)` before torch-fidelity loads them;
            - a folder: a `transformers` vision model (`PretrainedImageFeatures`), e.g. a CLIP;
            - an `nn.Module` mapping `(B, 3, H, W)` in `[0, 1]` to `(B, D)` features.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature_extractor, nn.Module):
        return FrechetInceptionDistance(feature=feature_extractor, normalize=True)
    if feature_extractor in (None, "inception"):
        if is_offline() and not os.path.isfile(_inception_cache_path()):
            raise OfflineModelError(
                f"FID's InceptionV3 weights ({INCEPTION_WEIGHTS_FILE}) are not in the torch hub cache "
                f"({_inception_cache_path()}) and this machine is offline (HF_HUB_OFFLINE=1): download them where "
                f"there is network, or pass the .pth file (or a local feature model folder) with {option}."
            )
        return FrechetInceptionDistance(feature=2048, normalize=True)
    path = os.path.expanduser(str(feature_extractor))
    if os.path.isfile(path):
        # torch-fidelity loads this file with weights_only=False: make sure it holds only tensors first.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{option} {path!r} is not a plain InceptionV3 state dict (weights_only load failed: {err}).") from None
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=path)
    if os.path.isdir(path):
        return FrechetInceptionDistance(feature=PretrainedImageFeatures.from_pretrained(path), normalize=True)
    raise ValueError(
        f"{option} {feature_extractor!r} is neither 'inception', an InceptionV3 .pth file nor a local model folder."
    )


# --- CLIP score -----------------------------------------------------------------------------------
class _CLIPFeatures(nn.Module):
    """
    A CLIPModel whose `get_image_features` / `get_text_features` return tensors. transformers 5 returns a
    `BaseModelOutputWithPooling` from them (projected embeddings in `pooler_output`), which torchmetrics 1.9's
    CLIPScore cannot normalise; this adapter keeps torchmetrics' computation unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def build_clip_score(model_name_or_path: str = DEFAULT_CLIP_MODEL, option: str = "--clip_model_name_or_path"):
    """
    A torchmetrics `CLIPScore` (100 x cosine of CLIP image and text embeddings) on any CLIP saved with
    `save_pretrained` (local folder or Hub id; offline Hub ids fail fast). Update it with `uint8` images
    `(B, 3, H, W)` and their captions.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    check_model_available(model_name_or_path, option)

    def load():
        return _CLIPFeatures(CLIPModel.from_pretrained(model_name_or_path)), CLIPProcessor.from_pretrained(model_name_or_path)

    return CLIPScore(model_name_or_path=load)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in `[0, 1]` -> `uint8` 0..255 (what CLIPScore's processor expects)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def miou_from_confusion(confusion: torch.Tensor) -> float:
    """
    mIoU of a confusion matrix `(K, K)` (rows: target, columns: prediction), as `MulticlassJaccardIndex(average=
    "macro")` computes it: IoU = tp / (tp + fp + fn) per class, averaged over the classes present in the target
    or the prediction. For resampling scenes (`bootstrap_closure`) from per-scene matrices.
    """
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    return (tp[present] / union[present]).mean().item() if present.any() else float("nan")


def bootstrap_closure(floor, ceiling, value, num_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                      reduce=None) -> Dict[str, float]:
    """
    A paired bootstrap of `fidelity_closure` over scenes: `(low, high)` of its `level` interval.

    Args:
        floor, ceiling, value: per-scene results of the three rows on the same scenes, `(N,)` metric values
            (averaged with `reduce=None`), or `(N, K, K)` per-scene confusion matrices with
            `reduce=miou_from_confusion` applied to their sum.
        num_resamples: bootstrap resamples (scenes drawn with replacement, the same draw for the three rows).
    """
    rows = [torch.as_tensor(x).double() for x in (floor, ceiling, value)]
    n = rows[0].shape[0]
    if n < 2 or any(r.shape[0] != n for r in rows):
        raise ValueError(f"bootstrap_closure needs the same >= 2 scenes for every row, got {[r.shape[0] for r in rows]}.")
    flat = [r.reshape(n, -1) for r in rows]  # confusion matrices flattened; `reduce` skips the classes never seen

    def stat(r, counts):  # a resample as the number of times each scene was drawn
        total = counts @ r
        return reduce(total.view(rows[0].shape[1:])) if reduce is not None else (total.sum() / n).item()

    generator = torch.Generator().manual_seed(seed)
    closures = []
    for _ in range(num_resamples):
        counts = torch.bincount(torch.randint(0, n, (n,), generator=generator), minlength=n).double()
        f, c, v = (stat(r, counts) for r in flat)
        if c != f:
            closures.append((c - v) / (c - f))
    q = torch.tensor(closures, dtype=torch.float64)
    tail = (1.0 - level) / 2
    return {"low": torch.quantile(q, tail).item(), "high": torch.quantile(q, 1 - tail).item(), "level": level,
            "num_resamples": len(closures)}


def fidelity_closure(value: float, floor: float, ceiling: float) -> float:
    """
    The share of the fidelity gap a model closes: `(ceiling - value) / (ceiling - floor)`.

    `floor` is the evaluator's score on the real images against their controls (the best reachable), `ceiling`
    its score on images of the text-to-image model alone (no control at all), `value` the model's. 1 means as
    faithful as the real images, 0 no better than no control, below 0 worse. The one formula serves both
    directions: for a metric where higher is better (SSIM, mIoU) the ceiling is the low end and numerator and
    denominator change sign together, which is the sign flip of `(value - ceiling) / (floor - ceiling)`.

    Raises:
        ValueError: floor and ceiling are equal (no gap to close), or a value is not finite.
    """
    values = (float(value), float(floor), float(ceiling))
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"fidelity_closure needs finite numbers, got value={value}, floor={floor}, ceiling={ceiling}.")
    value, floor, ceiling = values
    if ceiling == floor:
        raise ValueError(f"The floor and the ceiling are both {floor}: there is no fidelity gap to close.")
    return (ceiling - value) / (ceiling - floor)


def closure_by_region(row: Dict, floor: Dict, ceiling: Dict) -> Dict:
    """
    An edge row's closure near the control's edges and on the background, from the SSIM deficits that
    `ControlFidelity` reports (`ssim_deficit_near_edges`, `ssim_deficit_background`, summing to 1 - SSIM) for the
    row, the floor and the ceiling; and the share of the row's shortfall against the floor that lies on the
    background. A part whose floor equals its ceiling has closure None; a row with no shortfall has share None.
    """
    near, back = "ssim_deficit_near_edges", "ssim_deficit_background"
    shortfall = (row[near] - floor[near]) + (row[back] - floor[back])
    return {"near_edges": fidelity_closure(row[near], floor[near], ceiling[near]) if floor[near] != ceiling[near] else None,
            "background": fidelity_closure(row[back], floor[back], ceiling[back]) if floor[back] != ceiling[back] else None,
            "background_share": (row[back] - floor[back]) / shortfall if shortfall > 0 else None}


def closure_by_group(floor, ceiling, value, groups: Sequence, reduce=None) -> Dict:
    """
    `fidelity_closure` within each group of scenes: where a model's missing fidelity comes from.

    Args:
        floor, ceiling, value: per-scene results of the three rows on the same scenes, as for `bootstrap_closure`:
            `(N,)` metric values (a group's value is their mean), or `(N, K, K)` confusion matrices with
            `reduce=miou_from_confusion` applied to the group's sum.
        groups: `N` hashable labels, one per scene (e.g. the scene's background style).

    Returns:
        `{label: {"closure", "scenes", "floor", "ceiling", "value"}}` in the order the labels first occur; a group
        whose floor equals its ceiling has closure `None`.
    """
    rows = [torch.as_tensor(x).double() for x in (floor, ceiling, value)]
    n = rows[0].shape[0]
    if len(groups) != n or any(r.shape[0] != n for r in rows):
        raise ValueError(f"closure_by_group needs one label and one result per scene in every row, got {len(groups)} "
                         f"labels and {[r.shape[0] for r in rows]} scenes.")
    out = {}
    for label in dict.fromkeys(groups):
        mask = torch.tensor([g == label for g in groups])
        f, c, v = (reduce(r[mask].sum(0)) if reduce is not None else r[mask].mean().item() for r in rows)
        out[label] = {"closure": None if f == c else fidelity_closure(v, f, c), "scenes": int(mask.sum()),
                      "floor": f, "ceiling": c, "value": v}
    return out


def paired_closure_difference(floor, ceiling, value, reference, level: float = 0.95) -> Dict[str, float]:
    """
    How much more of the fidelity gap `value` closes than `reference` on the same scenes and noise:
    `fidelity_closure(mean(value)) - fidelity_closure(mean(reference))`, which is the mean over scenes of
    `(reference_i - value_i) / (mean(ceiling) - mean(floor))`, with the `level` t interval of that mean and the
    two-sided p-value of its one-sample t-test against 0 (the paired t-test of the per-scene values: dividing by
    the gap does not change t). Pairing removes
    what the scenes share (their difficulty, the noise), which a bootstrap of each row's closure apart keeps.

    Args:
        floor, ceiling, value, reference: `(N,)` per-scene metric values of the four rows on the same scenes
            (a metric averaged over scenes, such as SSIM or RMSE; not a mIoU, which is not a mean over scenes).

    Returns:
        `diff`, `ci_low`, `ci_high` (closure points as fractions: 0.03 = 3 points), `p`, `n`, `level`; identical
        rows give a difference of 0 with p = 1.

    Raises:
        ValueError: fewer than 2 scenes, rows of different lengths, or no gap between floor and ceiling.
    """
    from scipy import stats

    f, c, v, r = (torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in (floor, ceiling, value, reference))
    n = v.numel()
    if n < 2 or any(x.numel() != n for x in (f, c, r)):
        raise ValueError("paired_closure_difference needs the same >= 2 scenes in every row, got "
                         f"{[x.numel() for x in (f, c, v, r)]}.")
    gap = (c.mean() - f.mean()).item()
    if gap == 0:
        raise ValueError("The floor and the ceiling have the same mean: there is no fidelity gap to close.")
    per_scene = (r - v) / gap
    if not per_scene.any():  # the same images twice: no difference, and no variance for a t-test
        return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "n": n, "level": level}
    test = stats.ttest_1samp(per_scene.numpy(), 0.0)
    ci = test.confidence_interval(confidence_level=level)
    return {"diff": per_scene.mean().item(), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "p": float(test.pvalue), "n": n, "level": level}


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """
    The training step at which a learning curve first reaches `target` (values rising with training, such as a
    `fidelity_closure`), linearly interpolated between the two evaluations around the first crossing; `steps[0]`
    if the first value already reaches it; None if no value does.

    Raises:
        ValueError: the lists differ in length or are empty, or the steps do not increase.
    """
    steps, values = [float(s) for s in steps], [float(v) for v in values]
    if not steps or len(steps) != len(values):
        raise ValueError(f"steps_to_reach needs one value per step, got {len(steps)} steps and {len(values)} values.")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps_to_reach needs increasing steps, got {steps}.")
    if values[0] >= target:
        return steps[0]
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if v1 >= target:  # v0 < target <= v1
            return s0 + (target - v0) / (v1 - v0) * (s1 - s0)
    return None


def curve_level(steps: Sequence[float], values: Sequence[float], start: float) -> Dict[str, float]:
    """
    Where a learning curve levels off: the mean of its values at the evaluations from step `start` on, and their
    least-squares slope against the step (value units per step; near 0 on a level). Together they tell a curve that
    has stopped rising from one still climbing, with less noise than the last evaluation alone.

    Returns:
        `mean`, `slope`, `n` (the evaluations used), `start`.

    Raises:
        ValueError: the lists differ in length, or fewer than 2 evaluations are at or after `start`.
    """
    if len(steps) != len(values):
        raise ValueError(f"curve_level needs one value per step, got {len(steps)} steps and {len(values)} values.")
    pairs = [(float(s), float(v)) for s, v in zip(steps, values) if float(s) >= start]
    if len(pairs) < 2 or len({s for s, _ in pairs}) < 2:
        raise ValueError(f"curve_level needs at least 2 evaluated steps from step {start:g} on, got "
                         f"{[s for s, _ in pairs]}: start earlier or evaluate more often.")
    x = torch.tensor([s for s, _ in pairs], dtype=torch.float64)
    y = torch.tensor([v for _, v in pairs], dtype=torch.float64)
    dx = x - x.mean()
    slope = ((dx * (y - y.mean())).sum() / (dx * dx).sum()).item()
    return {"mean": y.mean().item(), "slope": slope, "n": len(pairs), "start": float(start)}


# --- comparing training modes over seeds ---------------------------------------------------------------
def welch_test(values, baseline, level: float = 0.95) -> Dict[str, float]:
    """
    Welch's two-sample t-test of `mean(values) - mean(baseline)` (unequal variances; one number per seed on each
    side), with its `level` confidence interval (Welch-Satterthwaite degrees of freedom), via
    `scipy.stats.ttest_ind(equal_var=False)`.

    Returns:
        `diff`, `ci_low`, `ci_high`, `t`, `df`, `p` (two-sided), `n`, `n_baseline`, `level`.

    Raises:
        ValueError: fewer than 2 values on a side (no variance to estimate).
    """
    from scipy import stats

    a = [float(v) for v in values]
    b = [float(v) for v in baseline]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_test needs at least 2 values on each side (seeds), got {len(a)} and {len(b)}.")
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence_level=level)
    return {"diff": sum(a) / len(a) - sum(b) / len(b), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "t": float(result.statistic), "df": float(result.df), "p": float(result.pvalue), "n": len(a),
            "n_baseline": len(b), "level": level}


def build_kid(feature_extractor: nn.Module, subset_size: int = 1000, subsets: int = 100):
    """
    torchmetrics' `KernelInceptionDistance` on the features of `feature_extractor` (`(B, 3, H, W)` in `[0, 1]` ->
    `(B, D)`), fed with images in `[0, 1]`. KID is unbiased at any sample size (FID is not); `compute()` returns its
    mean and standard deviation over `subsets` random subsets of `subset_size` images per side (at most the number
    of images on the smaller side).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(feature=feature_extractor, subset_size=subset_size, subsets=subsets, normalize=True)
