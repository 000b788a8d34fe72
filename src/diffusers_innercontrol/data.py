# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Training data for both stages: loading, column resolution, transforms, deterministic shuffling, collate.

Sources (`datasets` does the reading):
- a Hub dataset: `--dataset_name` (+ `--dataset_config_name`), downloaded, or streamed with `--streaming`
  (MultiGen-20M is over 1 TB);
- a local folder `--train_data_dir` with `metadata.jsonl`, read by `datasets`' `imagefolder` builder: one JSON
  object per sample, `file_name` becomes the `image` column and every `<name>_file_name` an image column `<name>`
  (diffusers' ControlNet layout: `{"file_name": "0.png", "conditioning_image_file_name": "c/0.png", "text": "a
  cat"}` gives `image`, `conditioning_image`, `text`); a control column may also hold a file name relative to
  the folder as a plain string (`{"file_name": "0.png", "text": "a cat", "hed": "hed/0.png"}`).

Columns default to the task's schema (MultiGen-20M: image/text/hed/lineart; MultiGen-20M depth:
image/text/control_depth; Captioned_ADE20K: image/prompt/control_seg). When the control column is absent
and the task's annotator can compute it (HED, LineArt), it is computed on the fly from the image.

Every example becomes:
    pixel_values               (3, R, R) float in [-1, 1]
    conditioning_pixel_values  (3, R, R) float in [0, 1]  (the ControlNet input)
    control_classes            (R, R) long, segmentation only (nearest palette colour, 255 ignored)
    input_ids                  (L,) long, the tokenised caption ('' with --proportion_empty_prompts)
    input_ids_2                (L,) long, the same caption for SDXL's second tokenizer (SDXL only)
Errors name the sample index: an unreadable image, a control with the wrong number of channels.

Shuffling is done here (`TrainDataset.set_epoch`), not by a random sampler: the order of epoch e is a
fixed permutation of (seed, e), so a resumed run sees exactly the batches an uninterrupted run would, and
accelerate's `skip_first_batches` can skip those already seen (a sequential loader is trivially
shardable across processes too).

API (stable; the scripts import it). The data are described once, by a frozen `DataConfig` built from the parsed
arguments in one place (`DataConfig.from_args`); nothing here reads an argparse namespace.
    DataConfig(resolution, train_data_dir=None, dataset_name=None, ...)  .from_args(args)  .held_out(...)
    DataColumns(image, caption, conditioning, compute_control)
    load_train_dataset(config, task) -> datasets.Dataset | datasets.IterableDataset
    resolve_columns(column_names, task, config=None) -> DataColumns
    ExampleTransform(task, resolution, tokenizer, columns, base_dir=None, proportion_empty_prompts=0.0,
                     annotator=None, seed=0)  -- callable(example, index, epoch=0) -> dict of tensors
    TrainDataset(hf_dataset, transform, seed=0, shuffle=True)  (map-style; set_epoch, index_of)
    StreamingTrainDataset(hf_iterable, transform, seed=0, shuffle_buffer_size=1000)  (iterable; set_epoch)
    build_train_dataset(config, task, tokenizer, annotator=None) -> (dataset, DataColumns)
    check_samples(dataset, n) -> None  (decode + transform the first n samples: errors before training)
    collate_fn(examples) -> batch dict
    vae_scale_factor_of(vae_config) -> int;  check_resolution(resolution, vae_scale_factor) -> resolution
    load_task_annotator(task, name_or_path=None) -> callable PIL -> PIL
    load_control_image(path_or_image, resolution, task=None) -> (1, 3, R, R) in [0, 1]  (validation)
    DataError (ValueError)
