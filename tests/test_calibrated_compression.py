"""Compression with calibration data: fits in the metric of the routed inputs, in memory and streamed from a
checkpoint folder (statistics gathered layer by layer with the layers offloaded, then reused at another size), the
coverage report, and the command line."""

import copy
import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import calibration_ids, tiny_model

import moe_compress as mc
from moe_compress import fit
from moe_compress.calibration.observe import observe
from moe_compress.calibration.grams import ExpertGrams
from moe_compress.compression.fitting import fit_into
from moe_compress.data import DataConfig, calibration_sequences
from moe_compress.discovery import find_experts, split_weights
from moe_compress.calibration.offloaded import compute_dtype
from moe_compress.calibration.store import load_statistics
from moe_compress.parallel import Manifest
from moe_compress.folder.load import load_tokenizer
from moe_compress.testbed import TESTBEDS

VOCAB = 128


@pytest.mark.parametrize("method", ["als", "delta"])
def test_calibrated_fits_have_the_lower_error_on_the_routed_inputs(method):
    ids = calibration_ids()
    original = tiny_model("qwen3_moe")
    grams = observe(original, ids, ExpertGrams, progress=False)  # the first layer's inputs equal in both passes
    weights = {name: split_weights(experts) for name, experts in find_experts(original)}
    config = mc.CompressionConfig(rank=2, method=method, polish_steps=0)
    free, calibrated = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    mc.compress(free, config, progress=False)
    report = mc.compress(calibrated, config, calibration=ids, progress=False)
    name = "model.layers.0.mlp.experts"
    for projection in ("gate", "up", "down"):
        metric = grams[name].metric(projection, config.calibration.regularisation)
        W = weights[name][projection][0]
        errors = [fit.relative_error(W, m.get_submodule(name).projections[projection].dense().detach(), metric)
                  for m in (free, calibrated)]
        assert errors[1] < errors[0]
        row = next(r for r in report.rows if r.module == name and r.projection == projection)
        assert row.output_error == pytest.approx(errors[1], rel=1e-4)
    assert report.coverage[name] == grams[name].tokens.tolist()
    assert sum(report.coverage[name]) == ids.numel() * original.config.num_experts_per_tok

CLOSED_FORM = {"steps": 0}  # these tests check the closed-form fits: no reconstruction trains them on


def test_compressed_propagation_feeds_each_layer_what_the_compressed_layers_before_it_output():
    ids = calibration_ids()
    config = mc.CompressionConfig(rank=1, polish_steps=0, calibration={"propagate": "compressed"},
                                  reconstruction=CLOSED_FORM)
    weights = split_weights(tiny_model("qwen3_moe").model.layers[1].mlp.experts)
    fitted = {}
    for propagate in ("compressed", "original"):
        model = tiny_model("qwen3_moe")
        mc.compress(model, dataclasses.replace(config, calibration={"propagate": propagate}), calibration=ids,
                    progress=False)
        fitted[propagate] = model
    hybrid = tiny_model("qwen3_moe")  # layer 0 compressed as above, layer 1 still original
    hybrid.model.layers[0].mlp.experts = fitted["compressed"].model.layers[0].mlp.experts
    grams = observe(hybrid, ids, ExpertGrams, progress=False)["model.layers.1.mlp.experts"]
    for projection in ("gate", "up", "down"):
        reference = copy.deepcopy(fitted["compressed"].model.layers[1].mlp.experts.projections[projection])
        metric = grams.metric(projection, config.calibration.regularisation)
        fit_into(reference, weights[projection][0], None, config, torch.device("cpu"), metric)
        dense = {p: m.model.layers[1].mlp.experts.projections[projection].dense() for p, m in fitted.items()}
        gaps = {p: (d - reference.dense()).abs().max().item() for p, d in dense.items()}
        # measured: below 1e-5 (fp32 sums in another order) against above 2e-3 (other inputs, another fit)
        assert gaps["compressed"] < 5e-5 and gaps["original"] > 5e-4


