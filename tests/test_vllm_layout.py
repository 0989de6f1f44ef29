"""The vLLM plugin's pure-torch parts against SharedCoreExperts: names a saved folder's tensors take on their way into
vLLM's layer, and the forward on vLLM's routing. No vLLM needed (tests/test_vllm_serving.py runs the real thing)."""

import re

import pytest
import torch
from conftest import randomize, shared_spec, tiny_model

from moe_compress import ModuleSpec, SharedCoreExperts, find_experts
from moe_compress.compression.config import MIXED_FORMS
from moe_compress.serving.vllm_layout import checkpoint_renames, layer_tensors, new_projections, routed_forward

H, F = 32, 16  # hidden (conftest's tiny models), expert width


def compressed_experts(form: str, num_cores: int = 1) -> SharedCoreExperts:
    _, experts = find_experts(tiny_model("qwen3_moe", moe_intermediate_size=H // 2))[0]
    spec = shared_spec(experts, MIXED_FORMS if form == "mixed" else form, rank=3, num_cores=num_cores)
    return randomize(SharedCoreExperts.empty(experts, spec), num_cores=num_cores), spec


def rename(name: str, renames: dict) -> str:
    for pattern, replacement in renames.items():
        name = pattern.sub(replacement, name)
    return name


def vllm_loads(name: str, renames: dict) -> tuple[str, str]:
    """(layer parameter, shard id) that vLLM 0.32's RoutedExperts.load_weights picks for a renamed checkpoint name:
    it matches `experts.<e>.<ckpt name>.` and replaces it by `experts.w13_` (gate, up) or `experts.w2_` (down)."""
    name = rename(name, renames)
    shards = {"gate_proj": ("w13_", "w1"), "up_proj": ("w13_", "w3"), "down_proj": ("w2_", "w2")}
    for ckpt, (prefix, shard) in shards.items():
        if f"experts.0.{ckpt}." in name:
            return name.replace(f"experts.0.{ckpt}.", f"experts.{prefix}").rpartition(".")[2], shard
    raise AssertionError(f"{name} has no expert index vLLM would match")


@pytest.mark.parametrize("form", ["wrapped", "delta", "basis", "mixed"])
def test_every_saved_tensor_reaches_its_own_layer_parameter(form):
    experts, spec = compressed_experts(form)
    saved = {f"model.layers.0.mlp.experts.{k}": v for k, v in experts.state_dict().items()}
    tensors = layer_tensors(new_projections(spec, experts.num_experts, H, F, "silu", False, torch.float32, "x"))
    renames = checkpoint_renames()
    loaded = {}
    for name, value in saved.items():
        param, shard = vllm_loads(name, renames)
        assert shard == {"gate": "w1", "up": "w3", "down": "w2"}[name.split(".")[-2]]
        assert tensors[param].shape == value.shape, name
        loaded[param] = value
    assert loaded.keys() == tensors.keys()  # one to one: nothing left unloaded, nothing loaded twice
    # a renamed name is left alone when vLLM applies the renames again (it does, once per loader level)
    once = rename("model.layers.0.mlp.experts.projections.up.core", renames)
    assert rename(once, renames) == once == "model.layers.0.mlp.experts.0.up_proj.up_core"


@pytest.mark.parametrize("form,num_cores", [("wrapped", 1), ("delta", 1), ("basis", 1), ("mixed", 1),
                                                 ("wrapped", 2)])
def test_routed_forward_matches_shared_core_experts(form, num_cores):
    experts, spec = compressed_experts(form, num_cores)
    projections = new_projections(spec, experts.num_experts, H, F, "silu", False, torch.float32, "x")
    with torch.no_grad():
        for name, value in experts.state_dict().items():
            _, projection, tensor = name.split(".")
            getattr(projections[projection], tensor).copy_(value)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, H, generator=generator)  # [T, H]
    topk_ids = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:2] for _ in range(9)])
    topk_weights = torch.rand(9, 2, generator=generator).softmax(-1)
    with torch.no_grad():
        expected = experts(x, topk_ids, topk_weights)
        got = routed_forward(projections, "silu", x, topk_weights, topk_ids.int())  # vLLM's ids are int32
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("spec,activation,message", [
    ({"form": "lowrank", "ranks": {"gate": 3, "up": 3, "down": 3}}, "silu", "form 'lowrank' cannot be served"),
    ({"form": {"gate": "basis", "up": "basis", "down": "lowrank"}, "ranks": {"gate": 3, "up": 3, "down": 3}}, "silu",
     "'down': 'lowrank'}"),
    ({"form": "wrapped", "ranks": {"gate": 3, "up": 3, "down": 3}}, "swigluoai", "activation 'swigluoai'"),
    ({"form": "wrapped", "ranks": {"up": 3, "down": 3}}, "silu", "the folder has projections ['down', 'up']"),
])
def test_what_cannot_be_served_is_refused_in_one_line(spec, activation, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        new_projections(ModuleSpec.from_dict(spec), 4, H, F, activation, False, torch.float32,
                        "model.layers.0.mlp.experts")
    assert "\n" not in str(error.value) and "model.layers.0.mlp.experts" in str(error.value)
