#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Pretrain a toy Stable Diffusion from scratch on ShapesWorld, with SD1.5's classes scaled down.

    accelerate launch examples/innercontrol/shapesworld/pretrain_toy_sd.py --output_dir toy-sd-shapesworld

Stage 1 trains the `AutoencoderKL` (reconstruction + a small KL term, as SD's autoencoder without the
perceptual and adversarial terms) and measures its latent scaling factor; stage 2 freezes it and trains
the `UNet2DConditionModel` and the `CLIPTextModel` (word-level tokenizer, `write_word_tokenizer`) jointly
with the diffusion loss (epsilon target, `DDPMScheduler`; by default DDPM's linear beta schedule, see
`--beta_schedule`). The result is a
`StableDiffusionPipeline` folder (save_pretrained, safetensors) that every script of the project takes
as `--pretrained_model_name_or_path`, plus `samples.png` (held-out captions: data above, samples below)
and a model card. The weights must stay within `--max_size_mb` (20 MB): the size is checked from the
parameter count before training and printed after saving. See README.md for the full recipe.
"""

import argparse
import json
import logging
import os
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("pretrain_toy_sd")

PIPELINE_SCHEDULERS = ("pndm", "ddim", "dpmsolver", "unipc")


class ConfigError(ValueError):
    """Bad arguments, found before any training: reported in one line."""


# --------------------------------------------------------------------------------------------- arguments
def _channels(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as '32,64,64', got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"channel widths must be positive integers, got {text!r}")
    return values


def standardize_latent_channels(vae, latents: torch.Tensor) -> None:
    """
    Give every latent channel mean 0 and standard deviation 1 on `latents` (unscaled latents of the data, `(B, C,
    h, w)`), folded into the VAE's 1x1 `quant_conv` (encoder side) and `post_quant_conv` (decoder side): an exact
    reparameterisation `z' = (z - m) / s`, after which the scaling factor is 1. Pipelines that only know SD1.5's one
    global scaling factor then see standardised channels. diffusers' `AutoencoderKL` has `latents_mean` /
    `latents_std` config fields for this, but SD1.5's pipelines ignore them; folding needs no pipeline support.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("Standardising the latent channels needs a VAE with quant_conv and post_quant_conv (use_quant_conv=True).")
    c = latents.shape[1]
    mean = latents.float().mean((0, 2, 3))
    std = latents.float().std((0, 2, 3)).clamp_min(1e-6)
    with torch.no_grad():
        q = vae.quant_conv  # 2C -> 2C: the posterior's mean (first C) and log-variance (last C)
        q.weight[:c] /= std.view(-1, 1, 1, 1)
        q.bias[:c] = (q.bias[:c] - mean) / std
        q.bias[c:] -= 2.0 * torch.log(std)
        p = vae.post_quant_conv  # C -> C, fed z = s z' + m
        p.bias += p.weight[:, :, 0, 0] @ mean
        p.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a toy Stable Diffusion (VAE, UNet, CLIP text encoder) on ShapesWorld.")
    p.add_argument("--output_dir", type=str, default="toy-sd-shapesworld", help="Where the pipeline folder is written.")
    p.add_argument("--init_from", type=str, default=None,
                   help="A toy pipeline folder saved by this script to continue from (its VAE, UNet, text encoder, "
                        "tokenizer); with --vae_steps 0 the VAE and its scaling factor are kept as they are.")
    p.add_argument("--unet_init_from", type=str, default=None,
                   help="A toy pipeline folder whose UNet, text encoder and tokenizer replace --init_from's: warm-starts "
                        "a UNet for a new VAE. Where the latent channel counts differ, the UNet's conv_in and conv_out "
                        "are re-initialised and every other weight is kept.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation and the noise.")
    g = p.add_argument_group("data")
    g.add_argument("--resolution", type=int, default=64, help="ShapesWorld image size (64 or 128).")
    g.add_argument("--world_seed", type=int, default=0, help="ShapesWorld seed of the training data.")
    g.add_argument("--validation_world_seed", type=int, default=1_000_003, help="ShapesWorld seed of the held-out captions.")
    g.add_argument("--caption_dropout", type=float, default=0.1, help="Share of empty captions (classifier-free guidance).")
    g.add_argument("--num_train_samples", type=int, default=0,
                   help="0 (default): draw a fresh ShapesWorld sample for every example (CPU). N > 0: render N samples "
                        "once, in memory, with --render_workers processes, and draw shuffled epochs of them (GPU: the "
                        "numpy renderer cannot keep up with a GPU's steps).")
    g.add_argument("--render_workers", type=int, default=None, help="Processes rendering --num_train_samples (default: all CPUs).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g = p.add_argument_group("models")
    g.add_argument("--vae_channels", type=_channels, default=(32, 64, 64),
                   help="VAE block widths; len - 1 downsamplings (3 blocks: scale factor 4, 64 px -> 16 px latents).")
    g.add_argument("--vae_layers_per_block", type=int, default=1)
    g.add_argument("--latent_channels", type=int, default=4,
                   help="Latent channels of the VAE and so the UNet's input/output (SD1.5: 4; SD3 and FLUX: 16, which "
                        "keeps small shapes through the autoencoder at the same latent size).")
    g.add_argument("--unet_channels", type=_channels, default=(32, 64, 96),
                   help="UNet block widths; every block but the last has cross-attention (SD1.5's layout).")
    g.add_argument("--layers_per_block", type=int, default=2, help="UNet layers per block (SD1.5: 2).")
    g.add_argument("--attention_heads", type=int, default=4, help="UNet attention heads (`attention_head_dim`, as SD1.5's 8).")
    g.add_argument("--norm_num_groups", type=int, default=16, help="GroupNorm groups of the VAE and the UNet.")
    g.add_argument("--text_hidden_size", type=int, default=64, help="CLIP text encoder width = the UNet's cross-attention dim.")
    g.add_argument("--text_layers", type=int, default=4)
    g.add_argument("--text_heads", type=int, default=4)
    g.add_argument("--max_size_mb", type=float, default=20.0, help="Refuse models whose saved weights would exceed this.")
    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=32)
    g.add_argument("--vae_steps", type=int, default=3000)
    g.add_argument("--vae_learning_rate", type=float, default=1e-3)
    g.add_argument("--vae_train", type=str, default="all", choices=("all", "decoder"),
                   help="'all': encoder and decoder; 'decoder': the decoder alone, the encoder frozen (with --init_from: the "
                        "latent space, its scaling factor and so the UNet stay valid, as SD's fine-tuned ft-MSE VAE decoder).")
    g.add_argument("--decoder_latents", type=str, default="encoder", choices=("encoder", "denoised"),
                   help="With --vae_train decoder, what the decoder learns to decode. 'encoder': the encoder's latents. "
                        "'denoised': the UNet's one-step estimate of the clean latent from the encoder's latent noised to "
                        "a random timestep below --decoder_max_timestep, i.e. latents like those the UNet hands the "
                        "decoder when it samples (a decoder fine-tuned on encoder latents alone draws them as speckle).")
    g.add_argument("--decoder_max_timestep", type=int, default=500,
                   help="With --decoder_latents denoised: timesteps are drawn uniformly from [0, this) (the shipped toy SD: "
                        "500; 250 did about as well).")
    g.add_argument("--vae_lr_scheduler", type=str, default="constant",
                   help="diffusers.optimization scheduler of the VAE stage (no warmup), e.g. 'cosine'.")
    g.add_argument("--standardize_latents", action="store_true",
                   help="Give every latent channel mean 0 and std 1 on 256 training images, folded into the VAE's 1x1 "
                        "quant convolutions (scaling factor 1): with 16 channels the raw channels' spreads differ 10x.")
    g.add_argument("--kl_weight", type=float, default=1e-6,
                   help="KL weight against the per-image summed reconstruction loss (SD's autoencoder convention).")
    g.add_argument("--unet_steps", type=int, default=20000)
    g.add_argument("--beta_schedule", type=str, default="linear", choices=("linear", "scaled_linear"),
                   help="Noise schedule saved with the pipeline. 'linear' is DDPM's (1e-4 to 0.02): at 16x16 latents "
                        "SD1.5's 'scaled_linear' leaves the image mean readable at t=999 (alpha_bar_T = 0.0047), so a "
                        "model trained with it copies the background colour from the noise instead of the caption.")
    g.add_argument("--offset_noise", type=float, default=0.0,
                   help="Add this times a per-sample, per-channel constant to the training noise (offset noise). The "
                        "noise's own mean then no longer tells the background colour, so the model takes it from the caption.")
    g.add_argument("--snr_gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting (Hang et al. 2023; diffusers.training_utils.compute_snr); 0 turns it off.")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="UNet and text encoder learning rate.")
    g.add_argument("--lr_scheduler", type=str, default="cosine", help="diffusers.optimization scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=200)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet and text encoder; the EMA weights are saved.")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--logging_steps", type=int, default=50)
    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=2000, help="Sample grid every N UNet steps (and at the end).")
    g.add_argument("--num_validation_images", type=int, default=8)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--guidance_scale", type=float, default=4.0)
    g.add_argument("--pipeline_scheduler", type=str, default="pndm", choices=PIPELINE_SCHEDULERS,
                   help="Sampling scheduler saved with the pipeline (SD1.5 ships PNDM); training always uses DDPM.")
    args = p.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args):
    """Checks that need no model; raises ValueError naming the option and the fix."""
    vae_factor = 2 ** (len(args.vae_channels) - 1)
    unet_factor = 2 ** (len(args.unet_channels) - 1)
    if args.resolution % 8 or args.resolution < 32:
        raise ConfigError(f"--resolution must be a multiple of 8 and >= 32 (64 or 128), got {args.resolution}.")
    if (args.resolution // vae_factor) % unet_factor:
        raise ConfigError(
            f"The latents ({args.resolution // vae_factor} px with --vae_channels {args.vae_channels}) must be divisible by "
            f"the UNet's downsampling {unet_factor} (--unet_channels {args.unet_channels}): use fewer UNet blocks or a larger resolution."
        )
    for name in ("vae_channels", "unet_channels"):
        bad = [c for c in getattr(args, name) if c % args.norm_num_groups]
        if bad:
            raise ConfigError(f"--{name} {getattr(args, name)}: widths {bad} are not divisible by --norm_num_groups {args.norm_num_groups}.")
    if args.text_hidden_size % args.text_heads:
        raise ConfigError(f"--text_hidden_size {args.text_hidden_size} must be divisible by --text_heads {args.text_heads}.")
    if len(args.unet_channels) < 2:
        raise ConfigError("--unet_channels needs at least two blocks (one with cross-attention, one without).")
    if args.vae_steps < 0 or args.unet_steps < 0:
        raise ConfigError("--vae_steps and --unet_steps must be >= 0.")
    if args.vae_train == "decoder" and not args.init_from:
        raise ConfigError("--vae_train decoder fine-tunes a trained VAE's decoder: pass --init_from a toy pipeline folder.")
    if args.decoder_latents == "denoised" and args.vae_train != "decoder":
        raise ConfigError("--decoder_latents denoised trains the decoder on the UNet's latents: pass --vae_train decoder.")
    if not 0 < args.decoder_max_timestep <= 1000:
        raise ConfigError(f"--decoder_max_timestep must be in (0, 1000], got {args.decoder_max_timestep}.")
    if args.vae_steps == 0 and not args.init_from:
        raise ConfigError("--vae_steps 0 needs a trained VAE: pass --init_from a toy pipeline folder.")
    if args.latent_channels < 1:
        raise ConfigError(f"--latent_channels must be >= 1, got {args.latent_channels}.")
    if args.num_train_samples < 0:
        raise ConfigError(f"--num_train_samples must be >= 0, got {args.num_train_samples}.")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ConfigError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}.")
    if args.init_from and not os.path.isfile(os.path.join(args.init_from, "model_index.json")):
        raise ConfigError(f"--init_from {args.init_from!r} is not a pipeline folder (no model_index.json).")
    if args.decoder_latents == "denoised":  # the UNet is used as trained: noise it the way it was trained
        if args.unet_init_from or args.unet_steps > 0 or args.vae_steps == 0:
            raise ConfigError("--decoder_latents denoised tunes the decoder to --init_from's trained UNet as it is: pass "
                              "--vae_steps > 0 and --unet_steps 0, without --unet_init_from.")
        scheduler_config = os.path.join(args.init_from, "scheduler", "scheduler_config.json")
        if not os.path.isfile(scheduler_config):
            raise ConfigError(f"--init_from {args.init_from!r} has no scheduler/scheduler_config.json: --decoder_latents "
                              "denoised needs the pipeline's noise schedule.")
        with open(scheduler_config) as f:
            trained_schedule = json.load(f).get("beta_schedule")
        if trained_schedule != args.beta_schedule:
            raise ConfigError(f"--init_from's UNet was trained with beta schedule {trained_schedule!r}: pass "
                              f"--beta_schedule {trained_schedule} (got {args.beta_schedule!r}).")
    if args.unet_init_from and not args.init_from:
        raise ConfigError("--unet_init_from replaces the UNet of --init_from's pipeline: pass --init_from too (the VAE).")
    if args.unet_init_from and not os.path.isfile(os.path.join(args.unet_init_from, "model_index.json")):
        raise ConfigError(f"--unet_init_from {args.unet_init_from!r} is not a pipeline folder (no model_index.json).")
    return args