def assert_streamed_fits_are_fits_on_the_saved_statistics(tmp_path, model_type, ids, config) -> dict:
    """The statistics saved beside tmp_path/sc are those of the in-memory pass rounded to bf16 (the saved form), and
    every factor in the folder is a fit on them; the in-memory coverage."""
    original = tiny_model(model_type)
    observed = observe(original, ids, ExpertGrams, progress=False)  # propagate=original: the layers' own inputs
    (statistics,) = tmp_path.glob(".moe-compress-statistics-*")
    streamed = mc.load_compressed(tmp_path / "sc")
    for name, grams in observed.items():
        saved = load_statistics(Manifest(statistics), name)
        assert torch.equal(saved.tokens, grams.tokens)
        for full, restored in ((grams.inputs, saved.inputs), (grams.intermediate, saved.intermediate)):
            scale = full.diagonal(dim1=1, dim2=2).amax(-1)[:, None, None]
            assert ((restored - full).abs() <= 2**-8 * scale).all()  # bf16 keeps 8 significant bits
        for projection, (W, bias) in split_weights(original.get_submodule(name)).items():
            fitted = streamed.get_submodule(name).projections[projection]
            reference = copy.deepcopy(fitted)
            fit_into(reference, W.detach(), bias, config, torch.device("cpu"),
                     saved.metric(projection, config.calibration.regularisation))
            assert torch.allclose(fitted.dense(), reference.dense(), atol=1e-5), (name, projection)
    return {name: grams.tokens.tolist() for name, grams in observed.items()}


def test_a_checkpoint_folder_compresses_as_the_loaded_model_and_reuses_its_statistics(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    ids = calibration_ids()
    config = mc.CompressionConfig(rank=2, polish_steps=0, reconstruction=CLOSED_FORM)
    report = mc.compress_checkpoint(tmp_path / "model", tmp_path / "sc", config, calibration=ids, progress=False)
    assert report.coverage == assert_streamed_fits_are_fits_on_the_saved_statistics(tmp_path, "qwen3_moe", ids, config)
    saved = json.loads((tmp_path / "sc" / "compression_report.json").read_text())
    assert saved["coverage"] == report.coverage and (tmp_path / "sc" / "calibration_coverage.png").exists()
    (statistics,) = tmp_path.glob(".moe-compress-statistics-*")
    stamps = {p: p.stat().st_mtime_ns for p in statistics.rglob("*.safetensors")}
    other = mc.compress_checkpoint(tmp_path / "model", tmp_path / "sc1", mc.CompressionConfig(rank=1, polish_steps=0,
                                   reconstruction=CLOSED_FORM), calibration=ids, progress=False)  # reused statistics
    assert other.coverage == report.coverage
    assert {p: p.stat().st_mtime_ns for p in statistics.rglob("*.safetensors")} == stamps


def test_a_bf16_checkpoint_is_calibrated_in_fp32_on_the_cpu(tmp_path):
    """On the CPU the statistics pass runs a bf16 checkpoint's layers in fp32 (oneDNN's bf16 kernels, cached per
    shape, grew memory with depth): its statistics are those of the same weights in fp32, to bf16 rounding (the saved
    form, and each layer's outputs kept in bf16 between layers). On a GPU the layers run as stored."""
    tiny_model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path / "model")
    ids = calibration_ids()
    mc.compress_checkpoint(tmp_path / "model", tmp_path / "sc", mc.CompressionConfig(rank=1, polish_steps=0),
                           calibration=ids, progress=False)
    (statistics,) = tmp_path.glob(".moe-compress-statistics-*")
    # measured: within 3.7e-3 of the diagonal's largest; the bf16 pass moves 2 tokens and is off by 6e-2 in layer 0
    upcast = tiny_model("qwen3_moe").to(torch.bfloat16).float()
    for name, grams in observe(upcast, ids, ExpertGrams, progress=False).items():
        saved = load_statistics(Manifest(statistics), name)
        assert torch.equal(saved.tokens, grams.tokens)
        for full, restored in ((grams.inputs, saved.inputs), (grams.intermediate, saved.intermediate)):
            scale = full.diagonal(dim1=1, dim2=2).amax(-1)[:, None, None]
            assert ((restored - full).abs() <= 2**-7 * scale).all()
    assert compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert compute_dtype(torch.bfloat16, "cuda:0") is None and compute_dtype(torch.float32, "cpu") is None


