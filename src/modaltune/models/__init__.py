"""Models (plain nn.Modules, no I/O) behind a small registry."""

from modaltune.models.registry import (
    ModelDims,
    available_models,
    build_model,
    model_objective,
    needs_slides,
    needs_text,
    positional_grid,
    register_model,
)

__all__ = ["ModelDims", "available_models", "build_model", "model_objective", "needs_slides", "needs_text",
           "positional_grid", "register_model"]
