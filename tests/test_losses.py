"""The losses (Eq. 3-8), each against arithmetic done by hand on tiny tensors, and the alignment gradient path."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_innercontrol import DecoderFeatureExtractor, ReadoutProbe, get_task
from diffusers_innercontrol.losses import (
    alignment_loss,
    alignment_loss_per_sample,
    diffusion_loss,
    diffusion_target,
    masked_mean,
    one_step_x0,
    per_sample_cross_entropy,
    per_sample_mse,
    per_sample_sparse_mse,
    probe_to_unit,
    reward_loss,
    reward_loss_per_sample,
    timestep_mask,
    total_loss,
)
from diffusers_innercontrol.toy.tiny import SD15_SCHEDULER_CONFIG


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def gray(rows):
    """A (1, 3, H, W) control whose three channels all equal `rows`."""
    x = T(rows)
    return x.expand(3, *x.shape)[None].clone()


def tanh_map(rows):
    """A (1, 3, H, W) probe output whose three channels all equal `rows`."""
    return gray(rows)


# --- reductions ------------------------------------------------------------------------------
def test_masked_mean():
    values = T([1.0, 2.0, 3.0, 4.0]).requires_grad_(True)
    mask = T([1, 0, 1, 0])
    out = masked_mean(values, mask)
    assert out.item() == pytest.approx((1 + 3) / 2)
    out.backward()
    assert values.grad.tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])  # masked samples get no gradient
    empty = masked_mean(T([5.0, 7.0]), T([0, 0]))
    assert empty.item() == 0.0
    assert masked_mean(T([5.0, 7.0]), torch.tensor([True, True])).item() == pytest.approx(6.0)


def test_timestep_mask_inclusive():
    t = torch.tensor([0, 199, 200, 201, 449, 450, 980, 981, 999])
    assert timestep_mask(t, (0, 200)).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert timestep_mask(t, (450, 980)).tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]


def test_per_sample_mse():
    pred = T([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.5], [0.5, 0.5]]])
    target = T([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]])
    # sample 0: (1 + 4 + 9 + 16) / 4 = 7.5; sample 1: (0.25 + 0.25 + 0 + 0) / 4 = 0.125
    assert per_sample_mse(pred, target).tolist() == pytest.approx([7.5, 0.125])


def test_sparse_mse():
    target = T([[[[0.0, 1.0], [0.0, 0.5]]]])
    pred = T([[[[0.2, 0.5], [0.1, 0.5]]]])
    # background (target 0): (0.2^2 + 0.1^2) / 2 = 0.025; edges: (0.5^2 + 0^2) / 2 = 0.125
    assert per_sample_sparse_mse(pred, target).item() == pytest.approx(0.5 * (0.025 + 0.125))
    # one class only: the plain mean of that class
    only_bg = per_sample_sparse_mse(T([[[[0.1, 0.2], [0.3, 0.4]]]]), torch.zeros(1, 1, 2, 2))
    assert only_bg.item() == pytest.approx((0.01 + 0.04 + 0.09 + 0.16) / 4)
    only_fg = per_sample_sparse_mse(T([[[[1.0, 1.0], [1.0, 0.0]]]]), torch.ones(1, 1, 2, 2))
    assert only_fg.item() == pytest.approx(1.0 / 4)
    # a batch mixes both cases sample by sample
    both = per_sample_sparse_mse(torch.cat([pred, T([[[[0.1, 0.2], [0.3, 0.4]]]])]), torch.cat([target, torch.zeros(1, 1, 2, 2)]))
    assert both.tolist() == pytest.approx([0.075, 0.075])
    # unlike the plain MSE, which the many background pixels dominate
    assert per_sample_mse(pred, target).item() == pytest.approx((0.04 + 0.25 + 0.01 + 0.0) / 4)


def test_cross_entropy_with_ignore_index():
    # one sample, 3 classes, 1 x 3 pixels; logits per pixel: [1, 2, 3], [0, ln 2, 0], [5, 0, 0]
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, :, 0, 0] = T([1.0, 2.0, 3.0])
    logits[0, :, 0, 1] = T([0.0, math.log(2.0), 0.0])
    logits[0, :, 0, 2] = T([5.0, 0.0, 0.0])
    classes = torch.tensor([[[2, 0, 255]]])
    ce0 = math.log(math.e + math.e**2 + math.e**3) - 3.0  # -log softmax(...)[2]
    ce1 = math.log(1 + 2 + 1) - 0.0  # -log softmax(...)[0]
    assert per_sample_cross_entropy(logits, classes).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    all_ignored = per_sample_cross_entropy(logits, torch.full((1, 1, 3), 255))
    assert all_ignored.item() == 0.0


# --- Eq. 3-5 ---------------------------------------------------------------------------------------
def _alphas_cumprod_by_hand():
    # SD1.5 "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2; abar_t = prod_{s<=t} (1 - beta_s)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    abar, out = 1.0, []
    for i in range(1000):
        beta = (lo + (hi - lo) * i / 999) ** 2
        abar *= 1.0 - beta
        out.append(abar)
    return out


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(**SD15_SCHEDULER_CONFIG)


def test_scheduler_alphas_match_hand_computation(scheduler):
    by_hand = _alphas_cumprod_by_hand()
    for t in (0, 10, 500, 999):
        assert scheduler.alphas_cumprod[t].item() == pytest.approx(by_hand[t], rel=1e-5)


def test_one_step_x0_epsilon(scheduler):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g)
    eps = torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 250, 700])
    x_t = scheduler.add_noise(x0, eps, t)
    # Eq. 5 by hand with scalar alphas
    abar = _alphas_cumprod_by_hand()
    for i, ti in enumerate(t.tolist()):
        expected = (x_t[i] - math.sqrt(1 - abar[ti]) * eps[i]) / math.sqrt(abar[ti])
        got = one_step_x0(x_t[i : i + 1], eps[i : i + 1], t[i : i + 1], scheduler.alphas_cumprod)[0]
        assert torch.allclose(got, expected, atol=1e-5)
    # it inverts add_noise: the true noise recovers x0
    assert torch.allclose(one_step_x0(x_t, eps, t, scheduler.alphas_cumprod), x0, atol=1e-4)
    # a wrong noise estimate does not
    assert not torch.allclose(one_step_x0(x_t, eps * 0.5, t, scheduler.alphas_cumprod), x0, atol=1e-2)


def test_one_step_x0_v_prediction(scheduler):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 2, 2, generator=g)
    eps = torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([100, 900])
    x_t = scheduler.add_noise(x0, eps, t)
    v = scheduler.get_velocity(x0, eps, t)
    abar = _alphas_cumprod_by_hand()
    for i, ti in enumerate(t.tolist()):
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        assert torch.allclose(v[i], math.sqrt(abar[ti]) * eps[i] - math.sqrt(1 - abar[ti]) * x0[i], atol=1e-5)
        expected = math.sqrt(abar[ti]) * x_t[i] - math.sqrt(1 - abar[ti]) * v[i]
        got = one_step_x0(x_t[i : i + 1], v[i : i + 1], t[i : i + 1], scheduler.alphas_cumprod, "v_prediction")[0]
        assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(one_step_x0(x_t, v, t, scheduler.alphas_cumprod, "v_prediction"), x0, atol=1e-4)
    assert torch.equal(one_step_x0(x_t, x0, t, scheduler.alphas_cumprod, "sample"), x0)
    with pytest.raises(ValueError, match="prediction type"):
        one_step_x0(x_t, v, t, scheduler.alphas_cumprod, "flow")


def test_diffusion_target_and_loss():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([5, 600])
    eps_sched = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    assert torch.equal(diffusion_target(eps, x0, t, eps_sched), eps)
    v_sched = DDPMScheduler(**SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")
    assert torch.equal(diffusion_target(eps, x0, t, v_sched), v_sched.get_velocity(x0, eps, t))
    with pytest.raises(ValueError, match="prediction type"):
        diffusion_target(eps, x0, t, DDPMScheduler(**SD15_SCHEDULER_CONFIG, prediction_type="sample"))
    pred = T([[1.0, 2.0], [3.0, 5.0]])
    assert diffusion_loss(pred, torch.zeros(2, 2)).item() == pytest.approx((1 + 4 + 9 + 25) / 4)


# --- Eq. 6 ---------------------------------------------------------------------------------------
def test_reward_depth_max_normalised():
    task = get_task("depth")
    prediction = T([[[[1.0, 2.0], [3.0, 4.0]]]])  # any positive scale: / 4 -> [.25, .5, .75, 1]
    control = gray([[0.2, 0.4], [0.4, 0.8]])  # / 0.8 -> [.25, .5, .5, 1]
    expected = (0 + 0 + 0.25**2 + 0) / 4
    assert reward_loss_per_sample(task, prediction, control).item() == pytest.approx(expected)
    assert reward_loss_per_sample(task, prediction * 7.0, control).item() == pytest.approx(expected)
    # a (B, h, w) prediction at a lower resolution is resized to the control: a constant stays constant (-> 1)
    constant = torch.full((1, 1, 1), 2.0)
    assert reward_loss_per_sample(task, constant, control).item() == pytest.approx((0.75**2 + 0.5**2 + 0.5**2 + 0) / 4)


def test_reward_edges_mean_over_control_channels():
    control = torch.stack([T([[0.3, 0.0], [1.0, 0.0]]), T([[0.6, 0.0], [1.0, 0.0]]), T([[0.9, 0.0], [1.0, 0.3]])])[None]
    # channel mean: [[0.6, 0], [1, 0.1]]
    prediction = T([[[[0.5, 0.0], [1.0, 0.0]]]])
    expected = (0.01 + 0 + 0 + 0.01) / 4
    for name in ("hed", "lineart"):
        assert reward_loss_per_sample(get_task(name), prediction, control).item() == pytest.approx(expected)


def test_reward_segmentation_cross_entropy_with_resize():
    task = get_task("segmentation")
    logits = T([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # one logit vector, resized to the 2 x 2 class map
    classes = torch.tensor([[[0, 1], [2, 255]]])
    lse = math.log(math.e + math.e**2 + math.e**3)
    expected = ((lse - 1) + (lse - 2) + (lse - 3)) / 3  # the 255 pixel is ignored
    assert reward_loss_per_sample(task, logits, classes).item() == pytest.approx(expected, rel=1e-5)


def test_reward_loss_masked_by_window():
    task = get_task("hed")  # reward window [0, 400]
    prediction = torch.cat([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)])
    control = torch.cat([gray([[1.0, 1.0], [1.0, 1.0]]), gray([[1.0, 1.0], [1.0, 0.0]])])
    # per sample: 1.0 and 0.25; t = [50, 900]: only the first counts
    assert reward_loss(task, prediction, control, timesteps=torch.tensor([50, 900])).item() == pytest.approx(1.0)
    assert reward_loss(task, prediction, control, timesteps=torch.tensor([400, 300])).item() == pytest.approx(0.625)
    assert reward_loss(task, prediction, control, timesteps=torch.tensor([401, 999])).item() == 0.0


# --- Eq. 7 ---------------------------------------------------------------------------------------
def test_probe_to_unit():
    out = torch.stack([T([[-1.0, 0.0]]), T([[-1.0, 1.0]]), T([[-1.0, -1.0]])])[None]  # channel mean [[-1, 0]]
    assert probe_to_unit(get_task("hed"), out).flatten().tolist() == pytest.approx([0.0, 0.5])


def test_alignment_hed_sparse_mse_with_nearest_resize():
    task = get_task("hed").replace(alignment_resize="nearest")
    probe_out = tanh_map([[-1.0, 0.0], [1.0, 0.5]])  # (x + 1) / 2 -> [[0, .5], [1, .75]]
    # a 4 x 4 control; nearest downsampling to 2 x 2 reads rows/cols 0 and 2 -> [[0, 1], [0, .5]]
    control = torch.full((4, 4), 0.9)
    control[0, 0], control[0, 2], control[2, 0], control[2, 2] = 0.0, 1.0, 0.0, 0.5
    control = gray(control.tolist())
    bg = (0.0**2 + 1.0**2) / 2  # pixels where the control is 0
    fg = (0.5**2 + 0.25**2) / 2
    assert alignment_loss_per_sample(task, probe_out, control).item() == pytest.approx(0.5 * (bg + fg))


def test_alignment_area_and_readout_resize_by_hand():
    from diffusers_innercontrol.losses import alignment_target

    probe_out = tanh_map([[-1.0, 0.0], [1.0, 0.5]])  # unit [[0, .5], [1, .75]]
    control = gray([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    # area: the mean of each 2 x 2 block -> [[.5, 0], [1, .25]]
    task = get_task("lineart")  # plain MSE, area by default
    assert task.alignment_resize == "area"
    _, target = alignment_target(task, probe_out, control)
    assert target.flatten().tolist() == pytest.approx([0.5, 0.0, 1.0, 0.25])
    expected = ((0 - 0.5) ** 2 + (0.5 - 0) ** 2 + 0 + (0.75 - 0.25) ** 2) / 4
    assert alignment_loss_per_sample(task, probe_out, control).item() == pytest.approx(expected)
    # readout: the tanh output upsampled bilinearly (half-pixel centres) to 4 x 4, mapped, compared at 4 x 4
    readout = task.replace(alignment_resize="readout")
    up = torch.nn.functional.interpolate(probe_out, size=(4, 4), mode="bilinear", align_corners=False)
    by_hand = (((up.mean(1, keepdim=True) + 1) / 2 - control.mean(1, keepdim=True)) ** 2).mean()
    assert alignment_loss_per_sample(readout, probe_out, control).item() == pytest.approx(by_hand.item())
    with pytest.raises(ValueError, match="area-averaged"):
        get_task("segmentation").replace(alignment_resize="area")


def test_thin_lines_survive_the_alignment_target():
    """30 one-pixel vertical lines on a 256 px control, a 64 px readout (the paper's HED probe at 4x less): nearest
    downsampling keeps only the lines on sampled columns; area averaging keeps every one (at a quarter intensity)."""
    from diffusers_innercontrol.losses import alignment_target

    control = torch.zeros(1, 3, 256, 256)
    columns = [5 + 8 * i + (i % 4) for i in range(30)]  # every phase of the 4x downsampling
    control[..., columns] = 1.0
    readout = torch.zeros(1, 3, 64, 64)

    def surviving(task):
        _, target = alignment_target(task, readout, control)
        return sum(int(target[0, 0, :, c // 4].max() > 0) for c in columns)

    assert surviving(get_task("hed").replace(alignment_resize="nearest")) < 10
    assert surviving(get_task("hed")) == 30 and surviving(get_task("lineart")) == 30
    # the released preset compares at the control's size: the readout is upsampled, the target untouched
    out, target = alignment_target(get_task("hed", "released"), readout, control)
    assert out.shape[-2:] == (256, 256) and torch.equal(target, control.mean(1, keepdim=True))


def test_alignment_depth_max_normalised():
    task = get_task("depth")
    probe_out = tanh_map([[-1.0, -0.5], [0.0, 0.5]])  # unit [[0, .25], [.5, .75]] -> / .75 -> [[0, 1/3], [2/3, 1]]
    control = gray([[0.2, 0.4], [0.4, 0.8]])  # / .8 -> [[.25, .5], [.5, 1]]
    expected = (0.25**2 + (1 / 3 - 0.5) ** 2 + (2 / 3 - 0.5) ** 2 + 0) / 4
    assert alignment_loss_per_sample(task, probe_out, control).item() == pytest.approx(expected)


def test_alignment_lineart_paper_and_released():
    probe_out = tanh_map([[-1.0, -0.5], [0.0, 0.5]])  # unit [[0, .25], [.5, .75]]
    control = gray([[1.0, 0.0], [0.0, 1.0]])
    paper = (1.0 + 0.25**2 + 0.5**2 + 0.25**2) / 4
    assert alignment_loss_per_sample(get_task("lineart"), probe_out, control).item() == pytest.approx(paper)
    # released: min-max -> [[0, 1/3], [2/3, 1]] against the control [[1, 0], [0, 1]]
    released = (1.0 + (1 / 3) ** 2 + (2 / 3) ** 2 + 0.0) / 4
    task = get_task("lineart", preset="released")
    assert alignment_loss_per_sample(task, probe_out, control).item() == pytest.approx(released)
    # a readout of the control's own polarity costs 0 under the released mapping
    assert alignment_loss_per_sample(task, tanh_map([[1.0, -1.0], [-1.0, 1.0]]), control).item() == pytest.approx(0.0)
    inverted = task.replace(alignment_invert=True)  # the option is kept: 1 - min-max -> [[1, 2/3], [1/3, 0]]
    assert alignment_loss_per_sample(inverted, probe_out, control).item() == pytest.approx(
        (0.0 + (2 / 3) ** 2 + (1 / 3) ** 2 + 1.0) / 4
    )


def test_released_lineart_alignment_is_the_released_formula():
    """A transcription of the released stage-2 LineArt alignment: `labels` is the LineDrawing model's raw output
    (dark lines on white), the ControlNet gets `1 - labels`; the readout `(tanh + 1) / 2` is min-max normalised per
    sample, inverted, and compared with `labels` by MSE. Ours takes the ControlNet's control."""
    g = torch.Generator().manual_seed(3)
    tanh_out = torch.tanh(torch.randn(3, 1, 8, 8, generator=g))
    labels = torch.rand(3, 1, 8, 8, generator=g)  # raw LineDrawing output

    unit = (tanh_out + 1) / 2
    lo, hi = unit.amin((1, 2, 3), keepdim=True), unit.amax((1, 2, 3), keepdim=True)
    released = ((1 - (unit - lo) / (hi - lo) - labels) ** 2).mean((1, 2, 3))

    control = (1 - labels).expand(-1, 3, -1, -1)  # what the ControlNet is given, as an RGB control
    ours = alignment_loss_per_sample(get_task("lineart", preset="released"), tanh_out, control)
    torch.testing.assert_close(ours, released, rtol=1e-4, atol=1e-6)


def test_released_hed_alignment_is_per_channel_mse():
    """A transcription of the released HED alignment: every channel of `(tanh + 1) / 2` against the 3-channel grey
    HED control, plain MSE at the control's size. The paper preset compares the channel mean (sparse MSE)."""
    g = torch.Generator().manual_seed(4)
    tanh_out = torch.tanh(torch.randn(2, 3, 8, 8, generator=g) * 2)  # three different channels
    grey = torch.rand(2, 1, 8, 8, generator=g).expand(-1, 3, -1, -1)
    released = (((tanh_out + 1) / 2 - grey) ** 2).mean((1, 2, 3))
    task = get_task("hed", preset="released")
    assert task.alignment_channels == "each"
    torch.testing.assert_close(alignment_loss_per_sample(task, tanh_out, grey), released, rtol=1e-5, atol=1e-7)
    # the channel mean is another loss when the channels differ (it forgives channels that cancel out)
    mean_of_channels = ((((tanh_out.mean(1) + 1) / 2) - grey[:, 0]) ** 2).mean((1, 2))
    torch.testing.assert_close(alignment_loss_per_sample(task.replace(alignment_channels="mean"), tanh_out, grey),
                               mean_of_channels, rtol=1e-5, atol=1e-7)
    assert (released > mean_of_channels).all()
    # per channel also works with the class-balanced loss: every channel against the one-channel target
    sparse = task.replace(alignment_loss="sparse_mse", alignment_channels="each")
    by_channel = torch.stack([per_sample_sparse_mse((tanh_out[:, c:c + 1] + 1) / 2, grey[:, :1]) for c in range(3)])
    torch.testing.assert_close(alignment_loss_per_sample(sparse, tanh_out, grey), by_channel.mean(0), rtol=1e-5, atol=1e-7)


def test_alignment_segmentation_cross_entropy():
    task = get_task("segmentation")
    logits = torch.zeros(1, 150, 1, 2)
    logits[0, 7, 0, 0] = 2.0  # pixel 0: class 7 has logit 2, the other 149 have 0
    classes = torch.tensor([[[7, 7, 3, 3], [255, 255, 255, 255]]])  # 2 x 4, nearest -> [[7, 3]]
    ce_pixel0 = math.log(math.e**2 + 149) - 2.0
    ce_pixel1 = math.log(150.0)
    assert alignment_loss_per_sample(task, logits, classes).item() == pytest.approx((ce_pixel0 + ce_pixel1) / 2, rel=1e-5)


def test_alignment_loss_masked_by_window():
    task = get_task("hed")  # alignment window [0, 800]
    probe_out = torch.cat([tanh_map([[1.0, 1.0], [1.0, 1.0]]), tanh_map([[-1.0, -1.0], [-1.0, -1.0]])])
    control = torch.cat([gray([[0.0, 0.0], [1.0, 1.0]]), gray([[0.0, 0.0], [0.0, 1.0]])])
    # sample 0 (unit 1 everywhere): background mse 1, edges 0 -> 0.5; sample 1 (unit 0): background 0, edges 1 -> 0.5
    per = alignment_loss_per_sample(task, probe_out, control)
    assert per.tolist() == pytest.approx([0.5, 0.5])
    control2 = torch.cat([gray([[0.0, 0.0], [1.0, 1.0]]), gray([[0.0, 0.0], [0.0, 0.5]])])  # sample 1: fg (0.5)^2
    per2 = alignment_loss_per_sample(task, probe_out, control2)
    assert per2.tolist() == pytest.approx([0.5, 0.125])
    assert alignment_loss(task, probe_out, control2, timesteps=torch.tensor([800, 801])).item() == pytest.approx(0.5)
    assert alignment_loss(task, probe_out, control2, timesteps=torch.tensor([900, 0])).item() == pytest.approx(0.125)
    assert alignment_loss(task, probe_out, control2, timesteps=torch.tensor([0, 1])).item() == pytest.approx(0.3125)


# --- Eq. 8 ---------------------------------------------------------------------------------------
def test_total_loss():
    d, r, a = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(d, r, a, alpha=0.5, beta=0.1).item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.1 * 3.0)
    assert total_loss(d, None, a, alpha=0.5, beta=2.0).item() == pytest.approx(7.0)
    assert total_loss(d, r, None, alpha=10.0).item() == pytest.approx(21.0)
    # a switched-off term is left out, not multiplied by zero (0 * nan would poison the loss)
    assert total_loss(d, torch.tensor(float("nan")), a, alpha=0.0, beta=1.0).item() == pytest.approx(4.0)


