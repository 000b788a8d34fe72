"""diffusers_innercontrol.data: column resolution, transforms (values by hand), errors naming the sample, shuffling."""

import argparse
import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_innercontrol import cli, data
from diffusers_innercontrol.data import DataColumns, DataError, ExampleTransform
from diffusers_innercontrol.tasks import get_task

sys.path.insert(0, os.path.dirname(__file__))
from _data_fixtures import write_toy_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from diffusers_innercontrol.toy.tiny import write_tiny_tokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))), model_max_length=77)


def parse_args(argv):
    parser = argparse.ArgumentParser()
    cli.add_common_args(parser)
    return parser.parse_args(argv)


def parse(argv):
    """The data config of a command line, built where the scripts build it (`DataConfig.from_args`)."""
    return data.DataConfig.from_args(parse_args(argv))


# ------------------------------------------------------------------------------------------- columns
@pytest.mark.parametrize(
    "task,columns,expected",
    [
        ("hed", ["image", "text", "hed", "lineart", "canny"], DataColumns("image", "text", "hed")),
        ("lineart", ["image", "text", "hed", "lineart"], DataColumns("image", "text", "lineart")),
        ("depth", ["image", "text", "control_depth"], DataColumns("image", "text", "control_depth")),
        ("segmentation", ["image", "prompt", "control_seg"], DataColumns("image", "prompt", "control_seg")),
        ("depth", ["file_name", "text", "control_depth"], DataColumns("file_name", "text", "control_depth")),
    ],
)
def test_columns_default_to_the_task_schema(task, columns, expected):
    assert data.resolve_columns(columns, get_task(task), parse([])) == expected


def test_edge_controls_are_computed_when_absent_but_depth_is_not():
    cols = data.resolve_columns(["image", "text"], get_task("hed"), parse([]))
    assert cols.conditioning is None and cols.compute_control
    with pytest.raises(DataError, match=r"no control column 'control_depth'.*columns are: 'image', 'text'\. Pass --conditioning_image_column"):
        data.resolve_columns(["image", "text"], get_task("depth"), parse([]))


def test_explicit_columns_must_exist_and_the_error_lists_those_that_do():
    args = parse(["--conditioning_image_column", "edges"])
    with pytest.raises(DataError, match=r"--conditioning_image_column 'edges' is not a column.*'image', 'text', 'hed'"):
        data.resolve_columns(["image", "text", "hed"], get_task("hed"), args)
    with pytest.raises(DataError, match=r"no image column 'image'; its columns are: 'picture', 'text'"):
        data.resolve_columns(["picture", "text"], get_task("hed"), parse([]))
    cols = data.resolve_columns(["picture", "caption", "d"], get_task("depth"),
                                parse(["--image_column", "picture", "--caption_column", "caption", "--conditioning_image_column", "d"]))
    assert cols == DataColumns("picture", "caption", "d")


# ------------------------------------------------------------------------------------------- transform values
def _transform(task, tokenizer, tmp_path=None, **kw):
    cols = DataColumns("image", "text", None if kw.get("annotator") else "control", compute_control=bool(kw.get("annotator")))
    return ExampleTransform(get_task(task), 4, tokenizer, cols, **kw)


def test_pixel_and_control_ranges_by_hand(tokenizer):
    # a 4x4 image with known values: 0 -> -1, 255 -> 1, 51 -> -0.6; control 255 -> 1, 102 -> 0.4
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[0, 0] = 255
    img[1, 1] = 51
    ctl = np.full((4, 4), 102, dtype=np.uint8)
    ctl[2, 3] = 255
    t = _transform("depth", tokenizer)
    out = t({"image": Image.fromarray(img), "text": "hi", "control": Image.fromarray(ctl, "L")}, 0)
    assert out["pixel_values"].shape == (3, 4, 4) and out["conditioning_pixel_values"].shape == (3, 4, 4)
    assert torch.allclose(out["pixel_values"][:, 0, 0], torch.ones(3))
    assert torch.allclose(out["pixel_values"][:, 1, 1], torch.full((3,), 51 / 255 * 2 - 1))
    assert torch.allclose(out["pixel_values"][:, 3, 3], -torch.ones(3))
    c = out["conditioning_pixel_values"]
    assert torch.allclose(c[:, 2, 3], torch.ones(3)) and torch.allclose(c[:, 0, 0], torch.full((3,), 0.4))  # grey replicated
    assert out["input_ids"].shape == (77,)
    assert "control_classes" not in out


