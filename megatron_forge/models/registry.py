"""The model family registry: the one place that lists the families megatron-forge trains,
exports and serves, and what each of them is.

A family is a folder under megatron_forge/models/ whose ``__init__.py`` subclasses
:class:`ModelFamily` and decorates the class with :func:`register`. The class states all
that the rest of the package asks of a family:

- ``name``: its value of ``model.family``;
- ``moe``: whether its MLP is a routed mixture of experts; :meth:`ModelFamily.check_config`
  turns it into the config rule (MoE families need model.num_experts >= 2, dense ones
  refuse it) and a family may add rules of its own;
- :meth:`~ModelFamily.transformer_fields`: its megatron-core TransformerConfig fields;
- ``hf_architecture`` and ``hf_model_type``: its Hugging Face ``architectures[0]`` and
  ``model_type``; :meth:`~ModelFamily.hf_config`, :meth:`~ModelFamily.model_fields` and
  :meth:`~ModelFamily.weight_rules`: config.json from a ModelConfig, ModelConfig fields from
  a config.json, and the weight mapping (built from :mod:`megatron_forge.models.mapping`);
- ``serving`` (:class:`Serving`): whether vLLM and TensorRT-LLM serve its Hugging Face
  export and whether ``forge-convert to-trtllm`` supports it, with
  :meth:`~ModelFamily.trtllm_config` for its own TensorRT-LLM config fields.
- ``hf_fp32_modules`` (optional): the weights its Hugging Face model keeps in fp32, which
  the export never narrows.

:func:`register` checks the class as it is defined, at import: a missing method or
attribute, or a name, architecture or model_type that another family already has, raises
then, not when a user first converts a checkpoint.

Configs name a family as a plain string (the config layer sits below models/);
:func:`check_model_config` checks it against this registry, with the family's rules.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from megatron_forge.config import ModelConfig
from megatron_forge.errors import ConfigError, ConvertError
from megatron_forge.models.mapping import Rule

NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Serving:
    """Which servers load a family's exports."""

    vllm: bool
    """vLLM serves the Hugging Face export (``vllm serve DIR``)."""
    trtllm: bool
    """TensorRT-LLM's PyTorch backend serves the Hugging Face export (``trtllm-serve DIR``)."""
    trtllm_checkpoint: bool
    """``forge-convert to-trtllm`` writes a TensorRT-LLM checkpoint for ``trtllm-build``."""


class ModelFamily(ABC):
    """What a model family provides. Subclass it once per family, set every class
    attribute below, implement every abstract method, and decorate with :func:`register`.
    Families share code through functions (see llama/hf.py), not by subclassing each
    other, so that a method a family forgot is reported missing, not inherited."""

    name: ClassVar[str]
    """``model.family`` in configs: lowercase letters, digits and underscores."""
    moe: ClassVar[bool]
    """True when the MLP is a routed mixture of experts (model.num_experts)."""
    hf_architecture: ClassVar[str]
    """Hugging Face ``architectures[0]`` of the exports, e.g. ``LlamaForCausalLM``."""
    hf_model_type: ClassVar[str]
    """Hugging Face ``model_type`` of the exports, e.g. ``llama``."""
    serving: ClassVar[Serving]
    hf_fp32_modules: ClassVar[tuple[str, ...]] = ()
    """Hugging Face weights its model keeps in fp32 whatever dtype it is loaded in
    (transformers' ``_keep_in_fp32_modules_strict``, e.g. a router's bias); the export
    writes them in fp32 under ``--dtype bf16`` too, so no precision is lost on the way.
    A name matches as a whole dotted component run: ``gate.weight`` matches
    ``model.layers.3.mlp.gate.weight``, not ``gate_proj.weight``."""

    def keeps_fp32(self, hf_name: str) -> bool:
        """Whether the export writes ``hf_name`` in fp32 (see ``hf_fp32_modules``)."""
        return any(
            re.search(rf"(^|\.){re.escape(module)}($|\.)", hf_name)
            for module in self.hf_fp32_modules
        )

    @abstractmethod
    def transformer_fields(self, model: ModelConfig) -> dict[str, Any]:
        """megatron-core TransformerConfig fields that define the architecture (the
        layout, dtype and performance fields are added by models.build)."""

    @abstractmethod
    def hf_config(self, model: ModelConfig, vocab_size: int) -> dict[str, Any]:
        """config.json fields of the export, ``architectures`` and ``model_type`` included
        (token ids and dtype are added by the exporter)."""

    @abstractmethod
    def model_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        """The model section of a megatron-forge config for a Hugging Face config.json,
        ``family`` included; raises ConvertError for what the family cannot express."""

    @abstractmethod
    def weight_rules(self, model: ModelConfig, vocab_size: int, padded_vocab: int) -> list[Rule]:
        """Every weight of the model as megatron <-> Hugging Face rules, in write order;
        ``vocab_size`` rows in HF, ``padded_vocab`` in megatron."""

    def check_config(self, model: ModelConfig) -> None:
        """Raise ConfigError when ``model`` breaks a rule of this family. The rule every
        family has: MoE families need model.num_experts >= 2, dense ones refuse it.
        Override (calling this) to add rules."""
        if self.moe:
            if model.num_experts is None or model.num_experts < 2:
                raise ConfigError(
                    f"model.family={self.name} needs model.num_experts >= 2 (got "
                    f"{model.num_experts}); set model.num_experts, e.g. model.num_experts=8"
                )
        elif model.num_experts is not None:
            moe = [f.name for f in families() if f.moe]
            raise ConfigError(
                f"model.num_experts={model.num_experts} is set for family={self.name}, a "
                f"dense family; use an MoE family ({', '.join(moe) or 'none registered'}) "
                "or remove model.num_experts"
            )

    def trtllm_config(self, model: ModelConfig) -> dict[str, Any]:
        """Fields this family adds to (or changes in) the TensorRT-LLM checkpoint's
        config.json; none by default."""
        return {}

    def __repr__(self) -> str:
        return f"<model family {self.name!r} ({type(self).__module__})>"


