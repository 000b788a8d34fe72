"""ReadoutProbe: size on the SD1.5 UNet, the copied timestep embedding, shapes, mixing, serialisation."""

import os

import pytest
import torch
import torch.nn.functional as F

from diffusers_innercontrol import ReadoutProbe
from diffusers_innercontrol.toy.tiny import build_sd15_unet

TINY = dict(projection_dim=32, norm_num_groups=8)
TINY_CHANNELS = [64, 64, 64, 32, 32, 32]  # the tiny UNet's up-block resnets: (64, 32) blocks, 3 layers each


def tiny_features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, 8 if c == 64 else 16, 8 if c == 64 else 16, generator=g) for c in TINY_CHANNELS]


@pytest.fixture
def unet(tiny_components):
    return tiny_components["unet"]


def _probe_parameters_by_hand(channels, projection, bottleneck, temb, out_channels, head=(128, 32)):
    """The probe's architecture (docs/method.md), counted by hand (convolutions without bias in the blocks)."""
    total = 0
    for c in channels:
        total += c * bottleneck + 2 * bottleneck  # conv1 1x1 + GN
        total += temb * bottleneck + bottleneck  # Linear(t_emb -> bottleneck)
        total += bottleneck * bottleneck * 9 + 2 * bottleneck  # conv2 3x3 + GN
        total += bottleneck * projection + 2 * projection  # conv3 1x1 + GN
        if c != projection:
            total += c * projection + 2 * projection  # shortcut 1x1 + GN
    total += len(channels)  # mixing weights
    total += projection * head[0] * 9 + head[0]
    total += head[0] * head[1] * 9 + head[1]
    total += head[1] * out_channels + out_channels
    return total


@pytest.fixture(scope="module")
def sd15():
    return build_sd15_unet("meta")  # the SD1.5 config, no weights, no download


@pytest.mark.parametrize("kind,expected_millions,layers", [("resnet", 8.5, 12), ("attention", 5.9, 9)])
def test_sd15_parameter_count(sd15, kind, expected_millions, layers):
    probe = ReadoutProbe.from_unet(sd15, feature_kind=kind, projection_dim=384, out_channels=3)
    n = probe.num_probe_parameters
    print(f"ReadoutProbe on SD1.5 {kind} features ({layers} layers): {n:,} parameters ({n / 1e6:.2f} M)")
    assert len(probe.config.feature_channels) == layers
    assert abs(n - expected_millions * 1e6) / (expected_millions * 1e6) < 0.05
    assert n == _probe_parameters_by_hand(probe.config.feature_channels, 384, 96, 1280, 3)
    # the copied embedding (320 -> 1280 -> 1280 linear layers) is what `num_probe_parameters` leaves out
    total = sum(p.numel() for p in probe.parameters())
    assert total - n == 320 * 1280 + 1280 + 1280 * 1280 + 1280


