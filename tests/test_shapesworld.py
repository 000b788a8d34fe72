"""ShapesWorld: determinism, exact controls, captions, data sets, image folder, word tokenizer, toy pretraining."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusers_innercontrol.toy.shapesworld import (
    ALL_COLUMNS,
    COLOURS,
    DEPTH_BACKGROUND,
    DEPTH_FIRST_SHAPE,
    DEPTH_STEP,
    SEGMENTATION_CLASSES,
    VOCABULARY,
    Background,
    Scene,
    Shape,
    ShapesWorld,
    caption_for,
    dilate,
    region_boundaries,
    segmentation_palette,
    shape_area,
    write_word_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_KEYS = ("image", "hed", "lineart", "control_depth", "control_seg")


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(size=64, seed=0)


def _arr(img):
    return np.asarray(img).astype(np.int64)


def _u8(x):
    return int(np.rint(x * 255))


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_and_index_give_identical_bytes():
    a, b = ShapesWorld(seed=3).sample(5), ShapesWorld(seed=3).sample(5)
    for key in IMAGE_KEYS:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert a["text"] == b["text"]
    assert np.array_equal(a["classes"], b["classes"])


def test_other_index_or_seed_gives_another_image():
    w = ShapesWorld(seed=3)
    base = w.sample(5)["image"].tobytes()
    assert w.sample(6)["image"].tobytes() != base
    assert ShapesWorld(seed=4).sample(5)["image"].tobytes() != base


def test_samples_vary(world):
    kinds, counts, styles = set(), set(), set()
    for i in range(40):
        scene = world.make_scene(i)
        kinds.update(s.kind for s in scene.shapes)
        counts.add(len(scene.shapes))
        styles.add(scene.background.style)
    assert kinds == set(SEGMENTATION_CLASSES) - {"background"}
    assert counts == {1, 2, 3}
    assert styles == {"plain", "gradient", "striped", "checkered"}


# ---------------------------------------------------------------------------------------------- geometry
def test_shape_areas_by_hand():
    r = 10.0
    assert shape_area(Shape("circle", "red", "large", 30, 30, r)) == pytest.approx(math.pi * 100)
    # square of circumradius r: side r * sqrt(2), area 2 r^2
    assert shape_area(Shape("square", "red", "large", 30, 30, r)) == pytest.approx(200.0)
    # equilateral triangle of circumradius r: 3 sqrt(3) / 4 r^2
    assert shape_area(Shape("triangle", "red", "large", 30, 30, r)) == pytest.approx(3 * math.sqrt(3) / 4 * 100)
    assert shape_area(Shape("ellipse", "red", "large", 30, 30, r)) == pytest.approx(math.pi * 10 * 5.5)


def test_one_circle_scene_is_exact(world):
    scene = Scene(Background("green"), (Shape("circle", "red", "large", 32.0, 32.0, 12.0),))
    out = world.render(scene)
    area = math.pi * 12.0**2  # 452.4 px
    circle = out["classes"] == SEGMENTATION_CLASSES["circle"]
    assert abs(int(circle.sum()) - area) < 0.02 * area
    assert set(np.unique(out["classes"])) == {SEGMENTATION_CLASSES["background"], SEGMENTATION_CLASSES["circle"]}
    img = _arr(out["image"])
    assert tuple(img[32, 32]) == COLOURS["red"]
    assert tuple(img[2, 2]) == COLOURS["green"]
    # the colour-coded map is the palette of the class map
    seg = _arr(out["control_seg"])
    pal = segmentation_palette().astype(np.int64)
    assert np.array_equal(seg, pal[out["classes"]])
    assert tuple(seg[32, 32]) == tuple(pal[119]) and tuple(seg[0, 0]) == tuple(pal[0])
    # no edge deep inside the circle or far out in the background
    for key in ("hed", "lineart"):
        e = _arr(out[key])
        assert e[32, 32].max() == 0 and e[2, 2].max() == 0 and e[60, 60].max() == 0, key
        # the rim (radius 12 from (32, 32)): pixel (32, 44) straddles it
        assert e[31:34, 43:46].max() >= 128, key
    assert out["text"] == "a large red circle on a green background"


def test_segmentation_control_maps_back_to_the_classes(world):
    import torch

    from diffusers_innercontrol.palette import ade20k_palette, classes_to_control, control_to_classes

    for i in range(4):
        out = world.sample(i)
        control = torch.from_numpy(_arr(out["control_seg"]).astype(np.float32) / 255.0).permute(2, 0, 1)
        assert torch.equal(control_to_classes(control[None])[0], torch.from_numpy(out["classes"]).long())
        assert torch.allclose(classes_to_control(torch.from_numpy(out["classes"]).long()), control, atol=1e-6)
    assert np.array_equal(segmentation_palette(), ade20k_palette())


def test_128px_option_scales():
    w = ShapesWorld(size=128, seed=0)
    out = w.sample(0)
    assert out["image"].size == (128, 128) and out["hed"].size == (128, 128) and out["classes"].shape == (128, 128)
    scene = Scene(Background("blue"), (Shape("square", "yellow", "large", 64.0, 64.0, 20.0),))
    n = int((w.render(scene)["classes"] == SEGMENTATION_CLASSES["square"]).sum())
    # side 20 * sqrt(2) = 28.28 centred at 64: x, y in [49.86, 78.14]; pixels 50..77 are mostly covered
    # (pixels 49 and 78 by 14 %), so the class map holds 28 x 28 of them
    assert n == 28 * 28


# ---------------------------------------------------------------------------------------------- depth
def test_depth_of_the_shape_on_top_is_greater_in_the_overlap(world):
    below = Shape("square", "red", "large", 26.0, 32.0, 10.0)
    above = Shape("square", "blue", "large", 38.0, 32.0, 10.0)
    out = world.render(Scene(Background("white"), (below, above)))
    depth = _arr(out["control_depth"])[..., 0]
    # half side of each square: 10 / sqrt(2) = 7.07 -> below covers x in [18.9, 33.1], above x in [30.9, 45.1]
    assert depth[32, 32] == _u8(DEPTH_FIRST_SHAPE + DEPTH_STEP)  # overlap: the top square
    assert depth[32, 22] == _u8(DEPTH_FIRST_SHAPE)  # the bottom square, where it is visible
    assert depth[32, 32] > depth[32, 22]
    assert tuple(_arr(out["image"])[32, 32]) == COLOURS["blue"]
    # the background ramp: far (dark) at the top, nearer at the bottom, below every shape
    col = depth[:, 2]
    assert np.all(np.diff(col) >= 0) and col[-1] > col[0]
    assert abs(col[0] - 255 * DEPTH_BACKGROUND[0]) <= 2 and abs(col[-1] - 255 * DEPTH_BACKGROUND[1]) <= 2
    assert col.max() < depth[32, 22]
    assert "behind" in out["text"] and out["text"].startswith("a large red square behind a large blue square")


# ---------------------------------------------------------------------------------------------- edges
def test_edges_are_nonzero_exactly_near_boundaries(world):
    for i in range(12):
        out = world.sample(i)
        boundary = region_boundaries(out["instances"])  # low-res visible-region boundaries
        assert boundary.any()
        hed = _arr(out["hed"])[..., 0]
        lineart = _arr(out["lineart"])[..., 0]
        # zero away from every boundary (HED: 2 px band + blur of radius 2; LineArt: 1 px)
        assert hed[~dilate(boundary, 5)].max() == 0, i
        assert lineart[~dilate(boundary, 3)].max() == 0, i
        # and lit next to every boundary pixel
        ys, xs = np.nonzero(boundary)
        for y, x in zip(ys, xs):
            assert hed[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() >= 128, (i, y, x)
            assert lineart[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() >= 128, (i, y, x)
        # thin lines are thinner than soft edges, white on black with a full-white peak
        assert (lineart > 0).sum() < (hed > 0).sum()
        assert hed.max() == 255 and lineart.max() == 255
        # edges are the same in all three channels
        assert np.array_equal(_arr(out["hed"])[..., 0], _arr(out["hed"])[..., 2])


def test_background_texture_is_not_an_edge(world):
    scene = Scene(Background("purple", "checkered", period=8.0), (Shape("circle", "white", "small", 32.0, 32.0, 6.0),))
    out = world.render(scene)
    img = _arr(out["image"])
    assert img[2:10, 2:20].std() > 10  # the checkerboard is there ...
    assert _arr(out["hed"])[:12, :].max() == 0  # ... and not in the edge map


# ---------------------------------------------------------------------------------------------- captions
def test_caption_by_hand():
    top = Shape("circle", "red", "small", 32.0, 12.0, 6.0)
    bottom = Shape("square", "blue", "small", 32.0, 50.0, 6.0)
    right = Shape("star", "yellow", "large", 56.0, 14.0, 6.0)
    assert caption_for(Scene(Background("green", "gradient"), (top, bottom))) == (
        "a small red circle above a small blue square on a green gradient background"
    )
    assert caption_for(Scene(Background("black", "striped"), (bottom, top, right))) == (
        "a small blue square below a small red circle left of a large yellow star on a black striped background"
    )


def test_captions_mention_every_shape(world):
    for i in range(30):
        out = world.sample(i, with_controls=False)
        text, scene = out["text"], out["scene"]
        for s in scene.shapes:
            assert f"{s.size} {s.colour} {s.kind}" in text
        assert text.endswith("background") and f"on a {scene.background.colour}" in text
        assert text.count(" a ") + text.startswith("a ") == len(scene.shapes) + 1
        assert set(text.split()) <= set(VOCABULARY)
        assert caption_for(scene) == text  # the geometric overlap test agrees with the rendered masks


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapesWorld(size=50)
    with pytest.raises(ValueError, match="hexagon"):
        Shape("hexagon", "red", "small", 10, 10, 3)
    with pytest.raises(ValueError, match="Unknown ShapesWorld column"):
        ShapesWorld().as_dataset(2, columns=["image", "canny"])


# ---------------------------------------------------------------------------------------------- data sets
def test_as_dataset_columns(world):
    ds = world.as_dataset(3, start=2)
    assert ds.column_names == list(ALL_COLUMNS)
    for name in ("image", "text", "hed", "lineart", "control_depth", "control_seg", "prompt"):
        assert name in ds.column_names
    row = ds[1]
    ref = world.sample(3)
    assert row["text"] == row["prompt"] == ref["text"]
    assert np.array_equal(_arr(row["image"]), _arr(ref["image"]))
    assert np.array_equal(_arr(row["control_depth"]), _arr(ref["control_depth"]))
    assert np.array_equal(np.asarray(row["classes"]), ref["classes"])
    small = world.as_dataset(2, columns=["image", "text", "control_seg"])
    assert small.column_names == ["image", "text", "control_seg"]
    streamed = next(iter(world.as_dataset(2, start=3, streaming=True)))
    assert streamed["text"] == ref["text"]


def test_imagefolder_loads(world, tmp_path):
    import datasets

    folder = str(tmp_path / "sw")
    world.save_imagefolder(folder, 3)
    ds = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    for c in ("image", "text", "prompt", "hed", "lineart", "control_depth", "control_seg"):
        assert c in ds.column_names
    for i in range(3):
        row, ref = ds[i], world.sample(i)
        assert row["text"] == ref["text"]
        assert np.array_equal(_arr(row["image"].convert("RGB")), _arr(ref["image"]))
        for c in ("hed", "lineart", "control_depth", "control_seg"):  # `<c>_file_name` -> an image column `c`
            assert np.array_equal(_arr(row[c].convert("RGB")), _arr(ref[c])), c
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        meta = [json.loads(line) for line in f]
    assert meta[0]["file_name"] == "images/000000.png" and meta[0]["hed_file_name"] == "hed/000000.png"


# ---------------------------------------------------------------------------------------------- tokenizer
def test_word_tokenizer_gives_one_id_per_word(world, tmp_path):
    from transformers import CLIPTokenizer

    path = write_word_tokenizer(str(tmp_path / "tok"))
    with open(os.path.join(path, "merges.txt")) as f:
        assert f.readline().startswith("#version: 0.2")
    tok = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    vocab = tok.get_vocab()
    for w in VOCABULARY:
        assert f"{w}</w>" in vocab, w
    for i in range(30):
        text = world.sample(i, with_controls=False)["text"]
        ids = tok(text).input_ids
        words = text.split()
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(words) + 2
        assert tok.convert_ids_to_tokens(ids[1:-1]) == [f"{w}</w>" for w in words]
    assert tok.get_vocab()["<|startoftext|>"] == 0 and tok.get_vocab()["<|endoftext|>"] == 1
    # the same file twice: the vocabulary is deterministic
    path2 = write_word_tokenizer(str(tmp_path / "tok2"))
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(path, name)) as a, open(os.path.join(path2, name)) as b:
            assert a.read() == b.read()


def test_learned_merges_by_hand():
    from diffusers_innercontrol.toy.shapesworld import _learn_merges

    # "ab" -> a, b</w>; "abc" -> a, b, c</w>: three pairs seen once each; ties go to the alphabetically first
    # pair: (a, b) < (a, b</w>) < (b, c</w>); after merging (a, b): (a, b</w>) then (ab, c</w>)
    assert _learn_merges(["abc", "ab"]) == [("a", "b"), ("a", "b</w>"), ("ab", "c</w>")]
    # the most frequent pair first: (o, n</w>) is in two words
    assert _learn_merges(["on", "son", "of"])[0] == ("o", "n</w>")


# ---------------------------------------------------------------------------------------------- pretraining
@pytest.mark.e2e
def test_pretrain_toy_sd_smoke(tmp_path):
    script = os.path.join(REPO, "examples", "innercontrol", "shapesworld", "pretrain_toy_sd.py")
    out = str(tmp_path / "toy_sd")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", script,
        "--output_dir", out, "--resolution", "32", "--train_batch_size", "2",
        "--vae_steps", "2", "--unet_steps", "3", "--vae_channels", "8,16", "--unet_channels", "16,32",
        "--text_hidden_size", "16", "--text_layers", "1", "--norm_num_groups", "4",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "total size" in proc.stdout + proc.stderr
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the data, not SD1.5's constant
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "README.md")) and os.path.isfile(os.path.join(out, "samples.png"))
    card = open(os.path.join(out, "README.md")).read()
    assert f"measured on the data ({pipe.vae.config.scaling_factor:.3f})" in card
    assert "Training time: " in card and "{'" not in card  # minutes and seconds, not a Python dict
    ids = pipe.tokenizer("a red circle on a green background").input_ids
    assert len(ids) == 7 + 2
    img = pipe("a red circle on a green background", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()

    # the decoder alone on the UNet's denoised latents: only the decoder's weights change
    tuned = str(tmp_path / "toy_sd_decoder")
    cmd_dec = cmd[:cmd.index("--output_dir")] + [
        "--output_dir", tuned, "--init_from", out, "--resolution", "32", "--train_batch_size", "2", "--vae_steps", "2",
        "--unet_steps", "0", "--vae_train", "decoder", "--decoder_latents", "denoised", "--decoder_max_timestep", "100",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "1", "--logging_steps", "1",
    ]
    proc = subprocess.run(cmd_dec, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the decoder got the UNet's latents, not the encoder's posterior (which would give a KL term)
    logged = [line for line in (proc.stdout + proc.stderr).splitlines() if "vae step " in line]
    assert len(logged) == 2 and all(line.endswith("kl/elem 0.000") for line in logged), logged
    import torch

    after = StableDiffusionPipeline.from_pretrained(tuned, safety_checker=None)
    for name in ("unet", "text_encoder"):
        for (k, v), w in zip(getattr(pipe, name).state_dict().items(), getattr(after, name).state_dict().values()):
            assert torch.equal(v, w), f"{name}.{k} changed"
    enc_before, enc_after = pipe.vae.encoder.state_dict(), after.vae.encoder.state_dict()
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)
    assert any(not torch.equal(v, after.vae.decoder.state_dict()[k]) for k, v in pipe.vae.decoder.state_dict().items())
    assert after.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert "one-step x0 from encoder latents noised to t < 100" in open(os.path.join(tuned, "README.md")).read()


def _pretrain_module():
    import importlib.util

    script = os.path.join(REPO, "examples", "innercontrol", "shapesworld", "pretrain_toy_sd.py")
    spec = importlib.util.spec_from_file_location("_pretrain_toy_sd", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_describe_timings_by_hand():
    module = _pretrain_module()
    # 74.2 + 4894.9 s = 4969.1 s = 82.8 minutes, printed to the minute; each part to the second
    assert module.describe_timings({"render_s": 74.2, "unet_s": 4894.9}) == "83 minutes (rendering 74 s, UNet 4895 s)"
    assert module.describe_timings({"render_s": 60.0, "vae_s": 120.0}) == "3 minutes (rendering 60 s, VAE 120 s)"
    assert module.describe_timings({}) == "-"


def test_standardize_latent_channels_is_an_exact_reparameterisation(tiny_components):
    """Folding the per-channel standardisation into the 1x1 quant convolutions: the latents of the data get mean 0
    and std 1 per channel, and decoding the standardised latents gives the same images as before."""
    import copy

    import torch

    module = _pretrain_module()

    vae = copy.deepcopy(tiny_components["vae"]).eval()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        before = vae.decode(posterior.mean).sample
        latents = posterior.mean
        m, s = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
        module.standardize_latent_channels(vae, latents)
        after_posterior = vae.encode(images).latent_dist
        z = after_posterior.mean
        torch.testing.assert_close(z, (latents - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(z.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(z.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(after_posterior.std, posterior.std / s.view(1, -1, 1, 1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vae.decode(z).sample, before, rtol=1e-4, atol=1e-5)
    assert vae.config.scaling_factor == 1.0


@pytest.mark.parametrize("latent_channels", [4, 8])
def test_warm_start_unet_keeps_every_weight_but_the_latent_convolutions(tiny_components, tmp_path, latent_channels):
    """--unet_init_from: a trained UNet moved to a VAE with other latent channels keeps all its weights except
    conv_in (default init) and conv_out (zeros, so it predicts no noise yet); with the same channels it is unchanged."""
    import torch

    module = _pretrain_module()
    src = tiny_components["unet"]
    assert src.config.in_channels == 4
    src.save_pretrained(str(tmp_path / "unet"))
    tiny_components["text_encoder"].save_pretrained(str(tmp_path / "text_encoder"))
    tiny_components["tokenizer"].save_pretrained(str(tmp_path / "tokenizer"))
    unet, text_encoder, tokenizer = module.warm_start_unet(str(tmp_path), latent_channels)
    assert unet.config.in_channels == unet.config.out_channels == latent_channels
    assert type(text_encoder) is type(tiny_components["text_encoder"]) and tokenizer.model_max_length == 77
    before = src.state_dict()
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k]) if v.shape == before[k].shape}
    changed |= {k for k, v in unet.state_dict().items() if v.shape != before[k].shape}
    x = torch.randn(2, latent_channels, 8, 8)
    out = unet(x, torch.tensor([3, 700]), torch.randn(2, 77, tiny_components["text_encoder"].config.hidden_size)).sample
    if latent_channels == 4:
        assert changed == set()
        return
    assert changed == {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"}
    assert torch.count_nonzero(unet.conv_out.weight) == 0 and torch.count_nonzero(unet.conv_out.bias) == 0
    w = unet.conv_in.weight
    bound = 1 / math.sqrt(w[0].numel())  # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +)
    assert torch.isfinite(w).all() and 0.3 * bound < w.abs().max() <= bound
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_unet_init_from_needs_init_from(tmp_path):
    module = _pretrain_module()
    with pytest.raises(ValueError, match="pass --init_from too"):
        module.validate_args(module.parse_args(["--unet_init_from", str(tmp_path)]))


def test_denoised_latents_by_hand():
    """--decoder_latents denoised: the decoder's input is Eq. 5's one-step x0 from the encoder latent noised to
    t < max_timestep, unscaled. A UNet that predicts the true noise gives back the encoder latent exactly; one that
    predicts zeros gives x_t / sqrt(abar_t); the caption's ids reach the text encoder, whose states reach the UNet."""
    from types import SimpleNamespace

    import torch
    from diffusers import DDPMScheduler

    from diffusers_innercontrol.toy.tiny import SD15_SCHEDULER_CONFIG

    module = _pretrain_module()
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    abar = scheduler.alphas_cumprod
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))  # the encoder's (unscaled) latent
    scale = 0.5
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=scale),
                          encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: z)))
    ids = torch.tensor([[5, 6], [7, 8], [9, 10]])
    hidden = torch.randn(3, 2, 8)
    seen = {}

    def text_encoder(input_ids, return_dict=False):
        seen["ids"] = input_ids
        return (hidden,)

    def unet_with(kind):
        def unet(noisy, t, states, return_dict=False):
            seen.update(noisy=noisy, t=t, states=states)
            a = abar[t].view(-1, 1, 1, 1)
            eps = (noisy - a.sqrt() * z * scale) / (1 - a).sqrt()
            return (eps if kind == "oracle" else torch.zeros_like(noisy),)
        return unet

    torch.manual_seed(1)
    out = module.denoised_latents(vae, unet_with("oracle"), text_encoder, scheduler, torch.zeros(3, 3, 8, 8), ids, 300)
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-4)
    assert torch.equal(seen["ids"], ids) and seen["states"] is hidden
    assert ((seen["t"] >= 0) & (seen["t"] < 300)).all()
    drawn = set()
    for _ in range(20):
        module.denoised_latents(vae, unet_with("zeros"), text_encoder, scheduler, torch.zeros(3, 3, 8, 8), ids, 4)
        drawn |= set(seen["t"].tolist())
    assert drawn == {0, 1, 2, 3}  # uniform on [0, max_timestep)
    out = module.denoised_latents(vae, unet_with("zeros"), text_encoder, scheduler, torch.zeros(3, 3, 8, 8), ids, 300)
    a = abar[seen["t"]].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, seen["noisy"] / a.sqrt() / scale)
    assert not torch.allclose(out, z, atol=1e-2)


