"""The peer methods: REAP's saliency and pruning, HC-SMoE's clustering and merging, against plain references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model, token_ids
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from moe_compress import NoExpertsError, find_experts
from moe_compress.discovery import split_weights
from moe_compress.baselines import (
    EXPERT_COUNT_ATTRS, MergedExperts, ReapSaliency, average_linkage, merge_experts, merge_matrix, prune_experts,
)

# (model type, config overrides, router: softmax then top-k, or top-k then softmax)
PRUNABLE = [
    ("qwen3_moe", {"norm_topk_prob": False}, "softmax_topk"),
    ("qwen3_moe", {"norm_topk_prob": True}, "softmax_topk"),
    ("qwen2_moe", {}, "softmax_topk"),
    ("mixtral", {}, "softmax_topk"),
    ("olmoe", {}, "softmax_topk"),
    ("gpt_oss", {}, "topk_softmax"),
    ("granitemoe", {}, "topk_softmax"),
]


class NotIterated:
    """Calibration that fails the test if read: bad input must be refused before any work."""

    def __iter__(self):
        raise AssertionError("calibration was read before the input was checked")


def plain_expert_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) = down(act(gate x) * up x), or down(act(up x)) without a gate, from the split weights: [T, H]."""
    parts = split_weights(experts)

    def linear(name, h):
        W, b = parts[name]
        return h @ W[e].T + (0 if b is None else b[e])

    up = linear("up", x)
    h = experts.act_fn(linear("gate", x)) * up if "gate" in parts else experts.act_fn(up)
    return linear("down", h)


def test_reap_saliency_by_hand():
    """Experts 0..3 are one expert with its down projection scaled by d = 1, 2, 3, 4, all tokens equal x: then
    ||f_e(x)|| = d_e n, and S_e = d_e n mean(g) over e's tokens. Saliency order differs from frequency order."""
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(tiny_config("qwen3_moe"))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape[1:]).expand_as(experts.gate_up_proj))
        base = torch.randn(experts.down_proj.shape[1:])
        experts.down_proj.copy_(torch.stack([d * base for d in (1, 2, 3, 4)]))
    x = torch.randn(1, 32).expand(4, 32)
    gate, up = experts.gate_up_proj[0].chunk(2)
    n = (base @ (F.silu(gate @ x[0]) * (up @ x[0]))).norm()
    index = torch.tensor([[0, 1], [0, 3], [1, 0], [0, 1]])
    weights = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]])
    observer = ReapSaliency(experts)
    with torch.no_grad():
        observer(experts, x, index, weights)
    # expert 0: g = .9, .8, .4, .7; expert 1: g = .1, .6, .3; expert 2: no token; expert 3: g = .2
    expected = torch.stack([1 * 0.7 * n, 2 * (1.0 / 3) * n, 0 * n, 4 * 0.2 * n]).double()
    assert torch.allclose(observer.saliency, expected, rtol=1e-5)
    assert observer.tokens.tolist() == [4, 3, 0, 1]
    assert observer.saliency.argsort(descending=True).tolist() == [3, 0, 1, 2]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])  # gated, and up/down only
def test_reap_saliency_matches_the_plain_formula(model_type):
    experts = find_experts(tiny_model(model_type))[0][1]
    T, E = 10, experts.num_experts
    x = torch.randn(T, split_weights(experts)["up"][0].shape[2])
    index = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    weights = torch.rand(T, 2)
    observer = ReapSaliency(experts)
    with torch.no_grad():
        observer(experts, x, index, weights)
        for e in range(E):
            t, k = (index == e).nonzero(as_tuple=True)
            norms = plain_expert_output(experts, e, x[t]).norm(dim=-1)
            expected = (weights[t, k] * norms).mean() if len(t) else torch.tensor(0.0)
            assert torch.allclose(observer.saliency[e].float(), expected, rtol=1e-5), e


