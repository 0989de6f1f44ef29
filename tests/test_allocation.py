"""Global rank allocation: the greedy split against brute force, the curves against the fits they stand for, and
the allocation through compress and compress_checkpoint."""

import itertools
import json
import random

import pytest
import torch
from conftest import calibration_ids, experts_like, metrics_like, tiny_model

from moe_compress import CompressionConfig, compress, compress_checkpoint, fit, load_compressed
from moe_compress.compression.allocation import Curve, allocate, error_curve
from moe_compress.calibration.observe import observe
from moe_compress.calibration.grams import ExpertGrams
from moe_compress.compression import allocation, engine, from_folder
from moe_compress.compression.fitting import module_curves
from moe_compress.compression.in_memory import plan
from moe_compress.discovery import split_weights


def convex_curve(rng: random.Random, length: int) -> list[float]:
    """Decreasing, convex errors: a start minus the cumulative sum of decreasing gains."""
    gains = sorted((rng.random() for _ in range(length - 1)), reverse=True)
    start = sum(gains) + rng.random()
    return [start - sum(gains[:r]) for r in range(length)]


def brute_force(curves: dict[str, Curve], budget: float) -> float:
    best = float("inf")
    for ranks in itertools.product(*(range(1, len(c.errors)) for c in curves.values())):
        cost = sum(c.base + r * c.step for c, r in zip(curves.values(), ranks))
        if cost <= budget:
            best = min(best, sum(c.errors[r] for c, r in zip(curves.values(), ranks)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_allocation_is_optimal_for_separable_convex_curves_of_equal_steps(seed):
    rng = random.Random(seed)
    curves = {f"u{i}": Curve(convex_curve(rng, 6), base=rng.randint(0, 5), step=3) for i in range(4)}
    floor = sum(c.base + c.step for c in curves.values())
    for budget in (floor, floor + 4, floor + 13, floor + 30, floor + 100):
        ranks = allocate(curves, budget)
        assert sum(curves[u].base + r * curves[u].step for u, r in ranks.items()) <= budget
        assert sum(curves[u].errors[r] for u, r in ranks.items()) == pytest.approx(brute_force(curves, budget))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_never_exceeds_the_budget_and_spends_what_it_can(seed):
    rng = random.Random(seed)
    curves = {f"u{i}": Curve(convex_curve(rng, 12), base=rng.randint(0, 50), step=rng.randint(1, 40))
              for i in range(5)}
    budget = sum(c.base + c.step for c in curves.values()) + rng.randint(0, 300)
    ranks = allocate(curves, budget)
    spent = sum(curves[u].base + r * curves[u].step for u, r in ranks.items())
    assert spent <= budget
    # no unit could take one more step: each is at its last rank or its step no longer fits
    assert all(r == len(curves[u].errors) - 1 or spent + curves[u].step > budget for u, r in ranks.items())


def test_a_budget_below_the_starting_ranks_is_refused_and_starts_are_kept():
    curves = {"a": Curve([1.0, 0.5, 0.2, 0.1], base=10, step=5), "b": Curve([1.0, 0.9, 0.85, 0.8], base=10, step=5)}
    with pytest.raises(ValueError, match="larger target_ratio"):
        allocate(curves, 14)
    assert allocate(curves, 40, start={"a": 1, "b": 2}) == {"a": 2, "b": 2}


@pytest.mark.parametrize("with_metric", [False, True])
def test_delta_curve_is_the_error_of_the_first_round_of_delta_at_each_rank(with_metric):
    W = experts_like(E=5, out_f=20, in_f=12).double()
    M = metrics_like(E=5, in_f=12).double() if with_metric else None
    curve = error_curve(W, "delta", "up", 6, metric=M)
    for rank in range(1, 7):
        fitted = fit.fit_delta(W, rank, iters=1, metric=M)
        expected = fit.relative_error(W, fitted["core"] + fitted["u"] @ fitted["v"].mT, M) ** 2
        assert curve.errors[rank] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert curve.step == 5 * 2 * (20 + 12) and curve.base == 20 * 12


@pytest.mark.parametrize("projection", ["up", "down"])
def test_data_free_basis_curve_is_the_basis_fit_error(projection):
    W = experts_like(E=5, out_f=20, in_f=12).double()
    curve = error_curve(W, "basis", projection, 8)
    for k in (1, 3, 8):
        fitted = fit.fit_basis(W, k, "out" if projection == "down" else "in")
        assert curve.errors[k] == pytest.approx(fit.relative_error(W, fitted["core"] + fitted["u"] @ fitted["v"].mT) ** 2,
                                                rel=1e-6)


@pytest.mark.parametrize("form", ["delta", "basis"])
@pytest.mark.parametrize("projection", ["up", "down"])
def test_curves_taken_a_few_experts_at_a_time_equal_those_taken_at_once(monkeypatch, form, projection):
    """The curves go through the experts in chunks (an fp64 copy of every expert's metric is 4.3 GiB at Qwen3's
    shape); in several groups of experts and in a metric, the chunks change nothing but rounding."""
    W = experts_like(E=7, out_f=20, in_f=12)
    M, groups = metrics_like(E=7, in_f=12), torch.tensor([0, 1, 0, 1, 1, 0, 0])
    at_once = error_curve(W, form, projection, 6, groups, M)
    monkeypatch.setattr(allocation, "CHUNK_ELEMENTS", 2 * 20 * 12)  # two experts a chunk
    in_chunks = error_curve(W, form, projection, 6, groups, M)
    assert in_chunks.errors == pytest.approx(at_once.errors, rel=1e-9, abs=1e-15)
    assert (in_chunks.base, in_chunks.step) == (at_once.base, at_once.step)


def test_global_allocation_spends_what_uniform_ranks_leave_and_lowers_the_summed_error():
    uniform, globally = (compress(tiny_model("qwen3_moe"), CompressionConfig(target_ratio=0.4, method="delta",
                                                                             rank_allocation=a), progress=False)
                         for a in ("uniform", "global"))
    assert uniform.kept_fraction < globally.kept_fraction <= 0.4
    assert all(g.rank >= u.rank for g, u in zip(globally.rows, uniform.rows))
    assert len({r.rank for r in globally.rows}) > 1  # the units' curves differ, so do their ranks
    summed = lambda report: sum(r.rel_error**2 for r in report.rows)  # what the allocation minimises, data-free
    assert summed(globally) < summed(uniform)


def test_global_allocation_needs_a_budget():
    with pytest.raises(ValueError, match="target_ratio"):
        CompressionConfig(rank=4, rank_allocation="global")
    assert CompressionConfig(rank=4).rank_allocation == "uniform"
    assert CompressionConfig(target_ratio=0.3).rank_allocation == "global"


@pytest.mark.parametrize("method", ["delta", "basis", "mixed"])
def test_streamed_global_allocation_equals_in_memory_and_a_rerun_reuses_its_curves(tmp_path, monkeypatch, method):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    config = CompressionConfig(target_ratio=0.4, method=method)
    in_memory = tiny_model("qwen3_moe")
    expected = compress(in_memory, config, progress=False)

    def crash(*args, **kwargs):
        raise RuntimeError("killed after the curves")
    with monkeypatch.context() as patch:
        patch.setattr(from_folder, "fit_share", crash)
        with pytest.raises(RuntimeError, match="killed"):
            compress_checkpoint(tmp_path / "model", tmp_path / "out", config, progress=False)
    curves = sorted((tmp_path / ".out.moe-compress-work" / "curves").glob("*.json"))
    assert len(curves) == len(expected.rows) // 3  # one file per experts module
    computed = []
    monkeypatch.setattr(engine, "module_curves", lambda *args, **kw: computed.append(args[1]))
    report = compress_checkpoint(tmp_path / "model", tmp_path / "out", config, progress=False)
    assert computed == []  # the rerun read the saved curves
    assert [(r.module, r.projection, r.rank) for r in report.rows] == \
        [(r.module, r.projection, r.rank) for r in expected.rows]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules"]
    assert {name: spec["ranks"] for name, spec in saved.items()} == \
        {name: {r.projection: r.rank for r in expected.rows if r.module == name} for name in saved}
    loaded = load_compressed(tmp_path / "out")
    for name, module in loaded.named_modules():
        if hasattr(module, "projections"):
            for projection, proj in module.projections.items():
                reference = in_memory.get_submodule(name).projections[projection]
                assert torch.allclose(proj.dense(), reference.dense(), atol=1e-5)


@pytest.mark.parametrize("method", ["delta", "basis"])
def test_calibrated_global_allocation_spends_the_budget_on_the_calibrated_curves(method):
    ids = calibration_ids()
    config = CompressionConfig(target_ratio=0.4, method=method)
    original = tiny_model("qwen3_moe")
    observed = observe(original, ids, ExpertGrams, progress=False)  # each layer's own inputs: propagate=original
    curves, specs = {}, plan(original, config.for_data(True))
    for name, grams in observed.items():
        found = module_curves(split_weights(original.get_submodule(name)), specs[name], config.for_data(True),
                              torch.device("cpu"), grams)[0]
        curves.update({(name, p): curve for p, curve in found.items()})
    params = sum(W.numel() for name in observed for W, _ in split_weights(original.get_submodule(name)).values())
    uniform = compress(tiny_model("qwen3_moe"), CompressionConfig(target_ratio=0.4, method=method,
                                                                  rank_allocation="uniform"), progress=False)
    expected = allocate(curves, 0.4 * params, start={(r.module, r.projection): r.rank for r in uniform.rows})
    report = compress(tiny_model("qwen3_moe"), config, calibration=ids, progress=False)
    assert {(r.module, r.projection): r.rank for r in report.rows} == expected
    assert report.kept_fraction <= 0.4