def test_decoder_latents_denoised_is_checked_before_training(tmp_path):
    module = _pretrain_module()
    with pytest.raises(ValueError, match="pass --vae_train decoder"):
        module.validate_args(module.parse_args(["--decoder_latents", "denoised"]))
    pipe = tmp_path / "toy"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    args = ["--init_from", str(pipe), "--vae_train", "decoder", "--decoder_latents", "denoised", "--unet_steps", "0"]
    for extra in (["--unet_steps", "5"], ["--vae_steps", "0"], ["--unet_init_from", str(pipe)]):
        with pytest.raises(ValueError, match="--vae_steps > 0 and --unet_steps 0, without --unet_init_from"):
            module.validate_args(module.parse_args(args + ["--beta_schedule", "scaled_linear"] + extra))
    with pytest.raises(ValueError, match="pass --beta_schedule scaled_linear"):
        module.validate_args(module.parse_args(args))
    module.validate_args(module.parse_args(args + ["--beta_schedule", "scaled_linear"]))
    (pipe / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match="has no scheduler/scheduler_config.json"):
        module.validate_args(module.parse_args(args + ["--beta_schedule", "scaled_linear"]))
    with pytest.raises(ValueError, match="--decoder_max_timestep must be in"):
        module.validate_args(module.parse_args(args + ["--beta_schedule", "scaled_linear", "--decoder_max_timestep", "0"]))


