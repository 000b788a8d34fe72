"""examples/innercontrol/train_innercontrol.py: runs with `accelerate launch` on the tiny offline models for every
task (e2e), 2 CPU processes, SIGKILL + resume, NaN stop; and every bad input, in process, before any training."""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from _data_fixtures import write_toy_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "innercontrol", "train_innercontrol.py")
TASKS = ("hed", "lineart", "depth", "segmentation")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_script():
    spec = importlib.util.spec_from_file_location("train_innercontrol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- assets
@pytest.fixture(scope="module")
def assets(tiny_pipeline_path, tmp_path_factory):
    """Per task: a toy dataset, a tiny reward model and a tiny probe for the tiny pipeline's UNet."""
    from diffusers import UNet2DConditionModel

    from diffusers_innercontrol import ReadoutProbe, get_task
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    root = tmp_path_factory.mktemp("ic_assets")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    out = {"pipe": tiny_pipeline_path, "root": str(root)}
    for name in TASKS:
        task = get_task(name)
        out[name] = dict(
            data=write_toy_dataset(str(root / f"data_{name}"), name, num_samples=4, size=40),
            reward=save_tiny_reward_model(name, str(root / f"reward_{name}")),
            probe=str(root / f"probe_{name}"),
        )
        torch.manual_seed(0)
        ReadoutProbe.from_unet(unet, **task.probe_kwargs(), projection_dim=32, norm_num_groups=8).save_pretrained(out[name]["probe"])
    return out


def base_args(assets, task, output_dir, steps=3, **extra):
    a = assets[task]
    args = [
        "--task", task, "--pretrained_model_name_or_path", assets["pipe"], "--train_data_dir", a["data"],
        "--probe_model_name_or_path", a["probe"], "--reward_model_name_or_path", a["reward"],
        "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
        "--seed", "0", "--report_to", "none", "--dataloader_num_workers", "0", "--learning_rate", "1e-3",
        # every term on every sample, so that each run exercises the reward and the alignment
        "--reward_window", "0,999", "--alignment_window", "0,999",
    ]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(args, num_processes=1):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes == 1:
        cmd += ["--cpu"]
    else:  # several CPU processes: torchrun-style launch with ACCELERATE_USE_CPU (gloo)
        cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    return cmd + [SCRIPT] + list(args)


def launch_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1")
    return env


def launch(args, num_processes=1, expect_ok=True, timeout=900):
    proc = subprocess.run(launch_cmd(args, num_processes), env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = proc.stdout + proc.stderr
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{output[-6000:]}")
    return proc.returncode, output


def checkpoint_names(output_dir):
    return sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-"))


def assert_saved_controlnet(output_dir):
    from diffusers import ControlNetModel

    assert os.path.isfile(os.path.join(output_dir, "config.json"))
    assert os.path.isfile(os.path.join(output_dir, WEIGHTS))
    assert not any(f.endswith(".bin") for f in os.listdir(output_dir)), "only safetensors for our weights"
    model = ControlNetModel.from_pretrained(output_dir)
    assert not any("lora" in k for k in model.state_dict())
    return model


def read_card(output_dir):
    from huggingface_hub import ModelCard

    return ModelCard.load(os.path.join(output_dir, "README.md"))


def assert_card(output_dir, task, alpha, beta, probe=None):
    card = read_card(output_dir)
    tags = card.data.tags
    for tag in ("controlnet", "innercontrol", "diffusers", task):
        assert tag in tags, tags
    text = card.text
    assert f"task **{task}**" in text
    assert f"| alpha (reward weight) | `{alpha}` |" in text
    assert f"| beta (alignment weight) | `{beta}` |" in text
    assert "| reward window (t) | `[0, 999]` |" in text and "| alignment window (t) | `[0, 999]` |" in text
    if probe:
        assert f"| readout probe | `{os.path.basename(os.path.normpath(probe))}` |" in text
        assert str(probe) not in text  # no machine paths
    return card


def controlnet_weights(output_dir):
    return load_file(os.path.join(output_dir, WEIGHTS))


# --------------------------------------------------------------------------------------------- e2e: every task
@pytest.mark.e2e
def test_hed_with_validation_readouts_tensorboard_and_pruned_checkpoints(assets, tmp_path):
    out = tmp_path / "hed"
    image = os.path.join(assets["hed"]["data"], "controls", "000.png")
    code, log = launch(base_args(
        assets, "hed", out, steps=3, checkpointing_steps=1, checkpoints_total_limit=2, report_to="tensorboard",
        validation_prompt="a toy picture", validation_image=image, validation_steps=2, num_validation_images=1,
        num_validation_inference_steps=3, num_validation_readouts=2,
    ))
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-3"]  # pruned to the limit
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert_saved_controlnet(out)
    card = assert_card(out, "hed", 1.0, 0.1, probe=assets["hed"]["probe"])
    assert "![a toy picture](./images_0.png)" in card.text
    import numpy as np
    from PIL import Image

    grid = Image.open(out / "images_0.png")
    # control | 1 image | 2 probe readouts, 128 px tiles 3 px apart, under a band of labels ("readout\nt = 999")
    assert grid.width == 4 * (128 + 3) + 3 and grid.height > 128 + 2 * 3 + 10
    band = np.asarray(grid)[: grid.height - 128 - 6]
    assert (band.min(-1) < 128).sum() > 50  # dark text in the label band
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "logs") for f in fs)
    assert "align=" in log and "rew=" in log and "diff=" in log  # the three terms on the progress bar
    assert "[process 0/1] trained 3 steps" in log