# --------------------------------------------------------------------------------------------- models
def build_models(args, tokenizer):
    """VAE, UNet and text encoder of the toy SD, from configs (SD1.5's classes and layout, scaled down)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n_vae, n_unet = len(args.vae_channels), len(args.unet_channels)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=args.vae_channels, layers_per_block=args.vae_layers_per_block,
        norm_num_groups=args.norm_num_groups, sample_size=args.resolution,
    )
    latent_size = args.resolution // 2 ** (n_vae - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=args.latent_channels, out_channels=args.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        block_out_channels=args.unet_channels, layers_per_block=args.layers_per_block,
        cross_attention_dim=args.text_hidden_size, attention_head_dim=args.attention_heads,
        norm_num_groups=args.norm_num_groups,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=args.text_hidden_size, intermediate_size=4 * args.text_hidden_size,
            num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    return vae, unet, text_encoder


def warm_start_unet(folder: str, latent_channels: int):
    """The UNet, text encoder and tokenizer of the toy pipeline `folder`, the UNet adapted to `latent_channels`.

    diffusers' `ignore_mismatched_sizes` keeps every weight whose shape stays, so the caption-to-layout knowledge of a
    trained UNet carries over to a new VAE's latents; the weights whose shapes change (conv_in, conv_out) it leaves
    uninitialised (whatever was in memory), so they are initialised here: conv_in with PyTorch's default, conv_out
    with zeros (the UNet starts by predicting no noise, as DiT's final layer does).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", in_channels=latent_channels, out_channels=latent_channels,
        ignore_mismatched_sizes=True, low_cpu_mem_usage=False,
    )
    source_channels = UNet2DConditionModel.load_config(folder, subfolder="unet")["in_channels"]
    if source_channels != latent_channels:
        unet.conv_in.reset_parameters()
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77)
    return unet, text_encoder, tokenizer


