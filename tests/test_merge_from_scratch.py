# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""merge_from_scratch.py: from_scratch.py results of several drivers in one report, refused across protocols."""

import copy
import json
import os

import pytest

ARGS = {"tasks": ["depth"], "modes": ["controlnet", "alignment"], "seeds": [0], "target_closure": [0.5, 0.25],
        "resolution": 64, "world_seed": 0, "num_train_samples": 8000, "max_train_steps": 200, "train_batch_size": 8,
        "learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100, "mixed_precision": "no",
        "extra_train_args": "", "eval_every": 100, "num_eval_conditions": 64, "eval_start_index": 100000,
        "num_inference_steps": 20, "guidance_scale": 7.5}
LABELS = {"controlnet": "ControlNet", "alignment": "Alignment only"}


@pytest.fixture(scope="module")
def merger():
    from _data_fixtures import load_shapesworld_script

    return load_shapesworld_script("merge_from_scratch")


def _result(seed, curves, floor=20.0, ceiling=60.0):
    """One driver's results.json: `curves` maps a mode to its closures at steps 0, 100, 200."""
    runs = [{"task": "depth", "mode": mode, "seed": seed, "dir": f"runs/depth/{mode}/seed{seed}", "train": "trained",
             "curve": {"steps": [0, 100, 200], "closures": closures,
                       "values": [ceiling - c * (ceiling - floor) for c in closures]}} for mode, closures in curves.items()]
    return {"args": dict(ARGS, seeds=[seed], modes=list(curves)), "runs": runs, "mode_labels": LABELS, "seconds": 10.0,
            "tasks": {"depth": {"floor": floor, "ceiling": ceiling, "steps": [0, 100, 200], "num_conditions": 64}}}


def _write(tmp_path, name, result):
    os.makedirs(tmp_path / name, exist_ok=True)
    with open(tmp_path / name / "results.json", "w") as f:
        json.dump(result, f)
    return str(tmp_path / name)


def test_two_drivers_make_the_summary_of_their_union(merger, tmp_path):
    """The curves of test_from_scratch's hand-computed summary, one seed per driver: the baseline reaches 50 % at
    175 and 150 steps (mean 162.5), alignment at 83.3 and 50."""
    a = _write(tmp_path, "a", _result(0, {"controlnet": [0.0, 0.2, 0.6], "alignment": [0.0, 0.6, 0.7]}))
    b = _write(tmp_path, "b", _result(1, {"controlnet": [0.0, 0.4, 0.6], "alignment": [0.0, 1.0, 1.0]}))
    os.makedirs(os.path.join(b, "grids"))
    with open(os.path.join(b, "grids", "depth.png"), "wb") as f:
        f.write(b"png")
    out = str(tmp_path / "merged")
    merger.cli_main([a, os.path.join(b, "results.json"), "--output_dir", out, "--target_closure", "0.5"])
    with open(os.path.join(out, "results.json")) as f:
        merged = json.load(f)
    base = merged["summary"]["depth"]["controlnet"]["targets"]["0.5"]
    assert base["steps_to_target"] == pytest.approx([175.0, 150.0]) and base["stats"]["mean"] == pytest.approx(162.5)
    align = merged["summary"]["depth"]["alignment"]
    assert align["seeds"] == [0, 1] and align["targets"]["0.5"]["vs_controlnet"]["diff"] == pytest.approx((500 / 6 + 50) / 2 - 162.5)
    assert "0.25" not in align["targets"] and merged["args"]["target_closure"] == [0.5]  # the levels asked for
    assert merged["args"]["seeds"] == [0, 1] and merged["tasks"]["depth"]["floor"] == 20.0
    assert [m["runs"] for m in merged["merged_from"]] == [["depth/alignment/seed0", "depth/controlnet/seed0"],
                                                          ["depth/alignment/seed1", "depth/controlnet/seed1"]]
    assert {r["source"] for r in merged["runs"]} == {a, os.path.join(b, "results.json")}
    assert merged["grids"] == {"depth": os.path.join("grids", "depth.png")} and os.path.isfile(os.path.join(out, "grids", "depth.png"))
    with open(os.path.join(out, "from_scratch.md")) as f:
        md = f.read()
    assert "| ControlNet | 162 ± 18 |" in md and "Merged from:" in md
    # a run of one input never evaluated there (no curve) is not a repeat of another input's
    unevaluated = _result(1, {"controlnet": [0.0, 0.4, 0.6]})
    unevaluated["runs"][0].pop("curve")
    assert [r["seed"] for r in merger.merge([json.load(open(os.path.join(b, "results.json"))), unevaluated],
                                            ["b", "u"])["runs"]] == [1, 1]
    # results written when --target_closure took one level keep a number
    older = json.load(open(os.path.join(a, "results.json")))
    older["args"]["target_closure"] = 0.5
    assert list(merger.merge([older], ["a"])["summary"]["depth"]["controlnet"]["targets"]) == ["0.5"]
    # without --target_closure: the first input's levels
    merged = merger.merge([json.load(open(os.path.join(p, "results.json"))) for p in (a, b)], ["a", "b"])
    assert set(merged["summary"]["depth"]["controlnet"]["targets"]) == {"0.5", "0.25"}
    assert "level" not in merged["summary"]["depth"]["controlnet"] and merged["args"]["level_from"] is None


