"""Scoring with lm-eval and the checkpoint watcher: the packaged tasks against the plain computation, bad input, a
failing checkpoint, and a real training watched from another process, killed and restarted."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from moe_compress.training_run import END_MARKER
from moe_compress.evaluate import (PLOT_FILE, RESULTS_FILE, TEACHER_FILE, EvalConfig, ModelFamilyError,
                                   evaluate_model, read_results, resolve_tasks, watch)
from moe_compress.tasks.tinyshakespeare import completion, documents, make_completion
from moe_compress.testbed import TESTBED_DIR, load_testbed, read_split

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
QUICK = EvalConfig(limit=2, device="cpu")
PNG = b"\x89PNG\r\n\x1a\n"


@torch.inference_mode()
def rolling_nll(model, text: str, L: int = 256) -> float:
    """Summed next-byte NLL of a document, read as lm-eval's rolling windows read it: byte 0 (the prefix) first, then
    windows predicting L bytes each, the last one fed a full L bytes of context ending where it ends."""
    tokens = list(text.encode())
    ids = torch.tensor([0] + tokens)  # ids[i] predicts tokens[i]
    total = 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))
        low = max(0, end - L)
        logits = model(input_ids=ids[low:end][None]).logits[0, start - low:].float()  # [end - start, V]
        total += F.cross_entropy(logits, torch.tensor(tokens[start:end]), reduction="sum").item()
    return total


@torch.inference_mode()
def choice_loglikelihood(model, context: str, choice: str, L: int = 256) -> float:
    ids = torch.tensor(list((context + choice).encode())[-(L + 1):])
    n = len(choice.encode())
    logits = model(input_ids=ids[:-1][None]).logits[0, -n:].float()  # [n, V]
    return -F.cross_entropy(logits, ids[-n:], reduction="sum").item()


def test_packaged_tasks_score_as_the_plain_computation():
    """lm-eval's numbers equal the same ones computed directly: the byte-level tokenizer and the 256-byte context go
    through HFLM unchanged."""
    model, tokenizer = load_testbed()
    scores = evaluate_model(model, EvalConfig(limit=12), tokenizer=tokenizer)
    docs = documents()["test"]["text"][:12]
    nll, n_bytes = sum(rolling_nll(model, doc) for doc in docs), sum(len(doc.encode()) for doc in docs)
    words = sum(len(doc.split()) for doc in docs)
    perplexity = scores["tinyshakespeare"]
    assert perplexity["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert perplexity["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
    assert perplexity["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    items = completion()["test"].select(range(12))
    right = [max(range(len(item["choices"])), key=lambda i: choice_loglikelihood(model, item["context"],
                                                                                 item["choices"][i])
                 / len(item["choices"][i])) == item["label"] for item in items]
    assert scores["tinyshakespeare_completion"]["acc_norm"] == pytest.approx(sum(right) / len(right))


def test_shipped_items_are_what_the_script_makes():
    rows = completion()["test"].to_list()
    assert rows == make_completion(read_split("validation")) and len(rows) == 200
    assert all(len(row["choices"]) == 4 and row["choices"][row["label"]].startswith(" ") for row in rows)


def test_bad_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'tinyshakespear'; did you mean tinyshakespeare"):
        evaluate_model("testbed", EvalConfig(tasks=["tinyshakespear"]))
    assert resolve_tasks(["wikitext", "ai2_arc"])[1] == ("wikitext", "arc_challenge", "arc_easy")
    with pytest.raises(FileNotFoundError, match="no training run at .*nowhere; check the path, or pass wait_for_dir"):
        watch(tmp_path / "nowhere", QUICK)
    with pytest.raises(ValueError, match="model is a model folder, not a training run's output_dir; score it alone"):
        watch(TESTBED_DIR, QUICK)
    with pytest.raises(ValueError, match="report_to='mlflow' is unknown"):
        watch(tmp_path, QUICK, report_to="mlflow")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="report_to=tensorboard needs the tensorboard package"):
            watch(tmp_path, QUICK, report_to="tensorboard")
    with pytest.raises(ValueError, match="limit=0 must be > 0"):
        EvalConfig(limit=0)
    assert not any(tmp_path.iterdir())


def finished_checkpoint(folder: Path, step: int) -> None:
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_a_checkpoint_of_another_family_stops_the_watcher(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "checkpoint-1")
    finished_checkpoint(tmp_path / "checkpoint-1", 1)
    with pytest.raises(ModelFamilyError, match="checkpoint-1 holds a mixtral model with a vocabulary of 128, but the "
                                               "teacher testbed is a qwen3_moe one with 256"):
        watch(tmp_path, EvalConfig(tasks=["tinyshakespeare"], limit=1, device="cpu"), teacher="testbed",
              poll_seconds=0.05)


def test_a_failing_checkpoint_is_retried_then_skipped_and_an_incomplete_one_never_read(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(TESTBED_DIR, run / f"checkpoint-{step}")
    (run / "checkpoint-1" / "model.safetensors").write_bytes(b"not safetensors")
    finished_checkpoint(run / "checkpoint-1", 1)
    finished_checkpoint(run / "checkpoint-2", 2)  # checkpoint-3 has no trainer state: still being written
    (run / END_MARKER).write_text(json.dumps({"global_step": 3}))
    rows = watch(run, QUICK, poll_seconds=0.05, max_retries=1, initial="testbed")  # the model before training
    out = capsys.readouterr().out
    assert {row["step"] for row in rows} == {0, 2} and {row["task"] for row in rows} == set(QUICK.tasks)
    assert rows[0]["step"] == 0 and rows[0]["checkpoint"] == TESTBED_DIR.name  # scored first: the plot starts there
    assert "checkpoint-1 failed (attempt 1 of 2), will retry" in out
    assert "checkpoint-1 failed 2 times, giving up on it" in out
    assert "checkpoint-3 was never completed" in out and "every checkpoint is scored but step 1;" in out
    assert (run / "eval" / PLOT_FILE).read_bytes().startswith(PNG)


def test_ctrl_c_stops_the_watcher_cleanly(tmp_path, capsys):
    # where SIGINT is ignored (a background job, nohup, some CI runners) it would never arrive: restore the terminal's
    # behaviour for this test, and the caller's after it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the run never appears nor ends
    try:
        interrupt.start()
        assert watch(tmp_path / "run", QUICK, poll_seconds=0.05, wait_for_dir=True) == []
    finally:
        interrupt.cancel()  # were watch to return early, the signal must not reach a later test
        signal.signal(signal.SIGINT, previous)
    out = capsys.readouterr().out
    assert "waiting for" in out and "stopped; scores so far are in" in out


TRAIN = """
import sys, torch
torch.set_num_threads(1)
from transformers import TrainingArguments
import moe_compress as mc
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill
from moe_compress.testbed import load_testbed
teacher, tokenizer = load_testbed()
student, _ = load_testbed()
mc.compress(student, mc.CompressionConfig(target_ratio=0.3, polish_steps=5), progress=False)
args = TrainingArguments(output_dir=sys.argv[1], max_steps=90, save_steps=30, per_device_train_batch_size=4,
                         learning_rate=1e-4, report_to="tensorboard", use_cpu=True, seed=0, disable_tqdm=True,
                         logging_steps=10)