def weights_megabytes(*models) -> float:
    """Size of the models' float32 safetensors files in MB (10^6 bytes), headers excluded."""
    return sum(p.numel() * 4 for m in models for p in m.parameters()) / 1e6


def folder_megabytes(path: str, suffix: str = ".safetensors") -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(suffix))
    return total / 1e6


def make_pipeline_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

    cls = dict(pndm=PNDMScheduler, ddim=DDIMScheduler, dpmsolver=DPMSolverMultistepScheduler, unipc=UniPCMultistepScheduler)[name]
    extra = dict(skip_prk_steps=True, set_alpha_to_one=False) if name == "pndm" else {}
    return cls.from_config(config, **extra)


# --------------------------------------------------------------------------------------------- data
def _render_chunk(job):
    size, seed, indices = job
    from diffusers_innercontrol.toy.shapesworld import ShapesWorld

    world = ShapesWorld(size=size, seed=seed)
    out = [world.sample(int(i), with_controls=False) for i in indices]
    return np.stack([np.asarray(o["image"]) for o in out]), [o["text"] for o in out]


def render_samples(world, n: int, offset: int = 0, workers: Optional[int] = None):
    """Render ShapesWorld samples `offset .. offset + n - 1`: (n, H, W, 3) uint8 images and n captions."""
    workers = workers or os.cpu_count() or 1
    chunks = np.array_split(np.arange(offset, offset + n), max(1, min(workers * 4, n)))
    jobs = [(world.size, world.seed, c) for c in chunks if len(c)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]


