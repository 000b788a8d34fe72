# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Import probes released in Readout Guidance's checkpoint format into a [`ReadoutProbe`].

The probes published with Readout Guidance (Luo et al., CVPR 2024) and with InnerControl are torch files
holding a dict with (at least) `config` and `aggregation_network`, the `state_dict` of Readout Guidance's
`AggregationNetwork`. Its architecture is the one `ReadoutProbe` implements (docs/method.md, "The probe"), so every
tensor has a place in our probe:

    bottleneck_layers.{l}.conv1.weight / .conv1.norm.*        -> bottleneck_layers.{l}.conv1 / .norm1
    bottleneck_layers.{l}.conv2.weight / .conv2.norm.*        -> bottleneck_layers.{l}.conv2 / .norm2
    bottleneck_layers.{l}.conv3.weight / .conv3.norm.*        -> bottleneck_layers.{l}.conv3 / .norm3
    bottleneck_layers.{l}.shortcut.weight / .shortcut.norm.*  -> bottleneck_layers.{l}.shortcut / .shortcut_norm
    bottleneck_layers.{l}.emb_layers.*                        -> bottleneck_layers.{l}.time_emb_proj
    mixing_weights                                            -> mixing_weights
    output_head.{0,2,4}.*                                     -> head.{0,2,4}

With `bottleneck_sequential=True` every block sits in an `nn.Sequential` (keys `bottleneck_layers.{l}.0.*`)
and the original forward never passes the timestep embedding to it: its `emb_layers` are saved but unused.

Readout Guidance loads these files with `strict=False`, which silently leaves a mis-named tensor at its
random initialisation; here every tensor of the checkpoint must be used and every probe parameter filled,
or a clear error lists what did not fit. Written from the format's description (research notes), not
copied from Readout Guidance.

Command line (writes a `save_pretrained` folder):

    python -m diffusers_innercontrol.convert --checkpoint hed.pt \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --output_dir probe-hed
"""

import argparse
import os
import pickle
import re
from typing import Dict, Optional, Tuple

import torch
from diffusers import UNet2DConditionModel

from .features import check_probe_fits_unet
from .hub_utils import check_model_available
from .models.readout_probe import ReadoutProbe

__all__ = ["load_readout_guidance_checkpoint", "readout_guidance_state_dict_to_probe", "read_checkpoint_file"]

# The sub-module names of one Readout Guidance bottleneck block -> ours (conv, its GroupNorm).
_BLOCK_CONVS = {
    "conv1": ("conv1", "norm1"),
    "conv2": ("conv2", "norm2"),
    "conv3": ("conv3", "norm3"),
    "shortcut": ("shortcut", "shortcut_norm"),
}
_HEAD_INDICES = ("0", "2", "4")  # the three convolutions of `output_head` (1, 3 are SiLU, 5 the Tanh)


def read_checkpoint_file(path: str, trust_pickle: bool = False) -> Dict:
    """
    `torch.load` a third-party checkpoint on the CPU, with `weights_only=True` unless `trust_pickle=True`.

    Raises:
        ValueError: the file holds objects that only a full unpickling can restore (this can run code:
            pass `trust_pickle=True` only for files from a source you trust).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path!r} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
            f"({str(error).splitlines()[0]}). Unpickling them can run arbitrary code: if you trust the file's "
            f"source, pass trust_pickle=True (command line: --trust_pickle)."
        ) from error


def _split_block_key(key: str, sequential: bool) -> Optional[Tuple[int, str]]:
    pattern = r"bottleneck_layers\.(\d+)\.0\.(.+)" if sequential else r"bottleneck_layers\.(\d+)\.(?!0\.)(.+)"
    match = re.fullmatch(pattern, key)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def _map_block_suffix(suffix: str) -> Optional[str]:
    """`conv1.weight` -> `conv1.weight`, `conv1.norm.bias` -> `norm1.bias`, `emb_layers.weight` -> `time_emb_proj.weight`."""
    parts = suffix.split(".")
    if len(parts) == 2 and parts[0] == "emb_layers" and parts[1] in ("weight", "bias"):
        return f"time_emb_proj.{parts[1]}"
    if parts[0] in _BLOCK_CONVS:
        conv, norm = _BLOCK_CONVS[parts[0]]
        if parts[1:] == ["weight"]:
            return f"{conv}.weight"
        if len(parts) == 3 and parts[1] == "norm" and parts[2] in ("weight", "bias"):
            return f"{norm}.{parts[2]}"
    return None


