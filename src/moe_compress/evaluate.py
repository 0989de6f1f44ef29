"""Scoring with lm-evaluation-harness: one model, or every checkpoint of a training run while it trains.

    config = EvalConfig(tasks=["tinyshakespeare", "arc_easy"], device="cuda:7")
    scores = evaluate_model("out/sc30", config)            # {task: {metric: value}}
    watch("out/distill", config, teacher="testbed")         # returns once the run has written its end marker

Scores are lm-eval's own (`simple_evaluate` on an `HFLM` wrapping the loaded model), so any lm-eval task name works;
the tasks in moe_compress/tasks run offline. The watcher polls the run's folder and scores each checkpoint-N once the
Trainer has finished writing it, lowest step first. Each score is a line of results.jsonl (step, task, metric, value,
time), which a restarted watcher reads to skip what is done; scores.png (each metric against step, the teacher's as a
dashed line) is redrawn after each checkpoint, and tensorboard or wandb receive the same values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import importlib.util
import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from moe_compress.folder.load import load_model, load_tokenizer, model_family
from moe_compress.training_run import CHECKPOINT, END_MARKER, complete_checkpoints
from moe_compress.tasks import TASKS_DIR
from moe_compress.testbed import TESTBEDS, resolve_bundled

DEFAULT_TASKS = ("tinyshakespeare", "tinyshakespeare_completion")
RESULTS_FILE, PLOT_FILE, TEACHER_FILE = "results.jsonl", "scores.png", "teacher_scores.json"
TRACKERS = ("none", "tensorboard", "wandb")
STEP_METRIC = "train/global_step"  # the x axis transformers' WandbCallback gives training logs
Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class EvalConfig:
    """What to score and how: lm-eval task names, examples per task, batch, context, device and dtype."""

    tasks: tuple[str, ...] = DEFAULT_TASKS  # lm-eval task, group or tag names
    limit: Optional[float] = None  # at most this many examples per task (a fraction when < 1): for quick looks
    batch_size: int = 16
    max_length: Optional[int] = None  # context in tokens; None: the model's (max_position_embeddings)
    device: str = "auto"  # auto: cuda when available, else cpu; a loaded model is scored where it is
    dtype: str = "auto"  # auto: the checkpoint's

    def __post_init__(self):
        object.__setattr__(self, "tasks", (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks))
        if not self.tasks:
            raise ValueError("tasks is empty; name at least one lm-eval task, e.g. tasks=[tinyshakespeare]")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit={self.limit} must be > 0, or null to score every example")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 tokens, or null for the model's")

    @property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


# lm-eval and matplotlib are imported where used: `import moe_compress` stays fast and needs neither.
@functools.cache
def _task_manager(packaged_only: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not packaged_only)


def resolve_tasks(tasks: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """(lm-eval TaskManager, task names) for `tasks`, tags (ai2_arc) expanded into the tasks they tag, since lm-eval
    reports those one by one. The packaged tasks alone are indexed when they suffice: indexing lm-eval's thousands of
    task files takes seconds. An unknown name raises with the closest known names."""
    manager = _task_manager(True)
    if not set(tasks) <= set(manager.all_tasks):
        manager = _task_manager(False)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown lm-eval task {name!r}; {hint}`lm-eval ls tasks` lists them all")
    tags, expanded = set(manager.all_tags), []
    for name in tasks:
        expanded += sorted(n for n, e in manager.task_index.items() if name in e.tags) if name in tags else [name]
    return manager, tuple(dict.fromkeys(expanded))


def _language_model(model: str | os.PathLike | nn.Module, tokenizer: str | PreTrainedTokenizerBase | None,
                    config: EvalConfig):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer= (an object, folder or hub id)")
    else:
        tokenizer = tokenizer if tokenizer is not None else model
        model = load_model(resolve_bundled(model), dtype=config.dtype, device_map=config.torch_device)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = load_tokenizer(tokenizer, "pass tokenizer= a folder or hub id that has one, e.g. the teacher's")
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=config.batch_size,
                max_length=config.max_length)


def _metrics(task: str, entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "metric,filter" values of one task, standard errors left out; the filter is kept unless "none"."""
    metrics = {key.removesuffix(",none"): float(value) for key, value in entry.items()
               if "," in key and "_stderr," not in key and isinstance(value, (int, float))}
    if not metrics:
        raise ValueError(f"lm-eval reported no metric for {task!r} (a group without an aggregate?); "
                         "name its tasks instead")
    return metrics


