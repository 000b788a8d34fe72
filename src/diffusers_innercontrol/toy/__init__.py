# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The toy world, apart from the method: ShapesWorld (`shapesworld`), the bundled ShapesWorld models and the
quickstart's defaults (`quickstart`, `assets/shapesworld`), the tiny offline models and reward models for tests
and demos (`tiny`), and the demo (`demo`). The core package imports nothing from here."""

from .shapesworld import ShapesWorld, write_word_tokenizer
from .tiny import build_tiny_components, save_tiny_pipeline, save_tiny_reward_model

__all__ = ["ShapesWorld", "write_word_tokenizer", "build_tiny_components", "save_tiny_pipeline", "save_tiny_reward_model"]
