# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Capture of UNet decoder features with forward hooks (docs/method.md, "The probe").

"resnet": the residual branch (the output of `conv2`, before the skip add) of every
`unet.up_blocks[i].resnets[j]`. "attention": the output of `transformer_blocks[0].attn1` (after its
output projection, before the residual add) of every `unet.up_blocks[i].attentions[j]`, reshaped
from `(B, H*W, C)` to `(B, C, H, W)`.

No `forward` is replaced: plain `register_forward_hook`s, removed on exit. Features keep their autograd
graph so that a loss on them reaches a ControlNet through the frozen UNet.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

FEATURE_KINDS = ("resnet", "attention")


def _check_kind(kind: str):
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown feature kind {kind!r}: choose one of {FEATURE_KINDS}.")


def _unwrap(unet: nn.Module) -> nn.Module:
    # accelerate / DDP / torch.compile wrappers keep the real model in `.module` or `._orig_mod`.
    while True:
        if hasattr(unet, "module") and isinstance(unet.module, nn.Module) and not hasattr(unet, "up_blocks"):
            unet = unet.module
        elif hasattr(unet, "_orig_mod"):
            unet = unet._orig_mod
        else:
            return unet


def decoder_feature_modules(unet: nn.Module, kind: str) -> List[Tuple[nn.Module, Optional[nn.Module]]]:
    """The hooked modules in capture order: `(module, owner)`; `owner` is the Transformer2DModel for attention."""
    _check_kind(kind)
    unet = _unwrap(unet)
    if not hasattr(unet, "up_blocks"):
        raise TypeError(f"{type(unet).__name__} has no `up_blocks`: decoder features need a UNet2DConditionModel.")
    modules = []
    for block in unet.up_blocks:
        if kind == "resnet":
            for resnet in block.resnets:
                modules.append((resnet.conv2, None))
        else:
            for attention in getattr(block, "attentions", None) or []:
                modules.append((attention.transformer_blocks[0].attn1, attention))
    if not modules:
        raise ValueError(f"This UNet's decoder has no '{kind}' layers to read features from.")
    return modules


def decoder_feature_channels(unet: nn.Module, kind: str) -> List[int]:
    """Channels of every captured feature map, in capture order: what `ReadoutProbe(feature_channels=...)` needs."""
    channels = []
    for module, _ in decoder_feature_modules(unet, kind):
        if kind == "resnet":
            channels.append(module.out_channels)
        else:
            out = module.to_out[0]
            channels.append(out.out_features)
    return channels


def check_probe_fits_unet(unet: nn.Module, feature_kind: str, feature_channels, who: str = "The probe",
                          fix: str = "Train a probe on this UNet (train_probe.py).") -> None:
    """
    The one check that a probe (or a checkpoint to convert) reads features this UNet gives: the decoder has
    `feature_kind` layers and their channels are `feature_channels`. Raises `ValueError` naming `who`, what differs,
    the other feature kind when the channels are its, and `fix`.
    """
    try:
        channels = decoder_feature_channels(unet, feature_kind)
    except ValueError as err:
        raise ValueError(f"{who} reads '{feature_kind}' features but {str(err)[0].lower()}{str(err)[1:]} {fix}") from None
    if [int(c) for c in feature_channels] == channels:
        return
    other = "attention" if feature_kind == "resnet" else "resnet"
    try:
        fits_other = [int(c) for c in feature_channels] == decoder_feature_channels(unet, other)
    except ValueError:
        fits_other = False
    hint = f"They are this UNet's '{other}' features: use feature_kind='{other}'." if fits_other else (
        "It was trained on another UNet.")
    raise ValueError(
        f"{who} reads '{feature_kind}' features with channels {[int(c) for c in feature_channels]}, but this UNet's "
        f"are {channels}. {hint} {fix}"
    )


class DecoderFeatureExtractor:
    r"""
    Context manager that captures UNet decoder features with forward hooks.

    ```py
    with DecoderFeatureExtractor(unet, "resnet") as extractor:
        noise_pred = unet(noisy_latents, t, encoder_hidden_states).sample
    features = extractor.features  # list of (B, C, H, W) tensors, graph kept
    ```

    Features are collected per UNet forward: each new forward of `unet` starts a new list. Calls of the
    hooked layers outside a UNet forward (the recomputation of gradient checkpointing during backward)
    are ignored, so features are captured exactly once per forward.

    Args:
        unet (`UNet2DConditionModel`): The UNet to read.
        kind (`str`): `"resnet"` or `"attention"`.
        detach (`bool`, defaults to `False`): Detach the captured features (stage-1 probe training).
        on_forward (`Callable`, *optional*): Called with the feature list after every UNet forward.
    """

    def __init__(self, unet: nn.Module, kind: str = "resnet", detach: bool = False, on_forward: Optional[Callable] = None):
        _check_kind(kind)
        self.unet = _unwrap(unet)
        self.kind = kind
        self.detach = detach
        self.on_forward = on_forward
        self.features: List[torch.Tensor] = []
        self._handles = []
        self._armed = False
        self._spatial = {}

    @property
    def feature_channels(self) -> List[int]:
        return decoder_feature_channels(self.unet, self.kind)

    # hooks -------------------------------------------------------------------------------------
    def _unet_pre(self, module, args):
        self.features = []
        self._spatial = {}
        self._armed = True

    def _unet_post(self, module, args, output):
        self._armed = False
        if self.on_forward is not None:
            self.on_forward(self.features)

    def _owner_pre(self, index):
        def hook(module, args, kwargs):
            if self._armed:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._spatial[index] = hidden.shape[-2:]

        return hook

    def _capture(self, index):
        def hook(module, args, output):
            if not self._armed:
                return
            if isinstance(output, tuple):
                output = output[0]
            if self.kind == "attention":
                if output.ndim == 3:
                    height, width = self._spatial[index]
                    batch, tokens, channels = output.shape
                    output = output.transpose(1, 2).reshape(batch, channels, height, width)
            if self.detach:
                output = output.detach()
            self.features.append(output)

        return hook

    def register(self) -> "DecoderFeatureExtractor":
        if self._handles:
            return self
        try:
            self._handles.append(self.unet.register_forward_pre_hook(self._unet_pre))
            self._handles.append(self.unet.register_forward_hook(self._unet_post))
            for index, (module, owner) in enumerate(decoder_feature_modules(self.unet, self.kind)):
                if owner is not None:
                    self._handles.append(owner.register_forward_pre_hook(self._owner_pre(index), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._capture(index)))
        except Exception:
            self.remove()
            raise
        return self

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "DecoderFeatureExtractor":
        return self.register()

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        return False

    def pop(self) -> List[torch.Tensor]:
        """Return the features of the last forward and forget them."""
        features, self.features = self.features, []
        return features


def split_guidance_batch(features: List[torch.Tensor], num_chunks: int = 2, keep: int = -1) -> List[torch.Tensor]:
    """Under classifier-free guidance the captured batch is `[uncond, cond]`: keep one half (the conditional by default)."""
    return [f.chunk(num_chunks)[keep] for f in features]
