"""The scripts' default world (`diffusers_innercontrol.toy.quickstart`): with no model and no data they run on the
bundled ShapesWorld models; options the user set are kept; with data given the base model stays SD1.5."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from diffusers_innercontrol.cli import DEFAULT_BASE_MODEL
from diffusers_innercontrol.toy import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "innercontrol")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return load("train_innercontrol"), load("train_probe")


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    """An assets folder with (empty) bundled model folders, a cache in tmp, and 6 scenes instead of 1000."""
    assets = tmp_path / "assets"
    for name in ["toy-sd"] + [f"{kind}-{t}" for kind in ("controlnet", "probe", "reward") for t in ("hed", "depth")]:
        (assets / name).mkdir(parents=True)
        (assets / name / "config.json").write_text("{}")
    monkeypatch.setattr(quickstart, "ASSETS_DIR", str(assets))
    monkeypatch.setattr(quickstart, "NUM_SCENES", 6)
    monkeypatch.setenv(quickstart.CACHE_ENV, str(tmp_path / "cache"))
    return assets


def tmp_cache(assets):
    return assets.parent / "cache"


def test_no_model_no_data_uses_shapesworld(scripts, fake_assets, capsys):
    train, _ = scripts
    args = train.parse_args(["--task", "hed"])
    assert not os.path.exists(tmp_cache(fake_assets)), "parsing renders nothing"
    assert capsys.readouterr().out == ""
    quickstart.prepare_default_world(args)  # what main does first
    assert args.pretrained_model_name_or_path == str(fake_assets / "toy-sd")
    assert args.controlnet_model_name_or_path == str(fake_assets / "controlnet-hed")
    assert args.probe_model_name_or_path == str(fake_assets / "probe-hed")  # hed: beta > 0
    assert args.reward_model_name_or_path == str(fake_assets / "reward-hed")  # hed: alpha > 0
    assert (args.resolution, args.max_train_steps, args.learning_rate) == (64, 200, 1e-4)
    with open(os.path.join(args.train_data_dir, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 6 and {"file_name", "text", "hed_file_name", "control_depth_file_name", "control_seg_file_name"} <= set(rows[0])
    # held-out validation controls of the task, with their captions
    assert len(args.validation_image) == len(args.validation_prompt) == 2
    assert all(os.path.isfile(p) and os.sep + "hed" + os.sep in p for p in args.validation_image)
    assert args.validation_image[0] not in {os.path.join(args.train_data_dir, r["hed_file_name"]) for r in rows}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "training on ShapesWorld" in out[0] and f"--pretrained_model_name_or_path {DEFAULT_BASE_MODEL}" in out[0]
    # the script's own validation accepts the result
    assert train.validate_args(args).name == "hed"


def test_user_options_are_kept(scripts, fake_assets):
    train, _ = scripts
    args = train.parse_args(["--task", "depth", "--beta", "0", "--resolution", "32", "--max_train_steps", "7",
                             "--controlnet_model_name_or_path", "mine", "--validation_prompt", "p", "--validation_image", "c.png"])
    assert args.pretrained_model_name_or_path == str(fake_assets / "toy-sd")
    assert args.controlnet_model_name_or_path == "mine"
    assert args.probe_model_name_or_path is None  # beta 0: no probe needed
    assert args.reward_model_name_or_path == str(fake_assets / "reward-depth")
    assert (args.resolution, args.max_train_steps) == (32, 7)
    assert (args.validation_prompt, args.validation_image) == (["p"], ["c.png"])
    assert args.validation_guidance_scale == quickstart.GUIDANCE_SCALE == 3.0  # the toy SD's, not SD1.5's 7.5
    assert train.parse_args(["--task", "depth", "--validation_guidance_scale", "5"]).validation_guidance_scale == 5.0
    assert args.train_data_dir.endswith("shapesworld-32px-seed0-0-6")
    assert quickstart.prepare_default_world(args) == [args.train_data_dir]  # no validation folder: the user's pair


def test_model_or_data_given_means_sd15(scripts, fake_assets, tmp_path):
    train, probe = scripts
    args = train.parse_args(["--task", "depth", "--train_data_dir", str(tmp_path)])
    assert args.pretrained_model_name_or_path == DEFAULT_BASE_MODEL
    # the resolution is the base model's native size, resolved in main once the model's family is known (512 px here)
    assert args.controlnet_model_name_or_path is None and args.resolution is None
    args = probe.parse_args(["--task", "depth", "--dataset_name", "x/y"])
    assert args.pretrained_model_name_or_path == DEFAULT_BASE_MODEL and args.train_data_dir is None
    args = train.parse_args(["--task", "depth", "--pretrained_model_name_or_path", "some/model"])
    assert args.pretrained_model_name_or_path == "some/model" and args.train_data_dir is None
    assert args.validation_guidance_scale is None  # the pipeline's own (7.5 for SD1.5, 5 for SDXL)


def test_probe_trainer_defaults(scripts, fake_assets):
    _, probe = scripts
    args = probe.parse_args(["--task", "depth"])
    assert args.pretrained_model_name_or_path == str(fake_assets / "toy-sd")
    assert args.controlnet_model_name_or_path is None  # the probe reads the plain UNet
    assert (args.resolution, args.max_train_steps, args.projection_dim, args.norm_num_groups) == (64, 300, 64, 16)
    assert args.validation_split == 32  # held-out scenes for the error per timestep bucket and the grid
    assert args.validation_image is None and not os.path.isdir(args.train_data_dir)
    quickstart.prepare_default_world(args)
    assert os.path.isfile(os.path.join(args.train_data_dir, "metadata.jsonl"))
    probe.validate_args(args)
    assert probe.parse_args(["--task", "depth", "--upsample_head", "false"]).upsample_head is False
    with pytest.raises(SystemExit):
        probe.parse_args(["--task", "depth", "--upsample_head", "maybe"])


def test_missing_assets_is_one_line(scripts, tmp_path, monkeypatch, capsys):
    train, _ = scripts
    monkeypatch.setattr(quickstart, "ASSETS_DIR", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--task", "hed"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "bundled ShapesWorld toy SD is missing" in err and f"--pretrained_model_name_or_path {DEFAULT_BASE_MODEL}" in err


def test_bad_task_is_reported_by_validation(scripts, fake_assets):
    train, _ = scripts
    args = train.parse_args(["--task", "depth", "--alignment_window", "900,100"])
    with pytest.raises(ValueError, match=r"alignment window \[900, 100\]"):
        train.validate_args(args)


def test_interrupted_render_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(quickstart.CACHE_ENV, str(tmp_path))

    def boom(tmp):
        open(os.path.join(tmp, "metadata.jsonl"), "w").close()
        raise KeyboardInterrupt

    target = str(tmp_path / "folder")
    with pytest.raises(KeyboardInterrupt):
        quickstart._atomic_folder(target, boom)
    assert not os.path.exists(target) and os.listdir(tmp_path) == []
    path = quickstart.shapesworld_folder(3, 32, start=5)
    with open(os.path.join(path, "metadata.jsonl")) as f:
        assert [json.loads(line)["file_name"] for line in f] == [f"images/00000{i}.png" for i in (5, 6, 7)]


# --------------------------------------------------------------------------------------------- e2e
needs_bundle = pytest.mark.skipif(quickstart.bundled_path("toy-sd") is None, reason="bundled ShapesWorld models absent")


@pytest.mark.e2e
@needs_bundle
@pytest.mark.parametrize("task", ["hed", "depth", "lineart", "segmentation"])
def test_quickstart_runs_on_the_bundled_world(task, tmp_path):
    """`accelerate launch train_innercontrol.py --task T`, no model or data: a ControlNet, a grid, a card."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env[quickstart.CACHE_ENV] = str(tmp_path / "cache")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(EXAMPLES, "train_innercontrol.py"),
           "--task", task, "--output_dir", str(out), "--max_train_steps", "2", "--validation_steps", "2",
           "--num_validation_inference_steps", "4", "--report_to", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "training on ShapesWorld" in output
    assert os.path.isfile(out / "diffusion_pytorch_model.safetensors")
    assert f"The ControlNet saved in {out}: diffusion_pytorch_model.safetensors, config.json; model card README.md" in output
    assert os.path.isfile(out / "images_0.png")
    card = (out / "README.md").read_text()
    assert quickstart.bundled_path("toy-sd") not in card and "`toy-sd`, the toy Stable Diffusion of ShapesWorld" in card
    assert "A ShapesWorld toy." in card and 'bundled_path("toy-sd")' in card
    assert f"guidance_scale={quickstart.GUIDANCE_SCALE}," in card  # the how-to samples as validation did
    assert f"| validation_guidance_scale | `{quickstart.GUIDANCE_SCALE}` |" in card