# --- the gradient path of the alignment loss -------------------------------------------------------
def _frozen_probe(unet, kind="resnet"):
    probe = ReadoutProbe.from_unet(unet, kind, projection_dim=32, norm_num_groups=8)
    return probe.requires_grad_(False).eval()


def test_alignment_gradient_reaches_controlnet_through_frozen_unet(tiny_components):
    from diffusers_innercontrol.training import controlnet_step

    unet, controlnet, scheduler = tiny_components["unet"], tiny_components["controlnet"], tiny_components["scheduler"]
    unet.requires_grad_(False)
    controlnet.train()
    probe = _frozen_probe(unet)
    task = get_task("hed")
    g = torch.Generator().manual_seed(5)
    latents, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    control = (torch.rand(2, 3, 32, 32, generator=g) > 0.7).float()
    noise, timesteps = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 600])

    out = controlnet_step(
        task=task, unet=unet, controlnet=controlnet, noise_scheduler=scheduler, latents=latents,
        encoder_hidden_states=text, control=control, probe=probe, alpha=0.0, beta=1.0, noise=noise, timesteps=timesteps,
        early_branch_backward=False,  # the alignment term keeps its graph, for its own backward
    )
    assert out.reward is None and out.alignment is not None and out.alignment.item() > 0
    out.alignment.backward()
    cn_grads = [p.grad for p in controlnet.parameters() if p.grad is not None]
    assert cn_grads and sum(gr.abs().sum() for gr in cn_grads) > 0
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is None for p in probe.parameters())

    # the same loss by hand: features of the ControlNet-conditioned UNet forward, probe, Eq. 7
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad(), DecoderFeatureExtractor(unet, "resnet") as extractor:
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        readout = probe(extractor.features, timesteps).sample
    by_hand = alignment_loss_per_sample(task, readout, control).mean()
    assert out.alignment.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_alignment_gradient_by_hand_with_extractor(tiny_components):
    """Without training.py: extractor + probe + Eq. 7 on attention features; only the ControlNet gets gradients."""
    unet, controlnet = tiny_components["unet"], tiny_components["controlnet"]
    unet.requires_grad_(False)
    probe = _frozen_probe(unet, "attention")
    g = torch.Generator().manual_seed(6)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    control, t = torch.rand(1, 3, 32, 32, generator=g), torch.tensor([300])
    with DecoderFeatureExtractor(unet, "attention") as extractor:
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    loss = alignment_loss(get_task("depth"), probe(extractor.features, t).sample, control, timesteps=t)
    loss.backward()
    grads = {n: p.grad for n, p in controlnet.named_parameters() if p.grad is not None}
    assert grads and any(gr.abs().sum() > 0 for gr in grads.values())
    assert all(p.grad is None for p in unet.parameters()) and all(p.grad is None for p in probe.parameters())
    # outside the window the alignment term is exactly zero and sends no gradient
    controlnet.zero_grad(set_to_none=True)
    with DecoderFeatureExtractor(unet, "attention") as extractor:
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    outside = alignment_loss(get_task("depth"), probe(extractor.features, t).sample, control, timesteps=torch.tensor([950]))
    assert outside.item() == 0.0
    outside.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in controlnet.parameters())