class ShapesWorldTrainData(torch.utils.data.Dataset):
    """
    Training examples (images in [-1, 1], token ids), `length` of them.

    Without `images`, item i is ShapesWorld sample `offset + i`, drawn on the fly (never repeated). With
    `images` (N, H, W, 3) uint8 and their `captions`, item i is image `perm_e[i % N]` where `perm_e` is a
    permutation seeded by `(seed, e = i // N)`: shuffled epochs of a fixed set, reproducible.
    """

    def __init__(self, world, tokenizer, length: int, offset: int = 0, images=None, captions=None, seed: int = 0):
        self.world, self.tokenizer, self.length, self.offset = world, tokenizer, length, offset
        self.images, self.captions, self.seed = images, captions, seed
        self._perms = {}

    def __len__(self):
        return self.length

    def _fixed(self, i):
        n = len(self.images)
        epoch, j = divmod(i, n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))}
        k = int(self._perms[epoch][j])
        return self.images[k], self.captions[k]

    def __getitem__(self, i):
        if self.images is not None:
            image, caption = self._fixed(i)
        else:
            s = self.world.sample(self.offset + i, with_controls=False)
            image, caption = np.asarray(s["image"]), s["text"]
        pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


class VAETrainingWrapper(torch.nn.Module):
    """One forward for the autoencoder's training step (reconstruction and KL), so that DDP wraps one module."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, latents=None):
        """`latents` (unscaled) replace the encoder's: the decoder alone learns, there is no KL term (zeros)."""
        if latents is not None:
            return self.vae.decode(latents).sample, torch.zeros(x.shape[0], device=x.device)
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


