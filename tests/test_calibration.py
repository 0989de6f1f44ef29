"""The calibration pass: observers see exactly the routed inputs of every experts module, and leave no hooks behind."""

import pytest
import torch
from conftest import VOCAB, tiny_model, token_ids

from moe_compress import NoExpertsError, find_experts
from moe_compress.calibration.observe import RoutingCounts, observe, observing


def recount(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, tokens per expert recounted from the router logits the model returns: top-K of softmax(logits)
    is top-K of the logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer [T, E]
    K, E = model.config.num_experts_per_tok, model.config.num_experts
    return [torch.bincount(layer.topk(K, dim=-1).indices.flatten(), minlength=E) for layer in logits]


def test_counts_equal_a_recount_from_router_logits():
    model = tiny_model("qwen3_moe")
    ids = token_ids(batch=5, length=12)
    expected = recount(model, ids)
    counts = observe(model, ids, RoutingCounts, batch_size=2, progress=False)  # batches of 2, 2 and 1 sequences
    assert list(counts) == [name for name, _ in find_experts(model)]
    for layer, observer in zip(expected, counts.values()):
        assert torch.equal(observer.tokens, layer)
        assert observer.tokens.sum() == 5 * 12 * 2
    batched = observe(model, [ids[:3], ids[3:]], RoutingCounts, progress=False)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(counts.values(), batched.values()))


def test_observer_gets_the_inputs_of_each_forward_however_passed():
    model = tiny_model("mixtral")
    name, experts = find_experts(model)[0]
    seen = []
    x = torch.randn(3, model.config.hidden_size)
    index, weights = torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.rand(3, 2)
    with observing(model, {name: lambda module, *routed: seen.append((module, *routed))}):
        experts(x, index, weights)
        experts(x, top_k_index=index, top_k_weights=weights)
    assert len(seen) == 2
    for module, *routed in seen:
        assert module is experts and all(a is b for a, b in zip(routed, (x, index, weights)))


def test_hooks_are_removed_and_the_mode_restored_even_on_error():
    model = tiny_model("olmoe").train()

    def failing(experts):
        def observer(*routed):
            raise RuntimeError("observer failed")
        return observer

    with pytest.raises(RuntimeError, match="observer failed"):
        observe(model, token_ids(), failing, progress=False)
    assert model.training
    assert all(not experts._forward_pre_hooks for _, experts in find_experts(model))


def test_bad_calibration_refused():
    model = tiny_model("qwen3_moe")
    for bad in (token_ids()[0], torch.rand(2, 12) * VOCAB, [{"input_ids": token_ids()}]):
        with pytest.raises(ValueError, match=r"integer tensor \[N, L\]"):
            observe(model, bad, RoutingCounts, progress=False)
    with pytest.raises(ValueError, match="no experts module named 'mlp'"):
        with observing(model, {"mlp": RoutingCounts}):
            pass
    with pytest.raises(NoExpertsError):
        observe(tiny_model("llama"), token_ids(), RoutingCounts, progress=False)
