"""Calibration statistics and the layer-by-layer pass, against plain computations: Grams summed token by token, the
regularisation written out, and each layer's outputs against the model's own hidden states."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, tiny_model, token_ids

from moe_compress.calibration.observe import observe, observing
from moe_compress.calibration.grams import ExpertGrams, Regularisation, regularised
from moe_compress.discovery import find_experts, split_weights
from moe_compress.calibration.store import load_block_data, load_statistics
from moe_compress.parallel import Manifest
from moe_compress.calibration.layers import capture, decoder_layers


def routed_inputs(model, ids) -> dict[str, list[tuple]]:
    """What every experts module received, caught by a plain forward hook of its own."""
    seen = {name: [] for name, _ in find_experts(model)}
    handles = [experts.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args))
               for name, experts in find_experts(model)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_expert_grams_are_the_routed_token_sums(model_type):
    model = tiny_model(model_type)
    ids = token_ids(3, 10)
    grams = observe(model, ids, ExpertGrams, batch_size=2, progress=False)
    seen = routed_inputs(model, ids)
    for name, experts in find_experts(model):
        (W_gate, _), (W_up, _) = split_weights(experts)["gate"], split_weights(experts)["up"]
        E, F_, H = W_up.shape
        M, M_mid, n = torch.zeros(E, H, H), torch.zeros(E, F_, F_), torch.zeros(E, dtype=torch.long)
        for hidden, index, weights in seen[name]:
            for t in range(hidden.shape[0]):
                for k in range(index.shape[1]):
                    e, g, x = index[t, k].item(), weights[t, k].item(), hidden[t]
                    h = F.silu(W_gate[e] @ x) * (W_up[e] @ x)  # both models gate with SiLU
                    M[e] += g**2 * torch.outer(x, x)
                    M_mid[e] += g**2 * torch.outer(h, h)
                    n[e] += 1
        assert torch.equal(grams[name].tokens, n)
        assert torch.allclose(grams[name].gram("gate"), M, atol=1e-5)
        assert torch.allclose(grams[name].gram("down"), M_mid, atol=1e-5)


def test_regularisation_adds_layer_pseudo_tokens_then_damps():
    gram = torch.stack([torch.tensor([[4.0, 1.0], [1.0, 2.0]]), torch.zeros(2, 2)])  # expert 1 received nothing
    tokens = torch.tensor([4, 0])
    metric = regularised(gram, tokens, Regularisation(shrink=0.5, damp=0.1))
    layer = gram.sum(0) / 4  # per routed token
    for e in range(2):  # expert 1 gets the layer-wide statistics alone
        shrunk = gram[e] + 0.5 * 2 * layer  # shrink pseudo-tokens per input dimension, d = 2
        expected = shrunk + 0.1 * shrunk.diagonal().mean() * torch.eye(2)
        assert torch.allclose(metric[e], expected)
    assert torch.linalg.eigvalsh(metric).min() > 0
    with pytest.raises(ValueError, match="damp=0"):
        Regularisation(damp=0)


# gpt_oss: sliding and full attention; nemotron_h: mamba, attention, MLP and MoE layers, each given the mask its
# `block_type` picks in the model's loop
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_layer_by_layer_pass_reproduces_the_models_hidden_states(model_type):
    model = tiny_model(model_type, num_hidden_layers=3)
    ids = token_ids(3, 12)
    with torch.no_grad():
        reference = model.base_model(ids, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture(model, ids.split(2))
    assert decoder_layers(model)[0] == "model.layers"
    assert torch.equal(torch.cat(inputs.hidden), reference[0])
    for index in range(len(inputs.layers) - 1):  # the last layer's output is normalised in the model's own tuple
        inputs.advance(index)
        assert torch.allclose(torch.cat(inputs.hidden), reference[index + 1], atol=1e-6)


def test_observing_one_layer_sees_only_that_layer():
    model = tiny_model("qwen3_moe")
    inputs = capture(model, [token_ids(2, 8)])
    name = inputs.experts_of(1, model)
    assert name == ["model.layers.1.mlp.experts"]
    grams = {name[0]: ExpertGrams(model.get_submodule(name[0]))}
    with observing(model, grams):
        inputs.run(0)
        assert grams[name[0]].tokens.sum() == 0
        inputs.advance(0)
        inputs.run(1)
    assert grams[name[0]].tokens.sum() == 2 * 8 * model.config.num_experts_per_tok


def test_statistics_are_saved_packed_in_bf16_and_load_as_full_fp32_grams(tmp_path):
    model = tiny_model("qwen3_moe")
    name = "model.layers.0.mlp.experts"
    grams = observe(model, token_ids(4, 16), ExpertGrams, progress=False)[name]
    E, H, F_ = grams.inputs.shape[0], grams.inputs.shape[-1], grams.intermediate.shape[-1]
    manifest = Manifest(tmp_path / "packed")
    (tmp_path / "packed" / "units").mkdir(parents=True)
    manifest.save(name, grams.state(), {})
    loaded = load_statistics(manifest, name)
    assert torch.equal(loaded.tokens, grams.tokens)
    for full, restored in ((grams.inputs, loaded.inputs), (grams.intermediate, loaded.intermediate)):
        assert restored.dtype == torch.float32 and torch.equal(restored, restored.transpose(1, 2))
        upper = torch.ones_like(full[0], dtype=torch.bool).triu()
        assert torch.equal(restored[:, upper], full[:, upper].to(torch.bfloat16).float())  # the packing loses nothing
        scale = full.diagonal(dim1=1, dim2=2).amax(-1)[:, None, None]
        assert ((restored - full).abs() <= 2**-8 * scale).all()  # bf16 keeps 8 significant bits; |M_ij| <= max M_ii
    old = Manifest(tmp_path / "full")  # saved before the packing: loads as it is
    (tmp_path / "full" / "units").mkdir(parents=True)
    old.save(name, {"tokens": grams.tokens, "inputs": grams.inputs, "intermediate": grams.intermediate}, {})
    assert torch.equal(load_statistics(old, name).inputs, grams.inputs)
    full_bytes, packed_bytes = 4 * E * (H * H + F_ * F_), 2 * E * (H * (H + 1) + F_ * (F_ + 1)) // 2
    sizes = [m.path(name).stat().st_size - 8 * E for m in (old, manifest)]  # less the token counts
    assert 0 <= sizes[0] - full_bytes < 512 and 0 <= sizes[1] - packed_bytes < 512  # a safetensors header besides
    assert full_bytes / packed_bytes > 3.8  # 4d / (d + 1): 3.9 at d = 32, 4.0 at real sizes


def test_the_kept_tokens_are_read_by_the_reconstruction_alone(tmp_path):
    """Statistics saved with the reconstruction's kept inputs and outputs load for the curves and fits without them
    (they are the bulk of the file at real sizes); load_block_data reads them as saved."""
    name = "model.layers.0.mlp.experts"
    grams = observe(tiny_model("qwen3_moe"), token_ids(4, 16), ExpertGrams, progress=False)[name]
    inputs, outputs = torch.randn(64, grams.inputs.shape[-1]), torch.randn(64, grams.inputs.shape[-1])
    manifest, plain = Manifest(tmp_path / "kept"), Manifest(tmp_path / "plain")
    for folder in ("kept", "plain"):
        (tmp_path / folder / "units").mkdir(parents=True)
    manifest.save(name, {**grams.state(), "block_inputs": inputs, "block_outputs": outputs}, {})
    plain.save(name, grams.state(), {})
    loaded, alone = load_statistics(manifest, name), load_statistics(plain, name)
    assert loaded.block_inputs is None and loaded.block_outputs is None
    for key in ("tokens", "inputs", "intermediate"):
        assert torch.equal(getattr(loaded, key), getattr(alone, key))
    read_inputs, read_outputs = load_block_data(manifest, name)
    assert torch.equal(read_inputs, inputs) and torch.equal(read_outputs, outputs)


def test_gate_and_up_share_one_metric_until_more_tokens_arrive():
    model = tiny_model("qwen3_moe")
    name = "model.layers.0.mlp.experts"
    grams = {name: ExpertGrams(model.get_submodule(name))}
    with observing(model, grams), torch.no_grad():
        model(token_ids(2, 8))
        gate = grams[name].metric("gate")
        assert grams[name].metric("up") is gate and grams[name].metric("down").shape[-1] == 32
        assert torch.equal(grams[name].metric("gate"), regularised(grams[name].inputs, grams[name].tokens,
                                                                   Regularisation()))
        model(token_ids(2, 8, seed=1))
    assert torch.equal(grams[name].metric("up"), regularised(grams[name].inputs, grams[name].tokens, Regularisation()))
    assert not torch.equal(grams[name].metric("up"), gate)
