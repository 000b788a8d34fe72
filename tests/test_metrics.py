"""Metric code of the evaluation (the paper's protocol) on hand-made cases."""

import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from diffusers_innercontrol.hub_utils import OfflineModelError
from diffusers_innercontrol.metrics import (
    ControlFidelity,
    build_clip_score,
    build_fid,
    depth_rmse,
    depth_to_0_255,
    edge_ms_ssim,
    edge_ssim,
    edge_ssim_deficit_by_region,
    mean_iou,
    ms_ssim_min_size,
)


# --- SSIM / MS-SSIM -------------------------------------------------------------------------------
def test_ssim_identical_maps_is_one():
    control = (torch.rand(2, 1, 32, 32) > 0.7).float().expand(-1, 3, -1, -1)  # grey RGB control
    pred = control[:, :1].clone()
    ssim = edge_ssim(pred, control)
    assert ssim.shape == (2,)
    torch.testing.assert_close(ssim, torch.ones(2), atol=1e-5, rtol=0)


def test_ssim_of_constant_maps_by_hand():
    # Constant maps: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * data_range)^2, range 1.
    a, b, c1 = 0.5, 0.25, 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # 0.80006...
    ssim = edge_ssim(torch.full((1, 1, 24, 24), a), torch.full((1, 3, 24, 24), b))
    assert abs(ssim.item() - expected) < 1e-4


def test_ssim_resizes_prediction_to_control():
    control = torch.zeros(1, 3, 32, 32)
    control[..., 8:24, 8:24] = 1.0
    pred = torch.zeros(1, 1, 16, 16)
    pred[..., 4:12, 4:12] = 1.0  # the same square at half the size
    assert edge_ssim(pred, control).item() > 0.7
    assert edge_ssim(1.0 - pred, control).item() < 0.0  # inverted polarity is punished


def test_ssim_deficit_by_region_of_constant_maps_by_hand():
    # Constant maps have the hand SSIM of the test above everywhere; a control above the threshold makes every pixel
    # "near an edge", one below it every pixel background.
    a, c1 = 0.5, 1e-4
    for b, column in ((0.25, 0), (0.04, 1)):
        deficit = 1 - (2 * a * b + c1) / (a * a + b * b + c1)
        parts = edge_ssim_deficit_by_region(torch.full((1, 1, 24, 24), a), torch.full((1, 3, 24, 24), b))
        assert parts.shape == (1, 2)
        assert abs(parts[0, column].item() - deficit) < 1e-4 and parts[0, 1 - column].item() == 0


def test_ssim_deficit_by_region_splits_where_the_maps_differ():
    control = torch.zeros(2, 1, 48, 48)
    control[:, :, 8:10, 4:14] = 1.0  # an edge in the top-left corner
    spurious = control.clone()
    spurious[:, :, 34:40, 34:40] = 0.8  # an edge the control does not have, far from its edges
    parts = edge_ssim_deficit_by_region(spurious, control)
    assert parts[:, 0].abs().max().item() < 1e-9 and (parts[:, 1] > 0.01).all()  # all of it on the background
    moved = torch.roll(control, 1, dims=-1)  # the control's edge one pixel off; SSIM windows reach 5 px
    parts = edge_ssim_deficit_by_region(moved, control, near_px=6)
    assert (parts[:, 0] > 0.01).all() and parts[:, 1].abs().max().item() < 1e-9  # all of it near the edge
    assert edge_ssim_deficit_by_region(moved, control, near_px=1)[:, 1].min().item() > 0  # a narrower band leaves some
    # the two parts add up to the SSIM's deficit, per sample
    pred = torch.rand(3, 1, 40, 40)
    control = (torch.rand(3, 1, 40, 40) > 0.9).float()
    torch.testing.assert_close(edge_ssim_deficit_by_region(pred, control).sum(1).float(), 1 - edge_ssim(pred, control),
                               atol=1e-5, rtol=0)