def evaluate_model(model: str | os.PathLike | nn.Module, config: EvalConfig = EvalConfig(),
                   tokenizer: str | PreTrainedTokenizerBase | None = None) -> Scores:
    """Scores of `model` on config.tasks by lm-eval: {task: {metric: value}}, a group (mmlu) as its aggregate.

    `model` is a hub id, a local or compressed folder, "testbed", or a loaded model (then give its tokenizer).
    The tokenizer defaults to the model's folder."""
    from lm_eval import simple_evaluate

    manager, tasks = resolve_tasks(config.tasks)
    lm = _language_model(model, tokenizer, config)
    # stderr bootstraps cost more than scoring a small task, and nothing here reports them
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=config.limit,
                              bootstrap_iters=0, log_samples=False)
    return {task: _metrics(task, results["results"][task]) for task in tasks}


def format_scores(scores: Scores) -> str:
    """A plain-text table: task, metric, value."""
    rows = [("task", "metric", "value")] + [(task, metric, f"{value:.4f}") for task, metrics in scores.items()
                                            for metric, value in metrics.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, renamed over it: readers, and a watcher restarted after a kill,
    see the old file or the new one, never half of one."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_json_lines(path: Path, rows: list[dict]) -> None:
    _replace_atomically(path, lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in rows)))


def read_results(path: str | os.PathLike) -> list[dict]:
    """The rows of a results file: {step, task, metric, value, time, checkpoint, settings}, in the order they were
    scored (settings: scoring_settings of the EvalConfig that scored them)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scoring_settings(config: EvalConfig) -> dict[str, Any]:
    """What, beside the task, makes two scores comparable: the examples scored, the context, the dtype."""
    return {"limit": config.limit, "max_length": config.max_length, "dtype": config.dtype}


def teacher_scores(teacher: str, config: EvalConfig, cache: str | os.PathLike | None = None) -> Scores:
    """The teacher's scores, computed once: each (teacher, task, scoring settings) is kept in `cache` (a JSON file)
    and only the tasks missing there are scored."""
    _, tasks = resolve_tasks(config.tasks)
    identity = teacher if teacher in TESTBEDS or not Path(teacher).exists() else str(Path(teacher).resolve())
    settings = " | ".join(f"{k}={v}" for k, v in scoring_settings(config).items())
    key = lambda task: f"{identity} | {task} | {settings}"
    cache = Path(cache) if cache is not None else None
    known = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    missing = [task for task in tasks if key(task) not in known]
    if missing:
        print(f"eval: scoring the teacher {teacher} on {', '.join(missing)}", flush=True)
        fresh = evaluate_model(teacher, dataclasses.replace(config, tasks=tuple(missing)))
        known.update({key(task): fresh[task] for task in missing})
        if cache is not None:
            _replace_atomically(cache, lambda p: p.write_text(json.dumps(known, indent=1)))
    return {task: known[key(task)] for task in tasks}


def plot_scores(rows: list[dict], teacher: Scores, path: str | os.PathLike) -> None:
    """A PNG with one panel per (task, metric): the checkpoints' value against step, the teacher's as a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault((row["task"], row["metric"]), []).append((row["step"], row["value"]))
    cols = min(3, len(series))
    figure = Figure(figsize=(4.5 * cols, 3.2 * math.ceil(len(series) / cols)), layout="constrained")
    axes = list(figure.subplots(math.ceil(len(series) / cols), cols, squeeze=False).flat)
    for ax, ((task, metric), points) in zip(axes, series.items()):
        ax.plot(*zip(*sorted(points)), "o-", label="checkpoints")
        if metric in teacher.get(task, {}):
            ax.axhline(teacher[task][metric], linestyle="--", color="gray", label="teacher")
        ax.set(title=f"{task}: {metric}", xlabel="step")
        ax.legend(fontsize="small")
    for ax in axes[len(series):]:  # the last row's spare panels
        ax.set_visible(False)
    _replace_atomically(Path(path), lambda p: figure.savefig(p, format="png", dpi=100))


def check_tracker(report_to: str) -> None:
    if report_to not in TRACKERS:
        raise ValueError(f"report_to={report_to!r} is unknown; use one of {', '.join(TRACKERS)}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"report_to={report_to} needs the {package} package; pip install {package}, "
                         "or use report_to=none")


