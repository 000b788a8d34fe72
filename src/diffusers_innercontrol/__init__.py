# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""InnerControl for diffusers: readout probes on UNet decoder features, and ControlNet training with
reward and alignment losses (Eq. 8 of "Heeding the inner voice")."""

__version__ = "0.1.0"

# diffusers' loader looks up `ModelMixin` in the top-level namespace of a pipeline component's library
# (model_index.json records ["diffusers_innercontrol", "ReadoutProbe"]): keep it exported here.
from diffusers.models.modeling_utils import ModelMixin

from .annotators import load_annotator
from .convert import load_readout_guidance_checkpoint
from .features import DecoderFeatureExtractor, decoder_feature_channels, split_guidance_batch
from .models.readout_probe import ReadoutProbe, ReadoutProbeOutput
from .palette import ade20k_palette, classes_to_control, control_to_classes
from .pipeline_readout import ReadoutPipelineOutput, StableDiffusionControlNetReadoutPipeline
from .probe_eval import BucketErrors, evaluate_probe
from .rewards import load_reward_model
from .tasks import Task, get_task, list_tasks
from .toy import ShapesWorld, save_tiny_reward_model, write_word_tokenizer  # the toy world, re-exported

__all__ = [
    "ModelMixin",
    "ReadoutProbe",
    "ReadoutProbeOutput",
    "DecoderFeatureExtractor",
    "decoder_feature_channels",
    "split_guidance_batch",
    "Task",
    "get_task",
    "list_tasks",
    "load_readout_guidance_checkpoint",
    "load_annotator",
    "ade20k_palette",
    "classes_to_control",
    "control_to_classes",
    "load_reward_model",
    "save_tiny_reward_model",
    "StableDiffusionControlNetReadoutPipeline",
    "ReadoutPipelineOutput",
    "BucketErrors",
    "evaluate_probe",
    "ShapesWorld",
    "write_word_tokenizer",
]
