"""The readout-guidance study (examples/innercontrol/shapesworld/readout_guidance_study.py): the paired summary by
hand, and the whole script on the bundled models, two scenes and two steps."""

import importlib.util
import json
import os

import pytest

from diffusers_innercontrol.toy.quickstart import ASSETS_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "innercontrol", "shapesworld", "readout_guidance_study.py")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("_readout_guidance_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_summary_by_hand(study):
    # every scene 1 lower: mean change -1, 5 of 5 improved; the exact two-sided signed-rank p for n = 5 with all
    # differences of one sign is 2 / 2**5
    s = study.paired_summary([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
    assert (s["mean"], s["mean_change"], s["improved"], s["n"]) == (2.0, -1.0, 5, 5)
    assert s["p_value"] == pytest.approx(2 / 32)
    # higher is better: the same numbers count as worse
    assert study.paired_summary([1, 2, 3, 4, 5], [0, 1, 2, 3, 4], lower_is_better=False)["improved"] == 0
    # no change at all: p = 1
    assert study.paired_summary([1.0, 2.0], [1.0, 2.0])["p_value"] == 1.0


def test_scale_zero_is_always_the_reference(study, tmp_path):
    args = study.parse_args(["--output_dir", str(tmp_path), "--scales", "0.2,0.1"])
    assert args.scales[0] == 0.0 and sorted(args.scales) == [0.0, 0.1, 0.2]
    with pytest.raises(SystemExit):
        study.parse_args(["--output_dir", str(tmp_path), "--schedulers", "heun"])


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isdir(os.path.join(ASSETS_DIR, "probe-depth")), reason="needs the bundled models")
def test_study_runs_on_the_bundled_models(study, tmp_path):
    args = study.parse_args(["--output_dir", str(tmp_path), "--num_scenes", "2", "--batch_size", "2", "--schedulers",
                             "ddim", "--scales", "0,0.2", "--num_inference_steps", "2"])
    result = study.main(args)
    rows = result["schedulers"]["ddim"]
    assert [r["scale"] for r in rows] == [0.0, 0.2] and all(len(r["errors"]) == 2 for r in rows)
    assert rows[0]["summary"]["mean_change"] == 0.0 and rows[1]["errors"] != rows[0]["errors"]  # guidance acted
    saved = json.load(open(tmp_path / "guidance.json"))
    assert saved["schedulers"]["ddim"][1]["summary"] == rows[1]["summary"]
    assert "| ddim | 0.2 |" in open(tmp_path / "guidance.md").read()