def test_ms_ssim_identical_is_one_and_small_maps_give_none():
    assert ms_ssim_min_size() == 160  # (11 - 1) * 2 ** 4
    big = torch.rand(1, 1, 176, 176)
    torch.testing.assert_close(edge_ms_ssim(big, big.expand(-1, 3, -1, -1)), torch.ones(1), atol=1e-4, rtol=0)
    with pytest.warns(UserWarning, match="MS-SSIM needs"):
        assert edge_ms_ssim(torch.rand(1, 1, 32, 32), torch.rand(1, 3, 32, 32)) is None
    with pytest.warns(UserWarning, match=r"MS-SSIM needs maps larger than 160 px \(got \(160, 160\)\)"):
        assert edge_ms_ssim(torch.rand(1, 1, 160, 160), torch.rand(1, 1, 160, 160)) is None  # larger, not equal


def test_ms_ssim_is_per_sample_on_a_fixed_range_with_the_kernel_given():
    """Two different pairs of maps in [0.2, 0.6] (a range of 0.4, so a range read off the data would differ):
    one value each, as torchmetrics computes them with data_range 1 and the kernel asked for."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    g = torch.Generator().manual_seed(0)
    control = 0.2 + 0.4 * torch.rand(2, 1, 112, 112, generator=g)
    pred = (control + 0.1 * torch.randn(2, 1, 112, 112, generator=g)).clamp(0.2, 0.6)
    pred[1] = control[1].flip(-1)
    out = edge_ms_ssim(pred, control, kernel_size=7)  # (7 - 1) * 16 = 96 px needed
    expected = ms_ssim(pred, control, data_range=1.0, kernel_size=7, reduction="none")
    assert out.shape == (2,) and abs(out[0] - out[1]) > 0.05
    torch.testing.assert_close(out, expected.reshape(-1))
    assert not torch.allclose(out, ms_ssim(pred, control, kernel_size=7, reduction="none").reshape(-1))


def test_edge_maps_clamp_resize_and_refuse_a_batch_mismatch():
    """Readings outside [0, 1] count as 0 or 1, on both sides; the resize is bilinear with half-pixel centres
    (align_corners=False): [[0, 1], [2, 3]] to 4x4 has the first row 0, 0.25, 0.75, 1 (not 0, 1/3, 2/3, 1)."""
    from diffusers_innercontrol.metrics import edge_maps, resize_map, to_single_channel

    pred, target = edge_maps(torch.tensor([[[[-0.5, 0.3], [1.7, 1.0]]]]), torch.tensor([[[[2.0, -1.0], [0.5, 0.2]]]]))
    torch.testing.assert_close(pred, torch.tensor([[[[0.0, 0.3], [1.0, 1.0]]]]))
    torch.testing.assert_close(target, torch.tensor([[[[1.0, 0.0], [0.5, 0.2]]]]))
    grid = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    torch.testing.assert_close(resize_map(grid, (4, 4))[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert resize_map(grid, (2, 2)) is grid  # at its size: untouched
    with pytest.raises(ValueError, match=r"^Got 2 predicted maps for 3 controls\.$"):
        edge_maps(torch.rand(2, 1, 4, 4), torch.rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^Expected maps of shape \(B, C, H, W\) or \(B, H, W\), got \(4, 4\)\.$"):
        to_single_channel(torch.rand(4, 4))


def test_ssim_options_reach_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, control = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    options = dict(kernel_size=5, gaussian_kernel=False)
    expected = structural_similarity_index_measure(pred, control, data_range=1.0, reduction="none", **options)
    torch.testing.assert_close(edge_ssim(pred, control, **options), expected)
    assert not torch.allclose(edge_ssim(pred, control), expected)


def test_ssim_deficit_by_region_defaults_and_threshold():
    """A control value exactly at the threshold is not an edge (strictly above counts); the defaults are a 3-pixel
    band and a 0.05 threshold."""
    a, b, c1 = 0.5, 0.25, 1e-4
    deficit = 1 - (2 * a * b + c1) / (a * a + b * b + c1)
    parts = edge_ssim_deficit_by_region(torch.full((1, 1, 24, 24), a), torch.full((1, 1, 24, 24), b), threshold=b)
    assert parts[0, 0].item() == 0 and abs(parts[0, 1].item() - deficit) < 1e-4
    control = torch.zeros(1, 1, 48, 48)
    control[:, :, 20:22, 10:30] = 1.0
    moved = torch.roll(control, 1, dims=-2)
    default = edge_ssim_deficit_by_region(moved, control)
    assert torch.equal(default, edge_ssim_deficit_by_region(moved, control, near_px=3, threshold=0.05))
    assert not torch.allclose(default, edge_ssim_deficit_by_region(moved, control, near_px=4))


# --- depth RMSE -----------------------------------------------------------------------------------
def test_depth_to_0_255_by_hand():
    depth = torch.tensor([[[2.0, 1.0], [0.5, 4.0]]])  # (1, 2, 2), max 4
    out = depth_to_0_255(depth, quantize=False)
    torch.testing.assert_close(out, torch.tensor([[[[127.5, 63.75], [31.875, 255.0]]]]))
    torch.testing.assert_close(depth_to_0_255(depth), torch.tensor([[[[128.0, 64.0], [32.0, 255.0]]]]))


def test_depth_rmse_identical_and_scale_invariant_is_zero():
    control = torch.rand(2, 1, 8, 8).expand(-1, 3, -1, -1) + 0.1
    assert torch.all(depth_rmse(control[:, 0], control) == 0)
    assert torch.all(depth_rmse(7.0 * control[:, :1], control) == 0)  # max-normalised: scale does not matter


def test_depth_rmse_of_two_hand_maps():
    control = torch.tensor([[1.0, 0.5], [0.5, 1.0]]).view(1, 1, 2, 2).expand(-1, 3, -1, -1)  # -> 255 127.5 / 127.5 255
    pred = torch.tensor([[[2.0, 2.0], [1.0, 2.0]]])  # -> 255 255 / 127.5 255
    # quantised: 127.5 rounds to 128 -> one pixel differs by 127: sqrt(127^2 / 4) = 63.5
    assert abs(depth_rmse(pred, control).item() - 63.5) < 1e-4
    # unquantised: one pixel differs by 127.5: 63.75
    assert abs(depth_rmse(pred, control, quantize=False).item() - 63.75) < 1e-4
    # a 1x1 prediction is resized to 2x2 (255 everywhere): two pixels differ by 127 -> 127 / sqrt(2)
    assert abs(depth_rmse(torch.ones(1, 1, 1), control).item() - 127 / math.sqrt(2)) < 1e-3


def test_depth_rmse_refuses_a_batch_mismatch():
    with pytest.raises(ValueError, match=r"^Got 2 depth predictions for 3 controls\.$"):
        depth_rmse(torch.rand(2, 4, 4), torch.rand(3, 3, 4, 4))


# --- mIoU -----------------------------------------------------------------------------------------
def test_miou_known_confusion():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: I = 1, U = 2 -> 1/2; class 1: I = 2, U = 3 -> 2/3; mIoU = 7/12
    torch.testing.assert_close(mean_iou(pred, target, 2, per_class=True), torch.tensor([0.5, 2 / 3]))
    assert abs(mean_iou(pred, target, 2).item() - 7 / 12) < 1e-6


def test_miou_ignores_255_and_absent_classes():
    target = torch.tensor([[[0, 0], [1, 255]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # the ignored pixel is dropped: class 0 -> 1/2, class 1: I = 1, U = 2 -> 1/2; class 2 absent: not averaged
    assert abs(mean_iou(pred, target, 3).item() - 0.5) < 1e-6


def test_miou_of_logits_and_of_maps_of_another_shape():
    target = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[1.0, 3.0], [1.0, 1.0]]]])  # (1, 2, 2, 2): argmax [[0, 1], [1, 1]]
    assert abs(mean_iou(logits, target, 2).item() - 7 / 12) < 1e-6  # as test_miou_known_confusion
    with pytest.raises(ValueError, match=r"^Predicted class maps \(1, 2, 3\) and targets \(1, 2, 2\) differ in shape\.$"):
        mean_iou(torch.zeros(1, 2, 3, dtype=torch.long), target, 2)


def test_to_uint8_by_hand():
    from diffusers_innercontrol.metrics import to_uint8

    out = to_uint8(torch.tensor([-0.5, 0.0, 0.5, 0.2, 1.0, 1.5]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 51, 255, 255]  # 127.5 rounds to even 128


def test_control_fidelity_checks_and_keeps_the_confusion_matrices_when_asked():
    with pytest.raises(ValueError, match=r"^Unknown task 'colour': choose one of hed, lineart, depth, segmentation\.$"):
        ControlFidelity("colour")
    with pytest.raises(ValueError, match=r"^The segmentation metric needs num_classes \(150 for ADE20K\)\.$"):
        ControlFidelity("segmentation")
    assert ControlFidelity("segmentation", num_classes=2).confusions is None  # off by default
    assert ControlFidelity("segmentation", num_classes=2).compute()["miou"] is None  # nothing scored yet
    kept = ControlFidelity("segmentation", num_classes=2, keep_confusion=True)
    kept.update(torch.tensor([[[0, 1], [1, 1]]]), control_classes=torch.tensor([[[0, 0], [1, 1]]]))
    assert kept.num_classes == 2 and len(kept.confusions) == 1
    assert kept.confusions[0].tolist() == [[1, 1], [0, 2]]  # rows: target, columns: prediction
    lineart = ControlFidelity("lineart").update(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)).compute()
    assert lineart["ms_ssim"] is None  # 16 px: too small for MS-SSIM, on record as missing


def test_control_fidelity_accumulates_the_confusion_matrix():
    fidelity = ControlFidelity("segmentation", num_classes=2)
    fidelity.update(torch.zeros(1, 2, 2, dtype=torch.long), control_classes=torch.zeros(1, 2, 2, dtype=torch.long))
    fidelity.update(torch.tensor([[[0, 1], [1, 1]]]), control_classes=torch.tensor([[[0, 0], [1, 1]]]))
    # over both: class 0 I = 5, U = 6; class 1 I = 2, U = 3 -> (5/6 + 2/3) / 2 = 3/4 (not the per-image mean)
    out = fidelity.compute()
    assert abs(out["miou"] - 0.75) < 1e-6 and out["num_images"] == 2


def test_control_fidelity_regression_tasks():
    edges = ControlFidelity("hed")
    control = (torch.rand(2, 1, 32, 32) > 0.5).float()
    edges.update(control, control.expand(-1, 3, -1, -1))
    out = edges.compute()
    assert abs(out["ssim"] - 1.0) < 1e-5 and out["ms_ssim"] is None and out["num_images"] == 2
    edges = ControlFidelity("lineart")  # where the SSIM is lost, split in two parts that add up
    line = torch.zeros(2, 1, 32, 32)
    line[..., 4, :] = 1.0
    edges.update(torch.rand(2, 1, 32, 32), line)
    out = edges.compute()
    assert out["ssim_deficit_background"] > 0
    assert abs(out["ssim_deficit_near_edges"] + out["ssim_deficit_background"] - (1 - out["ssim"])) < 1e-5
    depth = ControlFidelity("depth")
    c = torch.tensor([[1.0, 0.5], [0.5, 1.0]]).view(1, 1, 2, 2)
    depth.update(torch.tensor([[[2.0, 2.0], [1.0, 2.0]]]), c)  # 63.5 (see above)
    depth.update(c[:, 0], c)  # 0
    out = depth.compute()
    assert abs(out["rmse"] - 63.5 / 2) < 1e-4 and abs(out["rmse_std"] - 63.5 / 2) < 1e-4
    with pytest.raises(ValueError, match="num_classes"):
        ControlFidelity("segmentation")


# --- FID ------------------------------------------------------------------------------------------
class ChannelMeans(nn.Module):
    """Features = the mean of every channel: FID of shifted copies is known in closed form."""

    num_features = 3

    def forward(self, x):
        return x.float().mean((2, 3))


def test_fid_with_a_replaceable_feature_network_by_hand():
    torch.manual_seed(0)
    real = torch.rand(16, 3, 8, 8) * 0.5
    shift = torch.tensor([0.1, 0.2, 0.0]).view(1, 3, 1, 1)
    fid = build_fid(ChannelMeans())
    fid.update(real, real=True)
    fid.update(real + shift, real=False)
    # same covariance, means differ by the shift: FID = ||shift||^2 = 0.01 + 0.04
    assert abs(fid.compute().item() - 0.05) < 1e-3
    assert fid.normalize  # fed images in [0, 1] (what the InceptionV3 path turns into uint8 for torch-fidelity)


def test_fid_offline_inception_fails_fast_and_bad_weights_are_refused(tmp_path):
    from diffusers_innercontrol.metrics import _inception_cache_path

    if not os.path.isfile(_inception_cache_path()):
        with pytest.raises(OfflineModelError, match=r" with --fid_feature_extractor\.$"):
            build_fid("inception")
    bad = tmp_path / "inception.pth"
    torch.save({"model": ChannelMeans()}, bad)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"^--fid_feature_extractor '.*' is not a plain InceptionV3 state dict .weights_only"):
        build_fid(str(bad))
    with pytest.raises(ValueError, match="neither"):
        build_fid(str(tmp_path / "nothing_here"))


# --- CLIP score -----------------------------------------------------------------------------------
def save_tiny_clip(path: str) -> str:
    """A tiny CLIP (model + processor) saved with save_pretrained, loadable offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from diffusers_innercontrol.toy.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


