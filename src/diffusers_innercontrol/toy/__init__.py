# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""The toy world, apart from the method: ShapesWorld (`shapesworld`), the bundled ShapesWorld models and the
quickstart's defaults (`quickstart`, `assets/shapesworld`), the tiny offline models and reward models for tests
and demos (`tiny`), and the demo (`demo`). The core package imports nothing from here."""

from .._lazy import lazy_exports

# imported on first use (PEP 562): the quickstart's argument defaults load without torch and diffusers
_EXPORTS = {
    "ShapesWorld": ".shapesworld",
    "write_word_tokenizer": ".shapesworld",
    "build_tiny_components": ".tiny",
    "save_tiny_pipeline": ".tiny",
    "save_tiny_reward_model": ".tiny",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
