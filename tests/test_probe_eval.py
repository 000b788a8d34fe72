"""probe_eval: per-timestep-bucket error of a readout probe, and the validation grid."""

import json

import numpy as np
import pytest
import torch

from diffusers_innercontrol import ReadoutProbe, get_task
from diffusers_innercontrol.probe_eval import (
    BucketErrors,
    bucket_errors,
    bucket_index,
    evaluate_probe,
    predict_at_timesteps,
    stratified_timesteps,
    timestep_buckets,
    validation_grid,
)
from diffusers_innercontrol.render import labeled_grid, render_readout, to_pil
from diffusers_innercontrol.training import probe_step


def test_timestep_buckets_cover_range():
    assert timestep_buckets(10, 1000) == [(i * 100, i * 100 + 99) for i in range(10)]
    # uneven split: 1000 / 3 -> [0, 332], [333, 665], [666, 999]
    assert timestep_buckets(3, 1000) == [(0, 332), (333, 665), (666, 999)]
    with pytest.raises(ValueError, match="num_buckets"):
        timestep_buckets(0, 1000)


def test_bucket_index_matches_bucket_ranges():
    t = torch.arange(1000)
    for n in (1, 3, 7, 10):
        idx = bucket_index(t, n, 1000)
        for i, (lo, hi) in enumerate(timestep_buckets(n, 1000)):
            assert (idx[lo : hi + 1] == i).all()
    assert bucket_index(torch.tensor([0, 99, 100, 999]), 10, 1000).tolist() == [0, 0, 1, 9]
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        bucket_index(torch.tensor([1000]), 10, 1000)


def test_bucket_errors_hand_computed():
    losses = torch.tensor([1.0, 3.0, 0.5, 2.0, 4.0, 10.0])
    timesteps = torch.tensor([5, 99, 100, 450, 480, 999])
    means = bucket_errors(losses, timesteps, num_buckets=10, num_train_timesteps=1000)
    # bucket 0: (1 + 3) / 2; bucket 1: 0.5; bucket 4: (2 + 4) / 2; bucket 9: 10; others empty
    expected = [2.0, 0.5, None, None, 3.0, None, None, None, None, 10.0]
    assert [m is None for m in means] == [e is None for e in expected]
    assert [m for m in means if m is not None] == pytest.approx([e for e in expected if e is not None], abs=1e-12)


def test_bucket_errors_accumulate_over_batches_and_report():
    errors = BucketErrors(num_buckets=2, num_train_timesteps=10, loss_name="mse")
    errors.update(torch.tensor([1.0, 2.0]), torch.tensor([0, 9]))
    errors.update(torch.tensor([3.0, 6.0, 9.0]), torch.tensor([4, 5, 5]))
    # bucket [0, 4]: 1, 3 -> 2; bucket [5, 9]: 2, 6, 9 -> 17 / 3; all: 21 / 5
    assert errors.means()[0] == pytest.approx(2.0)
    assert errors.means()[1] == pytest.approx(17.0 / 3.0)
    assert errors.overall == pytest.approx(21.0 / 5.0)
    d = errors.to_dict()
    # standard errors: [0, 4]: sample variance ((1 - 2)^2 + (3 - 2)^2) / 1 = 2, se = sqrt(2 / 2) = 1;
    # [5, 9]: ((2 - 17/3)^2 + (6 - 17/3)^2 + (9 - 17/3)^2) / 2 = 37 / 3, se = sqrt(37 / 9)
    assert errors.stderrs() == pytest.approx([1.0, (37.0 / 9.0) ** 0.5])
    assert d["buckets"][1] == {"t_min": 5, "t_max": 9, "error": pytest.approx(17.0 / 3.0),
                               "stderr": pytest.approx((37.0 / 9.0) ** 0.5), "count": 3}
    table = errors.to_markdown()
    assert "| 0-4 | 2.0000 | 2 |" in table and "| 5-9 | 5.6667 | 3 |" in table and "| all | 4.2000 | 5 |" in table
    logs = errors.log_dict("err")
    assert logs["err/t000-004"] == pytest.approx(2.0) and logs["err/all"] == pytest.approx(4.2)


def test_bucket_errors_save_json(tmp_path):
    errors = BucketErrors(num_buckets=2, num_train_timesteps=10, loss_name="ce")
    errors.update(torch.tensor([1.5]), torch.tensor([7]))
    path = errors.save(str(tmp_path / "sub" / "err.json"), extra={"step": 3})
    data = json.loads(open(path).read())
    assert data["step"] == 3 and data["loss"] == "ce"
    assert data["buckets"][0]["error"] is None and data["buckets"][0]["count"] == 0
    assert data["buckets"][1]["error"] == pytest.approx(1.5) and data["buckets"][1]["stderr"] is None  # one sample