distill(student, teacher, tokenizer, DataConfig(seq_len=64), DistillationConfig(alpha=0.9), args)
"""
WATCH = """
import sys
from moe_compress.evaluate import EvalConfig, watch
watch(sys.argv[1], EvalConfig(limit=2, device="cpu"), teacher="testbed", poll_seconds=0.2, wait_for_dir=True,
      report_to="tensorboard")
"""
STEPS = [30, 60, 90]


def python(code: str, run: Path, log: Path) -> subprocess.Popen:
    """`code` run in a fresh interpreter on `run`, its output in `log` (a file: a full pipe would stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", code, str(run)], env=ENV, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def scored_steps(rows: list[dict]) -> list[int]:
    """The steps in the order they were scored, each (step, task, metric) asserted to appear once."""
    keys = [(row["step"], row["task"], row["metric"]) for row in rows]
    assert len(keys) == len(set(keys)), "a score was recorded twice"
    return list(dict.fromkeys(row["step"] for row in rows))


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A real distillation writing checkpoints at steps 30, 60, 90 while a watcher, started first, waits for its
    folder and scores them in another process. (run folder, the watcher's output)"""
    base = tmp_path_factory.mktemp("watched")
    run, watcher_log, training_log = base / "run", base / "watcher.log", base / "training.log"
    watcher = python(WATCH, run, watcher_log)
    wait_for(lambda: "waiting for" in watcher_log.read_text(), "the watcher to start")
    training = python(TRAIN, run, training_log)
    assert training.wait(timeout=300) == 0, training_log.read_text()[-3000:]
    assert watcher.wait(timeout=300) == 0, watcher_log.read_text()[-3000:]
    return run, watcher_log.read_text()


@pytest.mark.slow
def test_watcher_scores_each_checkpoint_of_a_live_training_once_in_step_order(watched_run):
    run, out = watched_run
    rows = read_results(run / "eval" / RESULTS_FILE)
    assert scored_steps(rows) == STEPS
    assert {(row["task"], row["metric"]) for row in rows if row["step"] == 30} == {
        ("tinyshakespeare", m) for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")} | {
        ("tinyshakespeare_completion", m) for m in ("acc", "acc_norm")}
    assert all(set(row) == {"step", "task", "metric", "value", "time", "checkpoint", "settings"} for row in rows)
    scored = datetime.fromisoformat(rows[0]["time"]).timestamp()
    assert scored < (run / END_MARKER).stat().st_mtime, "the first checkpoint was scored only after training ended"
    teacher = json.loads((run / "eval" / TEACHER_FILE).read_text())
    assert len(teacher) == 2 and all(key.startswith("testbed | ") for key in teacher)
    assert (run / "eval" / PLOT_FILE).read_bytes().startswith(PNG)
    assert "checkpoint-90: tinyshakespeare" in out and "(teacher " in out
    assert "training has ended and every checkpoint is scored" in out


def tensorboard_scalars(folder: Path, skip: Path | None = None) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under `folder` but `skip`, read by tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        if skip is not None and events.is_relative_to(skip):
            continue
        reader = EventAccumulator(str(events))
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            found.setdefault(tag, []).extend((event.step, event.value) for event in reader.Scalars(tag))
    return found


@pytest.mark.slow
def test_training_logs_and_checkpoint_scores_reach_tensorboard(watched_run):
    run, _ = watched_run
    scores = tensorboard_scalars(run / "eval" / "tensorboard")
    rows = read_results(run / "eval" / RESULTS_FILE)
    for task, metric in (("tinyshakespeare", "bits_per_byte"), ("tinyshakespeare_completion", "acc")):
        expected = [(row["step"], row["value"]) for row in rows if (row["task"], row["metric"]) == (task, metric)]
        logged = scores[f"eval/{task}/{metric}"]
        assert [step for step, _ in logged] == STEPS and [step for step, _ in expected] == STEPS
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, expected))
        assert len(scores[f"eval_teacher/{task}/{metric}"]) == len(STEPS)
    training = tensorboard_scalars(run, skip=run / "eval")
    assert [step for step, _ in training["train/kl"]] == [10 * i for i in range(1, 10)]
    assert all(value > 0 for _, value in training["train/ce"])