@pytest.mark.e2e
def test_lineart_lora_annotator_on_the_fly_and_push_to_hub_offline_keeps_local_save(assets, tmp_path):
    out = tmp_path / "lineart"
    # data without a control column: the LineArt annotator computes the controls on the fly
    no_controls = write_toy_dataset(str(tmp_path / "no_controls"), "lineart", num_samples=4, size=40, with_control=False)
    args = base_args(assets, "lineart", out, steps=2, checkpointing_steps=5, use_lora=True, lora_rank=4,
                     push_to_hub=True, hub_model_id="someone/innercontrol-lineart",
                     annotator_model_name_or_path=assets["lineart"]["reward"])
    args[args.index("--train_data_dir") + 1] = no_controls
    code, log = launch(args, expect_ok=False)
    assert code == 1, log[-3000:]
    assert "compute_control=True" in log
    assert "saved locally" in log and "someone/innercontrol-lineart" in log  # the upload failed (offline), and says so
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")
    merged = assert_saved_controlnet(out)
    card = assert_card(out, "lineart", 10.0, 2.0)
    assert "lora" in card.data.tags
    adapter = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert adapter and all("lora" in k for k in adapter)
    assert list(merged.config.conditioning_embedding_out_channels) == [16, 32]  # tiny VAE: scale factor 2
    # the ControlNet starts as a copy of the UNet (from_unet); the fused adapters moved a targeted layer away from it
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets["pipe"], subfolder="unet")
    name = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(merged.state_dict()[name], unet.state_dict()[name])
    name = "time_embedding.linear_1.weight"  # not a LoRA target: unchanged
    assert torch.equal(merged.state_dict()[name], unet.state_dict()[name])


@pytest.mark.e2e
def test_depth_ema_and_gradient_accumulation(assets, tmp_path):
    out = tmp_path / "depth"
    launch(base_args(assets, "depth", out, steps=2, checkpointing_steps=2, use_ema=True, gradient_accumulation_steps=2,
                     train_batch_size=1, lr_scheduler="cosine", lr_warmup_steps=1, gradient_checkpointing=True))
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert os.path.isfile(out / "checkpoint-2" / "custom_checkpoint_0.pkl")  # the EMA state is checkpointed
    assert_saved_controlnet(out)
    # the saved ControlNet holds the EMA weights (EMAModel's shadow parameters), not the live ones
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    ema_state = torch.load(out / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=True, map_location="cpu")
    assert ema_state["optimization_step"] == 2
    names = [n for n, _ in ControlNetModel.from_pretrained(out).named_parameters()]
    final = load_file(out / "diffusion_pytorch_model.safetensors")
    live = load_file(out / "checkpoint-2" / "model.safetensors")
    assert len(names) == len(ema_state["shadow_params"])
    assert all(torch.equal(final[n], shadow) for n, shadow in zip(names, ema_state["shadow_params"]))
    assert any(not torch.equal(final[n], live[n]) for n in names)
    assert_card(out, "depth", 0.5, 1.0, probe=assets["depth"]["probe"])