class Tracker:
    """Sends scores where training sends its logs, by TrainingArguments.report_to's names: tensorboard (event files
    in `folder`/tensorboard), wandb (its own run, offline unless WANDB_MODE says otherwise), or none."""

    def __init__(self, report_to: str, folder: Path, name: str):
        check_tracker(report_to)
        self.report_to, self.run = report_to, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(log_dir=str(folder / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; `wandb sync` uploads later
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=name,
                                  dir=str(folder), job_type="eval")
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.report_to == "tensorboard":
            for key, value in values.items():
                self.run.add_scalar(key, value, global_step=step)
            self.run.flush()
        elif self.report_to == "wandb":
            self.run.log({**values, STEP_METRIC: step})

    def close(self) -> None:
        if self.report_to == "tensorboard":
            self.run.close()
        elif self.report_to == "wandb":
            self.run.finish()


class ModelFamilyError(ValueError):
    """A checkpoint is not of the teacher's family: the wrong folder or the wrong teacher, which no retry mends."""


class Watcher:
    """Scores the checkpoints of one training run as they appear; see watch()."""

    def __init__(self, run_dir: str | os.PathLike, config: EvalConfig, teacher: str | None = None,
                 results_dir: str | os.PathLike | None = None, poll_seconds: float = 2.0, max_retries: int = 2,
                 wait_for_dir: bool = False, report_to: str = "none", tokenizer: str | None = None,
                 initial: str | os.PathLike | None = None):
        self.run_dir, self.config, self.teacher, self.tokenizer = Path(run_dir), config, teacher, tokenizer
        self.initial = Path(resolve_bundled(initial)) if initial is not None else None
        self.results_dir = Path(results_dir) if results_dir is not None else self.run_dir / "eval"
        self.poll_seconds, self.max_retries, self.report_to = poll_seconds, max_retries, report_to
        if poll_seconds <= 0 or max_retries < 0:
            raise ValueError(f"poll_seconds={poll_seconds} must be > 0 and max_retries={max_retries} >= 0")
        if not self.run_dir.is_dir() and not wait_for_dir:
            raise FileNotFoundError(f"no training run at {self.run_dir}; check the path, or pass wait_for_dir=True "
                                    "(CLI: wait_for_dir=true) to wait for the training to create it")
        if CHECKPOINT.match(self.run_dir.name) or (self.run_dir / "config.json").exists():
            raise ValueError(f"{self.run_dir} is a model folder, not a training run's output_dir; score it alone "
                             "(CLI: model=...), or watch the folder that holds its checkpoint-N folders")
        check_tracker(report_to)
        _, self.tasks = resolve_tasks(config.tasks)
        self.family = model_family(teacher) if teacher is not None else None
        self.results_path = self.results_dir / RESULTS_FILE
        self.attempts: Counter[int] = Counter()
        self.retry_after: dict[int, float] = {}
        self.given_up: set[int] = set()

    def _missing(self, step: int) -> list[str]:
        done = {row["task"] for row in self.rows if row["step"] == step}
        return [task for task in self.tasks if task not in done]

    def unscored(self) -> dict[int, Path]:
        """Complete checkpoints with tasks still to score, not given up on; the initial model is step 0."""
        found = complete_checkpoints(self.run_dir)
        if self.initial is not None:
            found = {0: self.initial, **found}
        return {step: folder for step, folder in found.items() if step not in self.given_up and self._missing(step)}

    def _check_family(self, folder: Path) -> None:
        found = model_family(folder)
        if self.family is not None and found != self.family:
            raise ModelFamilyError(
                f"{folder} holds a {found[0]} model with a vocabulary of {found[1]}, but the teacher {self.teacher} "
                f"is a {self.family[0]} one with {self.family[1]}: watch the output_dir of a run distilled from "
                "that teacher, or pass the run's teacher (CLI: teacher=...)")

    def score(self, step: int, folder: Path) -> None:
        tasks = self._missing(step)
        try:
            self._check_family(folder)
            scores = evaluate_model(folder, dataclasses.replace(self.config, tasks=tuple(tasks)), self.tokenizer)
        except ModelFamilyError:
            raise
        except Exception as error:  # any failure of one checkpoint is logged; the watcher goes on
            self._failed(step, folder, error)
            return
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.rows += [{"step": step, "task": task, "metric": metric, "value": value, "time": now,
                       "checkpoint": folder.name, "settings": scoring_settings(self.config)}
                      for task in tasks for metric, value in scores[task].items()]
        _write_json_lines(self.results_path, self.rows)
        plot_scores(self.rows, self.teacher_scores, self.results_dir / PLOT_FILE)
        values = {f"eval/{t}/{m}": v for t, metrics in scores.items() for m, v in metrics.items()}
        values |= {f"eval_teacher/{t}/{m}": v for t, metrics in self.teacher_scores.items() if t in scores
                   for m, v in metrics.items()}
        self.tracker.log(step, values)
        print(f"eval: {folder.name}: {self._summary(scores)}", flush=True)

    def _summary(self, scores: Scores) -> str:
        parts = []
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                teacher = self.teacher_scores.get(task, {}).get(metric)
                parts.append(f"{task} {metric} {value:.4f}" + (f" (teacher {teacher:.4f})" if teacher is not None
                                                                else ""))
        return ", ".join(parts)

    def _failed(self, step: int, folder: Path, error: Exception) -> None:
        self.attempts[step] += 1
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if not folder.exists():
            self.given_up.add(step)
            print(f"eval: {folder.name} was deleted before it was scored (save_total_limit?)", flush=True)
        elif self.attempts[step] > self.max_retries:
            self.given_up.add(step)
            print(f"eval: {folder.name} failed {self.attempts[step]} times, giving up on it: {reason}", flush=True)
        else:
            self.retry_after[step] = time.monotonic() + self.poll_seconds * self.attempts[step]
            print(f"eval: {folder.name} failed (attempt {self.attempts[step]} of {self.max_retries + 1}), "
                  f"will retry: {reason}", flush=True)

    def _wait_for_run_dir(self) -> None:
        if not self.run_dir.is_dir():
            print(f"eval: waiting for {self.run_dir} to appear", flush=True)
        while not self.run_dir.is_dir():
            time.sleep(self.poll_seconds)

    def _poll(self) -> None:
        """Score until the run has written its end marker and no complete checkpoint is left to score."""
        while True:
            # read before the scan: every checkpoint written before the marker is then complete on disk
            finished = (self.run_dir / END_MARKER).exists()
            unscored = self.unscored()
            due = [step for step in unscored if self.retry_after.get(step, 0) <= time.monotonic()]
            if due:
                self.score(due[0], unscored[due[0]])
            elif finished and not unscored:
                return
            else:
                time.sleep(self.poll_seconds)

    def run(self) -> list[dict]:
        """Watch until the run ends (or Ctrl-C); the rows of the results file."""
        tracker_opened = False
        try:
            self._wait_for_run_dir()
            self.results_dir.mkdir(parents=True, exist_ok=True)
            self.rows = read_results(self.results_path)
            done = sorted({row["step"] for row in self.rows})
            if done:
                print(f"eval: {self.results_path} already holds steps {', '.join(map(str, done))}", flush=True)
            self.teacher_scores = (teacher_scores(self.teacher, self.config, self.results_dir / TEACHER_FILE)
                                   if self.teacher is not None else {})
            self.tracker = Tracker(self.report_to, self.results_dir, f"{self.run_dir.name}-eval")
            tracker_opened = True
            self._poll()
            self._report_incomplete()
            skipped = f" but step {', '.join(map(str, sorted(self.given_up)))}" if self.given_up else ""
            print(f"eval: training has ended and every checkpoint is scored{skipped}; see {self.results_dir}",
                  flush=True)
        except KeyboardInterrupt:
            print(f"eval: stopped; scores so far are in {self.results_path}", flush=True)
        finally:
            if tracker_opened:
                self.tracker.close()
        return read_results(self.results_path)

    def _report_incomplete(self) -> None:
        complete = complete_checkpoints(self.run_dir)
        for folder in sorted(self.run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            match = CHECKPOINT.match(folder.name)
            if match and int(match[1]) not in complete:
                print(f"eval: {folder.name} was never completed (no {TRAINER_STATE_NAME}); not scored", flush=True)


def watch(run_dir: str | os.PathLike, config: EvalConfig = EvalConfig(), teacher: str | None = None,
          results_dir: str | os.PathLike | None = None, poll_seconds: float = 2.0, max_retries: int = 2,
          wait_for_dir: bool = False, report_to: str = "none", tokenizer: str | None = None,
          initial: str | os.PathLike | None = None) -> list[dict]:
    """Score every checkpoint of a training run as the Trainer writes it, until the run writes its end marker.

    Run it beside the training, on a device of its own (config.device). Checkpoints are scored lowest step first,
    each once the Trainer has finished writing it; results.jsonl, scores.png, teacher_scores.json (and tensorboard
    events) go to `results_dir` (default `run_dir`/eval). A restart skips what results.jsonl holds. A checkpoint that
    fails to load or score is logged and retried up to `max_retries` times, later, while the watcher goes on; one of
    another model family than the teacher stops it with an error. Ctrl-C stops it cleanly. Returns the results' rows.
    `initial`, the model before training (the compressed folder), is scored as step 0, so that the scores show the
    whole recovery from the zero-shot model on.
    """
    return Watcher(run_dir, config, teacher, results_dir, poll_seconds, max_retries, wait_for_dir, report_to,
                   tokenizer, initial).run()
