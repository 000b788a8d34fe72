# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The timestep-conditioned readout probe of InnerControl (after Readout Guidance, Luo et al. 2024).

The probe reads a spatial control (edges, depth, segmentation) back out of the decoder features
of one UNet forward. Architecture: docs/method.md, "The probe". Written from the description, not copied.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..features import FEATURE_KINDS, decoder_feature_channels

OUTPUT_ACTIVATIONS = ("tanh", "none")


@dataclass
class ReadoutProbeOutput(BaseOutput):
    """
    Output of [`ReadoutProbe`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The predicted control: in `[-1, 1]` with the `tanh` activation (regression tasks), or
            raw class logits with activation `"none"` (segmentation).
    """

    sample: torch.Tensor


@functools.lru_cache(maxsize=64)
def _bilinear_matrix_cpu(in_size: int, out_size: int) -> torch.Tensor:
    """`(out_size, in_size)` weights of 1-D linear interpolation with `align_corners=False`: row `i` samples the
    input at `(i + 0.5) * in_size / out_size - 0.5` (clamped at 0), as `F.interpolate(mode="bilinear")` does."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = in_size / out_size
    for i in range(out_size):
        source = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(source), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = source - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    return matrix


def bilinear_resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """
    `F.interpolate(x, size, mode="bilinear", align_corners=False)` as two small matrix products,
    `A_h @ x @ A_w^T` (bilinear interpolation is separable and linear). Equal within float rounding; its
    backward is two matrix products too, instead of the scatter of `upsample_bilinear2d_backward` (slow on the
    CPU, atomics on CUDA).
    """
    rows = _bilinear_matrix_cpu(x.shape[-2], size[0]).to(device=x.device, dtype=x.dtype)
    cols = _bilinear_matrix_cpu(x.shape[-1], size[1]).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class ProbeBottleneckBlock(nn.Module):
    r"""
    A timestep-conditioned bottleneck residual block that projects one feature map to the probe's width.

    `1x1 conv -> GN -> ReLU`, plus `ReLU(Linear(t_emb))` broadcast over space, `3x3 conv -> GN -> ReLU`,
    `1x1 conv -> GN`; the shortcut is a `1x1 conv + GN` when the channel count changes. Output:
    `ReLU(main + shortcut)`.

    Args:
        in_channels (`int`): Channels of the feature map.
        bottleneck_channels (`int`): Width of the bottleneck (96 for Readout Guidance's defaults).
        out_channels (`int`): Projection width shared by all layers (384 by default).
        temb_channels (`int`): Width of the timestep embedding (1280 for SD1.5).
        norm_num_groups (`int`): Groups of every GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm1 = nn.GroupNorm(norm_num_groups, bottleneck_channels)
        self.time_emb_proj = nn.Linear(temb_channels, bottleneck_channels)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_num_groups, bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False)
        self.norm3 = nn.GroupNorm(norm_num_groups, out_channels)
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            self.shortcut_norm = nn.GroupNorm(norm_num_groups, out_channels)
        else:
            self.shortcut = None
            self.shortcut_norm = None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """
        Args:
            hidden_states: one feature map `(B, C, h, w)` at its own size.
            temb: the timestep embedding `(B, temb_channels)`.
            size: the common size `(H, W)` to resize to (bilinear); `None` keeps `(h, w)`.

        The block is defined on the resized map. The bias-free 1x1 convolutions (`conv1`, `shortcut`) run
        *before* the resize, on the small map: a 1x1 convolution and a bilinear resize are both linear maps,
        one across channels and one across pixels, so they commute and the result is the same, while the
        1280-channel decoder maps are never materialised at the common size (3x fewer FLOPs on SD1.5 at 2x).
        """
        resize = size is not None and tuple(hidden_states.shape[-2:]) != tuple(size)

        def up(x):
            return bilinear_resize(x, size) if resize else x

        h = F.relu(self.norm1(up(self.conv1(hidden_states))))
        h = h + F.relu(self.time_emb_proj(temb))[:, :, None, None]
        h = F.relu(self.norm2(self.conv2(h)))
        h = self.norm3(self.conv3(h))
        if self.shortcut is not None:
            shortcut = self.shortcut_norm(up(self.shortcut(hidden_states)))
        else:
            shortcut = up(hidden_states)
        return F.relu(h + shortcut)