# --- edge cases the mutation run found untested (docs/testing.md) -------------------------------------------
def test_sparse_mse_with_a_single_background_pixel():
    from diffusers_innercontrol.losses import per_sample_sparse_mse

    # target [0, 1, 1, 1]: one background pixel (error 0.5^2), three edge pixels (errors 0, 0.5^2, 1)
    pred, target = torch.tensor([[0.5, 1.0, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    expected = 0.5 * (0.25 + (0.0 + 0.25 + 1.0) / 3)
    assert per_sample_sparse_mse(pred, target).item() == pytest.approx(expected)


def test_cross_entropy_is_per_sample_with_one_valid_pixel():
    from diffusers_innercontrol.losses import per_sample_cross_entropy

    logits = torch.zeros(2, 2, 1, 2)  # two classes, uniform: -ln(1/2) per valid pixel
    logits[1, 1] = math.log(3.0)  # sample 1: p(class 1) = 3/4
    classes = torch.tensor([[[0, 255]], [[1, 1]]])  # sample 0: one valid pixel; sample 1: two
    out = per_sample_cross_entropy(logits, classes)
    assert out.tolist() == pytest.approx([math.log(2.0), -math.log(0.75)])


def test_max_normalise_is_per_sample():
    from diffusers_innercontrol.losses import per_sample_max_normalise

    x = torch.tensor([[[[1.0, 2.0]]], [[[4.0, 1.0]]]])
    assert per_sample_max_normalise(x).flatten().tolist() == pytest.approx([0.5, 1.0, 1.0, 0.25])


def test_one_step_x0_keeps_the_latents_dtype():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    x = torch.randn(1, 4, 2, 2).to(torch.bfloat16)
    out = one_step_x0(x, torch.zeros_like(x), torch.tensor([10]), scheduler.alphas_cumprod, "epsilon")
    assert out.dtype == torch.bfloat16


def test_window_means_and_total_without_optional_arguments():
    from diffusers_innercontrol.losses import alignment_loss, reward_loss, total_loss

    task = get_task("depth")
    pred, control = torch.rand(2, 1, 4, 4), torch.rand(2, 3, 4, 4)
    # no timesteps and no mask: the plain mean over the samples
    assert reward_loss(task, pred, control).item() == pytest.approx(reward_loss_per_sample(task, pred, control).mean().item())
    probe_out = torch.tanh(torch.randn(2, 1, 4, 4))
    assert alignment_loss(task, probe_out, control).item() == pytest.approx(
        alignment_loss_per_sample(task, probe_out, control).mean().item())
    d, r, a = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(d, r, a).item() == 1.0  # alpha = beta = 0 by default: the diffusion loss alone
    assert total_loss(d, None, None, 0.0, 1.0).item() == 1.0  # a missing term counts as 0
    assert total_loss(d, r, a, 0.5, 2.0).item() == pytest.approx(1.0 + 1.0 + 6.0)
