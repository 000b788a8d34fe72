# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""InnerControl for diffusers: readout probes on UNet decoder features, and ControlNet training with
reward and alignment losses (Eq. 8 of "Heeding the inner voice")."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

# Every public name is imported on first use (PEP 562), so that `diffusers_innercontrol.tasks` or `.cli` load
# without torch and diffusers: the training scripts check `--task` with argparse before those heavy imports.
# diffusers' loader looks up `ModelMixin` on this module (model_index.json records
# ["diffusers_innercontrol", "ReadoutProbe"]); `getattr` finds it here like every other name.
_EXPORTS = {
    "ModelMixin": "diffusers.models.modeling_utils",
    "ReadoutProbe": ".models.readout_probe",
    "ReadoutProbeOutput": ".models.readout_probe",
    "DecoderFeatureExtractor": ".features",
    "decoder_feature_channels": ".features",
    "split_guidance_batch": ".features",
    "Task": ".tasks",
    "get_task": ".tasks",
    "list_tasks": ".tasks",
    "load_readout_guidance_checkpoint": ".convert",
    "load_annotator": ".annotators",
    "ade20k_palette": ".palette",
    "classes_to_control": ".palette",
    "control_to_classes": ".palette",
    "load_reward_model": ".rewards",
    "save_tiny_reward_model": ".toy",
    "StableDiffusionControlNetReadoutPipeline": ".pipeline_readout",
    "StableDiffusionXLControlNetReadoutPipeline": ".pipeline_readout",
    "ReadoutPipelineOutput": ".pipeline_readout",
    "BucketErrors": ".probe_eval",
    "evaluate_probe": ".probe_eval",
    "ShapesWorld": ".toy",  # the toy world, re-exported
    "write_word_tokenizer": ".toy",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # what IDEs and type checkers see
    from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

    from .annotators import load_annotator  # noqa: F401
    from .convert import load_readout_guidance_checkpoint  # noqa: F401
    from .features import DecoderFeatureExtractor, decoder_feature_channels, split_guidance_batch  # noqa: F401
    from .models.readout_probe import ReadoutProbe, ReadoutProbeOutput  # noqa: F401
    from .palette import ade20k_palette, classes_to_control, control_to_classes  # noqa: F401
    from .pipeline_readout import (  # noqa: F401
        ReadoutPipelineOutput,
        StableDiffusionControlNetReadoutPipeline,
        StableDiffusionXLControlNetReadoutPipeline,
    )
    from .probe_eval import BucketErrors, evaluate_probe  # noqa: F401
    from .rewards import load_reward_model  # noqa: F401
    from .tasks import Task, get_task, list_tasks  # noqa: F401
    from .toy import ShapesWorld, save_tiny_reward_model, write_word_tokenizer  # noqa: F401
