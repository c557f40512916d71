"""Model families and the megatron-core models built from a config.

Every family is a folder (``llama/``, ``qwen2/``, ``qwen3/``, ``mixtral/``) whose ``__init__.py``
registers a :class:`ModelFamily` subclass with :func:`register`: its name, TransformerConfig
architecture fields, config rules, Hugging Face names and weight mapping, and which servers
load its exports (see :mod:`megatron_forge.models.registry`). Every other part of the
package asks the registry about families (:func:`get_family`, :func:`family_for_architecture`,
:func:`check_model_config`); none keeps its own list.

Adding a family means adding its folder and naming it in :data:`FAMILY_PACKAGES` below.
The imports are explicit, not a scan of the subpackages, so that which families exist is
visible here and to tools that read imports (a test checks that every folder is listed).
Any import of ``megatron_forge.models`` or of one of its modules runs this file first, so
the registry is complete whatever was imported.

:func:`build_transformer_config` and :func:`build_model` turn the whole config into
megatron-core GPTModel chunks for this rank's pipeline stage(s). The weight-mapping
primitives (:class:`~megatron_forge.models.mapping.Rule`, QKV grouping, SwiGLU gate/up,
vocabulary padding) are in :mod:`megatron_forge.models.mapping`.
"""

from megatron_forge.models import deepseek_v3, llama, mixtral, qwen2, qwen3, qwen3_moe
from megatron_forge.models.build import (
    build_model,
    build_transformer_config,
    padded_vocab_size,
    transformer_engine_available,
)
from megatron_forge.models.registry import (
    ModelFamily,
    Serving,
    check_model_config,
    families,
    family_for_architecture,
    family_names,
    get_family,
    register,
)

FAMILY_PACKAGES = (llama, qwen2, qwen3, mixtral, qwen3_moe, deepseek_v3)
"""The family folders: importing one registers its family."""

__all__ = [
    "FAMILY_PACKAGES",
    "ModelFamily",
    "Serving",
    "build_model",
    "build_transformer_config",
    "check_model_config",
    "families",
    "family_for_architecture",
    "family_names",
    "get_family",
    "padded_vocab_size",
    "register",
    "transformer_engine_available",
]