@pytest.mark.e2e
@needs_bundle
def test_readme_readout_snippet_runs(tmp_path, monkeypatch):
    """The README's Python quickstart (readouts of the bundled depth probe while sampling) runs as written."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quick = text[text.index("## Quickstart"):text.index("## On Stable Diffusion 1.5")]
    blocks = re.findall(r"```python\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 1 and "bundled_path" in blocks[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(quickstart.CACHE_ENV, str(tmp_path / "cache"))
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, pipe = namespace["out"], namespace["pipe"]
    assert out.readout_step_indices[-1] == len(pipe.scheduler.timesteps) - 1  # it reads out the final step
    from PIL import Image

    grid = Image.open(tmp_path / "readouts.png")
    assert grid.size[1] > 64 and grid.size[0] >= 64 * 6  # control | 4 readouts | image, under their labels


@pytest.mark.e2e
@needs_bundle
def test_probe_trainer_runs_on_the_bundled_world(tmp_path):
    """`accelerate launch train_probe.py --task depth`, no model or data: a probe, its grid and card."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env[quickstart.CACHE_ENV] = str(tmp_path / "cache")
    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(EXAMPLES, "train_probe.py"),
           "--task", "depth", "--output_dir", str(out), "--max_train_steps", "2", "--report_to", "none",
           "--max_validation_samples", "4", "--num_grid_samples", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "training on ShapesWorld" in output
    assert f"The probe saved in {out}: diffusion_pytorch_model.safetensors, config.json" in output
    from diffusers_innercontrol import ReadoutProbe

    probe = ReadoutProbe.from_pretrained(str(out))
    assert probe.config.projection_dim == 64 and probe.config.task == "depth"
    assert os.path.isfile(out / "validation_grid.png") and os.path.isfile(out / "README.md")


def test_bundled_models_and_results_record_no_local_paths():
    """The shipped configs and cards, and the measured results in docs/results, name no folder of the machine they
    were made on."""
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")
    found = []
    for root in (quickstart.ASSETS_DIR, results):
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith((".json", ".md")):
                    text = open(os.path.join(folder, name), encoding="utf-8").read()
                    if "/work/" in text or '"_name_or_path": "/' in text:
                        found.append(os.path.relpath(os.path.join(folder, name), root))
    assert found == []


def test_a_resolution_shapesworld_cannot_render_names_the_option(scripts, fake_assets):
    train, _ = scripts
    args = train.parse_args(["--task", "hed", "--resolution", "63"])
    with pytest.raises(ValueError, match=r"^--resolution 63: ShapesWorld renders multiples of 8 from 32 px; pass --resolution 64"):
        quickstart.prepare_default_world(args)
    assert not os.path.exists(tmp_cache(fake_assets))
