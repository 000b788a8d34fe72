import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_innercontrol.annotators import ANNOTATOR_OPTION, default_detect_resolution, load_annotator
from diffusers_innercontrol.hub_utils import OfflineModelError
from diffusers_innercontrol.rewards import load_reward_model
from diffusers_innercontrol.toy.tiny import save_tiny_reward_model


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_annotators")
    return {name: save_tiny_reward_model(name, str(root / name), seed=0) for name in ("hed", "lineart")}


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255) // max(width - 1, 1), (yy * 255) // max(height - 1, 1), (xx + yy) % 256], -1)
    array = (base + rng.integers(0, 40, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.mark.parametrize("task_name", ("hed", "lineart"))
def test_annotator_matches_the_reward_model(tiny_paths, task_name):
    annotator = load_annotator(task_name, tiny_paths[task_name])
    image = _image(64, 64)
    control = annotator(image)
    assert isinstance(control, Image.Image) and control.mode == "RGB" and control.size == (64, 64)
    assert np.array_equal(np.asarray(annotator(image)), np.asarray(control))  # deterministic
    array = np.asarray(control).astype(np.int64)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()

    # At 64 px controlnet_aux's resizes are identities, so the annotator is the (differentiable) reward model
    # of the same weights followed by controlnet_aux's uint8 step: they agree within one grey level, and the
    # polarity is the same (white lines on black).
    reward_model = load_reward_model(task_name, tiny_paths[task_name])
    pixels = torch.tensor(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        expected = reward_model(pixels)[0, 0].numpy() * 255.0
    assert np.abs(array[..., 0] - expected).max() <= 1.0 + 1e-3
    assert array.std() > 0


@pytest.mark.parametrize("task_name", ("hed", "lineart"))
def test_annotator_keeps_odd_sizes(tiny_paths, task_name):
    annotator = load_annotator(task_name, tiny_paths[task_name])
    control = annotator(_image(40, 30).convert("L"))  # grey input, sides not multiples of 64
    assert control.mode == "RGB" and control.size == (40, 30)


def test_detect_resolution():
    assert default_detect_resolution(512, 512) == 512
    assert default_detect_resolution(40, 30) == 64
    assert default_detect_resolution(700, 520) == 576


def test_controlnet_aux_reads_the_tiny_weights(tiny_paths):
    # The tiny files have the layout of lllyasviel/Annotators: controlnet_aux's own loaders accept them.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.hed import HEDdetector
        from controlnet_aux.lineart import LineartDetector
    HEDdetector.from_pretrained(tiny_paths["hed"])
    LineartDetector.from_pretrained(tiny_paths["lineart"])


def test_errors(monkeypatch, tiny_paths):
    with pytest.raises(ValueError, match="conditioning column"):
        load_annotator("depth")
    with pytest.raises(TypeError, match="PIL image"):
        load_annotator("lineart", tiny_paths["lineart"])(np.zeros((8, 8, 3), np.uint8))
    from diffusers_innercontrol import rewards

    monkeypatch.setattr(rewards, "hf_hub_download", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(OfflineModelError, match=rf"lllyasviel/Annotators.*{ANNOTATOR_OPTION}"):
        load_annotator("hed")
