"""The transformers quantizer that makes from_pretrained load compressed folders.

A compressed folder's config.json carries a `quantization_config` with `quant_method: "moe_compress"` and the shape of
every compressed experts module. Registering a quantization config and an HfQuantizer for that method (transformers'
own extension point, as compressed-tensors uses) makes `AutoModelForCausalLM.from_pretrained(folder)` swap in
SharedCoreExperts before the weights load.

Importing this module registers both, so it must stay light: the start-up hook (moe_compress.autoload) imports it
the moment transformers imports `transformers.quantizers`, and lm-eval reads quantization configs right after.
SharedCoreExperts is imported only when a model is actually loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moe_compress.folder.marking import mark_compressed

QUANT_METHOD = "moe_compress"


@register_quantization_config(QUANT_METHOD)
class SharedCoreConfig(QuantizationConfigMixin):
    """What config.json records of a compression: each experts module's form and ranks, the settings, the stats."""

    def __init__(self, modules: dict[str, dict], compression: dict | None = None, stats: dict | None = None,
                 **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.modules = modules
        self.compression = compression or {}
        self.stats = stats or {}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "modules": self.modules, "compression": self.compression,
                "stats": self.stats}


@register_quantizer(QUANT_METHOD)
class SharedCoreQuantizer(HfQuantizer):
    """Loads compressed folders; compressing happens in moe_compress.compress, never inside from_pretrained."""

    requires_calibration = True
    quantization_config: SharedCoreConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        swap_in_shared_core(model, self.quantization_config.modules)
        mark_compressed(model.config)  # so that saving the loaded model writes a compressed folder again

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:  # the compressed model is trained directly (distillation), no adapters
        return True


def swap_in_shared_core(model: nn.Module, modules: dict[str, dict]) -> None:
    """Replace the named experts modules by empty SharedCoreExperts of the recorded shapes."""
    from moe_compress.experts import ModuleSpec, SharedCoreExperts

    for name, spec in modules.items():
        parent, _, child = name.rpartition(".")
        experts = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, SharedCoreExperts.empty(experts, ModuleSpec.from_dict(spec)))