@pytest.mark.e2e
def test_segmentation_trains_and_saves(assets, tmp_path):
    out = tmp_path / "segmentation"
    code, log = launch(base_args(assets, "segmentation", out, steps=2, checkpointing_steps=1, checkpoints_total_limit=1))
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert_saved_controlnet(out)
    assert_card(out, "segmentation", 0.5, 0.05, probe=assets["segmentation"]["probe"])
    assert "align=" in log and "rew=" in log


@pytest.mark.e2e
def test_plain_controlnet_baseline_needs_no_probe_or_reward(assets, tmp_path):
    out = tmp_path / "controlnet"
    args = base_args(assets, "hed", out, steps=2, alpha=0, beta=0)
    i = args.index("--probe_model_name_or_path")
    del args[i : i + 2]
    i = args.index("--reward_model_name_or_path")
    del args[i : i + 2]
    code, log = launch(args)
    assert "mode = ControlNet:" in log
    assert "rew=" not in log and "align=" not in log
    card = read_card(out)
    assert "Mode: ControlNet (diffusion loss only)." in card.text


@pytest.mark.e2e
def test_two_cpu_processes_both_train_one_model_saved(assets, tmp_path):
    out = tmp_path / "ddp"
    code, log = launch(base_args(assets, "depth", out, steps=2, train_batch_size=1, checkpointing_steps=2), num_processes=2)
    assert "[process 0/2] trained 2 steps" in log and "[process 1/2] trained 2 steps" in log
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert sorted(f for f in os.listdir(out / "checkpoint-2") if f.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [f for f in os.listdir(out) if f.endswith(".safetensors")] == [WEIGHTS]  # one model, written once
    assert_saved_controlnet(out)


# --------------------------------------------------------------------------------------------- e2e: resume
@pytest.mark.e2e
def test_sigkill_then_resume_latest_equals_uninterrupted_run(assets, tmp_path):
    # 4 samples, batch 2: 2 steps per epoch; checkpoint 3 is in the middle of epoch 1 (one batch to skip)
    def args_for(out, **extra):
        return base_args(assets, "depth", out, steps=6, checkpointing_steps=3, use_ema=True, **extra)

    reference = tmp_path / "reference"
    launch(args_for(reference))
    assert checkpoint_names(reference) == ["checkpoint-3", "checkpoint-6"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(launch_cmd(args_for(killed)), env=launch_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while not (killed / "checkpoint-3").is_dir():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / WEIGHTS).exists(), "the run finished before the kill; the test needs it killed"
    assert "checkpoint-3" in checkpoint_names(killed)

    code, log = launch(args_for(killed, resume_from_checkpoint="latest"))
    assert "Resuming from checkpoint" in log
    ref, res = controlnet_weights(reference), controlnet_weights(killed)
    assert ref.keys() == res.keys()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key
    # and training did change the weights (the comparison is not between two untouched models)
    mid = load_file(str(reference / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(mid[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------------------------- e2e: NaN
@pytest.mark.e2e
def test_nan_loss_stops_names_the_term_and_keeps_the_last_checkpoint(assets, tmp_path):
    from diffusers_innercontrol import ReadoutProbe

    bad_probe = tmp_path / "nan_probe"
    probe = ReadoutProbe.from_pretrained(assets["depth"]["probe"])
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(float("nan"))
    probe.save_pretrained(bad_probe)
    out = tmp_path / "nan"
    args = base_args(assets, "depth", out, steps=2, checkpointing_steps=1, beta=1.0)
    args[args.index("--probe_model_name_or_path") + 1] = str(bad_probe)
    # a first healthy step writes checkpoint-1 (alignment off), then the NaN probe is switched on by resuming
    healthy = list(args)
    healthy[healthy.index("--max_train_steps") + 1] = "1"
    healthy += ["--beta", "0"]
    launch(healthy)
    assert checkpoint_names(out) == ["checkpoint-1"]
    os.remove(out / WEIGHTS)
    before = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    code, log = launch(args + ["--resume_from_checkpoint", "latest"], expect_ok=False)
    assert code == 1
    assert "The alignment loss is nan at step 2" in log
    assert "checkpoint-1" in log and "is kept" in log
    assert checkpoint_names(out) == ["checkpoint-1"]
    assert not (out / WEIGHTS).exists()
    after = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------- bad input (in process)
@pytest.fixture(scope="module")
def script():
    return load_script()


def run_main(script, assets, task, out, **extra):
    args = script.parse_args(base_args(assets, task, out, steps=1, **extra))
    return script.main(args)


def assert_nothing_trained(out):
    assert not os.path.exists(os.path.join(out, WEIGHTS))
    assert not os.path.isdir(out) or not checkpoint_names(out)


def test_unknown_task(script, assets, tmp_path, capsys):
    """argparse refuses it, naming the choices, before anything is read or written."""
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--task", "canny", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --task: invalid choice: 'canny'" in err and "segmentation" in err.rsplit("canny", 1)[1]
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["train_innercontrol", "train_probe"])
def test_help_has_text_and_a_default_for_every_option(name):
    """--help: the task first with its choices, every option explained, every default shown."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_help_{name}", os.path.join(os.path.dirname(SCRIPT), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        module.parse_args(["--task", "depth", "--pretrained_model_name_or_path", "x", "--train_data_dir", "y"])
    parser = parsers[0]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options[0].dest == "task" and list(options[0].choices) == ["hed", "lineart", "depth", "segmentation"]
    assert [a.option_strings[0] for a in options if not a.help] == []
    text = parser.format_help()
    assert text.count("(default:") >= len([a for a in options if a.default is not None and not a.required]) - 5
    assert "SPEC" not in text
    assert "(default: 0)" in text.rsplit("--seed SEED", 1)[1].split("\n  --", 1)[0]


def test_beta_without_probe(script, assets, tmp_path):
    args = base_args(assets, "depth", tmp_path, steps=1)
    i = args.index("--probe_model_name_or_path")
    del args[i : i + 2]
    with pytest.raises(ValueError, match="needs a trained readout probe: pass --probe_model_name_or_path"):
        script.main(script.parse_args(args))
    # beta = 0 needs none
    script.validate_args(script.parse_args(args + ["--beta", "0"]))


@pytest.mark.parametrize("window", ["0,1000", "500,100", "-1,10"])
@pytest.mark.parametrize("option", ["--reward_window", "--alignment_window"])
def test_windows_outside_or_reversed(script, assets, tmp_path, option, window):
    args = base_args(assets, "depth", tmp_path, steps=1) + [f"{option}={window}"]
    with pytest.raises(ValueError, match=r"window \[-?\d+, \d+\] must satisfy 0 <= lo <= hi < num_train_timesteps"):
        script.validate_args(script.parse_args(args))


def test_validation_prompts_and_images_that_do_not_pair(script, assets, tmp_path):
    img = os.path.join(assets["depth"]["data"], "controls", "000.png")
    args = base_args(assets, "depth", tmp_path, steps=1)
    with pytest.raises(ValueError, match="2 validation prompts and 3 validation images do not pair"):
        script.validate_args(script.parse_args(args + ["--validation_prompt", "a", "b", "--validation_image", img, img, img]))
    with pytest.raises(ValueError, match="also pass --validation_image"):
        script.validate_args(script.parse_args(args + ["--validation_prompt", "a"]))
    # one prompt for several images pairs
    script.validate_args(script.parse_args(args + ["--validation_prompt", "a", "--validation_image", img, img]))


def test_resolution_the_vae_cannot_take(script, assets, tmp_path):
    from diffusers_innercontrol.data import DataError

    with pytest.raises(DataError, match="--resolution 33 is not a multiple of the VAE's scale factor 2.*e.g. 32"):
        run_main(script, assets, "depth", tmp_path, resolution=33)
    assert_nothing_trained(tmp_path)


def test_control_with_wrong_number_of_channels(script, assets, tmp_path):
    from diffusers_innercontrol.data import DataError

    data = write_toy_dataset(str(tmp_path / "rgba"), "depth", num_samples=2, size=32, control_mode="RGBA")
    args = base_args(assets, "depth", tmp_path / "out", steps=1)
    args[args.index("--train_data_dir") + 1] = data
    with pytest.raises(DataError, match="sample 0: the control image has 4 channels"):
        script.main(script.parse_args(args))
    assert_nothing_trained(tmp_path / "out")


def test_unreadable_image_names_its_index(script, assets, tmp_path):
    from diffusers_innercontrol.data import DataError

    data = write_toy_dataset(str(tmp_path / "broken"), "depth", num_samples=3, size=32, broken_index=1)
    args = base_args(assets, "depth", tmp_path / "out", steps=1)
    args[args.index("--train_data_dir") + 1] = data
    with pytest.raises(DataError, match=r"sample 1: cannot read the image in column 'image' \('001.png'\)"):
        script.main(script.parse_args(args))
    assert_nothing_trained(tmp_path / "out")


def test_missing_dataset_columns_names_those_that_exist(script, assets, tmp_path):
    from diffusers_innercontrol.data import DataError

    data = write_toy_dataset(str(tmp_path / "cols"), "depth", num_samples=2, size=32, control_column="depth_map")
    args = base_args(assets, "depth", tmp_path / "out", steps=1)
    args[args.index("--train_data_dir") + 1] = data
    with pytest.raises(DataError, match=r"no control column 'control_depth'.*columns are: 'image', 'text', 'depth_map'"):
        script.main(script.parse_args(args))
    with pytest.raises(DataError, match=r"--caption_column 'prompt' is not a column.*'depth_map'"):
        script.main(script.parse_args(args + ["--caption_column", "prompt"]))


def test_probe_that_does_not_match_the_unet(script, assets, tmp_path, tiny_components):
    from diffusers import UNet2DConditionModel

    from diffusers_innercontrol import ReadoutProbe, get_task
    from diffusers_innercontrol.toy.tiny import TINY_UNET_CONFIG

    task = get_task("depth")
    unet = tiny_components["unet"]
    # channels: a probe trained on another UNet
    other = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, block_out_channels=(32, 48)))
    probe = ReadoutProbe.from_unet(other, feature_kind="attention", projection_dim=32, norm_num_groups=8)
    with pytest.raises(ValueError, match=r"channels \[48, 48, 48\], but this UNet's are \[64, 64, 64\]\. It was trained on another UNet\. Train a probe on --pretrained_model_name_or_path"):
        script.check_probe(probe, unet, task)
    # feature kind: attention features on a UNet whose decoder has no attention
    no_attn = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, up_block_types=("UpBlock2D", "UpBlock2D"),
                                          down_block_types=("DownBlock2D", "DownBlock2D")))
    probe = ReadoutProbe.from_unet(unet, feature_kind="attention", projection_dim=32, norm_num_groups=8)
    with pytest.raises(ValueError, match="The probe reads 'attention' features but"):
        script.check_probe(probe, no_attn, task)
    # outputs: a 3-channel probe for segmentation
    probe = ReadoutProbe.from_unet(unet, feature_kind="resnet", projection_dim=32, norm_num_groups=8)
    with pytest.raises(ValueError, match="segmentation probe needs 150 outputs"):
        script.check_probe(probe, unet, get_task("segmentation"))
    # and through main, before training: the channel mismatch saved as a probe
    other_probe = tmp_path / "other_probe"
    ReadoutProbe.from_unet(other, feature_kind="attention", projection_dim=32, norm_num_groups=8).save_pretrained(other_probe)
    args = base_args(assets, "depth", tmp_path / "out", steps=1)
    args[args.index("--probe_model_name_or_path") + 1] = str(other_probe)
    with pytest.raises(ValueError, match="It was trained on another UNet"):
        script.main(script.parse_args(args))
    assert_nothing_trained(tmp_path / "out")


@pytest.mark.parametrize("option", ["--pretrained_model_name_or_path", "--controlnet_model_name_or_path",
                                    "--probe_model_name_or_path", "--reward_model_name_or_path",
                                    "--annotator_model_name_or_path", "--tokenizer_name",
                                    "--pretrained_vae_model_name_or_path"])
def test_offline_model_id_fails_fast_with_one_line(script, assets, tmp_path, capsys, option):
    args = base_args(assets, "depth", tmp_path, steps=1)
    if option in args:
        args[args.index(option) + 1] = "nobody/not-a-cached-model"
    else:
        args += [option, "nobody/not-a-cached-model"]
    with pytest.raises(SystemExit) as exc:
        script.cli_main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "'nobody/not-a-cached-model'" in err[0] and option in err[0] and "local directory" in err[0]
    assert_nothing_trained(tmp_path)


@pytest.mark.e2e
def test_logged_losses_match_a_recomputation_of_the_first_step(assets, tmp_path):
    """One InnerControl step through `accelerate launch`: the losses it logs are those of the first batch, recomputed
    here from the same files and the script's seeded generator (the diffusion loss written out by hand)."""
    import re

    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_innercontrol import ReadoutProbe, get_task
    from diffusers_innercontrol.data import prepare_control
    from diffusers_innercontrol.rewards import load_reward_model
    from diffusers_innercontrol.training import conditioning_channels_for, controlnet_step, encode_images
    from diffusers_innercontrol.training_utils import step_generator

    data = write_toy_dataset(str(tmp_path / "one"), "depth", num_samples=1, size=32)  # one sample: the first batch is known
    args = base_args(assets, "depth", tmp_path / "out", steps=1, train_batch_size=1)
    args[args.index("--train_data_dir") + 1] = data
    _, log = launch(args)
    logged = {k: float(v) for k, v in re.findall(r"'(loss\w*)': ([-0-9.e]+)", log.split("last losses", 1)[1].split("\n")[0])}
    assert {"loss", "loss_diffusion", "loss_reward", "loss_alignment"} <= set(logged)

    pipe = assets["pipe"]
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(
        2 ** (len(vae.config.block_out_channels) - 1)))
    task = get_task("depth")
    task = task.replace(reward_window=(0, 999), alignment_window=(0, 999))  # as base_args sets them
    probe = ReadoutProbe.from_pretrained(assets["depth"]["probe"]).requires_grad_(False)
    reward = load_reward_model("depth", assets["depth"]["reward"])

    image = Image.open(os.path.join(data, "000.png")).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    control = prepare_control(Image.open(os.path.join(data, "controls", "000.png")), task, 32, 0)[None]
    ids = tokenizer("a toy picture number 0", max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        gen = step_generator(0, "cpu", 0, 0, 0)  # the generator of epoch 0, batch 0 the script uses
        latents = encode_images(vae, pixels, generator=gen)
        # the diffusion loss by hand: noise, then t, drawn from the same generator (the step's order)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=control, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        assert logged["loss_diffusion"] == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-4, abs=2e-6)
        out = controlnet_step(task=task, unet=unet, controlnet=controlnet, noise_scheduler=scheduler, latents=latents,
                              encoder_hidden_states=hidden, control=control, vae=vae, reward_model=reward, probe=probe,
                              noise=noise, timesteps=t)
    for key, value in out.logs().items():
        if key in logged:
            assert logged[key] == pytest.approx(value, rel=1e-4, abs=2e-6), key


@pytest.mark.parametrize("broken", ["no_config", "truncated"])
def test_a_broken_probe_is_one_line_and_leaves_no_output_folder(script, assets, tmp_path, capsys, broken):
    """A probe folder without config.json, or with truncated weights: one line naming the option and the fix, no
    traceback, and no output folder left behind (the run created it before loading the models)."""
    import shutil

    probe = tmp_path / "probe"
    shutil.copytree(assets["depth"]["probe"], probe)
    if broken == "no_config":
        os.remove(probe / "config.json")
        expected = r"--probe_model_name_or_path '.*probe' is a folder without config.json: it is not a saved model"
    else:
        weights = probe / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = r"--probe_model_name_or_path '.*probe' could not be loaded as a ReadoutProbe \(.*\)\. Its weights may be truncated"
    args = base_args(assets, "depth", tmp_path / "out", steps=1)
    args[args.index("--probe_model_name_or_path") + 1] = str(probe)
    with pytest.raises(SystemExit) as info:
        script.cli_main(args)
    assert info.value.code == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and re.match(r"error: " + expected, err[0]) and "Traceback" not in stderr, err
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def sdxl_assets(assets, tmp_path_factory):
    """A tiny SDXL-shaped pipeline (random weights, from configs) and, per task, a probe for its UNet; the data and
    the reward models are the SD1.5 runs' (`assets`)."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_innercontrol import ReadoutProbe, get_task
    from diffusers_innercontrol.toy.tiny import build_tiny_sdxl_components

    root = tmp_path_factory.mktemp("sdxl_assets")
    components = build_tiny_sdxl_components(seed=0, tokenizer_dir=str(root / "tokenizer"))
    components.pop("controlnet")
    StableDiffusionXLPipeline(**components).save_pretrained(root / "pipe")
    out = {"pipe": str(root / "pipe"), "unet": components["unet"], "components": components}
    for name in TASKS:
        out[name] = dict(assets[name], probe=str(root / f"probe_{name}"))
        torch.manual_seed(0)
        ReadoutProbe.from_unet(components["unet"], **get_task(name).probe_kwargs(), projection_dim=32,
                               norm_num_groups=8).save_pretrained(out[name]["probe"])
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_on_sdxl(script, sdxl_assets, tmp_path, task):
    """The same script on an SDXL pipeline (detected from its UNet's config): reward and alignment on every sample,
    validation with readouts through the SDXL readout pipeline; an SDXL ControlNet and an SDXL model card are saved."""
    out = tmp_path / "out"
    extra = dict(validation_prompt="a red circle", validation_image=os.path.join(sdxl_assets[task]["data"], "controls", "000.png"),
                 num_validation_images=1, num_validation_inference_steps=2, num_validation_readouts=2) if task == "hed" else {}
    steps = script.main(script.parse_args(base_args(sdxl_assets, task, out, steps=2, **extra)))
    assert steps == 2
    controlnet = assert_saved_controlnet(str(out))
    assert controlnet.config.addition_embed_type == "text_time"
    initial = type(controlnet).from_unet(sdxl_assets["unet"], conditioning_embedding_out_channels=controlnet.config.conditioning_embedding_out_channels)
    trained = dict(controlnet.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in initial.named_parameters()), "training changed nothing"
    card = read_card(str(out))
    assert "stable-diffusion-xl" in card.data.tags and "stable-diffusion" not in card.data.tags
    assert "StableDiffusionXLControlNetPipeline" in card.text
    if task == "hed":
        assert (out / "images_0.png").is_file()  # the labelled validation grid, readouts included


@pytest.mark.e2e
def test_sdxl_resume_from_a_checkpoint_equals_the_uninterrupted_run(script, sdxl_assets, tmp_path):
    """4 samples, batch 2: checkpoint 3 is in the middle of epoch 1. A run resumed from it ends where the
    uninterrupted run ended, bit for bit (the SDXL conditioning is a pure function of the batch)."""
    import shutil

    def args_for(out, **extra):
        return script.parse_args(base_args(sdxl_assets, "depth", out, steps=4, checkpointing_steps=3, **extra))

    reference = tmp_path / "reference"
    script.main(args_for(reference))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    script.main(args_for(resumed, resume_from_checkpoint="latest"))
    ref, res = controlnet_weights(reference), controlnet_weights(resumed)
    assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)
    mid = load_file(str(reference / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(mid[k], ref[k]) for k in ref)


def test_sdxl_conditioning_matches_the_sdxl_pipelines_prompt_encoding(sdxl_assets):
    """`sdxl_conditioning` of a tokenised batch = `StableDiffusionXLPipeline.encode_prompt` of the same captions, and
    the size / crop ids are (resolution, resolution, top, left, resolution, resolution)."""
    from argparse import Namespace

    from diffusers import StableDiffusionXLPipeline

    from diffusers_innercontrol.training_utils import sdxl_conditioning

    c = sdxl_assets["components"]
    captions = ["a red circle", "two blue stars above a square"]
    batch = {key: tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for key, tok in (("input_ids", c["tokenizer"]), ("input_ids_2", c["tokenizer_2"]))}
    args = Namespace(resolution=48, crops_coords_top_left_h=4, crops_coords_top_left_w=8)
    models = {"text_encoder": c["text_encoder"], "text_encoder_2": c["text_encoder_2"]}
    with torch.no_grad():
        hidden, added = sdxl_conditioning(models, batch, args, "cpu", torch.float32)
        pipe = StableDiffusionXLPipeline(**c)
        ref_hidden, _, ref_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(added["text_embeds"], ref_pooled)
    assert added["time_ids"].tolist() == [[48, 48, 4, 8, 48, 48]] * 2


def test_sdxl_vae_override_and_its_precision(sdxl_assets, tmp_path):
    """`--pretrained_vae_model_name_or_path` replaces the model's VAE; SDXL's own VAE stays in fp32 under fp16 (it
    overflows there), a replacement VAE and SD1.5's take the training precision."""
    from argparse import Namespace

    from diffusers import AutoencoderKL

    from diffusers_innercontrol.training_utils import load_base_models, vae_dtype_for

    other = AutoencoderKL.from_config(sdxl_assets["components"]["vae"].config)
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(0.5)
    other.save_pretrained(tmp_path / "vae")
    args = Namespace(pretrained_model_name_or_path=sdxl_assets["pipe"], revision=None, cache_dir=None, variant=None,
                     pretrained_vae_model_name_or_path=str(tmp_path / "vae"))
    models = load_base_models(args, sdxl=True)
    assert all(torch.all(p == 0.5) for p in models["vae"].parameters())
    assert models["text_encoder_2"] is not None and not any(p.requires_grad for p in models["vae"].parameters())
    assert vae_dtype_for(models, args, torch.float16) == torch.float16
    args.pretrained_vae_model_name_or_path = None
    assert vae_dtype_for(models, args, torch.float16) == torch.float32
    assert vae_dtype_for(models, args, torch.bfloat16) == torch.bfloat16
    assert vae_dtype_for(dict(models, sdxl=False), args, torch.float16) == torch.float16


def test_the_family_is_read_from_the_unet_config_and_sets_the_default_resolution(sdxl_assets, assets):
    """SDXL is detected from its UNet's config (no weights loaded); without --resolution, training runs at the base
    model's native size: 1024 px for SDXL, 512 px for SD1.5; a given --resolution is kept."""
    from argparse import Namespace

    from diffusers_innercontrol.training_utils import is_sdxl_model, resolve_resolution

    def ns(path, resolution=None):
        return Namespace(pretrained_model_name_or_path=path, revision=None, cache_dir=None, resolution=resolution)

    assert is_sdxl_model(ns(sdxl_assets["pipe"])) and not is_sdxl_model(ns(assets["pipe"]))
    for path, sdxl, native in ((sdxl_assets["pipe"], True, 1024), (assets["pipe"], False, 512)):
        args = ns(path)
        assert resolve_resolution(args, sdxl) == native and args.resolution == native
        assert resolve_resolution(ns(path, 96), sdxl) == 96


# --------------------------------------------------------------------------------------------- validation (in process)
@pytest.mark.parametrize("guidance,expected", [(None, {}), (3.0, {"guidance_scale": 3.0})])
def test_validation_samples_at_the_given_guidance_or_the_pipelines_own(script, tmp_path, monkeypatch, guidance, expected):
    """`--validation_guidance_scale` reaches the pipeline call; unset, the pipeline keeps its own default (SD1.5 7.5,
    SDXL 5). The pipeline and scheduler are stand-ins that record how they were called."""
    import types

    import diffusers
    from PIL import Image

    import diffusers_innercontrol.pipeline_readout as pipeline_readout
    from diffusers_innercontrol import get_task

    calls = []

    class FakePipeline:
        def __init__(self, **kwargs):
            pass

        def to(self, device):
            return self

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, prompt, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    monkeypatch.setattr(pipeline_readout, "StableDiffusionControlNetReadoutPipeline", FakePipeline)
    monkeypatch.setattr(diffusers, "UniPCMultistepScheduler",
                        types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: None))
    control = tmp_path / "control.png"
    Image.new("RGB", (8, 8), "white").save(control)
    args = types.SimpleNamespace(validation_prompt=["p"], validation_image=[str(control)], pretrained_model_name_or_path="x",
                                 revision=None, seed=0, num_validation_inference_steps=2, num_validation_readouts=0,
                                 num_validation_images=1, resolution=8, validation_guidance_scale=guidance)
    models = {"vae": None, "text_encoder": None, "unet": None, "sdxl": False}
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), trackers=[])
    controlnet = types.SimpleNamespace(dtype=torch.float32)
    logs = script.log_validation(models, (None, None), controlnet, None, get_task("hed"), args, accelerator, torch.float32, 1)
    assert len(logs) == 1 and len(calls) == 1
    assert {k: v for k, v in calls[0].items() if k == "guidance_scale"} == expected
