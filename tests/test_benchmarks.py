"""Smoke tests of the benchmarks (tiny preset, one iteration) and checks of their bookkeeping on hand-made numbers.
No timing assertions."""

import json
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import bench_train_step  # noqa: E402


@pytest.fixture
def one_thread():
    return ["--num_threads", "1"]


def test_stratified_timesteps_one_per_stratum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = bench_train_step.draw_timesteps(8, 1000, g, stratified=True)
        # stratum k is [125 k, 125 (k + 1)): after sorting, sample k lies in stratum k
        strata = torch.sort(t).values // 125
        assert strata.tolist() == list(range(8))
    t = bench_train_step.draw_timesteps(64, 1000, g, stratified=False)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long


def test_summary_ratios_and_targets_by_hand():
    times = {
        "controlnet": [1.0, 2.0, 1.0],
        "alignment_only": [1.2, 2.0, 1.05],  # per-iteration ratios 1.2, 1.0, 1.05 -> median 1.05
        "controlnet++_full": [3.0, 4.0, 2.0],
        "innercontrol": [1.5, 2.0, 1.2],  # ratios to full: 0.5, 0.5, 0.6 -> median 0.5
    }
    memory = {
        "controlnet": dict(peak=100 * 2**20, step=10 * 2**20),
        "alignment_only": dict(peak=110 * 2**20, step=20 * 2**20),
        "controlnet++_full": dict(peak=200 * 2**20, step=110 * 2**20),
        "innercontrol": dict(peak=130 * 2**20, step=40 * 2**20),
    }
    shares = {m: dict(reward=0.2, alignment=0.8) for m in times}
    results = bench_train_step.summarise(times, memory, batch_size=4, shares=shares)
    assert results["alignment_only"]["ratio_to_controlnet"] == pytest.approx(1.05)
    assert results["alignment_only"]["ratio_of_medians"] == pytest.approx(1.2 / 1.0)  # medians 1.2 and 1.0
    assert results["controlnet"]["images_per_s"] == pytest.approx(4 / 1.0)
    assert results["innercontrol"]["memory_ratio"] == pytest.approx(1.3)
    assert results["innercontrol"]["peak_memory_mib"] == pytest.approx(130)
    targets = bench_train_step.check_targets(times, results)
    assert targets["alignment_only_time"]["ratio"] == pytest.approx(1.05) and targets["alignment_only_time"]["met"]
    assert targets["innercontrol_vs_full_decode_time"]["ratio"] == pytest.approx(0.5)
    assert targets["innercontrol_peak_memory"]["ratio"] == pytest.approx(1.3)
    assert not targets["innercontrol_peak_memory"]["met"]


def test_profiler_step_peak_counts_live_bytes():
    def step():
        a = torch.empty(256 * 1024)  # 1 MiB
        b = torch.empty(512 * 1024)  # 2 MiB while `a` lives: peak 3 MiB
        del a, b
        c = torch.empty(128 * 1024)  # 0.5 MiB after both are freed
        del c

    assert bench_train_step.profiler_step_peak(step) == 3 * 2**20


def test_bench_train_step_tiny_writes_json(tmp_path, one_thread):
    out = tmp_path / "train.json"
    report = bench_train_step.main(
        ["--preset", "tiny", "--iters", "1", "--warmup", "0", "--batch_size", "4", "--device", "cpu",
         "--json", str(out), "--markdown", str(tmp_path / "train.md"), *one_thread]
    )
    data = json.loads(out.read_text())
    assert set(data["modes"]) == set(bench_train_step.MODES)
    assert data["modes"]["controlnet"]["ratio_to_controlnet"] == pytest.approx(1.0)
    for mode in data["modes"].values():
        assert mode["median_ms"] > 0 and len(mode["times_ms"]) == 1
        assert mode["peak_memory_mib"] > 0  # the CPU path: torch.profiler memory events
    assert data["config"]["reward_window"] == [0, 200] and data["config"]["resolution"] == 32
    assert set(data["gmacs_per_sample"]) == {"controlnet", "unet", "probe", "vae_decode", "reward_model"}
    assert set(data["targets"]) == {"alignment_only_time", "innercontrol_vs_full_decode_time", "innercontrol_peak_memory"}
    assert (tmp_path / "train.md").read_text().startswith("| mode |")
    assert report["table"] == data["table"]


