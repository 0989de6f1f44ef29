"""The vLLM plugin's own code (serving/vllm_plugin.py) in the main suite, where vLLM is not installed: its
registration, the config read from a compressed folder, the method it gives each layer, the weights it creates and
loads, and its forward, against a stand-in for the few vLLM 0.32 interfaces it uses.

The stand-in is not vLLM: it has the names, signatures and behaviour the plugin relies on (a registry of quantization
configs, WeightsMapper's regex renames, the layers' attributes), written from vLLM 0.32's sources. The real check,
vLLM serving a folder, is `.ci/vllm-check` (tests/test_vllm_serving.py); this one keeps the plugin from rotting
between its runs."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import moe_compress as mc

ROOT = Path(__file__).resolve().parents[1]
H, F = 32, 32  # hidden (conftest's tiny models), expert width


def stand_in_vllm(version: str) -> dict[str, ModuleType]:
    """Modules named as vLLM 0.32's, holding what the plugin imports from each."""
    registry: dict[str, type] = {}

    @dataclasses.dataclass
    class WeightsMapper:
        orig_to_new_regex: dict = dataclasses.field(default_factory=dict)

        def __or__(self, other):
            return WeightsMapper({**self.orig_to_new_regex, **other.orig_to_new_regex})

        def map_name(self, key: str) -> str:
            for pattern, new in self.orig_to_new_regex.items():
                if pattern.search(key):
                    key = pattern.sub(new, key)
            return key

    class QuantizationConfig:
        def __init__(self):
            self.packed_modules_mapping = {}

        def get_checkpoint_weight_mapper(self):
            return WeightsMapper()

        def get_cache_scale_mapper(self):  # vLLM's default rule: any name ending in .q/k/v_scale is attention's
            return WeightsMapper({re.compile(r"(?<!\.attn)\.([qkv])_scale$"): r".attn.\1_scale"})

    class QuantizeMethodBase:
        pass

    class FusedMoEMethodBase(QuantizeMethodBase):
        def __init__(self, moe):
            self.moe = moe

    class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
        pass

    def register_quantization_config(name):
        def register(cls):
            registry[name] = cls
            return cls
        return register

    names = {
        "vllm": {}, "vllm.version": {"__version__": version},
        "vllm.model_executor.layers.fused_moe": {"RoutedExperts": type("RoutedExperts", (torch.nn.Module,), {})},
        "vllm.model_executor.layers.fused_moe.config": {"FusedMoEConfig": object, "FusedMoEQuantConfig": object},
        "vllm.model_executor.layers.fused_moe.fused_moe_method_base": {"FusedMoEMethodBase": FusedMoEMethodBase},
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method": {
            "UnquantizedFusedMoEMethod": UnquantizedFusedMoEMethod},
        "vllm.model_executor.layers.linear": {"LinearBase": type("LinearBase", (torch.nn.Module,), {}),
                                              "UnquantizedLinearMethod": type("UnquantizedLinearMethod", (), {})},
        "vllm.model_executor.layers.quantization": {"register_quantization_config": register_quantization_config,
                                                    "registry": registry},
        "vllm.model_executor.layers.quantization.base_config": {"QuantizationConfig": QuantizationConfig,
                                                                "QuantizeMethodBase": QuantizeMethodBase},
        "vllm.model_executor.models.utils": {"WeightsMapper": WeightsMapper},
    }
    modules = {}
    for name, members in names.items():
        modules[name] = ModuleType(name)
        modules[name].__dict__.update(members)
    return modules


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module, imported afresh against the stand-in (vLLM 0.32.0)."""
    for name, module in stand_in_vllm("0.32.0").items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "moe_compress.serving.vllm_plugin", raising=False)
    return importlib.import_module("moe_compress.serving.vllm_plugin")


FOLDERS = {"mixed": dict(rank=2, method="mixed"), "mixed-4bit": dict(rank=2, method="mixed", bits=4, group_size=16),
           "delta-2cores": dict(rank=2, method="delta", num_cores=2),
           "quantize-3bit": dict(method="quantize", bits=3, group_size=16, symmetric=False)}


@pytest.fixture(scope="module", params=list(FOLDERS))
def folder(request, tmp_path_factory) -> Path:
    model = tiny_model("qwen3_moe", moe_intermediate_size=F)
    report = mc.compress(model, mc.CompressionConfig(**FOLDERS[request.param]), progress=False)
    return mc.save_compressed(model, tmp_path_factory.mktemp("vllm") / "model", report=report)


def moe_layer(plugin, prefix: str, tp_size: int = 1, hidden: int = H, width: int = F):
    """A RoutedExperts as vLLM builds one for a Qwen3-MoE layer: its MoE config and checkpoint names."""
    parallel = SimpleNamespace(use_ep=False, ep_size=1, tp_size=tp_size)
    moe = SimpleNamespace(moe_parallel_config=parallel, hidden_dim_unpadded=hidden,
                          intermediate_size_per_partition_unpadded=width, has_bias=False)
    layer = sys.modules["vllm.model_executor.layers.fused_moe"].RoutedExperts()
    layer.moe_config, layer.activation = moe, SimpleNamespace(value="silu")
    layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name, layer.ckpt_up_proj_name = "gate_proj", "down_proj", "up_proj"
    return layer


def test_the_entry_point_names_the_registration_and_it_registers_the_config(plugin):
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    module, _, function = entry["moe_compress"].partition(":")
    assert getattr(importlib.import_module(module), function) is plugin.register
    plugin.register()
    registry = sys.modules["vllm.model_executor.layers.quantization"].registry
    assert registry == {"moe_compress": plugin.SharedCoreVllmConfig}


def test_another_vllm_version_is_refused_in_one_line(monkeypatch, plugin):
    monkeypatch.setattr(plugin, "vllm_version", "0.33.1")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0.32, not 0.33.1 .*pip install 'vllm==0.32.\*'") as error:
        plugin.SharedCoreVllmConfig.from_config({"modules": {}})
    assert "\n" not in str(error.value)


def test_a_folder_loads_into_vllm_layers_and_serves_what_the_compressed_model_computes(plugin, folder):
    quantization = mc.load_compressed(folder).config.quantization_config.to_dict()
    config = plugin.SharedCoreVllmConfig.from_config(quantization)
    assert config.modules == {n: mc.ModuleSpec.from_dict(s) for n, s in quantization["modules"].items()}
    linear = sys.modules["vllm.model_executor.layers.linear"].LinearBase()
    assert type(config.get_quant_method(linear, "model.layers.0.self_attn.qkv_proj")).__name__ == \
        "UnquantizedLinearMethod"
    dense = config.get_quant_method(moe_layer(plugin, "x"), "model.layers.9.mlp.experts")  # left uncompressed
    assert type(dense).__name__ == "UnquantizedFusedMoEMethod"

    model, saved = mc.load_compressed(folder).eval(), load_file(folder / "model.safetensors")
    mapper = config.get_cache_scale_mapper() | config.get_checkpoint_weight_mapper()  # vLLM's loader's order
    for index in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{index}.mlp.experts"
        layer = moe_layer(plugin, prefix)
        method = config.get_quant_method(layer, prefix)
        method.create_weights(layer, 4, H, F, torch.float32)
        loaded = set()
        for name, tensor in saved.items():
            if name.startswith(f"{prefix}."):  # vLLM's experts loader: experts.<e>.<ckpt name>. -> experts.w13_/w2_
                renamed = mapper.map_name(name)
                found = re.search(r"experts\.0\.(gate_proj|up_proj|down_proj)\.(\w+)$", renamed)
                param = f"{'w2' if found[1] == 'down_proj' else 'w13'}_{found[2]}"
                target = dict(layer.named_parameters())[param]  # vLLM's loader fills parameters alone
                target.weight_loader(target, tensor, renamed, shard_id="w1", expert_id=0)
                loaded.add(param)
        # one to one, every tensor of the layer a parameter: integer codes, scales and the expert -> core map too
        assert loaded == {n for n, _ in layer.named_parameters()} and not list(layer.named_buffers())
        method.process_weights_after_loading(layer)  # every tensor loaded: nothing to refuse
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(7, H, generator=generator)
        ids = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(7)])
        weights = torch.rand(7, 2, generator=generator).softmax(-1)
        with torch.no_grad():
            expected = model.get_submodule(prefix)(x, ids, weights)
            got = method.apply(layer, x, weights, ids.int(), None, None)  # vLLM's ids are int32
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_what_the_plugin_cannot_serve_is_refused_in_one_line(plugin, folder):
    config = plugin.SharedCoreVllmConfig.from_config(mc.load_compressed(folder).config.quantization_config.to_dict())
    prefix = "model.layers.0.mlp.experts"
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size=2\) is not supported"):
        config.get_quant_method(moe_layer(plugin, prefix, tp_size=2), prefix)
    method = config.get_quant_method(moe_layer(plugin, prefix, width=F + 8), prefix)  # vLLM padded the width
    with pytest.raises(ValueError, match="vLLM pads this layer's sizes"):
        method.create_weights(moe_layer(plugin, prefix), 4, H, F, torch.float32)
    method = config.get_quant_method(moe_layer(plugin, prefix), prefix)
    layer = moe_layer(plugin, prefix)
    method.create_weights(layer, 4, H, F, torch.float32)
    method.process_weights_after_loading(layer)  # nothing loaded: dummy weights (--load-format dummy) pass
    (name, param), *others = layer.named_parameters()
    with pytest.raises(ValueError, match=r"the folder holds shape \(1, 3\), the layer expects"):
        param.weight_loader(param, torch.zeros(1, 3), f"model.layers.0.mlp.experts.0.gate_proj.{name}")
    param.weight_loader(param, param.detach().clone(), f"model.layers.0.mlp.experts.0.gate_proj.{name}")
    with pytest.raises(ValueError, match=rf"{prefix}: vLLM did not load {others[0][0]}, .* from the folder") as error:
        method.process_weights_after_loading(layer)  # loaded in part: refused, naming what is missing
    assert "\n" not in str(error.value)
