"""examples/innercontrol/shapesworld/from_scratch.py: the learning-curve bookkeeping by hand, and the protocol's quick
mode end to end on the tiny models (marked e2e)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SW = os.path.join(ROOT, "examples", "innercontrol", "shapesworld")


@pytest.fixture(scope="module")
def fs():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("from_scratch")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")


def test_evaluated_steps_and_where_their_weights_are(fs):
    assert fs.evaluated_steps(1000, 250) == [250, 500, 750, 1000]
    assert fs.evaluated_steps(1000, 300) == [300, 600, 900, 1000]  # the last step always
    assert fs.evaluated_steps(5, 5) == [5]
    assert fs.weights_at("r", 250, 1000) == os.path.join("r", "checkpoint-250", "model.safetensors")
    assert fs.weights_at("r", 1000, 1000) == os.path.join("r", "diffusion_pytorch_model.safetensors")
    assert fs.images_at("r", 250, 1000) == os.path.join("r", "eval-step250") and fs.images_at("r", 1000, 1000) == os.path.join("r", "eval")


def test_summary_by_hand(fs):
    """Two seeds a mode, closures at steps 0, 100, 200. Baseline seeds reach 0.5 at 100 + 0.3/0.4*100 = 175 and
    100 + 0.1/0.2*100 = 150; alignment seeds at 0 + 0.5/0.6*100 = 83.3 and 0 + 0.5/1.0*100 = 50. At 0.25:
    baseline 100 + 0.05/0.4*100 = 112.5 and 0.25/0.4*100 = 62.5; alignment 0.25/0.6*100 = 41.7 and 25."""
    def run(mode, seed, closures):
        return {"task": "depth", "mode": mode, "seed": seed, "curve": {"steps": [0, 100, 200], "closures": closures}}

    runs = [run("controlnet", 0, [0.0, 0.2, 0.6]), run("controlnet", 1, [0.0, 0.4, 0.6]),
            run("alignment", 0, [0.0, 0.6, 0.7]), run("alignment", 1, [0.0, 1.0, 1.0]),
            run("reward200_alignment", 0, [0.0, 0.1, 0.2]), run("reward200_alignment", 1, [0.0, 0.3, 0.9])]
    out = fs.summarize_task(runs, "depth", ["controlnet", "alignment", "reward200_alignment"], [0.5, 0.25])
    base, base_q = out["controlnet"]["targets"]["0.5"], out["controlnet"]["targets"]["0.25"]
    assert base["steps_to_target"] == pytest.approx([175.0, 150.0]) and base_q["steps_to_target"] == pytest.approx([112.5, 62.5])
    assert base["stats"]["mean"] == pytest.approx(162.5)
    assert base["stats"]["std"] == pytest.approx(math.sqrt(2 * 12.5 ** 2))  # n - 1
    assert out["controlnet"]["closure"][1]["mean"] == pytest.approx(0.3) and base["vs_controlnet"] is None
    assert out["controlnet"]["closure_vs_controlnet"] is None
    align = out["alignment"]["targets"]
    assert align["0.5"]["steps_to_target"] == pytest.approx([500 / 6, 50.0])
    assert align["0.5"]["vs_controlnet"]["diff"] == pytest.approx((500 / 6 + 50) / 2 - 162.5)
    assert align["0.25"]["steps_to_target"] == pytest.approx([250 / 6, 25.0])
    assert align["0.25"]["vs_controlnet"]["diff"] == pytest.approx((250 / 6 + 25) / 2 - 87.5)
    # the closure against the baseline's at each step: step 0 is the toy SD everywhere (no test); step 100:
    # 0.8 - 0.3, variances 0.08 and 0.02 over 2 seeds: t = 0.5 / sqrt(0.05), df = 0.05^2 / (0.04^2 + 0.01^2);
    # step 200: the baseline does not vary, 0.85 - 0.6, t = 0.25 / sqrt(0.045 / 2), df = 1
    tests = out["alignment"]["closure_vs_controlnet"]
    assert tests[0] is None
    assert tests[1]["diff"] == pytest.approx(0.5) and tests[1]["t"] == pytest.approx(0.5 / math.sqrt(0.05))
    assert tests[1]["df"] == pytest.approx(0.05 ** 2 / (0.04 ** 2 + 0.01 ** 2))
    assert tests[2]["t"] == pytest.approx(0.25 / 0.15) and tests[2]["df"] == pytest.approx(1.0)
    both = out["reward200_alignment"]["targets"]  # seed 0 never reaches 0.5 nor 0.25: no mean, no test
    assert both["0.5"]["steps_to_target"][0] is None and both["0.5"]["reached"] == 1
    assert both["0.5"]["stats"] is None and both["0.5"]["vs_controlnet"] is None
    assert both["0.25"]["steps_to_target"] == pytest.approx([None, 250 / 3]) and both["0.25"]["reached"] == 1
    # a baseline seed that never reaches it: no test for any mode (the slow seeds are not dropped)
    runs[1] = run("controlnet", 1, [0.0, 0.1, 0.2])
    out = fs.summarize_task(runs, "depth", ["controlnet", "alignment"], [0.5])
    assert out["controlnet"]["targets"]["0.5"]["reached"] == 1 and out["alignment"]["targets"]["0.5"]["vs_controlnet"] is None


def test_report_has_every_level_and_the_per_step_tests(fs):
    def run(mode, seed, closures):
        return {"task": "depth", "mode": mode, "seed": seed, "curve": {"steps": [0, 100, 200], "closures": closures}}

    runs = [run("controlnet", 0, [0.0, 0.2, 0.6]), run("controlnet", 1, [0.0, 0.4, 0.6]),
            run("alignment", 0, [0.0, 0.6, 0.7]), run("alignment", 1, [0.0, 1.0, 1.0])]
    modes = ["controlnet", "alignment"]
    args = {"max_train_steps": 200, "train_batch_size": 8, "learning_rate": 5e-4, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "seeds": [0, 1], "eval_every": 100, "num_eval_conditions": 2, "eval_start_index": 0,
            "num_inference_steps": 2, "guidance_scale": 7.5, "target_closure": [0.5, 0.25]}
    result = {"args": args, "tasks": {"depth": {"floor": 1.0, "ceiling": 2.0, "steps": [0, 100, 200]}},
              "summary": {"depth": fs.summarize_task(runs, "depth", modes, [0.5, 0.25])},
              "mode_labels": {"controlnet": "ControlNet", "alignment": "Alignment only"}, "seconds": 1.0}
    md = fs.results_markdown(result)
    assert "| steps to 50 % closure | steps to 25 % closure |" in md
    assert "| ControlNet | 162 ± 18 | 88 ± 35 |" in md  # (175 + 150) / 2 and (112.5 + 62.5) / 2
    assert "| Alignment only | 67 ± 24: -96 [" in md  # (83.3 + 50) / 2 - 162.5
    assert "| Alignment only | - | +50.0 (" in md  # the closure 0.8 against 0.3 at step 100, none at step 0


def test_level_from_summary_and_report_by_hand(fs):
    """Closures at steps 0-300, level from step 100 (3 evaluations). Baseline seeds: 0.2, 0.4, 0.6 (level 0.4,
    slope 0.002 a step = 2.0 per 1000) and 0.2 flat (0.2, slope 0); alignment: 0.6 flat (0.6) and 0.9, 0.8, 0.7
    (0.8, slope -1.0 per 1000). Welch on the levels: diff 0.7 - 0.3 = 0.4, each side's variance 0.02 over 2 seeds,
    se = sqrt(0.01 + 0.01), t = 0.4 / 0.1414 = 2.828, df = 0.02^2 / (0.01^2 + 0.01^2) = 2, and with 2 degrees of
    freedom p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(8 / 10) = 0.1056."""
    def run(mode, seed, closures):
        return {"task": "depth", "mode": mode, "seed": seed, "curve": {"steps": [0, 100, 200, 300], "closures": closures}}

    runs = [run("alignment", 1, [0.0, 0.9, 0.8, 0.7]), run("controlnet", 0, [0.0, 0.2, 0.4, 0.6]),
            run("controlnet", 1, [0.0, 0.2, 0.2, 0.2]), run("alignment", 0, [0.0, 0.6, 0.6, 0.6])]
    modes = ["alignment", "controlnet"]  # the baseline is summarized first whatever the order
    out = fs.summarize_task(runs, "depth", modes, [0.5], level_from=100)
    base, align = out["controlnet"]["level"], out["alignment"]["level"]
    assert base["from"] == 100 and base["evaluations"] == 3 and base["vs_controlnet"] is None
    assert [r["closure"] for r in base["per_seed"]] == pytest.approx([0.4, 0.2])
    assert [r["slope_per_1000_steps"] for r in base["per_seed"]] == pytest.approx([2.0, 0.0])
    assert base["closure"]["mean"] == pytest.approx(0.3) and base["closure"]["std"] == pytest.approx(math.sqrt(0.02))
    assert [(r["seed"], r["slope_per_1000_steps"]) for r in align["per_seed"]] == [(0, pytest.approx(0.0)), (1, pytest.approx(-1.0))]
    test = align["vs_controlnet"]
    assert test["diff"] == pytest.approx(0.4) and test["t"] == pytest.approx(0.4 / math.sqrt(0.02))
    assert test["df"] == pytest.approx(2.0) and test["p"] == pytest.approx(1 - math.sqrt(0.8))
    assert "level" not in fs.summarize_task(runs, "depth", modes, [0.5])["controlnet"]  # only when asked
    args = {"max_train_steps": 300, "train_batch_size": 8, "learning_rate": 5e-4, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "seeds": [0, 1], "eval_every": 100, "num_eval_conditions": 2, "eval_start_index": 0,
            "num_inference_steps": 2, "guidance_scale": 7.5, "target_closure": [0.5]}
    result = {"args": args, "tasks": {"depth": {"floor": 1.0, "ceiling": 2.0, "steps": [0, 100, 200, 300]}},
              "summary": {"depth": out}, "seconds": 1.0,
              "mode_labels": {"controlnet": "ControlNet", "alignment": "Alignment only"}}
    md = fs.results_markdown(result)
    assert "Level from step 100: per seed the mean closure over the 3 evaluations" in md
    assert "| ControlNet | 30.0 ± 14.1 % | +100.00 ± 141.42 | - | - | 0: 40.0, 1: 20.0 |" in md
    assert "| Alignment only | 70.0 ± 14.1 % | -50.00 ± 70.71 | +40.0 [" in md and "| 0.106 | 0: 60.0, 1: 80.0 |" in md
    with pytest.raises(ValueError, match="at least 2 evaluated steps from step 300"):
        fs.summarize_task(runs, "depth", modes, [0.5], level_from=300)
    fs.check_level_from(200, [0, 100, 200, 300])
    fs.check_level_from(None, [])
    with pytest.raises(ValueError, match="--level_from 250: fewer than 2 evaluated steps from there on .the last is 300.; "
                                         "give --level_from 200 or lower"):
        fs.check_level_from(250, [0, 100, 200, 300])
    for bad, steps, message in ((0, [0, 100, 200], r"--level_from 0: give a training step >= 1 \(step 0 is the toy SD alone\)"),
                                (50, [0, 100], r"\(the last is 100\); evaluate more often \(--eval_every\)"),
                                (50, [], r"\(none was evaluated\); evaluate more often")):
        with pytest.raises(ValueError, match=message):
            fs.check_level_from(bad, steps)
    # without a baseline, or with one seed on a side, the levels are reported without a test
    alone = fs.summarize_task([r for r in runs if r["mode"] == "alignment"], "depth", modes, [0.5], level_from=100)
    assert alone["alignment"]["level"]["vs_controlnet"] is None and alone["controlnet"] == {"seeds": []}
    one_seed = fs.summarize_task([r for r in runs if r["seed"] == 0], "depth", modes, [0.5], level_from=100)
    assert one_seed["alignment"]["level"]["vs_controlnet"] is None
    assert one_seed["alignment"]["level"]["closure"] == {"mean": pytest.approx(0.6), "std": 0.0, "n": 1}


def test_bad_arguments_fail_before_work(fs, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", "d", "--tasks", "depth",
            "--modes", "controlnet"]
    with pytest.raises(ValueError, match="--eval_every 2000 is beyond --max_train_steps 1000"):
        fs.parse_args(base + ["--eval_every", "2000"])
    with pytest.raises(ValueError, match="--seeds 0,0: a seed is repeated"):
        fs.parse_args(base + ["--seeds", "0,0"])
    for levels in ("1.5", "0.2,0", ",", "0.2,0.2"):
        with pytest.raises(ValueError, match="--target_closure"):
            fs.parse_args(base + ["--target_closure", levels])
    assert fs.parse_args(base + ["--target_closure", "0.15,0.25"]).target_closure == [0.15, 0.25]
    with pytest.raises(ValueError, match="--level_from 1000: fewer than 2 evaluated steps .* give --level_from 750 or lower"):
        fs.parse_args(base + ["--level_from", "1000"])  # evaluated at 0, 250, ..., 1000
    assert fs.parse_args(base + ["--level_from", "750"]).level_from == 750
    with pytest.raises(ValueError, match="--depth_probe"):
        fs.parse_args(base[:-1] + ["alignment"])
    for option in ("--use_ema", "--use_lora", "--checkpoints_total_limit 2"):  # checkpoints that are not the curve's
        with pytest.raises(ValueError, match=f"--extra_train_args {option.split()[0]}: not with learning curves"):
            fs.parse_args(base + [f"--extra_train_args={option}"])
    args = fs.parse_args(base)  # the shipped ControlNets' recipe, a constant rate
    assert (args.learning_rate, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps) == (5e-4, "constant_with_warmup", 100, 1000)
    assert not hasattr(args, "depth_controlnet")  # every run starts from the UNet
    train = fs.experiment.train_args_for(args, "depth", "controlnet", 0, checkpointing_steps=250)
    opts = {train[i]: train[i + 1] for i in range(len(train) - 1) if train[i].startswith("--")}
    assert opts["--checkpointing_steps"] == "250" and opts["--lr_scheduler"] == "constant_with_warmup"
    assert "--controlnet_model_name_or_path" not in opts


@pytest.mark.e2e
def test_from_scratch_quick(tmp_path, tiny_pipeline_path):
    """Two modes from the UNet, 4 steps with a checkpoint every 2: each checkpoint and the final ControlNet
    evaluated, the curves start at the toy SD alone (closure 0), the report and the plot written."""
    from _data_fixtures import toy_depth_experiment

    from diffusers_innercontrol.evaluation import image_path

    data, depth_model, probe_dir = toy_depth_experiment(tmp_path, tiny_pipeline_path)
    out = tmp_path / "fs"
    cmd = [sys.executable, os.path.join(SW, "from_scratch.py"), "--quick", "--tasks", "depth",
           "--modes", "controlnet,alignment", "--seeds", "0", "--resolution", "32",
           "--pretrained_model_name_or_path", tiny_pipeline_path, "--train_data_dir", data,
           "--depth_probe", probe_dir, "--depth_eval_model", depth_model, "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["train"]) for r in result["runs"]] == [("controlnet", "trained"), ("alignment", "trained")]
    info = result["tasks"]["depth"]
    assert info["steps"] == [0, 2, 4] and info["num_conditions"] == 2
    for run in result["runs"]:
        assert os.path.isfile(os.path.join(run["dir"], "checkpoint-2", "model.safetensors"))
        curve = run["curve"]
        assert curve["steps"] == [0, 2, 4] and curve["values"][0] == info["ceiling"] and curve["closures"][0] == 0.0
        assert all(math.isfinite(v) for v in curve["closures"])
        assert curve["closures"][1] == pytest.approx((info["ceiling"] - curve["values"][1]) / (info["ceiling"] - info["floor"]))
        for folder in ("eval-step2", "eval"):  # one image per held-out scene
            assert all(os.path.isfile(image_path(os.path.join(run["dir"], folder), i, 0)) for i in (0, 1))
    # the checkpoint after 2 steps is not the final ControlNet: the evaluations read different weights
    run_dir = str(out / "runs" / "depth" / "controlnet" / "seed0")
    assert any(open(image_path(os.path.join(run_dir, "eval-step2"), i, 0), "rb").read()
               != open(image_path(os.path.join(run_dir, "eval"), i, 0), "rb").read() for i in (0, 1))
    md = (out / "from_scratch.md").read_text()
    assert "| Alignment only |" in md and "step 4" in md and "steps to 50 % closure" in md
    assert result["plots"].get("depth") or "matplotlib" in result.get("plots_note", "")
    assert (out / result["grids"]["depth"]).is_file()
    # started again: nothing is trained twice
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((out / "results.json").read_text())
    assert [r["train"] for r in before["runs"]] == ["reused", "reused"]
    # a larger --max_train_steps resumes the finished run from its checkpoint-4: the step-4 evaluation reads those
    # weights again (the same images, the same value), the superseded final weights and images are kept aside
    longer = cmd[:cmd.index("--modes")] + ["--modes", "controlnet", "--max_train_steps", "6"] + cmd[cmd.index("--modes") + 2:]
    proc = subprocess.run(longer, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["train"] == "trained" and run["extended_from"] == 4 and run["curve"]["steps"] == [0, 2, 4, 6]
    assert run["curve"]["values"][:3] == pytest.approx(before["runs"][0]["curve"]["values"])
    assert os.path.isfile(os.path.join(run_dir, "checkpoint-6", "model.safetensors"))
    assert os.path.isfile(os.path.join(run_dir, "superseded-4", "diffusion_pytorch_model.safetensors"))
    assert any(open(image_path(os.path.join(run_dir, "superseded-4", "eval"), i, 0), "rb").read()
               != open(image_path(os.path.join(run_dir, "eval"), i, 0), "rb").read() for i in (0, 1))  # made again
    assert "trained 6 steps" in open(os.path.join(run_dir, "train.log")).read()


def _finished_run(fs, tmp_path, steps=500, extra=()):
    """A fake run trained to `steps` with a checkpoint every 250: weights, config, eval images, run.json."""
    args = fs.parse_args(_base(tmp_path) + ["--max_train_steps", str(steps), *extra])
    out = tmp_path / "runs" / "depth" / "controlnet" / "seed0"
    for step in range(250, steps + 1, 250):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / "eval").mkdir()
    (out / "eval" / "0.png").write_bytes(b"old")
    (out / "config.json").write_text("{}")
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    train_args = fs.experiment.train_args_for(args, "depth", "controlnet", 0, checkpointing_steps=250)
    (out / "run.json").write_text(json.dumps({"max_train_steps": steps, "train_args": train_args}))
    return out


def _base(tmp_path):
    return ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", "d", "--tasks", "depth",
            "--modes", "controlnet", "--seeds", "0", "--eval_every", "250", "--output_dir", str(tmp_path)]


def test_run_record_from_run_json_or_the_training_log(fs, tmp_path):
    assert fs.experiment.run_record(str(tmp_path)) is None
    (tmp_path / "train.log").write_text("Steps: 100%\n[process 0/1] trained 750 steps; last losses {}\n"
                                        "[process 0/1] trained 1500 steps; last losses {}\n")
    assert fs.experiment.run_record(str(tmp_path)) == {"max_train_steps": 1500, "train_args": None}  # the last
    (tmp_path / "run.json").write_text(json.dumps({"max_train_steps": 3000, "train_args": ["--seed", "0"]}))
    assert fs.experiment.run_record(str(tmp_path))["max_train_steps"] == 3000


def test_existing_runs_are_checked_before_anything_is_trained(fs, tmp_path):
    _finished_run(fs, tmp_path, 500)
    base = _base(tmp_path)
    assert fs.parse_args(base + ["--max_train_steps", "1000"]).max_train_steps == 1000  # constant: extended
    assert fs.parse_args(base + ["--max_train_steps", "500", "--skip_training"]).skip_training  # the same length
    for extra, message in (
        (["--max_train_steps", "1000", "--skip_training"], "trained to 500 steps: drop --skip_training"),
        (["--max_train_steps", "400"], "trained to step 500, beyond --max_train_steps 400: give --max_train_steps 500"),
        (["--max_train_steps", "1000", "--eval_every", "200"], "has no checkpoint-200, which --eval_every 200"),
        (["--max_train_steps", "1000", "--learning_rate", "1e-3"], r"other settings \(--learning_rate\)"),
        (["--max_train_steps", "1000", "--lr_scheduler", "cosine"], r"other settings \(--lr_scheduler\)"),
        (["--max_train_steps", "1000", "--extra_train_args=--lr_scheduler cosine"], r"other settings \(--lr_scheduler\)"),
    ):
        with pytest.raises(ValueError, match=message):
            fs.parse_args(base + extra)


def test_a_run_moved_to_another_folder_can_still_be_extended(fs, tmp_path):
    out = _finished_run(fs, tmp_path, 500)
    record = json.loads((out / "run.json").read_text())
    train_args = record["train_args"]
    train_args[train_args.index("--output_dir") + 1] = "elsewhere/runs/depth/controlnet/seed0"  # where it was trained
    (out / "run.json").write_text(json.dumps(record))
    assert fs.parse_args(_base(tmp_path) + ["--max_train_steps", "1000"]).max_train_steps == 1000
    with pytest.raises(ValueError, match=r"other settings \(--learning_rate\)"):  # other options still count
        fs.parse_args(_base(tmp_path) + ["--max_train_steps", "1000", "--learning_rate", "1e-3"])


def test_a_schedule_that_depends_on_the_length_is_not_extended(fs, tmp_path):
    _finished_run(fs, tmp_path, 500, extra=["--lr_scheduler", "cosine"])
    with pytest.raises(ValueError, match="--lr_scheduler cosine depends on the run's length"):
        fs.parse_args(_base(tmp_path) + ["--max_train_steps", "1000", "--lr_scheduler", "cosine"])
    fs.parse_args(_base(tmp_path) + ["--max_train_steps", "500", "--lr_scheduler", "cosine"])


def test_an_unfinished_run_with_checkpoints_beyond_the_steps_is_refused(fs, tmp_path):
    (tmp_path / "runs" / "depth" / "controlnet" / "seed0" / "checkpoint-750").mkdir(parents=True)
    with pytest.raises(ValueError, match="trained to step 750, beyond --max_train_steps 500"):
        fs.parse_args(_base(tmp_path) + ["--max_train_steps", "500"])


def test_train_run_extends_a_finished_run(fs, tmp_path, monkeypatch):
    out = _finished_run(fs, tmp_path, 500)
    calls = []
    monkeypatch.setattr(fs.experiment.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    args = fs.parse_args(_base(tmp_path) + ["--max_train_steps", "1000"])
    args.skip_training = True  # (refused at parse time) nothing moves, nothing trains
    assert fs.experiment.train_run(args, "depth", "controlnet", 0, checkpointing_steps=250)["train"] == "reused"
    assert not calls and (out / "eval").is_dir()
    args.skip_training = False
    record = fs.experiment.train_run(args, "depth", "controlnet", 0, checkpointing_steps=250)
    assert record["train"] == "trained" and record["extended_from"] == 500
    (cmd,) = calls
    assert cmd[cmd.index("--max_train_steps") + 1] == "1000" and cmd[cmd.index("--resume_from_checkpoint") + 1] == "latest"
    kept = out / "superseded-500"
    assert (kept / "diffusion_pytorch_model.safetensors").read_bytes() == b"w" and (kept / "eval" / "0.png").is_file()
    assert (kept / "config.json").is_file() and not (out / "eval").exists()
    assert json.loads((out / "run.json").read_text())["max_train_steps"] == 1000
    # interrupted after the weights moved (the fake training wrote none): started again, it still says where from
    (out / "run.json").write_text(json.dumps({"max_train_steps": 500, "train_args": None}))
    assert fs.experiment.train_run(args, "depth", "controlnet", 0, checkpointing_steps=250)["extended_from"] == 500
    # the weights move last: a copy of the eval images that cannot be moved stops before the finished marker does
    (tmp_path / "b").mkdir()
    out2 = _finished_run(fs, tmp_path / "b", 500)
    (out2 / "superseded-500" / "eval").mkdir(parents=True)
    (out2 / "superseded-500" / "eval" / "x").write_text("")  # os.replace onto a non-empty folder fails
    args.output_dir = str(tmp_path / "b")
    with pytest.raises(OSError):
        fs.experiment.train_run(args, "depth", "controlnet", 0, checkpointing_steps=250)
    assert (out2 / "diffusion_pytorch_model.safetensors").is_file()


def test_images_of_another_protocol_are_refused_before_training(fs, tmp_path):
    """An images folder in --output_dir made with other scenes or settings stops the call at parse time."""
    from diffusers_innercontrol.evaluation import IMAGES_RECORD

    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", "d", "--tasks", "depth",
            "--modes", "controlnet", "--seeds", "0", "--output_dir", str(tmp_path / "o"), "--eval_start_index", "100000"]
    args = fs.parse_args(base)  # nothing there yet
    from diffusers_innercontrol.evaluation import images_record
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    made = images_record(ShapesWorldEvalSet("depth", 64, 0, 100000, 64), 20, 7.5, None, 64)
    for folder, record in (("runs/depth/controlnet/seed0/eval-step250", made), ("depth/no-controlnet", dict(made, with_control=False)),
                           ("depth/real", {"conditions": made["conditions"], "images": "real"})):
        os.makedirs(tmp_path / "o" / folder)
        with open(tmp_path / "o" / folder / IMAGES_RECORD, "w") as f:
            json.dump(record, f)
    assert fs.parse_args(base).guidance_scale == 7.5  # the same protocol: served
    with pytest.raises(ValueError, match="no-controlnet holds images made with guidance_scale = 7.5, not 2.0"):
        fs.parse_args(base + ["--guidance_scale", "2"])
    with pytest.raises(ValueError, match="no-controlnet holds images made with conditions"):
        fs.parse_args(base[:-1] + ["100064"])
    os.remove(tmp_path / "o" / "depth" / "no-controlnet" / IMAGES_RECORD)
    with pytest.raises(ValueError, match="real holds images made with conditions"):
        fs.parse_args(base[:-1] + ["100064"])
    os.remove(tmp_path / "o" / "depth" / "real" / IMAGES_RECORD)
    with pytest.raises(ValueError, match="seed0/eval-step250 holds images made with guidance_scale = 7.5, not 2.0"):
        fs.parse_args(base + ["--guidance_scale", "2"])
    assert args.eval_start_index == 100000


def test_quick_keeps_the_options_given(fs, tmp_path):
    args = fs.parse_args(_base(tmp_path)[:-4] + ["--quick", "--max_train_steps", "6"])
    assert (args.max_train_steps, args.eval_every, args.num_eval_conditions) == (6, 2, 2)
    with pytest.raises(SystemExit):  # no abbreviations: --quick could not tell them from its own counts
        fs.parse_args(_base(tmp_path) + ["--max_train", "6"])


def test_one_seed_a_mode_gives_no_tests(fs):
    runs = [{"task": "depth", "mode": m, "seed": 0, "curve": {"steps": [0, 100], "closures": [0.0, c]}}
            for m, c in (("controlnet", 0.6), ("alignment", 0.8))]
    out = fs.summarize_task(runs, "depth", ["controlnet", "alignment"], [0.5])
    assert out["alignment"]["closure_vs_controlnet"] == [None, None]
    assert out["alignment"]["targets"]["0.5"]["vs_controlnet"] is None
    assert fs.welch_or_none([1.0, 1.0], [2.0, 2.0]) is None and fs.welch_or_none([1.0, 2.0], [2.0, 2.0])["diff"] == -0.5


# --- protocol.py: the three stages in one command ------------------------------------------------------
@pytest.fixture(scope="module")
def protocol():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("protocol")


def test_protocol_stages_are_the_documented_settings(protocol, tmp_path, capsys):
    args = protocol.parse_args(["--output_dir", str(tmp_path / "p"), "--jobs", "2"])
    stages = protocol.parse_stages(args)
    t2 = stages["table2"]
    assert list(t2.modes) == list(protocol.run_experiment.MODES) and t2.seeds == [0, 1, 2, 3, 4]
    assert (t2.max_train_steps, t2.train_batch_size, t2.learning_rate, t2.num_eval_conditions) == (500, 8, 1e-5, 256)
    assert t2.tasks == ["hed", "lineart", "depth", "segmentation"] and t2.eval_start_index == 100000 and t2.jobs == 2
    assert t2.depth_controlnet.endswith("controlnet-depth") and t2.hed_reward_model.endswith("reward-hed")
    assert stages["fig2"].fig2_only and stages["fig2"].segmentation_probe.endswith("probe-segmentation")
    fs = stages["from_scratch"]
    assert fs.tasks == ["depth", "hed"] and fs.seeds == [0, 1, 2] and (fs.max_train_steps, fs.eval_every) == (1500, 250)
    assert fs.level_from == 1000
    assert {os.path.basename(s.output_dir) for s in stages.values()} == {"table2", "fig2", "from-scratch"}
    assert t2.train_data_dir == fs.train_data_dir == str(tmp_path / "p" / "shapes64")  # one set of training scenes

    assert protocol.main(protocol.parse_args(["--output_dir", str(tmp_path / "p"), "--stages", "fig2", "--dry_run"])) == {}
    out = capsys.readouterr().out
    assert out.startswith("# fig2\npython ") and "--fig2_only" in out and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="--stages"):
        protocol.parse_args(["--stages", "table3"])


def test_protocol_bad_input_is_one_line(protocol, capsys):
    with pytest.raises(SystemExit) as info:
        protocol.cli_main(["--tasks", "depth,colour", "--dry_run"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks ['colour']") and "\n" not in err


def test_step_zero_is_the_toy_sd_alone(tiny_pipeline_path, fs):
    """A ControlNet initialised from the UNet (zero output convolutions) adds nothing: its pipeline draws the images
    of the text-to-image pipeline alone, which is why the curves start at the ceiling."""
    import numpy as np
    from diffusers import ControlNetModel, UNet2DConditionModel

    from diffusers_innercontrol.evaluation import load_generation_pipeline
    from diffusers_innercontrol.training import conditioning_channels_for

    pipe = load_generation_pipeline(tiny_pipeline_path)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    pipe.controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(
        pipe.vae_scale_factor))
    plain = fs.no_controlnet_pipeline(pipe)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["a red circle"], num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
    with_cn = pipe(image=control, generator=torch.Generator().manual_seed(3), **kw).images
    alone = plain(generator=torch.Generator().manual_seed(3), **kw).images
    np.testing.assert_allclose(with_cn, alone, atol=1e-5)
    trained = pipe.controlnet.controlnet_mid_block
    torch.nn.init.normal_(trained.weight, std=0.5)  # a ControlNet that adds something draws something else
    assert np.abs(pipe(image=control, generator=torch.Generator().manual_seed(3), **kw).images - alone).max() > 1e-3


def test_protocol_wall_time_sums_the_calls_that_resumed_it(protocol, tmp_path, monkeypatch):
    """A protocol run over several calls (each resuming the last) records each stage's wall time as the sum of its
    calls; a call that died is on record as unfinished and adds nothing."""
    import types

    clock = {"now": 0.0}
    costs = {"table2": [100.0, 30.0], "fig2": [5.0]}  # seconds each call of the stage takes

    def fake(stage):
        def main(parsed):
            if parsed == "die":
                raise KeyboardInterrupt
            clock["now"] += costs[stage].pop(0)
        return types.SimpleNamespace(__name__=stage, parse_args=lambda argv: "die" if die[stage] else "ok", main=main)

    die = {"table2": False, "fig2": False}
    monkeypatch.setattr(protocol, "SCRIPTS", {"table2": fake("table2"), "fig2": fake("fig2")})
    monkeypatch.setattr(protocol.time, "perf_counter", lambda: clock["now"])
    argv = ["--output_dir", str(tmp_path / "p"), "--stages", "table2,fig2"]
    path = tmp_path / "p" / "protocol.json"

    die["fig2"] = True  # first call: table2 finishes (100 s), then the session ends during fig2
    with pytest.raises(KeyboardInterrupt):
        protocol.main(protocol.parse_args(argv))
    first = json.loads(path.read_text())
    assert first["stages"]["table2"]["seconds"] == 100.0 and first["seconds"] == 100.0
    f2 = first["stages"]["fig2"]
    assert (f2["seconds"], f2["calls"], f2["unfinished_calls"]) == (0.0, 1, 1)
    assert f2["history"][0]["seconds"] is None and f2["history"][0]["command"]

    die["fig2"] = False  # second call resumes both: table2's rest 30 s, fig2 5 s
    record = protocol.main(protocol.parse_args(argv))
    assert json.loads(path.read_text()) == record and not (tmp_path / "p" / "protocol.json.tmp").exists()
    t2, f2 = record["stages"]["table2"], record["stages"]["fig2"]
    assert (t2["seconds"], t2["calls"], t2["unfinished_calls"]) == (130.0, 2, 0)
    assert [call["seconds"] for call in t2["history"]] == [100.0, 30.0]
    assert (f2["seconds"], f2["calls"], f2["unfinished_calls"]) == (5.0, 2, 1)
    assert record["seconds"] == 135.0
    assert protocol.stage_wall_time([{"seconds": 1.5}, {"seconds": None}, {"seconds": 2.0}]) == {
        "seconds": 3.5, "calls": 3, "unfinished_calls": 1}
