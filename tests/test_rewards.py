import os

import pytest
import torch

from diffusers_innercontrol.hub_utils import OfflineModelError
from diffusers_innercontrol.losses import reward_loss_per_sample
from diffusers_innercontrol.rewards import (
    REWARD_MODEL_OPTION,
    DepthReward,
    HEDReward,
    LineartReward,
    SegmentationReward,
    load_reward_model,
)
from diffusers_innercontrol.tasks import get_task
from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

TASKS = ("hed", "lineart", "depth", "segmentation")


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    return {name: save_tiny_reward_model(name, str(root / name), seed=0) for name in TASKS}


@pytest.fixture(scope="module")
def tiny_models(tiny_paths):
    return {name: load_reward_model(name, tiny_paths[name]) for name in TASKS}


def _images(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


@pytest.mark.parametrize("task_name", TASKS)
def test_output_gradient_and_loss(tiny_models, task_name):
    model = tiny_models[task_name]
    task = get_task(task_name)
    assert isinstance(model, {"hed": HEDReward, "lineart": LineartReward, "depth": DepthReward,
                              "segmentation": SegmentationReward}[task_name])
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    images = _images().requires_grad_(True)
    out = model(images)
    if task_name in ("hed", "lineart"):
        assert out.shape == (2, 1, 32, 32)
        assert out.min() >= 0 and out.max() <= 1
    elif task_name == "depth":
        assert out.ndim == 4 and out.shape[:2] == (2, 1)
        assert out.min() >= 0 and out.max() > 0  # DPT's head ends with a ReLU
    else:
        assert out.shape == (2, 150, 32, 32)

    if task_name == "segmentation":
        control = torch.randint(0, 150, (2, 32, 32), generator=torch.Generator().manual_seed(1))
        control[:, :4] = 255
    else:
        control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = reward_loss_per_sample(task, out, control)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    losses.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0  # the gradient reaches the image (no uint8 step)
    assert all(p.grad is None for p in model.parameters())


def test_hed_is_sigmoid_of_mean_of_resized_side_outputs(tiny_models):
    model = tiny_models["hed"]
    images = _images(batch=1, size=32)
    with torch.no_grad():
        sides = model.network(images * 255.0)
        assert len(sides) == 5
        assert [tuple(s.shape[-2:]) for s in sides] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
        total = torch.zeros(1, 1, 32, 32)
        for side in sides:
            total += torch.nn.functional.interpolate(side, size=(32, 32), mode="bilinear", align_corners=False)
        expected = 1.0 / (1.0 + torch.exp(-total / 5.0))
        out = model(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Not quantised: the output takes values between uint8 levels.
    assert not torch.allclose(out * 255, (out * 255).round())


def test_lineart_polarity(tiny_models):
    model = tiny_models["lineart"]
    images = _images(batch=1, size=32)
    with torch.no_grad():
        raw = model.network(images)  # controlnet_aux Generator: dark lines on white, sigmoid output
        out = model(images)
    assert torch.equal(out, 1.0 - raw)


@pytest.mark.parametrize("bias, lines", [(12.0, 0.0), (-12.0, 1.0)])
def test_lineart_polarity_with_known_weights(bias, lines):
    """
    A LineDrawing generator with every weight 0 and the last bias `b` draws sigmoid(b) everywhere, whatever the
    image (instance norm turns the constant features into 0): b = +12 is blank white paper (no line anywhere),
    b = -12 is ink everywhere. ControlNet's lineart controls are white lines on black, so blank paper must read
    as 0 and full ink as 1.
    """
    from diffusers_innercontrol.rewards import build_lineart_network

    network = build_lineart_network()
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
        network.model4[1].bias.fill_(bias)
    model = LineartReward(network).freeze()
    with torch.no_grad():
        drawn = network(_images(batch=2, size=32))
        out = model(_images(batch=2, size=32))
    assert (drawn - (1.0 - lines)).abs().max().item() < 1e-5  # what the generator draws, known from its weights
    assert (out - lines).abs().max().item() < 1e-5


def _capture_pixel_values(module):
    seen = {}

    def hook(_, args, kwargs):
        seen["pixel_values"] = kwargs.get("pixel_values", args[0] if args else None).detach().clone()

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_depth_preprocessing(tiny_models):
    model = tiny_models["depth"]
    assert model.image_size == (32, 32)  # the tiny DPT config's image_size (384 for Intel/dpt-hybrid-midas)
    seen, handle = _capture_pixel_values(model.model)
    try:
        for value, expected in ((0.5, 0.0), (1.0, 1.0), (0.0, -1.0)):  # (x - 0.5) / 0.5
            out = model(torch.full((1, 3, 48, 40), value))
            assert seen["pixel_values"].shape == (1, 3, 32, 32)
            torch.testing.assert_close(seen["pixel_values"], torch.full((1, 3, 32, 32), expected))
        images = _images(batch=1, size=32)
        out = model(images)
        torch.testing.assert_close(seen["pixel_values"], images * 2 - 1)  # no resize at the model's size
        with torch.no_grad():
            direct = model.model(pixel_values=images * 2 - 1).predicted_depth
        torch.testing.assert_close(out, direct[:, None])
    finally:
        handle.remove()


def test_segmentation_preprocessing(tiny_models):
    model = tiny_models["segmentation"]
    seen, handle = _capture_pixel_values(model.model)
    try:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        model(mean.expand(1, 3, 32, 32))
        torch.testing.assert_close(seen["pixel_values"], torch.zeros(1, 3, 32, 32))
        images = _images(batch=1, size=32)
        out = model(images)
        torch.testing.assert_close(seen["pixel_values"], (images - mean) / std)
        with torch.no_grad():
            direct = model.model(pixel_values=(images - mean) / std).logits
        torch.testing.assert_close(out, direct)
    finally:
        handle.remove()


def test_stays_frozen_in_eval_mode(tiny_models):
    model = tiny_models["segmentation"]
    model.train()
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("task_name", ("hed", "lineart"))
def test_pth_round_trip(tiny_paths, tiny_models, task_name):
    filename = get_task(task_name).reward_model_file
    saved = torch.load(os.path.join(tiny_paths[task_name], filename), map_location="cpu", weights_only=True)
    for loaded in (tiny_models[task_name], load_reward_model(task_name, os.path.join(tiny_paths[task_name], filename))):
        state = loaded.network.state_dict()
        assert set(state) == set(saved)
        assert all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.parametrize("task_name", ("depth", "segmentation"))
def test_transformers_round_trip(tiny_paths, tiny_models, task_name):
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tiny_paths[task_name], "model.safetensors"))
    state = tiny_models[task_name].model.state_dict()
    assert len(saved) > 10 and all(torch.equal(state[k], saved[k]) for k in saved)