def _is_sequential(state_dict: Dict[str, torch.Tensor], config_value) -> bool:
    block_keys = [k for k in state_dict if k.startswith("bottleneck_layers.")]
    if not block_keys:
        raise ValueError("The checkpoint's `aggregation_network` has no `bottleneck_layers.*` tensors: not a Readout Guidance probe.")
    nested = [bool(re.match(r"bottleneck_layers\.\d+\.0\.", k)) for k in block_keys]
    if any(nested) and not all(nested):
        raise ValueError(
            "The checkpoint mixes `bottleneck_layers.{l}.0.*` (bottleneck_sequential=True) and "
            "`bottleneck_layers.{l}.*` keys; it cannot be read consistently."
        )
    sequential = all(nested)
    if config_value is not None and bool(config_value) != sequential:
        raise ValueError(
            f"The checkpoint's config says bottleneck_sequential={config_value} but its keys are in the "
            f"bottleneck_sequential={sequential} form: Readout Guidance would load it with random bottleneck "
            f"weights (strict=False), so it is refused here."
        )
    return sequential


def readout_guidance_state_dict_to_probe(
    aggregation_state: Dict[str, torch.Tensor], probe, sequential: bool
) -> Dict[str, torch.Tensor]:
    """
    Map the tensors of an `AggregationNetwork` state dict onto `probe`'s parameter names (strict).

    Returns a complete state dict for `probe` (its own timestep embedding included). With `sequential`,
    the unused `emb_layers` are dropped and `time_emb_proj` is filled with zeros: the block then adds
    `ReLU(0 * t_emb + 0) = 0`, exactly what the original does when it passes no embedding.

    Raises:
        ValueError: listing the checkpoint tensors that have no place in the probe, the probe parameters
            that the checkpoint does not fill, or a tensor whose shape differs from the parameter's.
    """
    target = probe.state_dict()
    mapped: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    unmapped = []
    for key, tensor in aggregation_state.items():
        if key == "mixing_weights":
            name = "mixing_weights"
        elif key.startswith("output_head."):
            parts = key.split(".")
            name = f"head.{parts[1]}.{parts[2]}" if len(parts) == 3 and parts[1] in _HEAD_INDICES else None
        else:
            split = _split_block_key(key, sequential)
            suffix = _map_block_suffix(split[1]) if split is not None else None
            name = f"bottleneck_layers.{split[0]}.{suffix}" if suffix is not None else None
            if name in target and sequential and suffix.startswith("time_emb_proj."):
                # Saved but never used by the original forward in this form: consumed, replaced by zeros below.
                continue
        if name is None or name not in target:
            unmapped.append(key)
            continue
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(
                f"Checkpoint tensor {key!r} has shape {tuple(tensor.shape)} but the probe's {name!r} needs "
                f"{tuple(target[name].shape)}: the checkpoint does not fit this UNet / configuration."
            )
        mapped[name] = tensor
        sources[name] = key
    if sequential:
        for name, value in target.items():
            if ".time_emb_proj." in name:
                mapped[name] = torch.zeros_like(value)
    for name, value in target.items():
        if name.startswith("time_embedding."):
            mapped[name] = value  # copied from the UNet by `from_unet`
    missing = sorted(set(target) - set(mapped))
    if unmapped or missing:
        lines = []
        if unmapped:
            lines.append(f"checkpoint tensors with no place in ReadoutProbe: {sorted(unmapped)}")
        if missing:
            lines.append(f"ReadoutProbe parameters the checkpoint does not fill: {missing}")
        raise ValueError("The checkpoint does not map onto a ReadoutProbe exactly; " + "; ".join(lines) + ".")
    return {name: mapped[name].to(dtype=target[name].dtype) for name in target}