def test_from_unet_copies_time_embedding(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", **TINY)
    assert list(probe.config.feature_channels) == TINY_CHANNELS
    src, dst = unet.time_embedding.state_dict(), probe.time_embedding.state_dict()
    assert src.keys() == dst.keys()
    for key in src:
        assert torch.equal(src[key], dst[key]), key
        assert src[key].data_ptr() != dst[key].data_ptr()  # a copy, not shared storage
    t = torch.tensor([3, 999])
    with torch.no_grad():
        expected = unet.time_embedding(unet.time_proj(t))
        got = probe.embed_timesteps(t, 2, t.device, torch.float32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "feature_scale,upsample_head,size", [(1.0, False, 16), (2.0, False, 32), (1.0, True, 32), (2.0, True, 64)]
)
def test_output_shapes(unet, feature_scale, upsample_head, size):
    probe = ReadoutProbe.from_unet(
        unet, "resnet", feature_scale=feature_scale, upsample_head=upsample_head, out_channels=5, **TINY
    )
    feats = tiny_features()
    with torch.no_grad():
        out = probe(feats, torch.tensor([10, 700])).sample
    assert out.shape == (2, 5, size, size)
    assert probe.output_size([f.shape[-2:] for f in feats]) == (size, size)


def test_tanh_versus_none(unet):
    probe_tanh = ReadoutProbe.from_unet(unet, "resnet", output_activation="tanh", **TINY)
    probe_none = ReadoutProbe.from_unet(unet, "resnet", output_activation="none", **TINY)
    probe_none.load_state_dict(probe_tanh.state_dict())
    with torch.no_grad():
        probe_none.head[-1].bias.fill_(3.0)  # push the logits outside [-1, 1]
        probe_tanh.head[-1].bias.fill_(3.0)
        feats = tiny_features()
        logits = probe_none(feats, 500).sample
        bounded = probe_tanh(feats, 500).sample
    assert logits.max() > 1.0
    assert bounded.abs().max() <= 1.0
    assert torch.allclose(bounded, torch.tanh(logits), atol=1e-6)
    with pytest.raises(ValueError, match="output_activation"):
        ReadoutProbe(feature_channels=TINY_CHANNELS, output_activation="sigmoid", **TINY)


def test_return_dict_false_gives_tuple(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", **TINY)
    feats = tiny_features()
    with torch.no_grad():
        as_tuple = probe(feats, 100, return_dict=False)
        as_output = probe(feats, 100)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], as_output.sample)


def test_save_load_round_trip_is_bit_exact(unet, tmp_path):
    probe = ReadoutProbe.from_unet(unet, "attention", feature_scale=2.0, upsample_head=True, out_channels=4, **TINY)
    with torch.no_grad():
        for p in probe.parameters():  # not the initial values: every tensor distinct
            p.add_(torch.randn_like(p) * 0.1)
    probe.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith(".bin")]
    loaded = ReadoutProbe.from_pretrained(tmp_path)
    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(loaded.config) == plain(probe.config)
    a, b = probe.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Bit-exactness is a claim about the weights (above). The outputs of equal weights can still differ in the
    # last bits: safetensors may place tensors at addresses that are not 64-byte aligned, and oneDNN then picks
    # another kernel (seen on AVX-512 CPUs). So the outputs are compared to float32 rounding of the output's scale
    # (an element near 0 carries the rounding of the large terms it is summed from).
    feats = [torch.randn(1, c, 8, 8) for c in probe.config.feature_channels]
    with torch.no_grad():
        expected, actual = probe(feats, 42).sample, loaded(feats, 42).sample
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_wrong_feature_channels_raise(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", **TINY)
    feats = tiny_features()
    with pytest.raises(ValueError, match=r"channels \[64, 64, 64, 32, 32, 32\]"):
        probe(feats[::-1], 10)
    with pytest.raises(ValueError, match="expects 6 feature maps"):
        probe(feats[:5], 10)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        probe(feats, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="feature_kind"):
        ReadoutProbe(feature_channels=TINY_CHANNELS, feature_kind="mlp", **TINY)


def test_timestep_conditioning_matters(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", output_activation="none", **TINY)
    feats = tiny_features(batch=2)
    with torch.no_grad():
        a = probe(feats, 10).sample
        b = probe(feats, 900).sample
        per_sample = probe(feats, torch.tensor([10, 900])).sample
    assert not torch.allclose(a, b)
    # one timestep per sample: each sample gets its own embedding
    assert torch.allclose(per_sample[0], a[0], atol=1e-6)
    assert torch.allclose(per_sample[1], b[1], atol=1e-6)


def _block_by_hand(block, x, temb):
    """The probe's bottleneck block (docs/method.md), written out with the functional ops."""
    groups = block.norm1.num_groups
    h = F.relu(F.group_norm(F.conv2d(x, block.conv1.weight), groups, block.norm1.weight, block.norm1.bias))
    h = h + F.relu(F.linear(temb, block.time_emb_proj.weight, block.time_emb_proj.bias))[:, :, None, None]
    h = F.relu(F.group_norm(F.conv2d(h, block.conv2.weight, padding=1), groups, block.norm2.weight, block.norm2.bias))
    h = F.group_norm(F.conv2d(h, block.conv3.weight), groups, block.norm3.weight, block.norm3.bias)
    if block.shortcut is not None:
        s = F.group_norm(F.conv2d(x, block.shortcut.weight), groups, block.shortcut_norm.weight, block.shortcut_norm.bias)
    else:
        s = x
    return F.relu(h + s)


def test_mixing_weights_are_softmax_normalised(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", output_activation="none", **TINY)
    feats = tiny_features(batch=1)
    t = torch.tensor([250])
    with torch.no_grad():
        temb = unet.time_embedding(unet.time_proj(t))
        resized = [F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False) for f in feats]
        blocks = [_block_by_hand(blk, f, temb) for blk, f in zip(probe.bottleneck_layers, resized)]

        # equal weights: softmax gives 1/6 each, the head sees the mean of the six block outputs
        probe.mixing_weights.fill_(0.7)
        mean_path = probe.head(sum(blocks) / 6)
        assert torch.allclose(probe(feats, t).sample, mean_path, atol=1e-5)

        # one huge weight: softmax puts all the mass on layer 1 (an 8 px map, upsampled to 16 px)
        probe.mixing_weights.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0, 0.0, 0.0]))
        single = probe.head(blocks[1])
        assert torch.allclose(probe(feats, t).sample, single, atol=1e-5)
        # softmax is invariant to a common shift; raw weights (no normalisation) would not be
        probe.mixing_weights.add_(-50.0)
        assert torch.allclose(probe(feats, t).sample, single, atol=1e-5)

        # weights (ln 1, ln 3) on two layers, others -inf-like: 1/4 and 3/4
        probe.mixing_weights.copy_(torch.tensor([-1e4, -1e4, -1e4, 0.0, torch.log(torch.tensor(3.0)).item(), -1e4]))
        two = probe.head(0.25 * blocks[3] + 0.75 * blocks[4])
        assert torch.allclose(probe(feats, t).sample, two, atol=1e-5)


