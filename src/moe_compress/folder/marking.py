"""How a compressed folder's config.json differs from its base model's: a model type of its own, the base type beside
it, and an auto_map naming the trust_remote_code shim written next to it (folder/config.py says why). In memory, a
compressed model's config is of a subclass of its base config class that differs only in what it writes, so that every
save, Trainer checkpoints included, writes a folder that stays protected.

Importing this module must stay light (no torch): the start-up hook imports it with folder/config.py.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "moe_compress"
SHIM = "configuration_moe_compress"
SHIM_SOURCE = '''"""A model compressed by moe-compress: its experts are stored as shared cores and low-rank factors.

With moe-compress installed, AutoModelForCausalLM.from_pretrained(folder) loads it as it is. This file lets
trust_remote_code=True load it where the package's start-up hook is not active, and says what is missing where the
package is not installed.
"""
try:
    from moe_compress.folder.config import CompressedConfig
except ImportError:
    raise ImportError("this model was compressed by moe-compress, which is not installed here; run "
                      "`pip install moe-compress`, or load its dense export (`moe-compress export`)") from None
'''


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
