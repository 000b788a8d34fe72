"""examples/innercontrol/shapesworld/run_experiment.py and train_toy_evaluators.py (issue 5): the math by hand,
short end-to-end runs on the tiny random models (marked e2e)."""

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
def exp():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("run_experiment")


@pytest.fixture(scope="module")
def toy():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("train_toy_evaluators")


# --- mean +- std ---------------------------------------------------------------------------------
def test_mean_std_by_hand(exp):
    # 1, 2, 3, 6: mean 3; deviations -2, -1, 0, 3 -> squares 4 + 1 + 0 + 9 = 14; / (n - 1 = 3) -> sqrt(14/3)
    stats = exp.mean_std([1.0, 2.0, None, 3.0, float("nan"), 6.0])
    assert stats["n"] == 4 and stats["mean"] == 3.0
    assert stats["std"] == pytest.approx(math.sqrt(14 / 3))
    assert exp.format_mean_std(stats, 2) == f"3.00 ± {math.sqrt(14 / 3):.2f}" == "3.00 ± 2.16"
    assert exp.format_mean_std(exp.mean_std([0.5]), 3) == "0.500"
    assert exp.format_mean_std(exp.mean_std([None]), 3) == "-"


def test_aggregate_over_seeds(exp):
    runs = [
        {"task": "depth", "mode": "controlnet", "seed": s, "metrics": {"rmse": r, "fid": f}}
        for s, r, f in ((0, 10.0, 1.0), (1, 14.0, 3.0))
    ] + [{"task": "hed", "mode": "controlnet", "seed": 0, "metrics": {"ssim": 0.25, "fid": None}}]
    table = exp.aggregate(runs, ["depth", "hed"], ["controlnet", "alignment"])
    # 10, 14: mean 12, sample std sqrt((4 + 4) / 1)
    assert table["depth"]["controlnet"]["control"]["mean"] == 12.0
    assert table["depth"]["controlnet"]["control"]["std"] == pytest.approx(math.sqrt(8))
    assert table["depth"]["controlnet"]["fid"]["mean"] == 2.0
    assert table["hed"]["controlnet"]["control"] == {"mean": 0.25, "std": 0.0, "n": 1}
    assert table["hed"]["controlnet"]["fid"]["n"] == 0
    assert table["depth"]["alignment"]["control"]["mean"] is None
    assert table["depth"]["alignment"]["vs_controlnet"] is None and table["depth"]["controlnet"]["vs_controlnet"] is None