@torch.no_grad()
def denoised_latents(vae, unet, text_encoder, noise_scheduler, pixel_values, input_ids, max_timestep):
    """
    The UNet's one-step estimate of the clean latent (Eq. 5) from the encoder's latent of `pixel_values` noised to a
    timestep drawn uniformly from `[0, max_timestep)`, unscaled for the decoder. At small timesteps these are the
    latents a sampler ends on: the encoder's content with the UNet's own errors, which a decoder must draw cleanly.
    """
    from diffusers_innercontrol.losses import one_step_x0

    scale = vae.config.scaling_factor
    latents = vae.encode(pixel_values).latent_dist.sample() * scale
    noise = torch.randn_like(latents)
    t = torch.randint(0, max_timestep, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    hidden = text_encoder(input_ids, return_dict=False)[0]
    pred = unet(noisy, t, hidden, return_dict=False)[0]
    x0 = one_step_x0(noisy, pred, t, noise_scheduler.alphas_cumprod, noise_scheduler.config.prediction_type)
    return x0 / scale


def _loader(args, dataset):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=False, num_workers=args.dataloader_num_workers, drop_last=True
    )


# --------------------------------------------------------------------------------------------- validation
def log_validation(vae, text_encoder, tokenizer, unet, scheduler, args, accelerator, step, final=False):
    """Sample the held-out captions; save a grid (data above, samples below) to the output folder."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from diffusers_innercontrol.toy.shapesworld import ShapesWorld

    world = ShapesWorld(size=args.resolution, seed=args.validation_world_seed)
    refs = [world.sample(i, with_controls=False) for i in range(args.num_validation_images)]
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet), scheduler=make_pipeline_scheduler(args.pipeline_scheduler, scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with torch.no_grad():
        images = pipe(
            [r["text"] for r in refs], num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
            generator=generator, output_type="np",
        ).images
    top = np.concatenate([np.asarray(r["image"]) for r in refs], axis=1)
    bottom = np.concatenate(list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), axis=1)
    grid = Image.fromarray(np.concatenate([top, bottom], axis=0))
    name = "samples.png" if final else f"samples-{step:06d}.png"
    grid.save(os.path.join(args.output_dir, name))
    logger.info(f"step {step}: validation grid {name} (captions: {[r['text'] for r in refs][:3]} ...)")
    return grid, [r["text"] for r in refs]


def describe_timings(timings: dict) -> str:
    """The card's training time: `{"render_s": 74.2, "unet_s": 4894.9}` -> "83 minutes (rendering 74 s, UNet 4895 s)"."""
    labels = {"render_s": "rendering", "vae_s": "VAE", "unet_s": "UNet"}
    parts = [f"{labels.get(k, k)} {v:.0f} s" for k, v in timings.items()]
    return f"{sum(timings.values()) / 60:.0f} minutes ({', '.join(parts)})" if timings else "-"


