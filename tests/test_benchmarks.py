"""A smoke run of the whole benchmark at tiny sizes, so that it cannot rot. Timings here mean nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)  # every section at tiny sizes, two at a time, several in fresh processes: the longest test
def test_benchmark_smoke_run_writes_report_and_plots(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run_all", "--quick", "--jobs", "2", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("Quality at equal storage", "Fit speed", "Inference speed", "parameter-count claim",
                    "Distillation of the compressed testbed", "Streaming, parallel compression",
                    "Start-up cost of the loading hook", "Cost of calibration", "Where the budget goes",
                    "Quality against bits per weight", "Serving with vLLM at Qwen3-30B-A3B's shapes"):
        assert heading in report
    # the parameter-count section's worked example: Mixtral-8x7B's projection (8 experts of 14336 x 4096) at rank 64
    E, out_f, in_f, r = 8, 14336, 4096, 64
    assert "| per-expert SVD |" in report and f"{out_f * in_f + E * 2 * r * (out_f + in_f):,}" in report
    assert "| REAP pruning |" in report and "| HC-SMoE merging |" in report and "fine-grained testbed" in report
    for plot in ("quality_fine.png", "fit_speed.png", "distillation.png", "bits.png"):
        assert (tmp_path / "benchmarks" / plot).stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_step_times_compare_a_reconstruction_step_with_the_original_blocks():
    """`--step-times --quick` times the three steps of a testbed's block and says which way they compare, storing
    nothing."""
    command = [sys.executable, "-m", "benchmarks.reconstruction", "--step-times", "--quick"]
    stored = (ROOT / "benchmarks" / "results" / "calibration.json").read_text()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "A reconstruction step against a training step of the original block" in result.stdout
    assert "testbed: " in result.stdout and "ms against" in result.stdout and "in bf16" in result.stdout
    assert (ROOT / "benchmarks" / "results" / "calibration.json").read_text() == stored