def test_a_hybrid_model_compresses_with_calibration_in_memory_and_streamed_alike(tmp_path):
    """nemotron_h: mamba, attention, MLP and MoE layers (the decoder loop reads each layer's block_type), gate-less
    experts in one layer of four, and layers without experts after it."""
    tiny_model("nemotron_h").save_pretrained(tmp_path / "model")
    ids = calibration_ids()
    config = mc.CompressionConfig(rank=1, polish_steps=0, reconstruction=CLOSED_FORM)
    in_memory = tiny_model("nemotron_h")
    report = mc.compress(in_memory, config, calibration=ids, progress=False)
    streamed = mc.compress_checkpoint(tmp_path / "model", tmp_path / "sc", config, calibration=ids, progress=False)
    coverage = assert_streamed_fits_are_fits_on_the_saved_statistics(tmp_path, "nemotron_h", ids, config)
    assert report.coverage == streamed.coverage == coverage
    assert list(coverage) == ["model.layers.1.mixer.experts"]
    assert sum(coverage["model.layers.1.mixer.experts"]) == ids.numel() * in_memory.config.num_experts_per_tok


def test_experts_short_of_calibration_tokens_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"experts received fewer calibration tokens than their input size \("
                                         r"model.layers.0.mlp.experts: .*add calibration data"):
        mc.compress(tiny_model("qwen3_moe"), mc.CompressionConfig(rank=1, polish_steps=0),
                    calibration=calibration_ids(1, 4), progress=False)


def test_bad_calibration_input_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="calibration token ids must be an integer tensor"):
        mc.compress(tiny_model("qwen3_moe"), mc.CompressionConfig(rank=1), calibration=torch.rand(2, 4),
                    progress=False)
    with pytest.raises(ValueError, match="propagate='both' is unknown"):
        mc.CompressionConfig(rank=1, calibration={"propagate": "both"})
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="set compression.calibration.propagate=original"):
        mc.compress_checkpoint(tmp_path / "model", tmp_path / "sc",
                               mc.CompressionConfig(rank=1, calibration={"propagate": "compressed"}),
                               calibration=calibration_ids(), progress=False)


@pytest.mark.slow
def test_the_command_calibrates_on_the_testbed_corpus(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moe_compress", "compress", "compression.target_ratio=0.3",
         "compression.polish_steps=0", "compression.calibration.data.source=testbed",
         "compression.calibration.num_sequences=8", "compression.calibration.data.seq_len=64",
         "compression.reconstruction.steps=5", f"output_dir={tmp_path / 'sc'}"],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "sc" / "compression_report.json").read_text())
    assert report["config"]["calibration"]["data"]["source"] == "testbed"
    assert all(sum(tokens) == 8 * 64 * 2 for tokens in report["coverage"].values())  # top-2 of 8 experts
    assert all(row["output_error"] is not None for row in report["rows"])


def test_calibration_windows_of_local_text_are_spread_over_its_training_part_and_apart(tmp_path):
    lines = [f"line {i:04d}: the quick brown fox jumps over the lazy dog\n" for i in range(400)]
    (tmp_path / "corpus.txt").write_text("".join(lines))
    train = "".join(lines[:360])  # the last tenth is held out
    tokenizer = load_tokenizer(TESTBEDS["testbed"], "the testbed has its tokenizer")
    config = DataConfig(source=str(tmp_path / "corpus.txt"), seq_len=64)
    windows = calibration_sequences(config, tokenizer, 8)
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    places = [train.index(tokenizer.decode(window)) for window in windows.tolist()]  # each one is training text
    assert places == sorted(places) and all(b - a >= 64 for a, b in itertools.pairwise(places))  # apart
    assert places[0] < len(train) / 8 <= places[1] and places[-1] >= len(train) * 7 / 8 - 64  # spread evenly
    with pytest.raises(ValueError, match="fewer than 400 sequences of 64 tokens apart from one another"):
        calibration_sequences(config, tokenizer, 400)