def test_clip_score_matches_cosine_of_the_embeddings(tiny_clip_path):
    from transformers import CLIPModel, CLIPProcessor

    images = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    captions = ["a red circle", "two blue squares"]
    metric = build_clip_score(tiny_clip_path)
    metric.update(images, captions)
    score = metric.compute().item()

    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPProcessor.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=processor(images=list(images), return_tensors="pt")["pixel_values"])
        tok = processor(text=captions, return_tensors="pt", padding=True)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = img if torch.is_tensor(img) else img.pooler_output
    txt = txt if torch.is_tensor(txt) else txt.pooler_output
    expected = max((100 * torch.nn.functional.cosine_similarity(img, txt)).mean().item(), 0.0)
    assert abs(score - expected) < 1e-3


def test_clip_score_offline_hub_id_fails_fast():
    with pytest.raises(OfflineModelError, match=r" \(--clip_model_name_or_path\) is a Hub id"):
        build_clip_score("openai/clip-vit-base-patch16")


def test_fid_features_from_a_local_model_folder(tiny_clip_path):
    from transformers import CLIPImageProcessor

    from diffusers_innercontrol.metrics import PretrainedImageFeatures

    fid = build_fid(tiny_clip_path)
    assert isinstance(fid.inception, PretrainedImageFeatures) and fid.inception.num_features == 16 and fid.normalize
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_path)  # the folder's own statistics, not ImageNet's
    torch.testing.assert_close(fid.inception.mean.flatten(), torch.tensor(processor.image_mean))
    torch.testing.assert_close(fid.inception.std.flatten(), torch.tensor(processor.image_std))
    images = torch.rand(4, 3, 32, 32)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(fid.compute().item()) < 1e-2  # identical sets