def test_bucket_errors_reject_bad_input():
    errors = BucketErrors(num_buckets=2, num_train_timesteps=10)
    with pytest.raises(ValueError, match="2 losses for 1 timesteps"):
        errors.update(torch.tensor([1.0, 2.0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="NaN or inf"):
        errors.update(torch.tensor([float("nan")]), torch.tensor([3]))


def test_stratified_timesteps_one_row_per_bucket():
    g = torch.Generator().manual_seed(0)
    t = stratified_timesteps(64, 4, 1000, g)
    assert t.shape == (4, 64)
    for i, (lo, hi) in enumerate(timestep_buckets(4, 1000)):
        assert t[i].min() >= lo and t[i].max() <= hi


def _tiny_probe(unet, task):
    torch.manual_seed(0)
    return ReadoutProbe.from_unet(unet, **task.probe_kwargs(), projection_dim=32, norm_num_groups=8)


def _batch(task, components, bsz=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(bsz, 4, 16, 16, generator=g)
    ehs = torch.randn(bsz, 77, 32, generator=g)
    control = torch.rand(bsz, 3, 32, 32, generator=g)
    out = dict(latents=latents, encoder_hidden_states=ehs, control=control)
    if task.is_segmentation:
        out["control_classes"] = torch.randint(0, 5, (bsz, 32, 32), generator=g)
    return out


@pytest.mark.parametrize("name", ["hed", "segmentation"])
def test_evaluate_probe_equals_probe_step_losses(tiny_components, name):
    """evaluate_probe reports, per bucket, the mean of probe_step's per-sample losses at its own t and noise."""
    task = get_task(name).replace(feature_scale=1.0, upsample_head=False)  # small output: fast
    unet, sched = tiny_components["unet"], tiny_components["scheduler"]
    probe = _tiny_probe(unet, task)
    batches = [_batch(task, tiny_components, seed=s) for s in (1, 2)]
    errors = evaluate_probe(task=task, probe=probe, unet=unet, noise_scheduler=sched, batches=batches, num_buckets=2, seed=7)
    assert errors.counts.tolist() == [4.0, 4.0]

    # Replay the same draws by hand: per batch, per bucket one timestep row then one noise draw.
    g = torch.Generator().manual_seed(7)
    per_bucket = [[], []]
    for b in batches:
        rows = stratified_timesteps(2, 2, 1000, g)
        for i, row in enumerate(rows):
            noise = torch.randn(b["latents"].shape, generator=g)
            with torch.no_grad():
                losses, _ = probe_step(
                    task=task, unet=unet, probe=probe, noise_scheduler=sched, latents=b["latents"],
                    encoder_hidden_states=b["encoder_hidden_states"], control=b["control"],
                    control_classes=b.get("control_classes"), noise=noise, timesteps=row, reduce=False,
                )
            per_bucket[i] += losses.tolist()
    expected = [sum(v) / len(v) for v in per_bucket]
    assert errors.means() == pytest.approx(expected, rel=1e-5)
    assert probe.training  # left as found


def test_evaluate_probe_is_reproducible_and_uses_prepare(tiny_components):
    task = get_task("depth")
    unet, sched = tiny_components["unet"], tiny_components["scheduler"]
    probe = _tiny_probe(unet, task)
    raw = [{"x": _batch(task, tiny_components, seed=3)}]
    a = evaluate_probe(task=task, probe=probe, unet=unet, noise_scheduler=sched, batches=raw,
                       prepare=lambda b: b["x"], num_buckets=3, seed=1)
    b = evaluate_probe(task=task, probe=probe, unet=unet, noise_scheduler=sched, batches=raw,
                       prepare=lambda b: b["x"], num_buckets=3, seed=1)
    assert a.means() == b.means() and a.loss_name == "mse"


def test_predict_at_timesteps_and_grid(tiny_components):
    task = get_task("lineart")  # upsample head: prediction 2x the feature size
    unet, sched = tiny_components["unet"], tiny_components["scheduler"]
    probe = _tiny_probe(unet, task)
    b = _batch(task, tiny_components)
    preds = predict_at_timesteps(probe=probe, unet=unet, noise_scheduler=sched, latents=b["latents"],
                                 encoder_hidden_states=b["encoder_hidden_states"], timesteps=(100, 900))
    assert len(preds) == 2 and preds[0].shape == (2, 3, 64, 64)
    assert not torch.allclose(preds[0], preds[1])  # the noise level changes the features
    image = torch.rand(2, 3, 32, 32)
    grid = validation_grid(task, b["control"], preds, image=image, timesteps=(100, 900))
    # the same tiles and labels through the package's one grid renderer, drawn by hand
    rows = [[to_pil(image[i]), to_pil(b["control"][i])] + [render_readout(p, task)[i] for p in preds] for i in range(2)]
    expected = labeled_grid(rows, ["image", "control", "t = 100", "t = 900"], tile_size=(32, 32))
    assert grid.size == expected.size and np.array_equal(np.asarray(grid), np.asarray(expected))
    unlabeled = labeled_grid(rows, ["image", "control", "readout 1", "readout 2"], tile_size=(32, 32))
    assert not np.array_equal(np.asarray(validation_grid(task, b["control"], preds, image=image)), np.asarray(expected))
    assert np.array_equal(np.asarray(validation_grid(task, b["control"], preds, image=image)), np.asarray(unlabeled))
    with pytest.raises(ValueError, match="1 timesteps for 2 predictions"):
        validation_grid(task, b["control"], preds, timesteps=(100,))
    with pytest.raises(ValueError, match="outside"):
        predict_at_timesteps(probe=probe, unet=unet, noise_scheduler=sched, latents=b["latents"],
                             encoder_hidden_states=b["encoder_hidden_states"], timesteps=(1000,))