def test_describe_training_by_hand(tmp_path):
    module = _pretrain_module()
    pipe = tmp_path / "toy"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    args = module.parse_args(["--init_from", str(pipe), "--vae_train", "decoder", "--decoder_latents", "denoised",
                              "--decoder_max_timestep", "500", "--vae_steps", "2000", "--unet_steps", "0",
                              "--vae_lr_scheduler", "cosine", "--beta_schedule", "scaled_linear", "--seed", "4",
                              "--train_batch_size", "16"])
    assert module.describe_training(args) == (
        "the VAE's decoder alone 2000 steps on the UNet's one-step x0 from encoder latents noised to t < 500 (lr "
        "0.001, cosine; the encoder kept), then the UNet and text encoder kept; batch 16, seed 4.")
    args = module.parse_args(["--init_from", str(pipe), "--vae_steps", "0", "--unet_steps", "6000", "--learning_rate", "2.5e-4", "--seed", "3",
                              "--use_ema", "--snr_gamma", "0", "--offset_noise", "0.15", "--train_batch_size", "16"])
    assert module.describe_training(args) == (
        "VAE kept, then UNet + text encoder 6000 steps, batch 16,\n  lr 0.00025 (cosine), caption dropout 0.1, EMA "
        "True, seed 3;\n  linear beta schedule, min-SNR gamma 0.0, offset noise 0.15.")
    args = module.parse_args(["--vae_steps", "1500", "--unet_steps", "0"])
    assert module.describe_training(args).startswith("VAE 1500 steps (lr 0.001, constant), then the UNet and text encoder kept")
