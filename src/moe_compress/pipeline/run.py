"""The whole experiment in one call: compress, score the teacher, distill while a watcher scores the zero-shot student
(step 0) and each checkpoint in its own process (on its own device), then write the report."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainingArguments

from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.from_folder import compress_checkpoint
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill, load_teacher
from moe_compress.evaluate import EvalConfig, teacher_scores
from moe_compress.folder.load import load_compressed, load_tokenizer, local_model_folder
from moe_compress.pipeline.folders import PipelineRun
from moe_compress.pipeline.report import write_report


def compress_stage(run: PipelineRun, model: str, config: CompressionConfig) -> None:
    """Streamed from the checkpoint's safetensors: memory bounded by a few layers, resumable after a crash."""
    run.report = compress_checkpoint(local_model_folder(model), run.compressed, config, overwrite=False, progress=True)


def start_watcher(run: PipelineRun, teacher: str, config: EvalConfig, devices: str | None) -> subprocess.Popen:
    """`moe-compress eval watch=...` in a process of its own, on the evaluation devices."""
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices
    overrides = [f"watch={run.distill_dir}", "wait_for_dir=true", f"teacher={teacher}", f"results_dir={run.eval_dir}",
                 f"initial={run.compressed}",
                 f"tasks=[{','.join(config.tasks)}]", f"limit={'null' if config.limit is None else config.limit}",
                 f"batch_size={config.batch_size}", f"device={config.device}", f"hydra.run.dir={run.eval_dir}/hydra"]
    log = open(run.folder / "watcher.log", "w")
    return subprocess.Popen([sys.executable, "-m", "moe_compress", "eval", *overrides], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _timed(run: PipelineRun, stage: str, started: float) -> None:
    run.seconds[stage] = time.perf_counter() - started


def run_pipeline(folder: str | Path, model: str, teacher: str, compression: CompressionConfig,
                 distillation: DistillationConfig, data: DataConfig, evaluation: EvalConfig, training: dict,
                 dtype: str = "auto", eval_devices: str | None = None) -> PipelineRun:
    """Compress `model`, score it and its teacher, distill it with a watcher beside, write report.md in `folder`."""
    run = PipelineRun(Path(folder))
    run.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    compress_stage(run, model, compression)
    _timed(run, "compress", started)

    started = time.perf_counter()
    run.eval_dir.mkdir(exist_ok=True)
    baseline = teacher_scores(teacher, evaluation, cache=run.eval_dir / "teacher_scores.json")
    _timed(run, "evaluate teacher", started)

    started = time.perf_counter()
    watcher = start_watcher(run, teacher, evaluation, eval_devices)
    try:
        student = load_compressed(run.compressed, dtype=dtype)
        tokenizer = load_tokenizer(run.compressed, f"the compressed folder takes its tokenizer from {model}: give "
                                   "that model folder tokenizer files")
        args = TrainingArguments(output_dir=str(run.distill_dir), **training)
        distill(student, load_teacher(teacher, distillation.teacher_quantization, dtype), tokenizer, data,
                distillation, args)
    except BaseException:
        watcher.terminate()  # it would wait for an end marker that never comes
        raise
    _timed(run, "distill", started)
    started = time.perf_counter()
    if watcher.wait() != 0:
        raise RuntimeError(f"the checkpoint watcher failed; see {run.folder / 'watcher.log'}")
    _timed(run, "finish scoring checkpoints", started)
    write_report(run, model, baseline)
    return run
