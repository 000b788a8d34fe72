# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The ADE20K colour palette of ControlNet's segmentation controls, and the maps between colours and classes.

ControlNet v1.1 (`control_v11p_sd15_seg`) is conditioned on colour-coded ADE20K maps: class `k` (0..149,
in the order of the 150 SceneParse150 classes: wall, building, sky, ...) painted with `palette[k]`. Its
annotator (UniFormer through mmsegmentation's `show_result`) and the ADE20K-based datasets
(`limingcv/Captioned_ADE20K`) use mmsegmentation's ADE20K palette in RGB order. The segmentation reward
and alignment losses need class indices, so the control is mapped back to classes by the nearest palette
colour (docs/method.md, "Per-task defaults").

Two facts of that palette matter here:
- It has 150 rows but only 149 distinct colours: class 6 (road) and class 48 (skyscraper) are both
  (140, 140, 140). A pixel of that colour maps to class 6, the first of the two (`DUPLICATE_CLASSES`).
- ADE20K's "other" label (0 in the raw annotations, dropped by mmsegmentation's `reduce_zero_label`) is
  not one of the 150 classes; maps made from the ground truth paint it black. Black pixels map to
  `ignore_index` (see `control_to_classes(background_color=...)`), which the losses skip.

controlnet_aux has the same table (`controlnet_aux.util.ade_palette()`; the tests check that the two agree),
but importing it imports every controlnet_aux detector (timm, cv2, ...; about 3 s) and the segmentation task
needs nothing else from controlnet_aux, so the table is written out here (transformers' ADE20K checkpoints
carry class names but no colours).
"""

from typing import Optional, Sequence, Union

import numpy as np
import torch

IGNORE_INDEX = 255

# The 150 RGB colours, class k on row k. Source: mmsegmentation, `mmseg/datasets/ade.py`
# (ADE20KDataset.METAINFO["palette"]) and `mmseg/core/evaluation/class_names.py` (`ade_palette()`), the
# copy vendored by ControlNet (`annotator/uniformer`) whose segmentor draws the controls.
_ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

NUM_ADE20K_CLASSES = 150
# Classes that share a colour with an earlier class; a pixel of that colour maps to the earlier one.
DUPLICATE_CLASSES = {48: 6}  # skyscraper -> road, both (140, 140, 140)

PaletteLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[int]]]


def ade20k_palette() -> np.ndarray:
    """The ADE20K palette of ControlNet segmentation controls: `(150, 3)` uint8 RGB, class `k` on row `k`."""
    return np.array(_ADE20K_PALETTE, dtype=np.uint8)


def _palette_tensor(palette: Optional[PaletteLike], device) -> torch.Tensor:
    table = ade20k_palette() if palette is None else palette
    table = torch.as_tensor(np.asarray(table), device=device).to(torch.float32)
    if table.ndim != 2 or table.shape[1] != 3 or table.shape[0] == 0:
        raise ValueError(f"A palette is a (K, 3) table of RGB colours in 0..255; got shape {tuple(table.shape)}.")
    return table


def _control_to_tensor(control) -> torch.Tensor:
    """`(B, 3, H, W)` or `(3, H, W)` floats in 0..255 from a [0, 1] tensor (uint8: 0..255), a PIL image or HWC array."""
    if not isinstance(control, torch.Tensor):
        array = np.asarray(control.convert("RGB") if hasattr(control, "convert") else control)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"A control array must be (H, W, 3) RGB; got shape {array.shape}.")
        return torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)
    if control.dtype == torch.uint8:
        return control.to(torch.float32)
    if not control.is_floating_point():
        raise ValueError(f"A control tensor must be float in [0, 1] or uint8 in 0..255; got {control.dtype}.")
    return control.detach().to(torch.float32) * 255.0


def control_to_classes(
    control,
    palette: Optional[PaletteLike] = None,
    ignore_index: int = IGNORE_INDEX,
    max_distance: Optional[float] = None,
    background_color: Optional[Sequence[int]] = (0, 0, 0),
    chunk_size: int = 65536,
) -> torch.LongTensor:
    """
    Map a colour-coded segmentation control to class indices by the nearest palette colour.

    Args:
        control: `(B, 3, H, W)` or `(3, H, W)` tensor, float in `[0, 1]` (uint8 tensors are read as
            0..255), or a PIL image / `(H, W, 3)` uint8 array.
        palette: `(K, 3)` RGB colours in 0..255 (default: `ade20k_palette()`).
        ignore_index: the class given to background pixels and to pixels farther than `max_distance`.
        max_distance: if set, pixels whose nearest palette colour is farther than this (Euclidean distance
            in 0..255 RGB units) get `ignore_index`. `None` keeps every pixel.
        background_color: the colour of unlabelled pixels (black in controls made from ADE20K annotations).
            It competes with the palette colours as one more candidate: pixels nearer to it than to any
            class colour get `ignore_index`. `None` assigns every pixel to a class.
        chunk_size: pixels compared with the palette at once (bounds memory to about `chunk_size * K * 12`
            bytes; a 512 x 512 control needs 4 chunks of the default size).

    Returns:
        `torch.LongTensor` `(B, H, W)` (or `(H, W)` for one control) on the control's device. Ties (the
        duplicated ADE20K colour) go to the smaller class index.
    """
    x = _control_to_tensor(control)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"A segmentation control must be (B, 3, H, W) or (3, H, W) RGB; got shape {tuple(x.shape)}. "
            "Convert grey or RGBA control images to RGB first."
        )
    table = _palette_tensor(palette, x.device)
    num_classes = table.shape[0]
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class of the palette (K={num_classes}); use e.g. 255.")
    labels = torch.arange(num_classes, device=x.device)
    if background_color is not None:
        background = torch.as_tensor(background_color, dtype=torch.float32, device=x.device).view(1, 3)
        table = torch.cat([table, background])
        labels = torch.cat([labels, torch.tensor([ignore_index], device=x.device)])

    b, _, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    out = torch.empty(pixels.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, pixels.shape[0], chunk_size):
        chunk = pixels[start:start + chunk_size]
        # Exact squared distances (integers for integer colours), so that exact palette colours never tie
        # with a wrong class through rounding; the (chunk, K, 3) difference is what chunking bounds.
        d2 = ((chunk[:, None, :] - table[None, :, :]) ** 2).sum(-1)
        best, index = d2.min(1)  # torch returns the first index of equal minima
        result = labels[index]
        if max_distance is not None:
            result = torch.where(best > float(max_distance) ** 2, torch.full_like(result, ignore_index), result)
        out[start:start + chunk_size] = result
    out = out.view(b, h, w)
    return out[0] if single else out


def classes_to_control(
    classes, palette: Optional[PaletteLike] = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """
    Paint class indices with the palette: the control image ControlNet expects.

    Args:
        classes: integer tensor `(B, H, W)` or `(H, W)` of class indices in `[0, K)`, or `ignore_index`.
        palette: `(K, 3)` RGB colours in 0..255 (default: `ade20k_palette()`).
        ignore_index: painted black.

    Returns:
        float tensor `(B, 3, H, W)` (or `(3, H, W)`) in `[0, 1]` on the classes' device.
    """
    classes = torch.as_tensor(classes)
    if classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(f"Class maps must be integer tensors; got {classes.dtype}.")
    if classes.ndim not in (2, 3):
        raise ValueError(f"Class maps must be (B, H, W) or (H, W); got shape {tuple(classes.shape)}.")
    table = _palette_tensor(palette, classes.device) / 255.0
    num_classes = table.shape[0]
    classes = classes.long()
    ignored = classes == ignore_index
    bad = (~ignored) & ((classes < 0) | (classes >= num_classes))
    if bad.any():
        values = sorted(set(classes[bad].unique().tolist()))[:10]
        raise ValueError(
            f"Class indices {values} are outside [0, {num_classes}) and are not ignore_index ({ignore_index})."
        )
    table = torch.cat([table, torch.zeros(1, 3, device=classes.device)])  # row K: black for ignored pixels
    index = torch.where(ignored, torch.full_like(classes, num_classes), classes)
    control = table[index]  # (..., H, W, 3)
    return control.movedim(-1, -3).contiguous()
