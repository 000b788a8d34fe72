"""The task registry: the paper's Table 4 defaults, the released launchers' preset, validation."""

import dataclasses

import pytest

from diffusers_innercontrol import get_task, list_tasks
from diffusers_innercontrol.tasks import Task

# The method's per-task defaults (paper Table 4, Section 5.1, Appendix A.1), written out independently of tasks.py:
# alpha, reward loss, reward window, beta, alignment loss, alignment window,
# feature kind, feature scale, upsample head, probe outputs, output activation
PAPER = {
    "segmentation": (0.5, "ce", (0, 200), 0.05, "ce", (450, 980), "resnet", 1.0, False, 150, "none"),
    "depth": (0.5, "mse", (0, 400), 1.0, "mse", (0, 920), "attention", 1.0, False, 3, "tanh"),
    "hed": (1.0, "mse", (0, 400), 0.1, "sparse_mse", (0, 800), "resnet", 2.0, True, 3, "tanh"),
    "lineart": (10.0, "mse", (0, 200), 2.0, "mse", (0, 700), "resnet", 2.0, True, 3, "tanh"),
}
FIELDS = (
    "alpha", "reward_loss", "reward_window", "beta", "alignment_loss", "alignment_window",
    "feature_kind", "feature_scale", "upsample_head", "probe_out_channels", "output_activation",
)

# The released InnerControl launchers: alpha 0.5/1.0/1.0 and reward t <= 400/200/200 for depth/HED/LineArt,
# beta 1, alignment [0, 920], attention features and a 64 px head (latent size, no upsampling) for all.
RELEASED = {"depth": (0.5, (0, 400)), "hed": (1.0, (0, 200)), "lineart": (1.0, (0, 200))}

MODELS = {
    "depth": ("lllyasviel/control_v11f1p_sd15_depth", "Intel/dpt-hybrid-midas", "Intel/dpt-large"),
    "hed": ("lllyasviel/control_v11p_sd15_softedge", "lllyasviel/Annotators", "lllyasviel/Annotators"),
    "lineart": ("lllyasviel/control_v11p_sd15_lineart", "lllyasviel/Annotators", "lllyasviel/Annotators"),
    "segmentation": ("lllyasviel/control_v11p_sd15_seg", None, "facebook/mask2former-swin-large-ade-semantic"),
}
DATA = {
    "depth": ("limingcv/MultiGen-20M_depth", "image", "text", "control_depth", 5_000),
    "hed": ("limingcv/MultiGen-20M_train", "image", "text", "hed", 10_000),
    "lineart": ("limingcv/MultiGen-20M_train", "image", "text", "lineart", 10_000),
    "segmentation": ("limingcv/Captioned_ADE20K", "image", "prompt", "control_seg", 5_000),
}


