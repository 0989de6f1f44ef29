"""SharedCoreExperts against the plain math: every W_e rebuilt and run through transformers' own experts code."""

import copy

import pytest
import torch
from conftest import ARCHITECTURES, randomize, shared_spec, tiny_config, tiny_model, token_ids
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

from moe_compress import ModuleSpec, SharedCoreExperts, find_experts
from moe_compress import cpu_matmul
from moe_compress.discovery import projection_names


def exact_pair(model_type: str, form: str = "wrapped", rank: int = 3):
    """(original model whose experts are exactly of the stored form, the same model with SharedCoreExperts)."""
    original = tiny_model(model_type)
    compressed = copy.deepcopy(original)
    for i, (name, experts) in enumerate(find_experts(compressed)):
        shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, form, rank)), seed=i)
        with torch.no_grad():
            for key, value in shared.dense_state().items():
                getattr(original.get_submodule(name), key).copy_(value)
        parent, _, child = name.rpartition(".")
        setattr(compressed.get_submodule(parent), child, shared)
    return original, compressed


@pytest.mark.parametrize("form", ["wrapped", "delta", "basis"])
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_logits_match_original_for_experts_exactly_of_the_stored_form(model_type, form):
    original, compressed = exact_pair(model_type, form)
    ids = token_ids()
    with torch.no_grad():
        expected, got = original(ids).logits, compressed(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def route(num_tokens=9, num_experts=4, top_k=2, hidden=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    return x, index, weights


@pytest.mark.parametrize("form", ["wrapped", "delta", "basis"])
def test_several_cores_match_reference(form):
    experts = find_experts(tiny_model("mixtral"))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, form, num_cores=2)), num_cores=2)
    x, index, weights = route()
    with torch.no_grad():
        assert torch.allclose(shared(x, index, weights), shared.reference_forward(x, index, weights), atol=1e-5)


@pytest.mark.parametrize("form", ["wrapped", "basis"])
def test_post_expert_norm_path_matches_reference(form):
    config = tiny_config("muse_spark").get_text_config()
    for key, value in dict(hidden_size=32, moe_hidden_size=32, moe_intermediate_size=16, num_local_experts=4).items():
        setattr(config, key, value)
    experts = MuseSparkExperts(config)
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, form)))
    with torch.no_grad():
        shared.post_expert_norm.weight.uniform_(0.5, 1.5)
    x, index, weights = route()
    with torch.no_grad():
        assert torch.allclose(shared(x, index, weights), shared.reference_forward(x, index, weights), atol=1e-5)


@pytest.mark.parametrize("form", ["wrapped", "basis"])
def test_unrouted_experts_and_no_tokens(form):
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, form)))
    x, _, weights = route()
    index = torch.zeros(9, 2, dtype=torch.long)
    index[:, 1] = 3  # experts 1 and 2 get no token
    with torch.no_grad():
        assert torch.allclose(shared(x, index, weights), shared.reference_forward(x, index, weights), atol=1e-5)
        assert shared(x[:0], index[:0], weights[:0]).shape == (0, 32)


@pytest.mark.parametrize("rank", [1, 3, 4])  # 4 takes torch's grouped_mm, 1 and 3 the loop (unaligned rows)
def test_gradients_reach_cores_and_wrappers(rank):
    _, compressed = exact_pair("qwen3_moe", rank=rank)
    compressed.train()
    ids = token_ids()
    compressed(ids, labels=ids).loss.backward()
    for name, p in compressed.named_parameters():
        if ".experts." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cached_products_follow_parameter_updates():
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts))).eval()
    x, index, weights = route()
    with torch.no_grad():
        shared(x, index, weights)  # fills the caches
        assert all(p._derived_cache for p in shared.projections.values())
        for p in shared.parameters():
            p.mul_(1.1)
        assert torch.allclose(shared(x, index, weights), shared.reference_forward(x, index, weights), atol=1e-5)
    shared.train()
    optimizer = torch.optim.AdamW(shared.parameters(), lr=1e-2)
    shared(x, index, weights).square().sum().backward()
    optimizer.step()
    shared.eval()
    with torch.no_grad():
        assert torch.allclose(shared(x, index, weights), shared.reference_forward(x, index, weights), atol=1e-5)