def describe_training(args) -> str:
    """The card's account of what this run trained: the autoencoder's stage, then the UNet's (or that it was kept)."""
    if args.vae_steps == 0:
        vae = "VAE kept"
    elif args.vae_train == "all":
        vae = f"VAE {args.vae_steps} steps (lr {args.vae_learning_rate}, {args.vae_lr_scheduler})"
    else:
        on = "its encoder's latents"
        if args.decoder_latents == "denoised":
            on = f"the UNet's one-step x0 from encoder latents noised to t < {args.decoder_max_timestep}"
        vae = (f"the VAE's decoder alone {args.vae_steps} steps on {on} (lr {args.vae_learning_rate}, "
               f"{args.vae_lr_scheduler}; the encoder kept)")
    if args.unet_steps == 0:
        return f"{vae}, then the UNet and text encoder kept; batch {args.train_batch_size}, seed {args.seed}."
    return (f"{vae}, then UNet + text encoder {args.unet_steps} steps, batch {args.train_batch_size},\n"
            f"  lr {args.learning_rate} ({args.lr_scheduler}), caption dropout {args.caption_dropout}, EMA {args.use_ema}, "
            f"seed {args.seed};\n  {args.beta_schedule} beta schedule, min-SNR gamma {args.snr_gamma}, "
            f"offset noise {args.offset_noise}.")