def test_task_names():
    assert sorted(list_tasks()) == ["depth", "hed", "lineart", "segmentation"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_defaults(name):
    task = get_task(name)
    assert task.name == name and task.preset == "paper"
    assert tuple(getattr(task, f) for f in FIELDS) == PAPER[name]
    assert tuple(task.reward_window) == PAPER[name][2] and tuple(task.alignment_window) == PAPER[name][5]
    assert not task.alignment_minmax and not task.alignment_invert
    assert task.num_classes == (150 if name == "segmentation" else None)
    assert task.is_segmentation == (name == "segmentation")
    assert get_task(name, preset="paper") == task


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_and_data(name):
    task = get_task(name)
    controlnet, reward, evaluation = MODELS[name]
    assert task.controlnet_id == controlnet and task.eval_model_id == evaluation
    if reward is not None:
        assert task.reward_model_id == reward
    assert task.reward_model_file == {"hed": "ControlNetHED.pth", "lineart": "sk_model.pth"}.get(name)
    dataset, image, caption, conditioning, probe_steps = DATA[name]
    assert (task.dataset_name, task.image_column, task.caption_column, task.conditioning_column) == (
        dataset, image, caption, conditioning
    )
    assert task.probe_train_steps == probe_steps
    assert task.annotator_computes_control == (name in ("hed", "lineart"))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_preset(name):
    task = get_task(name, preset="released")
    paper = get_task(name)
    alpha, reward_window = RELEASED[name]
    assert task.preset == "released"
    assert task.alpha == alpha and tuple(task.reward_window) == reward_window
    assert task.beta == 1.0 and tuple(task.alignment_window) == (0, 920)
    assert (task.feature_kind, task.feature_scale, task.upsample_head) == ("attention", 1.0, False)
    # the released alignment loss: a plain MSE on (tanh + 1) / 2; LineArt min-max normalised (fitted to the control)
    assert task.alignment_loss == "mse"
    assert (task.alignment_minmax, task.alignment_invert) == ((True, False) if name == "lineart" else (False, False))
    assert task.alignment_resize == "readout"  # compared at the control's size, as the released stage-2 code
    if name == "lineart":  # the released LineArt reward weights
        assert (task.reward_model_id, task.reward_model_file) == ("awacke1/Image-to-Line-Drawings", "model.pth")
    # what the launchers do not change stays the paper's
    assert (task.reward_loss, task.probe_out_channels, task.output_activation) == (
        paper.reward_loss, paper.probe_out_channels, paper.output_activation
    )
    assert task.controlnet_id == paper.controlnet_id and task.dataset_name == paper.dataset_name


def test_alignment_resize_per_task():
    # edges keep thin lines (area); depth and segmentation as Readout Guidance (nearest)
    assert {n: get_task(n).alignment_resize for n in ("hed", "lineart", "depth", "segmentation")} == {
        "hed": "area", "lineart": "area", "depth": "nearest", "segmentation": "nearest"}
    with pytest.raises(ValueError, match="alignment_resize 'bicubic'"):
        get_task("hed").replace(alignment_resize="bicubic")


def test_alignment_channels_per_task_and_preset():
    # the paper's losses compare the probe's channel mean; the released HED alignment compares every channel
    assert {n: get_task(n).alignment_channels for n in ("hed", "lineart", "depth", "segmentation")} == dict.fromkeys(
        ("hed", "lineart", "depth", "segmentation"), "mean")
    assert {n: get_task(n, "released").alignment_channels for n in ("hed", "lineart", "depth")} == {
        "hed": "each", "lineart": "mean", "depth": "mean"}
    with pytest.raises(ValueError, match="alignment_channels 'all' is not one of"):
        get_task("hed").replace(alignment_channels="all")
    with pytest.raises(ValueError, match="alignment_channels must be 'mean'"):
        get_task("segmentation").replace(alignment_channels="each")


def test_released_has_no_segmentation():
    with pytest.raises(ValueError, match="no 'segmentation' task.*preset='paper'"):
        get_task("segmentation", preset="released")


def test_unknown_names_raise_with_choices():
    with pytest.raises(ValueError, match="'canny'.*hed, lineart, depth, segmentation"):
        get_task("canny")
    with pytest.raises(ValueError, match="'best'.*paper, released"):
        get_task("hed", preset="best")


def test_replace_validates():
    task = get_task("hed")
    changed = task.replace(beta=0.5, alignment_window=(100, 900))
    assert changed.beta == 0.5 and changed.alignment_window == (100, 900)
    assert task.beta == 0.1 and task.alignment_window == (0, 800)  # the original is untouched
    assert task.replace(reward_window=(0, 999)).reward_window == (0, 999)  # bounds inclusive, last t = 999
    assert task.replace(alignment_window=(300, 300)).alignment_window == (300, 300)
    with pytest.raises(ValueError, match=r"alignment window \[900, 100\].*smallest first"):
        task.replace(alignment_window=(900, 100))
    with pytest.raises(ValueError, match=r"reward window \[0, 1000\]"):
        task.replace(reward_window=(0, 1000))
    with pytest.raises(ValueError, match=r"reward window \[-1, 200\]"):
        task.replace(reward_window=(-1, 200))
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        task.replace(alpha=-1.0)
    with pytest.raises(ValueError, match="cross-entropy alignment loss belongs to segmentation"):
        task.replace(alignment_loss="ce")
    with pytest.raises(ValueError, match="reward_loss 'l1'"):
        task.replace(reward_loss="l1")
    with pytest.raises(ValueError, match="reward loss is cross-entropy for segmentation"):
        task.replace(reward_loss="ce")
    with pytest.raises(ValueError, match="reward loss is cross-entropy for segmentation"):
        get_task("segmentation").replace(reward_loss="mse")
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.alpha = 3.0


@pytest.mark.parametrize("name", sorted(PAPER))
def test_probe_kwargs(name):
    task = get_task(name)
    assert task.probe_kwargs() == dict(
        feature_kind=PAPER[name][6],
        feature_scale=PAPER[name][7],
        upsample_head=PAPER[name][8],
        out_channels=PAPER[name][9],
        output_activation=PAPER[name][10],
        task=name,
        task_preset="paper",
    )
    assert isinstance(task, Task)


def test_probe_from_task_has_the_task_output_size(tiny_components):
    """
    The paper's HED probe: features at 2x the largest map (16 px, the latent), 2x head -> 64 px. Depth reads
    attention features, which the tiny UNet has only at 8 px (on SD1.5 the largest is the 64 px latent).
    """
    import torch

    from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe

    unet = tiny_components["unet"]
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([50]), torch.randn(1, 77, 32)
    for name, size in (("hed", 64), ("depth", 8)):
        task = get_task(name)
        probe = ReadoutProbe.from_unet(unet, **task.probe_kwargs(), projection_dim=32, norm_num_groups=8)
        with torch.no_grad(), DecoderFeatureExtractor(unet, task.feature_kind) as extractor:
            unet(latents, t, encoder_hidden_states=text)
            out = probe(extractor.features, t).sample
        assert out.shape == (1, 3, size, size)


def test_probe_task_and_preset_are_checked():
    from types import SimpleNamespace

    from diffusers_innercontrol.tasks import check_probe_task

    lineart_paper = SimpleNamespace(task="lineart", task_preset="paper")
    check_probe_task(lineart_paper, get_task("lineart"))  # same task and preset
    check_probe_task(SimpleNamespace(task=None, task_preset=None), get_task("hed"))  # imported: unknown
    # LineArt's mapping depends on the preset: a probe that records none does not pass silently under either
    for preset in ("paper", "released"):
        for config in (SimpleNamespace(task=None, task_preset=None), SimpleNamespace(task="lineart", task_preset=None)):
            with pytest.raises(ValueError, match="records no task preset"):
                check_probe_task(config, get_task("lineart", preset))
    with pytest.raises(ValueError, match="trained for the 'lineart' task, not 'hed'"):
        check_probe_task(lineart_paper, get_task("hed"))
    with pytest.raises(ValueError, match="--preset paper"):  # LineArt's readout mapping differs between presets
        check_probe_task(lineart_paper, get_task("lineart", "released"))
    # depth maps its readout the same way under both presets: accepted
    check_probe_task(SimpleNamespace(task="depth", task_preset="paper"), get_task("depth", "released"))


def test_probe_check_messages_and_configs_without_fields():
    from types import SimpleNamespace

    from diffusers_innercontrol.tasks import check_probe_task

    # a config object with no task fields at all (an imported probe) is accepted where the mapping does not depend on
    # the preset, and a recorded task without a preset too
    check_probe_task(SimpleNamespace(), get_task("hed"))
    check_probe_task(SimpleNamespace(task="hed", task_preset=None), get_task("hed"))
    check_probe_task(SimpleNamespace(task="hed"), get_task("hed", "released"))
    with pytest.raises(ValueError) as err:
        check_probe_task(SimpleNamespace(), get_task("lineart"))
    assert str(err.value) == (
        "The probe records no task preset, and the 'lineart' readout is mapped to the control differently under "
        "--preset paper and --preset released: record it (convert.py --preset ..., or "
        "probe.register_to_config(task=..., task_preset=...)) or train the probe with train_probe.py."
    )
    with pytest.raises(ValueError) as err:
        check_probe_task(SimpleNamespace(task="depth", task_preset="paper"), get_task("hed"))
    assert str(err.value) == (
        "The probe was trained for the 'depth' task, not 'hed': pass a 'hed' probe (train_probe.py --task ...)."
    )


def test_validation_messages_in_full():
    """The whole message of every refusal (a user reads it; a mangled one is a bug)."""
    hed, seg = get_task("hed"), get_task("segmentation")
    cases = [
        (lambda: hed.replace(alignment_loss="l1"),
         "alignment_loss 'l1' is not one of ('mse', 'sparse_mse', 'ce')."),
        (lambda: hed.replace(alignment_loss="ce"),
         "The cross-entropy alignment loss belongs to segmentation and only to it."),
        (lambda: hed.replace(reward_loss="ce"),
         "The reward loss is cross-entropy for segmentation (class logits) and MSE for the other tasks (maps): got "
         "reward_loss='ce' for 'hed'."),
        (lambda: seg.replace(alignment_channels="each"),
         "Segmentation compares class logits with class indices: alignment_channels must be 'mean'."),
        (lambda: seg.replace(alignment_resize="area"),
         "Class maps cannot be area-averaged: use alignment_resize 'nearest' or 'readout' for segmentation."),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert str(err.value) == message