def test_bfloat16_forward_close_to_float32():
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts)))
    x, index, weights = route()
    with torch.no_grad():
        expected = shared(x, index, weights)
        got = shared.to(torch.bfloat16)(x.bfloat16(), index, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()) < 2e-2


PACKED_FORMS = {"delta": "delta", "basis": "basis", "mixed": {"gate": "basis", "up": "basis", "down": "delta"},
                "dense": "dense"}


@pytest.mark.skipif(not cpu_matmul.available(torch.zeros(1)), reason="torch was built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", list(PACKED_FORMS))
def test_experts_packed_for_the_cpu_compute_what_the_reference_does_and_hold_their_bytes_once(form, dtype):
    if dtype == torch.bfloat16 and not cpu_matmul.available(torch.zeros(1, dtype=dtype)):
        pytest.skip("this CPU has no BF16 instructions for oneDNN")
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    spec = ModuleSpec(PACKED_FORMS[form], {p: 0 if form == "dense" else 3 for p in projection_names(experts)})
    shared = randomize(SharedCoreExperts.empty(experts, spec)).to(dtype).eval()
    held = sum(p.numel() * p.element_size() for p in shared.parameters())
    decoding, prefill = route(num_tokens=1, top_k=2), route(num_tokens=40, top_k=2)
    with torch.no_grad():
        expected = [shared.reference_forward(x.to(dtype), i, w.to(dtype)).float() for x, i, w in (decoding, prefill)]
        for proj in shared.projections.values():
            proj.pack_for_cpu_()
        got = [shared(x.to(dtype), i, w.to(dtype)).float() for x, i, w in (decoding, prefill)]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 rounding of products and sums
    for g, e in zip(got, expected):
        assert ((g - e).norm() / e.norm()) < tolerance
    packed = [entry[1] for proj in shared.projections.values() for entry in proj._packed.values()]
    assert {name for proj in shared.projections.values() for name in proj._packed} == {"core", "u", "v"} - (
        {"u", "v"} if form == "dense" else set())
    # what the experts hold: the packed matrices, and placeholders of one element where the tensors were
    assert sum(p.nbytes for p in packed) == held - sum(proj.bias.numel() * proj.bias.element_size()
                                                       for proj in shared.projections.values() if proj.bias is not None)
    assert all(p.untyped_storage().nbytes() <= 4 for proj in shared.projections.values()
               for name, p in proj.named_parameters() if name in proj._packed)
    with pytest.raises(RuntimeError, match="load the model again to train"):
        shared.train()


def test_packing_leaves_integer_and_grouped_cores_and_the_wrapped_form_to_their_own_paths():
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    wrapped = SharedCoreExperts.empty(experts, shared_spec(experts, "wrapped")).eval()
    grouped = SharedCoreExperts.empty(experts, shared_spec(experts, "delta", num_cores=2)).eval()
    assert all(proj.packable() == [] for proj in wrapped.projections.values())
    assert all(proj.packable() == ["u", "v"] for proj in grouped.projections.values())
    with pytest.raises(RuntimeError, match="call .eval"):
        grouped.train().projections["up"].pack_for_cpu_()


@pytest.mark.skipif(not cpu_matmul.available(torch.zeros(1)), reason="torch was built without oneDNN")
def test_values_loaded_into_a_packed_tensor_replace_its_packed_matrices_until_packed_again():
    """vLLM reloading weights gives a packed parameter new storage (the plugin's loader): the stale layout must go."""
    experts = find_experts(tiny_model("qwen3_moe"))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, "delta"))).eval()
    other = randomize(SharedCoreExperts.empty(experts, shared_spec(experts, "delta")), seed=1).eval()
    x, index, weights = route()
    with torch.no_grad():
        expected = other.reference_forward(x, index, weights)
        for proj in shared.projections.values():
            proj.pack_for_cpu_()
        for (name, proj), new in zip(shared.projections.items(), other.projections.values()):
            for tensor in ("core", "u", "v"):
                getattr(proj, tensor).data = getattr(new, tensor).detach().clone()
        assert torch.allclose(shared(x, index, weights), expected, atol=1e-5)
        assert not any(proj._packed for proj in shared.projections.values())
        for proj in shared.projections.values():
            proj.pack_for_cpu_()
        assert all(set(proj._packed) == {"core", "u", "v"} for proj in shared.projections.values())
        assert torch.allclose(shared(x, index, weights), expected, atol=1e-5)
