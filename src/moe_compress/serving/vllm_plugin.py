"""The vLLM plugin: vLLM serves compressed folders as they are, with the experts in their shared-core form.

Installed as a `vllm.general_plugins` entry point (pyproject.toml), which every vLLM process loads: `register()` adds
a quantization config for `quant_method: moe_compress`, the method a compressed folder's config.json names. That
config gives each compressed experts layer a fused-MoE method that registers our cores and factors on vLLM's layer,
loads them from the folder (moe_compress.vllm_layout says how the names are mapped) and runs the forward in plain
torch with SharedCoreExperts' algebra; on the CPU its float tensors are then laid out in their stead for the fastest
products torch has (moe_compress.cpu_matmul: the shared ones for oneDNN's matmul, the per-expert factors as
embedding_bag's tables, which decoding reads pair by pair in one call). Every other layer (attention, router, norms,
embeddings) stays vLLM's own.

Supported: vLLM 0.32 (the MoE interfaces, RoutedExperts and FusedMoEMethodBase.apply, change between minor
versions), forms wrapped, delta and basis (one for all projections or one per projection, as mixed has), one GPU or
CPU process per model copy (data parallel without expert parallel is fine). Tensor and expert parallelism are refused
with a one-line error, as are other forms and activations.

This module imports vLLM; nothing else in the package does, so moe-compress works where vLLM is not installed.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper
from vllm.version import __version__ as vllm_version

from moe_compress.experts import ModuleSpec
from moe_compress.folder.quantizer import QUANT_METHOD
from moe_compress.serving.vllm_layout import checkpoint_renames, layer_tensors, new_projections, routed_forward

SUPPORTED_VLLM = ("0.32",)  # minor versions this plugin was written and tested against


def register() -> None:
    """The entry point vLLM calls in each of its processes; registering twice is harmless."""
    register_quantization_config(QUANT_METHOD)(SharedCoreVllmConfig)


def check_version() -> None:
    minor = ".".join(vllm_version.split(".")[:2])
    if minor not in SUPPORTED_VLLM:
        raise RuntimeError(f"moe-compress's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}, not "
                           f"{vllm_version} (its MoE interfaces change between minor versions); "
                           f"pip install 'vllm=={SUPPORTED_VLLM[-1]}.*'")


class SharedCoreVllmConfig(QuantizationConfig):
    """A compressed folder's quantization_config as vLLM reads it: which experts layers are compressed, and how."""

    def __init__(self, modules: dict[str, ModuleSpec]):
        super().__init__()
        self.modules = modules
        self.ckpt_names: set[tuple[str, str, str | None]] = set()  # of the compressed layers, seen as vLLM builds them

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain torch: any GPU, and CPUs

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # all of it is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SharedCoreVllmConfig:
        check_version()
        return cls({name: ModuleSpec.from_dict(spec) for name, spec in config["modules"].items()})

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        self.modules = {hf_to_vllm_mapper.map_name(name) or name: spec for name, spec in self.modules.items()}

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            spec = self.modules.get(prefix)
            if spec is None:  # an experts layer the compression left dense
                return UnquantizedFusedMoEMethod(layer.moe_config)
            self.ckpt_names.add((layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name, layer.ckpt_up_proj_name))
            return SharedCoreMoEMethod(layer.moe_config, spec, prefix)
        return None

    def get_cache_scale_mapper(self) -> WeightsMapper:
        """Ours first: vLLM maps every name ending in .q_scale, .k_scale or .v_scale onto the attention's KV-cache
        scales, and would take the scales of our integer `v` factors for them (never loaded, with no warning)."""
        return self.experts_renames() | super().get_cache_scale_mapper()

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """vLLM's own renames, and ours of the compressed experts' tensors (moe_compress.serving.vllm_layout)."""
        return super().get_checkpoint_weight_mapper() | self.experts_renames()

    def experts_renames(self) -> WeightsMapper:
        if len(self.ckpt_names) > 1:
            raise ValueError(f"the experts layers of this model name their projections in several ways "
                             f"({sorted(self.ckpt_names)}); moe-compress's vLLM plugin maps one naming only")
        names = next(iter(self.ckpt_names), ("gate_proj", "down_proj", "up_proj"))
        return WeightsMapper(orig_to_new_regex=checkpoint_renames(*names))