class _PixelsOut(nn.Module):
    """A stand-in vision model: its "embedding" is the pixel values it is given, flattened (one weight, unused),
    returned as `transformers` models do: `image_embeds` (projected), `pooler_output`, only `last_hidden_state`
    (tokens), or a tensor."""

    def __init__(self, kind="pooler_output"):
        super().__init__()
        self.unused = nn.Parameter(torch.ones(1))
        self.kind = kind

    def forward(self, pixel_values):
        from types import SimpleNamespace

        flat = pixel_values.flatten(1)
        if self.kind == "tensor":
            return flat
        if self.kind == "image_embeds":
            return SimpleNamespace(image_embeds=flat, pooler_output=-flat)
        if self.kind == "last_hidden_state":  # two tokens whose mean is the pixels, and no pooled output at all
            return SimpleNamespace(last_hidden_state=torch.stack([flat - 1, flat + 1], 1))
        return SimpleNamespace(pooler_output=flat)


def test_pretrained_image_features_preprocess_by_hand():
    """uint8 images are divided by 255, every image is resized (bilinear, antialiased) to the model's size, then
    normalised per channel: a constant 51 (0.2) gives (0.2 - mean) / std = 0.2, 0, -0.8 for mean 0.1, 0.2, 0.3
    and std 0.5, 0.25, 0.125."""
    from diffusers_innercontrol.metrics import PretrainedImageFeatures

    feats = PretrainedImageFeatures(_PixelsOut(), image_size=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    assert feats.num_features == 3 * 4 * 4 and not any(p.requires_grad for p in feats.parameters())
    assert "mean" not in feats.state_dict() and "std" not in feats.state_dict()  # not saved with a model
    out = feats(torch.full((2, 3, 8, 8), 51, dtype=torch.uint8)).view(2, 3, 16)
    torch.testing.assert_close(out, torch.tensor([0.2, 0.0, -0.8]).view(1, 3, 1).expand(2, 3, 16))
    torch.testing.assert_close(feats(torch.full((1, 3, 8, 8), 0.2)), out[:1].flatten(1))  # floats are taken as [0, 1]
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    expected = (resized - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(feats(x), expected.flatten(1))
    for kind in ("image_embeds", "last_hidden_state", "tensor"):  # the embedding each kind of output holds
        other = PretrainedImageFeatures(_PixelsOut(kind), image_size=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
        torch.testing.assert_close(other(x), expected.flatten(1))


def test_pretrained_image_features_from_a_folder_without_a_processor(tmp_path):
    """A vision model saved without preprocessor_config.json: ImageNet statistics and the config's image size."""
    from transformers import ViTConfig, ViTModel

    from diffusers_innercontrol.metrics import PretrainedImageFeatures

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16)
    ViTModel(config).save_pretrained(tmp_path)
    feats = PretrainedImageFeatures.from_pretrained(str(tmp_path))
    assert feats.image_size == 16 and feats.num_features == 8
    torch.testing.assert_close(feats.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(feats.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert feats(torch.rand(2, 3, 20, 20)).shape == (2, 8)


def _t_cdf(x: float, df: float, steps: int = 20000) -> float:
    """Student's t CDF by Simpson's rule on its density (written out here: independent of scipy)."""
    import math

    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(u):
        return c * (1 + u * u / df) ** (-(df + 1) / 2)

    lo, hi = 0.0, abs(x)
    h = (hi - lo) / steps
    area = pdf(lo) + pdf(hi) + sum((4 if i % 2 else 2) * pdf(lo + i * h) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def test_welch_test_against_hand_values():
    """a = 1, 2, 3 (mean 2, var 1), b = 4, 5, 6, 7 (mean 5.5, var 5/3): se^2 = 1/3 + 5/12 = 3/4, t = -3.5 / sqrt(3/4),
    Welch-Satterthwaite df = (3/4)^2 / ((1/3)^2 / 2 + (5/12)^2 / 3); p and the interval from the t distribution."""
    import math

    from diffusers_innercontrol.metrics import welch_test

    out = welch_test([1, 2, 3], [4, 5, 6, 7])
    se = math.sqrt(0.75)
    df = 0.75 ** 2 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    assert out["diff"] == pytest.approx(-3.5) and out["t"] == pytest.approx(-3.5 / se)
    assert out["df"] == pytest.approx(df) and df == pytest.approx(4.9592, abs=1e-4)
    assert out["p"] == pytest.approx(2 * _t_cdf(-3.5 / se, df), rel=1e-6)
    # the 95 % interval: diff +- t* se, where t* has 2.5 % of the distribution above it
    half = out["ci_high"] - out["diff"]
    assert out["diff"] - out["ci_low"] == pytest.approx(half)
    assert _t_cdf(half / se, df) == pytest.approx(0.975, abs=1e-6)
    assert (out["n"], out["n_baseline"], out["level"]) == (3, 4, 0.95)
    narrow = welch_test([1, 2, 3], [4, 5, 6, 7], level=0.5)  # the interval holds the middle half of t's distribution
    assert narrow["level"] == 0.5 and _t_cdf((narrow["ci_high"] - narrow["diff"]) / se, df) == pytest.approx(0.75, abs=1e-6)
    swapped = welch_test([4, 5, 6, 7], [1, 2, 3])
    assert swapped["diff"] == pytest.approx(3.5) and swapped["p"] == pytest.approx(out["p"])
    with pytest.raises(ValueError, match="at least 2 values"):
        welch_test([1.0], [1.0, 2.0])


def test_steps_to_reach_interpolates_the_first_crossing():
    """Closures 0, 0.2, 0.6, 0.4, 0.9 at steps 0, 100, 200, 300, 400: 0.5 is first crossed between 100 (0.2) and 200
    (0.6), at 100 + (0.5 - 0.2) / 0.4 * 100 = 175 (not in the later crossing 300 -> 400)."""
    from diffusers_innercontrol.metrics import steps_to_reach

    steps, values = [0, 100, 200, 300, 400], [0.0, 0.2, 0.6, 0.4, 0.9]
    assert steps_to_reach(steps, values, 0.5) == pytest.approx(175.0)
    assert steps_to_reach(steps, values, 0.6) == pytest.approx(200.0)  # reached exactly at an evaluation
    assert steps_to_reach(steps, values, 0.8) == pytest.approx(300 + 0.4 / 0.5 * 100)
    assert steps_to_reach(steps, values, 0.0) == 0.0  # the first evaluation already reaches it
    assert steps_to_reach([0, 100, 200], [0.5, 0.4, 0.6], 0.5) == 0.0  # exactly, before a dip (not 150)
    assert steps_to_reach(steps, values, 0.95) is None  # never reached
    with pytest.raises(ValueError, match="one value per step"):
        steps_to_reach([0, 100], [0.1], 0.5)
    with pytest.raises(ValueError, match="increasing steps"):
        steps_to_reach([0, 100, 100], [0.1, 0.2, 0.3], 0.5)


def test_curve_level_is_the_mean_and_the_least_squares_slope_from_the_start_step():
    """Closures 0, 0.2, 0.6, 0.4, 0.9 at steps 0-400, from step 200 on: mean (0.6 + 0.4 + 0.9) / 3 = 0.6333; slope
    over three evenly spaced points = (last - first) / (2 * 100) = 0.3 / 200 = 0.0015 per step (the middle point does
    not count); from step 150 the same three evaluations; from 0 all five: mean 0.42, slope
    (-200 * -0.42 + -100 * -0.22 + 0 + 100 * -0.02 + 200 * 0.48) / 100 000 = 0.002."""
    from diffusers_innercontrol.metrics import curve_level

    steps, values = [0, 100, 200, 300, 400], [0.0, 0.2, 0.6, 0.4, 0.9]
    out = curve_level(steps, values, 200)
    assert out["mean"] == pytest.approx(1.9 / 3, rel=1e-12)  # in float64
    assert out["slope"] == pytest.approx(0.0015)
    assert out["n"] == 3 and out["start"] == 200.0
    assert curve_level(steps, values, 150) == pytest.approx(dict(out, start=150.0))
    full = curve_level(steps, values, 0)
    assert full["mean"] == pytest.approx(0.42) and full["slope"] == pytest.approx(0.002) and full["n"] == 5
    assert curve_level([0, 1, 2], [0.3, 0.3, 0.3], 1)["slope"] == 0.0  # a level curve
    with pytest.raises(ValueError, match="at least 2 evaluated steps from step 400"):
        curve_level(steps, values, 400)
    with pytest.raises(ValueError, match="one value per step"):
        curve_level([0, 100], [0.1], 0)
    with pytest.raises(ValueError, match="at least 2 evaluated steps"):  # two values of one step: no slope
        curve_level([100, 100], [0.1, 0.2], 0)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    """KID on a fixed random feature map: two samples of the same images give about 0, shifted images clearly more."""
    from diffusers_innercontrol.metrics import build_kid

    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    images = torch.rand(64, 3, 8, 8)
    defaults = build_kid(features)
    assert (defaults.subset_size, defaults.subsets, defaults.normalize) == (1000, 100, True)
    kid = build_kid(features, subset_size=16, subsets=20)
    assert (kid.subset_size, kid.subsets) == (16, 20)
    kid.update(images[:32], real=True)
    kid.update(images[32:], real=False)
    same, _ = kid.compute()
    kid.reset()
    kid.update(images[:32], real=True)
    kid.update((images[32:] * 0.5).clamp(0, 1), real=False)
    shifted, spread = kid.compute()
    assert abs(float(same)) < float(shifted) / 5 and float(spread) >= 0
