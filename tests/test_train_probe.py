"""examples/innercontrol/train_probe.py (stage 1): bad input, learning, and `accelerate launch` runs (e2e)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from _data_fixtures import write_toy_dataset
from PIL import Image

from diffusers_innercontrol import ReadoutProbe, get_task, training
from diffusers_innercontrol.training import probe_step
from diffusers_innercontrol.training_utils import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "innercontrol", "train_probe.py")
TINY = ["--resolution", "32", "--projection_dim", "32", "--norm_num_groups", "8", "--seed", "0",
        "--check_data_samples", "2"]
TASK_KIND = {"hed": "resnet", "lineart": "resnet", "depth": "attention", "segmentation": "resnet"}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_probe_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_data")
    for task in TASK_KIND:
        write_toy_dataset(str(root / task), task, num_samples=6, size=32, seed=1)
    write_toy_dataset(str(root / "hed_heldout"), "hed", num_samples=2, size=32, seed=2)
    return root


def _run_main(script, argv):
    return script.main(script.parse_args(argv))


def _base(task, pipe, data_root, out):
    return ["--task", task, "--pretrained_model_name_or_path", pipe, "--train_data_dir", str(data_root / task),
            "--output_dir", str(out), "--report_to", "none", *TINY]


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_task(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--task", "canny", "--output_dir", str(tmp_path)])
    assert info.value.code == 2 and "invalid choice: 'canny'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--validation_prompt", "a cat", "--validation_image", "x.png"], "held-out samples"),
        (["--validation_split", "0.5", "--validation_data_dir", "."], "one source of held-out data"),
        (["--validation_split", "1.5"], "share in \\(0, 1\\) or a whole number"),
        (["--feature_scale", "0"], "--feature_scale must be > 0"),
        (["--projection_dim", "36"], "divisible by --norm_num_groups"),
        (["--validation_timesteps", "100", "1000"], "outside \\[0, 1000\\)"),
        (["--task", "segmentation", "--out_channels", "10"], "one output channel per class"),
    ],
)
def test_bad_options_fail_before_models(script, tmp_path, extra, message):
    argv = ["--task", "depth", "--output_dir", str(tmp_path), "--pretrained_model_name_or_path", "/nonexistent", *extra]
    with pytest.raises(ValueError, match=message):
        _run_main(script, argv)
    assert not os.listdir(tmp_path)  # nothing written


def test_offline_model_id_fails_fast(script, tmp_path, data_root):
    from diffusers_innercontrol.hub_utils import OfflineModelError

    argv = _base("depth", "no-such-user/no-such-model", data_root, tmp_path)
    with pytest.raises(OfflineModelError, match="no-such-user/no-such-model.*--pretrained_model_name_or_path"):
        _run_main(script, argv)


def test_missing_control_column_names_existing(script, tmp_path, tiny_pipeline_path):
    data = write_toy_dataset(str(tmp_path / "data"), "depth", num_samples=3, size=32, control_column="my_depth")
    argv = ["--task", "depth", "--pretrained_model_name_or_path", tiny_pipeline_path, "--train_data_dir", data,
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *TINY]
    with pytest.raises(ValueError, match="no control column 'control_depth'.*'my_depth'.*--conditioning_image_column"):
        _run_main(script, argv)
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_validation_split_too_large(script, tmp_path, tiny_pipeline_path, data_root):
    argv = _base("depth", tiny_pipeline_path, data_root, tmp_path) + ["--validation_split", "6"]
    with pytest.raises(ValueError, match="leaves no training or no held-out sample out of 6"):
        _run_main(script, argv)


def test_init_probe_must_fit_unet(script, tmp_path, tiny_pipeline_path, data_root):
    # a probe for another UNet's features (other channels), saved like a real one
    other = ReadoutProbe(feature_channels=(16, 16), feature_kind="resnet", projection_dim=32, norm_num_groups=8,
                         timestep_input_dim=32, time_embed_dim=128)
    other.save_pretrained(str(tmp_path / "other"))
    argv = _base("hed", tiny_pipeline_path, data_root, tmp_path / "out") + ["--init_probe", str(tmp_path / "other")]
    with pytest.raises(ValueError, match=r"channels \[16, 16\].*UNet's are \[64, 64, 64, 32, 32, 32\]"):
        _run_main(script, argv)
    # a matching probe, but a conflicting feature kind on the command line
    with pytest.raises(ValueError, match="feature_kind='resnet' but --feature_kind 'attention'"):
        _run_main(script, argv + ["--feature_kind", "attention"])


def test_feature_kind_missing_from_unet_and_bad_resolution(script):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    vae = SimpleNamespace(config={"block_out_channels": (16, 32)})  # scale factor 2
    models = dict(unet=unet, vae=vae, controlnet=None)
    args = SimpleNamespace(resolution=32)
    with pytest.raises(ValueError, match="no 'attention' layers.*--feature_kind resnet"):
        script.check_models(args, get_task("depth"), models)
    script.check_models(args, get_task("hed"), models)  # resnet features exist
    # the trainers' one rule: a multiple of the VAE's scale factor (the UNet takes latents of any size)
    script.check_models(SimpleNamespace(resolution=34), get_task("hed"), models)
    with pytest.raises(ValueError, match="--resolution 33 is not a multiple of the VAE's scale factor 2.*e.g. 32"):
        script.check_models(SimpleNamespace(resolution=33), get_task("hed"), models)


def test_nan_loss_stops_and_names_the_loss(script, tmp_path, tiny_pipeline_path, data_root, monkeypatch):
    def nan_step(**kwargs):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(training, "probe_step", nan_step)  # main imports it from there when it runs
    argv = _base("depth", tiny_pipeline_path, data_root, tmp_path) + ["--max_train_steps", "2"]
    with pytest.raises(NonFiniteLossError, match=r"^The probe \(mse\) loss is nan at step 1 \(epoch 0\); training stopped\. No checkpoint"):
        _run_main(script, argv)
    assert not os.path.exists(tmp_path / "config.json")


# ------------------------------------------------------------------------------------------------ learning
def test_probe_learns_a_trivial_target(tiny_components):
    """On a fixed toy control (left half 1, right half 0), the stage-1 loss drops well within 40 steps."""
    unet, sched = tiny_components["unet"], tiny_components["scheduler"]
    unet.requires_grad_(False)
    task = get_task("lineart").replace(feature_scale=1.0, upsample_head=False)  # 16 px output: fast
    torch.manual_seed(0)
    probe = ReadoutProbe.from_unet(unet, **task.probe_kwargs(), projection_dim=32, norm_num_groups=8)
    probe.time_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    control = torch.zeros(4, 3, 32, 32)
    control[..., :16] = 1.0
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        latents = torch.randn(4, 4, 16, 16, generator=g)
        loss = probe_step(task=task, unet=unet, probe=probe, noise_scheduler=sched, latents=latents,
                          encoder_hidden_states=torch.zeros(4, 77, 32), control=control, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # the frozen timestep embedding is still the UNet's
    for a, b in zip(probe.time_embedding.parameters(), unet.time_embedding.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ e2e runs
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, num_processes=1, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    if num_processes > 1:  # several CPU processes: torchrun via --multi_gpu, gloo on the CPU (ACCELERATE_USE_CPU)
        launch = ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(_free_port())]
    else:
        launch = ["--cpu", "--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", SCRIPT, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _probe_bytes(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


@pytest.mark.e2e
@pytest.mark.parametrize("task_name", ["hed", "lineart", "depth", "segmentation"])
def test_train_probe_every_task(task_name, tmp_path, tiny_pipeline_path, data_root):
    out = tmp_path / "out"
    argv = _base(task_name, tiny_pipeline_path, data_root, out) + [
        "--report_to", "tensorboard", "--max_train_steps", "2", "--train_batch_size", "2",
        "--num_error_buckets", "2", "--validation_timesteps", "100", "500", "900", "--checkpointing_steps", "2",
    ]
    # held-out data: a separate folder for HED, 2 of the 6 training samples otherwise
    argv += ["--validation_data_dir", str(data_root / "hed_heldout")] if task_name == "hed" else ["--validation_split", "2"]
    if task_name == "depth":  # ControlNet-conditioned features
        argv += ["--controlnet_model_name_or_path", os.path.join(tiny_pipeline_path, "controlnet")]
    if task_name == "lineart":  # the UNet reads the captions instead of the empty prompt
        argv += ["--use_captions"]
    log = _launch(argv)
    assert "trained 2 steps" in log

    task = get_task(task_name)
    probe = ReadoutProbe.from_pretrained(str(out))
    assert probe.config.feature_kind == TASK_KIND[task_name]
    assert probe.config.out_channels == task.probe_out_channels
    assert probe.config.upsample_head == task.upsample_head and probe.config.feature_scale == task.feature_scale
    assert probe.config.projection_dim == 32
    assert os.path.isfile(out / "diffusion_pytorch_model.safetensors") and os.path.isdir(out / "checkpoint-2")
    # the script froze the time embedding it copied from the UNet: after training it is still the UNet's, bit for bit
    from diffusers import UNet2DConditionModel

    unet_time = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet").time_embedding.state_dict()
    for key, value in probe.time_embedding.state_dict().items():
        assert torch.equal(value, unet_time[key]), key

    errors = json.loads((out / "probe_error.json").read_text())
    assert errors["loss"] == task.alignment_loss and errors["task"] == task_name and errors["step"] == 2
    assert [(b["t_min"], b["t_max"], b["count"]) for b in errors["buckets"]] == [(0, 499, 2), (500, 999, 2)]
    assert all(b["error"] > 0 for b in errors["buckets"])

    grid = Image.open(out / "validation_grid.png")
    # image, control, 3 timesteps (labelled; a label wider than a 32 px tile widens its column); 2 rows
    assert grid.size[0] >= 5 * (32 + 3) + 3 and grid.size[1] > 2 * 32

    card = (out / "README.md").read_text()
    assert tiny_pipeline_path not in card  # no machine paths: the folder's name
    for needle in (task_name, TASK_KIND[task_name], task.alignment_loss, os.path.basename(tiny_pipeline_path), "| 0-499 |",
                   "images_0.png", "feature channels"):
        assert needle in card, needle
    assert os.path.isfile(out / "images_0.png")
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for f in files)


@pytest.mark.e2e
def test_train_probe_two_processes(tmp_path, tiny_pipeline_path, data_root):
    out = tmp_path / "out"
    argv = _base("hed", tiny_pipeline_path, data_root, out) + [
        "--max_train_steps", "2", "--train_batch_size", "1", "--validation_split", "2", "--num_error_buckets", "2",
        "--validation_timesteps", "500", "--checkpointing_steps", "2",
    ]
    log = _launch(argv, num_processes=2)
    assert "MULTI_CPU" in log
    assert "[process 0/2] trained 2 steps" in log and "[process 1/2] trained 2 steps" in log
    assert sorted(os.listdir(out / "checkpoint-2")).count("random_states_1.pkl") == 1
    ReadoutProbe.from_pretrained(str(out))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 1


@pytest.mark.e2e
def test_train_probe_resume_continues_at_the_right_step(tmp_path, tiny_pipeline_path, data_root):
    """3 steps, then resume to 6 (mid-epoch: 4 batches per epoch) == 6 steps in one run (torch.equal, CPU)."""
    common = ["--train_batch_size", "1", "--validation_split", "2", "--num_error_buckets", "1",
              "--validation_timesteps", "500", "--checkpointing_steps", "3", "--num_grid_samples", "1"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    _launch(_base("hed", tiny_pipeline_path, data_root, full) + common + ["--max_train_steps", "6"])
    _launch(_base("hed", tiny_pipeline_path, data_root, parts) + common + ["--max_train_steps", "3"])
    assert os.path.isdir(parts / "checkpoint-3") and not os.path.isdir(parts / "checkpoint-6")
    log = _launch(_base("hed", tiny_pipeline_path, data_root, parts) + common
                  + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert "(step 3)" in log and "trained 6 steps" in log
    assert os.path.isdir(parts / "checkpoint-6")
    a, b = _probe_bytes(str(full)), _probe_bytes(str(parts))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((parts / "probe_error.json").read_text())["step"] == 6


def test_offline_model_id_is_one_line_without_traceback():
    """The probe trainer's entry point, like the stage-2 one, ends bad input with one line and exit status 1."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "innercontrol", "train_probe.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, script, "--task", "depth", "--pretrained_model_name_or_path", "nobody/no-model"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'nobody/no-model' (--pretrained_model_name_or_path)" in errors[0]