def test_bench_train_step_sdxl_path_conditions_every_call(tmp_path, one_thread):
    """The SDXL presets' path (tiny_sdxl: the sdxl preset's code at test size): the batch carries the pooled text
    embedding and the size / crop ids, every mode runs with them, and the FLOP count includes them."""
    import presets

    models = presets.build_preset("tiny_sdxl", bench_train_step.get_task("depth"), with_reward=False)
    assert models["pooled_text_dim"] == 32 and models["unet"].config.addition_embed_type == "text_time"
    batch = bench_train_step.make_batch(bench_train_step.get_task("depth"), models, 2, 32, "cpu", torch.float32,
                                        torch.Generator().manual_seed(0))
    assert batch["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert batch["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    report = bench_train_step.main(["--preset", "tiny_sdxl", "--iters", "1", "--warmup", "0", "--batch_size", "2",
                                    "--device", "cpu", "--json", str(tmp_path / "sdxl.json"), *one_thread])
    data = json.loads((tmp_path / "sdxl.json").read_text())
    assert set(data["modes"]) == set(bench_train_step.MODES) and data["config"]["preset"] == "tiny_sdxl"
    assert data["gmacs_per_sample"]["unet"] > 0 and report["table"] == data["table"]
    assert presets.PRESET_SETTINGS["sdxl"]["resolution"] == 1024


def test_bench_train_step_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--modes", "controlnet,nonsense"])
    with pytest.raises(ValueError, match="multiple of"):
        bench_train_step.main(["--preset", "tiny", "--resolution", "30", "--iters", "1", "--device", "cpu", "--no_flops"])


def test_bench_sampling_tiny_writes_json(tmp_path, one_thread):
    import bench_sampling

    out = tmp_path / "sampling.json"
    bench_sampling.main(
        ["--preset", "tiny", "--iters", "1", "--warmup", "0", "--num_inference_steps", "2", "--device", "cpu",
         "--json", str(out), *one_thread]
    )
    data = json.loads(out.read_text())
    modes = data["modes"]
    assert set(modes) == set(bench_sampling.MODES)
    assert modes["plain"]["ratio_to_plain"] == pytest.approx(1.0)
    # 2 steps: every step -> 2 readouts, every fifth step (step 0) -> 1, off -> 0
    assert modes["readouts_every_step"]["readouts_per_call"] == 2
    assert modes["guidance_every_step"]["readouts_per_call"] == 2
    assert modes["readouts_every_5th"]["readouts_per_call"] == 1
    assert modes["readouts_off"]["readouts_per_call"] == 0
    assert modes["plain"]["readouts_per_call"] == 0


def test_bench_train_step_drops_a_mode_that_runs_out_of_memory(tmp_path, monkeypatch):
    real_step = bench_train_step.run_step

    def step(mode, *args, **kwargs):
        if mode == "controlnet++_full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(mode, *args, **kwargs)

    monkeypatch.setattr(bench_train_step, "run_step", step)
    out = tmp_path / "oom.json"
    bench_train_step.main(
        ["--preset", "tiny", "--iters", "1", "--warmup", "0", "--batch_size", "2", "--device", "cpu", "--no_flops",
         "--memory", "none", "--modes", "controlnet,controlnet++_full,controlnet++_masked", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"controlnet", "controlnet++_masked"}
    assert data["failed"]["controlnet++_full"].startswith("out of memory")
    assert "| ControlNet++ (full-batch decode) | out of memory |" in data["table"]
    assert "innercontrol_vs_full_decode_time" not in data["targets"]


def test_quantile_timesteps_by_hand():
    # strata of 125: middles 62.5, 187.5, ... floored
    assert bench_train_step.quantile_timesteps(8, 1000).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


def test_profile_step_tiny_lists_the_extra_operators(tmp_path, one_thread):
    import profile_step

    out = tmp_path / "profile.json"
    profile_step.main(["--preset", "tiny", "--iters", "1", "--warmup", "0", "--batch_size", "4", "--device", "cpu",
                       "--json", str(out), "--markdown", str(tmp_path / "profile.md"), *one_thread])
    data = json.loads(out.read_text())
    base, mode = data["ms_per_step"]["controlnet"], data["ms_per_step"]["alignment_only"]
    assert "aten::convolution_backward" in base and all(v >= 0 for v in mode.values())
    assert any(key not in base for key in mode)  # the probe brings operators the ControlNet step does not run
    table = (tmp_path / "profile.md").read_text()
    assert "| operator | ControlNet (ms/step) | alignment only (ms/step) |" in table and "**all operators**" in table


def test_profile_difference_table_by_hand():
    import profile_step

    table = profile_step.difference_table({"a": 20.0, "b": 4.0}, {"a": 26.0, "b": 4.0, "c": 2.0}, steps=2,
                                          labels=("base", "mode"), top=3)
    rows = table.splitlines()[2:]
    assert rows[0] == "| `a` | 10.0 | 13.0 | +3.0 | 75 % |"  # 8 ms/step more in all, 3 of them in a
    assert rows[1] == "| `c` | 0.0 | 1.0 | +1.0 | 25 % |"
    assert rows[-1] == "| **all operators** | 12.0 | 16.0 | +4.0 | 100 % |"


def test_flop_cost_model_by_hand():
    import flops

    g = {"controlnet": 1.0, "unet": 2.0, "probe": 0.5, "vae_decode": 3.0, "reward_model": 1.0}
    # base 3 * 1 + 2 * 2 = 7; reward 2 * (3 + 1) = 8; probe 2 * 0.5 = 1
    r = flops.predicted_ratios(g, reward_share=0.25, alignment_share=0.5)
    assert r == {"controlnet++_full": round(15 / 7, 2), "controlnet++_masked": round(9 / 7, 2),
                 "innercontrol": round(9.5 / 7, 2), "alignment_only": round(7.5 / 7, 2)}


def test_flop_counts_of_sd15_and_sdxl_on_meta():
    """Counted from the configs on 'meta' (no weights): SD1.5's UNet at 512 px is ~0.4 TMAC a forward, SDXL's at
    1024 px ~3.4 TMAC; SDXL's heavier UNet makes the reward's decode a smaller share of its step."""
    import flops

    from diffusers_innercontrol.tasks import get_task

    sd15 = flops.count("sd15", get_task("depth"))
    sdxl = flops.count("sdxl", get_task("depth"))
    assert 395 < sd15["unet"] < 410 and 3300 < sdxl["unet"] < 3450
    # the same VAE layout on 4x the pixels: 4x the convolutions, and more for the mid-block's attention (quadratic)
    assert 4 * sd15["vae_decode"] < sdxl["vae_decode"] < 4.5 * sd15["vae_decode"]
    assert flops.predicted_ratios(sdxl, 0.2, 0.8)["controlnet++_masked"] < flops.predicted_ratios(sd15, 0.2, 0.8)["controlnet++_masked"]
