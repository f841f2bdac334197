"""Models: a registry of plain nn.Modules, shared blocks, one file per family."""

from bloodcell.models.registry import (
    count_params_keras,
    count_params_trainable,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = [
    "count_params_keras", "count_params_trainable", "create_model", "get_spec", "list_models", "register_model",
]