def test_alignment_loss_option_sets_the_probes_training_loss(script, tmp_path):
    """`--alignment_loss sparse_mse` trains a LineArt probe with the class-balanced loss HED uses (the task's own
    MSE stays the default)."""
    base = ["--output_dir", str(tmp_path)]
    assert script.resolve_task(script.parse_args(["--task", "lineart", *base])).alignment_loss == "mse"
    task = script.resolve_task(script.parse_args(["--task", "lineart", "--alignment_loss", "sparse_mse", *base]))
    assert task.alignment_loss == "sparse_mse" and task.name == "lineart"


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from diffusers_innercontrol.toy.tiny import build_tiny_sdxl_components

    components = build_tiny_sdxl_components(seed=0, tokenizer_dir=str(tmp_path_factory.mktemp("sdxl_tok")))
    components.pop("controlnet")
    path = tmp_path_factory.mktemp("tiny_sdxl")
    StableDiffusionXLPipeline(**components).save_pretrained(path)
    return str(path)


@pytest.mark.e2e
@pytest.mark.parametrize("task_name", ["hed", "lineart", "depth", "segmentation"])
def test_probe_trains_on_sdxl(script, tmp_path, tiny_sdxl_path, data_root, task_name):
    """The same script on an SDXL pipeline (detected from its UNet), every task: the second text encoder's pooled
    empty prompt (LineArt: both encoders on the captions) and the size / crop ids go to the UNet; a probe for its
    decoder features is saved, with its grid, errors and an SDXL model card."""
    out = tmp_path / "probe"
    argv = _base(task_name, tiny_sdxl_path, data_root, out) + [
        "--max_train_steps", "2", "--validation_split", "2", "--validation_timesteps", "100", "900",
        "--num_error_buckets", "2", "--crops_coords_top_left_h", "4"]
    if task_name == "lineart":
        argv += ["--use_captions"]
    _run_main(script, argv)
    probe = ReadoutProbe.from_pretrained(out)
    from diffusers import UNet2DConditionModel

    from diffusers_innercontrol import decoder_feature_channels

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    assert list(probe.config.feature_channels) == decoder_feature_channels(unet, probe.config.feature_kind)
    assert probe.config.out_channels == get_task(task_name).probe_out_channels
    assert (out / "validation_grid.png").is_file() and (out / "probe_error.json").is_file()
    card = (out / "README.md").read_text()
    assert "stable-diffusion-xl" in card and "StableDiffusionXLControlNetReadoutPipeline" in card


@pytest.mark.e2e
def test_sdxl_probe_resume_equals_the_uninterrupted_run(script, tmp_path, tiny_sdxl_path, data_root):
    """3 steps, then resume to 6 (mid-epoch) == 6 steps in one run, on SDXL with captions (torch.equal, CPU)."""
    common = ["--train_batch_size", "1", "--validation_split", "2", "--num_error_buckets", "1", "--use_captions",
              "--validation_timesteps", "500", "--checkpointing_steps", "3", "--num_grid_samples", "1"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    _run_main(script, _base("hed", tiny_sdxl_path, data_root, full) + common + ["--max_train_steps", "6"])
    _run_main(script, _base("hed", tiny_sdxl_path, data_root, parts) + common + ["--max_train_steps", "3"])
    _run_main(script, _base("hed", tiny_sdxl_path, data_root, parts) + common
              + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    a, b = _probe_bytes(str(full)), _probe_bytes(str(parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((parts / "probe_error.json").read_text())["step"] == 6