@pytest.mark.slow
def test_a_killed_watcher_restarts_and_scores_only_what_is_left(watched_run, tmp_path):
    trained, _ = watched_run
    run, results = tmp_path / "run", tmp_path / "run" / "eval" / RESULTS_FILE
    run.mkdir()

    def publish(step: int) -> None:  # a checkpoint appears whole, as the Trainer's does once trainer_state.json lands
        shutil.copytree(trained / f"checkpoint-{step}", tmp_path / "staging")
        (tmp_path / "staging").rename(run / f"checkpoint-{step}")

    publish(30)
    watcher = python(WATCH, run, tmp_path / "first.log")
    wait_for(lambda: read_results(results), "the first checkpoint's scores")
    watcher.send_signal(signal.SIGKILL)
    watcher.wait()
    first = read_results(results)
    assert scored_steps(first) == [30]

    for step in STEPS[1:]:
        publish(step)
    shutil.copy(trained / END_MARKER, run / END_MARKER)
    assert python(WATCH, run, tmp_path / "second.log").wait(timeout=300) == 0
    out = (tmp_path / "second.log").read_text()
    rows = read_results(results)
    assert rows[: len(first)] == first and scored_steps(rows) == STEPS
    assert "already holds steps 30\n" in out and "scoring the teacher" not in out
    assert "checkpoint-30:" not in out
