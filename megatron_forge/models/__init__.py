"""Model families, registered explicitly in :data:`FAMILIES`.

A family is a folder (``llama/``, ``mixtral/``) whose ``model.py`` returns the
TransformerConfig fields that define the architecture. :func:`build_model` turns the
whole config into megatron-core GPTModel chunks for this rank's pipeline stage(s).
"""

from megatron_forge.models.build import (
    FAMILIES,
    build_model,
    build_transformer_config,
    padded_vocab_size,
    transformer_engine_available,
)

__all__ = [
    "FAMILIES",
    "build_model",
    "build_transformer_config",
    "padded_vocab_size",
    "transformer_engine_available",
]
