"""The whole pipeline as one command, on the testbed, tiny: compress, evaluate, distill with the watcher, report; and a
rank sweep ending in the trade-off plot."""

import json
import re
import subprocess
import sys

import pytest
from transformers import AutoConfig

from moe_compress.testbed import TESTBED_DIR

TINY = ["eval.limit=4", "training.max_steps=4", "training.save_steps=2", "training.per_device_train_batch_size=2",
        "data.seq_len=64", "compression.polish_steps=5", "compression.calibration.num_sequences=8",
        "compression.reconstruction.steps=5"]


def pipeline(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moe_compress", "pipeline", *args], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_pipeline_writes_a_report_with_every_stage(tmp_path):
    run = tmp_path / "run"
    # settings the watcher once dropped: the checkpoints must be scored as the teacher is
    result = pipeline(*TINY, "eval.max_length=128", "eval.dtype=float32", "distill.teacher_quantization=4bit",
                      f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning" not in result.stderr
    report = (run / "report.md").read_text()
    config = AutoConfig.from_pretrained(TESTBED_DIR)  # layers x (gate, up, down) x experts x width x hidden
    expert_params = config.num_hidden_layers * 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size
    assert re.search(r"\| teacher in memory while distilling \| [\d.]+ MiB resident, 0\.2\dx its [\d.]+ MiB in bf16 \|",
                     report), report
    for text in (f"{expert_params:,}", "kept fraction", "compressed, zero-shot", "distilled, step 2", "distilled, step 4",
                 "bits_per_byte", "acc_norm", "| distill |", "| compress |", "8 sequences of 256 tokens of testbed"):
        assert text in report, text
    for figure in ("compressed/compression_error.png", "compressed/calibration_coverage.png", "eval/scores.png"):
        assert (run / figure).stat().st_size > 5000
    assert (run / ".hydra" / "config.yaml").exists() and (run / "distill" / "training_complete.json").exists()
    scored = [(row["step"], row["task"], row["metric"]) for row in map(json.loads, (run / "eval" / "results.jsonl").open())]
    # the watcher scores the compressed model before training as step 0: the plot shows the whole recovery
    assert sorted(set(scored)) == sorted(scored) and {s for s, _, _ in scored} == {0, 2, 4}
    settings = {"limit": 4, "max_length": 128, "dtype": "float32"}
    assert all(row["settings"] == settings for row in map(json.loads, (run / "eval" / "results.jsonl").open()))
    teacher = json.loads((run / "eval" / "teacher_scores.json").read_text())
    assert teacher and all(key.endswith(" | limit=4.0 | max_length=128 | dtype=float32") for key in teacher)


@pytest.mark.slow
def test_rank_sweep_ends_with_the_tradeoff_plot(tmp_path):
    sweep = tmp_path / "sweep"
    # scored in fp32: on a CPU without native bf16 matmuls the bf16 folders' scoring took a third of the test
    result = pipeline("-m", "compression.rank=1,4", "compression.target_ratio=null", *TINY, "training.max_steps=2",
                      "eval.dtype=float32", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert summaries[0]["kept_fraction"] < summaries[1]["kept_fraction"]
    assert (sweep / "tradeoff.png").stat().st_size > 5000
    table = (sweep / "tradeoff.md").read_text()
    assert "| 1 |" in table and "| 4 |" in table


@pytest.mark.slow
def test_print_resolved_config_of_a_preset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moe_compress", "pipeline", "model=qwen3_30b_a3b", "--cfg", "job"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: Qwen/Qwen3-30B-A3B" in result.stdout and "rank: 64" in result.stdout
    assert "source: HuggingFaceFW/fineweb-edu" in result.stdout and "eval: 6,7" in result.stdout and "max_steps: 2000" in result.stdout
