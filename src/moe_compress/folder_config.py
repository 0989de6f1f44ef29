"""The config.json of a compressed folder: a model type of its own, so that no loader mistakes it for the original.

A compressed Qwen3-MoE folder says `"model_type": "moe_compress"` and `"base_model_type": "qwen3_moe"`. Were it to say
qwen3_moe, a transformers without moe-compress would skip the unknown quantization method with a warning and fill
the experts with random values, a model that runs and is wrong. A model type it does not know stops it instead, and
the folder's `auto_map` names `configuration_moe_compress.py`, a shim written beside config.json, so that with
`trust_remote_code=True` it either loads (moe-compress installed) or says in one line to `pip install moe-compress`.

Where moe-compress is installed, its start-up hook (moe_compress.autoload) registers the model type with AutoConfig
as CompressedConfig, whose from_dict returns the base model's own config class: AutoModelForCausalLM picks the
original architecture, and the quantizer swaps in the compressed experts. In memory the config is of a subclass of
that class that differs only in what it writes (`mark_compressed`), so every save, Trainer checkpoints included,
writes a folder that stays protected.

Importing this module must stay light (no torch): the start-up hook imports it as soon as transformers' AutoConfig
is imported.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

MODEL_TYPE = "moe_compress"
SHIM = "configuration_moe_compress"
SHIM_SOURCE = '''"""A model compressed by moe-compress: its experts are stored as shared cores and low-rank factors.

With moe-compress installed, AutoModelForCausalLM.from_pretrained(folder) loads it as it is. This file lets
trust_remote_code=True load it where the package's start-up hook is not active, and says what is missing where the
package is not installed.
"""
try:
    from moe_compress.folder_config import CompressedConfig
except ImportError:
    raise ImportError("this model was compressed by moe-compress, which is not installed here; run "
                      "`pip install moe-compress`, or load its dense export (`moe-compress export`)") from None
'''


class CompressedConfig(PretrainedConfig):
    """What AutoConfig knows `model_type: moe_compress` by: it reads the folder as its base model's config."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        import moe_compress.quantizer  # noqa: F401  (registers the quantizer before the model loads)

        base = config_dict.get("base_model_type")
        if base not in CONFIG_MAPPING:
            raise ValueError(
                f"this moe-compress folder's config.json names base_model_type={base!r}, which this transformers "
                "does not know; upgrade transformers, or recompress the model with this version"
            )
        plain = {k: v for k, v in config_dict.items() if k not in ("base_model_type", "auto_map")}
        return compressed_config_class(CONFIG_MAPPING[base]).from_dict({**plain, "model_type": base}, **kwargs)


def mark_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A base model's config.json contents, as a compressed folder writes them."""
    base = config_dict["model_type"]
    if base == MODEL_TYPE:
        return config_dict
    return {**config_dict, "model_type": MODEL_TYPE, "base_model_type": base,
            "auto_map": {**config_dict.get("auto_map", {}), "AutoConfig": f"{SHIM}.CompressedConfig"}}


def write_shim(folder: str | os.PathLike) -> None:
    (Path(folder) / f"{SHIM}.py").write_text(SHIM_SOURCE)


class _WritesCompressed:
    """Mixed into a base config class: writes config.json as a compressed folder's, and the shim beside it."""

    def to_dict(self) -> dict[str, Any]:
        return mark_dict(super().to_dict())

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_shim(save_directory)

    def __reduce__(self) -> tuple:
        # The class is made at run time, so pickle cannot find it by name: it is remade from its base on loading
        # (vLLM, for one, pickles the config into its engine process)
        return _unpickle_compressed, (type(self).__bases__[1],), self.__dict__


def _unpickle_compressed(base: type[PretrainedConfig]) -> PretrainedConfig:
    cls = compressed_config_class(base)
    return cls.__new__(cls)


@functools.cache
def compressed_config_class(base: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """The base config class, writing as a compressed folder's. Its name stays the base's: transformers' auto classes
    map config classes to model classes by name, so the original architecture is picked."""
    if issubclass(base, _WritesCompressed):
        return base
    return type(base.__name__, (_WritesCompressed, base), {"__module__": __name__})


def mark_compressed(config: PretrainedConfig) -> None:
    """Make a model's config write compressed folders from now on (it reads and behaves as before)."""
    config.__class__ = compressed_config_class(type(config))


def unmark_compressed(model: Any) -> None:
    """Make a model whose experts are dense again save as a plain model of its base type: no quantization config,
    no quantizer, the base config class."""
    config = model.config
    config.__class__ = next(c for c in type(config).__mro__[1:] if c is not _WritesCompressed
                            and not issubclass(c, _WritesCompressed))
    del config.quantization_config
    model.hf_quantizer = None


AutoConfig.register(MODEL_TYPE, CompressedConfig, exist_ok=True)