def load_readout_guidance_checkpoint(
    checkpoint_path: str,
    unet,
    trust_pickle: bool = False,
    feature_kind: str = "resnet",
    norm_num_groups: Optional[int] = None,
    probe_class=None,
    flip_timesteps: bool = True,
    task: Optional[str] = None,
    task_preset: Optional[str] = "released",
):
    r"""
    Import a probe in Readout Guidance's checkpoint format into a [`ReadoutProbe`].

    The probe reads `unet`'s decoder features at the latent size (`feature_scale=1`, no upsampling head, as
    Readout Guidance) and gets a copy of `unet`'s timestep embedding. Save it with `save_pretrained`.

    Args:
        checkpoint_path (`str`): The `.pt` file: a dict with `config` and `aggregation_network`.
        unet (`UNet2DConditionModel`): The UNet the probe was trained on (its decoder channels must equal the
            checkpoint's `config["dims"]`; its timestep embedding is copied).
        trust_pickle (`bool`, defaults to `False`): The file is read with `torch.load(weights_only=True)`;
            a file that holds other Python objects needs this explicit opt-in (`weights_only=False`, which can
            run code from the file: only for files you trust).
        feature_kind (`str`, defaults to `"resnet"`): The features the probe was trained on: `"resnet"`
            (Readout Guidance's and InnerControl's "conv" readout) or `"attention"`.
        norm_num_groups (`int`, *optional*): GroupNorm groups; the checkpoint's `num_norm_groups` (in
            `config` or `config["aggregation_kwargs"]`), else 32, Readout Guidance's default.
        probe_class (*optional*): The class to build, `ReadoutProbe` by default.
        flip_timesteps (`bool`, defaults to `True`): Readout Guidance's trainer (which InnerControl's probes
            come from) embeds the denoising-step index, `999 - t`, not the timestep `t`; with `True` the imported
            probe embeds `999 - t` for the real `t` it is called with, as its weights were trained. Irrelevant for
            `bottleneck_sequential` checkpoints (their blocks ignore the timestep).
        task (`str`, *optional*): The task the probe reads (`hed`, `lineart`, `depth`, `segmentation`), recorded
            in its config so that the training script and the readout pipeline check and render it.
        task_preset (`str`, *optional*, defaults to `"released"`): The preset whose readout mapping the probe was
            trained with, recorded next to `task`. Released InnerControl probes were trained with the released
            code's mapping (LineArt: min-max normalised), hence the default; `None` records none (such a LineArt
            probe is then refused until its preset is known).

    Notes:
        - `bottleneck_sequential=True` checkpoints (keys `bottleneck_layers.{l}.0.*`): the original forward
          never gives the timestep embedding to the blocks, so their saved `emb_layers` are not imported and
          `time_emb_proj` is set to zeros; `ReLU(0) = 0` keeps the imported probe's output identical.
        - Only single-timestep checkpoints (`save_timestep` with one entry) are supported.
        - The `tanh` of `output_head_act` becomes `output_activation="tanh"`, otherwise `"none"`.
        - Readout Guidance resizes the features to `unet.config.sample_size` (64 for SD1.5); the probe resizes
          them to the largest feature map, the latent. Both are the same at SD1.5's 512 px; at another
          resolution the imported probe reads the features at the latent size.

    Returns:
        [`ReadoutProbe`]: the probe, in eval mode, on `unet`'s device.

    Raises:
        ValueError: the file needs `trust_pickle=True`, is not in this format, is configured in a way the
            probe cannot reproduce, does not match `unet`, or has tensors that do not map one-to-one.
    """
    probe_class = probe_class or ReadoutProbe

    checkpoint = read_checkpoint_file(checkpoint_path, trust_pickle=trust_pickle)
    if not isinstance(checkpoint, dict) or "aggregation_network" not in checkpoint or "config" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{checkpoint_path!r} is not a Readout Guidance checkpoint: expected a dict with 'config' and "
            f"'aggregation_network', found {found}."
        )
    config = dict(checkpoint["config"])
    state = dict(checkpoint["aggregation_network"])
    agg = dict(config.get("aggregation_kwargs") or {})

    save_timestep = list(config.get("save_timestep", [0]) or [])
    if len(save_timestep) != 1:
        raise ValueError(
            f"The checkpoint was trained on features of {len(save_timestep)} timesteps (save_timestep="
            f"{save_timestep}); only single-timestep probes (one save_timestep) are supported."
        )
    if not agg.get("use_output_head", "output_head.0.weight" in state):
        raise ValueError(
            "The checkpoint has no output head (use_output_head=False, e.g. a correspondence feature network): "
            "a ReadoutProbe always predicts a map, so it cannot be imported."
        )
    if "dims" not in config:
        raise ValueError("The checkpoint's config has no 'dims' (the feature channels of every layer).")
    dims = [int(d) for d in config["dims"]]
    check_probe_fits_unet(unet, feature_kind, dims, "The checkpoint",
                          "Pass the UNet it was trained on (Readout Guidance: SD1.5 or SDXL).")
    sequential = _is_sequential(state, agg.get("bottleneck_sequential"))
    for key in ("mixing_weights", "output_head.0.weight", "output_head.2.weight", "output_head.4.weight"):
        if key not in state:
            raise ValueError(f"The checkpoint's aggregation_network has no {key!r}.")
    if state["mixing_weights"].numel() != len(dims):
        raise ValueError(
            f"The checkpoint has {state['mixing_weights'].numel()} mixing weights for {len(dims)} layers; "
            "only one weight per layer (one timestep) is supported."
        )
    projection_dim = int(config.get("projection_dim", state["output_head.0.weight"].shape[1]))
    prefix = "bottleneck_layers.0.0." if sequential else "bottleneck_layers.0."
    if prefix + "conv1.weight" not in state:
        raise ValueError(f"The checkpoint's aggregation_network has no {prefix + 'conv1.weight'!r}.")
    bottleneck_dim = int(state[prefix + "conv1.weight"].shape[0])
    head_channels = (int(state["output_head.0.weight"].shape[0]), int(state["output_head.2.weight"].shape[0]))
    out_channels = int(agg.get("output_head_channels", state["output_head.4.weight"].shape[0]))
    activation = "tanh" if agg.get("output_head_act", True) else "none"
    if norm_num_groups is None:
        norm_num_groups = int(agg.get("num_norm_groups", config.get("num_norm_groups", 32)))

    probe = probe_class.from_unet(
        unet,
        feature_kind=feature_kind,
        feature_channels=dims,
        feature_scale=1.0,
        projection_dim=projection_dim,
        bottleneck_dim=bottleneck_dim,
        out_channels=out_channels,
        upsample_head=False,
        head_channels=head_channels,
        output_activation=activation,
        norm_num_groups=norm_num_groups,
        flip_timesteps=bool(flip_timesteps) and not sequential,
        num_train_timesteps=int(config.get("num_timesteps", 1000) or 1000),
        task=task,
        task_preset=task_preset if task is not None else None,
    )
    probe.load_state_dict(readout_guidance_state_dict_to_probe(state, probe, sequential), strict=True)
    return probe.eval()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Import a Readout Guidance / InnerControl probe (.pt) as a ReadoutProbe.")
    parser.add_argument("--checkpoint", required=True, help="The .pt file (a dict with 'config' and 'aggregation_network').")
    parser.add_argument(
        "--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="The Stable Diffusion model (Hub id or local folder) whose UNet the probe reads.",
    )
    parser.add_argument("--revision", default=None)
    parser.add_argument("--feature_kind", default="resnet", choices=["resnet", "attention"])
    parser.add_argument("--norm_num_groups", type=int, default=None)
    parser.add_argument("--trust_pickle", action="store_true", help="Allow a full unpickling (only for trusted files).")
    parser.add_argument("--output_dir", required=True, help="Where `save_pretrained` writes the probe.")
    parser.add_argument("--task", default=None, choices=["hed", "lineart", "depth", "segmentation"],
                        help="The task the probe reads (recorded in its config).")
    parser.add_argument("--preset", default="released", choices=["paper", "released"],
                        help="The preset whose readout mapping the probe was trained with (recorded with --task). "
                             "Default: released, as InnerControl's released probes (LineArt: min-max normalised).")
    parser.add_argument("--no_flip_timesteps", action="store_true",
                        help="Embed t itself (Readout Guidance's trainer embedded 999 - t; see the function's docstring).")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)


    check_model_available(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", subfolder="unet")
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision)
    probe = load_readout_guidance_checkpoint(
        args.checkpoint, unet, trust_pickle=args.trust_pickle, feature_kind=args.feature_kind,
        norm_num_groups=args.norm_num_groups, flip_timesteps=not args.no_flip_timesteps, task=args.task,
        task_preset=args.preset,
    )
    probe.save_pretrained(args.output_dir)
    print(f"Saved a ReadoutProbe ({probe.num_probe_parameters / 1e6:.2f} M parameters) to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
