"""Finding experts through transformers' experts interface, across architectures."""

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

from moe_compress import NoExpertsError, find_experts
from moe_compress.discovery import join_weights, split_weights


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_finds_every_moe_layer_and_round_trips_weights(model_type):
    model = tiny_model(model_type)
    found = find_experts(model)
    assert found and all(name.endswith("experts") for name, _ in found)
    name, experts = found[0]
    parts = split_weights(experts)
    E = parts["down"][0].shape[0]
    out_f, in_f = parts["down"][0].shape[1:]
    assert E == 4 and (out_f, in_f) == (model.config.hidden_size, parts["up"][0].shape[1])
    for key, value in join_weights(experts, parts).items():
        assert torch.equal(value, getattr(experts, key)), key


def test_shared_experts_and_dense_layers_are_left_alone():
    model = tiny_model("qwen2_moe")
    names = [name for name, _ in find_experts(model)]
    assert not any("shared_expert" in name for name in names)
    dense_first = tiny_model("deepseek_v3", first_k_dense_replace=1)
    assert [n for n, _ in find_experts(dense_first)] == ["model.layers.1.mlp.experts"]


def test_gpt_oss_gate_and_up_are_deinterleaved():
    experts = find_experts(tiny_model("gpt_oss"))[0][1]
    parts = split_weights(experts)
    assert torch.equal(parts["gate"][0][0], experts.gate_up_proj[0][:, 0::2].T)
    assert torch.equal(parts["up"][1][0], experts.gate_up_proj_bias[0][1::2])


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_dense_model_gets_a_clear_error(model_type):
    with pytest.raises(NoExpertsError, match=rf"no experts found in this {model_type} model: looked for .*"):
        find_experts(tiny_model(model_type))
