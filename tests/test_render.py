"""Rendering of readouts and the readout grid, on hand-made tensors."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_innercontrol.palette import ade20k_palette
from diffusers_innercontrol.pipeline_readout import ReadoutPipelineOutput
from diffusers_innercontrol.render import colorize_classes, labeled_grid, make_readout_grid, render_readout, to_pil
from diffusers_innercontrol.tasks import get_task


def _grey(img: PIL.Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[-1] == 3
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), "a greyscale rendering has R = G = B"
    return a[..., 0]


def test_depth_tanh_extremes_render_black_and_white():
    # tanh -1 -> 0 (black), +1 -> 1 (white); the map holds its maximum, so max-normalisation changes nothing
    readout = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(1, 3, 2, 2).clone()
    (img,) = render_readout(readout, "depth")
    assert img.size == (2, 2) and img.mode == "RGB"
    np.testing.assert_array_equal(_grey(img), [[0, 255], [255, 0]])


def test_depth_is_max_normalised_per_sample():
    # sample 0: tanh values -1 and 0 -> unit 0 and 0.5 -> max-normalised 0 and 1
    # sample 1: tanh 0 everywhere -> 0.5 -> max-normalised 1 (white)
    readout = torch.zeros(2, 3, 1, 2)
    readout[0, :, 0, 0] = -1.0
    imgs = render_readout(readout, "depth")
    np.testing.assert_array_equal(_grey(imgs[0]), [[0, 255]])
    np.testing.assert_array_equal(_grey(imgs[1]), [[255, 255]])


def test_hed_lines_are_white_on_black_and_channels_averaged():
    readout = torch.full((1, 3, 1, 3), -1.0)  # background
    readout[0, :, 0, 1] = 1.0  # a line
    readout[0, :, 0, 2] = torch.tensor([1.0, -1.0, 0.0])  # mean 0 -> 0.5 -> 127.5 -> 128
    (img,) = render_readout(readout, "hed")
    np.testing.assert_array_equal(_grey(img), [[0, 255, 128]])


def test_released_lineart_preset_is_min_max_normalised():
    task = get_task("lineart", preset="released")
    # unit values 0.25, 0.5, 0.75 -> min-max 0, 0.5, 1 (white lines on black, as the control)
    readout = torch.tensor([-0.5, 0.0, 0.5]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    (img,) = render_readout(readout, task)
    np.testing.assert_array_equal(_grey(img), [[0, 128, 255]])


def test_segmentation_logits_render_through_the_ade20k_palette():
    palette = ade20k_palette()
    classes = torch.tensor([[0, 2], [5, 1]])
    logits = torch.nn.functional.one_hot(classes, 6).permute(2, 0, 1)[None].float() * 4.0
    (img,) = render_readout(logits, "segmentation")
    a = np.asarray(img)
    assert a.shape == (2, 2, 3)
    for (y, x), k in np.ndenumerate(classes.numpy()):
        np.testing.assert_array_equal(a[y, x], palette[k])


def test_class_maps_and_ignored_pixels():
    classes = torch.tensor([[[3, 255]]])
    (img,) = colorize_classes(classes)
    a = np.asarray(img)
    np.testing.assert_array_equal(a[0, 0], ade20k_palette()[3])
    np.testing.assert_array_equal(a[0, 1], [0, 0, 0])
    (img2,) = render_readout(classes, "segmentation")  # class maps are accepted as they are
    np.testing.assert_array_equal(np.asarray(img2), a)


def test_bad_inputs():
    with pytest.raises(ValueError, match="Unknown task"):
        render_readout(torch.zeros(1, 3, 2, 2), "normals")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        render_readout(torch.zeros(3, 2, 2), "depth")


def test_to_pil_inputs():
    t = torch.zeros(3, 2, 2)
    t[0] = 1.0  # red
    np.testing.assert_array_equal(np.asarray(to_pil(t))[0, 0], [255, 0, 0])
    arr = np.zeros((2, 2, 3), dtype=np.uint8)
    arr[..., 2] = 255
    np.testing.assert_array_equal(np.asarray(to_pil(arr))[1, 1], [0, 0, 255])
    np.testing.assert_array_equal(np.asarray(to_pil(np.full((2, 2, 3), 0.5, dtype=np.float32)))[0, 0], [128] * 3)


def _fake_output(num_samples=2, steps=3, size=8):
    images = [PIL.Image.new("RGB", (size, size), (10 * (i + 1), 0, 0)) for i in range(num_samples)]
    readouts = [torch.full((num_samples, 3, 2, 2), -1.0 + s) for s in range(steps)]  # -1, 0, 1: black, 128, white
    readout_images = [render_readout(r, "hed") for r in readouts]
    return ReadoutPipelineOutput(
        images=images, nsfw_content_detected=None, readouts=readouts, readout_images=readout_images,
        readout_timesteps=[900, 500, 100],
    )


def test_readout_grid_layout():
    out = _fake_output()
    controls = [PIL.Image.new("RGB", (4, 4), (0, 200, 0)), PIL.Image.new("RGB", (4, 4), (0, 0, 200))]
    grid = make_readout_grid(out, controls, sample_index=1, labels=False)
    # one row: control | 3 readouts | final image, each tile the final image's size (8 x 8), 3 px apart on white
    assert grid.size == (3 + 5 * (8 + 3), 8 + 6)
    a = np.asarray(grid)
    x = [3 + j * 11 + 4 for j in range(5)]  # the centre of every tile
    np.testing.assert_array_equal(a[7, x[0]], [0, 0, 200])  # the second sample's control
    np.testing.assert_array_equal(a[7, x[1]], [0, 0, 0])  # first readout: tanh -1 -> black
    np.testing.assert_array_equal(a[7, x[2]], [128, 128, 128])
    np.testing.assert_array_equal(a[7, x[3]], [255, 255, 255])  # last readout: white
    np.testing.assert_array_equal(a[7, x[4]], [20, 0, 0])  # the second sample's image
    np.testing.assert_array_equal(a[7, 1], [255, 255, 255])  # padding
    # with labels (the default): the same tiles under "control", "t = 900", "t = 500", "t = 100", "image"
    labelled = make_readout_grid(out, controls, sample_index=1)
    expected = labeled_grid([[to_pil(controls[1]).resize((8, 8))] + [r[1] for r in out.readout_images] + [out.images[1]]],
                            ["control", "t = 900", "t = 500", "t = 100", "image"], tile_size=(8, 8))
    assert np.array_equal(np.asarray(labelled), np.asarray(expected)) and labelled.size[1] > grid.size[1]


def test_readout_grid_one_control_for_all_and_tile_size():
    out = _fake_output(num_samples=2, steps=1)
    control = torch.ones(1, 3, 4, 4)
    grid = make_readout_grid(out, control, sample_index=0, tile_size=(6, 5), labels=False)
    assert grid.size == (3 + 3 * (6 + 3), 5 + 6)
    np.testing.assert_array_equal(np.asarray(grid)[3 + 2, 3 + 2], [255, 255, 255])
    np.testing.assert_array_equal(np.asarray(grid)[3 + 2, 3 + 9 + 2], [0, 0, 0])  # the readout: tanh -1 -> black


def test_readout_grid_errors():
    out = ReadoutPipelineOutput(images=[PIL.Image.new("RGB", (4, 4))], nsfw_content_detected=None)
    with pytest.raises(ValueError, match="return_readouts=True"):
        make_readout_grid(out, PIL.Image.new("RGB", (4, 4)))
    with pytest.raises(IndexError):
        make_readout_grid(_fake_output(num_samples=1), PIL.Image.new("RGB", (4, 4)), sample_index=3)