"""

import dataclasses
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .annotators import load_annotator
from .hub_utils import is_offline
from .palette import control_to_classes

# datasets (the `train` extra) and torchvision (installed with torch, not required by the package) are imported
# inside the functions that use them: optional dependencies.

CONTROL_GRAYSCALE_OK = ("hed", "lineart", "depth")  # single-channel maps are replicated to 3 channels


class DataError(ValueError):
    """Bad training data (missing columns, unreadable images, wrong channels); the message names the fix."""


@dataclass(frozen=True)
class DataColumns:
    image: str
    caption: Optional[str]  # None: no caption column (every prompt is empty)
    conditioning: Optional[str]  # None: computed on the fly by the annotator
    compute_control: bool = False


@dataclass(frozen=True)
class DataConfig:
    """
    Where the samples come from and how they are read: a local folder with `metadata.jsonl` (`train_data_dir`) or
    a Hub / local `datasets` dataset (`dataset_name`, default: the task's), its split and columns (default: the
    task's schema), the resolution, a sample limit, streaming, the share of empty prompts, the shuffling seed and
    the cache. `require_captions=False` accepts data without a caption column (the probe trainer's empty prompt).
    """

    resolution: int
    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    split: str = "train"
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    conditioning_image_column: Optional[str] = None
    require_captions: bool = True
    max_samples: Optional[int] = None
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    proportion_empty_prompts: float = 0.0
    seed: int = 0
    cache_dir: Optional[str] = None
    annotator_model_name_or_path: Optional[str] = None

    @classmethod
    def from_args(cls, args, **overrides) -> "DataConfig":
        """The one place that reads the data options of a parsed command line (`cli.add_data_args`)."""
        read = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        values = dict(
            resolution=args.resolution, train_data_dir=read("train_data_dir"), dataset_name=read("dataset_name"),
            dataset_config_name=read("dataset_config_name"), split=read("dataset_split") or "train",
            image_column=read("image_column"), caption_column=read("caption_column"),
            conditioning_image_column=read("conditioning_image_column"),
            require_captions=bool(read("use_captions", True)), max_samples=read("max_train_samples"),
            streaming=bool(read("streaming", False)), shuffle_buffer_size=read("shuffle_buffer_size", 1000) or 1000,
            proportion_empty_prompts=read("proportion_empty_prompts", 0.0) or 0.0, seed=read("seed") or 0,
            cache_dir=read("cache_dir"), annotator_model_name_or_path=read("annotator_model_name_or_path"),
        )
        values.update(overrides)
        return cls(**values)

    def held_out(self, train_data_dir: Optional[str] = None, dataset_name: Optional[str] = None,
                 split: str = "train", max_samples: Optional[int] = None) -> "DataConfig":
        """The same columns and resolution read from another source: not streamed, captions never dropped."""
        return dataclasses.replace(self, train_data_dir=train_data_dir, dataset_name=dataset_name, split=split,
                                   max_samples=max_samples, streaming=False, proportion_empty_prompts=0.0)

    @property
    def base_dir(self) -> Optional[str]:
        """The folder relative file names are read from: the local data folder, if any."""
        if self.train_data_dir:
            return self.train_data_dir
        return self.dataset_name if self.dataset_name and os.path.isdir(self.dataset_name) else None


# ------------------------------------------------------------------------------------------------ loading
def _metadata_path(train_data_dir: str) -> str:
    return os.path.join(train_data_dir, "metadata.jsonl")


def load_train_dataset(config: DataConfig, task):
    """The raw dataset (`datasets.Dataset`, or `IterableDataset` when streamed), before any transform."""
    import datasets

    split = config.split
    if config.train_data_dir:
        meta = _metadata_path(config.train_data_dir)
        if not os.path.isfile(meta):
            raise DataError(f"{config.train_data_dir!r} has no metadata.jsonl (one JSON object per sample, file names relative to it).")
        # the imagefolder builder on the metadata file alone: it resolves `file_name` / `*_file_name` to images next to
        # it without listing (and hashing) every file of the folder, which takes about a minute for 8000 scenes
        ds = datasets.load_dataset("imagefolder", data_files={"train": [meta]}, split="train", cache_dir=config.cache_dir)
    else:
        name = config.dataset_name or task.dataset_name
        try:
            ds = datasets.load_dataset(
                name, config.dataset_config_name, split=split, streaming=config.streaming, cache_dir=config.cache_dir,
            )
        except Exception as err:  # offline, unknown id, missing split

            hint = (
                " This machine is offline (HF_HUB_OFFLINE=1): download the dataset where there is network, or pass a "
                "local folder with --train_data_dir." if is_offline() and not os.path.exists(name) else ""
            )
            raise DataError(f"Could not load dataset {name!r} (--dataset_name), split {split!r}: {err}.{hint}") from None
    max_samples = config.max_samples
    if max_samples is not None:
        if isinstance(ds, datasets.IterableDataset):
            ds = ds.take(max_samples)
        else:
            ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def _column_names(ds) -> List[str]:
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    if names is None:  # a streamed dataset without features: look at the first row
        names = list(next(iter(ds)).keys())
    return list(names)


def resolve_columns(column_names: Sequence[str], task, config: Optional[DataConfig] = None) -> DataColumns:
    """Image / caption / control column names, defaulting to the task's schema. Raises `DataError` naming the columns that exist."""
    names = list(column_names)
    existing = ", ".join(repr(n) for n in names)

    def pick(option, default, fallbacks=()):
        given = getattr(config, option) if config is not None else None
        if given is not None:
            if given not in names:
                raise DataError(f"--{option} {given!r} is not a column of the dataset; its columns are: {existing}.")
            return given
        for cand in (default,) + tuple(fallbacks):
            if cand in names:
                return cand
        return None

    image = pick("image_column", task.image_column, ("file_name",))
    if image is None:
        raise DataError(
            f"The dataset has no image column {task.image_column!r}; its columns are: {existing}. "
            "Pass --image_column NAME."
        )
    caption = pick("caption_column", task.caption_column, ("text", "prompt", "caption"))
    # The probe trainer uses the empty prompt unless --use_captions: a data set without captions is fine there.
    require_caption = config.require_captions if config is not None else True
    if caption is None and require_caption:
        raise DataError(
            f"The dataset has no caption column {task.caption_column!r}; its columns are: {existing}. "
            "Pass --caption_column NAME."
        )
    conditioning = pick("conditioning_image_column", task.conditioning_column)
    compute = False
    if conditioning is None:
        if task.annotator_computes_control:
            compute = True
        else:
            raise DataError(
                f"The dataset has no control column {task.conditioning_column!r} for task '{task.name}'; its columns "
                f"are: {existing}. Pass --conditioning_image_column NAME."
            )
    return DataColumns(image=image, caption=caption, conditioning=conditioning, compute_control=compute)


def vae_scale_factor_of(vae_config) -> int:
    """The VAE's downsampling factor from its config (SD1.5: 8)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, vae_scale_factor: int) -> int:
    """Raise `DataError` unless the VAE (and the ControlNet's conditioning embedding) can take `resolution`."""
    if resolution <= 0 or resolution % vae_scale_factor != 0:
        lower = max(vae_scale_factor, resolution // vae_scale_factor * vae_scale_factor)
        raise DataError(
            f"--resolution {resolution} is not a multiple of the VAE's scale factor {vae_scale_factor}: the latents and "
            f"the ControlNet's control embedding would differ in size. Use a multiple of {vae_scale_factor}, e.g. {lower}."
        )
    return resolution


# ------------------------------------------------------------------------------------------------ images
def _open_image(value, base_dir: Optional[str]):
    """PIL image from a PIL image, a `{"bytes", "path"}` dict, a file name, bytes or an array (no conversion)."""

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        path = value if (base_dir is None or os.path.isabs(value)) else os.path.join(base_dir, value)
        return Image.open(path)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def _num_channels(image) -> int:
    return len(image.getbands())


def _resize_center_crop(image, resolution: int, nearest: bool = False):
    """Resize the short side to `resolution`, then centre-crop (torchvision, as diffusers' examples)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    return transforms.CenterCrop(resolution)(transforms.Resize(resolution, interpolation=mode)(image))


def _to_tensor01(image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _high_bit_depth_to_8bit(image):
    """16-bit / int / float maps (e.g. depth PNGs): scaled by their own maximum to 0..255 (PIL would clip at 255)."""

    arr = np.asarray(image, dtype=np.float64)
    peak = arr.max()
    arr = arr / peak * 255.0 if peak > 0 else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def prepare_control(image, task, resolution: int, index=None) -> torch.Tensor:
    """A control PIL image -> `(3, R, R)` in `[0, 1]`. Checks its channels (grayscale is replicated for edges/depth)."""
    channels = _num_channels(image)
    where = f"sample {index}: " if index is not None else ""
    allowed = (1, 3) if task.name in CONTROL_GRAYSCALE_OK else (3,)
    if image.mode == "P" and task.is_segmentation:
        image = image.convert("RGB")
        channels = 3
    if channels not in allowed:
        kind = "a colour-coded RGB map" if task.is_segmentation else "an RGB or single-channel map"
        raise DataError(
            f"{where}the control image has {channels} channels (mode {image.mode}); the '{task.name}' ControlNet takes "
            f"{kind} with 3 channels{' (or 1, replicated)' if 1 in allowed else ''}. Convert the controls to RGB."
        )
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") and not task.is_segmentation:
        image = _high_bit_depth_to_8bit(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = _resize_center_crop(image, resolution, nearest=task.is_segmentation)
    return _to_tensor01(image)


def load_control_image(path_or_image, resolution: int, task=None) -> torch.Tensor:
    """A validation control image -> `(1, 3, R, R)` in `[0, 1]`."""
    image = _open_image(path_or_image, None)
    image.load()
    if task is not None:
        return prepare_control(image, task, resolution).unsqueeze(0)
    return _to_tensor01(_resize_center_crop(image.convert("RGB"), resolution)).unsqueeze(0)


def control_classes_of(task, control01: torch.Tensor) -> torch.Tensor:
    """Class indices `(H, W)` of a colour-coded segmentation control `(3, H, W)` in `[0, 1]`."""

    return control_to_classes(control01.unsqueeze(0))[0].long()


# ------------------------------------------------------------------------------------------------ transform
class ExampleTransform:
    """
    One raw example -> training tensors.

    Args:
        task: the `Task`. resolution: output size. tokenizer: a CLIP tokenizer (None: no `input_ids`).
        tokenizer_2: SDXL's second tokenizer (`input_ids_2`, the same caption); None for SD1.5.
        columns: the `DataColumns`. base_dir: folder that relative file names are read from.
        proportion_empty_prompts: share of captions replaced by `""`.
        annotator: PIL -> PIL control, used when `columns.compute_control`.
        seed: the empty-prompt and caption choices are drawn from `(seed, epoch, index)`, so they are reproducible.
    """

    def __init__(self, task, resolution: int, tokenizer, columns: DataColumns, base_dir: Optional[str] = None,
                 proportion_empty_prompts: float = 0.0, annotator: Optional[Callable] = None, seed: int = 0,
                 tokenizer_2=None):
        self.task = task
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.columns = columns
        self.base_dir = base_dir
        self.proportion_empty_prompts = proportion_empty_prompts
        self.annotator = annotator
        self.seed = seed
        if columns.compute_control and annotator is None:
            raise DataError(
                f"The data has no control column for task '{task.name}' and no annotator was given to compute it."
            )

    def _read(self, example, column, index, what):
        try:
            image = _open_image(example[column], self.base_dir)
            image.load()
            return image
        except Exception as err:
            value = example.get(column)
            if isinstance(value, dict) and value.get("path"):  # an undecoded datasets.Image: name its file
                value = value["path"]
                if self.base_dir and os.path.abspath(value).startswith(os.path.abspath(self.base_dir) + os.sep):
                    value = os.path.relpath(value, self.base_dir)
            raise DataError(
                f"sample {index}: cannot read the {what} in column {column!r} ({value!r:.120}): "
                f"{str(err).replace(os.path.abspath(self.base_dir or '/') + os.sep, '')}. "
                "Fix or remove that sample (--max_train_samples can skip the tail)."
            ) from None

    def caption(self, example, index, epoch=0) -> str:
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        if self.columns.caption is None:
            return ""
        caption = example[self.columns.caption]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = rng.choice(list(caption)) if len(caption) else ""
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise DataError(f"sample {index}: caption column {self.columns.caption!r} holds a {type(caption).__name__}, not text.")
        if self.proportion_empty_prompts > 0 and rng.random() < self.proportion_empty_prompts:
            caption = ""
        return caption

    def tokenize(self, caption: str, tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(
            caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt",
        ).input_ids[0]

    def __call__(self, example: Dict, index: int, epoch: int = 0) -> Dict[str, torch.Tensor]:
        image = self._read(example, self.columns.image, index, "image")
        rgb = image.convert("RGB")
        if self.columns.compute_control:
            try:
                control_image = self.annotator(rgb)
            except Exception as err:
                raise DataError(f"sample {index}: the '{self.task.name}' annotator failed on the image: {err}") from None
        else:
            control_image = self._read(example, self.columns.conditioning, index, "control image")
        out = {
            "pixel_values": _to_tensor01(_resize_center_crop(rgb, self.resolution)) * 2.0 - 1.0,
            "conditioning_pixel_values": prepare_control(control_image, self.task, self.resolution, index),
        }
        if self.task.is_segmentation:
            out["control_classes"] = control_classes_of(self.task, out["conditioning_pixel_values"])
        if self.tokenizer is not None:
            caption = self.caption(example, index, epoch)
            out["input_ids"] = self.tokenize(caption)
            if self.tokenizer_2 is not None:
                out["input_ids_2"] = self.tokenize(caption, self.tokenizer_2)
        return out


# ------------------------------------------------------------------------------------------------ datasets
class TrainDataset(torch.utils.data.Dataset):
    """Map-style wrapper: item `i` of epoch `e` is raw example `perm(seed, e)[i]`, transformed."""

    def __init__(self, hf_dataset, transform: ExampleTransform, seed: int = 0, shuffle: bool = True):
        self.data = hf_dataset
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._order = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if self.shuffle:  # an int64 tensor, not a list: 8 bytes a sample even for millions of samples
            g = torch.Generator().manual_seed(int(self.seed) * 100_003 + int(epoch))
            self._order = torch.randperm(len(self.data), generator=g)
        else:
            self._order = None

    def index_of(self, i: int) -> int:
        """The raw sample index of item `i` in the current epoch."""
        if self._order is None or not self.shuffle:
            return int(i)
        return int(self._order[i])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        index = self.index_of(i)
        return self.transform(self.data[index], index, self.epoch)


class StreamingTrainDataset(torch.utils.data.IterableDataset):
    """Iterable wrapper of a streamed dataset (shuffle buffer, epoch-seeded); sample indices count the stream."""

    def __init__(self, hf_iterable, transform: ExampleTransform, seed: int = 0, shuffle_buffer_size: int = 1000):
        self.data = hf_iterable.shuffle(seed=seed, buffer_size=shuffle_buffer_size) if shuffle_buffer_size else hf_iterable
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self):
        for index, example in enumerate(self.data):
            yield self.transform(example, index, self.epoch)


def load_task_annotator(task, name_or_path=None):
    """The task's annotator (PIL -> PIL control), `annotators.load_annotator`."""
    return load_annotator(task.name, name_or_path)


def build_train_dataset(config: DataConfig, task, tokenizer, annotator: Optional[Callable] = None, tokenizer_2=None):
    """Load, resolve columns, build the transform and the wrapper. Returns `(dataset, columns)`. `tokenizer_2`:
    SDXL's second tokenizer (the samples then hold `input_ids_2` as well)."""
    import datasets

    raw = load_train_dataset(config, task)
    columns = resolve_columns(_column_names(raw), task, config)
    if columns.compute_control and annotator is None:
        annotator = load_task_annotator(task, config.annotator_model_name_or_path)
    # decode images ourselves so that an unreadable one names its index
    if getattr(raw, "features", None) is not None:
        for col in (columns.image, columns.conditioning):
            if col is not None and isinstance(raw.features.get(col), datasets.Image):
                raw = raw.cast_column(col, datasets.Image(decode=False))
    transform = ExampleTransform(
        task, config.resolution, tokenizer, columns, base_dir=config.base_dir,
        proportion_empty_prompts=config.proportion_empty_prompts, annotator=annotator, seed=config.seed,
        tokenizer_2=tokenizer_2,
    )
    seed = config.seed
    if isinstance(raw, datasets.IterableDataset):
        dataset = StreamingTrainDataset(raw, transform, seed=seed, shuffle_buffer_size=config.shuffle_buffer_size)
    else:
        if len(raw) == 0:
            raise DataError("The training dataset is empty.")
        dataset = TrainDataset(raw, transform, seed=seed)
    return dataset, columns


def split_held_out(dataset: "TrainDataset", split: float, seed: int = 0):
    """
    `(train, held_out)` from a map-style `TrainDataset`: `split` is a share (0 < split < 1) or a number of samples
    (split >= 1), drawn with `seed`; the held-out part is not shuffled. Raises `DataError` when a side is empty.
    """
    raw, transform = dataset.data, dataset.transform
    num_val = int(split) if split >= 1 else int(round(split * len(raw)))
    if not 1 <= num_val < len(raw):
        raise DataError(
            f"--validation_split {split} leaves no training or no held-out sample out of {len(raw)}: hold out "
            "between 1 and all but one sample."
        )
    order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(order[:num_val]), sorted(order[num_val:])
    return (TrainDataset(raw.select(train_idx, keep_in_memory=True), transform, seed=seed),
            TrainDataset(raw.select(val_idx, keep_in_memory=True), transform, shuffle=False))


def check_samples(dataset, n: int):
    """Decode and transform the first `n` samples (in the stored order) so that bad data fails before training."""
    if n is None or n <= 0:
        return
    if isinstance(dataset, TrainDataset):
        for index in range(min(n, len(dataset.data))):
            dataset.transform(dataset.data[index], index, 0)
    else:
        for index, example in enumerate(dataset.data):
            if index >= n:
                break
            dataset.transform(example, index, 0)


def collate_fn(examples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples]).contiguous().float(),
    }
    for key in ("input_ids", "input_ids_2", "control_classes"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


def write_metadata(folder: str, rows: List[Dict]):
    """Write `metadata.jsonl` for `--train_data_dir` (one JSON object per line)."""
    os.makedirs(folder, exist_ok=True)
    with open(_metadata_path(folder), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