def test_resize_then_center_crop(tokenizer):
    # 8 x 4 (w x h): resized to short side 4 -> unchanged height, then the centre 4 columns are kept
    img = np.zeros((4, 8, 3), dtype=np.uint8)
    img[:, 2:6] = 255
    t = _transform("depth", tokenizer)
    out = t({"image": Image.fromarray(img), "text": "", "control": Image.fromarray(img)}, 0)
    assert torch.allclose(out["pixel_values"], torch.ones(3, 4, 4))


def test_segmentation_classes_from_palette_colours(tokenizer):
    from diffusers_innercontrol.palette import ade20k_palette

    pal = np.asarray(ade20k_palette(), dtype=np.uint8).reshape(-1, 3)
    labels = np.array([[1, 1, 5, 5], [1, 1, 5, 5], [7, 7, 2, 2], [7, 7, 2, 2]])
    ctl = pal[labels]
    t = _transform("segmentation", tokenizer)
    out = t({"image": Image.fromarray(ctl), "text": "x", "control": Image.fromarray(ctl)}, 0)
    expected = torch.as_tensor(labels)
    from diffusers_innercontrol.palette import control_to_classes

    # the same mapping as palette.control_to_classes on the exact colours
    ref = control_to_classes(torch.as_tensor(ctl).permute(2, 0, 1)[None].float() / 255)[0]
    assert torch.equal(out["control_classes"], ref)
    assert out["control_classes"].dtype == torch.long
    assert torch.equal(out["control_classes"] == out["control_classes"][0, 0], expected == expected[0, 0])


@pytest.mark.parametrize("mode,task,ok", [("RGBA", "depth", False), ("LA", "hed", False), ("L", "segmentation", False),
                                         ("L", "hed", True), ("RGB", "segmentation", True)])
def test_control_channels_checked_with_the_sample_index(tokenizer, mode, task, ok):
    t = _transform(task, tokenizer)
    ctl = Image.new(mode, (4, 4))
    example = {"image": Image.new("RGB", (4, 4)), "text": "x", "control": ctl}
    if ok:
        assert t(example, 7)["conditioning_pixel_values"].shape == (3, 4, 4)
    else:
        with pytest.raises(DataError, match=f"sample 7: the control image has {len(ctl.getbands())} channels"):
            t(example, 7)


def test_unreadable_image_names_its_index(tmp_path, tokenizer):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cols = DataColumns("image", "text", "control")
    t = ExampleTransform(get_task("depth"), 4, tokenizer, cols, base_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"sample 12: cannot read the image in column 'image' \('bad.png'\)"):
        t({"image": "bad.png", "text": "x", "control": "bad.png"}, 12)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"sample 3: cannot read the control image in column 'control'"):
        t({"image": "ok.png", "text": "x", "control": "missing.png"}, 3)


