"""compress(): the module swap, the rank choice, the report, and bad input refused before any work."""

import re

import pytest
import torch
from conftest import token_ids, tiny_model

import moe_compress as mc
from moe_compress.compression.budget import choose_rank, stored_params
from moe_compress.discovery import find_experts, split_weights


def rebuilt_dense(model, compressed):
    """The original architecture with every expert weight rebuilt from the compressed model's factors."""
    with torch.no_grad():
        for name, module in compressed.named_modules():
            if isinstance(module, mc.SharedCoreExperts):
                for key, value in module.dense_state().items():
                    getattr(model.get_submodule(name), key).copy_(value)
    return model


@pytest.mark.parametrize("method", ["als", "adam", "delta"])
def test_compress_swaps_every_experts_module_and_reports(method):
    model = tiny_model("mixtral")
    report = mc.compress(model, mc.CompressionConfig(rank=2, method=method, adam_steps=20, polish_steps=5),
                         progress=False)
    swapped = [m for m in model.modules() if isinstance(m, mc.SharedCoreExperts)]
    assert len(swapped) == 2
    with pytest.raises(ValueError, match="already compressed"):
        mc.compress(model, mc.CompressionConfig(rank=2), progress=False)
    assert len(report.rows) == 6
    original = dict(find_experts(tiny_model("mixtral")))
    for row in report.rows:  # each row's error is ||W - What|| / ||W|| of its projection's weights, as rebuilt
        W = split_weights(original[row.module])[row.projection][0]
        W_hat = model.get_submodule(row.module).projections[row.projection].dense()
        assert row.rel_error == pytest.approx(((W - W_hat).norm() / W.norm()).item(), rel=1e-5)
    stored = sum(p.numel() for m in swapped for name, p in m.named_parameters() if not name.endswith("bias"))
    assert report.params_after == stored
    assert report.params_before == 2 * 4 * 3 * 64 * 32
    text = str(report)
    assert "total:" in text and f"{report.params_after:,}" in text
    with torch.no_grad():
        ids = token_ids()
        reference = rebuilt_dense(tiny_model("mixtral"), model)(ids).logits
        assert torch.allclose(model(ids).logits, reference, atol=1e-4)