class SharedCoreMoEMethod(FusedMoEMethodBase):
    """One compressed experts layer in vLLM: our projections' tensors as the layer's parameters, our forward."""

    def __init__(self, moe: FusedMoEConfig, spec: ModuleSpec, prefix: str):
        super().__init__(moe)
        parallel = moe.moe_parallel_config
        if parallel.use_ep or parallel.ep_size > 1:
            raise ValueError(f"{prefix}: expert parallelism is not supported by moe-compress's vLLM plugin; serve "
                             "without --enable-expert-parallel")
        if parallel.tp_size > 1:
            raise ValueError(f"{prefix}: tensor parallelism (tp_size={parallel.tp_size}) is not supported by "
                             "moe-compress's vLLM plugin; serve with --tensor-parallel-size 1 (data parallel works)")
        self.spec, self.prefix = spec, prefix
        self.projections: dict = {}

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        if (hidden_size, intermediate_size_per_partition) != (self.moe.hidden_dim_unpadded,
                                                             self.moe.intermediate_size_per_partition_unpadded):
            raise ValueError(f"{self.prefix}: vLLM pads this layer's sizes, which moe-compress's vLLM plugin does not "
                             "support; serve on another backend or platform")
        self.projections = new_projections(self.spec, num_experts, hidden_size, intermediate_size_per_partition,
                                           layer.activation.value, self.moe.has_bias, params_dtype, self.prefix)
        for name, tensor in layer_tensors(self.projections).items():
            # every tensor a parameter of the layer, buffers too (the expert -> core map, integer codes and scales):
            # vLLM's loader fills only parameters. The parameter shares the projection's storage, which it fills.
            param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor,
                                                                                             requires_grad=False)
            param.weight_loader = load_whole
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """A layer whose tensors the folder filled only in part would serve garbage (vLLM skips names it maps
        elsewhere without a word): refused. One filled by none of them is dummy weights (--load-format dummy)."""
        names = layer_tensors(self.projections)
        missing = [name for name in names if not getattr(getattr(layer, name), "loaded_from_folder", False)]
        if missing and len(missing) < len(names):
            raise ValueError(f"{self.prefix}: vLLM did not load {', '.join(missing)} from the folder; the folder "
                             "was written by another moe-compress version or renamed by another vLLM mapping")
        # the layer's parameters wrap our buffers (codes, scales) in tensors of their own: values loaded anew into a
        # packed placeholder went to the parameter's new storage, which the buffer takes before packing
        for name, tensor in names.items():
            param = getattr(layer, name)
            if param is not tensor and param.data_ptr() != tensor.data_ptr():
                tensor.data = param.data
        # on the CPU, the float tensors laid out for oneDNN's matmul or as embedding_bag's tables instead (cpu_matmul),
        # and the 4-bit ones in torch's int4 kernel's, which reads the codes as they are
        for projection in self.projections.values():
            projection.pack_for_cpu_()
        for name, tensor in layer_tensors(self.projections).items():  # so that the packed storage is freed
            param = getattr(layer, name)
            if param is not tensor:
                param.data = tensor.data

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig | None:
        return None

    def apply(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any, shared_experts_input: torch.Tensor | None) -> torch.Tensor:
        # shared experts, where a model has them, are run by vLLM's MoE runner, not here
        return routed_forward(self.projections, layer.activation.value, x, topk_weights, topk_ids)


def load_whole(param: torch.Tensor, loaded_weight: torch.Tensor, weight_name: str = "", shard_id: str | None = None,
               expert_id: int | None = None, return_success: bool = False) -> bool | None:
    """vLLM's expert loader hands one expert's slice; ours are renamed onto expert 0 (vllm_layout) and come whole,
    all experts stacked, or a core that belongs to no expert."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"{weight_name}: the folder holds shape {tuple(loaded_weight.shape)}, the layer expects "
                         f"{tuple(param.shape)}; the folder's quantization_config does not match its weights")
    if param.numel() > 1 and not any(param.stride()):  # a placeholder of a tensor packed for the CPU: loaded anew
        param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device)  # (re-packed after loading)
    param.data.copy_(loaded_weight)
    param.loaded_from_folder = True
    return True if return_success else None
