"""Several cores per projection: k-means groups of experts, and compress with one core per group."""

import copy

import pytest
import torch
from conftest import tiny_model, token_ids

from moe_compress import (CompressionConfig, SharedCoreExperts, compress, compress_checkpoint, find_experts,
                          load_compressed, save_compressed)
from moe_compress.discovery import join_weights, split_weights
from moe_compress.compression.grouping import expert_features, kmeans


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal groupings up to the groups' numbering."""
    return all(torch.equal(a[i] == a, b[i] == b) for i in range(len(a)))


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_planted_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    planted = torch.randint(0, 3, (30,), generator=g)
    planted[:3] = torch.arange(3)  # every cluster present
    centres = 5 * torch.randn(3, 16, generator=g)
    points = centres[planted] + 0.3 * torch.randn(30, 16, generator=g)
    assert same_partition(kmeans(points, 3, seed=seed), planted)


def test_kmeans_never_leaves_a_group_empty_and_refuses_more_groups_than_points():
    points = torch.zeros(5, 4)  # all equal: every centroid but one would stay empty
    assert sorted(kmeans(points, 3).unique().tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_cores"):
        kmeans(points, 6)


def test_whitened_features_measure_output_differences():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(4, 6, 5, generator=g), torch.randn(4, 50, 5, generator=g)
    M = X.mT @ X  # [E, in, in]
    features = expert_features(W, M)
    for e in range(4):  # ||W_e L_e||_F^2 = tr(W_e M_e W_e^T) = ||X_e W_e^T||_F^2
        assert torch.allclose(features[e].square().sum(), (X[e] @ W[e].T).square().sum(), rtol=1e-4)


def planted_model(groups: torch.Tensor):
    """The tiny qwen3_moe model whose experts are two families: each expert its family's matrix plus small noise."""
    model = tiny_model("qwen3_moe")
    g = torch.Generator().manual_seed(0)
    for _, experts in find_experts(model):
        parts = {}
        for name, (W, bias) in split_weights(experts).items():
            families = torch.randn(2, *W.shape[1:], generator=g) / W.shape[-1] ** 0.5
            parts[name] = (families[groups] + 0.01 * torch.randn(W.shape, generator=g) / W.shape[-1] ** 0.5, bias)
        with torch.no_grad():
            for key, value in join_weights(experts, parts).items():
                getattr(experts, key).copy_(value)
    return model


def test_two_cores_find_two_planted_families_and_round_trip(tmp_path):
    groups = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
    model = planted_model(groups[: find_experts(tiny_model("qwen3_moe"))[0][1].num_experts])
    one, two = (copy.deepcopy(model) for _ in range(2))
    config = CompressionConfig(rank=1, method="delta")
    single = compress(one, config, progress=False)
    double = compress(two, CompressionConfig(rank=1, method="delta", num_cores=2), progress=False)
    assert double.rel_error < 0.2 * single.rel_error
    for experts in (m for m in two.modules() if isinstance(m, SharedCoreExperts)):
        for proj in experts.projections.values():
            assert proj.core.shape[0] == 2
            assert same_partition(proj.expert_core, groups[: proj.num_experts])
    save_compressed(two, tmp_path / "two")
    ids = token_ids()
    with torch.no_grad():
        assert torch.allclose(load_compressed(tmp_path / "two")(ids).logits, two(ids).logits, atol=1e-5)


def test_several_cores_are_refused_for_the_shared_basis_and_beyond_the_experts():
    for method in ("basis", "mixed"):
        with pytest.raises(ValueError, match=f"method={method} shares one basis .* use num_cores=1"):
            CompressionConfig(rank=2, method=method, num_cores=2)
    with pytest.raises(ValueError, match="num_cores"):
        compress(tiny_model("qwen3_moe"), CompressionConfig(rank=1, num_cores=64), progress=False)


def test_auto_cores_take_several_for_planted_families_and_streaming_chooses_alike(tmp_path):
    groups = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
    model = planted_model(groups[: find_experts(tiny_model("qwen3_moe"))[0][1].num_experts])
    model.save_pretrained(tmp_path / "model")
    config = CompressionConfig(target_ratio=0.8, method="delta", num_cores="auto")
    single = compress(copy.deepcopy(model), CompressionConfig(target_ratio=0.8, method="delta"), progress=False)
    report = compress(model, config, progress=False)
    chosen = {name: spec["num_cores"] for name, spec in model.config.quantization_config.modules.items()}
    assert all(k > 1 for k in chosen.values()) and report.rel_error < 0.2 * single.rel_error
    assert report.kept_fraction <= 0.8
    streamed = compress_checkpoint(tmp_path / "model", tmp_path / "out", config, progress=False)
    assert [(r.module, r.projection, r.rank) for r in streamed.rows] == \
        [(r.module, r.projection, r.rank) for r in report.rows]
    saved = load_compressed(tmp_path / "out").config.quantization_config.modules
    assert {name: spec["num_cores"] for name, spec in saved.items()} == chosen


def test_auto_cores_need_a_budget():
    with pytest.raises(ValueError, match="target_ratio"):
        CompressionConfig(rank=2, num_cores="auto")
