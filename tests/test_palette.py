import numpy as np
import pytest
import torch

from diffusers_innercontrol.palette import (
    DUPLICATE_CLASSES,
    IGNORE_INDEX,
    ade20k_palette,
    classes_to_control,
    control_to_classes,
)


def _control(rgb_rows):
    """A (1, 3, H, W) control in [0, 1] from a nested list [row][col] of 0..255 RGB triples."""
    array = torch.tensor(rgb_rows, dtype=torch.float32)  # (H, W, 3)
    return (array / 255.0).permute(2, 0, 1)[None]


def test_palette_table():
    palette = ade20k_palette()
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [120, 120, 120]  # wall
    assert palette[1].tolist() == [180, 120, 120]  # building
    assert palette[2].tolist() == [6, 230, 230]  # sky
    assert palette[149].tolist() == [92, 0, 255]  # flag
    # The standard ADE20K palette repeats one colour: road (6) and skyscraper (48) are both (140, 140, 140).
    assert len({tuple(c) for c in palette.tolist()}) == 149
    assert palette[6].tolist() == palette[48].tolist() == [140, 140, 140]
    assert DUPLICATE_CLASSES == {48: 6}
    palette[0] = 0  # a copy each call
    assert ade20k_palette()[0].tolist() == [120, 120, 120]


def test_palette_matches_controlnet_aux():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.util import ade_palette
    assert ade20k_palette().tolist() == [list(c) for c in ade_palette()]


def test_hand_made_2x2():
    control = _control([[[120, 120, 120], [0, 0, 0]], [[4, 200, 3], [6, 228, 232]]])
    expected = torch.tensor([[[0, IGNORE_INDEX], [4, 2]]])
    assert torch.equal(control_to_classes(control), expected)
    # Black as a class colour instead: its nearest palette colour is (80, 50, 50), class 3 (distance 107
    # vs 162 for (150, 5, 61), 208 for wall, and more for the others).
    without_background = control_to_classes(control, background_color=None)
    assert torch.equal(without_background, torch.tensor([[[0, 3], [4, 2]]]))


def test_max_distance():
    # (128, 0, 64): nearest is (150, 5, 61), class 12, at sqrt(22^2 + 5^2 + 3^2) = sqrt(518) ~ 22.8.
    control = _control([[[128, 0, 64], [120, 120, 120]]])
    assert control_to_classes(control).tolist() == [[[12, 0]]]
    assert control_to_classes(control, max_distance=22.0).tolist() == [[[IGNORE_INDEX, 0]]]
    assert control_to_classes(control, max_distance=23.0).tolist() == [[[12, 0]]]
    assert control_to_classes(control, max_distance=22.0, ignore_index=-1).tolist() == [[[-1, 0]]]


def test_round_trip_all_classes():
    classes = torch.arange(150).view(1, 10, 15).repeat(2, 1, 1)
    classes[1, 0, 0] = IGNORE_INDEX
    control = classes_to_control(classes)
    assert control.shape == (2, 3, 10, 15) and control.dtype == torch.float32
    assert control.min() >= 0 and control.max() <= 1
    back = control_to_classes(control)
    expected = classes.clone()
    expected[expected == 48] = 6  # the duplicated colour maps to the first class that has it
    assert torch.equal(back, expected)
    # Small chunks give the same result.
    assert torch.equal(control_to_classes(control, chunk_size=7), back)


def test_classes_to_control_values():
    classes = torch.tensor([[0, 2], [IGNORE_INDEX, 149]])
    control = classes_to_control(classes)  # (3, 2, 2)
    assert control.shape == (3, 2, 2)
    assert control[:, 0, 0].tolist() == pytest.approx([120 / 255, 120 / 255, 120 / 255])
    assert control[:, 0, 1].tolist() == pytest.approx([6 / 255, 230 / 255, 230 / 255])
    assert control[:, 1, 0].tolist() == [0.0, 0.0, 0.0]
    assert control[:, 1, 1].tolist() == pytest.approx([92 / 255, 0.0, 1.0])


def test_noisy_colours_map_to_their_class():
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 150, (2, 8, 8), generator=generator)
    classes[classes == 48] = 6
    control = classes_to_control(classes)
    noise = (torch.rand(control.shape, generator=generator) * 2 - 1) * (3 / 255)  # +-3 levels per channel
    noisy = (control + noise).clamp(0, 1)
    assert torch.equal(control_to_classes(noisy), classes)


def test_input_forms():
    from PIL import Image

    rows = [[[120, 120, 120], [0, 0, 0]], [[4, 200, 3], [255, 0, 0]]]
    expected = [[0, IGNORE_INDEX], [4, 66]]
    array = np.array(rows, dtype=np.uint8)
    assert control_to_classes(Image.fromarray(array)).tolist() == expected
    assert control_to_classes(array).tolist() == expected
    assert control_to_classes(torch.from_numpy(array).permute(2, 0, 1)).tolist() == expected  # uint8 tensor
    assert control_to_classes(_control(rows)[0]).tolist() == expected  # (3, H, W) float


def test_bad_inputs():
    with pytest.raises(ValueError, match="RGB"):
        control_to_classes(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="is a class of the palette"):
        control_to_classes(torch.rand(1, 3, 4, 4), ignore_index=3)
    with pytest.raises(ValueError, match=r"\[150, 300\]"):
        classes_to_control(torch.tensor([[0, 150], [300, IGNORE_INDEX]]))
    with pytest.raises(ValueError, match="integer"):
        classes_to_control(torch.zeros(2, 2))