class ReadoutProbe(ModelMixin, ConfigMixin):
    r"""
    A readout probe: predicts a spatial control from a list of UNet decoder feature maps and the timestep.

    Every feature map is resized (bilinear) to a common size, projected by its own timestep-conditioned
    bottleneck block, mixed with softmax-normalised per-layer weights and decoded by a small convolutional
    head. The probe owns a copy of the UNet's timestep embedding (see [`ReadoutProbe.from_unet`]), so a
    call needs nothing but `probe(features, timestep)`.

    Args:
        feature_channels (`Tuple[int]`):
            Channels of each feature map, in capture order (see `DecoderFeatureExtractor.feature_channels`).
        feature_kind (`str`, defaults to `"resnet"`):
            Which decoder features the probe reads: `"resnet"` (residual branches) or `"attention"`
            (self-attention outputs). Recorded so that a mismatched UNet is refused before training.
        feature_scale (`float`, defaults to 1.0):
            Common feature size relative to the largest feature map (the latent size): 1.0 for the
            baseline probe, 2.0 for the paper's HED and LineArt probes.
        projection_dim (`int`, defaults to 384): Width of every projected feature map.
        bottleneck_dim (`int`, *optional*): Bottleneck width; `projection_dim // 4` when not given.
        out_channels (`int`, defaults to 3): Predicted channels (number of classes for segmentation).
        upsample_head (`bool`, defaults to `False`):
            Adds a 2x transposed convolution to the output head (the paper's HED and LineArt probes).
        head_channels (`Tuple[int]`, defaults to `(128, 32)`): Widths of the head's hidden convolutions.
        output_activation (`str`, defaults to `"tanh"`): `"tanh"` for regression, `"none"` for logits.
        norm_num_groups (`int`, defaults to 32): Groups of the GroupNorms.
        timestep_input_dim (`int`, defaults to 320): Sinusoidal embedding width (`unet.time_proj`).
        time_embed_dim (`int`, defaults to 1280): Timestep embedding width (`unet.time_embedding`).
        flip_sin_to_cos (`bool`, defaults to `True`): As the UNet's `flip_sin_to_cos`.
        freq_shift (`int`, defaults to 0): As the UNet's `freq_shift`.
        time_embedding_act_fn (`str`, defaults to `"silu"`): As the UNet's `act_fn`.
        task (`str`, *optional*): The task the probe was trained for (`hed`, `lineart`, `depth`, `segmentation`).
        task_preset (`str`, *optional*): The task preset it was trained with (`paper` or `released`): the presets
            map a readout to the control differently (e.g. LineArt polarity), so stage 2 must use the same one.
        flip_timesteps (`bool`, defaults to `False`):
            Embed `num_train_timesteps - 1 - t` instead of `t`. Only for probes imported from Readout Guidance,
            whose trainer embedded the denoising-step index (`999 - t`) rather than the timestep; callers always
            pass the real DDPM timestep `t`.
        num_train_timesteps (`int`, defaults to 1000): Used by `flip_timesteps`.
    """

    # Per-block activation checkpointing (`probe.enable_gradient_checkpointing()`): in stage 2 the probe's
    # backward runs while the UNet's activations are alive, so only recomputing one block at a time lowers the peak.
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        feature_channels: Sequence[int] = (1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320),
        feature_kind: str = "resnet",
        feature_scale: float = 1.0,
        projection_dim: int = 384,
        bottleneck_dim: Optional[int] = None,
        out_channels: int = 3,
        upsample_head: bool = False,
        head_channels: Sequence[int] = (128, 32),
        output_activation: str = "tanh",
        norm_num_groups: int = 32,
        timestep_input_dim: int = 320,
        time_embed_dim: int = 1280,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embedding_act_fn: str = "silu",
        task: Optional[str] = None,
        task_preset: Optional[str] = None,
        flip_timesteps: bool = False,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}.")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}.")
        if len(feature_channels) == 0:
            raise ValueError("feature_channels is empty: the probe needs at least one feature map.")
        if len(head_channels) != 2:
            raise ValueError(f"head_channels must hold two widths, got {tuple(head_channels)}.")
        bottleneck_dim = bottleneck_dim or projection_dim // 4

        self.time_proj = Timesteps(timestep_input_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=time_embedding_act_fn)

        self.bottleneck_layers = nn.ModuleList(
            [
                ProbeBottleneckBlock(c, bottleneck_dim, projection_dim, time_embed_dim, norm_num_groups)
                for c in feature_channels
            ]
        )
        self.mixing_weights = nn.Parameter(torch.ones(len(feature_channels)))
        self.gradient_checkpointing = False

        hidden, last = head_channels
        head = [nn.Conv2d(projection_dim, hidden, kernel_size=3, padding=1), nn.SiLU()]
        if upsample_head:
            head += [nn.ConvTranspose2d(hidden, hidden, kernel_size=2, stride=2), nn.SiLU()]
        head += [
            nn.Conv2d(hidden, last, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Conv2d(last, out_channels, kernel_size=1),
        ]
        self.head = nn.Sequential(*head)

    @classmethod
    def from_unet(cls, unet, feature_kind: str = "resnet", feature_channels: Optional[Sequence[int]] = None, **kwargs):
        r"""
        Build a probe for `unet`'s decoder features and copy the UNet's timestep embedding into it.

        Args:
            unet (`UNet2DConditionModel`): The (frozen) UNet whose decoder features the probe will read.
            feature_kind (`str`): `"resnet"` or `"attention"`.
            feature_channels (`Tuple[int]`, *optional*): Defaults to the channels read off `unet`.
            kwargs: Any other [`ReadoutProbe`] configuration argument.
        """

        if feature_channels is None:
            feature_channels = decoder_feature_channels(unet, feature_kind)
        ucfg = unet.config
        # A UNet built on the "meta" device (shapes only, e.g. to count parameters) has no weights to
        # copy: the probe is then built on "meta" too.
        on_meta = unet.time_embedding.linear_1.weight.is_meta
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            probe = cls(
                feature_channels=tuple(feature_channels),
                feature_kind=feature_kind,
                timestep_input_dim=ucfg.block_out_channels[0],
                time_embed_dim=unet.time_embedding.linear_1.out_features,
                flip_sin_to_cos=ucfg.flip_sin_to_cos,
                freq_shift=ucfg.freq_shift,
                time_embedding_act_fn=ucfg.act_fn,
                **kwargs,
            )
        if not on_meta:
            probe.time_embedding.load_state_dict(unet.time_embedding.state_dict())
            probe.to(device=unet.device)
        return probe

    @property
    def num_probe_parameters(self) -> int:
        """Number of parameters without the copied timestep embedding."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("time_embedding."))

    def output_size(self, feature_sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
        """Spatial size of the prediction for feature maps of the given sizes."""
        h = max(s[0] for s in feature_sizes)
        w = max(s[1] for s in feature_sizes)
        scale = self.config.feature_scale * (2 if self.config.upsample_head else 1)
        return int(round(h * scale)), int(round(w * scale))

    def embed_timesteps(self, timestep: Union[torch.Tensor, float, int], batch_size: int, device, dtype):
        """The UNet-style embedding of the real DDPM timestep `t` (not `1000 - t`)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timestep = timestep.to(device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.expand(batch_size) if timestep.shape[0] == 1 else timestep
        if self.config.flip_timesteps:
            timestep = (self.config.num_train_timesteps - 1) - timestep
        if timestep.shape[0] != batch_size:
            raise ValueError(f"Got {timestep.shape[0]} timesteps for a batch of {batch_size} feature maps.")
        t_emb = self.time_proj(timestep).to(dtype=dtype)
        return self.time_embedding(t_emb)

    def forward(
        self,
        features: List[torch.Tensor],
        timestep: Union[torch.Tensor, float, int],
        return_dict: bool = True,
    ) -> Union[ReadoutProbeOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            features (`List[torch.Tensor]`):
                Decoder feature maps of one UNet forward, each `(batch, channels, height, width)`, in the
                order of `feature_channels`.
            timestep (`torch.Tensor` or `int`): The DDPM timestep(s) of the noisy input, one or one per sample.
            return_dict (`bool`, defaults to `True`): Return a [`ReadoutProbeOutput`] instead of a tuple.

        Returns:
            [`ReadoutProbeOutput`] or `tuple`: the predicted control.
        """
        expected = list(self.config.feature_channels)
        got = [f.shape[1] for f in features]
        if got != expected:
            raise ValueError(
                f"The probe expects {len(expected)} feature maps with channels {expected}, got {got}. "
                f"Was it trained on '{self.config.feature_kind}' features of another UNet?"
            )
        dtype = next(self.bottleneck_layers.parameters()).dtype
        batch_size = features[0].shape[0]
        temb = self.embed_timesteps(timestep, batch_size, features[0].device, dtype)

        base = max(f.shape[-2] for f in features), max(f.shape[-1] for f in features)
        size = (int(round(base[0] * self.config.feature_scale)), int(round(base[1] * self.config.feature_scale)))
        weights = torch.softmax(self.mixing_weights, dim=0)
        mixed = None
        for i, (feature, block) in enumerate(zip(features, self.bottleneck_layers)):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = self._gradient_checkpointing_func(block, feature.to(dtype), temb, size)
            else:
                out = block(feature.to(dtype), temb, size)
            out = weights[i] * out
            mixed = out if mixed is None else mixed + out
        sample = self.head(mixed)
        if self.config.output_activation == "tanh":
            sample = torch.tanh(sample)
        if not return_dict:
            return (sample,)
        return ReadoutProbeOutput(sample=sample)