def test_proportion_empty_prompts(tokenizer):
    empty = tokenizer("", max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
    ex = {"image": Image.new("RGB", (4, 4)), "text": "a long caption", "control": Image.new("RGB", (4, 4))}
    always = _transform("depth", tokenizer, proportion_empty_prompts=1.0)
    never = _transform("depth", tokenizer, proportion_empty_prompts=0.0)
    assert all(torch.equal(always(ex, i)["input_ids"], empty) for i in range(5))
    assert not any(torch.equal(never(ex, i)["input_ids"], empty) for i in range(5))
    half = _transform("depth", tokenizer, proportion_empty_prompts=0.5, seed=3)
    drops = [half.caption(ex, i) == "" for i in range(400)]
    assert 120 < sum(drops) < 280  # about half; and the draw is reproducible
    assert drops == [half.caption(ex, i) == "" for i in range(400)]


def test_sdxl_second_tokenizer_gets_the_same_caption_and_is_collated(tokenizer):
    """With SDXL's second tokenizer, every sample also holds `input_ids_2`: the same caption (the empty one too, when
    it was dropped) through that tokenizer; `collate_fn` stacks it."""
    from transformers import CLIPTokenizer

    second = CLIPTokenizer.from_pretrained(tokenizer.name_or_path, model_max_length=20)  # a length of its own
    ex = {"image": Image.new("RGB", (4, 4)), "text": "a red star", "control": Image.new("RGB", (4, 4))}
    for p, caption in ((0.0, "a red star"), (1.0, "")):
        t = _transform("depth", tokenizer, tokenizer_2=second, proportion_empty_prompts=p)
        out = t(ex, 0)
        expected = second(caption, max_length=20, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
        assert torch.equal(out["input_ids_2"], expected) and out["input_ids"].shape == (77,)
    batch = data.collate_fn([t(ex, 0), t(ex, 1)])
    assert batch["input_ids_2"].shape == (2, 20)
    assert "input_ids_2" not in _transform("depth", tokenizer)(ex, 0)


def test_caption_lists_pick_one(tokenizer):
    t = _transform("depth", tokenizer, seed=0)
    chosen = {t.caption({"text": ["a", "b", "c"]}, i) for i in range(50)}
    assert chosen == {"a", "b", "c"}


def test_annotator_computes_missing_control(tokenizer):
    calls = []

    def annotator(image):
        calls.append(image.size)
        return Image.new("L", image.size, color=255)

    t = _transform("hed", tokenizer, annotator=annotator)
    out = t({"image": Image.new("RGB", (6, 4)), "text": "x"}, 0)
    assert calls == [(6, 4)]
    assert torch.allclose(out["conditioning_pixel_values"], torch.ones(3, 4, 4))
    with pytest.raises(DataError, match="no annotator was given"):
        ExampleTransform(get_task("hed"), 4, tokenizer, DataColumns("image", "text", None, True))


# ------------------------------------------------------------------------------------------- datasets
def test_folder_dataset_end_to_end_and_max_train_samples(tmp_path, tokenizer):
    folder = write_toy_dataset(str(tmp_path / "d"), "segmentation", num_samples=5, size=24)
    argv = ["--train_data_dir", folder, "--resolution", "16", "--max_train_samples", "3", "--seed", "1"]
    cli.validate_common_args(parse_args(argv))
    ds, cols = data.build_train_dataset(parse(argv), get_task("segmentation"), tokenizer)
    assert cols == DataColumns("image", "prompt", "control_seg") and len(ds) == 3  # imagefolder: file_name -> image
    batch = data.collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["conditioning_pixel_values"].shape == (2, 3, 16, 16)
    assert batch["control_classes"].shape == (2, 16, 16) and batch["input_ids"].shape == (2, 77)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch(tmp_path, tokenizer):
    folder = write_toy_dataset(str(tmp_path / "d"), "depth", num_samples=8, size=16)
    args = parse(["--train_data_dir", folder, "--resolution", "8", "--seed", "5"])
    a, _ = data.build_train_dataset(args, get_task("depth"), tokenizer)
    b, _ = data.build_train_dataset(args, get_task("depth"), tokenizer)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        order = [a.index_of(i) for i in range(8)]
        assert order == [b.index_of(i) for i in range(8)] and sorted(order) == list(range(8))
        orders.append(order)
        assert torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    assert orders[0] != orders[1] or orders[1] != orders[2]
    a.shuffle = False  # held-out data: the stored order
    a.set_epoch(4)
    assert [a.index_of(i) for i in range(8)] == list(range(8))


def test_check_samples_finds_a_bad_sample_before_training(tmp_path, tokenizer):
    folder = write_toy_dataset(str(tmp_path / "d"), "depth", num_samples=4, size=16, broken_index=2)
    args = parse(["--train_data_dir", folder, "--resolution", "8"])
    ds, _ = data.build_train_dataset(args, get_task("depth"), tokenizer)
    data.check_samples(ds, 2)  # the first two are fine
    with pytest.raises(DataError, match=r"sample 2: cannot read the image in column 'image' \('002.png'\): cannot identify image file '002.png'"):
        data.check_samples(ds, 4)


def test_streaming_wrapper_over_an_iterable_dataset(tmp_path, tokenizer):
    import datasets

    folder = write_toy_dataset(str(tmp_path / "d"), "depth", num_samples=6, size=16)
    stream = datasets.load_dataset("json", data_files=os.path.join(folder, "metadata.jsonl"), split="train", streaming=True)
    cols = data.resolve_columns(list(next(iter(stream)).keys()), get_task("depth"), parse([]))
    t = ExampleTransform(get_task("depth"), 8, tokenizer, cols, base_dir=folder)
    ds = data.StreamingTrainDataset(stream, t, seed=0, shuffle_buffer_size=4)
    ds.set_epoch(1)
    items = list(ds)
    assert len(items) == 6 and items[0]["pixel_values"].shape == (3, 8, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate_fn)
    assert [b["pixel_values"].shape[0] for b in loader] == [4, 2]


def test_check_resolution():
    assert data.vae_scale_factor_of({"block_out_channels": [128, 256, 512, 512]}) == 8
    data.check_resolution(512, 8)
    with pytest.raises(DataError, match="--resolution 500 is not a multiple of the VAE's scale factor 8.*e.g. 496"):
        data.check_resolution(500, 8)


def test_common_arg_checks(tmp_path):
    with pytest.raises(ValueError, match="--streaming.*--max_train_steps|A streamed dataset has no length"):
        cli.validate_common_args(parse_args(["--dataset_name", "x/y", "--streaming"]))
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        cli.validate_common_args(parse_args(["--train_data_dir", str(tmp_path)]))
    with pytest.raises(ValueError, match=r"--proportion_empty_prompts must be in \[0, 1\]"):
        cli.validate_common_args(parse_args(["--proportion_empty_prompts", "1.5"]))
    with pytest.raises(ValueError, match="either --dataset_name or --train_data_dir"):
        cli.validate_common_args(parse_args(["--dataset_name", "a/b", "--train_data_dir", str(tmp_path)]))
    assert cli.parse_window("0,400") == (0, 400) and cli.parse_window("450:980") == (450, 980)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_window("400")


def test_offline_hub_dataset_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"Could not load dataset 'nobody/no-such-dataset' \(--dataset_name\).*--train_data_dir"):
        data.load_train_dataset(parse(["--dataset_name", "nobody/no-such-dataset"]), get_task("depth"))


def test_captions_are_optional_when_the_empty_prompt_is_used(tokenizer):
    """The probe trainer (--use_captions off) accepts a data set without captions; stage 2 does not."""
    no_captions = data.DataConfig(resolution=64, require_captions=False)
    cols = data.resolve_columns(["image", "control_depth"], get_task("depth"), no_captions)
    assert cols.caption is None
    with pytest.raises(DataError, match="no caption column"):
        data.resolve_columns(["image", "control_depth"], get_task("depth"), parse([]))
    empty = tokenizer("", max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
    t = ExampleTransform(get_task("depth"), 4, tokenizer, DataColumns("image", None, "control"))
    out = t({"image": Image.new("RGB", (4, 4)), "control": Image.new("RGB", (4, 4))}, 0)
    assert torch.equal(out["input_ids"], empty)


def test_16_bit_depth_controls_are_scaled_not_clipped():
    """PIL's convert("RGB") clips I;16 values above 255: such depth maps are scaled by their maximum first."""
    arr = np.array([[0, 4000], [8000, 2000]], dtype=np.uint16)
    control = data.prepare_control(Image.fromarray(arr), get_task("depth"), 2)
    expected = torch.tensor([[0.0, round(4000 / 8000 * 255) / 255], [1.0, round(2000 / 8000 * 255) / 255]])
    assert control.shape == (3, 2, 2)
    assert torch.allclose(control[0], expected, atol=1e-6) and torch.equal(control[0], control[2])


def test_data_config_from_args_and_held_out(tmp_path):
    """Every data option of the command line lands in the config (read in one place); a held-out config keeps
    the columns and the resolution and reads another source, not streamed, with no caption dropped."""
    args = parse_args(["--train_data_dir", str(tmp_path), "--resolution", "32", "--image_column", "im",
                       "--caption_column", "cap", "--conditioning_image_column", "ctl", "--max_train_samples", "7",
                       "--proportion_empty_prompts", "0.25", "--seed", "3", "--cache_dir", "c",
                       "--dataset_split", "validation"])
    config = data.DataConfig.from_args(args)
    assert config == data.DataConfig(
        resolution=32, train_data_dir=str(tmp_path), split="validation", image_column="im", caption_column="cap",
        conditioning_image_column="ctl", max_samples=7, proportion_empty_prompts=0.25, seed=3, cache_dir="c",
    )
    assert config.base_dir == str(tmp_path)
    assert data.DataConfig.from_args(argparse.Namespace(resolution=8, use_captions=False)).require_captions is False
    assert data.DataConfig.from_args(args, seed=9).seed == 9
    streamed = data.DataConfig(resolution=32, dataset_name="a/b", streaming=True, proportion_empty_prompts=0.5)
    held = streamed.held_out(dataset_name="a/c", split="test", max_samples=4)
    assert (held.dataset_name, held.split, held.max_samples, held.streaming, held.proportion_empty_prompts) == (
        "a/c", "test", 4, False, 0.0)
    assert held.resolution == 32 and streamed.streaming  # the original is untouched (frozen)
    assert data.DataConfig(resolution=8, dataset_name=str(tmp_path)).base_dir == str(tmp_path)
    assert data.DataConfig(resolution=8, dataset_name="a/b").base_dir is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1


def test_split_held_out_is_seeded_and_disjoint(tmp_path, tokenizer):
    folder = write_toy_dataset(str(tmp_path / "d"), "depth", num_samples=6, size=8)
    ds, _ = data.build_train_dataset(parse(["--train_data_dir", folder, "--resolution", "8"]), get_task("depth"), tokenizer)
    train, held = data.split_held_out(ds, 2, seed=0)
    again_train, again_held = data.split_held_out(ds, 2, seed=0)
    assert len(train) == 4 and len(held) == 2 and not held.shuffle
    names = lambda d: [d.data[i][d.transform.columns.caption] for i in range(len(d))]  # noqa: E731
    assert names(held) == names(again_held) and not set(names(held)) & set(names(train))
    assert set(names(held)) | set(names(train)) == set(names(ds))
    assert len(data.split_held_out(ds, 0.5, seed=0)[1]) == 3
    assert names(data.split_held_out(ds, 2, seed=1)[1]) != names(held) or names(data.split_held_out(ds, 2, seed=2)[1]) != names(held)
    with pytest.raises(DataError, match="leaves no training or no held-out sample out of 6"):
        data.split_held_out(ds, 6)


def test_diffusers_controlnet_folder_layout_trains_unchanged(tmp_path, tokenizer):
    """diffusers' train_controlnet.py layout: `file_name`, `conditioning_image_file_name`, `text`, with its
    command line (`--image_column image --conditioning_image_column conditioning_image --caption_column text`)."""
    import json

    folder = tmp_path / "fill50k"
    (folder / "images").mkdir(parents=True)
    (folder / "conditioning_images").mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(3):
            Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(folder / "images" / f"{i}.png")
            Image.new("RGB", (16, 16), (0, 0, 255 - i)).save(folder / "conditioning_images" / f"{i}.png")
            f.write(json.dumps({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditioning_images/{i}.png",
                                "text": f"circle {i}"}) + "\n")
    argv = ["--train_data_dir", str(folder), "--resolution", "8", "--image_column", "image",
            "--conditioning_image_column", "conditioning_image", "--caption_column", "text"]
    ds, cols = data.build_train_dataset(parse(argv), get_task("hed"), tokenizer)
    assert cols == DataColumns("image", "text", "conditioning_image") and len(ds) == 3
    i = ds.index_of(0)
    sample = ds[0]
    assert torch.allclose(sample["conditioning_pixel_values"][2], torch.full((8, 8), (255 - i) / 255))
    assert torch.allclose(sample["pixel_values"][0], torch.full((8, 8), 10 * i / 127.5 - 1))
    # the task's default columns need no flags when the layout names them (`hed_file_name` -> `hed`)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"file_name": f"images/{i}.png", "hed_file_name": f"conditioning_images/{i}.png",
                                "text": f"circle {i}"}) + "\n")
    ds, cols = data.build_train_dataset(parse(["--train_data_dir", str(folder), "--resolution", "8"]), get_task("hed"), tokenizer)
    assert cols == DataColumns("image", "text", "hed")


def test_a_missing_training_dependency_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("datasets", "peft") else real(name, *a))
    with pytest.raises(ValueError, match=r"^This run needs datasets, which is not installed: pip install "
                                         r"'diffusers-innercontrol\[train\]' \(or pip install datasets\)\.$"):
        cli.check_training_dependencies(parse_args(["--report_to", "none"]))
    with pytest.raises(ValueError, match=r"needs datasets, peft, which are not installed.*pip install datasets peft"):
        cli.check_training_dependencies(argparse.Namespace(report_to="none", use_lora=True))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    cli.check_training_dependencies(parse_args([]))
