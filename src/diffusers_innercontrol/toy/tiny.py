# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Offline tiny models with the SD1.5 architecture, built from configs (no network), for tests and demos.

`save_tiny_pipeline(path)` writes a `StableDiffusionControlNetPipeline` (UNet, ControlNet, VAE, CLIP text
encoder and tokenizer, scheduler) with `save_pretrained`, so that every script can be pointed at `path`
exactly as at `stable-diffusion-v1-5/stable-diffusion-v1-5`. The configs follow diffusers' own
ControlNet pipeline tests. `SD15_UNET_CONFIG` is the real SD1.5 UNet configuration.
"""

import json
import os
from typing import Dict, Optional

import torch

from ..rewards import HED_FILENAME, LINEART_COARSE_FILENAME, LINEART_FILENAME, build_hed_network, build_lineart_network
from ..tasks import get_task
from ..training import conditioning_channels_for

SD15_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0): three levels, 1/2/10 transformer layers, the pooled text
# embedding and the size/crop ids added to the timestep embedding ("text_time")
SDXL_UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)

# SDXL's layout scaled down for tests (random weights): the same block types, "text_time" conditioning with
# 2 x 32 text channels + 6 size/crop ids of 8 channels each (6 * 8 + 32 = 80), 1 and 2 transformer layers
TINY_SDXL_UNET_CONFIG = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    attention_head_dim=(2, 4),
    block_out_channels=(32, 64),
    cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    layers_per_block=2,
    norm_num_groups=8,
    projection_class_embeddings_input_dim=80,
    sample_size=16,
    transformer_layers_per_block=(1, 2),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)

TINY_UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

TINY_VAE_CONFIG = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=2,
    sample_size=32,
)

TINY_TEXT_CONFIG = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    pad_token_id=1,
    vocab_size=1000,
)

SD15_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, steps_offset=1,
)


def byte_level_alphabet():
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(directory: str):
    """A byte-level CLIP BPE tokenizer with no merges (every character a token): vocab.json + merges.txt."""
    os.makedirs(directory, exist_ok=True)
    chars = byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return directory


def _tiny_controlnet(unet, vae_scale_factor: int, seed: int):
    """`ControlNetModel.from_unet`, with small random output convolutions instead of zeros, so that a tiny ControlNet
    changes the UNet's features and tests can see gradients reach it."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 2)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(vae_scale_factor))
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in list(controlnet.controlnet_down_blocks.parameters()) + list(controlnet.controlnet_mid_block.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return controlnet


def build_tiny_sdxl_components(seed: int = 0, tokenizer_dir: Optional[str] = None) -> Dict:
    """The components of a tiny SDXL-shaped ControlNet pipeline (`StableDiffusionXLControlNetPipeline(**components)`):
    the tiny SDXL UNet, its ControlNet, the tiny VAE, two tiny CLIP text encoders (the second with a projection: its
    pooled output is SDXL's `text_embeds`), their tokenizer and an Euler scheduler."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = build_sdxl_unet("cpu", tiny=True, seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    controlnet = _tiny_controlnet(unet, 2 ** (len(vae.config.block_out_channels) - 1), seed)
    torch.manual_seed(seed + 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG, projection_dim=32))
    tokenizer_dir = write_tiny_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny_tok_"))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    return dict(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG))


def build_tiny_components(seed: int = 0, tokenizer_dir: Optional[str] = None) -> Dict:
    """UNet, ControlNet, VAE, text encoder, tokenizer and scheduler of the tiny SD1.5-shaped model."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    controlnet = _tiny_controlnet(unet, vae_scale_factor, seed)
    torch.manual_seed(seed + 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    tokenizer_dir = write_tiny_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny_tok_"))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    return dict(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_pipeline(path: str, seed: int = 0) -> str:
    """Build the tiny SD1.5-shaped ControlNet pipeline and `save_pretrained` it to `path` (also `path/controlnet`)."""
    from diffusers import StableDiffusionControlNetPipeline

    components = build_tiny_components(seed, tokenizer_dir=os.path.join(path, "_tokenizer_src"))
    pipe = StableDiffusionControlNetPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil

    shutil.rmtree(os.path.join(path, "_tokenizer_src"), ignore_errors=True)
    return path


def build_sd15_unet(device="meta"):
    """The SD1.5 UNet built from its config with random (or, on 'meta', no) weights: no download."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def build_sdxl_unet(device="meta", tiny: bool = False, seed: int = 0):
    """SDXL's UNet (or, with `tiny`, its layout scaled down) from the config: on 'meta' shapes only, elsewhere
    random weights drawn with `seed`. No download."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**(TINY_SDXL_UNET_CONFIG if tiny else SDXL_UNET_CONFIG))


def main():  # `python -m diffusers_innercontrol.toy.tiny PATH`
    import argparse

    parser = argparse.ArgumentParser(description="Save the offline tiny SD1.5-shaped ControlNet pipeline.")
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny_pipeline(args.path, args.seed))


if __name__ == "__main__":
    main()


# --- tiny offline models --------------------------------------------------------------------------
def tiny_depth_config():
    """A `DPTConfig` for a ~0.1 M-parameter non-hybrid DPT (ViT with 4 layers of width 32, 32 px input, patch 8)."""
    from transformers import DPTConfig

    return DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        is_hybrid=False,
        backbone_out_indices=[0, 1, 2, 3],  # one per neck stage: the neck needs 4 hidden states
        neck_hidden_sizes=[8, 16, 16, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        # With the default 0.02, the random head's ReLU output is ~1e-9 (below the losses' max-normalisation
        # epsilon); 0.1 gives maps of order 1e-2 that are non-zero on about half of the pixels.
        initializer_range=0.1,
    )


def tiny_segmentation_config(num_labels: int = 150):
    """A `UperNetConfig` with a tiny ConvNext backbone (widths 8-32, one block per stage), `num_labels` classes."""
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return UperNetConfig(
        backbone_config=backbone, hidden_size=16, num_labels=num_labels, pool_scales=[1, 2, 3, 6],
        auxiliary_in_channels=24, auxiliary_channels=8,  # the auxiliary FCN head reads stage3 (24 channels)
    )


def _tiny_hed_state_dict() -> Dict[str, torch.Tensor]:
    network = build_hed_network()
    with torch.no_grad():
        # Random VGG weights on inputs in [0, 255] saturate the sigmoid (mean logit ~ -16: no gradient).
        # Centre and scale the input as a trained network would, so that the tiny model's edges are ~0.5.
        network.norm.fill_(127.5)
        network.block1.convs[0].weight.div_(127.5)
    return network.state_dict()


def save_tiny_reward_model(task_name: str, path: str, seed: int = 0) -> str:
    """
    Write random reward-model weights for `task_name` in the format `load_reward_model` reads, for offline
    tests and demos; returns `path` (pass it as `--reward_model_name_or_path`).

    - hed: the real `ControlNetHED_Apache2` architecture (14.7 M parameters, 59 MB) as `path/ControlNetHED.pth`.
    - lineart: the real `Generator(3, 1, 3)` as `path/sk_model.pth` and a second one as `path/sk_model2.pth`
      (controlnet_aux's `LineartDetector.from_pretrained` reads both).
    - depth: a tiny `DPTForDepthEstimation` (`tiny_depth_config()`), `save_pretrained(path)`.
    - segmentation: a tiny `UperNetForSemanticSegmentation` (`tiny_segmentation_config()`), `save_pretrained(path)`.

    The global random state is left untouched.
    """
    task = get_task(task_name)
    os.makedirs(path, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task.name == "hed":
            torch.save(_tiny_hed_state_dict(), os.path.join(path, HED_FILENAME))
        elif task.name == "lineart":
            torch.save(build_lineart_network().state_dict(), os.path.join(path, LINEART_FILENAME))
            torch.save(build_lineart_network().state_dict(), os.path.join(path, LINEART_COARSE_FILENAME))
        elif task.name == "depth":
            from transformers import DPTForDepthEstimation

            DPTForDepthEstimation(tiny_depth_config()).save_pretrained(path)
        elif task.name == "segmentation":
            from transformers import UperNetForSemanticSegmentation

            UperNetForSemanticSegmentation(tiny_segmentation_config(task.num_classes or 150)).save_pretrained(path)
        else:
            raise ValueError(f"No reward model for task {task.name!r}.")
    return path