def test_seed_gives_identical_results():
    first, again = tiny_model(), tiny_model()
    config = mc.CompressionConfig(rank=2, polish_steps=10)
    mc.compress(first, config, progress=False)
    mc.compress(again, config, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_target_ratio_picks_the_largest_rank_that_fits():
    config = mc.CompressionConfig(target_ratio=0.5, method="als")
    rank = choose_rank(config, "down", 8, 64, 32)
    original = 8 * 64 * 32
    assert stored_params(8, 64, 32, rank) <= 0.5 * original < stored_params(8, 64, 32, rank + 1)
    report = mc.compress(tiny_model("mixtral"), mc.CompressionConfig(target_ratio=0.5), progress=False)
    assert report.kept_fraction <= 0.5


def test_per_projection_ranks():
    model = tiny_model()
    report = mc.compress(model, mc.CompressionConfig(rank=2, ranks={"down": 1}), progress=False)
    assert {(r.projection, r.rank) for r in report.rows} == {("gate", 2), ("up", 2), ("down", 1)}


def test_rank_that_stores_more_than_the_original_is_refused():
    model = tiny_model()  # 4 experts of 32x32: rank 2 stores 2048 < 4096, rank 6 would store 7168
    message = "rank 6 stores more than the original for gate (E=4, 32x32); use rank <= 5 or target_ratio"
    with pytest.raises(mc.RankTooLargeError, match=re.escape(message)):
        mc.compress(model, mc.CompressionConfig(rank=6), progress=False)
    assert not any(isinstance(m, mc.SharedCoreExperts) for m in model.modules())
    with pytest.raises(mc.RankTooLargeError, match="target_ratio 0.01 is below what rank 1 stores"):
        mc.compress(model, mc.CompressionConfig(target_ratio=0.01), progress=False)


def test_nan_weights_are_refused_before_any_work():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj holds NaN or Inf"):
        mc.compress(model, mc.CompressionConfig(rank=2), progress=False)
    assert not any(isinstance(m, mc.SharedCoreExperts) for m in model.modules())


@pytest.mark.parametrize("kwargs,message", [
    ({}, "needs a size"),
    ({"rank": 2, "target_ratio": 0.3}, "both rank and target_ratio"),
    ({"target_ratio": 1.5}, "not a kept fraction"),
    ({"rank": 0}, "not a positive integer rank"),
    ({"rank": 2, "ranks": {"gate_up": 2}}, "unknown projections"),
    ({"rank": 2, "method": "svd"}, "method='svd' is unknown"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mc.CompressionConfig(**kwargs)


def test_calibration_data_is_a_data_config_and_the_flat_fields_of_0_1_still_work_with_a_warning():
    new = mc.CompressionConfig(target_ratio=0.3, calibration={"data": {"source": "testbed", "seq_len": 64}})
    assert new.calibration.data == mc.DataConfig(source="testbed", seq_len=64)
    with pytest.warns(FutureWarning, match=r"calibration source, seq_len are deprecated; set calibration.data"):
        old = mc.CompressionConfig(target_ratio=0.3, calibration={"source": "testbed", "seq_len": 64})
    assert old == new and old.calibration.source is None
    with pytest.warns(FutureWarning):  # no length given: the 2048 tokens those fields defaulted to
        assert mc.CalibrationConfig(source="testbed").data == mc.DataConfig(source="testbed", seq_len=2048)
    with pytest.warns(FutureWarning):  # a length alone leaves a data-free config data-free
        assert not mc.CalibrationConfig(seq_len=512).calibrated
    assert not mc.CompressionConfig(target_ratio=0.3).calibration.calibrated


def test_bfloat16_model_stays_bfloat16_and_computes_what_its_stored_factors_do():
    model = tiny_model().to(torch.bfloat16)
    mc.compress(model, mc.CompressionConfig(rank=2), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    in_fp32 = rebuilt_dense(tiny_model().to(torch.bfloat16).float(), model.float())  # stored values, run in fp32
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits, reference = model(token_ids()).logits.float(), in_fp32(token_ids()).logits
    # bf16 keeps 8 significant bits (2^-8 = 0.4% per rounding) and the activations round at every layer: measured
    # 0.44% relative; 2% bounds it, while a wrong kernel or layout is off by the logits' own size (100%)
    assert ((logits - reference).norm() / reference.norm()).item() < 0.02


def test_the_default_method_is_basis_or_mixed_with_calibration_data_and_delta_without():
    """With calibration data: mixed below kept 0.4, basis from it, each reconstructed."""
    assert mc.CompressionConfig(rank=2).method == "auto"
    ids = torch.randint(0, tiny_model().config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    chosen = {}
    for ratio in (0.38, 0.6, 0.8):  # 4 experts of 32 x 32: rank 1 takes 0.375
        for calibration in (None, ids):
            report = mc.compress(tiny_model(), mc.CompressionConfig(target_ratio=ratio), calibration=calibration,
                                 progress=False)
            chosen[ratio, calibration is not None] = report.config.method, len(report.blocks)
    assert chosen == {(0.38, False): ("delta", 0), (0.38, True): ("mixed", 2), (0.6, False): ("delta", 0),
                      (0.6, True): ("basis", 2), (0.8, False): ("delta", 0), (0.8, True): ("basis", 2)}
    assert mc.CompressionConfig(rank=2).for_data(True).method == "mixed"
    assert mc.CompressionConfig(target_ratio=0.5, num_cores=2).for_data(True).method == "delta"  # one core in basis


def test_a_rank_means_the_same_storage_in_every_form():
    stored = {}
    for method in ("als", "delta", "basis", "mixed"):
        model = tiny_model("qwen3_moe")
        report = mc.compress(model, mc.CompressionConfig(rank=2, method=method), progress=False)
        stored[method] = report.params_after
    assert stored["als"] == stored["delta"]
    assert 0.9 * stored["als"] < stored["basis"] <= stored["mixed"] <= stored["als"]  # the widest basis storing no more
    # mixed: the shared input basis for gate and up, delta for down
    shared = next(m for m in model.modules() if isinstance(m, mc.SharedCoreExperts))
    forms = {p: type(proj).__name__ for p, proj in shared.projections.items()}
    assert forms == {"gate": "BasisProjection", "up": "BasisProjection", "down": "DeltaProjection"}
    assert shared.projections["up"].shared == "in"
    with pytest.raises(mc.RankTooLargeError, match="use rank <= "):
        mc.compress(tiny_model("qwen3_moe"), mc.CompressionConfig(rank=40, method="basis"), progress=False)