def test_modes_against_the_baseline_and_claim_b(exp):
    """Each mode against ControlNet, and reward t < 200 + alignment against reward t < 200, over seeds: Welch's test
    of the per-seed control metric (10, 14 against 20, 21, 25: difference -9 with its interval), in the markdown."""
    from diffusers_innercontrol.metrics import welch_test

    def rows(mode, values, fids=None):
        fids = fids or [None] * len(values)
        return [{"task": "depth", "mode": mode, "seed": s, "metrics": {"rmse": v, "fid": f}}
                for s, (v, f) in enumerate(zip(values, fids))]

    runs = (rows("controlnet", [20.0, 21.0, 25.0], [1.0, 1.2, 1.1]) + rows("reward200", [10.0, 14.0], [1.5, 1.9])
            + rows("reward200_alignment", [9.0, 11.0]))
    modes = ["controlnet", "reward200", "reward200_alignment"]
    table = exp.aggregate(runs, ["depth"], modes)
    test = table["depth"]["reward200"]["vs_controlnet"]
    assert test["diff"] == pytest.approx(12.0 - 22.0) and test["baseline"] == "controlnet"
    assert test["p"] == pytest.approx(welch_test([10.0, 14.0], [20.0, 21.0, 25.0])["p"])
    # FID per seed, tested the same way: 1.5, 1.9 against 1.0, 1.2, 1.1 -> +0.6; no FID, no test
    fid = table["depth"]["reward200"]["fid_vs_controlnet"]
    assert fid["diff"] == pytest.approx(1.7 - 1.1) and fid["p"] == pytest.approx(welch_test([1.5, 1.9], [1.0, 1.2, 1.1])["p"])
    assert table["depth"]["reward200_alignment"]["fid_vs_controlnet"] is None
    assert table["depth"]["controlnet"]["fid_vs_controlnet"] is None
    claim = exp.claims(runs, ["depth"], modes)["depth"]["reward200_alignment_vs_reward200"]
    assert claim["diff"] == pytest.approx(-2.0) and claim["n"] == 2 and claim["n_baseline"] == 2
    assert exp.claims(runs, ["depth"], ["controlnet", "reward200"])["depth"] == {}
    md = exp.results_markdown({"args": dict(pretrained_model_name_or_path="sd", resolution=64, max_train_steps=1,
                                            train_batch_size=1, learning_rate=1e-5, seeds=[0, 1], num_eval_conditions=2,
                                            generation_seeds=[0], num_inference_steps=2, guidance_scale=1.0,
                                            num_kid_real=4),
                               "table": table, "claims": exp.claims(runs, ["depth"], modes),
                               "kid": {"depth": {"controlnet": {"mean": 0.0123, "std": 0.0004, "num_generated": 6,
                                                                "num_real": 4, "subset_size": 4, "subsets": 5}}}})
    lo, hi = test["ci_low"], test["ci_high"]
    assert (f"| Reward, t < 200 | 12.00 ± 2.83 | -10.00 [{lo:+.2f}, {hi:+.2f}] | {test['p']:.3f} | - | 1.700 ± 0.283 | "
            f"+0.600 [{fid['ci_low']:+.3f}, {fid['ci_high']:+.3f}], {fid['p']:.3f} |") in md
    assert "| Reward t < 200 + alignment | 10.00 ± 1.41 |" in md and md.count("| - | - | - |\n") == 1  # no FID, no test
    assert "| 12.30 ± 0.40 |" in md  # KID x 1000
    assert "Reward t < 200 + alignment against Reward, t < 200: -2.00 [" in md


def test_train_args_per_mode(exp, tmp_path):
    pipe = tmp_path / "sd"
    pipe.mkdir()
    args = exp.parse_args(["--pretrained_model_name_or_path", str(pipe), "--train_data_dir", "d", "--tasks", "depth",
                           "--depth_probe", "P", "--depth_reward_model", "R", "--depth_eval_model", "E",
                           "--depth_controlnet", "C", "--output_dir", str(tmp_path / "o")])
    def opts(mode):
        a = exp.train_args_for(args, "depth", mode, 1)
        return {a[i]: a[i + 1] for i in range(0, len(a) - 1) if a[i].startswith("--")}

    assert opts("controlnet")["--alpha"] == "0.0" and opts("controlnet")["--beta"] == "0.0"
    assert "--probe_model_name_or_path" not in opts("controlnet") and "--reward_model_name_or_path" not in opts("controlnet")
    assert opts("alignment")["--alpha"] == "0.0" and "--beta" not in opts("alignment")
    assert opts("alignment")["--probe_model_name_or_path"] == "P"
    assert opts("reward200")["--reward_window"] == "0,199" and opts("reward200")["--beta"] == "0.0"
    assert opts("reward_all")["--reward_window"] == "0,999"
    both = opts("reward200_alignment")
    assert both["--reward_window"] == "0,199" and both["--probe_model_name_or_path"] == "P"
    assert both["--reward_model_name_or_path"] == "R" and both["--controlnet_model_name_or_path"] == "C"
    assert both["--seed"] == "1" and both["--output_dir"].endswith(os.path.join("depth", "reward200_alignment", "seed1"))


