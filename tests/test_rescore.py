"""examples/innercontrol/shapesworld/rescore.py: the saved images of run_experiment.py scored by other models."""

import json
import os

import pytest
import torch


@pytest.fixture(scope="module")
def rescore():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("rescore")


def _fake_experiment(folder, runs, n=3):
    """A finished run_experiment.py folder whose runs' saved images are `fn(real image)` (scenes 5 .. 5 + n - 1)."""
    from diffusers_innercontrol.evaluation import image_path, save_image_atomic, tensor_to_pil
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    dataset = ShapesWorldEvalSet("depth", 32, 0, 5, n)
    records = []
    for mode, seed, fn in runs:
        run_dir = os.path.join(folder, "runs", "depth", mode, f"seed{seed}")
        for i in range(n):
            save_image_atomic(tensor_to_pil(fn(dataset[i].image)), image_path(os.path.join(run_dir, "eval"), i, 0))
        records.append({"task": "depth", "mode": mode, "seed": seed, "dir": run_dir})
    args = {"resolution": 32, "world_seed": 0, "eval_start_index": 5, "num_eval_conditions": n, "generation_seeds": [0]}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"args": args, "runs": records}, f)
    return dataset


def test_rescore_scores_the_saved_images_and_compares_with_the_baseline(rescore, tmp_path):
    from diffusers_innercontrol.evaluation import image_path, load_control_evaluator, load_image01
    from diffusers_innercontrol.metrics import depth_rmse
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.tiny import save_tiny_reward_model

    # two folders, as two drivers write them: the baseline's images are the real ones (two seeds, one dimmed),
    # the other mode's are flat grey
    dataset = _fake_experiment(str(tmp_path / "a"), [("controlnet", 0, lambda x: x), ("controlnet", 1, lambda x: 0.9 * x)])
    _fake_experiment(str(tmp_path / "b"), [("grey", 0, lambda x: torch.full_like(x, 0.5)),
                                           ("grey", 1, lambda x: torch.full_like(x, 0.3))])
    model = save_tiny_reward_model("depth", str(tmp_path / "m"))
    args = rescore.parse_args([str(tmp_path / "a"), str(tmp_path / "b"), "--task", "depth", "--model", f"m={model}",
                               "--output", str(tmp_path / "out.json")])
    out = rescore.main(args)

    # by hand: the model's RMSE against the exact controls, per run
    evaluator = load_control_evaluator(get_task("depth"), model)
    controls = torch.stack([dataset[i].control for i in range(3)])

    def rmse(run_dir):
        images = torch.stack([load_image01(image_path(os.path.join(run_dir, "eval"), i, 0)) for i in range(3)])
        with torch.no_grad():
            return depth_rmse(evaluator(images), controls).mean().item()

    expected = {mode: [rmse(str(tmp_path / f / "runs" / "depth" / mode / f"seed{s}")) for s in (0, 1)]
                for f, mode in (("a", "controlnet"), ("b", "grey"))}
    for mode in expected:
        assert out["scores"][mode]["m"] == pytest.approx(expected[mode], rel=1e-5)
    diff = sum(expected["grey"]) / 2 - sum(expected["controlnet"]) / 2
    assert out["vs_baseline"]["grey"]["m"]["diff"] == pytest.approx(diff, abs=1e-3)
    assert "controlnet" not in out["vs_baseline"]
    assert json.loads((tmp_path / "out.json").read_text())["vs_baseline"]["grey"]["m"]["diff"] == pytest.approx(diff, abs=1e-3)


def test_rescore_refuses_bad_input_before_work(rescore, tmp_path):
    with pytest.raises(SystemExit):
        rescore.parse_args([str(tmp_path), "--task", "hed", "--model", "r=x", "--output", "o.json"])  # no results.json
    with pytest.raises(SystemExit):
        rescore.parse_args([str(tmp_path), "--task", "hed", "--model", "no-label", "--output", "o.json"])
    with pytest.raises(SystemExit):
        rescore.parse_args([str(tmp_path), "--task", "canny", "--model", "r=x", "--output", "o.json"])
    _fake_experiment(str(tmp_path / "a"), [("controlnet", 0, lambda x: x)], n=1)
    with pytest.raises(SystemExit):
        rescore.parse_args([str(tmp_path / "a"), "--task", "depth", "--model", f"r={tmp_path / 'missing'}", "--output", "o.json"])