REQUIRED_ATTRIBUTES: dict[str, type] = {
    "name": str,
    "moe": bool,
    "hf_architecture": str,
    "hf_model_type": str,
    "serving": Serving,
}
UNIQUE_ATTRIBUTES = ("name", "hf_architecture", "hf_model_type")


class Registry:
    """Families by name, in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, ModelFamily] = {}

    def register(self, cls: type[ModelFamily]) -> type[ModelFamily]:
        """Check ``cls`` against :class:`ModelFamily` and add it; a class decorator."""
        if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
            raise TypeError(f"{cls!r} is not a ModelFamily subclass")
        where = f"{cls.__module__}.{cls.__qualname__}"
        missing = sorted(cls.__abstractmethods__)
        wrong = []
        for attr, kind in REQUIRED_ATTRIBUTES.items():
            value = getattr(cls, attr, None)
            if value is None:
                missing.append(attr)
            elif not isinstance(value, kind):
                wrong.append(f"{attr}={value!r} is not a {kind.__name__}")
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + wrong
        if problems:
            raise TypeError(f"model family {where} cannot be registered: {'; '.join(problems)}")
        if not NAME.fullmatch(cls.name):
            raise ValueError(
                f"model family {where}: name={cls.name!r} must be lowercase letters, digits "
                "and underscores (it is the value of model.family)"
            )
        for other in self._families.values():
            for attr in UNIQUE_ATTRIBUTES:
                if getattr(other, attr) == getattr(cls, attr):
                    raise ValueError(
                        f"model family {where}: {attr}={getattr(cls, attr)!r} is already "
                        f"registered by {type(other).__module__}.{type(other).__qualname__}"
                    )
        self._families[cls.name] = cls()
        return cls

    def names(self) -> list[str]:
        return list(self._families)

    def families(self) -> list[ModelFamily]:
        return list(self._families.values())

    def get(self, name: str) -> ModelFamily:
        """The family called ``name``; ConfigError naming model.family if none is."""
        if name not in self._families:
            raise ConfigError(
                f"model.family={name!r} is not a registered family; known: {self.names()}"
            )
        return self._families[name]

    def for_architecture(self, architecture: str) -> ModelFamily:
        """The family whose Hugging Face exports are ``architecture`` (LlamaForCausalLM...)."""
        for family in self._families.values():
            if family.hf_architecture == architecture:
                return family
        known = [f.hf_architecture for f in self._families.values()]
        raise ConvertError(f"unknown architecture {architecture!r}; supported: {known}")


REGISTRY = Registry()
register = REGISTRY.register


def families() -> list[ModelFamily]:
    """Every registered family, in registration order."""
    return REGISTRY.families()


def family_names() -> list[str]:
    return REGISTRY.names()


def get_family(name: str) -> ModelFamily:
    """The family ``model.family=name`` selects; ConfigError listing the known ones."""
    return REGISTRY.get(name)


def family_for_architecture(architecture: str) -> ModelFamily:
    """The family of a Hugging Face ``architectures[0]``; ConvertError if none."""
    return REGISTRY.for_architecture(architecture)


def check_model_config(model: ModelConfig) -> None:
    """ConfigError unless ``model.family`` is registered and ``model`` follows its rules.
    Entry points call it with the rest of the validation, before submitting or
    allocating anything; models.build calls it too."""
    get_family(model.family).check_config(model)