def test_bad_arguments_fail_before_work(exp, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", "d"]
    with pytest.raises(ValueError, match="--depth_reward_model"):
        exp.parse_args(base + ["--tasks", "depth", "--modes", "reward200", "--depth_eval_model", "E"])
    with pytest.raises(ValueError, match="--hed_probe"):
        exp.parse_args(base + ["--tasks", "hed", "--modes", "alignment"])
    with pytest.raises(ValueError, match="choose from"):
        exp.parse_args(base + ["--modes", "bogus"])
    # every task is evaluated by a model: the bundled eval-<task> by default, refused when it is missing
    args = exp.parse_args(base + ["--tasks", "lineart", "--modes", "controlnet"])
    assert args.lineart_eval_model.endswith("eval-lineart") and args.hed_eval_model.endswith("eval-hed")
    with pytest.raises(ValueError, match="--depth_eval_model"):
        exp.parse_args(base + ["--tasks", "depth", "--modes", "controlnet", "--depth_eval_model", ""])


def test_held_out_scenes_come_after_the_training_data(exp, tmp_path):
    """The scenes of --train_data_dir are read from its image names: 10 scenes (0-9) written where
    --num_train_samples says 4 put the default held-out scenes at 10; given ones that overlap them are refused."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"images/{i:06d}.png", "text": "t"}) + "\n"
                                                 for i in range(10)))
    assert exp.training_scenes(str(data)) == (0, 10) and exp.training_scenes(str(tmp_path / "none")) is None
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(data), "--tasks", "depth",
            "--modes", "controlnet", "--num_eval_conditions", "3"]
    assert exp.parse_args(base + ["--num_train_samples", "4"]).eval_start_index == 10
    assert exp.parse_args(base + ["--num_train_samples", "20"]).eval_start_index == 20
    assert exp.parse_args(base + ["--eval_start_index", "10"]).eval_start_index == 10
    for start in ("0", "7", "9"):  # 7-9 overlap at the end
        with pytest.raises(ValueError, match=f"--eval_start_index {start}: .* overlap the training scenes 0-9 .*give --eval_start_index 10 or more"):
            exp.parse_args(base + ["--eval_start_index", start])
    # a folder not written yet will hold scenes 0 .. --num_train_samples - 1
    unwritten = base + ["--eval_start_index", "7", "--train_data_dir", str(tmp_path / "none")]
    assert exp.parse_args(unwritten + ["--num_train_samples", "7"]).eval_start_index == 7
    with pytest.raises(ValueError, match="overlap the training scenes 0-7 "):
        exp.parse_args(unwritten + ["--num_train_samples", "8"])
    # an --output_dir evaluated before keeps its scenes (its images are named by position)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"args": {"eval_start_index": 20}}))
    with pytest.raises(ValueError, match=f"--output_dir {out} was evaluated on held-out scenes from 20 .*would start at 2000: "
                                         "give --eval_start_index 20, or another --output_dir"):
        exp.parse_args(base + ["--output_dir", str(out)])
    assert exp.parse_args(base + ["--output_dir", str(out), "--eval_start_index", "20"]).eval_start_index == 20
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "images/cat.png"}) + "\n")  # not ShapesWorld's names
    assert exp.training_scenes(str(data)) is None


def test_cli_bad_input_is_one_line(exp, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        exp.cli_main(["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--train_data_dir", "d",
                      "--tasks", "hed", "--modes", "controlnet"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --pretrained_model_name_or_path") and "\n" not in err


def test_toy_evaluator_configs_are_stronger(toy):
    weak, strong = toy.depth_config(32, 1), toy.depth_config(32, 2, 6)
    assert strong.hidden_size == 2 * weak.hidden_size and strong.num_hidden_layers > weak.num_hidden_layers
    assert strong.image_size == 32
    seg = toy.segmentation_config(2)
    assert seg.backbone_config.hidden_sizes == [16, 32, 48, 64] and seg.auxiliary_in_channels == 48
    assert seg.num_labels == 150


# --- end to end ----------------------------------------------------------------------------------
def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")


@pytest.mark.e2e
def test_train_toy_evaluators_smoke(tmp_path):
    from diffusers_innercontrol.evaluation import DepthEvaluator
    from diffusers_innercontrol.rewards import load_reward_model

    out = tmp_path / "depth-eval"
    cmd = [sys.executable, os.path.join(SW, "train_toy_evaluators.py"), "--task", "depth", "--model_kind", "eval",
           "--steps", "2", "--resolution", "32", "--num_train_samples", "4", "--num_eval_samples", "2",
           "--train_batch_size", "2", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["seed"] == 1 and summary["width_multiplier"] == 2
    assert summary["held_out_indices"] == [4, 6]
    model = load_reward_model("depth", str(out))  # the reward loader reads it ...
    assert model(torch.rand(1, 3, 32, 32)).shape[1] == 1
    assert DepthEvaluator.from_pretrained(str(out))(torch.rand(1, 3, 32, 32)).ndim == 3  # ... and the evaluator


@pytest.mark.e2e
def test_run_experiment_quick(tmp_path, tiny_pipeline_path):
    from _data_fixtures import toy_depth_experiment

    data, depth_model, probe_dir = toy_depth_experiment(tmp_path, tiny_pipeline_path)
    out = tmp_path / "exp"
    cmd = [sys.executable, os.path.join(SW, "run_experiment.py"), "--quick", "--tasks", "depth",
           "--modes", "controlnet,reward200_alignment", "--seeds", "0", "--resolution", "32",
           "--pretrained_model_name_or_path", tiny_pipeline_path, "--train_data_dir", data,
           "--depth_probe", probe_dir, "--depth_reward_model", depth_model, "--depth_eval_model", depth_model,
           "--output_dir", str(out), "--jobs", "2"]  # the two runs train in parallel processes
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["mode"], r["seed"], r["train"]) for r in result["runs"]] == [
        ("depth", "controlnet", 0, "trained"), ("depth", "reward200_alignment", 0, "trained")]
    for run in result["runs"]:
        assert os.path.isfile(os.path.join(run["dir"], "diffusion_pytorch_model.safetensors"))
        m = run["metrics"]
        assert m["num_conditions"] == 2 and m["num_images"] == 2
        assert 0.0 <= m["rmse"] <= 255.0 and m["fid"] is not None and math.isfinite(m["fid"])
    for mode in ("controlnet", "reward200_alignment"):
        stats = result["table"]["depth"][mode]["control"]
        run = next(r for r in result["runs"] if r["mode"] == mode)
        assert stats["n"] == 1 and stats["mean"] == pytest.approx(run["metrics"]["rmse"])
    kid = result["kid"]["depth"]
    assert set(kid) == {"controlnet", "reward200_alignment"}
    for value in kid.values():  # 2 held-out scenes x 1 seed against 4 real images, subsets of 2
        assert (value["num_generated"], value["num_real"], value["subset_size"]) == (2, 4, 2) and math.isfinite(value["mean"])
    assert result["kid_feature_models"]["depth"].endswith("eval-segmentation")  # neither the reward nor the evaluator
    assert result["claims"]["depth"] == {}  # (b) needs reward200 as well
    b = result["buckets"]["depth"]
    assert b["buckets"] == [[0, 499], [500, 999]]
    for side in ("x0_evaluator", "probe"):
        assert len(b[side]["means"]) == 2 and all(v is not None and v >= 0 for v in b[side]["means"])
        assert [x["count"] for x in b[side]["buckets"]] == [2, 2]  # 2 held-out scenes, once per bucket
        assert len(b[side]["stderrs"]) == 2 and all(v is not None for v in b[side]["stderrs"])  # the error bars
    md = (out / "shapesworld.md").read_text()
    assert "## depth" in md and "| ControlNet (diffusion loss only) |" in md and "| Reward t < 200 + alignment |" in md
    assert "| 0-499 |" in md and "| 500-999 |" in md
    assert result["plots"] or "matplotlib is not installed" in md
    from PIL import Image

    grid = Image.open(out / result["grids"]["depth"])
    # control, real, 2 modes (labelled; "reward200_alignment" is wider than a 32 px tile, so its column is too); 2 rows
    assert grid.size[0] > 3 + 4 * (32 + 3) and grid.size[1] > 3 + 2 * (32 + 3)
    assert f"]({result['grids']['depth']})" in md
    for plot in result["plots"]:
        assert (out / plot).is_file()


def test_fig2_only_reads_each_tasks_controlnet(tmp_path, tiny_pipeline_path, exp):
    """`--fig2_only`: the probe's and the evaluator's errors per bucket on the given ControlNet, with standard errors;
    nothing trained or generated; a task without its ControlNet or probe is refused."""
    from diffusers import UNet2DConditionModel

    from diffusers_innercontrol.models.readout_probe import ReadoutProbe
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    base = ["--pretrained_model_name_or_path", tiny_pipeline_path, "--train_data_dir", str(tmp_path / "unused"),
            "--fig2_only", "--tasks", "depth", "--output_dir", str(tmp_path / "fig2"), "--resolution", "32"]
    with pytest.raises(ValueError, match="--fig2_only reads depth's ControlNet and probe: pass --depth_controlnet"):
        exp.parse_args(base)
    depth_model = save_tiny_reward_model("depth", str(tmp_path / "depth"))
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path, subfolder="unet")
    ReadoutProbe.from_unet(unet, **get_task("depth").probe_kwargs(), projection_dim=32, norm_num_groups=8).save_pretrained(
        tmp_path / "probe")
    args = exp.parse_args(base + ["--depth_controlnet", os.path.join(tiny_pipeline_path, "controlnet"), "--depth_probe",
                                  str(tmp_path / "probe"), "--depth_eval_model", depth_model, "--num_buckets", "2",
                                  "--num_bucket_conditions", "3", "--eval_batch_size", "3"])
    result = exp.main(args)
    b = result["buckets"]["depth"]
    assert b["controlnet"].endswith("controlnet") and b["buckets"] == [[0, 499], [500, 999]]
    for side in ("x0_evaluator", "probe"):
        assert [x["count"] for x in b[side]["buckets"]] == [3, 3] and all(se is not None for se in b[side]["stderrs"])
    assert not (tmp_path / "unused").exists() and result["runs"] == []
    md = (tmp_path / "fig2" / "shapesworld.md").read_text()
    assert "| 0-499 |" in md and " ± " in md


def test_toy_evaluator_arguments_and_loss(toy):
    args = toy.parse_args(["--task", "depth", "--model_kind", "eval", "--output_dir", "x"])
    assert (args.steps, args.seed, args.width_multiplier) == (1500, 1, 2)
    args = toy.parse_args(["--task", "segmentation", "--output_dir", "x"])
    assert (args.steps, args.seed, args.width_multiplier) == (500, 0, 1)
    from diffusers_innercontrol.rewards import EdgeMapReward

    # edges have an evaluation model too: wider, deeper, another seed than the reward model
    args = toy.parse_args(["--task", "hed", "--model_kind", "eval", "--output_dir", "x"])
    assert (args.seed, args.width_multiplier) == (1, 2)
    reward, evaluator = toy.build_model("lineart", "reward", 32, 1), toy.build_model("lineart", "eval", 32, 2)
    assert isinstance(reward, EdgeMapReward) and isinstance(evaluator, EdgeMapReward)  # small DPTs drawing the lines
    assert evaluator.model.config.hidden_size == 2 * reward.model.config.hidden_size
    assert evaluator.model.config.num_hidden_layers == 6 > reward.model.config.num_hidden_layers
    # depth: per-sample MSE at the output size: (0.5-0)^2 and (1-0)^2 over 2 of 4 pixels -> (0.25 + 1) / 4
    out = torch.tensor([[[[0.5, 1.0], [0.0, 0.0]]]])
    assert toy.task_loss("depth", out, torch.zeros(1, 1, 2, 2)).item() == pytest.approx(1.25 / 4)
    # segmentation: two classes, logits (0, ln 3) -> p(class 1) = 3/4 everywhere; target class 1 -> -ln(3/4)
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3.0)
    assert toy.task_loss("segmentation", logits, torch.ones(1, 2, 2, dtype=torch.long)).item() == pytest.approx(-math.log(0.75))


def test_merge_experiments_by_hand(tmp_path):
    """Two drivers' results: reward200 in one folder, reward200_alignment (and a duplicate reward200 seed) in the
    other. The merge keeps the first folder's duplicate, recomputes the means over the union and claim (b) across
    folders, and keeps each mode's KID; a folder without results.json is refused in one line."""
    from _data_fixtures import load_shapesworld_script

    merge = load_shapesworld_script("merge_experiments")

    def run(mode, seed, rmse):
        return {"task": "depth", "mode": mode, "seed": seed, "dir": "elsewhere", "train": "trained",
                "metrics": {"rmse": rmse, "fid": 1.0}}

    a = {"args": {"resolution": 64}, "runs": [run("reward200", 0, 30.0), run("reward200", 1, 31.0)],
         "kid": {"depth": {"reward200": {"mean": 0.04}}}, "buckets": {}}
    b = {"args": {"resolution": 64}, "runs": [run("reward200", 1, 99.0), run("reward200_alignment", 0, 28.0),
                                              run("reward200_alignment", 1, 29.0)],
         "kid": {"depth": {"reward200_alignment": {"mean": 0.05}}}, "buckets": {"depth": {"x": 1}}}
    with pytest.raises(ValueError, match="'B' ran with resolution=32, 'A' with 64: merge only runs of one protocol"):
        merge.merge([a, dict(b, args={"resolution": 32})], ["A", "B"])
    out = merge.merge([a, b], ["A", "B"])
    assert [(r["mode"], r["seed"]) for r in out["runs"]] == [("reward200", 0), ("reward200", 1),
                                                              ("reward200_alignment", 0), ("reward200_alignment", 1)]
    assert out["runs"][1]["metrics"]["rmse"] == 31.0 and out["runs"][1]["dir"] == os.path.join("A", "runs", "depth", "reward200", "seed1")
    assert out["table"]["depth"]["reward200"]["control"]["mean"] == pytest.approx(30.5)
    claim = out["claims"]["depth"]["reward200_alignment_vs_reward200"]
    assert claim["diff"] == pytest.approx(28.5 - 30.5) and claim["n"] == 2 and claim["n_baseline"] == 2
    assert out["kid"]["depth"] == {"reward200": {"mean": 0.04}, "reward200_alignment": {"mean": 0.05}}
    assert out["buckets"] == {"depth": {"x": 1}} and out["args"]["resolution"] == 64 and out["kid_notes"] == []
    # reward200's seeds split over two folders: its KID pools the first folder's only, and the merge says so
    c = dict(b, runs=b["runs"] + [run("reward200", 2, 30.2)])
    split = merge.merge([a, c], ["A", "B"])
    assert split["kid_notes"] == ["depth/reward200: KID from A only"]
    assert merge.split_modes(split["runs"]) == [("depth", "reward200")]
    # ... and main pools it again over both folders' runs (here a fake pooling that records what it was given)
    calls = []
    merge.recompute_split_kid(split, lambda task, runs: calls.append((task, runs)) or {"mean": 0.03, "num_generated": 9})
    assert [(task, [(r["folder"], r["seed"]) for r in runs]) for task, runs in calls] == [
        ("depth", [("A", 0), ("A", 1), ("B", 2)])]
    assert split["kid"]["depth"] == {"reward200": {"mean": 0.03, "num_generated": 9}, "reward200_alignment": {"mean": 0.05}}
    assert split["kid_notes"] == ["depth/reward200: KID pooled over A, B (recomputed from the saved images)"]
    assert merge.recompute_split_kid(out, lambda task, runs: 1 / 0)["kid"] == out["kid"]  # nothing split: nothing redone
    assert out["args"]["modes"] == ["reward200", "reward200_alignment"] and out["args"]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="has no results.json"):
        merge.parse_args([str(tmp_path), "--output_dir", str(tmp_path / "o")])
