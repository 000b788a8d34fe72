"""`make_bundle.sh`'s order of work, run with a fake `python` that records its arguments and writes empty weights.

What this checks is the recipe's wiring (which toy SD, rate, seed and starting ControlNet each run gets, and that a
rerun keeps what is done), not the training, which the scripts' own tests cover.
"""

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "innercontrol" / "shapesworld" / "make_bundle.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--output_dir" ] && out=$a; prev=$a; done
if [ -n "$out" ]; then mkdir -p "$out" && touch "$out/m.safetensors" "$out/README.md" "$out/config.json"; fi
"""


def _run(tmp_path, expect_error=None, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    (work / "shapes64").mkdir(parents=True, exist_ok=True)
    (work / "shapes64" / "metadata.jsonl").touch()
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CALLS=str(calls),
                    ASSETS_DIR=str(tmp_path / "assets"), **env)
    result = subprocess.run(["bash", str(SCRIPT), str(work), "2"], env=full_env, capture_output=True, text=True,
                            timeout=120)
    if expect_error:
        assert result.returncode != 0 and expect_error in result.stderr, result.stdout + result.stderr
        return work, {}
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {}
    for line in calls.read_text().splitlines() if calls.exists() else []:
        args = shlex.split(line)
        if "--output_dir" in args:
            opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
            runs[Path(opts["--output_dir"]).name] = opts
    return work, runs


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bundle"))


def test_toy_sd_is_the_8_channel_one_trained_longer_with_its_decoder_tuned(full_build):
    work, runs = full_build
    assert runs["toy-sd-8ch"]["--init_from"] == str(work / "vae8")
    assert runs["toy-sd-longer"]["--init_from"] == str(work / "toy-sd-8ch")
    assert runs["toy-sd-longer"]["--unet_steps"] == "6000" and runs["toy-sd-longer"]["--vae_steps"] == "0"
    # then the decoder alone, on the UNet's denoised latents, the UNet kept
    final = runs["toy-sd"]
    assert final["--init_from"] == str(work / "toy-sd-longer")
    assert (final["--vae_train"], final["--decoder_latents"], final["--unet_steps"]) == ("decoder", "denoised", "0")


def test_controlnet_segments_then_tuning_on_the_final_toy_sd(full_build):
    work, runs = full_build
    base, final = str(work / "toy-sd-8ch"), str(work / "toy-sd")
    seg0, seg1 = runs["controlnet-segmentation-s0"], runs["controlnet-segmentation-s1"]
    assert "--controlnet_model_name_or_path" not in seg0  # from the UNet
    assert seg1["--controlnet_model_name_or_path"] == str(work / "controlnet-segmentation-s0")
    assert (seg0["--max_train_steps"], seg1["--max_train_steps"]) == ("2000", "3500")
    assert {seg0["--pretrained_model_name_or_path"], seg1["--pretrained_model_name_or_path"]} == {base}
    assert seg0["--learning_rate"] == "5e-4" and (seg0["--seed"], seg1["--seed"]) == ("0", "1")
    assert not [name for name in runs if name.startswith("controlnet-segmentation-tune")]  # segmentation: none
    tune = runs["controlnet-depth-tune-s2"]
    assert tune["--controlnet_model_name_or_path"] == str(work / "controlnet-depth-s0")
    assert tune["--pretrained_model_name_or_path"] == final
    assert (tune["--learning_rate"], tune["--seed"], tune["--max_train_steps"]) == ("1.5e-3", "2", "1500")
    # the shipped folder is the last segment
    assert (work / "controlnet-depth" / "m.safetensors").exists()


def test_edge_tasks_start_from_depth_before_its_tuning(full_build):
    work, runs = full_build
    for task in ("hed", "lineart"):
        assert runs[f"controlnet-{task}-s0"]["--controlnet_model_name_or_path"] == str(work / "controlnet-depth-base")
    assert (work / "controlnet-depth-base" / "m.safetensors").exists()
    assert runs["controlnet-lineart-tune-s3"]["--controlnet_model_name_or_path"] == str(
        work / "controlnet-lineart-tune-s2")
    assert runs["controlnet-lineart-tune-s3"]["--max_train_steps"] == "3000"
    # probes read the final toy SD's UNet
    assert {runs[f"probe-{t}"]["--pretrained_model_name_or_path"] for t in ("hed", "depth")} == {str(work / "toy-sd")}


def test_a_rerun_keeps_every_model(tmp_path):
    work, _ = _run(tmp_path)
    _, runs = _run(tmp_path)
    assert not [name for name in runs if not name.startswith("fidelity")], runs.keys()
    # interrupted in depth's tuning: only that segment runs again
    for name in ("controlnet-depth", "controlnet-depth-tune-s2"):
        for f in (work / name).iterdir():
            f.unlink()
    _, runs = _run(tmp_path)
    assert [name for name in runs if not name.startswith("fidelity")] == ["controlnet-depth-tune-s2"]


def test_retuning_a_bundle_on_a_new_toy_sd(tmp_path):
    bundle, toy = tmp_path / "bundle", tmp_path / "new-toy-sd"
    for d in [toy] + [bundle / f"controlnet-{t}" for t in ("hed", "lineart", "depth", "segmentation")]:
        d.mkdir(parents=True)
    (toy / "README.md").touch()
    work, runs = _run(tmp_path, CN_INIT=str(bundle), TOY_SD=str(toy), STEPS_HED="", STEPS_LINEART="",
                      STEPS_DEPTH="", STEPS_SEGMENTATION="", TUNE_STEPS_LINEART="700", TUNE_STEPS_SEGMENTATION="1500")
    assert not any(name.startswith("toy-sd") or name.endswith(("-s0", "-s1")) for name in runs), runs.keys()
    for task in ("hed", "lineart", "depth", "segmentation"):
        tune = runs[f"controlnet-{task}-tune-s2"]
        assert tune["--controlnet_model_name_or_path"] == str(bundle / f"controlnet-{task}")
        assert tune["--pretrained_model_name_or_path"] == str(toy)
    assert runs["controlnet-lineart-tune-s2"]["--max_train_steps"] == "700"
    assert "controlnet-lineart-tune-s3" not in runs


def test_a_work_folder_from_before_the_decoder_fine_tune_is_refused(tmp_path):
    old = tmp_path / "work" / "toy-sd"
    old.mkdir(parents=True)
    (old / "README.md").touch()
    _run(tmp_path, expect_error="move it to")
    assert not (tmp_path / "calls.txt").exists()  # nothing ran
    old.rename(tmp_path / "work" / "toy-sd-longer")
    work, runs = _run(tmp_path)
    assert "toy-sd-longer" not in runs and runs["toy-sd"]["--init_from"] == str(work / "toy-sd-longer")