def test_bottleneck_runs_1x1_convs_before_the_resize_without_changing_the_result():
    """The probe resizes after its 1x1 convolutions (cheaper); the output equals resize-then-block (float64)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    probe = ReadoutProbe(
        feature_channels=(64, 64, 32), projection_dim=32, norm_num_groups=8, feature_scale=2.0, upsample_head=True
    ).double()
    feats = [torch.randn(2, 64, 4, 4).double(), torch.randn(2, 64, 8, 8).double(), torch.randn(2, 32, 8, 8).double()]
    t = torch.tensor([5, 700])
    out = probe(feats, t).sample
    temb = probe.embed_timesteps(t, 2, "cpu", torch.float64)
    weights = torch.softmax(probe.mixing_weights, 0)
    mixed = 0
    for w, f, block in zip(weights, feats, probe.bottleneck_layers):
        mixed = mixed + w * block(F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False), temb)
    reference = torch.tanh(probe.head(mixed))
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_size, out_size", [((4, 4), (32, 32)), ((8, 8), (16, 16)), ((5, 7), (13, 9)),
                                               ((16, 16), (8, 8)), ((3, 3), (3, 3)), ((1, 4), (2, 8))])
def test_bilinear_resize_equals_interpolate_forward_and_backward(in_size, out_size):
    """The probe's resize (two matrix products) is F.interpolate(bilinear, align_corners=False), values and input
    gradients, up and down, square or not (float64: equal to rounding)."""
    from diffusers_innercontrol.models.readout_probe import bilinear_resize

    torch.manual_seed(0)
    x = torch.randn(2, 3, *in_size, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, *out_size, dtype=torch.float64)
    ours = bilinear_resize(x, out_size)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    reference = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    (grad_ref,) = torch.autograd.grad((reference * upstream).sum(), x)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-12, rtol=0)


def test_bilinear_resize_weights_by_hand():
    """2 -> 4 pixels, align_corners=False: outputs sample the input at -0.25 (clamped to 0), 0.25, 0.75, 1.25."""
    from diffusers_innercontrol.models.readout_probe import bilinear_resize

    x = torch.tensor([[[[0.0, 4.0]]]])  # (1, 1, 1, 2)
    assert bilinear_resize(x, (1, 4)).flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


def test_probe_gradient_checkpointing_gives_the_same_gradients():
    """Per-block activation checkpointing (stage 2 with --gradient_checkpointing) changes memory, not gradients."""
    torch.manual_seed(0)
    probe = ReadoutProbe(feature_channels=(64, 32), projection_dim=32, norm_num_groups=8, feature_scale=2.0).requires_grad_(False)
    feats = [torch.randn(2, 64, 4, 4), torch.randn(2, 32, 8, 8)]
    t = torch.tensor([10, 600])

    def input_grads():
        leaves = [f.clone().requires_grad_(True) for f in feats]
        (probe(leaves, t).sample ** 2).sum().backward()
        return [leaf.grad for leaf in leaves]

    plain = input_grads()
    calls = []
    probe.enable_gradient_checkpointing()
    original = probe._gradient_checkpointing_func
    probe._gradient_checkpointing_func = lambda *a: calls.append(1) or original(*a)
    checkpointed = input_grads()
    assert len(calls) == 2  # one checkpointed call per feature block
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed))
    assert all(g.abs().sum() > 0 for g in plain)
    with torch.no_grad():  # no checkpointing when no gradient is needed
        probe(feats, t)
    assert len(calls) == 2


def test_from_unet_follows_the_unets_time_embedding_config():
    """A UNet with non-default sinusoid settings and activation: the probe embeds t exactly as that UNet does."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
        flip_sin_to_cos=False, freq_shift=1, act_fn="gelu",
    )
    probe = ReadoutProbe.from_unet(unet, "resnet", **TINY)
    assert (probe.config.flip_sin_to_cos, probe.config.freq_shift, probe.config.time_embedding_act_fn) == (False, 1, "gelu")
    t = torch.tensor([0, 250, 999])
    with torch.no_grad():
        torch.testing.assert_close(probe.embed_timesteps(t, 3, t.device, torch.float32),
                                   unet.time_embedding(unet.time_proj(t)), rtol=0, atol=0)