def reference_block(original_block, keep: torch.Tensor, x: torch.Tensor, routing: str) -> torch.Tensor:
    """The original MoE block restricted to the kept experts, by hand: the router's rows of `keep`, softmax then top-k
    (renormalised when the router does) or top-k then softmax, and the original experts at their original indices."""
    router = getattr(original_block, "gate", None) or original_block.router
    logits = x @ router.weight[keep].T
    if getattr(router, "bias", None) is not None:
        logits = logits + router.bias[keep]
    if routing == "softmax_topk":
        weights, index = logits.softmax(-1).topk(router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        top, index = logits.topk(router.top_k, dim=-1)
        weights = top.softmax(-1)
    y = original_block.experts(x, keep[index], weights)
    if hasattr(original_block, "shared_expert"):
        y = y + torch.sigmoid(original_block.shared_expert_gate(x)) * original_block.shared_expert(x)
    return y


@pytest.mark.parametrize("model_type, overrides, routing", PRUNABLE)
def test_pruned_blocks_equal_the_renormalised_reference(model_type, overrides, routing):
    original, pruned = tiny_model(model_type, **overrides), tiny_model(model_type, **overrides)
    report = prune_experts(pruned, token_ids(4, 16), 0.5, progress=False)
    assert report["params_after"] * 2 == report["params_before"]
    counts = [getattr(pruned.config, attr) for attr in EXPERT_COUNT_ATTRS if hasattr(pruned.config, attr)]
    assert counts and set(counts) == {2}
    x = torch.randn(1, 7, pruned.config.hidden_size)
    with torch.no_grad():
        for name, experts in find_experts(pruned):
            keep = torch.tensor(report["layers"][name]["kept"])
            assert len(keep) == 2 and experts.num_experts == 2
            saliency = torch.tensor(report["layers"][name]["saliency"])
            assert keep.tolist() == sorted(saliency.argsort(descending=True)[:2].tolist())
            block = name.rpartition(".")[0]
            out = pruned.get_submodule(block)(x)
            out = out[0] if isinstance(out, tuple) else out  # gpt_oss also returns its router scores
            expected = reference_block(original.get_submodule(block), keep, x[0], routing)
            assert torch.allclose(out[0], expected, atol=1e-6)


def test_pruned_model_saves_and_loads(tmp_path):
    model = tiny_model("qwen3_moe")
    prune_experts(model, token_ids(4, 16), 0.5, progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_experts == 2
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_input_refused_before_any_work():
    for bad in (0, -0.5, 1.5, "half"):
        with pytest.raises(ValueError, match="not a kept fraction"):
            prune_experts(tiny_model(), NotIterated(), bad)
        with pytest.raises(ValueError, match="not a kept fraction"):
            merge_experts(tiny_model(), NotIterated(), bad)
    with pytest.raises(ValueError, match=r"keeps 1 of the 4 experts .* fewer than the 2 .* kept_fraction >= 0.5"):
        prune_experts(tiny_model(), NotIterated(), 0.25)
    with pytest.raises(ValueError, match=r"keeps 0 of the 4 experts .* no expert"):
        merge_experts(tiny_model(), NotIterated(), 0.1)
    with pytest.raises(ValueError, match="does not support deepseek_v3"):
        prune_experts(tiny_model("deepseek_v3"), NotIterated(), 0.5)
    with pytest.raises(NoExpertsError):
        prune_experts(tiny_model("llama"), NotIterated(), 0.5)
    merged = tiny_model()
    merge_experts(merged, token_ids(), 0.5, progress=False)
    with pytest.raises(ValueError, match="already merged"):
        prune_experts(merged, NotIterated(), 0.5)


def partition(labels: torch.Tensor) -> set[frozenset[int]]:
    return {frozenset((labels == c).nonzero().flatten().tolist()) for c in labels.unique()}


def test_average_linkage_by_hand():
    points = lambda *xs: torch.tensor(xs).unsqueeze(1)
    # d({0, 2}, 5) = 4 < d(5, 9.5) = 4.5: average linkage joins 5 to {0, 2} (complete linkage would not)
    assert partition(average_linkage(points(0, 2, 5, 9.5), 2)) == {frozenset({0, 1, 2}), frozenset({3})}
    # d({0, 2}, 4.4) = 3.4 > d(4.4, 7.5) = 3.1: average linkage joins 4.4 to 7.5 (single linkage would not)
    assert partition(average_linkage(points(0, 2, 4.4, 7.5), 2)) == {frozenset({0, 1}), frozenset({2, 3})}
    labels = average_linkage(points(7, 0, 7.5, 0.5, 3), 5)
    assert labels.tolist() == [0, 1, 2, 3, 4]  # nothing to join; clusters numbered by smallest member
    assert average_linkage(points(7, 0, 7.5, 0.5), 2).tolist() == [0, 1, 0, 1]


def test_average_linkage_recovers_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 16, generator=generator)
    planted = torch.randperm(12, generator=generator) % 3
    features = prototypes[planted] + 0.1 * torch.randn(12, 16, generator=generator)
    assert partition(average_linkage(features, 3)) == partition(planted)


def test_merge_matrix_weights_by_frequency_or_plain_mean():
    M = merge_matrix(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 3, 0, 1]))
    assert torch.allclose(M, torch.tensor([[0.5, 0, 0.5, 0], [0, 0.75, 0, 0.25]], dtype=torch.float64))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # gpt_oss: biases, transposed, interleaved gate/up
def test_merged_weights_are_the_frequency_weighted_average(model_type):
    original, merged = tiny_model(model_type), tiny_model(model_type)
    report = merge_experts(merged, token_ids(4, 16), 0.5, progress=False)
    assert report["params_after"] * 2 == report["params_before"]
    for name, experts in find_experts(original):
        wrapper = merged.get_submodule(name)
        assert isinstance(wrapper, MergedExperts) and wrapper.inner.num_experts == 2
        layer = report["layers"][name]
        n = torch.tensor(layer["tokens"], dtype=torch.float32)
        assert sorted(sum(layer["clusters"], [])) == [0, 1, 2, 3]
        merged_parts = split_weights(wrapper.inner)
        for projection, (W, b) in split_weights(experts).items():
            for c, members in enumerate(layer["clusters"]):
                assert wrapper.expert_map[members].eq(c).all()
                w = n[members] / n[members].sum()
                assert torch.allclose(merged_parts[projection][0][c], torch.einsum("e,eoi->oi", w, W[members]),
                                      atol=1e-6)
                if b is not None:
                    assert torch.allclose(merged_parts[projection][1][c], w @ b[members], atol=1e-6)


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3"])  # deepseek_v3: merging keeps any router
def test_merged_model_equals_dense_experts_carrying_their_cluster_weights(model_type):
    merged, reference = tiny_model(model_type), tiny_model(model_type)
    merge_experts(merged, token_ids(4, 16), 0.5, progress=False)
    with torch.no_grad():
        for name, experts in find_experts(reference):
            wrapper = merged.get_submodule(name)
            for pname, p in experts.named_parameters(recurse=False):
                p.copy_(getattr(wrapper.inner, pname)[wrapper.expert_map])
        ids = token_ids(2, 16, seed=1)
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-5)
