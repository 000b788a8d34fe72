# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Rendering of probe readouts and controls as images, each task in its own way.

- depth, HED, LineArt: the readout mapped to the control's range and polarity with the same function the
  alignment loss uses (`losses.probe_to_unit`: `tanh` -1 -> 0 (black), +1 -> 1 (white); depth max-normalised
  per sample; the released LineArt preset min-max normalised and inverted), shown in greyscale: depth as a
  near-is-bright depth map, edges as white lines on black like the ControlNet controls.
- segmentation: the arg-max class of the logits through the ADE20K palette (`palette.classes_to_control`);
  255 (ignored) is black.

`make_readout_grid` lays out one row per sample: control | readouts over time | final image, labelled with the
timesteps by `labeled_grid`, the package's one grid renderer (every grid it draws goes through it).
"""

from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from PIL import ImageDraw, ImageFont

from .losses import probe_to_unit
from .palette import classes_to_control  # lazily: only segmentation needs it
from .tasks import Task, get_task


def _as_task(task: Union[str, Task]) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return get_task(task)
    raise TypeError(f"task must be a task name or a `Task`, got {type(task).__name__}.")


def unit_to_pil(maps: torch.Tensor) -> List[PIL.Image.Image]:
    """Greyscale RGB images from one-channel maps `(B, 1, H, W)` or `(B, H, W)` in `[0, 1]` (0 -> 0, 1 -> 255)."""
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"Expected one-channel maps (B, 1, H, W), got {tuple(maps.shape)}.")
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"Expected maps of shape (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}.")
    values = (maps.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    return [PIL.Image.fromarray(v).convert("RGB") for v in values]


def colorize_classes(classes: torch.Tensor, palette=None) -> List[PIL.Image.Image]:
    """
    Colour images from class maps `(B, H, W)` (or one `(H, W)`) through `palette` (`(K, 3)` RGB in 0..255,
    ADE20K's by default), with `palette.classes_to_control`: class 255 (ignored) is black.
    """

    classes = torch.as_tensor(classes).detach().cpu()
    if classes.ndim == 2:
        classes = classes[None]
    return [to_pil(image) for image in classes_to_control(classes, palette=palette)]


def render_readout(readout: torch.Tensor, task: Union[str, Task], palette=None) -> List[PIL.Image.Image]:
    """
    Render a batch of probe readouts as images, one per sample, in the task's own way (see the module docstring).

    Args:
        readout (`torch.Tensor`): The probe's output `(B, C, h, w)`: `tanh` values for depth/HED/LineArt,
            logits `(B, K, h, w)` for segmentation (or class maps `(B, h, w)`).
        task (`str` or `Task`): `"depth"`, `"hed"`, `"lineart"`, `"segmentation"` or a `Task` (e.g. a
            `released` preset, whose normalisation is then used).
        palette (*optional*): `(K, 3)` colours for segmentation; ADE20K's by default.

    Returns:
        `List[PIL.Image.Image]`: RGB images of the readout's spatial size.
    """
    task = _as_task(task)
    readout = readout.detach()
    if task.is_segmentation:
        if readout.ndim == 4:
            readout = readout.argmax(1)
        return colorize_classes(readout, palette)
    if readout.ndim != 4:
        raise ValueError(f"A {task.name} readout is a (B, C, h, w) tensor, got {tuple(readout.shape)}.")
    return unit_to_pil(probe_to_unit(task, readout))


def to_pil(image, palette=None) -> PIL.Image.Image:
    """
    One RGB PIL image from a PIL image, a numpy array (`H, W[, C]`, uint8 or float in `[0, 1]`), a float tensor
    `([1, ]C, H, W)` in `[0, 1]`, or an integer class map `(H, W)` (through the palette).
    """
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
            image = image.permute(2, 0, 1)
    if not torch.is_tensor(image):
        raise TypeError(f"Cannot render a {type(image).__name__} as an image.")
    image = image.detach().cpu()
    if image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] in (1, 3, 4):
        image = image.float() / 255.0
    if not image.is_floating_point():
        return colorize_classes(image if image.ndim == 2 else image.squeeze(0), palette)[0]
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"Expected one image, got a batch of {image.shape[0]}.")
        image = image[0]
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    array = (image[:3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array)


def _pick(items, sample_index: int, num_samples: int):
    """The control of `sample_index` from one control, one per prompt, or one per image."""
    if isinstance(items, (list, tuple)):
        n = len(items)
        if n == 0:
            raise ValueError("control_image is an empty list.")
        if num_samples % n != 0:
            raise ValueError(f"{n} control images do not match {num_samples} generated images.")
        return items[sample_index // (num_samples // n)]
    if torch.is_tensor(items) and items.ndim == 4 and items.shape[0] > 1:
        return _pick(list(items), sample_index, num_samples)
    return items


def make_readout_grid(
    output,
    control_image,
    sample_index: int = 0,
    tile_size: Optional[Tuple[int, int]] = None,
    palette=None,
    labels: bool = True,
) -> PIL.Image.Image:
    """
    One row for one sample: the control, the readouts over time (first recorded step to last), the final image;
    over each tile its label ("control", "t = 981", ..., "image").

    Args:
        output (`ReadoutPipelineOutput`): A pipeline output with `readout_images` (`return_readouts=True`).
        control_image: The control given to the pipeline (PIL, array or tensor; a list holds one per prompt or
            per image).
        sample_index (`int`): Which generated image.
        tile_size (`(width, height)`, *optional*): Size of every tile; the final image's size by default.
            Readouts are enlarged with nearest-neighbour sampling so that their pixels stay visible.
        palette (*optional*): Colours for class-map controls; ADE20K's by default.
        labels (`bool`): Draw the column labels (default); `False` leaves the tiles alone on white.
    """
    if getattr(output, "readout_images", None) is None:
        raise ValueError("The output has no readout images: call the pipeline with return_readouts=True.")
    images = output.images
    num_samples = len(images)
    if not 0 <= sample_index < num_samples:
        raise IndexError(f"sample_index {sample_index} is out of range for {num_samples} images.")
    final = to_pil(images[sample_index])
    size = tuple(tile_size) if tile_size is not None else final.size
    tiles = [to_pil(_pick(control_image, sample_index, num_samples), palette=palette).resize(size, PIL.Image.BICUBIC)]
    tiles += [step[sample_index].resize(size, PIL.Image.NEAREST) for step in output.readout_images]
    tiles.append(final.resize(size, PIL.Image.BICUBIC))
    column_labels = None
    if labels:
        timesteps = getattr(output, "readout_timesteps", None) or [None] * len(output.readout_images)
        column_labels = ["control"] + [f"t = {int(t)}" if t is not None else f"readout {k + 1}"
                                       for k, t in enumerate(timesteps)] + ["image"]
    return labeled_grid([tiles], column_labels, tile_size=size)


def labeled_grid(
    rows: List[List[PIL.Image.Image]],
    column_labels: Optional[List[str]] = None,
    row_labels: Optional[List[str]] = None,
    tile_size: Optional[Tuple[int, int]] = None,
    font_size: int = 11,
) -> PIL.Image.Image:
    """
    Tiles in rows and columns on white, with a label above each column and left of each row.

    diffusers' `make_image_grid` has no labels, and a grid of controls, readouts and images is unreadable
    without them ("which column is t = 999?"), so this draws them with Pillow's built-in font.

    Args:
        rows: one list of PIL images per row; rows may be shorter than the longest one (left-aligned).
        column_labels: a label per column (text over the column; `\\n` breaks a line). A label wider than the tiles
            widens its own column, the tile centred under it.
        row_labels: a label per row (text left of the row).
        tile_size: `(width, height)` every tile is resized to (nearest-neighbour, so small maps stay sharp);
            default: the first tile's size.
        font_size: label size in pixels.
    """

    if not rows or not any(rows):
        raise ValueError("labeled_grid needs at least one tile.")
    cols = max(len(r) for r in rows)
    if column_labels is not None and len(column_labels) > cols:
        raise ValueError(f"{len(column_labels)} column labels for {cols} columns.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows.")
    width, height = tile_size or next(t for r in rows for t in r).size
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))

    def text_size(text: str) -> Tuple[int, int]:
        box = probe.multiline_textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    pad = 3
    top = (max(text_size(t)[1] for t in column_labels) + 2 * pad) if column_labels else 0
    left = (max(text_size(t)[0] for t in row_labels) + 2 * pad) if row_labels else 0
    # a column is as wide as its label, so a long label ("reward200_alignment") never runs into the next one
    labels = list(column_labels or []) + [""] * (cols - len(column_labels or []))
    columns = [max(width, text_size(t)[0] + pad if t else 0) for t in labels]
    starts = [left + pad + sum(columns[:j]) + j * pad for j in range(cols)]
    grid = PIL.Image.new("RGB", (starts[-1] + columns[-1] + pad, top + len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(column_labels or []):
        w, _ = text_size(text)
        draw.multiline_text((starts[j] + max(0, (columns[j] - w) // 2), pad), text, fill="black", font=font,
                            align="center")
    for i, row in enumerate(rows):
        y = top + pad + i * (height + pad)
        if row_labels:
            _, h = text_size(row_labels[i])
            draw.multiline_text((pad, y + max(0, (height - h) // 2)), row_labels[i], fill="black", font=font)
        for j, tile in enumerate(row):
            x = starts[j] + (columns[j] - width) // 2
            grid.paste(tile.convert("RGB").resize((width, height), PIL.Image.NEAREST), (x, y))
    return grid