def test_level_from_over_the_merged_seeds(merger, tmp_path):
    """--level_from 100 over the two drivers' curves: baseline levels (0.2 + 0.6) / 2 = 0.4 and (0.4 + 0.6) / 2 = 0.5,
    alignment (0.6 + 0.7) / 2 = 0.65 and 1.0; the difference (0.65 + 1.0) / 2 - 0.45 = 0.375 is tested across the
    two drivers' seeds; a later merge of that merge keeps the option."""
    a = _write(tmp_path, "a", _result(0, {"controlnet": [0.0, 0.2, 0.6], "alignment": [0.0, 0.6, 0.7]}))
    b = _write(tmp_path, "b", _result(1, {"controlnet": [0.0, 0.4, 0.6], "alignment": [0.0, 1.0, 1.0]}))
    out = str(tmp_path / "merged")
    merger.cli_main([a, b, "--output_dir", out, "--level_from", "100"])
    with open(os.path.join(out, "results.json")) as f:
        merged = json.load(f)
    summary = merged["summary"]["depth"]
    assert [r["closure"] for r in summary["controlnet"]["level"]["per_seed"]] == pytest.approx([0.4, 0.5])
    assert summary["alignment"]["level"]["vs_controlnet"]["diff"] == pytest.approx(0.375)
    assert summary["alignment"]["level"]["vs_controlnet"]["n"] == 2 and merged["args"]["level_from"] == 100
    with open(os.path.join(out, "from_scratch.md")) as f:
        assert "Level from step 100" in f.read()
    again = merger.merge([merged], ["merged"])
    assert again["summary"]["depth"]["alignment"]["level"]["from"] == 100


def test_other_protocols_and_repeated_runs_are_refused(merger):
    one = _result(0, {"controlnet": [0.0, 0.2, 0.6]})
    two = _result(1, {"controlnet": [0.0, 0.4, 0.6]})
    merger.merge([one, _result(1, {"controlnet": [0.0, 0.4, 0.6]}, floor=20.0 * (1 + 1e-5))], ["a", "b"])  # one scale
    cases = [
        (dict(two, args=dict(two["args"], learning_rate=1e-4)), "b was run with --learning_rate 0.0001, a with 0.0005"),
        (dict(two, args=dict(two["args"], num_eval_conditions=32)), "--num_eval_conditions 32"),
        (_result(1, {"controlnet": [0.0, 0.4, 0.6]}, floor=21.0), "depth's floor is 21 in b but 20 in a"),
        (_result(1, {"controlnet": [0.0, 0.4, 0.6]}, ceiling=59.0), "depth's ceiling is 59 in b"),
        (_result(0, {"controlnet": [0.0, 0.4, 0.6]}), "depth/controlnet/seed0 is in both a and b"),
    ]
    steps = copy.deepcopy(two)
    steps["tasks"]["depth"]["steps"] = [0, 50, 200]
    cases.append((steps, "b evaluated depth at steps"))
    for other, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            merger.merge([one, other], ["a", "b"])


def test_bad_input_is_one_line_before_anything_is_written(merger, tmp_path, capsys):
    a = _write(tmp_path, "a", _result(0, {"controlnet": [0.0, 0.2, 0.6]}))
    for argv, message in (([a, str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "m")], "nowhere does not exist: give from_scratch.py output folders"),
                          ([a, "--output_dir", a], "holds an input's results.json"),
                          ([a, "--output_dir", str(tmp_path / "m"), "--target_closure", "1.5"], "--target_closure"),
                          ([a, "--output_dir", str(tmp_path / "m"), "--level_from", "150"], "--level_from 150: fewer than 2")):
        with pytest.raises(SystemExit) as err:
            merger.cli_main(argv)
        assert err.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]
    b = _write(tmp_path, "b", dict(_result(1, {"controlnet": [0.0, 0.4, 0.6]}), args=dict(ARGS, seeds=[1], modes=["controlnet"], eval_every=50)))
    with pytest.raises(SystemExit):
        merger.cli_main([a, b, "--output_dir", str(tmp_path / "m")])
    assert "--eval_every 50" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")  # refused before the output folder is made