def save_model_card(args, path, captions, sizes_mb, timings, latent_channels: int = 4, scaling_factor=None):
    """README.md for the toy pipeline (written after save_pretrained, which would not keep it)."""
    caption_lines = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
    name = lambda folder: os.path.basename(os.path.normpath(folder))  # noqa: E731  (no machine paths in the card)
    origin = "trained from scratch"
    if args.init_from:
        origin = f"continued from `{name(args.init_from)}`"
        if args.unet_init_from:
            origin += (f" (its VAE), the UNet and text encoder started from `{name(args.unet_init_from)}`'s (the UNet's "
                       "conv_in and conv_out re-initialised for the latent channels),")
    text = f"""---
license: apache-2.0
library_name: diffusers
tags:
- stable-diffusion
- text-to-image
- toy
- shapesworld
- diffusers-innercontrol
---

# Toy Stable Diffusion for ShapesWorld

A Stable Diffusion pipeline with SD1.5's classes (`AutoencoderKL`, `UNet2DConditionModel`, `CLIPTextModel`)
scaled down and {origin} on ShapesWorld ({args.resolution} px; `diffusers_innercontrol.toy.shapesworld`)
by `examples/innercontrol/shapesworld/pretrain_toy_sd.py`. It exists to make the InnerControl scripts
runnable and testable on a CPU; it knows nothing but coloured shapes.

- VAE: block widths {list(args.vae_channels)}, scale factor {2 ** (len(args.vae_channels) - 1)}, {latent_channels} latent channels, latent scaling factor measured on the data{"" if scaling_factor is None else f" ({scaling_factor:.3f})"}.
- UNet: block widths {list(args.unet_channels)}, {args.layers_per_block} layers per block, cross-attention dim {args.text_hidden_size}.
- Text encoder: CLIP, {args.text_layers} layers, width {args.text_hidden_size}; word-level tokenizer (one token per caption word).
- Training: {describe_training(args)}
- Weights: {sizes_mb:.2f} MB (safetensors, float32). Training time: {describe_timings(timings)}.

![samples](samples.png)

`samples.png`: held-out ShapesWorld images (top) and samples for their captions (bottom), guidance {args.guidance_scale},
{args.validation_inference_steps} {args.pipeline_scheduler} steps:

{caption_lines}
"""
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------- main
def main(args):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_innercontrol.toy.shapesworld import ShapesWorld, write_word_tokenizer
    from diffusers_innercontrol.toy.tiny import SD15_SCHEDULER_CONFIG

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.init_from:
        tokenizer = CLIPTokenizer.from_pretrained(args.init_from, subfolder="tokenizer", model_max_length=77)
        vae = AutoencoderKL.from_pretrained(args.init_from, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder")
        if args.unet_init_from:
            unet, text_encoder, tokenizer = warm_start_unet(args.unet_init_from, vae.config.latent_channels)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_word_tokenizer(tmp), model_max_length=77)
        vae, unet, text_encoder = build_models(args, tokenizer)
    size_mb = weights_megabytes(vae, unet, text_encoder)
    if size_mb > args.max_size_mb:
        raise ConfigError(
            f"The toy models would save {size_mb:.1f} MB of weights, over --max_size_mb {args.max_size_mb}: make "
            "--unet_channels / --vae_channels / --layers_per_block / --text_hidden_size smaller."
        )
    logger.info(
        f"toy SD: VAE {weights_megabytes(vae):.2f} MB, UNet {weights_megabytes(unet):.2f} MB, text encoder "
        f"{weights_megabytes(text_encoder):.2f} MB, total {size_mb:.2f} MB (limit {args.max_size_mb} MB)"
    )
    if args.beta_schedule == "linear":
        noise_scheduler = DDPMScheduler(**{**SD15_SCHEDULER_CONFIG, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"})
    else:
        noise_scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    world = ShapesWorld(size=args.resolution, seed=args.world_seed)
    timings = {}
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    images = captions_fixed = None
    if args.num_train_samples > 0:
        t0 = time.time()
        images, captions_fixed = render_samples(world, args.num_train_samples, workers=args.render_workers)
        timings["render_s"] = round(time.time() - t0, 1)
        logger.info(f"rendered {len(images)} training samples in {timings['render_s']} s")

    # ---------------------------------------------------------------- stage 1: the autoencoder
    if args.vae_steps > 0:
        t0 = time.time()
        vae.train()
        if args.vae_train == "decoder":  # the encoder (and so the latent space the UNet learned) stays as it is
            vae.encoder.requires_grad_(False)
            if vae.quant_conv is not None:
                vae.quant_conv.requires_grad_(False)
        model = VAETrainingWrapper(vae)
        vae_params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(vae_params, lr=args.vae_learning_rate, weight_decay=0.0)
        vae_sched = get_scheduler(args.vae_lr_scheduler, optimizer=opt, num_warmup_steps=0,
                                  num_training_steps=args.vae_steps * accelerator.num_processes)
        loader = _loader(args, ShapesWorldTrainData(
            world, tokenizer, args.vae_steps * args.train_batch_size * args.gradient_accumulation_steps,
            images=images, captions=captions_fixed, seed=args.seed,
        ))
        model, opt, loader = accelerator.prepare(model, opt, loader)
        if args.decoder_latents == "denoised":  # the UNet and text encoder only read (this run trains neither)
            unet.to(accelerator.device).eval()
            text_encoder.to(accelerator.device).eval()
        step = 0
        for batch in loader:
            with accelerator.accumulate(model):
                x = batch["pixel_values"]
                z = None
                if args.decoder_latents == "denoised":
                    z = denoised_latents(accelerator.unwrap_model(model).vae, unet, text_encoder, noise_scheduler, x,
                                         batch["input_ids"], args.decoder_max_timestep)
                rec, kl_sum = model(x, z)
                rec_loss = F.l1_loss(rec, x)
                # SD's convention: KL summed over the latent, against the reconstruction summed over the image
                kl = kl_sum.mean() / x[0].numel()
                loss = rec_loss + args.kl_weight * kl
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(vae_params, args.max_grad_norm)
                opt.step()
                vae_sched.step()
                opt.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                step += 1
                if step % args.logging_steps == 0 or step == args.vae_steps:
                    logger.info(f"vae step {step}/{args.vae_steps}: l1 {rec_loss.item():.4f} kl/elem {kl.item():.3f}")
        vae = accelerator.unwrap_model(model).vae
        timings["vae_s"] = round(time.time() - t0, 1)
        accelerator.free_memory()
        # latent scaling factor: 1 / std of the latents, measured on data (SD1.5's 0.18215 was measured the same way);
        # a decoder fine-tune keeps the encoder, so its factor too
        vae.eval()
        if args.vae_train == "all":
            with torch.no_grad():
                xs = torch.stack([ShapesWorldTrainData(world, tokenizer, 1, offset=10_000_000 + i)[0]["pixel_values"] for i in range(64)])
                latents = vae.encode(xs.to(accelerator.device)).latent_dist.sample()
            scaling = float(1.0 / latents.flatten().std().clamp_min(1e-6))
            vae.register_to_config(scaling_factor=scaling)
            logger.info(f"VAE scaling factor measured on 64 images: {scaling:.4f}")
    if args.standardize_latents:
        vae.eval()
        with torch.no_grad():
            xs = torch.stack([ShapesWorldTrainData(world, tokenizer, 1, offset=10_000_000 + i)[0]["pixel_values"] for i in range(256)])
            latents = torch.cat([vae.encode(x.to(accelerator.device)).latent_dist.sample() for x in xs.split(64)])
        standardize_latent_channels(vae, latents)
        logger.info("Latent channels standardised on 256 images (folded into quant_conv / post_quant_conv; scaling factor 1)")
    vae.requires_grad_(False)
    vae.eval()
    vae.to(accelerator.device)

    # ---------------------------------------------------------------- stage 2: UNet + text encoder
    ema = None
    captions: List[str] = []
    if args.unet_steps > 0:
        t0 = time.time()
        unet.train()
        text_encoder.train()
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        lr_sched = get_scheduler(
            args.lr_scheduler, optimizer=opt, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.unet_steps * accelerator.num_processes,
        )
        data = ShapesWorldTrainData(
            world, tokenizer, args.unet_steps * args.train_batch_size * args.gradient_accumulation_steps,
            offset=20_000_000, images=images, captions=captions_fixed, seed=args.seed + 1,
        )
        empty_ids = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids[0].to(accelerator.device)
        dropout_gen = torch.Generator(device="cpu").manual_seed(args.seed + accelerator.process_index)
        unet, text_encoder, opt, loader, lr_sched = accelerator.prepare(unet, text_encoder, opt, _loader(args, data), lr_sched)
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(params, decay=args.ema_decay)
        step = 0
        for batch in loader:
            with accelerator.accumulate(unet, text_encoder):
                with torch.no_grad():
                    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                if args.offset_noise > 0:
                    noise = noise + args.offset_noise * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                ids = batch["input_ids"]
                if args.caption_dropout > 0:  # empty captions for classifier-free guidance
                    drop = (torch.rand(ids.shape[0], generator=dropout_gen) < args.caption_dropout).to(ids.device)
                    ids = torch.where(drop[:, None], empty_ids[None], ids)
                hidden = text_encoder(ids, return_dict=False)[0]
                pred = unet(noisy, t, hidden, return_dict=False)[0]
                if args.snr_gamma > 0:
                    snr = compute_snr(noise_scheduler, t)
                    weight = torch.clamp(snr, max=args.snr_gamma) / snr  # epsilon target
                    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                    loss = (per_sample * weight).mean()
                else:
                    loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                step += 1
                if ema is not None:
                    ema.step(params)
                if step % args.logging_steps == 0 or step == args.unet_steps:
                    logger.info(f"unet step {step}/{args.unet_steps}: loss {loss.item():.4f} lr {lr_sched.get_last_lr()[0]:.2e}")
                if accelerator.is_main_process and step % args.validation_steps == 0 and step < args.unet_steps:
                    if ema is not None:
                        ema.store(params)
                        ema.copy_to(params)
                    log_validation(vae, text_encoder, tokenizer, unet, noise_scheduler, args, accelerator, step)
                    if ema is not None:
                        ema.restore(params)
                    unet.train()
                    text_encoder.train()
        timings["unet_s"] = round(time.time() - t0, 1)
        if ema is not None:
            ema.copy_to(params)

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet).eval()
        text_encoder = accelerator.unwrap_model(text_encoder).eval()
        _, captions = log_validation(vae, text_encoder, tokenizer, unet, noise_scheduler, args, accelerator,
                                     args.unet_steps, final=True)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=make_pipeline_scheduler(args.pipeline_scheduler, noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(args.output_dir, safe_serialization=True)
        saved_mb = folder_megabytes(args.output_dir)
        save_model_card(args, args.output_dir, captions, saved_mb, timings, latent_channels=vae.config.latent_channels,
                        scaling_factor=vae.config.scaling_factor)
        print(f"Saved the toy Stable Diffusion to {args.output_dir}: total size of the weights {saved_mb:.2f} MB "
              f"(limit {args.max_size_mb} MB); timings {timings}")
        if saved_mb > args.max_size_mb:
            logger.warning(f"The saved weights ({saved_mb:.2f} MB) exceed --max_size_mb {args.max_size_mb}.")
    accelerator.end_training()


if __name__ == "__main__":
    import sys

    try:
        main(parse_args())
    except ConfigError as err:
        sys.exit(f"error: {err}")