def test_save_tiny_is_seeded_and_keeps_global_rng(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = save_tiny_reward_model("lineart", str(tmp_path / "a"), seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b = save_tiny_reward_model("lineart", str(tmp_path / "b"), seed=0)
    c = save_tiny_reward_model("lineart", str(tmp_path / "c"), seed=1)
    assert sorted(os.listdir(a)) == ["sk_model.pth", "sk_model2.pth"]
    load = lambda d: torch.load(os.path.join(d, "sk_model.pth"), weights_only=True)  # noqa: E731
    sa, sb, sc = load(a), load(b), load(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_dtype_and_device(tiny_paths):
    model = load_reward_model("lineart", tiny_paths["lineart"], dtype=torch.float64, device="cpu")
    out = model(_images(batch=1, size=16))
    assert out.dtype == torch.float64 and model.device.type == "cpu"


def test_missing_file_and_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no ControlNetHED\.pth.*other\.bin"):
        load_reward_model("hed", str(empty))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_reward_model("hed", str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_reward_model("depth", str(empty))


def test_wrong_contents(tmp_path, tiny_paths):
    # LineArt weights where the HED network is expected.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    lineart_state = torch.load(os.path.join(tiny_paths["lineart"], "sk_model.pth"), weights_only=True)
    torch.save(lineart_state, wrong / "ControlNetHED.pth")
    with pytest.raises(ValueError, match=r"does not hold the weights of the ControlNet HED.*missing keys.*unexpected"):
        load_reward_model("hed", str(wrong))
    # A file that is not a state dict at all.
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_reward_model("lineart", str(garbage))
    # A transformers model of the wrong kind.
    with pytest.raises(ValueError, match="'upernet' model"):
        load_reward_model("depth", tiny_paths["segmentation"])
    with pytest.raises(ValueError, match="without variants"):
        load_reward_model("hed", tiny_paths["hed"], variant="fp16")


@pytest.mark.parametrize("task_name", TASKS)
def test_hub_id_offline_fails_before_any_download(monkeypatch, task_name):
    import transformers

    from diffusers_innercontrol import rewards

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rewards, "hf_hub_download", no_network)
    monkeypatch.setattr(transformers.PretrainedConfig, "get_config_dict", no_network)
    task = get_task(task_name)
    with pytest.raises(OfflineModelError) as error:
        load_reward_model(task)
    message = str(error.value)
    assert task.reward_model_id in message and REWARD_MODEL_OPTION in message
    assert "\n" not in message


@pytest.mark.parametrize("task_name", ("hed", "lineart"))
def test_edge_map_reward_from_a_dpt_folder(tmp_path, tiny_paths, task_name):
    """ShapesWorld's toy edge rewards: a transformers DPT folder loads as `EdgeMapReward` for hed / lineart."""
    from diffusers_innercontrol.rewards import EdgeMapReward

    model = load_reward_model(task_name, tiny_paths["depth"])  # a DPT folder
    assert isinstance(model, EdgeMapReward) and model.task_name == task_name
    assert not any(p.requires_grad for p in model.parameters())
    images = _images().requires_grad_(True)
    out = model(images)
    # the same network and preprocessing as the depth reward: identical maps
    depth = load_reward_model("depth", tiny_paths["depth"])
    assert out.shape[:2] == (2, 1) and torch.allclose(out, depth(images))
    loss = reward_loss_per_sample(get_task(task_name), out, torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # a transformers folder of another kind is refused, naming what is expected
    with pytest.raises(ValueError, match=r"'upernet' model.*DPTForDepthEstimation edge model"):
        load_reward_model(task_name, tiny_paths["segmentation"])
    with pytest.raises(ValueError, match="transformers model directory; filename"):
        load_reward_model(task_name, tiny_paths["depth"], filename="x.pth")
    with pytest.raises(ValueError, match="EdgeMapReward draws edges"):
        EdgeMapReward(depth.model, "depth")
