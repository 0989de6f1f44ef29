"""The whole experiment in one call: compress, score the teacher, distill while a watcher scores the zero-shot student
(step 0) and each checkpoint in its own process (on its own device), then write the report."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainingArguments

from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.from_folder import compress_checkpoint
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill, load_teacher, teacher_memory, training_dtype
from moe_compress.evaluate import EvalConfig, teacher_scores, watch
from moe_compress.folder.load import load_compressed, load_tokenizer, local_model_folder
from moe_compress.pipeline.folders import PipelineRun
from moe_compress.pipeline.report import write_report


def compress_stage(run: PipelineRun, model: str, config: CompressionConfig) -> None:
    """Streamed from the checkpoint's safetensors: memory bounded by a few layers, resumable after a crash."""
    run.report = compress_checkpoint(local_model_folder(model), run.compressed, config, overwrite=False, progress=True)


def watch_into_log(log: Path, **kwargs: Any) -> None:
    """evaluate.watch(**kwargs), everything the process prints (its libraries' C code included) going to `log`."""
    with open(log, "w") as out:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(out.fileno(), stream.fileno())
        watch(**kwargs)


@contextmanager
def visible_devices(devices: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES set to `devices` for the block: a process started within sees only them. The training's
    own CUDA context, if any, was made before and keeps its devices."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def start_watcher(run: PipelineRun, teacher: str, config: EvalConfig, devices: str | None) -> BaseProcess:
    """The checkpoint watcher (evaluate.watch) in a process of its own, on the evaluation devices, given the
    pipeline's EvalConfig whole: the checkpoints are scored with every setting the teacher is. Its output goes to
    watcher.log."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
    process = context.Process(target=watch_into_log, args=(run.folder / "watcher.log",), kwargs=dict(
        run_dir=run.distill_dir, config=config, teacher=teacher, results_dir=run.eval_dir, wait_for_dir=True,
        initial=run.compressed))
    with visible_devices(devices):
        process.start()
    return process


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
        args = TrainingArguments(output_dir=str(run.distill_dir), **training)
        dtype = training_dtype(dtype, args)
        student = load_compressed(run.compressed, dtype=dtype)
        tokenizer = load_tokenizer(run.compressed, f"the compressed folder takes its tokenizer from {model}: give "
                                   "that model folder tokenizer files")
        teacher_model = load_teacher(teacher, distillation.teacher_quantization, dtype)
        run.teacher = teacher_memory(teacher_model)
        distill(student, teacher_model, tokenizer, data, distillation, args)
    except BaseException:
        watcher.terminate()  # it would wait for an end marker that never comes
        raise
    _timed(run, "distill", started)
    started = time.perf_counter()
    watcher.join()
    if watcher.exitcode != 0:
        raise RuntimeError(f"the checkpoint watcher failed; see {run.folder / 'watcher.log'}")
    _timed(run, "finish scoring checkpoints", started)
    write_report(run, model, baseline)
    return run