def test_from_unet_on_meta_builds_on_meta(sd15):
    probe = ReadoutProbe.from_unet(sd15, "resnet", projection_dim=64, norm_num_groups=8)
    assert all(p.is_meta for p in probe.parameters())


def test_output_size_of_non_square_features(unet):
    probe = ReadoutProbe.from_unet(unet, "resnet", feature_scale=2.0, upsample_head=True, **TINY)
    assert probe.output_size([(4, 6), (8, 12), (8, 12)]) == (32, 48)
    features = [torch.randn(1, c, 4 if c == 64 else 8, 6 if c == 64 else 12) for c in TINY_CHANNELS]
    with torch.no_grad():
        assert probe(features, 10).sample.shape[-2:] == (32, 48)


def test_bottleneck_block_defaults_to_32_groups():
    from diffusers_innercontrol.models.readout_probe import ProbeBottleneckBlock

    block = ProbeBottleneckBlock(64, 32, 64, 16)
    assert {m.num_groups for m in block.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}


def test_defaults_and_features_of_another_dtype(unet):
    probe = ReadoutProbe.from_unet(unet, **TINY)
    assert probe.config.feature_kind == "resnet"
    features = tiny_features()
    with torch.no_grad():
        want = probe(features, 10).sample
        # float64 features (a UNet kept in another precision) are cast to the probe's dtype
        torch.testing.assert_close(probe(features=[f.double() for f in features], timestep=10).sample, want)
    probe.enable_gradient_checkpointing()
    probe.train()
    out = probe([f.double().requires_grad_() for f in features], 10).sample
    assert out.dtype == torch.float32
