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
writes a folder that stays protected (marking.py).

Importing this module must stay light (no torch): the start-up hook imports it as soon as transformers' AutoConfig
is imported.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

from moe_compress.folder.marking import MODEL_TYPE, compressed_config_class


class CompressedConfig(PretrainedConfig):
    """What AutoConfig knows `model_type: moe_compress` by: it reads the folder as its base model's config."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        import moe_compress.folder.quantizer  # noqa: F401  (registers the quantizer before the model loads)

        base = config_dict.get("base_model_type")
        if base not in CONFIG_MAPPING:
            raise ValueError(
                f"this moe-compress folder's config.json names base_model_type={base!r}, which this transformers "
                "does not know; upgrade transformers, or recompress the model with this version"
            )
        plain = {k: v for k, v in config_dict.items() if k not in ("base_model_type", "auto_map")}
        return compressed_config_class(CONFIG_MAPPING[base]).from_dict({**plain, "model_type": base}, **kwargs)


AutoConfig.register(MODEL_TYPE, CompressedConfig, exist_ok=True)
